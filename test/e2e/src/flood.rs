//! A flood of idle TCP connections from a lab network namespace: connections that never speak,
//! held open until the flood is stopped, as someone who can reach a node's data port could open.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::resource::{getrlimit, setrlimit, Resource};

use crate::{netns, LabError};

/// How long one connect may take before it counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// What the flood did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FloodReport {
    /// Connections attempted.
    pub attempted: usize,
    /// Connections established (and held until the stop).
    pub opened: usize,
    /// Established connections the peer had closed by the stop.
    pub closed_by_peer: usize,
    /// How long opening them took.
    pub opening: Duration,
}

/// A running flood; [`Flood::stop`] closes every connection.
#[derive(Debug)]
pub struct Flood {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicBool>,
    opened: Arc<AtomicUsize>,
    thread: JoinHandle<Result<FloodReport, LabError>>,
}

impl Flood {
    /// Opens `count` connections to `target` from network namespace `ns`, one after the other,
    /// in a thread; each is held, unread and unwritten, until [`Flood::stop`]. The process's soft
    /// `RLIMIT_NOFILE` is raised to its hard limit first; the flood stops early at the limit.
    pub fn start(ns: &str, target: SocketAddr, count: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicBool::new(false));
        let opened = Arc::new(AtomicUsize::new(0));
        let (flag, finished, counter, name) = (stop.clone(), done.clone(), opened.clone(), ns.to_owned());
        let thread = std::thread::spawn(move || {
            netns::in_netns(&name, move || {
                if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
                    let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
                }
                let mut held = Vec::with_capacity(count);
                let mut attempted = 0;
                let began = Instant::now();
                while attempted < count && !flag.load(Ordering::SeqCst) {
                    attempted += 1;
                    match TcpStream::connect_timeout(&target, CONNECT_TIMEOUT) {
                        Ok(s) => {
                            held.push(s);
                            counter.fetch_add(1, Ordering::SeqCst);
                        }
                        // Out of descriptors: what is held is the flood.
                        Err(e) if e.raw_os_error() == Some(nix::libc::EMFILE) => break,
                        Err(_) => {}
                    }
                }
                let opening = began.elapsed();
                finished.store(true, Ordering::SeqCst);
                while !flag.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let closed_by_peer = held
                    .iter_mut()
                    .map(|s| {
                        let _ = s.set_nonblocking(true);
                        let mut byte = [0u8; 1];
                        !matches!(s.read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
                    })
                    .filter(|closed| *closed)
                    .count();
                Ok(FloodReport { attempted, opened: held.len(), closed_by_peer, opening })
            })
        });
        Self { stop, done, opened, thread }
    }

    /// Connections established so far.
    pub fn opened(&self) -> usize {
        self.opened.load(Ordering::SeqCst)
    }

    /// Whether every connection was attempted.
    pub fn done_opening(&self) -> bool {
        self.done.load(Ordering::SeqCst)
    }

    /// Closes every connection and reports (waiting at most `grace` for the flood to finish
    /// opening).
    ///
    /// # Errors
    /// When the namespace could not be entered or the thread panicked.
    pub fn stop(self, grace: Duration) -> Result<FloodReport, LabError> {
        let until = Instant::now() + grace;
        while !self.done_opening() && !self.thread.is_finished() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().map_err(|_| LabError::NetnsThread { name: "the flood".into() })?
    }
}
