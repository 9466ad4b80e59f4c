#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::*;

const DAY: Duration = Duration::from_secs(24 * 3600);

fn node(name: &str) -> PeerName {
    PeerName::node(name).unwrap()
}

fn agent(ca: &ClusterCa, name: &str) -> PeerTls {
    let ca = ClusterCa::from_pem(ca.cert_pem(), ca.key_pem(), "test CA").unwrap();
    PeerTls::issue(ca, node(name), NODE_CERT_LIFETIME).unwrap()
}

/// The client's and the server's results of one handshake over an in-memory pipe.
async fn handshake(
    client: &PeerTls,
    expect: &str,
    server: &PeerTls,
) -> (
    Result<tokio_rustls::client::TlsStream<DuplexStream>, Error>,
    Result<tokio_rustls::server::TlsStream<DuplexStream>, Error>,
) {
    let (c, s) = tokio::io::duplex(1 << 16);
    tokio::join!(client.connect(c, expect), server.accept(s, "test peer"))
}

fn chain(e: &Error) -> String {
    crate::migration::error::chain(e)
}

#[tokio::test]
async fn node_a_reaches_node_b_and_bytes_flow_both_ways() {
    let ca = ClusterCa::generate(DAY).unwrap();
    let (a, b) = (agent(&ca, "node-a"), agent(&ca, "node-b"));
    let (c, s) = handshake(&a, "node-b", &b).await;
    let (mut c, mut s) = (c.unwrap(), s.unwrap());
    // The server knows who called.
    assert_eq!(peer_names(s.get_ref().1.peer_certificates()), vec!["node-a.agent.katamaran.io"]);
    assert_eq!(peer_names(c.get_ref().1.peer_certificates()), vec!["node-b.agent.katamaran.io"]);
    c.write_all(b"ping from node-a").await.unwrap();
    c.flush().await.unwrap();
    let mut buf = [0u8; 16];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping from node-a");
    s.write_all(b"pong").await.unwrap();
    s.flush().await.unwrap();
    let mut buf = [0u8; 4];
    c.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");
}

#[tokio::test]
async fn an_administrator_reaches_a_node() {
    let ca = ClusterCa::generate(DAY).unwrap();
    let b = agent(&ca, "node-b");
    let admin = PeerTls::issue(
        ClusterCa::from_pem(ca.cert_pem(), ca.key_pem(), "ca").unwrap(),
        PeerName::Admin,
        ADMIN_CERT_LIFETIME,
    )
    .unwrap();
    let (c, s) = handshake(&admin, "node-b", &b).await;
    c.unwrap();
    assert_eq!(peer_names(s.unwrap().get_ref().1.peer_certificates()), vec![ADMIN_NAME]);
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let ca = ClusterCa::generate(DAY).unwrap();
    let b = agent(&ca, "node-b");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.roots()[0].clone()).unwrap();
    let config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    let (c, s) = tokio::io::duplex(1 << 16);
    let name = ServerName::try_from("node-b.agent.katamaran.io").unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let (client, server) = tokio::join!(connector.connect(name, c), b.accept(s, "10.0.0.9:4242"));
    let e = server.unwrap_err();
    let msg = chain(&e);
    assert!(msg.contains("no certificates"), "{msg}");
    assert!(msg.contains("10.0.0.9:4242") && msg.contains("node-b.agent.katamaran.io"), "{msg}");
    // TLS 1.3: the client learns it from the server's alert, at its first read.
    if let Ok(mut client) = client {
        let mut buf = [0u8; 1];
        let read = client.read(&mut buf).await;
        assert!(!matches!(read, Ok(n) if n > 0), "{read:?}");
    }
}

#[tokio::test]
async fn a_client_of_another_ca_is_refused() {
    let ca = ClusterCa::generate(DAY).unwrap();
    let other = ClusterCa::generate(DAY).unwrap();
    let b = agent(&ca, "node-b");
    // node-a's identity from another CA, trusting the right one so that only the server objects.
    let identity = other.issue(&node("node-a"), DAY).unwrap();
    let a = PeerTls::with_identity(ca.roots(), identity).unwrap();
    let (_, s) = handshake(&a, "node-b", &b).await;
    let msg = chain(&s.unwrap_err());
    assert!(msg.contains("invalid peer certificate") && msg.contains("UnknownIssuer"), "{msg}");
}

#[tokio::test]
async fn a_server_presenting_another_nodes_certificate_is_refused() {
    let ca = ClusterCa::generate(DAY).unwrap();
    let (a, c) = (agent(&ca, "node-a"), agent(&ca, "node-c"));
    let (client, _) = handshake(&a, "node-b", &c).await;
    let e = client.unwrap_err();
    let msg = chain(&e);
    assert!(
        msg.contains("node-b.agent.katamaran.io") && msg.contains("not valid for name"),
        "the error names the node expected and the reason: {msg}"
    );
    assert!(msg.contains("node-c.agent.katamaran.io"), "and what the server presented: {msg}");
}

