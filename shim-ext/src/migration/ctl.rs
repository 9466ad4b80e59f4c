//! The control stream between a source and a destination during one migration: one message per
//! line over an authenticated data stream (`ctl`), with heartbeats so that a silent peer is
//! noticed within [`Heartbeat::timeout`].
//!
//! It carries what QEMU's own stream cannot: the storage hand-off at `pre-switchover` and the
//! ownership protocol of [`super::protocol`] (the destination's vote, the source's decision, the
//! destination's confirmation, cancel requests made on the destination).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// The stream name of the control channel.
pub const STREAM: &str = "ctl";
/// The longest line accepted.
const MAX_LINE: usize = 1024;
/// The longest free text a message carries (a reason).
const MAX_TEXT: usize = 512;

/// One control message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CtlMsg {
    /// Source → destination: admit a disk stream from this source port (the address is the
    /// control stream's) to the NBD server's gate (`dataplane::gate`).
    NbdAdmit(u16),
    /// Destination → source: the port is admitted; connect.
    NbdAdmitted(u16),
    /// Source → destination: mirrors are complete, release the disks.
    StorageDone,
    /// Destination → source: the NBD exports are stopped.
    StorageReleased,
    /// Destination → source: the exports could not be stopped.
    StorageError(String),
    /// Destination → source: the state is loaded and the vote recorded; this side waits for
    /// the decision.
    Prepared,
    /// Source → destination: the decision is commit (recorded); run the VM.
    Commit,
    /// Source → destination: the decision is abort (recorded, or a cancel before the commit);
    /// destroy the incoming copy.
    Abort(String),
    /// Destination → source: a caller asked the destination to cancel; the source decides.
    CancelRequest(String),
    /// Source → destination: a cancel request refused (the VM is past the commit point).
    CancelRefused(String),
    /// Destination → source: the destination gave up before voting (e.g. its QEMU exited).
    Failed(String),
    /// Destination → source: the VM runs here and the plug is released.
    Resumed,
    /// Heartbeat.
    Ping,
    /// Heartbeat answer.
    Pong,
}

/// A line that is not a control message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown control message {0:?}")]
pub struct ParseCtlError(String);

impl CtlMsg {
    fn word(&self) -> &'static str {
        match self {
            CtlMsg::NbdAdmit(_) => "nbd-admit",
            CtlMsg::NbdAdmitted(_) => "nbd-admitted",
            CtlMsg::StorageDone => "storage-done",
            CtlMsg::StorageReleased => "storage-released",
            CtlMsg::StorageError(_) => "storage-error",
            CtlMsg::Prepared => "prepared",
            CtlMsg::Commit => "commit",
            CtlMsg::Abort(_) => "abort",
            CtlMsg::CancelRequest(_) => "cancel-request",
            CtlMsg::CancelRefused(_) => "cancel-refused",
            CtlMsg::Failed(_) => "failed",
            CtlMsg::Resumed => "resumed",
            CtlMsg::Ping => "ping",
            CtlMsg::Pong => "pong",
        }
    }

    fn text(&self) -> Option<&str> {
        match self {
            CtlMsg::StorageError(t)
            | CtlMsg::Abort(t)
            | CtlMsg::CancelRequest(t)
            | CtlMsg::CancelRefused(t)
            | CtlMsg::Failed(t) => Some(t),
            _ => None,
        }
    }
}

/// Free text on one line, bounded, printable.
fn clean(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { ' ' } else { c }).take(MAX_TEXT).collect()
}

impl fmt::Display for CtlMsg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self, self.text()) {
            (CtlMsg::NbdAdmit(port) | CtlMsg::NbdAdmitted(port), _) => write!(f, "{} {port}", self.word()),
            (_, Some(t)) => write!(f, "{} {}", self.word(), clean(t)),
            (_, None) => f.write_str(self.word()),
        }
    }
}

impl FromStr for CtlMsg {
    type Err = ParseCtlError;

