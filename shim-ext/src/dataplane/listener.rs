//! The destination's data listener and the source's connector.
//!
//! One listener per node agent serves every incoming migration: a migration registers the streams
//! it expects ([`DataListener::expect`]); a connection is routed to its waiter only after the
//! handshake proved the peer knows that migration's secret. Unknown or unauthenticated connections
//! are closed after a single generic refusal.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::handshake::{self, Parsed, Secret, StreamKey, NONCE_LEN, SERVER_HELLO_LEN};
use super::{io_err, Error};

/// How long a peer has to complete the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

type Waiters = HashMap<String, mpsc::UnboundedSender<TcpStream>>;

#[derive(Debug)]
struct Registration {
    secret: Secret,
    /// stream name → where accepted connections go.
    waiters: Waiters,
}

type Registry = Arc<Mutex<HashMap<String, Registration>>>;

/// A TCP listener that authenticates data streams for registered migrations.
#[derive(Debug)]
pub struct DataListener {
    local_addr: SocketAddr,
    registry: Registry,
    task: tokio::task::JoinHandle<()>,
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
        let local_addr = listener.local_addr().map_err(io_err("read the bound address"))?;
        let registry: Registry = Arc::default();
        let task = tokio::spawn(accept_loop(listener, registry.clone()));
        Ok(Self { local_addr, registry, task })
    }

    /// The address peers connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
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

async fn accept_loop(listener: TcpListener, registry: Registry) {
    loop {
        match listener.accept().await {
            Ok((conn, peer)) => {
                let registry = registry.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, serve_handshake(conn, &registry)).await {
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

async fn serve_handshake(mut conn: TcpStream, registry: &Registry) -> Result<StreamKey, Error> {
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
    let waiter = {
        let reg = registry.lock().map_err(|_| Error::Closed(key.to_string()))?;
        reg.get(&key.migration_id).and_then(|r| {
            let w = r.waiters.get(&key.stream)?;
            handshake::verify_client(&r.secret, &nonce, &hello).then(|| (w.clone(), r.secret.clone()))
        })
    };
    let Some((waiter, secret)) = waiter else {
        // Best effort: the peer learns only that it was refused.
        let _ = conn.write_all(&handshake::server_reject()).await;
        return Err(Error::Authentication(key.to_string()));
    };
    conn.write_all(&handshake::server_accept(&secret, &nonce, &hello))
        .await
        .map_err(io_err("send accept"))?;
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
    let attempt = async {
        let mut conn = TcpStream::connect(addr).await.map_err(io_err(format!("connect to {addr}")))?;
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
}
