//! The connection: handshake, one reader task, one writer task, id-matched replies.
//!
//! ```text
//!  QmpClient (Clone) ──execute──► pending[id] = oneshot ──► writer task ──► socket ──► QEMU
//!                                      ▲                                                 │
//!                                      └── reply by id ◄── reader task ◄── socket ◄──────┘
//!                                                             └── events ──► EventReceiver
//! ```
//!
//! The reader handles messages strictly in wire order: an event QEMU sent before a reply is in
//! the event channel before the command's `execute` returns. The cutover relies on this: the
//! `STOP` event of our own `stop` is already queued when `stop` returns.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use nix::sys::socket::{sendmsg, shutdown, ControlMessage, MsgFlags, Shutdown};
use serde_json::{Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;
use tracing::{debug, warn};

use super::codec::{excerpt, parse_message, LineDecoder, Message, DEFAULT_MAX_LINE};
use super::error::QmpError;
use super::event::QmpEvent;
use super::types::Greeting;

/// Size of one socket read. Bounds what the decoder holds beyond the line cap.
const READ_CHUNK: usize = 64 * 1024;

/// The receiving end of a connection's events.
///
/// Unbounded on purpose: an event must never be lost (a missed `STOP` stalls a cutover), and a
/// bounded channel would either drop or stall the reader, which would then stop delivering
/// replies. QEMU's event rate is bounded (it rate-limits the chatty events such as
/// `BALLOON_CHANGE`, and status events come a handful per migration) and the consumer drains
/// continuously, so the queue stays short. The channel ends when the connection ends.
pub type EventReceiver = mpsc::UnboundedReceiver<QmpEvent>;

/// Settings of a QMP connection.
#[derive(Debug, Clone)]
pub struct QmpConfig {
    /// Time allowed for the greeting and the `qmp_capabilities` reply together.
    /// Ours: QEMU greets at once; 10 s covers a loaded node.
    pub handshake_deadline: Duration,
    /// Default deadline of a command. Ours: `stop` drains in-flight block I/O, which can take
    /// seconds on a slow disk; 30 s still bounds a hung QEMU.
    pub command_deadline: Duration,
    /// Cap on one line from QEMU, in bytes (16 MiB, see [`DEFAULT_MAX_LINE`]).
    pub max_line: usize,
}

impl Default for QmpConfig {
    fn default() -> Self {
        Self {
            handshake_deadline: Duration::from_secs(10),
            command_deadline: Duration::from_secs(30),
            max_line: DEFAULT_MAX_LINE,
        }
    }
}

/// An asynchronous QMP client.
///
/// Cheap to clone; clones share one connection and may issue commands concurrently. Dropping
/// the last clone closes the connection and ends the event channel.
#[derive(Clone)]
pub struct QmpClient {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    outgoing: mpsc::UnboundedSender<Outgoing>,
    next_id: AtomicU64,
    greeting: Greeting,
    default_deadline: Duration,
    tasks: [AbortHandle; 2],
}

impl Drop for Inner {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl fmt::Debug for QmpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.inner.shared.lock();
        f.debug_struct("QmpClient")
            .field("qemu", &self.inner.greeting.version)
            .field("pending", &state.pending.len())
            .field("ended", &state.ended.is_some())
            .finish()
    }
}