    fn from_str(line: &str) -> Result<Self, Self::Err> {
        let (word, text) = match line.split_once(' ') {
            Some((w, t)) => (w, Some(clean(t))),
            None => (line, None),
        };
        let bad = || ParseCtlError(line.chars().take(64).collect());
        let port = || match text.as_deref().map(str::parse::<u16>) {
            Some(Ok(p)) if p != 0 => Ok(p),
            _ => Err(bad()),
        };
        let text = || text.clone().unwrap_or_default();
        Ok(match word {
            "nbd-admit" => CtlMsg::NbdAdmit(port()?),
            "nbd-admitted" => CtlMsg::NbdAdmitted(port()?),
            "storage-done" => CtlMsg::StorageDone,
            "storage-released" => CtlMsg::StorageReleased,
            "storage-error" => CtlMsg::StorageError(text()),
            "prepared" => CtlMsg::Prepared,
            "commit" => CtlMsg::Commit,
            "abort" => CtlMsg::Abort(text()),
            "cancel-request" => CtlMsg::CancelRequest(text()),
            "cancel-refused" => CtlMsg::CancelRefused(text()),
            "failed" => CtlMsg::Failed(text()),
            "resumed" => CtlMsg::Resumed,
            "ping" => CtlMsg::Ping,
            "pong" => CtlMsg::Pong,
            _ => return Err(bad()),
        })
    }
}

/// Control-stream failures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CtlError {
    /// Reading or writing failed.
    #[error("control stream: {0}")]
    Io(String),
    /// The peer closed the stream.
    #[error("control stream closed by the peer")]
    Closed,
    /// Nothing, not even a heartbeat, arrived within the limit.
    #[error("the peer went silent on the control stream for {0:?}")]
    Silent(Duration),
    /// The peer sent an overlong line.
    #[error("control stream: line longer than {MAX_LINE} bytes")]
    TooLong,
    /// The peer sent something that is not a control message.
    #[error("control stream: {0}")]
    Garbage(#[from] ParseCtlError),
}

/// How often heartbeats go and how long silence is tolerated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// Between pings.
    pub interval: Duration,
    /// Silence after which the peer counts as lost. Bounds every wait of a paused guest on the
    /// peer.
    pub timeout: Duration,
}

impl Default for Heartbeat {
    /// A ping every 250 ms; 3 s of silence (12 missed pings) is a lost peer: long enough for a
    /// loaded node, short enough to bound a paused guest's wait.
    fn default() -> Self {
        Self { interval: Duration::from_millis(250), timeout: Duration::from_secs(3) }
    }
}

/// A message for the writer, with whom to tell once it is written.
type Outgoing = (CtlMsg, Option<tokio::sync::oneshot::Sender<()>>);

/// Sends on a control channel; clones share the stream.
#[derive(Debug, Clone)]
pub struct CtlSender(mpsc::UnboundedSender<Outgoing>);

impl CtlSender {
    /// Queues `msg` (sent in order, at once).
    ///
    /// # Errors
    /// [`CtlError::Closed`] when the stream is gone.
    pub fn send(&self, msg: CtlMsg) -> Result<(), CtlError> {
        self.0.send((msg, None)).map_err(|_| CtlError::Closed)
    }

    /// Sends `msg` and waits (at most `limit`) until it was written to the socket.
    ///
    /// # Errors
    /// [`CtlError::Closed`] when the stream is gone or the write did not happen in time.
    pub async fn deliver(&self, msg: CtlMsg, limit: Duration) -> Result<(), CtlError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.0.send((msg, Some(tx))).map_err(|_| CtlError::Closed)?;
        match tokio::time::timeout(limit, rx).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(CtlError::Closed),
        }
    }
}

/// One side of the control stream, with its reader and writer tasks.
#[derive(Debug)]
pub struct Ctl {
    tx: CtlSender,
    rx: mpsc::UnboundedReceiver<Result<CtlMsg, CtlError>>,
    tasks: [tokio::task::AbortHandle; 2],
}

