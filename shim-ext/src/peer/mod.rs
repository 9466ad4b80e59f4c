//! Agents authenticate each other: mutual TLS on the control path, from one cluster CA.
//!
//! ```text
//!  katamaran-agent ca init ──▶ Secret katamaran-agent-ca {ca.crt, ca.key}   (cluster admin)
//!          │ mounted read-only (0400) by every agent at --peer-ca-dir
//!          ▼
//!  agent on node-a: issues itself  node-a.agent.katamaran.io  (24 h, re-issued at half-life)
//!  agent on node-b: issues itself  node-b.agent.katamaran.io
//!  kubectl migrate --direct: reads the Secret (get secrets), mints admin.katamaran.io (1 h)
//!
//!  node-a ── pods/portforward ──▶ 127.0.0.1:10555 in node-b's agent pod
//!    TLS 1.3: node-b's server verifies node-a's certificate chains to the CA (else: no ttrpc);
//!             node-a verifies the server's chains to the CA AND names node-b.agent.katamaran.io
//! ```
//!
//! Whoever holds the CA key is a peer: it can mint any node's identity. The key is in one Secret
//! of `katamaran-system`, readable by cluster administrators and mounted by the agents only
//! (docs/SECURITY.md, "Agents authenticate each other").
//!
//! `ca.crt` may hold several CA certificates (a rotation: old and new); all are trusted, and the
//! one whose public key matches `ca.key` signs. [`ClusterCa`] owns the CA, [`PeerTls`] an
//! identity with its rustls configurations (certificates hot-swapped when re-issued), and
//! [`authenticated`] turns a stream of connections into a stream of authenticated TLS streams
//! (deadline and cap on the handshakes) for the ttrpc server.

mod ca;
mod tls;

#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::time::Duration;

pub use ca::{ClusterCa, Identity};
pub use tls::{authenticated, peer_names, tcp_connections, Acceptor, PeerTls};

/// The Secret holding the CA (`kubectl migrate --direct` reads it; the agents mount it).
pub const CA_SECRET: &str = "katamaran-agent-ca";
/// The CA certificate(s) in the Secret and in `--peer-ca-dir`: PEM, one or more.
pub const CA_CERT_FILE: &str = "ca.crt";
/// The CA's private key (PKCS#8 PEM) in the Secret and in `--peer-ca-dir`.
pub const CA_KEY_FILE: &str = "ca.key";
/// DNS suffix of node identities: `<node>.agent.katamaran.io`.
pub const NODE_DOMAIN: &str = "agent.katamaran.io";
/// The identity of cluster administrators' clients (`kubectl migrate --direct`).
pub const ADMIN_NAME: &str = "admin.katamaran.io";
/// Lifetime of an agent's certificate; it is re-issued at half-life.
pub const NODE_CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Lifetime of an administrator's client certificate (one `--direct` run).
pub const ADMIN_CERT_LIFETIME: Duration = Duration::from_secs(3600);
/// Default lifetime of a CA made by `katamaran-agent ca init` (`--days`).
pub const DEFAULT_CA_DAYS: u32 = 3650;
/// How long a peer has to complete the TLS handshake (as the data listener's handshake).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes in progress on one listener. Each holds a socket and a task for at most
/// [`HANDSHAKE_TIMEOUT`]; legitimate callers are a handful of agents and administrators, each
/// handshake one round trip through the API server, so 64 is far above need and far below a
/// default `RLIMIT_NOFILE` of 1024.
pub const MAX_HANDSHAKES: usize = 64;
/// How early a certificate is valid, for clocks a little behind the issuer's.
pub const CLOCK_SKEW: Duration = Duration::from_secs(300);

/// Who a certificate names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerName {
    /// A node's agent: `<node>.agent.katamaran.io`.
    Node(String),
    /// A cluster administrator's client: `admin.katamaran.io`.
    Admin,
}

impl PeerName {
    /// The identity of node `name`'s agent.
    ///
    /// # Errors
    /// [`Error::InvalidName`] when `name` is not a DNS-1123 subdomain that fits in a DNS name
    /// with [`NODE_DOMAIN`].
    pub fn node(name: &str) -> Result<Self, Error> {
        check_node_name(name)?;
        Ok(Self::Node(name.to_owned()))
    }

