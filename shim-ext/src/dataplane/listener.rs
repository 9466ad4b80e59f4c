//! The destination's data listener and the source's connector.
//!
//! One listener per node agent serves every incoming migration: a migration registers the streams
//! it expects ([`DataListener::expect`]); a connection is routed to its waiter only after the
//! handshake proved the peer knows that migration's secret. Unknown or unauthenticated connections
//! are closed after a single generic refusal.
//!
//! Anyone who reaches the node's address can connect, so the handshakes in progress are bounded:
//! at most [`PER_PEER_HANDSHAKES`] per peer address and [`MAX_HANDSHAKES`] in all. A connection
//! past either cap is closed at once, before a byte is read or a task spawned, and counted
//! ([`DataListener::dropped`]). Authenticated streams are no longer handshakes: they count against
//! neither cap, so a flood never touches a running migration's streams.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::handshake::{self, Parsed, Secret, StreamKey, NONCE_LEN, SERVER_HELLO_LEN};
use super::{io_err, Error};

/// How long a peer has to complete the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress from one peer address. A source node opens every stream of a migration
/// at once: the control stream, the RAM stream, up to 64 multifd channels
/// (`MAX_MULTIFD_CHANNELS`) and one NBD stream per local disk; 80 fits one migration at the
/// largest multifd setting with 14 disks, or about twenty ordinary migrations (control, RAM, a
/// disk or two) started side by side from one node. A handshake takes one round trip, so a
/// legitimate peer holds its slots for milliseconds; a flood holds them for [`HANDSHAKE_TIMEOUT`].
pub const PER_PEER_HANDSHAKES: usize = 80;

/// Handshakes in progress in all. Each holds a socket: 256 keeps the listener's descriptors far
/// below a default soft `RLIMIT_NOFILE` of 1024, whatever the number of peers, leaving room for
/// the streams, QEMU's sockets and the journal.
pub const MAX_HANDSHAKES: usize = 256;

type Waiters = HashMap<String, mpsc::UnboundedSender<TcpStream>>;

#[derive(Debug)]
struct Registration {
    secret: Secret,
    /// stream name → where accepted connections go.
    waiters: Waiters,
}

type Registry = Arc<Mutex<HashMap<String, Registration>>>;

/// Answers for streams of migrations no longer registered (e.g. a source asking, long after a
/// move, whether the VM it handed over still runs here): given the stream's key, the secret that
/// authenticates it and where its connection goes, or `None` to refuse. Consulted only for a
/// migration id with no registration, before the peer's proof is checked.
pub type Resolver =
    Arc<dyn Fn(&StreamKey) -> Option<(Secret, mpsc::UnboundedSender<TcpStream>)> + Send + Sync>;

/// The listener's registry and its fallback.
#[derive(Clone, Default)]
struct Routes {
    registry: Registry,
    resolver: Arc<Mutex<Option<Resolver>>>,
}

/// The handshakes in progress, per peer address and in all (a pure account; the accept loop
/// decides with it).
#[derive(Debug, Default)]
struct Pending {
    total: usize,
    per_peer: HashMap<IpAddr, usize>,
}

/// Why a connection was not given a handshake slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Full {
    Peer,
    Total,
}

impl Pending {
    /// Takes a slot for `peer`, or says which cap is reached.
    fn acquire(&mut self, peer: IpAddr, per_peer: usize, total: usize) -> Result<(), Full> {
        let n = self.per_peer.get(&peer).copied().unwrap_or(0);
        if n >= per_peer {
            return Err(Full::Peer);
        }
        if self.total >= total {
            return Err(Full::Total);
        }
        self.per_peer.insert(peer, n + 1);
        self.total += 1;
        Ok(())
    }

    fn release(&mut self, peer: IpAddr) {
        if let Some(n) = self.per_peer.get_mut(&peer) {
            *n -= 1;
            if *n == 0 {
                self.per_peer.remove(&peer);
            }
            self.total -= 1;
        }
    }
}