impl Drop for Ctl {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Ctl {
    /// Wraps an authenticated stream: starts heartbeats and the reader.
    pub fn new(stream: TcpStream, heartbeat: Heartbeat) -> Self {
        // Control messages are tiny and on the guest's pause path: no Nagle delay.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY on the control stream");
        }
        let (read, write) = stream.into_split();
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let (in_tx, in_rx) = mpsc::unbounded_channel();
        let writer = tokio::spawn(write_loop(write, out_rx, heartbeat.interval));
        let reader = tokio::spawn(read_loop(read, in_tx, CtlSender(out_tx.clone()), heartbeat.timeout));
        Self { tx: CtlSender(out_tx), rx: in_rx, tasks: [writer.abort_handle(), reader.abort_handle()] }
    }

    /// A sender for other tasks.
    pub fn sender(&self) -> CtlSender {
        self.tx.clone()
    }

    /// Queues `msg`.
    ///
    /// # Errors
    /// [`CtlError::Closed`] when the stream is gone.
    pub fn send(&self, msg: CtlMsg) -> Result<(), CtlError> {
        self.tx.send(msg)
    }

    /// Sends `msg` and waits (at most `limit`) until it was written.
    ///
    /// # Errors
    /// [`CtlError::Closed`].
    pub async fn deliver(&self, msg: CtlMsg, limit: Duration) -> Result<(), CtlError> {
        self.tx.deliver(msg, limit).await
    }

    /// The next message from the peer (heartbeats are handled here). Cancellation safe.
    ///
    /// # Errors
    /// The stream's end: [`CtlError::Closed`], [`CtlError::Silent`], [`CtlError::TooLong`],
    /// [`CtlError::Garbage`], [`CtlError::Io`]; every later call returns [`CtlError::Closed`].
    pub async fn recv(&mut self) -> Result<CtlMsg, CtlError> {
        self.rx.recv().await.unwrap_or(Err(CtlError::Closed))
    }
}

async fn write_loop(mut w: OwnedWriteHalf, mut rx: mpsc::UnboundedReceiver<Outgoing>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let (msg, written) = tokio::select! {
            m = rx.recv() => match m {
                Some(m) => m,
                None => return,
            },
            _ = tick.tick() => (CtlMsg::Ping, None),
        };
        let line = format!("{msg}\n");
        if let Err(e) = w.write_all(line.as_bytes()).await {
            tracing::debug!(error = %e, "control stream write failed");
            return;
        }
        if let Some(tx) = written {
            let _ = tx.send(());
        }
    }
}

