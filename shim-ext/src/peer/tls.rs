//! rustls configurations for one identity, and the authenticated accept loop.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use futures::{Stream, StreamExt};
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::{client, server, TlsAcceptor, TlsConnector};

use super::{ClusterCa, Error, Identity, PeerName, HANDSHAKE_TIMEOUT, MAX_HANDSHAKES};

/// How long to wait before trying again when a certificate could not be re-issued.
const RENEW_RETRY: Duration = Duration::from_secs(60);

/// The certificate in use, swapped when re-issued; rustls asks for it at every handshake.
#[derive(Debug)]
struct Current {
    key: RwLock<(Arc<CertifiedKey>, SystemTime, SystemTime)>,
}

impl Current {
    fn get(&self) -> Arc<CertifiedKey> {
        // A poisoned lock still holds a whole value: the writer only replaces it.
        self.key.read().unwrap_or_else(std::sync::PoisonError::into_inner).0.clone()
    }

    fn validity(&self) -> (SystemTime, SystemTime) {
        let k = self.key.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        (k.1, k.2)
    }

    fn set(&self, key: Arc<CertifiedKey>, not_before: SystemTime, not_after: SystemTime) {
        *self.key.write().unwrap_or_else(std::sync::PoisonError::into_inner) = (key, not_before, not_after);
    }
}

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

impl ResolvesClientCert for Current {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

struct Inner {
    name: PeerName,
    ca: Option<ClusterCa>,
    lifetime: Duration,
    provider: Arc<CryptoProvider>,
    current: Arc<Current>,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

/// One peer identity (a node's agent, or an administrator) with the TLS configurations that
/// present it and trust the cluster CA. Cheap to clone; a re-issued certificate is used by the
/// next handshake of every clone.
#[derive(Clone)]
pub struct PeerTls {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTls").field("name", &self.inner.name).finish_non_exhaustive()
    }
}

/// The crypto provider kube's client already uses: ring. No second provider in the process.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certified(provider: &CryptoProvider, identity: Identity) -> Result<Arc<CertifiedKey>, Error> {
    let key = provider
        .key_provider
        .load_private_key(identity.key)
        .map_err(|source| Error::Config { what: "the certificate's key", source })?;
    Ok(Arc::new(CertifiedKey::new(identity.chain, key)))
}

impl PeerTls {
    /// Issues `name` a certificate from `ca` for `lifetime` and keeps the CA to re-issue it
    /// ([`Self::renew`], [`Self::spawn_renewal`]).
    ///
    /// # Errors
    /// Those of [`ClusterCa::issue`], [`Error::Config`], [`Error::Verifier`].
    pub fn issue(ca: ClusterCa, name: PeerName, lifetime: Duration) -> Result<Self, Error> {
        let identity = ca.issue(&name, lifetime)?;
        let roots = ca.roots().to_vec();
        Self::build(&roots, identity, Some(ca), lifetime)
    }

    /// A fixed identity (no renewal) trusting `roots`: an identity issued elsewhere, or by tests
    /// (expired, from another CA).
    ///
    /// # Errors
    /// [`Error::Config`], [`Error::Verifier`].
    pub fn with_identity(roots: &[CertificateDer<'static>], identity: Identity) -> Result<Self, Error> {
        let lifetime = identity.not_after.duration_since(identity.not_before).unwrap_or_default();
        Self::build(roots, identity, None, lifetime)
    }

    fn build(
        roots: &[CertificateDer<'static>],
        identity: Identity,
        ca: Option<ClusterCa>,
        lifetime: Duration,
    ) -> Result<Self, Error> {
        let provider = provider();
        let mut store = RootCertStore::empty();
        for root in roots {
            store.add(root.clone()).map_err(|source| Error::Config { what: "the CA roots", source })?;
        }
        let store = Arc::new(store);
        let name = identity.name.clone();
        let (not_before, not_after) = (identity.not_before, identity.not_after);
        let current =
            Arc::new(Current { key: RwLock::new((certified(&provider, identity)?, not_before, not_after)) });
        let verifier = WebPkiClientVerifier::builder_with_provider(store.clone(), provider.clone())
            .build()
            .map_err(Error::Verifier)?;
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|source| Error::Config { what: "the server", source })?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(current.clone());
        let client = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|source| Error::Config { what: "the client", source })?
            .with_root_certificates(store)
            .with_client_cert_resolver(current.clone());
        Ok(Self {
            inner: Arc::new(Inner {
                name,
                ca,
                lifetime,
                provider,
                current,
                server: Arc::new(server),
                client: Arc::new(client),
            }),
        })
    }

