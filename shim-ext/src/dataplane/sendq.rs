//! The send queue of the RAM stream, drained before the switchover's stop.
//!
//! QEMU writes into its socket as fast as the kernel takes it, and TCP's autotuning lets the
//! sender's queue grow to megabytes while the destination's QEMU (decrypting, loading pages) is
//! the slower end: in the lab the source held 2.3–3.4 MB not yet sent and the destination 1 MB
//! not yet read, for the whole pre-copy. Whatever sits there when the VM stops crosses inside
//! the guest's pause: QEMU's trace showed the destination 8–57 ms behind the source when the
//! source sent its device state (katamaran and bare QEMU alike).
//!
//! Smaller buffers for the whole stream would bound that, but each wake-up of a QEMU blocked
//! on a full socket costs a scheduling delay on a busy host: a dirtying guest's pre-copy ran
//! at a third to under half of its rate with 256 KiB buffers or a 128 KiB `TCP_NOTSENT_LOWAT`
//! from the start. So the queue is
//! bounded only for the switchover: [`SendQueue::drain`] sets `TCP_NOTSENT_LOWAT` (QEMU's
//! writes then block while more than that waits unsent), waits until what waits is below it,
//! and the caller stops the VM and calls [`SendQueue::unbound`]. The guest runs meanwhile; the
//! bytes cross either way, but before the stop instead of after it.
//!
//! The handle is a second descriptor of the socket QEMU holds (socket options and queues are the
//! socket's, not the descriptor's); it is closed when dropped. Linux only.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// `ioctl` request for the bytes in a TCP socket's send queue not sent yet (`linux/sockios.h`;
/// not in the `libc` crate).
const SIOCOUTQNSD: libc::Ioctl = 0x894B;

/// A second descriptor of a TCP socket QEMU sends on.
#[derive(Debug)]
pub struct SendQueue {
    fd: OwnedFd,
}

/// What a [`SendQueue::drain`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Bytes unsent when the drain began.
    pub before: usize,
    /// Bytes unsent when it ended.
    pub after: usize,
    /// How long it waited.
    pub waited: Duration,
    /// Whether it ended at its limit rather than below the bound.
    pub timed_out: bool,
}

/// Takes this side's descriptor of the socket (QEMU holds its own).
impl From<OwnedFd> for SendQueue {
    fn from(fd: OwnedFd) -> Self {
        Self { fd }
    }
}

impl SendQueue {
    /// Duplicates `socket` (a connected TCP socket).
    ///
    /// # Errors
    /// The `dup` failing.
    pub fn of(socket: &impl AsFd) -> std::io::Result<Self> {
        Ok(Self { fd: socket.as_fd().try_clone_to_owned()? })
    }

    /// Bytes written to the socket that TCP has not sent yet.
    ///
    /// # Errors
    /// The `ioctl` failing (not a TCP socket, not connected).
    pub fn unsent(&self) -> std::io::Result<usize> {
        let mut n: libc::c_int = 0;
        // SAFETY: SIOCOUTQNSD writes one int through the pointer, which points at `n`, alive and
        // writable for the call; the descriptor is owned by `self`.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), SIOCOUTQNSD, &raw mut n) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(usize::try_from(n).unwrap_or(0))
    }

