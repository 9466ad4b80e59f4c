//! A UDP echo standing in for the VM's workload, with the two moments a migration has: the VM
//! stops (the echo stops answering, like a paused guest stops draining its NIC) and the VM
//! resumes elsewhere (a second echo starts reading).
//!
//! Each moment is a [`Moment`] taken on the echo's own thread, the way QEMU stamps its
//! `STOP`/`RESUME` events, so a reaction measured from it includes the hop to the code that
//! reacts. The kernel stamps every datagram on arrival (`SO_TIMESTAMPNS`): at STOP the echo still
//! answers what arrived before the stop (a paused VM's ring keeps those, and they migrate with
//! it) and counts what arrived after as *stranded* — in a real migration those wait in the
//! stopped source's tap.

use std::io::{self, ErrorKind, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::socket::{recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags, SockaddrStorage};
use tokio::sync::oneshot;

use crate::error::{CheckError, Result, Step};

/// Receive buffer of an echo socket.
const RECV_BUFFER: usize = 4 << 20;
/// The longest a running echo blocks in `recv` before looking at its commands.
const POLL: Duration = Duration::from_millis(5);

/// When the simulated VM stopped or resumed, on both clocks: the monotonic one for latencies,
/// the wall clock to compare with kernel timestamps and [`katamaran::net::Timing::sent`].
#[derive(Debug, Clone, Copy)]
pub struct Moment {
    /// Monotonic time.
    pub at: Instant,
    /// Wall-clock time.
    pub wall: SystemTime,
}

impl Moment {
    /// Now.
    pub fn now() -> Self {
        Self { at: Instant::now(), wall: SystemTime::now() }
    }
}

/// How an echo starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Echoing at once.
    Running,
    /// Bound but not reading until [`Echo::resume`] (the incoming VM before its RESUME).
    Parked,
}

enum Command {
    /// Start reading; the moment is reported first.
    Resume(oneshot::Sender<Moment>),
    Quit,
}

/// A requested stop: where to report it, and its moment (`None`: when the thread notices).
type StopRequest = (oneshot::Sender<Moment>, Option<Moment>);
/// Looked at after every receive, before the datagram is answered, so that nothing that
/// arrived after the stop is answered however late the thread notices the request.
type StopSlot = Arc<Mutex<Option<StopRequest>>>;

/// What the echo thread hands back when it ends.
struct Outcome {
    socket: UdpSocket,
    /// Datagrams read after STOP that arrived after it.
    stranded: u64,
}

/// A UDP echo on its own thread; stopped and joined on drop.
#[derive(Debug)]
pub struct Echo {
    name: &'static str,
    commands: Sender<Command>,
    stop: StopSlot,
    echoed: Arc<AtomicU64>,
    thread: Option<JoinHandle<Outcome>>,
}

