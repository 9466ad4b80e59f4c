//! The QMP server: one client at a time per socket (QEMU's monitor chardev), a greeting, the
//! capabilities negotiation, then commands; descriptors come with `SCM_RIGHTS`.

use std::io::{IoSliceMut, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use serde_json::{json, Map, Value};

use crate::vm::Vm;

/// Longest QMP line accepted.
const MAX_LINE: usize = 1 << 20;
/// A client that does not read its events for this long is dropped (instead of stalling the VM).
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// Serves `listener` forever, one connection after the other.
pub fn serve(vm: &Arc<Vm>, listener: &UnixListener) {
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                if let Err(e) = session(vm, stream) {
                    eprintln!("katamaran-qemu-standin: QMP client: {e}");
                }
            }
            Err(e) => eprintln!("katamaran-qemu-standin: QMP accept: {e}"),
        }
    }
}

fn session(vm: &Arc<Vm>, stream: UnixStream) -> std::io::Result<()> {
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let writer = Arc::new(Mutex::new(stream.try_clone()?));
    let greeting = json!({"QMP": {"version": crate::vm::version(), "capabilities": ["oob"]}});
    send(&writer, &greeting)?;
    let mut negotiated = false;
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    let result = loop {
        let mut buf = [0u8; 8192];
        let n = match read_with_fds(&stream, &mut buf, &mut fds) {
            Ok(0) => break Ok(()),
            Ok(n) => n,
            Err(e) => break Err(e),
        };
        pending.extend_from_slice(&buf[..n]);
        if pending.len() > MAX_LINE {
            break Err(std::io::Error::other("QMP line too long"));
        }
        let mut quit = false;
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let Some(reply) = handle(vm, &line, &mut negotiated, &mut fds, &writer, &mut quit) else {
                continue;
            };
            if let Err(e) = send(&writer, &reply) {
                vm.detach(&writer);
                return Err(e);
            }
            if quit {
                eprintln!("katamaran-qemu-standin: quit");
                std::process::exit(0);
            }
        }
    };
    vm.detach(&writer);
    result
}

fn handle(
    vm: &Arc<Vm>,
    line: &[u8],
    negotiated: &mut bool,
    fds: &mut Vec<OwnedFd>,
    writer: &Arc<Mutex<UnixStream>>,
    quit: &mut bool,
) -> Option<Value> {
    let text = String::from_utf8_lossy(line);
    if text.trim().is_empty() {
        return None;
    }
    let request: Value = match serde_json::from_str(text.trim()) {
        Ok(v) => v,
        Err(e) => return Some(error(None, "GenericError", &format!("JSON parse error, {e}"))),
    };
    let id = request.get("id").cloned();
    let Some(cmd) = request.get("execute").and_then(Value::as_str) else {
        return Some(error(id, "GenericError", "Expected 'execute' in QMP input"));
    };
    let empty = Map::new();
    let args = request.get("arguments").and_then(Value::as_object).unwrap_or(&empty);
    let result = match (cmd, *negotiated) {
        ("qmp_capabilities", false) => {
            *negotiated = true;
            // From now on the client gets events.
            vm.attach(Arc::clone(writer));
            Ok(json!({}))
        }
        ("qmp_capabilities", true) => Err((
            "CommandNotFound",
            "Capabilities negotiation is already complete, command ignored".to_owned(),
        )),
        (_, false) => Err((
            "CommandNotFound",
            format!("Expecting capabilities negotiation with 'qmp_capabilities' (not {cmd})"),
        )),
        (cmd, true) => {
            *quit = cmd == "quit";
            vm.execute(cmd, args, fds)
        }
    };
    Some(match result {
        Ok(ret) => with_id(json!({"return": ret}), id),
        Err((class, desc)) => error(id, class, &desc),
    })
}

fn with_id(mut v: Value, id: Option<Value>) -> Value {
    if let (Some(id), Some(obj)) = (id, v.as_object_mut()) {
        obj.insert("id".into(), id);
    }
    v
}

fn error(id: Option<Value>, class: &str, desc: &str) -> Value {
    with_id(json!({"error": {"class": class, "desc": desc}}), id)
}

fn send(writer: &Arc<Mutex<UnixStream>>, v: &Value) -> std::io::Result<()> {
    let mut w = writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    w.write_all(format!("{v}\r\n").as_bytes())
}

/// One `recvmsg`: bytes into `buf`, descriptors appended to `fds`.
fn read_with_fds(stream: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> std::io::Result<usize> {
    let mut cmsg = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = loop {
        match recvmsg::<()>(stream.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC) {
            Err(nix::errno::Errno::EINTR) => {}
            other => break other.map_err(std::io::Error::from)?,
        }
    };
    for c in msg.cmsgs().map_err(std::io::Error::from)? {
        if let ControlMessageOwned::ScmRights(received) = c {
            for fd in received {
                // SAFETY: the kernel just installed `fd` in this process for this message; nothing
                // else owns it.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Ok(msg.bytes)
}