impl QmpClient {
    /// Connects to QEMU's QMP unix socket, reads the greeting and negotiates capabilities.
    ///
    /// # Errors
    ///
    /// [`QmpError::Connect`], or any error of [`QmpClient::from_stream`].
    pub async fn connect(
        path: impl AsRef<Path>,
        config: &QmpConfig,
    ) -> Result<(Self, EventReceiver), QmpError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect { path: path.to_owned(), source })?;
        Self::from_stream(stream, config).await
    }

    /// Runs the QMP handshake on an already-connected stream.
    ///
    /// # Errors
    ///
    /// [`QmpError::GreetingTimeout`], [`QmpError::GreetingClosed`], [`QmpError::GreetingRead`],
    /// [`QmpError::NotAGreeting`], [`QmpError::MalformedGreeting`], [`QmpError::LineTooLong`],
    /// or an error of the `qmp_capabilities` command.
    pub async fn from_stream(
        stream: UnixStream,
        config: &QmpConfig,
    ) -> Result<(Self, EventReceiver), QmpError> {
        let started = Instant::now();
        let deadline = config.handshake_deadline;
        let (mut read, write) = stream.into_split();
        let mut decoder = LineDecoder::new(config.max_line);
        let greeting = tokio::time::timeout(deadline, read_greeting(&mut read, &mut decoder))
            .await
            .map_err(|_| QmpError::GreetingTimeout { deadline })??;
        debug!(qemu = %greeting.version, capabilities = ?greeting.capabilities, "QMP greeting");

        let shared = Arc::new(Shared::default());
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let (outgoing, queue) = mpsc::unbounded_channel();
        let reader = tokio::spawn(read_loop(read, decoder, Arc::clone(&shared), events_tx));
        let writer = tokio::spawn(write_loop(write, queue, Arc::clone(&shared)));
        let client = Self {
            inner: Arc::new(Inner {
                shared,
                outgoing,
                next_id: AtomicU64::new(1),
                greeting,
                default_deadline: config.command_deadline,
                tasks: [reader.abort_handle(), writer.abort_handle()],
            }),
        };
        let remaining = deadline.saturating_sub(started.elapsed());
        client.execute_with_deadline("qmp_capabilities", None, remaining).await?;
        Ok((client, events_rx))
    }

    /// The greeting QEMU sent on connect.
    pub fn greeting(&self) -> &Greeting {
        &self.inner.greeting
    }

    /// `false` once the connection has ended; every later command fails.
    pub fn is_connected(&self) -> bool {
        self.inner.shared.lock().ended.is_none()
    }

    /// Runs a command with the client's default deadline and returns its `return` value.
    ///
    /// # Errors
    ///
    /// [`QmpError::Command`] for an error reply, [`QmpError::Timeout`],
    /// [`QmpError::Closed`] or [`QmpError::ConnectionFailed`].
    pub async fn execute(&self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        self.execute_with_deadline(command, arguments, self.inner.default_deadline).await
    }

    /// Runs a command with its own deadline. On expiry the command is forgotten: a late reply
    /// is dropped (QEMU may still carry the command out).
    ///
    /// # Errors
    ///
    /// As [`QmpClient::execute`].
    pub async fn execute_with_deadline(
        &self,
        command: &str,
        arguments: Option<Value>,
        deadline: Duration,
    ) -> Result<Value, QmpError> {
        self.call(command, arguments, None, deadline).await
    }

    /// Runs a command and passes `fd` with it over `SCM_RIGHTS` (for `getfd`, `add-fd`).
    /// The descriptor is duplicated, so the caller keeps its own.
    ///
    /// # Errors
    ///
    /// [`QmpError::DuplicateFd`], or as [`QmpClient::execute`].
    pub async fn execute_with_fd(
        &self,
        command: &str,
        arguments: Option<Value>,
        fd: impl AsFd,
    ) -> Result<Value, QmpError> {
        // The writer may send after this future is gone (deadline, cancel); owning a duplicate
        // keeps the descriptor valid until then.
        let fd = fd
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| QmpError::DuplicateFd { command: command.to_owned(), source })?;
        self.call(command, arguments, Some(fd), self.inner.default_deadline).await
    }

    async fn call(
        &self,
        command: &str,
        arguments: Option<Value>,
        fd: Option<OwnedFd>,
        deadline: Duration,
    ) -> Result<Value, QmpError> {
        let inner = &self.inner;
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply_tx, reply_rx) = oneshot::channel();
        inner.shared.register(id, command, reply_tx)?;
        let _pending = PendingGuard { shared: &inner.shared, id };
        debug!(command, id, with_fd = fd.is_some(), "sending QMP command");
        let line = encode_command(command, arguments, id);
        if inner.outgoing.send(Outgoing { line, fd }).is_err() {
            return Err(inner.shared.ended_error(command));
        }
        match tokio::time::timeout(deadline, reply_rx).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => Err(inner.shared.ended_error(command)),
            Err(_) => {
                warn!(command, id, ?deadline, "QMP command timed out");
                Err(QmpError::Timeout { command: command.to_owned(), deadline })
            }
        }
    }
}

/// `{"execute": ..., "arguments": ..., "id": N}` and a newline.
fn encode_command(command: &str, arguments: Option<Value>, id: u64) -> Vec<u8> {
    let mut object = Map::new();
    object.insert("execute".to_owned(), Value::from(command));
    if let Some(arguments) = arguments {
        object.insert("arguments".to_owned(), arguments);
    }
    object.insert("id".to_owned(), Value::from(id));
    let mut line = Value::Object(object).to_string().into_bytes();
    line.push(b'\n');
    line
}

/// Our ids are numbers; a peer that echoes them as strings is accepted too.
fn id_key(id: &Value) -> Option<u64> {
    match id {
        Value::Number(number) => number.as_u64(),
        Value::String(text) => text.parse().ok(),
        _ => None,
    }
}

