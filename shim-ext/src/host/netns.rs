//! The node's network namespace when the agent runs in a namespace of its own (a pod that is
//! not hostNetwork).
//!
//! Node work — tunnels, routes, neighbours, the data listener, incoming sandboxes — goes through
//! a [`NetnsHandle`] on the host's namespace (`--host-netns /proc/1/ns/net` with hostPID). A
//! socket keeps the namespace of the thread that created it, so the listening and connecting
//! sockets of the data plane are created on that handle's thread and then handed to tokio; the
//! control listener (`--listen-tcp`) stays in the agent's own namespace.

use std::fs::File;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
use nix::sys::statfs::{fstatfs, NSFS_MAGIC};

use crate::net::NetnsHandle;

/// `NS_GET_NSTYPE`: `_IO(0xb7, 0x3)` (`include/uapi/linux/nsfs.h`).
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// Why a host network namespace is unusable, or a socket in it could not be made.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The path cannot be opened.
    #[error("cannot open {path}")]
    Open {
        /// The namespace path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// `fstatfs` failed.
    #[error("cannot stat the filesystem of {path}")]
    Stat {
        /// The namespace path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a namespace file.
    #[error("{path} is not a namespace file (not on nsfs; expected e.g. /proc/1/ns/net)")]
    NotNamespace {
        /// The path.
        path: PathBuf,
    },
    /// The file is a namespace of another type.
    #[error("{path} is a namespace, but not a network namespace")]
    NotNetwork {
        /// The path.
        path: PathBuf,
    },
    /// The namespace type could not be read.
    #[error("cannot read the namespace type of {path}")]
    NamespaceType {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The namespace thread is gone.
    #[error("the network namespace thread of {path} is gone")]
    Thread {
        /// The namespace path.
        path: PathBuf,
    },
    /// Creating, binding or configuring a socket failed.
    #[error("cannot {what} {addr} in the network namespace {path}")]
    Socket {
        /// What was being done.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The namespace path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// Checks that `path` exists and is a network namespace file (a `/proc/<pid>/ns/net` link or
/// a bind mount of one): the file is on nsfs and `NS_GET_NSTYPE` says `CLONE_NEWNET`.
///
/// # Errors
/// [`Error::Open`], [`Error::Stat`], [`Error::NotNamespace`], [`Error::NamespaceType`],
/// [`Error::NotNetwork`].
pub fn check_net_namespace(path: &Path) -> Result<(), Error> {
    let file = File::open(path).map_err(|source| Error::Open { path: path.to_owned(), source })?;
    let fs = fstatfs(&file).map_err(|e| Error::Stat { path: path.to_owned(), source: e.into() })?;
    if fs.filesystem_type() != NSFS_MAGIC {
        return Err(Error::NotNamespace { path: path.to_owned() });
    }
    // SAFETY: `file` is an open descriptor for the whole call; NS_GET_NSTYPE takes no argument
    // and only returns an integer.
    let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE) };
    if kind < 0 {
        return Err(Error::NamespaceType { path: path.to_owned(), source: std::io::Error::last_os_error() });
    }
    if kind != libc::CLONE_NEWNET {
        return Err(Error::NotNetwork { path: path.to_owned() });
    }
    Ok(())
}

/// Binds a TCP listener on `addr` inside `ns` and returns it non-blocking, ready for
/// `tokio::net::TcpListener::from_std`.
///
/// # Errors
/// [`Error::Socket`] naming the step, [`Error::Thread`] when the namespace thread is gone.
pub async fn bind_tcp_in(ns: &NetnsHandle, addr: SocketAddr) -> Result<std::net::TcpListener, Error> {
    let path = ns.path().to_owned();
    let err_path = path.clone();
    ns.run(move || {
        let fail = |what, source| Error::Socket { what, addr, path: path.clone(), source };
        let l = std::net::TcpListener::bind(addr).map_err(|e| fail("bind", e))?;
        l.set_nonblocking(true).map_err(|e| fail("make non-blocking the listener on", e))?;
        Ok(l)
    })
    .await
    .map_err(|_| Error::Thread { path: err_path })?
}

/// A TCP socket of `addr`'s family created inside `ns`, neither bound nor connected,
/// close-on-exec, non-blocking (ready for `tokio::net::TcpSocket::from_std_stream`).
///
/// # Errors
/// [`Error::Socket`], [`Error::Thread`] when the namespace thread is gone.
pub async fn tcp_socket_in(ns: &NetnsHandle, addr: SocketAddr) -> Result<OwnedFd, Error> {
    let path = ns.path().to_owned();
    let family = if addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    let made = ns
        .run(move || socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK, None))
        .await
        .map_err(|_| Error::Thread { path: path.clone() })?;
    made.map_err(|e| Error::Socket { what: "create a socket for", addr, path, source: e.into() })
}

/// Connects to `addr` from a socket created inside `ns`. Only the socket is made on the
/// namespace thread; the connection itself is awaited on the caller's runtime.
///
/// # Errors
/// [`Error::Socket`] naming the step, [`Error::Thread`] when the namespace thread is gone.
pub async fn connect_from(ns: &NetnsHandle, addr: SocketAddr) -> Result<tokio::net::TcpStream, Error> {
    let sock =
        tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(tcp_socket_in(ns, addr).await?));
    sock.connect(addr).await.map_err(|source| Error::Socket {
        what: "connect to",
        addr,
        path: ns.path().to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_network_namespace_passes() {
        check_net_namespace(Path::new("/proc/self/ns/net")).expect("own netns");
    }

    #[test]
    fn other_namespace_types_and_files_are_refused() {
        type Want = fn(&Error) -> bool;
        let cases: &[(&str, Want)] = &[
            ("/proc/self/ns/mnt", |e| matches!(e, Error::NotNetwork { .. })),
            ("/proc/self/ns/uts", |e| matches!(e, Error::NotNetwork { .. })),
            ("/etc/hostname", |e| matches!(e, Error::NotNamespace { .. })),
            ("/proc/self/status", |e| matches!(e, Error::NotNamespace { .. })),
            ("/nonexistent/ns/net", |e| matches!(e, Error::Open { .. })),
        ];
        for (path, want) in cases {
            let e = check_net_namespace(Path::new(path)).expect_err(path);
            assert!(want(&e), "{path}: {e}");
            assert!(e.to_string().contains(path), "{path}: message names the path: {e}");
        }
    }

    #[tokio::test]
    async fn sockets_made_in_a_namespace_thread_work_from_the_runtime() {
        let ns = NetnsHandle::current().expect("own netns");
        let l = bind_tcp_in(&ns, "127.0.0.1:0".parse().expect("addr")).await.expect("bind");
        let l = tokio::net::TcpListener::from_std(l).expect("tokio listener");
        let addr = l.local_addr().expect("addr");
        let (accepted, connected) = tokio::join!(l.accept(), connect_from(&ns, addr));
        let (_, peer) = accepted.expect("accept");
        assert_eq!(peer, connected.expect("connect").local_addr().expect("local"));
    }
}