#[tokio::test]
async fn a_server_of_another_ca_is_refused() {
    let ca = ClusterCa::generate(DAY).unwrap();
    let other = ClusterCa::generate(DAY).unwrap();
    let a = agent(&ca, "node-a");
    let impostor = agent(&other, "node-b");
    let (client, _) = handshake(&a, "node-b", &impostor).await;
    let msg = chain(&client.unwrap_err());
    assert!(msg.contains("node-b.agent.katamaran.io") && msg.contains("UnknownIssuer"), "{msg}");
}

#[tokio::test]
async fn an_expired_certificate_is_refused_on_either_side() {
    let ca = ClusterCa::generate(DAY).unwrap();
    let now = SystemTime::now();
    let expired = |name: &str| {
        let id = ca.issue_between(&node(name), now - 2 * DAY, now - DAY).unwrap();
        PeerTls::with_identity(ca.roots(), id).unwrap()
    };
    let (a, b) = (agent(&ca, "node-a"), agent(&ca, "node-b"));
    let (client, _) = handshake(&a, "node-b", &expired("node-b")).await;
    let msg = chain(&client.unwrap_err());
    assert!(
        msg.contains("invalid peer certificate") && msg.contains("certificate expired"),
        "server's expired: {msg}"
    );
    let (_, server) = handshake(&expired("node-a"), "node-b", &b).await;
    let msg = chain(&server.unwrap_err());
    assert!(
        msg.contains("invalid peer certificate") && msg.contains("certificate expired"),
        "client's expired: {msg}"
    );
}

#[tokio::test]
async fn a_bundle_of_two_cas_trusts_both_and_the_keys_ca_signs() {
    let old = ClusterCa::generate(DAY).unwrap();
    let new = ClusterCa::generate(DAY).unwrap();
    let bundle = format!("{}{}", old.cert_pem(), new.cert_pem());
    // Step 1 of a rotation: both trusted, the old key signs; step 2: the new key signs.
    for (key, signer) in [(old.key_pem(), &old), (new.key_pem(), &new)] {
        let ca = ClusterCa::from_pem(&bundle, key, "bundle").unwrap();
        assert_eq!(ca.roots().len(), 2);
        let b = PeerTls::issue(ca, node("node-b"), DAY).unwrap();
        for (issuer, name) in [(&old, "old"), (&new, "new")] {
            let a = PeerTls::with_identity(
                &[issuer.roots()[0].clone(), signer.roots()[0].clone()],
                issuer.issue(&node("node-a"), DAY).unwrap(),
            )
            .unwrap();
            let (c, s) = handshake(&a, "node-b", &b).await;
            assert!(c.is_ok() && s.is_ok(), "a client of the {name} CA: {:?} {:?}", c.err(), s.err());
        }
        // An agent that trusts only the signer's CA accepts the bundle agent's certificate.
        let only =
            PeerTls::with_identity(signer.roots(), signer.issue(&node("node-a"), DAY).unwrap()).unwrap();
        let (c, _) = handshake(&only, "node-b", &b).await;
        assert!(c.is_ok(), "{:?}", c.err());
    }
    let stranger = ClusterCa::generate(DAY).unwrap();
    let e = ClusterCa::from_pem(&bundle, stranger.key_pem(), "bundle").unwrap_err();
    assert!(matches!(e, Error::KeyMismatch { count: 2, .. }), "{e}");
}

