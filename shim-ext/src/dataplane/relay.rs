//! Bridging an authenticated TCP stream to a unix socket, for streams QEMU cannot take as an fd:
//! multifd channels (QEMU 7.2 takes no multifd channel as an fd). Disk streams need none: the
//! destination's NBD server accepts on a gate ([`super::gate`]).
//!
//! The bytes never enter user space: each direction `splice(2)`s from its socket into a pipe and
//! from the pipe into the other socket, so a relay costs two system calls per pipe-full and no
//! copy of its own (a buffered copy read and wrote every byte once more, and held a relayed NBD
//! stream near half a direct stream's rate on two loaded cores; docs/PERFORMANCE.md).

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use nix::sys::socket::{shutdown, Shutdown};
use tokio::io::unix::AsyncFd;

/// The pipe each direction moves its bytes through, and the most one `splice` moves.
pub const RELAY_BUFFER: usize = 1 << 20;

/// Bytes moved each way when a relay ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Relayed {
    /// From `a` to `b`.
    pub a_to_b: u64,
    /// From `b` to `a`.
    pub b_to_a: u64,
}

/// A connected stream socket a relay can take over.
pub trait Socket {
    /// Leaves the async runtime's hands as a non-blocking descriptor.
    ///
    /// # Errors
    /// When the runtime cannot release it.
    fn into_fd(self) -> io::Result<OwnedFd>;
}

impl Socket for tokio::net::TcpStream {
    fn into_fd(self) -> io::Result<OwnedFd> {
        Ok(self.into_std()?.into())
    }
}

impl Socket for tokio::net::UnixStream {
    fn into_fd(self) -> io::Result<OwnedFd> {
        Ok(self.into_std()?.into())
    }
}

/// Moves bytes both ways until both sides have closed, shutting down each write side when its
/// reader hits EOF; both sockets are closed when it returns.
///
/// # Errors
/// The first I/O error of either direction, or of setting up the pipes.
pub async fn relay(a: impl Socket, b: impl Socket) -> io::Result<Relayed> {
    let a = watch(a.into_fd()?)?;
    let b = watch(b.into_fd()?)?;
    let (a_to_b, b_to_a) = tokio::try_join!(pump(&a, &b), pump(&b, &a))?;
    Ok(Relayed { a_to_b, b_to_a })
}