    /// Who this identity is.
    pub fn name(&self) -> &PeerName {
        &self.inner.name
    }

    /// When the certificate in use stops being valid.
    pub fn not_after(&self) -> SystemTime {
        self.inner.current.validity().1
    }

    /// When the certificate in use should be replaced: at half its lifetime.
    pub fn renew_at(&self) -> SystemTime {
        let (from, until) = self.inner.current.validity();
        from + until.duration_since(from).unwrap_or_default() / 2
    }

    /// Issues a new certificate from the CA and uses it for every later handshake. Without a
    /// CA (a fixed identity) nothing changes.
    ///
    /// # Errors
    /// Those of [`ClusterCa::issue`], [`Error::Config`].
    pub fn renew(&self) -> Result<(), Error> {
        let Some(ca) = &self.inner.ca else { return Ok(()) };
        let identity = ca.issue(&self.inner.name, self.inner.lifetime)?;
        let (from, until) = (identity.not_before, identity.not_after);
        let key = certified(&self.inner.provider, identity)?;
        self.inner.current.set(key, from, until);
        Ok(())
    }

    /// Re-issues the certificate at each half-life, for as long as the returned task runs
    /// (abort it to stop). A failure is logged and retried a minute later.
    pub fn spawn_renewal(&self) -> tokio::task::JoinHandle<()> {
        let tls = self.clone();
        tokio::spawn(async move {
            loop {
                let wait = tls.renew_at().duration_since(SystemTime::now()).unwrap_or_default();
                tokio::time::sleep(wait).await;
                match tls.renew() {
                    Ok(()) => tracing::info!(identity = %tls.name(), "peer certificate re-issued"),
                    Err(e) => {
                        tracing::warn!(identity = %tls.name(), error = %crate::migration::error::chain(&e), "cannot re-issue the peer certificate; trying again in a minute");
                        tokio::time::sleep(RENEW_RETRY).await;
                    }
                }
            }
        })
    }

    /// The client side of a handshake over `stream` with the agent of `node`: this identity's
    /// certificate, and the server's must chain to the CA and name `<node>.agent.katamaran.io`.
    ///
    /// # Errors
    /// [`Error::InvalidName`], [`Error::Handshake`] (the reason as its source: e.g. the
    /// certificate names another node, or chains to another CA), [`Error::HandshakeTimeout`].
    pub async fn connect<S>(&self, stream: S, node: &str) -> Result<client::TlsStream<S>, Error>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let expected = PeerName::node(node)?.dns_name();
        let me = self.inner.name.dns_name();
        let server_name = ServerName::try_from(expected.clone())
            .map_err(|_| Error::InvalidName { name: node.to_owned(), why: "it does not make a DNS name" })?;
        let connect = TlsConnector::from(self.inner.client.clone()).connect(server_name, stream);
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, connect).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(source)) => Err(Error::Handshake { me, peer: expected, source }),
            Err(_) => Err(Error::HandshakeTimeout { me, peer: expected, timeout: HANDSHAKE_TIMEOUT }),
        }
    }

    /// The server side of a handshake over `stream` from `peer` (an address, for messages): the
    /// client must present a certificate that chains to the CA.
    ///
    /// # Errors
    /// [`Error::Handshake`] (the reason as its source: no certificate, another CA, expired),
    /// [`Error::HandshakeTimeout`].
    pub async fn accept<S>(&self, stream: S, peer: &str) -> Result<server::TlsStream<S>, Error>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let me = self.inner.name.dns_name();
        let accept = TlsAcceptor::from(self.inner.server.clone()).accept(stream);
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(source)) => Err(Error::Handshake { me, peer: peer.to_owned(), source }),
            Err(_) => Err(Error::HandshakeTimeout { me, peer: peer.to_owned(), timeout: HANDSHAKE_TIMEOUT }),
        }
    }
}