#[test]
fn bad_ca_input_is_named() {
    let ca = ClusterCa::generate(DAY).unwrap();
    let e = ClusterCa::from_pem("", ca.key_pem(), "/etc/katamaran/ca").unwrap_err();
    assert_eq!(e.to_string(), "/etc/katamaran/ca: no certificate in it");
    let e = ClusterCa::from_pem(ca.cert_pem(), "not a key", "/etc/katamaran/ca").unwrap_err();
    assert!(matches!(e, Error::Key { .. }), "{e}");
    // A certificate that is no CA, with its key.
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["node-a.agent.katamaran.io".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let e = ClusterCa::from_pem(&leaf.pem(), &key.serialize_pem(), "leaf").unwrap_err();
    assert!(matches!(e, Error::NotCa { .. }), "{e}");
}

#[test]
fn node_names_are_checked_before_naming_a_certificate() {
    for good in ["node-a", "ip-10-0-0-12.eu-west-1.compute.internal", "a", &"a".repeat(63)] {
        assert!(PeerName::node(good).is_ok(), "{good}");
    }
    for (bad, why) in [
        ("", "empty"),
        ("Node-A", "DNS-1123"),
        ("node_a", "DNS-1123"),
        ("-node", "DNS-1123"),
        ("node.", "DNS-1123"),
        ("a..b", "DNS-1123"),
        (&"a".repeat(64), "DNS-1123"),
        (&["abc"; 60].join("."), "longer than 234"),
    ] {
        let e = PeerName::node(bad).unwrap_err().to_string();
        assert!(e.contains(why) && e.contains("cannot name a peer certificate"), "{bad:?}: {e}");
    }
    assert_eq!(node("node-a").dns_name(), "node-a.agent.katamaran.io");
    assert_eq!(PeerName::Admin.to_string(), "admin.katamaran.io");
}

#[tokio::test]
async fn a_renewed_certificate_serves_the_next_handshake() {
    let ca = ClusterCa::generate(DAY).unwrap();
    let (a, b) = (agent(&ca, "node-a"), agent(&ca, "node-b"));
    let first = b.not_after();
    let half = b.renew_at().duration_since(SystemTime::now() - CLOCK_SKEW).unwrap();
    assert!(
        half > NODE_CERT_LIFETIME / 2 - Duration::from_secs(60)
            && half <= NODE_CERT_LIFETIME / 2 + CLOCK_SKEW,
        "{half:?}"
    );
    let (_, s) = handshake(&a, "node-b", &b).await;
    let before = s.unwrap().get_ref().1.peer_certificates().unwrap()[0].clone();
    std::thread::sleep(Duration::from_millis(1100));
    b.renew().unwrap();
    assert!(b.not_after() > first);
    let (c, _) = handshake(&a, "node-b", &b).await;
    let after = c.unwrap().get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_ne!(before, after, "the new certificate is presented");
}

#[tokio::test]
async fn only_authenticated_streams_come_out_of_the_acceptor() {
    let ca = ClusterCa::generate(DAY).unwrap();
    let (a, b) = (agent(&ca, "node-a"), agent(&ca, "node-b"));
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<(DuplexStream, String)>();
    let incoming = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|s| (s, rx)) });
    let (streams, acceptor) = authenticated(incoming, b);
    let mut streams = std::pin::pin!(streams);
    // A plain client: bytes that are no TLS.
    let (mut plain, far) = tokio::io::duplex(1 << 16);
    tx.send((far, "plain".into())).unwrap();
    plain.write_all(b"\0\0\0\x10plain ttrpc frame").await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), plain.read(&mut buf)).await.unwrap();
    // Closed, or a TLS alert: never an answer from the service.
    assert!(matches!(n, Ok(0) | Err(_)) || buf[0] == 0x15, "{n:?} {:?}", &buf[..8]);
    // A peer.
    let (near, far) = tokio::io::duplex(1 << 16);
    tx.send((far, "peer".into())).unwrap();
    let (client, accepted) = tokio::join!(a.connect(near, "node-b"), streams.next());
    client.unwrap();
    let accepted = accepted.unwrap().unwrap();
    assert_eq!(peer_names(accepted.get_ref().1.peer_certificates()), vec!["node-a.agent.katamaran.io"]);
    assert_eq!((acceptor.refused(), acceptor.dropped()), (1, 0));
}

#[test]
fn the_secret_manifest_and_the_files_hold_the_ca() {
    let ca = ClusterCa::generate(DAY).unwrap();
    let yaml = ca.secret_manifest("katamaran-system");
    let doc: serde_json::Value = serde_saphyr::from_str(&yaml).unwrap();
    assert_eq!(doc["kind"], "Secret");
    assert_eq!(doc["type"], "Opaque");
    assert_eq!(doc["metadata"]["name"], CA_SECRET);
    assert_eq!(doc["metadata"]["namespace"], "katamaran-system");
    let crt = doc["stringData"][CA_CERT_FILE].as_str().unwrap();
    let key = doc["stringData"][CA_KEY_FILE].as_str().unwrap();
    let back = ClusterCa::from_pem(crt, key, "manifest").unwrap();
    assert_eq!(back.roots(), ca.roots());

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ca");
    ca.write_dir(&out).unwrap();
    use std::os::unix::fs::PermissionsExt;
    for f in [CA_CERT_FILE, CA_KEY_FILE] {
        let mode = std::fs::metadata(out.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
    assert_eq!(ClusterCa::load(&out).unwrap().roots(), ca.roots());
    let e = ca.write_dir(&out).unwrap_err();
    assert!(matches!(e, Error::Write { .. }), "an existing CA is never replaced: {e}");
    let e = ClusterCa::load(dir.path()).unwrap_err();
    assert!(e.to_string().contains("ca.crt"), "{e}");
}