/// Registers `fd` with the runtime's reactor.
fn watch(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an `OwnedFd` is open until dropped, and the `AsyncFd` owns it, so the descriptor
    // stays open and the same for the registration's whole life.
    unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

/// One direction: socket → pipe → socket, until `from` says EOF.
async fn pump(from: &AsyncFd<OwnedFd>, to: &AsyncFd<OwnedFd>) -> io::Result<u64> {
    let (pipe_out, pipe_in) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
    // Best effort: a 64 KiB default pipe only means more system calls per MiB.
    let _ = fcntl(&pipe_in, FcntlArg::F_SETPIPE_SZ(RELAY_BUFFER as libc::c_int));
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    let mut moved = 0u64;
    loop {
        // The pipe is empty here, so EAGAIN can only be the socket's.
        let filled = loop {
            let mut ready = from.readable().await?;
            match ready.try_io(|fd| Ok(splice(fd.get_ref(), None, &pipe_in, None, RELAY_BUFFER, flags)?)) {
                Ok(result) => break result?,
                Err(_would_block) => continue,
            }
        };
        if filled == 0 {
            match shutdown(to.get_ref().as_raw_fd(), Shutdown::Write) {
                Ok(()) | Err(nix::errno::Errno::ENOTCONN) => return Ok(moved),
                Err(e) => return Err(e.into()),
            }
        }
        let mut left = filled;
        while left > 0 {
            let mut ready = to.writable().await?;
            match ready.try_io(|fd| Ok(splice(pipe_out.as_fd(), None, fd.get_ref(), None, left, flags)?)) {
                Ok(result) => left -= result?,
                Err(_would_block) => continue,
            }
        }
        moved += filled as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn pattern(len: usize, seed: usize) -> Vec<u8> {
        (0..len).map(|i| ((i + seed) % 251) as u8).collect()
    }

    /// A TCP client, a relay, a unix server: what the destination's NBD relay sits between.
    async fn tcp_relay_unix() -> (
        tokio::net::TcpStream,
        tokio::net::UnixStream,
        tokio::task::JoinHandle<io::Result<Relayed>>,
        tempfile::TempDir,
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nbd.sock");
        let unix_listener = tokio::net::UnixListener::bind(&path).expect("bind");
        let tcp_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let tcp_addr = tcp_listener.local_addr().expect("addr");
        let relay_task = tokio::spawn(async move {
            let (tcp, _) = tcp_listener.accept().await?;
            let unix = tokio::net::UnixStream::connect(&path).await?;
            relay(tcp, unix).await
        });
        let client = tokio::net::TcpStream::connect(tcp_addr).await.expect("connect");
        let (server, _) = unix_listener.accept().await.expect("accept");
        (client, server, relay_task, dir)
    }

    #[tokio::test]
    async fn relays_both_ways_and_counts() {
        let (mut client, mut server, relay_task, _dir) = tcp_relay_unix().await;
        let payload = pattern(3 * RELAY_BUFFER + 17, 0);
        let expected = payload.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&payload).await.expect("write");
            client.shutdown().await.expect("shutdown");
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.expect("read back");
            back
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.expect("read");
        assert!(got == expected, "payload intact");
        server.write_all(b"reply").await.expect("reply");
        server.shutdown().await.expect("shutdown");
        drop(server);
        assert_eq!(writer.await.expect("join"), b"reply");
        let counts = relay_task.await.expect("join").expect("relay");
        assert_eq!(counts, Relayed { a_to_b: expected.len() as u64, b_to_a: 5 });
    }

    /// NBD's shape: both sides write while the other writes, in uneven pieces, neither waits for
    /// the other to finish; nothing may be lost, reordered or stuck.
    #[tokio::test]
    async fn carries_both_directions_at_once_in_order() {
        let (client, server, relay_task, _dir) = tcp_relay_unix().await;
        let up = pattern(5 * RELAY_BUFFER + 4093, 1);
        let down = pattern(4 * RELAY_BUFFER + 511, 7);
        let (mut client_rd, mut client_wr) = client.into_split();
        let (mut server_rd, mut server_wr) = server.into_split();
        let (up_sent, down_sent) = (up.clone(), down.clone());
        let send_up = tokio::spawn(async move {
            for chunk in up_sent.chunks(70_001) {
                client_wr.write_all(chunk).await?;
            }
            client_wr.shutdown().await
        });
        let send_down = tokio::spawn(async move {
            for chunk in down_sent.chunks(3_001) {
                server_wr.write_all(chunk).await?;
            }
            server_wr.shutdown().await
        });
        let mut got_up = Vec::new();
        let mut got_down = Vec::new();
        let (r1, r2) = tokio::join!(server_rd.read_to_end(&mut got_up), client_rd.read_to_end(&mut got_down));
        r1.expect("read up");
        r2.expect("read down");
        send_up.await.expect("join").expect("send up");
        send_down.await.expect("join").expect("send down");
        assert!(got_up == up, "upstream intact ({} of {} bytes)", got_up.len(), up.len());
        assert!(got_down == down, "downstream intact ({} of {} bytes)", got_down.len(), down.len());
        let counts = relay_task.await.expect("join").expect("relay");
        assert_eq!(counts, Relayed { a_to_b: up.len() as u64, b_to_a: down.len() as u64 });
    }

    /// A side that goes away mid-stream ends the relay with an error and closes the other side.
    #[tokio::test]
    async fn a_reset_peer_ends_the_relay_with_an_error_and_closes_the_other_side() {
        let (client, mut server, relay_task, _dir) = tcp_relay_unix().await;
        // Unread data on close makes the kernel reset the connection.
        let linger = libc::linger { l_onoff: 1, l_linger: 0 };
        nix::sys::socket::setsockopt(&client, nix::sys::socket::sockopt::Linger, &linger).expect("linger");
        drop(client);
        // Keep writing towards the reset client until the relay notices.
        let writer = tokio::spawn(async move {
            let chunk = pattern(64 * 1024, 3);
            loop {
                if server.write_all(&chunk).await.is_err() {
                    return;
                }
            }
        });
        let result = tokio::time::timeout(std::time::Duration::from_secs(10), relay_task).await;
        let result = result.expect("the relay ends").expect("join");
        assert!(result.is_err(), "a reset is an error: {result:?}");
        tokio::time::timeout(std::time::Duration::from_secs(10), writer)
            .await
            .expect("the unix side closes")
            .expect("join");
    }
}