async fn read_loop(
    r: OwnedReadHalf,
    tx: mpsc::UnboundedSender<Result<CtlMsg, CtlError>>,
    out: CtlSender,
    silence: Duration,
) {
    let mut reader = BufReader::new(r);
    let mut line = String::new();
    loop {
        line.clear();
        let mut limited = (&mut reader).take(MAX_LINE as u64 + 1);
        let read = limited.read_line(&mut line);
        let result = match tokio::time::timeout(silence, read).await {
            Err(_) => Err(CtlError::Silent(silence)),
            Ok(Err(e)) => Err(CtlError::Io(e.to_string())),
            Ok(Ok(0)) => Err(CtlError::Closed),
            Ok(Ok(_)) if !line.ends_with('\n') => {
                Err(if line.len() > MAX_LINE { CtlError::TooLong } else { CtlError::Closed })
            }
            Ok(Ok(_)) => line.trim_end_matches('\n').parse::<CtlMsg>().map_err(CtlError::from),
        };
        match result {
            Ok(CtlMsg::Ping) => {
                let _ = out.send(CtlMsg::Pong);
            }
            Ok(CtlMsg::Pong) => {}
            Ok(m) => {
                if tx.send(Ok(m)).is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn every_message_round_trips_through_its_line() {
        let all = [
            CtlMsg::NbdAdmit(40123),
            CtlMsg::NbdAdmitted(1),
            CtlMsg::StorageDone,
            CtlMsg::StorageReleased,
            CtlMsg::StorageError("export busy".into()),
            CtlMsg::Prepared,
            CtlMsg::Commit,
            CtlMsg::Abort("cancelled by the user".into()),
            CtlMsg::CancelRequest("kubectl: interrupted".into()),
            CtlMsg::CancelRefused("past the commit".into()),
            CtlMsg::Failed("QEMU exited".into()),
            CtlMsg::Resumed,
            CtlMsg::Ping,
            CtlMsg::Pong,
        ];
        for m in all {
            let line = m.to_string();
            assert!(!line.contains('\n'), "{line}");
            assert_eq!(line.parse::<CtlMsg>(), Ok(m.clone()), "{line}");
        }
        assert_eq!("abort a\nb".parse::<CtlMsg>(), Ok(CtlMsg::Abort("a b".into())), "no line breaks inside");
        assert!("resume".parse::<CtlMsg>().is_err());
        for bad in
            ["nbd-admit", "nbd-admit 0", "nbd-admit 65536", "nbd-admit -1", "nbd-admitted x", "nbd-admit 1 2"]
        {
            assert!(bad.parse::<CtlMsg>().is_err(), "{bad:?} is refused");
        }
        assert!("".parse::<CtlMsg>().is_err());
        let long = CtlMsg::Abort("x".repeat(5000)).to_string();
        assert!(long.len() <= MAX_TEXT + 6, "text is bounded: {}", long.len());
    }

    async fn pair(hb: Heartbeat) -> (Ctl, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (server, _) = l.accept().await.expect("accept");
        (Ctl::new(server, hb), client)
    }

    #[tokio::test]
    async fn messages_both_ways_with_heartbeats_in_between() {
        let hb = Heartbeat { interval: Duration::from_millis(10), timeout: Duration::from_secs(2) };
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let peer = tokio::spawn(async move {
            let mut c = Ctl::new(TcpStream::connect(addr).await.expect("connect"), hb);
            c.send(CtlMsg::Prepared).expect("send");
            let got = c.recv().await;
            (c, got)
        });
        let mut s = Ctl::new(l.accept().await.expect("accept").0, hb);
        assert_eq!(s.recv().await, Ok(CtlMsg::Prepared));
        // Several heartbeat intervals pass: pings are answered, never surfaced.
        tokio::time::sleep(Duration::from_millis(60)).await;
        s.send(CtlMsg::Commit).expect("send");
        let (c, got) = peer.await.expect("join");
        assert_eq!(got, Ok(CtlMsg::Commit));
        drop(c);
        assert_eq!(s.recv().await, Err(CtlError::Closed));
        assert_eq!(s.recv().await, Err(CtlError::Closed), "stays closed");
    }

    #[tokio::test]
    async fn a_silent_peer_is_lost_within_the_timeout() {
        let hb = Heartbeat { interval: Duration::from_millis(10), timeout: Duration::from_millis(150) };
        // The raw client never answers nor pings: the stream is open but silent.
        let (mut s, _silent) = pair(hb).await;
        let started = std::time::Instant::now();
        assert_eq!(s.recv().await, Err(CtlError::Silent(hb.timeout)));
        assert!(started.elapsed() >= hb.timeout);
    }

    #[tokio::test]
    async fn garbage_and_overlong_lines_end_the_stream() {
        let hb = Heartbeat::default();
        let (mut s, mut raw) = pair(hb).await;
        raw.write_all(b"launch-missiles\n").await.expect("write");
        assert!(matches!(s.recv().await, Err(CtlError::Garbage(_))));
        let (mut s, mut raw) = pair(hb).await;
        raw.write_all(&[b'x'; 4000]).await.expect("write");
        assert_eq!(s.recv().await, Err(CtlError::TooLong));
    }
}