/// A handshake slot, given back when the handshake task ends however it ends.
struct Slot {
    pending: Arc<Mutex<Pending>>,
    peer: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut p) = self.pending.lock() {
            p.release(self.peer);
        }
    }
}

/// What the accept loop shares with the listener's owner.
#[derive(Debug, Default)]
struct Shared {
    pending: Arc<Mutex<Pending>>,
    dropped: AtomicU64,
}

/// A TCP listener that authenticates data streams for registered migrations.
pub struct DataListener {
    local_addr: SocketAddr,
    registry: Registry,
    resolver: Arc<Mutex<Option<Resolver>>>,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for DataListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataListener")
            .field("local_addr", &self.local_addr)
            .field("registry", &self.registry)
            .field("shared", &self.shared)
            .finish_non_exhaustive()
    }
}

impl Drop for DataListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The streams one migration waits for; dropping it unregisters the migration.
#[derive(Debug)]
pub struct Expected {
    migration_id: String,
    registry: Registry,
    receivers: HashMap<String, mpsc::UnboundedReceiver<TcpStream>>,
}

impl Drop for Expected {
    fn drop(&mut self) {
        if let Ok(mut reg) = self.registry.lock() {
            reg.remove(&self.migration_id);
        }
    }
}

impl Expected {
    /// Takes the receiver of `stream`'s connections, for a task that serves them all; later
    /// [`Expected::accept`] calls for that stream report it closed.
    pub fn take_stream(&mut self, stream: &str) -> Option<mpsc::UnboundedReceiver<TcpStream>> {
        self.receivers.remove(stream)
    }

    /// Waits for the next authenticated connection of `stream`.
    ///
    /// # Errors
    /// [`Error::Timeout`] after `timeout`, [`Error::Closed`] when the listener stopped or the
    /// stream was not registered.
    pub async fn accept(&mut self, stream: &str, timeout: Duration) -> Result<TcpStream, Error> {
        let key = format!("{}/{stream}", self.migration_id);
        let rx = self.receivers.get_mut(stream).ok_or_else(|| Error::Closed(key.clone()))?;
        match tokio::time::timeout(timeout, rx.recv()).await {
            Ok(Some(conn)) => Ok(conn),
            Ok(None) => Err(Error::Closed(key)),
            Err(_) => Err(Error::Timeout(format!("{key} (no authenticated connection within {timeout:?})"))),
        }
    }
}

impl DataListener {
    /// Binds `addr` (port 0 picks one) and starts accepting.
    ///
    /// # Errors
    /// [`Error::Io`] when the address cannot be bound.
    pub async fn bind(addr: SocketAddr) -> Result<Self, Error> {
        let listener = TcpListener::bind(addr).await.map_err(io_err(format!("bind {addr}")))?;
        Self::serve(listener)
    }

    /// Starts accepting on a listener bound elsewhere — e.g. on a thread in the host's network
    /// namespace, which the socket keeps. It must be non-blocking; call from a tokio runtime.
    ///
    /// # Errors
    /// [`Error::Io`] when tokio cannot register the socket.
    pub fn from_std(listener: std::net::TcpListener) -> Result<Self, Error> {
        Self::serve(TcpListener::from_std(listener).map_err(io_err("register the data listener"))?)
    }

    fn serve(listener: TcpListener) -> Result<Self, Error> {
        let local_addr = listener.local_addr().map_err(io_err("read the bound address"))?;
        let routes = Routes::default();
        let shared = Arc::new(Shared::default());
        let task = tokio::spawn(accept_loop(listener, routes.clone(), shared.clone()));
        Ok(Self { local_addr, registry: routes.registry, resolver: routes.resolver, shared, task })
    }

    /// Installs the [`Resolver`] for streams of unregistered migrations (replacing any).
    pub fn set_resolver(&self, resolver: Resolver) {
        if let Ok(mut r) = self.resolver.lock() {
            *r = Some(resolver);
        }
    }

