//! A UDP echo standing in for the VM's workload, with the two moments a migration has: the VM
//! stops (the echo stops reading its socket, like a paused guest stops draining its NIC) and the
//! VM resumes elsewhere (a second echo starts reading).
//!
//! Each moment is reported as a [`Moment`] taken on the echo's own thread, the way QEMU stamps
//! its `STOP`/`RESUME` events, so the reaction latency measured from it includes the hop to the
//! code that reacts.

use std::io::ErrorKind;
use std::net::UdpSocket;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use nix::sys::socket::{setsockopt, sockopt};
use tokio::sync::oneshot;

use crate::error::{CheckError, Result, Step};

/// Receive buffer of an echo socket.
const RECV_BUFFER: usize = 4 << 20;
/// The longest a running echo blocks in `recv` before looking at its commands.
const POLL: Duration = Duration::from_millis(5);

/// When the simulated VM stopped or resumed, on both clocks: the monotonic one for latencies,
/// the wall clock to compare with [`katamaran::net::Timing::sent`].
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
    /// Start reading; the instant is reported first.
    Resume(oneshot::Sender<Moment>),
    Quit,
}

/// What the echo thread shares with its owner.
struct Shared {
    commands: Receiver<Command>,
    /// Set by [`Echo::stop_after_next`]; taken by the thread when a datagram arrives.
    stop: Arc<Mutex<Option<oneshot::Sender<Moment>>>>,
    echoed: Arc<AtomicU64>,
}

/// A UDP echo on its own thread; stopped and joined on drop.
#[derive(Debug)]
pub struct Echo {
    name: &'static str,
    commands: Sender<Command>,
    stop: Arc<Mutex<Option<oneshot::Sender<Moment>>>>,
    echoed: Arc<AtomicU64>,
    thread: Option<JoinHandle<UdpSocket>>,
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
        let (commands, rx) = mpsc::channel();
        let echoed = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(Mutex::new(None));
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

    /// Asks the echo to stop reading right after it has echoed the next datagram it receives;
    /// the receiver gets the instant it stopped (the simulated `STOP`). A parked echo never
    /// stops (it has not started); the receiver then errs when the echo ends.
    ///
    /// # Errors
    /// [`CheckError::Unexpected`] when the echo thread is gone.
    pub fn stop_after_next(&self) -> Result<oneshot::Receiver<Moment>> {
        let (tx, rx) = oneshot::channel();
        let mut slot = self
            .stop
            .lock()
            .map_err(|_| CheckError::Unexpected(format!("the {} echo thread panicked", self.name)))?;
        *slot = Some(tx);
        Ok(rx)
    }

    /// Lets a parked echo start reading; the receiver gets the instant it did (the simulated
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

    /// Stops the echo and counts the datagrams left unread in its socket: after a simulated
    /// `STOP` these are the packets that reached the stopped VM — lost in a real migration.
    ///
    /// # Errors
    /// [`CheckError::Panicked`] when the thread panicked, [`CheckError::Io`] when the socket
    /// cannot be drained.
    pub fn finish(mut self) -> Result<(u64, u64)> {
        let _ = self.commands.send(Command::Quit);
        let socket = self
            .thread
            .take()
            .ok_or(CheckError::Panicked("echo"))?
            .join()
            .map_err(|_| CheckError::Panicked("echo"))?;
        socket.set_nonblocking(true).step(format!("drain the {} echo's socket", self.name))?;
        let mut buf = [0u8; 2048];
        let mut stranded = 0;
        loop {
            match socket.recv_from(&mut buf) {
                Ok(_) => stranded += 1,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => return Err(e).step(format!("drain the {} echo's socket", self.name)),
            }
        }
        Ok((self.echoed(), stranded))
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

fn serve(socket: UdpSocket, shared: &Shared, start: Start) -> UdpSocket {
    if start == Start::Parked && !wait_for_resume(&shared.commands) {
        return socket;
    }
    let mut buf = [0u8; 65536];
    loop {
        // An error is a timeout (the chance to look at commands) or a transient one (an ICMP
        // error queued on the socket) that must not end the VM either.
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            // Taken before the echo: a stop asked for after this datagram was received
            // applies to the next one, never to one already on its way back.
            let stop = shared.stop.lock().ok().and_then(|mut s| s.take());
            if socket.send_to(&buf[..n], from).is_ok() {
                shared.echoed.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(tx) = stop {
                let _ = tx.send(Moment::now());
                // Paused: the socket is no longer read until the check ends.
                park(&shared.commands);
                return socket;
            }
        }
        loop {
            match shared.commands.try_recv() {
                // Already running.
                Ok(Command::Resume(tx)) => {
                    let _ = tx.send(Moment::now());
                }
                Ok(Command::Quit) | Err(mpsc::TryRecvError::Disconnected) => return socket,
                Err(mpsc::TryRecvError::Empty) => break,
            }
        }
    }
}

/// Blocks until `Resume` (true, instant reported) or `Quit` (false).
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

    fn roundtrip(c: &UdpSocket, to: std::net::SocketAddr, payload: &[u8]) -> Option<Vec<u8>> {
        c.send_to(payload, to).unwrap();
        let mut buf = [0u8; 64];
        c.recv_from(&mut buf).ok().map(|(n, _)| buf[..n].to_vec())
    }

    #[test]
    fn echoes_then_stops_after_the_next_datagram_and_strands_the_rest() {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = sock.local_addr().unwrap();
        let echo = Echo::spawn("test-echo", sock, Start::Running).unwrap();
        let c = client();
        assert_eq!(roundtrip(&c, addr, b"one").as_deref(), Some(&b"one"[..]));
        let stopped = echo.stop_after_next().unwrap();
        assert_eq!(roundtrip(&c, addr, b"two").as_deref(), Some(&b"two"[..]));
        let at = stopped.blocking_recv().unwrap();
        assert!(at.at <= Instant::now());
        // Paused: these stay in the socket.
        for _ in 0..3 {
            c.send_to(b"late", addr).unwrap();
        }
        c.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        assert!(c.recv_from(&mut [0u8; 16]).is_err(), "a stopped echo answered");
        assert_eq!(echo.finish().unwrap(), (2, 3));
    }

    #[test]
    fn a_parked_echo_answers_only_after_resume() {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = sock.local_addr().unwrap();
        let echo = Echo::spawn("test-parked", sock, Start::Parked).unwrap();
        let c = client();
        c.send_to(b"held", addr).unwrap();
        let before = Instant::now();
        let resumed = echo.resume().unwrap().blocking_recv().unwrap();
        assert!(resumed.at >= before);
        // The datagram that waited in the socket is answered once it runs.
        let mut buf = [0u8; 16];
        let (n, _) = c.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"held");
        assert_eq!(echo.finish().unwrap(), (1, 0));
    }
}
