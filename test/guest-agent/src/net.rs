//! The agent's servers: `udp-echo` and `http`, both dual-stack.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use crate::json;
use crate::sys;
use crate::writer::read_status;

/// How long a blocked receive or accept waits before looking at the stop flag again.
const POLL: Duration = Duration::from_millis(200);
/// A client gets this long to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a server failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Neither the IPv6 (dual-stack) nor the IPv4 wildcard could be bound.
    #[error("failed to bind {proto} port {port}")]
    Bind {
        /// `udp` or `tcp`.
        proto: &'static str,
        /// The port.
        port: u16,
        /// The error of the IPv4 attempt (the last one).
        #[source]
        source: io::Error,
    },
    /// A socket option could not be set.
    #[error("failed to configure the {0} socket")]
    Configure(&'static str, #[source] io::Error),
    /// Receiving failed with an error other than a timeout.
    #[error("failed to receive on the UDP echo")]
    Recv(#[source] io::Error),
    /// Accepting failed.
    #[error("failed to accept an HTTP connection")]
    Accept(#[source] io::Error),
}

/// Binds the UDP echo: `[::]:port` (which also takes IPv4 on Linux's default `bindv6only=0`),
/// falling back to `0.0.0.0:port` on a kernel without IPv6.
///
/// # Errors
/// [`NetError::Bind`] when neither wildcard can be bound.
pub fn bind_udp(port: u16) -> Result<UdpSocket, NetError> {
    let socket = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, port))
        .or_else(|_| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)))
        .map_err(|source| NetError::Bind { proto: "udp", port, source })?;
    socket.set_read_timeout(Some(POLL)).map_err(|e| NetError::Configure("udp", e))?;
    // A TCG vCPU can stall the echo for tens of ms; at 5000 pps the default ~200 KiB buffer (a
    // few hundred small datagrams) would overflow. Best effort: the echo works without it.
    if let Err(e) = set_recv_buffer(&socket, RECV_BUFFER) {
        eprintln!("katamaran-guest udp-echo: could not enlarge the receive buffer: {e}");
    }
    Ok(socket)
}

/// Receive buffer for the echo: ~1 s of small datagrams at 5000 pps.
const RECV_BUFFER: usize = 4 << 20;

/// Sets SO_RCVBUF, past `net.core.rmem_max` when privileged (SO_RCVBUFFORCE, as in the guest).
fn set_recv_buffer(socket: &UdpSocket, bytes: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    let set = |option: libc::c_int| {
        // SAFETY: the fd is open for the duration of the call (borrowed from `socket`), and the
        // option value points to a live c_int whose size is passed alongside.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                std::ptr::from_ref(&value).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    set(libc::SO_RCVBUFFORCE).or_else(|_| set(libc::SO_RCVBUF))
}

/// Echoes every datagram back to its sender, verbatim, until `stop`.
///
/// # Errors
/// [`NetError::Recv`] on a receive error other than a timeout. Send errors are counted and
/// skipped: the probe counts the loss.
pub fn serve_echo(socket: &UdpSocket, stop: &AtomicBool) -> Result<u64, NetError> {
    let mut buf = vec![0u8; 65_536];
    let mut echoed = 0u64;
    let mut send_errors = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let (n, from) = match socket.recv_from(&mut buf) {
            Ok(v) => v,
            Err(e) if transient(&e) => continue,
            Err(e) => return Err(NetError::Recv(e)),
        };
        match socket.send_to(&buf[..n], from) {
            Ok(_) => echoed += 1,
            Err(e) => {
                send_errors += 1;
                if send_errors.is_power_of_two() {
                    eprintln!("katamaran-guest udp-echo: {send_errors} send errors, last to {from}: {e}");
                }
            }
        }
    }
    Ok(echoed)
}

fn transient(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted)
}

/// Binds the HTTP listener, dual-stack like [`bind_udp`].
///
/// # Errors
/// [`NetError::Bind`] when neither wildcard can be bound.
pub fn bind_tcp(port: u16) -> Result<TcpListener, NetError> {
    TcpListener::bind((Ipv6Addr::UNSPECIFIED, port))
        .or_else(|_| TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)))
        .map_err(|source| NetError::Bind { proto: "tcp", port, source })
}

/// What the HTTP page reports.
#[derive(Debug, Clone)]
pub struct PageInfo {
    /// The instance name (`katamaran.id=` on the kernel command line).
    pub instance: String,
    /// Directory of the disk writers' status files, one per disk, named after the disk.
    pub status_dir: PathBuf,
}