impl Echo {
    /// Starts echoing on `socket` (already bound, in the VM's namespace).
    ///
    /// # Errors
    /// [`CheckError::Io`] when the socket cannot be configured or the thread cannot start.
    pub fn spawn(name: &'static str, socket: UdpSocket, start: Start) -> Result<Self> {
        socket.set_read_timeout(Some(POLL)).step(format!("set the {name} echo's receive timeout"))?;
        // A released plug delivers its whole backlog at once; the default buffer (~200 KiB,
        // ~270 small datagrams by truesize) would drop part of a 300 ms blackout at 1000 pps.
        // Root may go past net.core.rmem_max; otherwise take what the sysctl allows.
        if setsockopt(&socket, sockopt::RcvBufForce, &RECV_BUFFER).is_err() {
            let _ = setsockopt(&socket, sockopt::RcvBuf, &RECV_BUFFER);
        }
        setsockopt(&socket, sockopt::ReceiveTimestampns, &true)
            .map_err(io::Error::from)
            .step(format!("enable arrival timestamps on the {name} echo"))?;
        if !rx_timestamps_active() {
            return Err(CheckError::Unexpected("the kernel does not stamp received datagrams".into()));
        }
        let (commands, rx) = mpsc::channel();
        let echoed = Arc::new(AtomicU64::new(0));
        let stop: StopSlot = Arc::new(Mutex::new(None));
        let shared = Shared { commands: rx, stop: Arc::clone(&stop), echoed: Arc::clone(&echoed) };
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                crate::lab::pin_to_traffic_cpu();
                serve(socket, &shared, start)
            })
            .step(format!("start the {name} echo thread"))?;
        Ok(Self { name, commands, stop, echoed, thread: Some(thread) })
    }

    /// Datagrams echoed so far.
    pub fn echoed(&self) -> u64 {
        self.echoed.load(Ordering::Relaxed)
    }

    /// Stops answering (the simulated `STOP`): the receiver gets the moment, taken on the echo's
    /// thread. Datagrams that arrived before it are still answered, later ones are stranded. A
    /// parked echo stops once resumed.
    ///
    /// # Errors
    /// [`CheckError::Unexpected`] when the echo thread is gone.
    pub fn stop(&self) -> Result<oneshot::Receiver<Moment>> {
        self.request_stop(None)
    }

    /// Like [`Echo::stop`] with the stop at `at` (taken by the caller, e.g. right after a
    /// settle time): datagrams that arrived before `at` are answered, later ones stranded,
    /// however late the echo's thread notices.
    ///
    /// # Errors
    /// [`CheckError::Unexpected`] when the echo thread is gone.
    pub fn stop_at(&self, at: Moment) -> Result<oneshot::Receiver<Moment>> {
        self.request_stop(Some(at))
    }

    fn request_stop(&self, at: Option<Moment>) -> Result<oneshot::Receiver<Moment>> {
        let (tx, rx) = oneshot::channel();
        let mut slot = self
            .stop
            .lock()
            .map_err(|_| CheckError::Unexpected(format!("the {} echo thread panicked", self.name)))?;
        *slot = Some((tx, at));
        Ok(rx)
    }

    /// Lets a parked echo start reading; the receiver gets the moment it did (the simulated
    /// `RESUME`).
    ///
    /// # Errors
    /// [`CheckError::Unexpected`] when the echo thread is gone.
    pub fn resume(&self) -> Result<oneshot::Receiver<Moment>> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Resume(tx))?;
        Ok(rx)
    }

    fn send(&self, cmd: Command) -> Result<()> {
        self.commands
            .send(cmd)
            .map_err(|_| CheckError::Unexpected(format!("the {} echo thread has ended", self.name)))
    }

    /// Ends the echo; returns (datagrams echoed, datagrams that reached it and were never
    /// answered: stranded after a STOP, or left unread).
    ///
    /// # Errors
    /// [`CheckError::Panicked`] when the thread panicked, [`CheckError::Io`] when the socket
    /// cannot be drained.
    pub fn finish(mut self) -> Result<(u64, u64)> {
        let _ = self.commands.send(Command::Quit);
        let outcome = self
            .thread
            .take()
            .ok_or(CheckError::Panicked("echo"))?
            .join()
            .map_err(|_| CheckError::Panicked("echo"))?;
        let what = || format!("drain the {} echo's socket", self.name);
        outcome.socket.set_nonblocking(true).step(what())?;
        let mut buf = [0u8; 2048];
        let mut unanswered = outcome.stranded;
        loop {
            match outcome.socket.recv_from(&mut buf) {
                Ok(_) => unanswered += 1,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => return Err(e).step(what()),
            }
        }
        Ok((self.echoed(), unanswered))
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = self.commands.send(Command::Quit);
            let _ = thread.join();
        }
    }
}

/// Waits (once per process) until the kernel stamps datagrams on arrival. Asking for timestamps
/// flips a global switch from a work queue, a moment later; until then a datagram is stamped
/// when it is read, which would make one queued before a STOP look like it arrived after it.
/// Probed on loopback in the caller's namespace: a datagram sent to itself must carry a stamp
/// no later than the moment its send returned.
fn rx_timestamps_active() -> bool {
    static ACTIVE: OnceLock<bool> = OnceLock::new();
    *ACTIVE.get_or_init(|| {
        let probe = || -> io::Result<bool> {
            let sock = UdpSocket::bind("127.0.0.1:0")?;
            setsockopt(&sock, sockopt::ReceiveTimestampns, &true)?;
            sock.set_read_timeout(Some(Duration::from_secs(1)))?;
            let me = sock.local_addr()?;
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut buf = [0u8; 8];
            while Instant::now() < deadline {
                sock.send_to(b"ts", me)?;
                let sent = SystemTime::now();
                if let (_, _, Some(arrived)) = recv_stamped(&sock, &mut buf)? {
                    if arrived <= sent {
                        return Ok(true);
                    }
                }
            }
            Ok(false)
        };
        probe().unwrap_or(false)
    })
}