    /// Lets at most `bytes` wait unsent: writers block above it. 0 puts back the system's
    /// default (`net.ipv4.tcp_notsent_lowat`, unbounded unless set).
    fn set_lowat(&self, bytes: u32) -> std::io::Result<()> {
        let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        // SAFETY: the option value is one int read from `v`, alive for the call, with its size
        // passed; the descriptor is owned by `self`.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_NOTSENT_LOWAT,
                (&raw const v).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Bounds what may wait unsent to `bound` bytes and waits, polling every millisecond, until
    /// no more than that waits or `limit` passed. The bound stays until [`Self::unbound`].
    ///
    /// # Errors
    /// The socket option or the `ioctl` failing.
    pub async fn drain(&self, bound: u32, limit: Duration) -> std::io::Result<Drained> {
        let started = Instant::now();
        let before = self.unsent()?;
        self.set_lowat(bound)?;
        let bound = usize::try_from(bound).unwrap_or(usize::MAX);
        let mut after = before;
        while after > bound {
            if started.elapsed() >= limit {
                return Ok(Drained { before, after, waited: started.elapsed(), timed_out: true });
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
            after = self.unsent()?;
        }
        Ok(Drained { before, after, waited: started.elapsed(), timed_out: false })
    }

    /// Lifts the bound [`Self::drain`] set.
    ///
    /// # Errors
    /// The socket option failing.
    pub fn unbound(&self) -> std::io::Result<()> {
        self.set_lowat(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    /// A connected pair on loopback whose receiver does not read: what the sender writes piles
    /// up in its queue once the receiver's buffer is full.
    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let tx = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (rx, _) = l.accept().expect("accept");
        (tx, rx)
    }

    /// Writes without blocking until the socket takes no more; returns how much it took.
    fn fill(tx: &mut TcpStream) -> usize {
        tx.set_nonblocking(true).expect("nonblocking");
        let chunk = vec![7u8; 64 * 1024];
        let mut total = 0;
        loop {
            match tx.write(&chunk) {
                Ok(n) => total += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return total,
                Err(e) => panic!("write: {e}"),
            }
        }
    }

    /// The bound as the socket has it (0: the system's default).
    fn lowat(q: &SendQueue) -> i32 {
        let mut v: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: the option is one int written to `v`, its size in `len`; both outlive the call.
        let rc = unsafe {
            libc::getsockopt(
                q.fd.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_NOTSENT_LOWAT,
                (&raw mut v).cast(),
                &raw mut len,
            )
        };
        assert_eq!(rc, 0, "getsockopt: {}", std::io::Error::last_os_error());
        v
    }

    #[tokio::test]
    async fn drain_waits_until_the_reader_took_the_queue_below_the_bound() {
        let (mut tx, mut rx) = pair();
        let q = SendQueue::of(&tx).expect("dup");
        assert_eq!(q.unsent().expect("unsent"), 0, "nothing written yet");
        let written = fill(&mut tx);
        let unsent = q.unsent().expect("unsent");
        assert!(unsent > 256 * 1024, "a full queue holds unsent bytes: {unsent} of {written}");

        // The reader starts only when told: until then the drain must not end, then it must.
        let (go, wait_for_go) = std::sync::mpsc::channel::<()>();
        let reader = std::thread::spawn(move || {
            if wait_for_go.recv().is_err() {
                return 0;
            }
            let mut buf = vec![0u8; 1 << 20];
            let mut got = 0;
            while let Ok(n) = rx.read(&mut buf) {
                if n == 0 {
                    break;
                }
                got += n;
            }
            got
        });
        let d = {
            let drain = q.drain(64 * 1024, Duration::from_secs(10));
            tokio::pin!(drain);
            let early = tokio::time::timeout(Duration::from_millis(20), drain.as_mut()).await;
            assert!(early.is_err(), "the drain ended with nobody reading: {early:?}");
            go.send(()).expect("start the reader");
            drain.await.expect("drain")
        };
        assert!(!d.timed_out && d.after <= 64 * 1024, "{d:?}");
        assert!(d.before > 256 * 1024, "it found the queue full: {d:?}");
        assert_eq!(lowat(&q), 64 * 1024, "the bound stays until unbound");
        q.unbound().expect("unbound");
        assert_eq!(lowat(&q), 0, "the system's default again");
        drop(q);
        drop(tx);
        assert_eq!(reader.join().expect("reader"), written, "every byte arrived");
    }

    #[test]
    fn the_bound_keeps_writers_from_queueing_more() {
        let (mut free, _rx1) = pair();
        let (mut bounded, _rx2) = pair();
        let (qf, qb) = (SendQueue::of(&free).expect("dup"), SendQueue::of(&bounded).expect("dup"));
        qb.set_lowat(16 * 1024).expect("lowat");
        fill(&mut free);
        fill(&mut bounded);
        let (f, b) = (qf.unsent().expect("unsent"), qb.unsent().expect("unsent"));
        // A write that starts below the bound may overshoot it by one 64 KiB chunk.
        assert!(b <= 16 * 1024 + 64 * 1024, "bounded: {b} bytes unsent");
        assert!(f > 4 * (16 * 1024 + 64 * 1024), "unbounded: {f} bytes unsent");
    }

    #[tokio::test]
    async fn drain_gives_up_at_its_limit_when_nobody_reads() {
        let (mut tx, _rx) = pair();
        let q = SendQueue::of(&tx).expect("dup");
        fill(&mut tx);
        let limit = Duration::from_millis(30);
        let d = q.drain(4096, limit).await.expect("drain");
        assert!(d.timed_out && d.after > 4096 && d.waited >= limit, "{d:?}");
    }

    #[test]
    fn a_socket_that_is_not_tcp_is_refused() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let q = SendQueue::of(&a).expect("dup");
        assert!(q.set_lowat(1024).is_err(), "TCP_NOTSENT_LOWAT on a unix socket");
    }
}
