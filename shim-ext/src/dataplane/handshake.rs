//! The data-stream handshake: a mutual HMAC-SHA256 challenge bound to a migration and a stream.
//!
//! ```text
//! server → client  "KMRD" v=1 server_nonce[32]
//! client → server  "KMRC" v=1 len(id) id len(stream) stream client_nonce[32] mac_c[32]
//! server → client  "KMRA" status [mac_s[32] if status = 0]
//!   mac_c = HMAC(secret, "katamaran/data/v1/client" ‖ server_nonce ‖ client_nonce ‖ len(id) id ‖ len(stream) stream)
//!   mac_s = HMAC(secret, "katamaran/data/v1/server" ‖ server_nonce ‖ client_nonce ‖ len(id) id ‖ len(stream) stream)
//! ```
//! Both nonces are fresh per connection, so a recorded handshake cannot be replayed, and each side
//! proves knowledge of the secret without sending it. Parsing is pure ([`parse_client_hello`]) and
//! fuzzed.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use super::Error;

/// Protocol version carried in both hellos.
pub const VERSION: u8 = 1;
/// Length of a nonce and of a MAC.
pub const NONCE_LEN: usize = 32;
const MAC_LEN: usize = 32;
/// Server hello length.
pub const SERVER_HELLO_LEN: usize = 4 + 1 + NONCE_LEN;
/// Longest client hello: two names of at most 255 bytes.
pub const MAX_CLIENT_HELLO_LEN: usize = 4 + 1 + 1 + 255 + 1 + 255 + NONCE_LEN + MAC_LEN;

/// Accept status codes.
pub mod status {
    /// Authenticated; the stream follows.
    pub const OK: u8 = 0;
    /// Unknown migration id, stream or wrong proof: deliberately one answer for all three.
    pub const REJECTED: u8 = 1;
}

/// A per-migration secret. Its `Debug` never shows the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

impl Secret {
    /// Wraps received bytes.
    ///
    /// # Errors
    /// [`Error::ShortSecret`] below 32 bytes.
    pub fn new(bytes: Vec<u8>) -> Result<Self, Error> {
        if bytes.len() < 32 {
            return Err(Error::ShortSecret(bytes.len()));
        }
        Ok(Self(bytes))
    }

    /// A fresh random 32-byte secret.
    ///
    /// # Errors
    /// [`Error::Random`] when the kernel has no randomness to give.
    pub fn generate() -> Result<Self, Error> {
        Ok(Self(random_bytes::<32>()?.to_vec()))
    }

    /// The bytes, to put in a request.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

/// Fills an array from the kernel's CSPRNG.
///
/// # Errors
/// [`Error::Random`].
pub fn random_bytes<const N: usize>() -> Result<[u8; N], Error> {
    let mut buf = [0u8; N];
    getrandom::fill(&mut buf).map_err(|e| Error::Random(e.to_string()))?;
    Ok(buf)
}

/// Which migration and which of its streams a connection carries.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamKey {
    /// The migration id.
    pub migration_id: String,
    /// `ram`, `multifd`, `nbd:<drive>`.
    pub stream: String,
}

impl std::fmt::Display for StreamKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.migration_id, self.stream)
    }
}

/// Checks a migration id: 1–64 bytes of `[A-Za-z0-9_.-]`.
///
/// # Errors
/// [`Error::InvalidName`].
pub fn validate_migration_id(id: &str) -> Result<(), Error> {
    validate(id, "migration id", 64, |c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Checks a stream name: 1–96 bytes of `[A-Za-z0-9_.:-]`.
///
/// # Errors
/// [`Error::InvalidName`].
pub fn validate_stream(stream: &str) -> Result<(), Error> {
    validate(stream, "stream name", 96, |c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | ':'))
}

fn validate(value: &str, what: &'static str, max: usize, ok: impl Fn(char) -> bool) -> Result<(), Error> {
    let why = if value.is_empty() {
        "empty"
    } else if value.len() > max {
        "too long"
    } else if !value.chars().all(ok) {
        "contains a character outside [A-Za-z0-9_.-:]"
    } else {
        return Ok(());
    };
    Err(Error::InvalidName { what, value: value.chars().take(80).collect(), why })
}

impl StreamKey {
    /// A validated key.
    ///
    /// # Errors
    /// [`Error::InvalidName`].
    pub fn new(migration_id: &str, stream: &str) -> Result<Self, Error> {
        validate_migration_id(migration_id)?;
        validate_stream(stream)?;
        Ok(Self { migration_id: migration_id.into(), stream: stream.into() })
    }
}

/// The server's opening message.
pub fn server_hello(nonce: &[u8; NONCE_LEN]) -> [u8; SERVER_HELLO_LEN] {
    let mut out = [0u8; SERVER_HELLO_LEN];
    out[..4].copy_from_slice(b"KMRD");
    out[4] = VERSION;
    out[5..].copy_from_slice(nonce);
    out
}

/// Parses the server hello into its nonce.
///
/// # Errors
/// [`Error::Protocol`] on a wrong magic or version.
pub fn parse_server_hello(buf: &[u8; SERVER_HELLO_LEN]) -> Result<[u8; NONCE_LEN], Error> {
    if &buf[..4] != b"KMRD" {
        return Err(Error::Protocol("peer is not a katamaran data listener".into()));
    }
    if buf[4] != VERSION {
        return Err(Error::Protocol(format!("unsupported version {} (this side speaks {VERSION})", buf[4])));
    }
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&buf[5..]);
    Ok(nonce)
}

