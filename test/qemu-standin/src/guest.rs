//! The guest: while the VM runs it reads frames from the tap and answers them
//! ([`crate::frames`]); while it is stopped it reads nothing, so frames wait in the tap's queue
//! (where katamaran's tap drain finds them on a source that handed over).

use std::io::{ErrorKind, Read, Write};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::frames::{respond, Answer};
use crate::vm::{wait_readable, Vm};

/// How often a running guest with nothing to read re-checks that it still runs.
const IDLE_POLL: Duration = Duration::from_millis(20);

/// Runs the guest until the process ends.
pub fn run(vm: &Arc<Vm>) {
    let Some(tap) = vm.tap().cloned() else { return };
    let mac = vm.mac();
    let mut buf = vec![0u8; 65_536];
    loop {
        vm.wait_running();
        if !wait_readable(&*tap, IDLE_POLL) {
            continue;
        }
        // One frame per read; the run state is checked before each, so nothing is read from
        // the moment the VM stops.
        while vm.running() {
            let n = match (&*tap).read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => break,
                Err(e) => {
                    eprintln!("katamaran-qemu-standin: tap read: {e}");
                    std::thread::sleep(IDLE_POLL);
                    break;
                }
            };
            let Some(answer) = respond(&buf[..n], mac) else { continue };
            let frame = match answer {
                Answer::Echo(f) => {
                    vm.echoed.fetch_add(1, Ordering::SeqCst);
                    f
                }
                Answer::Other(f) => f,
            };
            if let Err(e) = (&*tap).write_all(&frame) {
                eprintln!("katamaran-qemu-standin: tap write: {e}");
            }
        }
    }
}
