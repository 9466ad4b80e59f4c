//! Running code inside one of the lab's network namespaces without spawning a process.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use nix::sched::{setns, CloneFlags};

use crate::error::LabError;

/// Runs `f` on a fresh thread that has entered the network namespace `/run/netns/<name>`.
///
/// A thread of its own because `setns` changes only the calling thread, and the thread ends with
/// `f`, so no other code ever runs in the lab's namespace by accident.
///
/// # Errors
/// When the namespace cannot be entered or `f` panics; `f`'s own result is passed through.
pub fn in_netns<T, F>(name: &str, f: F) -> Result<T, LabError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, LabError> + Send + 'static,
{
    in_netns_at(Path::new(&format!("/run/netns/{name}")), f)
}

/// [`in_netns`] for the namespace at `path` (e.g. a container's `/proc/<pid>/ns/net`).
///
/// # Errors
/// As [`in_netns`].
pub fn in_netns_at<T, F>(path: &Path, f: F) -> Result<T, LabError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, LabError> + Send + 'static,
{
    let name = path.display().to_string();
    let owned = name.clone();
    let path = path.to_owned();
    let handle = std::thread::spawn(move || {
        let netns = File::open(&path).map_err(|source| LabError::Netns { name: owned.clone(), source })?;
        setns(&netns, CloneFlags::CLONE_NEWNET)
            .map_err(|errno| LabError::Netns { name: owned.clone(), source: errno.into() })?;
        f()
    });
    handle.join().map_err(|_| LabError::NetnsThread { name })?
}

/// `GET /` over HTTP/1.0 from inside namespace `netns`; returns the body of a 200 answer.
///
/// # Errors
/// On a socket error, a timeout (`timeout` bounds connect and each read/write) or a non-200
/// status.
pub fn http_get(netns: &str, addr: SocketAddr, timeout: Duration) -> Result<String, LabError> {
    http_get_path(netns, addr, "/", timeout)
}

/// [`http_get`] of `path`.
///
/// # Errors
/// As [`http_get`].
pub fn http_get_path(
    netns: &str,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<String, LabError> {
    http_get_at(Path::new(&format!("/run/netns/{netns}")), addr, path, timeout)
}

/// [`http_get_path`] from the network namespace at `netns` (e.g. a container's
/// `/proc/<pid>/ns/net`).
///
/// # Errors
/// As [`http_get`].
pub fn http_get_at(
    netns: &Path,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<String, LabError> {
    let url = format!("http://{addr}{path}");
    let path = path.to_owned();
    in_netns_at(netns, move || {
        let io = |source| LabError::Http { url: url.clone(), source };
        let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(io)?;
        stream.set_read_timeout(Some(timeout)).map_err(io)?;
        stream.set_write_timeout(Some(timeout)).map_err(io)?;
        let host = match addr {
            SocketAddr::V4(a) => a.ip().to_string(),
            SocketAddr::V6(a) => format!("[{}]", a.ip()),
        };
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {host}\r\nConnection: close\r\n\r\n").map_err(io)?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).map_err(io)?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text.as_str(), ""));
        let status_line = head.lines().next().unwrap_or("").to_owned();
        if status_line.split_whitespace().nth(1) != Some("200") {
            return Err(LabError::HttpStatus { url: url.clone(), status_line });
        }
        Ok(body.to_owned())
    })
}