fn mac(
    secret: &Secret,
    label: &[u8],
    server: &[u8; NONCE_LEN],
    client: &[u8; NONCE_LEN],
    key: &StreamKey,
) -> Hmac<Sha256> {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
    let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.expose()).unwrap_or_else(|_| unreachable!());
    m.update(label);
    m.update(server);
    m.update(client);
    for part in [key.migration_id.as_bytes(), key.stream.as_bytes()] {
        m.update(&[part.len() as u8]);
        m.update(part);
    }
    m
}

const CLIENT_LABEL: &[u8] = b"katamaran/data/v1/client";
const SERVER_LABEL: &[u8] = b"katamaran/data/v1/server";

/// Builds the client hello answering `server_nonce`.
pub fn client_hello(
    secret: &Secret,
    key: &StreamKey,
    server_nonce: &[u8; NONCE_LEN],
    client_nonce: &[u8; NONCE_LEN],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAX_CLIENT_HELLO_LEN);
    out.extend_from_slice(b"KMRC");
    out.push(VERSION);
    for part in [key.migration_id.as_bytes(), key.stream.as_bytes()] {
        out.push(part.len() as u8);
        out.extend_from_slice(part);
    }
    out.extend_from_slice(client_nonce);
    out.extend_from_slice(
        &mac(secret, CLIENT_LABEL, server_nonce, client_nonce, key).finalize().into_bytes(),
    );
    out
}

/// A parsed client hello whose MAC is not yet verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    /// The claimed stream.
    pub key: StreamKey,
    /// The client's nonce.
    pub client_nonce: [u8; NONCE_LEN],
    /// The client's proof.
    pub mac: [u8; MAC_LEN],
}

/// Outcome of feeding bytes to [`parse_client_hello`].
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed; at least this many in total.
    Incomplete(usize),
    /// A whole hello, and how many bytes it took.
    Complete(ClientHello, usize),
}

/// Parses a client hello from the start of `buf`.
///
/// # Errors
/// [`Error::Protocol`] on a wrong magic or version, [`Error::InvalidName`] on names that would not
/// pass validation.
pub fn parse_client_hello(buf: &[u8]) -> Result<Parsed, Error> {
    let need = |n: usize| if buf.len() < n { Some(Parsed::Incomplete(n)) } else { None };
    if let Some(p) = need(6) {
        return Ok(p);
    }
    if &buf[..4] != b"KMRC" {
        return Err(Error::Protocol("peer is not a katamaran data client".into()));
    }
    if buf[4] != VERSION {
        return Err(Error::Protocol(format!("unsupported version {} (this side speaks {VERSION})", buf[4])));
    }
    let id_len = usize::from(buf[5]);
    if let Some(p) = need(6 + id_len + 1) {
        return Ok(p);
    }
    let stream_len = usize::from(buf[6 + id_len]);
    let total = 6 + id_len + 1 + stream_len + NONCE_LEN + MAC_LEN;
    if let Some(p) = need(total) {
        return Ok(p);
    }
    let text = |range: std::ops::Range<usize>| {
        std::str::from_utf8(&buf[range]).map_err(|_| Error::Protocol("names must be UTF-8".into()))
    };
    let id = text(6..6 + id_len)?;
    let s0 = 7 + id_len;
    let stream = text(s0..s0 + stream_len)?;
    let key = StreamKey::new(id, stream)?;
    let n0 = s0 + stream_len;
    let mut client_nonce = [0u8; NONCE_LEN];
    client_nonce.copy_from_slice(&buf[n0..n0 + NONCE_LEN]);
    let mut mac = [0u8; MAC_LEN];
    mac.copy_from_slice(&buf[n0 + NONCE_LEN..total]);
    Ok(Parsed::Complete(ClientHello { key, client_nonce, mac }, total))
}