/// The DNS names of a connection's peer certificate, for logs.
pub fn peer_names(certs: Option<&[CertificateDer<'_>]>) -> Vec<String> {
    let Some(leaf) = certs.and_then(<[_]>::first) else { return Vec::new() };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf) else { return Vec::new() };
    let Ok(Some(san)) = cert.subject_alternative_name() else { return Vec::new() };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Some((*d).to_owned()),
            _ => None,
        })
        .collect()
}

/// The accept loop behind [`authenticated`]: stops when dropped; counts what it refused.
#[derive(Debug)]
pub struct Acceptor {
    task: tokio::task::JoinHandle<()>,
    stats: Arc<Stats>,
}

#[derive(Debug, Default)]
struct Stats {
    refused: AtomicU64,
    dropped: AtomicU64,
}

impl Acceptor {
    /// Connections whose handshake failed or timed out.
    pub fn refused(&self) -> u64 {
        self.stats.refused.load(Ordering::Relaxed)
    }

    /// Connections closed unread because [`MAX_HANDSHAKES`] were in progress.
    pub fn dropped(&self) -> u64 {
        self.stats.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Runs the server side of the handshake on every connection `incoming` yields (with the
/// peer's address), at most [`MAX_HANDSHAKES`] at once, each within [`HANDSHAKE_TIMEOUT`], and
/// yields only the authenticated streams — for `ttrpc::r#async::transport::Listener::new`, so
/// that no byte of an unauthenticated connection reaches ttrpc. A failed handshake is logged
/// with its reason and counted; a connection past the cap is closed at once.
pub fn authenticated<S, I>(
    incoming: I,
    tls: PeerTls,
) -> (impl Stream<Item = std::io::Result<server::TlsStream<S>>> + Send + 'static, Acceptor)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    I: Stream<Item = (S, String)> + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let stats = Arc::new(Stats::default());
    let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    let counted = stats.clone();
    let task = tokio::spawn(async move {
        let mut incoming = std::pin::pin!(incoming);
        while let Some((stream, peer)) = incoming.next().await {
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                counted.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%peer, "{MAX_HANDSHAKES} TLS handshakes in progress: control connection closed");
                continue;
            };
            let (tls, tx, counted) = (tls.clone(), tx.clone(), counted.clone());
            tokio::spawn(async move {
                let _slot = slot;
                match tls.accept(stream, &peer).await {
                    Ok(s) => {
                        let names = peer_names(s.get_ref().1.peer_certificates());
                        tracing::debug!(%peer, ?names, "control connection authenticated");
                        // The server is gone when nobody receives: the connection just closes.
                        let _ = tx.send(Ok(s));
                    }
                    Err(e) => {
                        counted.refused.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(%peer, error = %crate::migration::error::chain(&e), "control connection refused");
                    }
                }
            });
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|s| (s, rx)) });
    (stream, Acceptor { task, stats })
}

/// The connections of a TCP listener with their peer's address, for [`authenticated`]. An
/// accept error (e.g. out of descriptors) is logged and retried after a short pause.
pub fn tcp_connections(
    listener: tokio::net::TcpListener,
) -> impl Stream<Item = (tokio::net::TcpStream, String)> + Send + 'static {
    futures::stream::unfold(listener, |listener| async move {
        loop {
            match listener.accept().await {
                Ok((s, addr)) => return Some(((s, addr.to_string()), listener)),
                Err(e) => {
                    tracing::warn!(error = %e, "control listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })
}
