//! The probe run: one socket, a sender thread with absolute-deadline pacing, a receiver thread,
//! and the calling thread watching the stop conditions.
//!
//! ```text
//!  caller ──ready handshake (optional)──▶ counting start t0
//!    │ spawn                         │ spawn
//!    ▼                               ▼
//!  sender: seq i leaves at t0 + i/rate  receiver: recv → (seq, arrival) log
//!    │ stops at duration/count/stop     │ stops at last send + grace
//!    └──── send log ──┐     ┌── arrival log
//!                     ▼     ▼
//!                 accounting::account → Report
//! ```
//! Replies carry their own sequence number and send time, so the two threads share nothing but
//! the socket and two atomics. Neither allocates per packet: the logs are sized up front.

use std::io::{self, ErrorKind};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::socket::{setsockopt, sockopt};

use crate::accounting::{account, Arrival};
use crate::packet::{Header, Kind, HEADER_LEN, MAX_SIZE};
use crate::report::{Percentiles, Report, StopReason};

/// Default send rate, packets per second.
pub const DEFAULT_RATE: u32 = 1000;
/// Default datagram size, bytes.
pub const DEFAULT_SIZE: usize = 64;
/// Default run length.
pub const DEFAULT_DURATION: Duration = Duration::from_secs(10);
/// Default wait for late replies after the last send.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(1);

/// How often the caller looks at the stop flag and stop file, and the longest the sender or
/// receiver blocks before looking at theirs.
const POLL: Duration = Duration::from_millis(20);
/// The ready handshake never sends faster than this, so a booting guest is not flooded.
const READY_MIN_INTERVAL: Duration = Duration::from_millis(10);
/// Socket buffers big enough to ride out a descheduled thread at 5000 pps (~1 s of 64 B packets).
const SOCKET_BUFFER: usize = 4 << 20;
/// Send-log entries reserved up front at most; a longer run grows the log (rarely).
const MAX_PREALLOC: u64 = 1 << 20;

/// What to probe and for how long. The same struct backs the CLI flags.
#[derive(Debug, Clone)]
pub struct ProbeConfig {
    /// The UDP echo to talk to (IPv4 or IPv6).
    pub target: SocketAddr,
    /// Packets per second.
    pub rate: u32,
    /// Stop sending after this long.
    pub duration: Duration,
    /// Stop sending after this many packets (whichever of `duration` and `count` comes first).
    pub count: Option<u64>,
    /// Datagram size in bytes, header included.
    pub size: usize,
    /// Wait this long for late replies after the last send.
    pub grace: Duration,
    /// Before counting, send handshake packets until one comes back, for at most this long.
    pub wait_ready: Option<Duration>,
    /// Stop sending when this file exists.
    pub stop_file: Option<PathBuf>,
    /// Stop sending when this becomes true (the binary sets it on SIGINT/SIGTERM).
    pub stop: Arc<AtomicBool>,
}