    /// The address peers connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Connections closed unread because their peer, or the listener, had as many handshakes in
    /// progress as allowed ([`PER_PEER_HANDSHAKES`], [`MAX_HANDSHAKES`]).
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Handshakes in progress now.
    pub fn pending_handshakes(&self) -> usize {
        self.shared.pending.lock().map_or(0, |p| p.total)
    }

    /// Whether the accept loop still runs.
    pub fn is_running(&self) -> bool {
        !self.task.is_finished()
    }

    /// Registers a migration and the stream names it accepts.
    ///
    /// # Errors
    /// [`Error::Duplicate`] when the id is registered already, [`Error::InvalidName`] for bad names.
    pub fn expect(&self, migration_id: &str, secret: Secret, streams: &[&str]) -> Result<Expected, Error> {
        handshake::validate_migration_id(migration_id)?;
        let mut waiters = HashMap::new();
        let mut receivers = HashMap::new();
        for s in streams {
            handshake::validate_stream(s)?;
            let (tx, rx) = mpsc::unbounded_channel();
            waiters.insert((*s).to_owned(), tx);
            receivers.insert((*s).to_owned(), rx);
        }
        let mut reg = self.registry.lock().map_err(|_| Error::Closed(migration_id.into()))?;
        if reg.contains_key(migration_id) {
            return Err(Error::Duplicate(migration_id.into()));
        }
        reg.insert(migration_id.into(), Registration { secret, waiters });
        Ok(Expected { migration_id: migration_id.into(), registry: self.registry.clone(), receivers })
    }
}

async fn accept_loop(listener: TcpListener, routes: Routes, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((conn, peer)) => {
                let taken = shared
                    .pending
                    .lock()
                    .map_err(|_| Full::Total)
                    .and_then(|mut p| p.acquire(peer.ip(), PER_PEER_HANDSHAKES, MAX_HANDSHAKES));
                if let Err(full) = taken {
                    // Closed unread: no task, no buffer, no reply for a flood to wait on.
                    drop(conn);
                    let n = shared.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                    if n.is_power_of_two() {
                        tracing::warn!(%peer, ?full, dropped = n, "data listener at its handshake cap; dropping connections");
                    }
                    continue;
                }
                let slot = Slot { pending: shared.pending.clone(), peer: peer.ip() };
                let routes = routes.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, serve_handshake(conn, &routes)).await {
                        Ok(Ok(key)) => tracing::debug!(%peer, %key, "data stream authenticated"),
                        Ok(Err(e)) => tracing::warn!(%peer, error = %e, "data stream refused"),
                        Err(_) => tracing::warn!(%peer, "data stream handshake timed out"),
                    }
                });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "data listener accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve_handshake(mut conn: TcpStream, routes: &Routes) -> Result<StreamKey, Error> {
    let nonce = handshake::random_bytes::<NONCE_LEN>()?;
    conn.write_all(&handshake::server_hello(&nonce)).await.map_err(io_err("send server hello"))?;
    let mut buf = Vec::with_capacity(128);
    let hello = loop {
        match handshake::parse_client_hello(&buf)? {
            Parsed::Complete(hello, used) if used == buf.len() => break hello,
            Parsed::Complete(..) => {
                return Err(Error::Protocol("client sent data before being accepted".into()))
            }
            Parsed::Incomplete(need) => {
                let old = buf.len();
                buf.resize(need, 0);
                conn.read_exact(&mut buf[old..]).await.map_err(io_err("read client hello"))?;
            }
        }
    };
    let key = hello.key.clone();
    let registered = {
        let reg = routes.registry.lock().map_err(|_| Error::Closed(key.to_string()))?;
        reg.get(&key.migration_id).map(|r| r.waiters.get(&key.stream).map(|w| (w.clone(), r.secret.clone())))
    };
    let candidate = match registered {
        Some(found) => found,
        None => {
            let resolver = routes.resolver.lock().ok().and_then(|r| r.clone());
            resolver.and_then(|resolve| resolve(&key)).map(|(secret, w)| (w, secret))
        }
    };
    let waiter = candidate.filter(|(_, secret)| handshake::verify_client(secret, &nonce, &hello));
    let Some((waiter, secret)) = waiter else {
        // Best effort: the peer learns only that it was refused.
        let _ = conn.write_all(&handshake::server_reject()).await;
        return Err(Error::Authentication(key.to_string()));
    };
    conn.write_all(&handshake::server_accept(&secret, &nonce, &hello))
        .await
        .map_err(io_err("send accept"))?;
    super::bound_dead_peer(&conn);
    waiter.send(conn).map_err(|_| Error::Closed(key.to_string()))?;
    Ok(key)
}