/// One received datagram: length, sender, kernel arrival time (when stamped).
fn recv_stamped(socket: &UdpSocket, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, Option<SystemTime>)> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut cmsg = nix::cmsg_space!(nix::sys::time::TimeSpec);
    let msg = recvmsg::<SockaddrStorage>(socket.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::empty())?;
    let mut arrived = None;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmTimestampns(ts) = c {
            let (secs, nanos) = (u64::try_from(ts.tv_sec()).ok(), u32::try_from(ts.tv_nsec()).ok());
            arrived = secs.zip(nanos).map(|(s, n)| UNIX_EPOCH + Duration::new(s, n));
        }
    }
    let from = msg.address.as_ref().and_then(|a| {
        a.as_sockaddr_in()
            .map(|v4| SocketAddr::V4((*v4).into()))
            .or_else(|| a.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into())))
    });
    let from = from.ok_or_else(|| io::Error::other("datagram without an IP sender"))?;
    Ok((msg.bytes, from, arrived))
}

/// What the echo thread shares with its owner.
struct Shared {
    commands: Receiver<Command>,
    stop: StopSlot,
    echoed: Arc<AtomicU64>,
}

fn reply(socket: &UdpSocket, datagram: &[u8], to: SocketAddr, echoed: &AtomicU64) {
    // A failed reply is a lost packet the probe will count; the VM keeps running.
    if socket.send_to(datagram, to).is_ok() {
        echoed.fetch_add(1, Ordering::Relaxed);
    }
}

fn serve(socket: UdpSocket, shared: &Shared, start: Start) -> Outcome {
    let done = |socket, stranded| Outcome { socket, stranded };
    if start == Start::Parked && !wait_for_resume(&shared.commands) {
        return done(socket, 0);
    }
    let mut buf = [0u8; 65536];
    loop {
        // An error is a timeout (the chance to look at commands) or a transient one (an ICMP
        // error queued on the socket) that must not end the VM either.
        let got = recv_stamped(&socket, &mut buf).ok();
        if let Some((tx, at)) = shared.stop.lock().ok().and_then(|mut s| s.take()) {
            let stop = at.unwrap_or_else(Moment::now);
            let _ = tx.send(stop);
            let mut stranded = 0;
            if let Some((n, from, arrived)) = got {
                if arrived.is_some_and(|a| a < stop.wall) {
                    reply(&socket, &buf[..n], from, &shared.echoed);
                } else {
                    stranded += 1;
                }
            }
            stranded += settle_at_stop(&socket, &mut buf, &shared.echoed, stop.wall);
            park(&shared.commands);
            return done(socket, stranded);
        }
        if let Some((n, from, _)) = got {
            reply(&socket, &buf[..n], from, &shared.echoed);
        }
        loop {
            match shared.commands.try_recv() {
                // Already running.
                Ok(Command::Resume(tx)) => {
                    let _ = tx.send(Moment::now());
                }
                Ok(Command::Quit) | Err(mpsc::TryRecvError::Disconnected) => return done(socket, 0),
                Err(mpsc::TryRecvError::Empty) => break,
            }
        }
    }
}

/// At STOP: answers what is queued and arrived before `stop`, counts what arrived after.
fn settle_at_stop(socket: &UdpSocket, buf: &mut [u8], echoed: &AtomicU64, stop: SystemTime) -> u64 {
    if socket.set_nonblocking(true).is_err() {
        return 0;
    }
    let mut stranded = 0;
    loop {
        match recv_stamped(socket, buf) {
            // No timestamp: it cannot be shown to predate the stop, so it is not answered.
            Ok((n, from, Some(arrived))) if arrived < stop => reply(socket, &buf[..n], from, echoed),
            Ok(_) => stranded += 1,
            Err(_) => return stranded,
        }
    }
}