impl ProbeConfig {
    /// A config with the CLI's defaults for `target`.
    pub fn new(target: SocketAddr) -> Self {
        Self {
            target,
            rate: DEFAULT_RATE,
            duration: DEFAULT_DURATION,
            count: None,
            size: DEFAULT_SIZE,
            grace: DEFAULT_GRACE,
            wait_ready: None,
            stop_file: None,
            stop: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// `rate` was zero.
    #[error("rate must be at least 1 packet per second")]
    ZeroRate,
    /// `size` cannot hold the header or exceeds a UDP datagram.
    #[error("size {0} is outside {HEADER_LEN}..={MAX_SIZE} bytes")]
    Size(usize),
    /// The local socket could not be bound.
    #[error("failed to bind a local UDP socket to reach {target}")]
    Bind {
        /// The target that needed the socket.
        target: SocketAddr,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The socket could not be duplicated for the receiver thread.
    #[error("failed to duplicate the probe socket for the receiver")]
    CloneSocket(#[source] io::Error),
    /// The receive timeout could not be set.
    #[error("failed to set the probe socket's receive timeout")]
    RecvTimeout(#[source] io::Error),
    /// Receiving failed with an error other than a timeout.
    #[error("failed to receive replies from {target}")]
    Recv {
        /// The probed echo.
        target: SocketAddr,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Nothing came back during the ready handshake.
    #[error("no reply from {target} within {waited:?} of ready handshake")]
    NotReady {
        /// The probed echo.
        target: SocketAddr,
        /// How long the handshake waited.
        waited: Duration,
    },
    /// A stop was requested before the ready handshake got a reply.
    #[error("stopped before {target} answered the ready handshake")]
    StoppedBeforeReady {
        /// The probed echo.
        target: SocketAddr,
    },
    /// A worker thread could not be started.
    #[error("failed to start the {0} thread")]
    Spawn(&'static str, #[source] io::Error),
    /// A worker thread panicked.
    #[error("the {0} thread panicked")]
    Panicked(&'static str),
}

/// Runs the probe to completion and accounts what came back.
///
/// # Errors
/// [`ProbeError`] for an invalid config, socket failures, a failed ready handshake or a worker
/// thread that could not start or panicked. Lost packets are not an error: they are the report.
pub fn run(cfg: &ProbeConfig) -> Result<Report, ProbeError> {
    if cfg.rate == 0 {
        return Err(ProbeError::ZeroRate);
    }
    if !(HEADER_LEN..=MAX_SIZE).contains(&cfg.size) {
        return Err(ProbeError::Size(cfg.size));
    }
    let socket = bind_for(cfg.target)?;
    let run_id = random_u64();
    let stop_requested = || stop_reason(cfg);

    let ready_ms = match cfg.wait_ready {
        Some(limit) => Some(ready_handshake(&socket, cfg, run_id, limit)?.as_secs_f64() * 1e3),
        None => None,
    };

    let t0 = Instant::now();
    let started_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3);
    let sender_stop = Arc::new(AtomicBool::new(false));
    let recv_deadline_ns = Arc::new(AtomicU64::new(u64::MAX));

    let receiver = {
        let socket = socket.try_clone().map_err(ProbeError::CloneSocket)?;
        socket.set_read_timeout(Some(POLL)).map_err(ProbeError::RecvTimeout)?;
        let deadline = Arc::clone(&recv_deadline_ns);
        let (target, size, capacity) = (cfg.target, cfg.size, expected_packets(cfg));
        thread::Builder::new()
            .name("probe-recv".into())
            .spawn(move || receive(&socket, target, run_id, t0, size, capacity, &deadline))
            .map_err(|e| ProbeError::Spawn("receiver", e))?
    };
    let sender = {
        let plan = SendPlan::new(cfg, run_id, t0);
        let stop = Arc::clone(&sender_stop);
        let caller = thread::current();
        let spawned = thread::Builder::new().name("probe-send".into()).spawn(move || {
            let log = send(&socket, &plan, &stop);
            caller.unpark();
            log
        });
        match spawned {
            Ok(handle) => handle,
            Err(e) => {
                recv_deadline_ns.store(0, Ordering::Relaxed);
                let _ = receiver.join();
                return Err(ProbeError::Spawn("sender", e));
            }
        }
    };

    let mut external_stop = None;
    while !sender.is_finished() {
        if external_stop.is_none() {
            external_stop = stop_requested();
            if external_stop.is_some() {
                sender_stop.store(true, Ordering::Relaxed);
            }
        }
        thread::park_timeout(POLL);
    }
    let sent = sender.join();
    // Whatever the sender's fate, the receiver must end: late replies get `grace` from here.
    let grace_end = elapsed_ns(t0).saturating_add(duration_ns(cfg.grace));
    recv_deadline_ns.store(grace_end, Ordering::Relaxed);
    let received = receiver.join();
    let sent = sent.map_err(|_| ProbeError::Panicked("sender"))?;
    let received = received.map_err(|_| ProbeError::Panicked("receiver"))??;

    let counts = account(&sent.send_ns, &received.arrivals);
    let interval = interval_ns(cfg.rate);
    let mut late: Vec<u64> = sent
        .send_ns
        .iter()
        .enumerate()
        .map(|(i, &at)| at.saturating_sub(scheduled_ns(i as u64, interval)))
        .collect();
    Ok(Report {
        target: cfg.target.to_string(),
        rate: cfg.rate,
        size: cfg.size,
        sent: counts.sent,
        received: counts.received,
        lost: counts.lost,
        duplicated: counts.duplicated,
        reordered: counts.reordered,
        longest_gap_ms: counts.longest_gap_ms,
        rtt_ms: counts.rtt_ms,
        loss_timeline: counts.loss_timeline,
        duration_ms: sent.send_ns.last().map_or(0.0, |&ns| ns as f64 / 1e6),
        started_unix_ms,
        ready_ms,
        send_late_ms: Percentiles::from_ns(&mut late),
        send_errors: sent.errors,
        foreign: received.foreign,
        stop_reason: external_stop.unwrap_or(sent.reason),
    })
}

fn stop_reason(cfg: &ProbeConfig) -> Option<StopReason> {
    if cfg.stop.load(Ordering::Relaxed) {
        return Some(StopReason::Signal);
    }
    match &cfg.stop_file {
        Some(path) if path.exists() => Some(StopReason::StopFile),
        _ => None,
    }
}

fn bind_for(target: SocketAddr) -> Result<UdpSocket, ProbeError> {
    let local: SocketAddr = match target {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    // Unconnected on purpose: a connected UDP socket turns an ICMP port-unreachable (an echo
    // not up yet, a guest mid-boot) into an error on the next send or receive.
    let socket = UdpSocket::bind(local).map_err(|source| ProbeError::Bind { target, source })?;
    // Root may exceed net.core.rmem_max; others get what the sysctl allows. Either is fine.
    if setsockopt(&socket, sockopt::RcvBufForce, &SOCKET_BUFFER).is_err() {
        let _ = setsockopt(&socket, sockopt::RcvBuf, &SOCKET_BUFFER);
    }
    if setsockopt(&socket, sockopt::SndBufForce, &SOCKET_BUFFER).is_err() {
        let _ = setsockopt(&socket, sockopt::SndBuf, &SOCKET_BUFFER);
    }
    Ok(socket)
}

/// Sends `Ready` datagrams until one comes back; returns how long that took.
fn ready_handshake(
    socket: &UdpSocket,
    cfg: &ProbeConfig,
    run_id: u64,
    limit: Duration,
) -> Result<Duration, ProbeError> {
    let start = Instant::now();
    let interval = Duration::from_nanos(interval_ns(cfg.rate)).max(READY_MIN_INTERVAL);
    let mut out = vec![0u8; cfg.size];
    let mut buf = vec![0u8; MAX_SIZE];
    let mut seq = 0u64;
    loop {
        if stop_reason(cfg).is_some() {
            return Err(ProbeError::StoppedBeforeReady { target: cfg.target });
        }
        let waited = start.elapsed();
        if waited >= limit {
            return Err(ProbeError::NotReady { target: cfg.target, waited });
        }
        let header = Header { kind: Kind::Ready, run_id, seq, send_ns: elapsed_ns(start) };
        header.write(&mut out);
        if let Err(e) = socket.send_to(&out, cfg.target) {
            // No route yet is normal while a lab comes up: keep trying until the limit.
            tracing::debug!(error = %e, "ready handshake send failed");
        }
        seq += 1;
        let next = start + interval.mul_f64(seq as f64);
        while let Some(wait) = next.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) {
            socket.set_read_timeout(Some(wait)).map_err(ProbeError::RecvTimeout)?;
            match socket.recv_from(&mut buf) {
                Ok((n, _)) => {
                    if Header::parse(&buf[..n]).is_some_and(|h| h.kind == Kind::Ready && h.run_id == run_id) {
                        return Ok(start.elapsed());
                    }
                }
                Err(e) if is_transient(&e) => {}
                Err(source) => return Err(ProbeError::Recv { target: cfg.target, source }),
            }
        }
    }
}

/// The sender's fixed inputs.
#[derive(Debug)]
struct SendPlan {
    target: SocketAddr,
    run_id: u64,
    t0: Instant,
    interval_ns: u64,
    duration_ns: u64,
    count: Option<u64>,
    size: usize,
    capacity: usize,
}

impl SendPlan {
    fn new(cfg: &ProbeConfig, run_id: u64, t0: Instant) -> Self {
        Self {
            target: cfg.target,
            run_id,
            t0,
            interval_ns: interval_ns(cfg.rate),
            duration_ns: duration_ns(cfg.duration),
            count: cfg.count,
            size: cfg.size,
            capacity: expected_packets(cfg),
        }
    }
}

/// What the sender did.
#[derive(Debug)]
struct SendLog {
    /// Send time of each sequence number, ns since t0.
    send_ns: Vec<u64>,
    errors: u64,
    reason: StopReason,
}

fn send(socket: &UdpSocket, plan: &SendPlan, stop: &AtomicBool) -> SendLog {
    // The default 50 µs timer slack is a quarter of the 200 µs interval at 5000 pps.
    let _ = nix::sys::prctl::set_timerslack(1_000);
    let mut send_ns = Vec::with_capacity(plan.capacity);
    let mut out = vec![0u8; plan.size];
    let mut errors = 0u64;
    let mut seq = 0u64;
    let reason = loop {
        if plan.count.is_some_and(|c| seq >= c) {
            break StopReason::Count;
        }
        let due = scheduled_ns(seq, plan.interval_ns);
        if due >= plan.duration_ns {
            break StopReason::Duration;
        }
        // Absolute deadlines: a late packet shortens the next wait instead of shifting the
        // whole schedule, so the average rate holds even with a coarse sleep.
        let mut now = elapsed_ns(plan.t0);
        while now < due && !stop.load(Ordering::Relaxed) {
            thread::sleep(Duration::from_nanos(due - now).min(POLL));
            now = elapsed_ns(plan.t0);
        }
        if stop.load(Ordering::Relaxed) {
            break StopReason::Signal;
        }
        Header { kind: Kind::Data, run_id: plan.run_id, seq, send_ns: now }.write(&mut out);
        if let Err(e) = socket.send_to(&out, plan.target) {
            // The sequence number is spent: a packet that could not leave is a lost packet.
            if errors == 0 {
                tracing::warn!(seq, error = %e, "send failed; counting the packet as lost");
            }
            errors += 1;
        }
        send_ns.push(now);
        seq += 1;
    };
    SendLog { send_ns, errors, reason }
}

/// What the receiver saw.
#[derive(Debug)]
struct RecvLog {
    arrivals: Vec<Arrival>,
    foreign: u64,
}

fn receive(
    socket: &UdpSocket,
    target: SocketAddr,
    run_id: u64,
    t0: Instant,
    size: usize,
    capacity: usize,
    deadline_ns: &AtomicU64,
) -> Result<RecvLog, ProbeError> {
    let mut arrivals = Vec::with_capacity(capacity + capacity / 8);
    let mut foreign = 0u64;
    // Room for a datagram larger than ours, so an oversized reply is seen as foreign, not cut.
    let mut buf = vec![0u8; size.max(HEADER_LEN) + 1];
    loop {
        match socket.recv_from(&mut buf) {
            Ok((n, _)) => {
                let recv_ns = elapsed_ns(t0);
                match Header::parse(&buf[..n]) {
                    Some(h) if h.run_id == run_id && n == size => {
                        if h.kind == Kind::Data {
                            arrivals.push(Arrival { seq: h.seq, recv_ns });
                        }
                    }
                    _ => foreign += 1,
                }
            }
            Err(e) if is_transient(&e) => {}
            Err(source) => return Err(ProbeError::Recv { target, source }),
        }
        if elapsed_ns(t0) >= deadline_ns.load(Ordering::Relaxed) {
            return Ok(RecvLog { arrivals, foreign });
        }
    }
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted | ErrorKind::ConnectionRefused
    )
}

fn expected_packets(cfg: &ProbeConfig) -> usize {
    let by_time = (cfg.duration.as_secs_f64() * f64::from(cfg.rate)).ceil() as u64 + 1;
    let n = cfg.count.map_or(by_time, |c| c.min(by_time)).min(MAX_PREALLOC);
    usize::try_from(n).unwrap_or(usize::MAX)
}

fn interval_ns(rate: u32) -> u64 {
    1_000_000_000 / u64::from(rate.max(1))
}

/// When sequence number `seq` is due; computed from the start, so rounding never accumulates.
fn scheduled_ns(seq: u64, interval_ns: u64) -> u64 {
    seq.saturating_mul(interval_ns)
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn elapsed_ns(t0: Instant) -> u64 {
    duration_ns(t0.elapsed())
}

/// A per-run id; only needs to differ between runs, so the kernel's urandom with a clock-seeded
/// fallback is plenty.
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::io::Read;
    let mut bytes = [0u8; 8];
    if std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)).is_ok() {
        return u64::from_le_bytes(bytes);
    }
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos(),
    );
    h.write_u32(std::process::id());
    h.finish()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn schedule_is_absolute() {
        let iv = interval_ns(3000);
        assert_eq!(iv, 333_333);
        assert_eq!(scheduled_ns(3000, iv), 999_999_000);
        assert_eq!(interval_ns(1000), 1_000_000);
    }

    #[test]
    fn preallocation_follows_count_duration_and_cap() {
        let mut cfg = ProbeConfig::new("127.0.0.1:7".parse().unwrap());
        assert_eq!(expected_packets(&cfg), 10_001);
        cfg.count = Some(50);
        assert_eq!(expected_packets(&cfg), 50);
        cfg.count = None;
        cfg.duration = Duration::from_secs(1_000_000);
        assert_eq!(expected_packets(&cfg) as u64, MAX_PREALLOC);
    }

    #[test]
    fn invalid_configs_are_rejected_before_any_socket() {
        let mut cfg = ProbeConfig::new("127.0.0.1:7".parse().unwrap());
        cfg.rate = 0;
        assert!(matches!(run(&cfg), Err(ProbeError::ZeroRate)));
        cfg.rate = 10;
        cfg.size = 8;
        assert!(matches!(run(&cfg), Err(ProbeError::Size(8))));
    }
}