type Reply = Result<Value, QmpError>;

struct Pending {
    command: String,
    reply: oneshot::Sender<Reply>,
}

/// How the connection ended; the first cause wins.
#[derive(Clone)]
enum Ended {
    Closed,
    Failed(Arc<QmpError>),
}

impl Ended {
    fn error_for(&self, command: &str) -> QmpError {
        let command = command.to_owned();
        match self {
            Self::Closed => QmpError::Closed { command },
            Self::Failed(cause) => QmpError::ConnectionFailed { command, source: Arc::clone(cause) },
        }
    }
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    pending: HashMap<u64, Pending>,
    ended: Option<Ended>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The lock guards plain map updates that cannot leave it inconsistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a command; refused once the connection has ended, under the same lock that
    /// `end` drains with, so no command can slip in after the drain and wait forever.
    fn register(&self, id: u64, command: &str, reply: oneshot::Sender<Reply>) -> Result<(), QmpError> {
        let mut state = self.lock();
        if let Some(ended) = &state.ended {
            return Err(ended.error_for(command));
        }
        state.pending.insert(id, Pending { command: command.to_owned(), reply });
        Ok(())
    }

    fn ended_error(&self, command: &str) -> QmpError {
        match &self.lock().ended {
            Some(ended) => ended.error_for(command),
            None => QmpError::Closed { command: command.to_owned() },
        }
    }

    fn complete(&self, id: Option<&Value>, reply: impl FnOnce(&str) -> Reply) {
        let Some(key) = id.and_then(id_key) else {
            warn!(?id, "QMP reply without an id we issued; dropped");
            return;
        };
        let Some(pending) = self.lock().pending.remove(&key) else {
            debug!(id = key, "QMP reply to a command that timed out or was abandoned");
            return;
        };
        // The caller may have gone away meanwhile; nobody is left to tell.
        let _ = pending.reply.send(reply(&pending.command));
    }

    fn end(&self, ended: Ended) {
        let drained: Vec<Pending> = {
            let mut state = self.lock();
            if state.ended.is_some() {
                return;
            }
            state.ended = Some(ended.clone());
            state.pending.drain().map(|(_, pending)| pending).collect()
        };
        for pending in drained {
            let _ = pending.reply.send(Err(ended.error_for(&pending.command)));
        }
    }
}

/// Forgets a command's pending entry however its `call` ends (reply, deadline, or the caller
/// dropping the future).
struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.lock().pending.remove(&self.id);
    }
}

struct Outgoing {
    line: Vec<u8>,
    fd: Option<OwnedFd>,
}

async fn read_greeting(read: &mut OwnedReadHalf, decoder: &mut LineDecoder) -> Result<Greeting, QmpError> {
    let mut chunk = vec![0_u8; READ_CHUNK];
    loop {
        if let Some(line) = decoder.next_line()? {
            return match parse_message(line) {
                Ok(Message::Greeting(greeting)) => Ok(greeting),
                Err(error @ QmpError::MalformedGreeting { .. }) => Err(error),
                Ok(_) | Err(_) => Err(QmpError::NotAGreeting { excerpt: excerpt(line) }),
            };
        }
        match read.read(&mut chunk).await {
            Ok(0) => return Err(QmpError::GreetingClosed),
            Ok(n) => decoder.push(&chunk[..n]),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => return Err(QmpError::GreetingRead { source }),
        }
    }
}

/// When the bytes carrying a message arrived.
#[derive(Clone, Copy)]
struct Stamp {
    wall: SystemTime,
    mono: Instant,
}

impl Stamp {
    fn now() -> Self {
        Self { wall: SystemTime::now(), mono: Instant::now() }
    }
}

async fn read_loop(
    mut read: OwnedReadHalf,
    mut decoder: LineDecoder,
    shared: Arc<Shared>,
    events: mpsc::UnboundedSender<QmpEvent>,
) {
    let mut chunk = vec![0_u8; READ_CHUNK];
    // Bytes left over from the handshake read came with the greeting.
    let mut stamp = Stamp::now();
    let ended = loop {
        if let Err(error) = dispatch(&mut decoder, &shared, &events, stamp) {
            break Ended::Failed(Arc::new(error));
        }
        match read.read(&mut chunk).await {
            Ok(0) => break Ended::Closed,
            Ok(n) => {
                stamp = Stamp::now();
                decoder.push(&chunk[..n]);
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) if error.kind() == io::ErrorKind::ConnectionReset => break Ended::Closed,
            Err(source) => break Ended::Failed(Arc::new(QmpError::Read { source })),
        }
    };
    match &ended {
        Ended::Closed => debug!("QEMU closed the QMP connection"),
        Ended::Failed(cause) => warn!(error = %cause, "QMP connection failed"),
    }
    // Close both directions: QEMU serves one QMP client at a time and must see us go, and the
    // writer must stop. Failure only means the socket is already shut.
    let _ = shutdown(read.as_ref().as_raw_fd(), Shutdown::Both);
    shared.end(ended);
    // `events` drops here, after every pending command got its error: the channel ends.
}