/// Blocks until `Resume` (true, moment reported) or `Quit` (false).
fn wait_for_resume(commands: &Receiver<Command>) -> bool {
    match commands.recv() {
        Ok(Command::Resume(tx)) => {
            let _ = tx.send(Moment::now());
            true
        }
        Ok(Command::Quit) | Err(_) => false,
    }
}

/// Blocks until `Quit`.
fn park(commands: &Receiver<Command>) {
    loop {
        match commands.recv_timeout(Duration::from_secs(3600)) {
            Ok(Command::Quit) | Err(RecvTimeoutError::Disconnected) => return,
            Ok(Command::Resume(tx)) => {
                let _ = tx.send(Moment::now());
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn client() -> UdpSocket {
        let c = UdpSocket::bind("127.0.0.1:0").unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c
    }

    fn roundtrip(c: &UdpSocket, to: SocketAddr, payload: &[u8]) -> Option<Vec<u8>> {
        c.send_to(payload, to).unwrap();
        let mut buf = [0u8; 64];
        c.recv_from(&mut buf).ok().map(|(n, _)| buf[..n].to_vec())
    }

    #[test]
    fn echoes_until_stop_then_strands_what_arrives_later() {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = sock.local_addr().unwrap();
        let echo = Echo::spawn("test-echo", sock, Start::Running).unwrap();
        let c = client();
        assert_eq!(roundtrip(&c, addr, b"one").as_deref(), Some(&b"one"[..]));
        let before = Instant::now();
        let stopped = echo.stop().unwrap().blocking_recv().unwrap();
        assert!(stopped.at >= before);
        // Stopped: these arrive after the stop and stay unanswered.
        for _ in 0..3 {
            c.send_to(b"late", addr).unwrap();
        }
        c.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        assert!(c.recv_from(&mut [0u8; 16]).is_err(), "a stopped echo answered");
        assert_eq!(echo.finish().unwrap(), (1, 3));
    }

    #[test]
    fn what_arrived_before_the_stop_is_still_answered() {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = sock.local_addr().unwrap();
        // Queued while nobody reads (a parked echo), then the echo runs and stops at once:
        // the datagrams predate the stop, so they are answered.
        let echo = Echo::spawn("test-queued", sock, Start::Parked).unwrap();
        let c = client();
        // Loopback delivers within send_to: all five arrived before the stop is even asked for.
        for i in 0..5u8 {
            c.send_to(&[i], addr).unwrap();
        }
        echo.resume().unwrap().blocking_recv().unwrap();
        echo.stop().unwrap().blocking_recv().unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 16];
        while got.len() < 5 {
            let (n, _) = c.recv_from(&mut buf).unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        got.sort_unstable();
        assert_eq!(got, [0, 1, 2, 3, 4]);
        assert_eq!(echo.finish().unwrap(), (5, 0));
    }

    #[test]
    fn a_stop_in_the_past_strands_what_arrived_since() {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = sock.local_addr().unwrap();
        let echo = Echo::spawn("test-stop-at", sock, Start::Parked).unwrap();
        let c = client();
        c.send_to(b"early", addr).unwrap();
        let at = Moment::now();
        c.send_to(b"late", addr).unwrap();
        // Asked for while parked: it applies from the first datagram read after the resume.
        let stopped = echo.stop_at(at).unwrap();
        echo.resume().unwrap().blocking_recv().unwrap();
        assert_eq!(stopped.blocking_recv().unwrap().at, at.at);
        let mut buf = [0u8; 16];
        let (n, _) = c.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"early");
        assert_eq!(echo.finish().unwrap(), (1, 1));
    }

    #[test]
    fn a_parked_echo_answers_only_after_resume() {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = sock.local_addr().unwrap();
        let echo = Echo::spawn("test-parked", sock, Start::Parked).unwrap();
        let c = client();
        c.send_to(b"held", addr).unwrap();
        c.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        assert!(c.recv_from(&mut [0u8; 16]).is_err(), "a parked echo answered");
        let before = Instant::now();
        let resumed = echo.resume().unwrap().blocking_recv().unwrap();
        assert!(resumed.at >= before);
        // The datagram that waited in the socket is answered once it runs.
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 16];
        let (n, _) = c.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"held");
        assert_eq!(echo.finish().unwrap(), (1, 0));
    }
}
