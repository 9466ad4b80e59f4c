//! The node agent's TCP control endpoint serves mutual TLS only: `serve()` with a real
//! `MigrationService` over an engine under a temporary root (no root privileges needed), a plain
//! ttrpc client gets no answer, a peer gets one, and a caller expecting another node refuses.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use katamaran::cluster::transport::{Agent, Error as TransportError};
use katamaran::node::{Node, NodeConfig};
use katamaran::peer::{ClusterCa, PeerName, PeerTls, NODE_CERT_LIFETIME};
use katamaran::sandbox::NodeLayout;
use katamaran::service::{serve, Endpoint, MigrationService};
use katamaran_protos::ttrpc::context;
use katamaran_protos::ttrpc::r#async::transport::Socket;
use katamaran_protos::ttrpc::r#async::Client;
use katamaran_protos::v1 as pb;

fn identity(ca: &ClusterCa, name: PeerName) -> PeerTls {
    let ca = ClusterCa::from_pem(ca.cert_pem(), ca.key_pem(), "test CA").unwrap();
    PeerTls::issue(ca, name, NODE_CERT_LIFETIME).unwrap()
}

#[tokio::test]
async fn only_peers_reach_the_service_over_tcp() {
    let root = tempfile::tempdir().unwrap();
    let node = Arc::new(Node::new(NodeConfig::new(NodeLayout::under(root.path()))).unwrap());
    let ca = ClusterCa::generate(Duration::from_secs(3600)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(
        MigrationService::new(node),
        vec![Endpoint::Tcp { listener, tls: identity(&ca, PeerName::node("node-b").unwrap()) }],
        async {
            let _ = stopped.await;
        },
    ));

    // Plain ttrpc over TCP, as before this endpoint spoke TLS: no answer, whatever it waits.
    let plain = tokio::net::TcpStream::connect(addr).await.unwrap();
    let client = pb::MigrationClient::new(Client::new(Socket::new(plain)));
    let r = client
        .list_sandboxes(context::with_duration(Duration::from_secs(12)), &pb::ListSandboxesRequest::new())
        .await;
    assert!(r.is_err(), "a plain client was answered: {r:?}");

    // A peer (node-a) that expects node-b: answered by the real service.
    let a = identity(&ca, PeerName::node("node-a").unwrap());
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let agent = Agent::over_tls_stream(stream, "node-b", &a).await.unwrap();
    assert_eq!(agent.list_sandboxes().await.unwrap().len(), 0, "an empty node under the temporary root");

    // An administrator's identity from the same CA is a peer too.
    let admin = identity(&ca, PeerName::Admin);
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let agent = Agent::over_tls_stream(stream, "node-b", &admin).await.unwrap();
    agent.list_sandboxes().await.unwrap();

    // node-a resolved node-c, and node-b's agent answered: refused by the caller, named.
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let e = Agent::over_tls_stream(stream, "node-c", &a).await.unwrap_err();
    assert!(matches!(e, TransportError::Tls { .. }), "{e:?}");
    let msg = katamaran::migration::error::chain(&e);
    assert!(
        msg.starts_with("mutual TLS with the katamaran agent of node node-c failed")
            && msg.contains("not valid for name \"node-c.agent.katamaran.io\""),
        "{msg}"
    );

    // A client of another CA: its handshake is refused by the server; no RPC is answered.
    let other = ClusterCa::generate(Duration::from_secs(3600)).unwrap();
    let stranger = PeerTls::with_identity(
        ca.roots(),
        other.issue(&PeerName::node("node-a").unwrap(), NODE_CERT_LIFETIME).unwrap(),
    )
    .unwrap();
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    // TLS 1.3: the client finishes its side before the server has checked its certificate.
    if let Ok(agent) = Agent::over_tls_stream(stream, "node-b", &stranger).await {
        let e = agent.list_sandboxes().await.unwrap_err();
        assert_eq!(e.code(), None, "a transport failure, not an answer: {e}");
    }

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), server).await.unwrap().unwrap().unwrap();
}