fn dispatch(
    decoder: &mut LineDecoder,
    shared: &Shared,
    events: &mpsc::UnboundedSender<QmpEvent>,
    stamp: Stamp,
) -> Result<(), QmpError> {
    while let Some(message) = decoder.next_message()? {
        match message {
            Message::Return { id, value } => shared.complete(id.as_ref(), |_| Ok(value)),
            Message::Error { id, class, desc } => shared.complete(id.as_ref(), |command| {
                Err(QmpError::Command { command: command.to_owned(), class, desc })
            }),
            Message::Event(raw) => {
                debug!(event = %raw.name, "QMP event");
                // A consumer that dropped its receiver does not want events; that is not an
                // error of the connection.
                let _ = events.send(QmpEvent {
                    name: raw.name,
                    data: raw.data,
                    qemu_timestamp: raw.timestamp,
                    received_at: stamp.wall,
                    received_instant: stamp.mono,
                });
            }
            Message::Greeting(_) => warn!("QMP greeting in the middle of a session; ignored"),
            Message::Unknown(object) => {
                let members: Vec<&String> = object.keys().collect();
                warn!(?members, "QMP message of an unknown kind; ignored");
            }
        }
    }
    Ok(())
}

async fn write_loop(
    mut write: OwnedWriteHalf,
    mut queue: mpsc::UnboundedReceiver<Outgoing>,
    shared: Arc<Shared>,
) {
    while let Some(outgoing) = queue.recv().await {
        let result = match &outgoing.fd {
            None => write.write_all(&outgoing.line).await,
            Some(fd) => send_with_fd(write.as_ref(), &outgoing.line, fd.as_fd()).await,
        };
        if let Err(source) = result {
            let ended = match source.kind() {
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::NotConnected => {
                    Ended::Closed
                }
                _ => Ended::Failed(Arc::new(QmpError::Write { source })),
            };
            let _ = shutdown(write.as_ref().as_raw_fd(), Shutdown::Both);
            shared.end(ended);
            return;
        }
    }
}

/// Writes `line` with `fd` attached to its first byte, then the rest of the line.
///
/// QEMU queues descriptors received on the monitor socket and `getfd` takes the latest, so the
/// descriptor only has to arrive no later than the command's first byte.
async fn send_with_fd(stream: &UnixStream, line: &[u8], fd: BorrowedFd<'_>) -> io::Result<()> {
    let socket = stream.as_raw_fd();
    let fds = [fd.as_raw_fd()];
    let sent = loop {
        stream.writable().await?;
        let attempt = stream.try_io(Interest::WRITABLE, || {
            sendmsg::<()>(
                socket,
                &[IoSlice::new(line)],
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(io::Error::from)
        });
        match attempt {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(sent) => break sent,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error),
        }
    };
    let mut rest = &line[sent..];
    while !rest.is_empty() {
        stream.writable().await?;
        match stream.try_write(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => rest = &rest[n..],
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn commands_are_one_line_with_our_id() {
        let line = encode_command("migrate", Some(json!({"uri": "fd:mig"})), 42);
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        let value: Value = serde_json::from_slice(&line).expect("json");
        assert_eq!(value, json!({"execute": "migrate", "arguments": {"uri": "fd:mig"}, "id": 42}));
        let bare: Value = serde_json::from_slice(&encode_command("stop", None, 1)).expect("json");
        assert_eq!(bare, json!({"execute": "stop", "id": 1}));
    }

    #[test]
    fn ids_match_as_numbers_or_strings() {
        assert_eq!(id_key(&json!(7)), Some(7));
        assert_eq!(id_key(&json!("7")), Some(7));
        assert_eq!(id_key(&json!("x")), None);
        assert_eq!(id_key(&json!(-1)), None);
    }

    #[test]
    fn client_is_send_sync_clone() {
        fn assert_traits<T: Send + Sync + Clone + 'static>() {}
        assert_traits::<QmpClient>();
    }
}