/// The JSON page: `{"instance", "uptime_ms", "hostname", "boot_id", "disk_records"}`, where
/// `disk_records` maps each disk to its last durable sequence number (null before the first).
pub fn page(info: &PageInfo) -> String {
    let mut disks: Vec<(String, Option<u64>)> = std::fs::read_dir(&info.status_dir)
        .map(|dir| {
            dir.filter_map(Result::ok)
                .map(|e| (e.file_name().to_string_lossy().into_owned(), read_status(&e.path())))
                .collect()
        })
        .unwrap_or_default();
    disks.sort();
    let records = disks.iter().fold(json::Object::new(), |o, (name, seq)| o.opt_u64(name, *seq)).finish();
    json::Object::new()
        .str("instance", &info.instance)
        .opt_u64("uptime_ms", sys::uptime_ms())
        .str("hostname", &sys::hostname())
        .str("boot_id", &sys::kernel_boot_id())
        .raw("disk_records", &records)
        .finish()
}

/// The full HTTP/1.1 response for a request whose first line is `request_line`.
pub fn respond(request_line: &str, info: &PageInfo) -> String {
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, body) = match (method, path.split('?').next().unwrap_or("")) {
        ("GET" | "HEAD", "/") => ("200 OK", page(info)),
        ("GET" | "HEAD", _) => ("404 Not Found", r#"{"error":"not found"}"#.to_owned()),
        _ => ("405 Method Not Allowed", r#"{"error":"only GET"}"#.to_owned()),
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len() + 1
    );
    if method != "HEAD" {
        response.push_str(&body);
        response.push('\n');
    }
    response
}

/// Serves the page until `stop` (checked after each connection; a stopper connects once to wake
/// the accept). Each connection gets its own thread, so a stuck client blocks nobody.
///
/// # Errors
/// [`NetError::Accept`] when accepting fails for a reason other than an interrupted call or a
/// client that went away first.
pub fn serve_http(listener: &TcpListener, info: &PageInfo, stop: &AtomicBool) -> Result<(), NetError> {
    while !stop.load(Ordering::Relaxed) {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if transient(&e) || e.kind() == io::ErrorKind::ConnectionAborted => continue,
            Err(e) => return Err(NetError::Accept(e)),
        };
        let info = info.clone();
        if let Err(e) = thread::Builder::new().name("http-conn".into()).spawn(move || handle(stream, &info)) {
            eprintln!("katamaran-guest http: failed to start a connection thread: {e}");
        }
    }
    Ok(())
}

fn handle(mut stream: TcpStream, info: &PageInfo) {
    let _ = stream.set_read_timeout(Some(REQUEST_TIMEOUT));
    let mut buf = [0u8; 4096];
    let mut len = 0;
    // Read until the end of the headers (or the buffer is full): the request line is all we use.
    while len < buf.len() {
        match stream.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => {
                len += n;
                if buf[..len].windows(4).any(|w| w == b"\r\n\r\n")
                    || buf[..len].windows(2).any(|w| w == b"\n\n")
                {
                    break;
                }
            }
            Err(_) => return,
        }
    }
    let request = String::from_utf8_lossy(&buf[..len]);
    let line = request.lines().next().unwrap_or("");
    let _ = stream.write_all(respond(line, info).as_bytes());
    let _ = stream.flush();
}

/// The instance name for the page: the flag wins, then `katamaran.id=`, then the host name.
pub fn instance_name(flag: Option<&str>) -> String {
    flag.map(str::to_owned)
        .or_else(|| sys::cmdline_param(&sys::kernel_cmdline(), "katamaran.id"))
        .unwrap_or_else(sys::hostname)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;

    fn info(dir: &std::path::Path) -> PageInfo {
        PageInfo { instance: "web-\"0\"".into(), status_dir: dir.to_owned() }
    }

    #[test]
    fn the_page_lists_each_disks_last_record() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vdb"), format!("{:>20}\n", 41)).unwrap();
        std::fs::write(dir.path().join("vdc"), "").unwrap();
        let p = page(&info(dir.path()));
        assert!(p.starts_with(r#"{"instance":"web-\"0\"","uptime_ms":"#), "{p}");
        assert!(p.contains(r#""disk_records":{"vdb":41,"vdc":null}"#), "{p}");
    }

    #[test]
    fn responses_by_method_and_path() {
        let dir = tempfile::tempdir().unwrap();
        let i = info(dir.path());
        let ok = respond("GET / HTTP/1.1", &i);
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n") && ok.contains("\"instance\""));
        let (head, body) = ok.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        assert!(respond("GET /?x=1 HTTP/1.0", &i).starts_with("HTTP/1.1 200"));
        assert!(respond("GET /nope HTTP/1.1", &i).starts_with("HTTP/1.1 404"));
        assert!(respond("POST / HTTP/1.1", &i).starts_with("HTTP/1.1 405"));
        assert!(respond("HEAD / HTTP/1.1", &i).ends_with("\r\n\r\n"));
        assert!(respond("", &i).starts_with("HTTP/1.1 405"));
    }
}