    /// The DNS name the certificate carries (its subject alternative name).
    pub fn dns_name(&self) -> String {
        match self {
            Self::Node(n) => format!("{n}.{NODE_DOMAIN}"),
            Self::Admin => ADMIN_NAME.to_owned(),
        }
    }
}

impl std::fmt::Display for PeerName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.dns_name())
    }
}

/// Checks that `name` is a DNS-1123 subdomain (a Kubernetes node name) whose labels fit a DNS
/// name (at most 63 bytes each) and that leaves room for [`NODE_DOMAIN`] within 253 bytes.
///
/// # Errors
/// [`Error::InvalidName`] saying which rule failed.
pub fn check_node_name(name: &str) -> Result<(), Error> {
    let bad = |why: &'static str| Err(Error::InvalidName { name: name.to_owned(), why });
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() + 1 + NODE_DOMAIN.len() > 253 {
        return bad("it is longer than 234 characters");
    }
    if !name.split('.').all(label_ok) {
        return bad(
            "it is not a DNS-1123 subdomain (lowercase letters, digits, '-' and '.', labels of 1 to 63 \
             characters that start and end with a letter or digit)",
        );
    }
    Ok(())
}

/// A failure of the cluster CA, of an identity or of a TLS handshake.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A node name that cannot name a certificate.
    #[error("node name {name:?} cannot name a peer certificate: {why}")]
    InvalidName {
        /// The name given.
        name: String,
        /// The rule it breaks.
        why: &'static str,
    },
    /// A CA file could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A CA file could not be written.
    #[error("cannot write {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The certificate PEM holds no certificate, or one that cannot be parsed.
    #[error("{what}: {why}")]
    Certificate {
        /// Which input (a path, or "the CA certificate").
        what: String,
        /// What is wrong.
        why: String,
    },
    /// The key PEM is not a private key rcgen can sign with (PKCS#8, ECDSA P-256/P-384, Ed25519).
    #[error("{what} is not a usable private key")]
    Key {
        /// Which input.
        what: String,
        /// The parser's error.
        #[source]
        source: rcgen::Error,
    },
    /// The CA key belongs to none of the CA certificates.
    #[error(
        "{what}: the CA key matches none of its {count} certificate(s); the key must be the newest CA's \
         and its certificate must be in the bundle"
    )]
    KeyMismatch {
        /// Which input.
        what: String,
        /// Certificates in the bundle.
        count: usize,
    },
    /// The certificate that matches the key is not a CA certificate.
    #[error("{what}: the certificate of the CA key is not a CA (basicConstraints CA:TRUE missing)")]
    NotCa {
        /// Which input.
        what: String,
    },
    /// A certificate or key could not be generated.
    #[error("cannot generate {what}")]
    Generate {
        /// What was being generated.
        what: String,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
    /// The system's random source failed.
    #[error("no randomness for the CA's name: {0}")]
    Random(String),
    /// A validity period that cannot be expressed.
    #[error("validity of {what} is out of range")]
    Validity {
        /// What was being generated.
        what: String,
    },
    /// rustls refused the configuration (the key type, the roots).
    #[error("cannot build the TLS configuration for {what}")]
    Config {
        /// Server, client, or the roots.
        what: &'static str,
        /// rustls' error.
        #[source]
        source: rustls::Error,
    },
    /// The client verifier could not be built from the roots.
    #[error("cannot build the client certificate verifier")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    /// The TLS handshake failed; the source says why (rustls' reason or the transport's).
    #[error("TLS handshake as {me} with {peer}")]
    Handshake {
        /// This side's identity.
        me: String,
        /// The peer: the identity expected (client side) or its address (server side).
        peer: String,
        /// The reason.
        #[source]
        source: std::io::Error,
    },
    /// The handshake did not complete within [`HANDSHAKE_TIMEOUT`].
    #[error("TLS handshake as {me} with {peer} did not complete within {timeout:?}")]
    HandshakeTimeout {
        /// This side's identity.
        me: String,
        /// The peer.
        peer: String,
        /// The deadline.
        timeout: Duration,
    },
}