/// Connects to a destination's data listener and authenticates `key`.
///
/// # Errors
/// [`Error::Io`] when the connection fails, [`Error::Rejected`] when the destination refuses,
/// [`Error::Authentication`] when the destination cannot prove it holds the secret,
/// [`Error::Timeout`] after `timeout`.
pub async fn connect(
    addr: SocketAddr,
    secret: &Secret,
    key: &StreamKey,
    timeout: Duration,
) -> Result<TcpStream, Error> {
    connect_with(TcpStream::connect(addr), addr, secret, key, timeout).await
}

/// [`connect`] over a connection `dial` makes (e.g. a socket created in the node's network
/// namespace while the caller runs in another).
///
/// # Errors
/// As [`connect`].
pub async fn connect_with(
    dial: impl std::future::Future<Output = std::io::Result<TcpStream>>,
    addr: SocketAddr,
    secret: &Secret,
    key: &StreamKey,
    timeout: Duration,
) -> Result<TcpStream, Error> {
    let attempt = async {
        let mut conn = dial.await.map_err(io_err(format!("connect to {addr}")))?;
        super::bound_dead_peer(&conn);
        let mut hello = [0u8; SERVER_HELLO_LEN];
        conn.read_exact(&mut hello).await.map_err(io_err(format!("read server hello from {addr}")))?;
        let server_nonce = handshake::parse_server_hello(&hello)?;
        let client_nonce = handshake::random_bytes::<NONCE_LEN>()?;
        conn.write_all(&handshake::client_hello(secret, key, &server_nonce, &client_nonce))
            .await
            .map_err(io_err("send client hello"))?;
        let mut head = [0u8; 5];
        conn.read_exact(&mut head).await.map_err(io_err(format!("read accept from {addr}")))?;
        if &head[..4] != b"KMRA" {
            return Err(Error::Protocol("destination answered something else than an accept".into()));
        }
        if head[4] != handshake::status::OK {
            return Err(Error::Rejected {
                key: key.to_string(),
                reason: "unknown migration, stream or secret",
            });
        }
        let mut proof = [0u8; 32];
        conn.read_exact(&mut proof).await.map_err(io_err("read the destination's proof"))?;
        if !handshake::verify_server(secret, &server_nonce, &client_nonce, key, &proof) {
            return Err(Error::Authentication(format!("destination {addr}")));
        }
        Ok(conn)
    };
    tokio::time::timeout(timeout, attempt).await.map_err(|_| Error::Timeout(format!("{key} to {addr}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(b: u8) -> Secret {
        Secret::new(vec![b; 32]).expect("secret")
    }

    const T: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn a_resolver_answers_for_unregistered_migrations_only_to_their_secret() {
        let listener = DataListener::bind("127.0.0.1:0".parse().expect("addr")).await.expect("bind");
        let _registered = listener.expect("m1", secret(1), &["ram"]).expect("expect");
        let (tx, mut rx) = mpsc::unbounded_channel();
        listener.set_resolver(Arc::new(move |key: &StreamKey| {
            (key.migration_id == "old" && key.stream == "vm").then(|| (secret(7), tx.clone()))
        }));
        let addr = listener.local_addr();
        let old = StreamKey::new("old", "vm").expect("key");
        let mut client = connect(addr, &secret(7), &old, T).await.expect("resolved stream");
        let mut server = tokio::time::timeout(T, rx.recv()).await.expect("in time").expect("delivered");
        server.write_all(b"running\n").await.expect("write");
        let mut got = [0u8; 8];
        client.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"running\n");
        let wrong_secret = connect(addr, &secret(8), &old, T).await;
        assert!(matches!(wrong_secret, Err(Error::Rejected { .. })), "{wrong_secret:?}");
        let other_stream = connect(addr, &secret(7), &StreamKey::new("old", "ram").expect("key"), T).await;
        assert!(matches!(other_stream, Err(Error::Rejected { .. })), "{other_stream:?}");
        // A registered migration is never resolved: its own streams and secret only.
        let registered = connect(addr, &secret(7), &StreamKey::new("m1", "vm").expect("key"), T).await;
        assert!(matches!(registered, Err(Error::Rejected { .. })), "{registered:?}");
        assert!(rx.try_recv().is_err(), "nothing else was delivered");
    }

    #[tokio::test]
    async fn authenticated_stream_reaches_its_waiter_and_carries_bytes() {
        let listener = DataListener::bind("127.0.0.1:0".parse().expect("addr")).await.expect("bind");
        let mut expected = listener.expect("m1", secret(1), &["ram", "nbd:drive-0"]).expect("expect");
        let key = StreamKey::new("m1", "nbd:drive-0").expect("key");
        let mut client = connect(listener.local_addr(), &secret(1), &key, T).await.expect("connect");
        let mut server = expected.accept("nbd:drive-0", T).await.expect("accept");
        client.write_all(b"block data").await.expect("write");
        let mut got = [0u8; 10];
        server.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"block data");
    }

    #[tokio::test]
    async fn wrong_secret_unknown_migration_or_stream_are_rejected() {
        let listener = DataListener::bind("127.0.0.1:0".parse().expect("addr")).await.expect("bind");
        let mut expected = listener.expect("m1", secret(1), &["ram"]).expect("expect");
        let addr = listener.local_addr();
        for (sec, id, stream) in [(2u8, "m1", "ram"), (1, "m2", "ram"), (1, "m1", "nbd:x")] {
            let key = StreamKey::new(id, stream).expect("key");
            let err = connect(addr, &secret(sec), &key, T).await.expect_err("rejected");
            assert!(matches!(err, Error::Rejected { .. }), "{id}/{stream} with secret {sec}: {err}");
        }
        let err = expected.accept("ram", Duration::from_millis(100)).await.expect_err("nothing accepted");
        assert!(matches!(err, Error::Timeout(_)), "{err}");
    }

    #[tokio::test]
    async fn impostor_destination_is_detected() {
        // A listener that accepts everything without knowing the secret cannot pass as the real one.
        let fake = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = fake.local_addr().expect("addr");
        tokio::spawn(async move {
            let (mut conn, _) = fake.accept().await.expect("accept");
            conn.write_all(&handshake::server_hello(&[3; NONCE_LEN])).await.expect("hello");
            let mut sink = [0u8; 128];
            let _ = conn.read(&mut sink).await;
            let mut accept = b"KMRA\0".to_vec();
            accept.extend_from_slice(&[0u8; 32]);
            conn.write_all(&accept).await.expect("fake accept");
            let _ = conn.read(&mut sink).await;
        });
        let key = StreamKey::new("m1", "ram").expect("key");
        let err = connect(addr, &secret(1), &key, T).await.expect_err("impostor");
        assert!(matches!(err, Error::Authentication(_)), "{err}");
    }

    #[tokio::test]
    async fn registration_is_unique_and_dropped_with_its_owner() {
        let listener = DataListener::bind("127.0.0.1:0".parse().expect("addr")).await.expect("bind");
        let expected = listener.expect("m1", secret(1), &["ram"]).expect("expect");
        assert!(matches!(listener.expect("m1", secret(1), &["ram"]), Err(Error::Duplicate(_))));
        drop(expected);
        let key = StreamKey::new("m1", "ram").expect("key");
        assert!(connect(listener.local_addr(), &secret(1), &key, T).await.is_err(), "unregistered");
        listener.expect("m1", secret(1), &["ram"]).expect("can register again");
    }

    #[tokio::test]
    async fn garbage_peer_gets_nothing() {
        let listener = DataListener::bind("127.0.0.1:0".parse().expect("addr")).await.expect("bind");
        let mut expected = listener.expect("m1", secret(1), &["ram"]).expect("expect");
        let mut conn = TcpStream::connect(listener.local_addr()).await.expect("connect");
        let mut hello = [0u8; SERVER_HELLO_LEN];
        conn.read_exact(&mut hello).await.expect("server hello");
        conn.write_all(b"GET / HTTP/1.1\r\n\r\n").await.expect("write");
        let mut rest = Vec::new();
        let _ = conn.read_to_end(&mut rest).await;
        assert!(rest.is_empty(), "no accept for garbage: {rest:?}");
        assert!(expected.accept("ram", Duration::from_millis(100)).await.is_err());
    }
    #[test]
    fn handshake_slots_are_capped_per_peer_and_in_total() {
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let c: IpAddr = "10.0.0.3".parse().expect("ip");
        let mut p = Pending::default();
        // (peer, acquire?, expected) with caps 2 per peer, 3 in all.
        let steps: [(IpAddr, bool, Result<(), Full>); 10] = [
            (a, true, Ok(())),
            (a, true, Ok(())),
            (a, true, Err(Full::Peer)),
            (b, true, Ok(())),
            (c, true, Err(Full::Total)),
            (a, false, Ok(())),
            (c, true, Ok(())),
            (c, true, Err(Full::Total)),
            (b, false, Ok(())),
            (c, true, Ok(())),
        ];
        for (i, (peer, acquire, want)) in steps.into_iter().enumerate() {
            if acquire {
                assert_eq!(p.acquire(peer, 2, 3), want, "step {i}");
            } else {
                p.release(peer);
            }
        }
        assert_eq!(p.total, 3);
        for peer in [a, c, c] {
            p.release(peer);
        }
        assert_eq!((p.total, p.per_peer.len()), (0, 0), "every slot given back");
        p.release(a);
        assert_eq!(p.total, 0, "a release without a slot changes nothing");
    }

    /// One migration at the largest multifd setting opens all its streams from one node at once:
    /// none of them may hit the per-peer cap.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_migration_opens_all_its_streams_at_once() {
        let multifd = usize::from(crate::migration::options::MAX_MULTIFD_CHANNELS);
        let disks = 8;
        let streams: Vec<String> = ["ctl".to_owned(), "ram".to_owned()]
            .into_iter()
            .chain((0..disks).map(|i| format!("nbd:drive-{i}")))
            .collect();
        let names: Vec<(String, usize)> =
            streams.iter().map(|s| (s.clone(), if s == "ram" { 1 + multifd } else { 1 })).collect();
        let total: usize = names.iter().map(|(_, n)| n).sum();
        assert!(total <= PER_PEER_HANDSHAKES, "{total} streams > per-peer cap {PER_PEER_HANDSHAKES}");
        let listener = DataListener::bind("127.0.0.1:0".parse().expect("addr")).await.expect("bind");
        let refs: Vec<&str> = streams.iter().map(String::as_str).collect();
        let mut expected = listener.expect("m1", secret(1), &refs).expect("expect");
        let addr = listener.local_addr();
        let mut set = tokio::task::JoinSet::new();
        for (stream, n) in &names {
            for _ in 0..*n {
                let key = StreamKey::new("m1", stream).expect("key");
                set.spawn(async move { connect(addr, &secret(1), &key, T).await });
            }
        }
        while let Some(done) = set.join_next().await {
            done.expect("task").expect("every stream authenticates");
        }
        for (stream, n) in &names {
            for _ in 0..*n {
                expected.accept(stream, T).await.expect("delivered");
            }
        }
        assert_eq!(listener.dropped(), 0);
    }

    /// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the hard limit.
    fn raise_nofile_limit() -> u64 {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit only writes the struct it is given, which lives for the call.
        let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
        assert_eq!(rc, 0, "getrlimit: {}", std::io::Error::last_os_error());
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit only reads the struct it is given; raising the soft limit up to the
        // hard limit needs no privilege.
        let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
        assert_eq!(rc, 0, "setrlimit: {}", std::io::Error::last_os_error());
        lim.rlim_max
    }

    fn open_fds() -> usize {
        std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd").count()
    }

    async fn echo(client: &mut TcpStream, server: &mut TcpStream, round: usize) {
        let msg = format!("round {round:08}");
        tokio::time::timeout(T, async {
            client.write_all(msg.as_bytes()).await.expect("write");
            let mut got = vec![0u8; msg.len()];
            server.read_exact(&mut got).await.expect("read");
            assert_eq!(got, msg.as_bytes());
        })
        .await
        .expect("the running stream carries data during the flood");
    }

    /// 10 000 idle connections from one address (the hard fd limit permitting): a running stream
    /// keeps carrying data, a new stream of the migration authenticates in time, the excess is
    /// dropped and counted, and the listener's descriptors stay bounded by the caps.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_flood_leaves_migration_streams_alone() {
        let hard = raise_nofile_limit();
        // Both ends live in this process: n client ends, and server ends up to the caps (a broken
        // cap runs out of descriptors and fails the flood's connect deadline below).
        let n = usize::try_from(hard.saturating_sub(2048)).unwrap_or(usize::MAX).min(10_000);
        println!("flood: {n} idle connections (RLIMIT_NOFILE hard limit {hard})");
        let listener = DataListener::bind("127.0.0.1:0".parse().expect("addr")).await.expect("bind");
        let addr = listener.local_addr();
        let mut expected = listener.expect("m1", secret(1), &["ram", "nbd:drive-0"]).expect("expect");
        let ram = StreamKey::new("m1", "ram").expect("key");
        let mut client = connect(addr, &secret(1), &ram, T).await.expect("ram connects");
        let mut server = expected.accept("ram", T).await.expect("ram accepted");
        let fds_before = open_fds();

        // The flood comes from another loopback address (all of 127/8 is loopback).
        let flood_from: SocketAddr = "127.0.0.2:0".parse().expect("addr");
        let mut idle = Vec::with_capacity(n);
        for i in 0..n {
            let sock = tokio::net::TcpSocket::new_v4().expect("socket");
            sock.bind(flood_from).expect("bind 127.0.0.2");
            let conn =
                tokio::time::timeout(T, sock.connect(addr)).await.expect("the listener keeps accepting");
            idle.push(conn.expect("flood connect"));
            if i % 1000 == 0 {
                echo(&mut client, &mut server, i).await;
            }
        }

        // A new stream of the migration while the flood holds its connections open.
        let nbd = StreamKey::new("m1", "nbd:drive-0").expect("key");
        let mut nbd_client =
            connect(addr, &secret(1), &nbd, T).await.expect("nbd authenticates during the flood");
        let mut nbd_server = expected.accept("nbd:drive-0", T).await.expect("nbd accepted");
        echo(&mut nbd_client, &mut nbd_server, n).await;
        echo(&mut client, &mut server, n).await;

        // The accept loop has seen every flood connection once the drop count covers the excess.
        let want = u64::try_from(n.saturating_sub(PER_PEER_HANDSHAKES)).unwrap_or(u64::MAX);
        let deadline = tokio::time::Instant::now() + T;
        while listener.dropped() < want && tokio::time::Instant::now() < deadline {
            tokio::task::yield_now().await;
        }
        let fds = open_fds();
        println!(
            "flood: dropped {}, handshakes in progress {}, fds {fds_before} -> {fds}",
            listener.dropped(),
            listener.pending_handshakes()
        );
        assert_eq!(listener.dropped(), want, "every connection past the per-peer cap is dropped");
        assert!(listener.pending_handshakes() <= PER_PEER_HANDSHAKES);
        assert!(listener.is_running(), "the accept loop survives the flood");
        // Our n client ends plus at most the capped server ends and the new stream's two.
        assert!(
            fds <= fds_before + n + PER_PEER_HANDSHAKES + 8,
            "fds grew from {fds_before} to {fds} for {n} connections"
        );
        drop(idle);
    }
}
