//! In-process UDP echoes for the probe's tests: a faithful one and one that misbehaves on purpose.

use std::collections::BTreeSet;
use std::net::{SocketAddr, UdpSocket};
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use katamaran_probe::packet::{Header, Kind};
use nix::sys::socket::{setsockopt, sockopt};

/// What the echo does to counted (data) datagrams; ready handshakes are always answered unless
/// `ignore_first` says otherwise.
#[derive(Debug, Default, Clone)]
pub struct Faults {
    /// Swallow these sequence numbers.
    pub drop: Option<RangeInclusive<u64>>,
    /// Echo these sequence numbers twice.
    pub duplicate: BTreeSet<u64>,
    /// Hold each of these until the next datagram has been echoed, then echo it.
    pub reorder: BTreeSet<u64>,
    /// Ignore the first N datagrams of any kind (a guest still booting).
    pub ignore_first: u64,
}

/// A running echo; stops and joins its thread when dropped, even if the test fails.
#[derive(Debug)]
pub struct Echo {
    pub addr: SocketAddr,
    /// Datagrams seen (including ignored and dropped ones).
    pub seen: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Echo {
    pub fn start(bind: &str, faults: Faults) -> Echo {
        let socket = UdpSocket::bind(bind).expect("bind echo");
        // Like the guest's echo: room for ~1 s of traffic, so a descheduled echo thread on a busy
        // machine delays replies instead of dropping them.
        if setsockopt(&socket, sockopt::RcvBufForce, &(4 << 20)).is_err() {
            let _ = setsockopt(&socket, sockopt::RcvBuf, &(4 << 20));
        }
        socket.set_read_timeout(Some(Duration::from_millis(20))).expect("timeout");
        let addr = socket.local_addr().expect("addr");
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, seen) = (Arc::clone(&stop), Arc::clone(&seen));
            std::thread::spawn(move || serve(&socket, &faults, &stop, &seen))
        };
        Echo { addr, seen, stop, thread: Some(thread) }
    }

    pub fn faithful() -> Echo {
        Echo::start("127.0.0.1:0", Faults::default())
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(socket: &UdpSocket, faults: &Faults, stop: &AtomicBool, seen: &AtomicU64) {
    let mut buf = vec![0u8; 65_536];
    let mut held: Option<(Vec<u8>, SocketAddr)> = None;
    while !stop.load(Ordering::Relaxed) {
        let (n, from) = match socket.recv_from(&mut buf) {
            Ok(v) => v,
            Err(_) => continue,
        };
        let count = seen.fetch_add(1, Ordering::Relaxed);
        if count < faults.ignore_first {
            continue;
        }
        let datagram = &buf[..n];
        let seq = match Header::parse(datagram) {
            Some(h) if h.kind == Kind::Data => h.seq,
            _ => {
                let _ = socket.send_to(datagram, from);
                continue;
            }
        };
        if faults.drop.as_ref().is_some_and(|r| r.contains(&seq)) {
            continue;
        }
        if faults.reorder.contains(&seq) {
            held = Some((datagram.to_vec(), from));
            continue;
        }
        let _ = socket.send_to(datagram, from);
        if faults.duplicate.contains(&seq) {
            let _ = socket.send_to(datagram, from);
        }
        if let Some((d, to)) = held.take() {
            let _ = socket.send_to(&d, to);
        }
    }
}