/// Verifies a client's proof in constant time.
pub fn verify_client(secret: &Secret, server_nonce: &[u8; NONCE_LEN], hello: &ClientHello) -> bool {
    mac(secret, CLIENT_LABEL, server_nonce, &hello.client_nonce, &hello.key).verify_slice(&hello.mac).is_ok()
}

/// The server's accept message proving it knows the secret too.
pub fn server_accept(secret: &Secret, server_nonce: &[u8; NONCE_LEN], hello: &ClientHello) -> Vec<u8> {
    let mut out = b"KMRA".to_vec();
    out.push(status::OK);
    out.extend_from_slice(
        &mac(secret, SERVER_LABEL, server_nonce, &hello.client_nonce, &hello.key).finalize().into_bytes(),
    );
    out
}

/// The server's refusal.
pub fn server_reject() -> [u8; 5] {
    [b'K', b'M', b'R', b'A', status::REJECTED]
}

/// Checks the server's accept (status already read as `OK`) against what the client sent.
pub fn verify_server(
    secret: &Secret,
    server_nonce: &[u8; NONCE_LEN],
    client_nonce: &[u8; NONCE_LEN],
    key: &StreamKey,
    proof: &[u8],
) -> bool {
    mac(secret, SERVER_LABEL, server_nonce, client_nonce, key).verify_slice(proof).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(b: u8) -> Secret {
        Secret::new(vec![b; 32]).expect("secret")
    }

    #[test]
    fn hello_round_trip_and_verification() {
        let key = StreamKey::new("m-1", "nbd:drive-0").expect("key");
        let (sn, cn) = ([1u8; 32], [2u8; 32]);
        let bytes = client_hello(&secret(7), &key, &sn, &cn);
        let Parsed::Complete(hello, used) = parse_client_hello(&bytes).expect("parse") else {
            panic!("incomplete")
        };
        assert_eq!(used, bytes.len());
        assert_eq!(hello.key, key);
        assert!(verify_client(&secret(7), &sn, &hello));
        assert!(!verify_client(&secret(8), &sn, &hello), "wrong secret");
        assert!(!verify_client(&secret(7), &[9u8; 32], &hello), "replayed against another nonce");
        let accept = server_accept(&secret(7), &sn, &hello);
        assert!(verify_server(&secret(7), &sn, &cn, &key, &accept[5..]));
        assert!(!verify_server(&secret(8), &sn, &cn, &key, &accept[5..]));
        let other = StreamKey::new("m-1", "ram").expect("key");
        assert!(!verify_server(&secret(7), &sn, &cn, &other, &accept[5..]), "bound to the stream");
    }

    #[test]
    fn partial_input_asks_for_more() {
        let key = StreamKey::new("m", "ram").expect("key");
        let bytes = client_hello(&secret(1), &key, &[0; 32], &[0; 32]);
        for cut in 0..bytes.len() {
            match parse_client_hello(&bytes[..cut]).expect("prefix is fine") {
                Parsed::Incomplete(n) => assert!(n > cut && n <= bytes.len(), "cut {cut} asks {n}"),
                Parsed::Complete(..) => panic!("complete at {cut}"),
            }
        }
    }

    #[test]
    fn bad_input_is_refused() {
        assert!(parse_client_hello(b"HTTP/1.1 200").is_err());
        let mut wrong_version = b"KMRC".to_vec();
        wrong_version.extend_from_slice(&[9, 0]);
        assert!(parse_client_hello(&wrong_version).expect_err("version").to_string().contains("version 9"));
        let mut bad_name = b"KMRC\x01\x03../\x03ram".to_vec();
        bad_name.extend_from_slice(&[0; 64]);
        assert!(matches!(parse_client_hello(&bad_name), Err(Error::InvalidName { .. })));
        assert!(parse_server_hello(&[0; SERVER_HELLO_LEN]).is_err());
    }

    #[test]
    fn names_and_secrets() {
        assert!(StreamKey::new("", "ram").is_err());
        assert!(StreamKey::new(&"a".repeat(65), "ram").is_err());
        assert!(StreamKey::new("ok", "nbd:drive-0").is_ok());
        assert!(StreamKey::new("ok", "a b").is_err());
        assert!(matches!(Secret::new(vec![0; 16]), Err(Error::ShortSecret(16))));
        let s = Secret::generate().expect("random");
        assert_eq!(s.expose().len(), 32);
        assert_ne!(s, Secret::generate().expect("random"));
        assert!(!format!("{s:?}").contains(&format!("{:?}", s.expose())));
    }
}
