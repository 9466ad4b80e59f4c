//! The fake API server answers kube-rs the way a real one does, so the plugin's tests exercise
//! the real client code: typed gets and lists, Status errors, and a port-forward carrying ttrpc.

#![allow(clippy::unwrap_used)]

mod support;

use k8s_openapi::api::core::v1::{Node, Pod};
use katamaran::peer::PeerName;
use katamaran_protos::ttrpc::r#async::transport::Socket;
use katamaran_protos::ttrpc::{self, context};
use katamaran_protos::v1::{ListSandboxesRequest, MigrationClient};
use kube::api::ListParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use support::{Cluster, Options};

async fn client(c: &Cluster) -> Client {
    let kubeconfig = Kubeconfig::read_from(&c.kubeconfig).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.unwrap();
    assert_eq!(config.default_namespace, "shop", "the context's namespace");
    Client::try_from(config).unwrap()
}

#[tokio::test]
async fn kube_reads_objects_lists_and_errors() {
    let c = Cluster::start(Options::default()).await;
    let client = client(&c).await;

    let nodes = Api::<Node>::all(client.clone()).list(&ListParams::default()).await.unwrap();
    assert_eq!(nodes.items.len(), 7);
    let pod = Api::<Pod>::namespaced(client.clone(), "shop").get("web-0").await.unwrap();
    assert_eq!(pod.spec.unwrap().runtime_class_name.as_deref(), Some(support::CLASS));

    let agents = Api::<Pod>::namespaced(client.clone(), support::AGENT_NS)
        .list(
            &ListParams::default()
                .labels("app.kubernetes.io/name=katamaran-agent")
                .fields("spec.nodeName=node-b"),
        )
        .await
        .unwrap();
    let names: Vec<_> = agents.items.iter().filter_map(|p| p.metadata.name.clone()).collect();
    assert_eq!(names, ["agent-b"]);

    match Api::<Pod>::namespaced(client, "shop").get("nope").await {
        Err(kube::Error::Api(s)) => {
            assert_eq!((s.code, s.reason.as_str()), (404, "NotFound"));
            assert_eq!(s.message, "pods \"nope\" not found");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_port_forward_carries_ttrpc_to_the_fake_agent() {
    let c = Cluster::start(Options::default()).await;
    let pods = Api::<Pod>::namespaced(client(&c).await, support::AGENT_NS);
    // Mutual TLS first, as node-a's agent serves it; an administrator's identity from the CA.
    let admin = support::identity(&c.ca, PeerName::Admin);
    let mut pf = pods.portforward("agent-a", &[10555]).await.unwrap();
    let stream = pf.take_stream(10555).unwrap();
    let stream = admin.connect(stream, "node-a").await.unwrap();
    let agent = MigrationClient::new(ttrpc::r#async::Client::new(Socket::new(stream)));
    let list = agent
        .list_sandboxes(context::with_duration(support::RUN_TIMEOUT), &ListSandboxesRequest::new())
        .await
        .unwrap();
    assert_eq!(list.sandboxes.len(), 1);
    assert_eq!(list.sandboxes[0].id, "3f2a9c");
    assert_eq!(c.calls(), ["node-a:ListSandboxes"]);

    // Plain ttrpc through the same port-forward: the agent's TLS front never answers it.
    let mut pf = pods.portforward("agent-a", &[10555]).await.unwrap();
    let stream = pf.take_stream(10555).unwrap();
    let agent = MigrationClient::new(ttrpc::r#async::Client::new(Socket::new(stream)));
    let r = agent
        .list_sandboxes(
            context::with_duration(std::time::Duration::from_secs(12)),
            &ListSandboxesRequest::new(),
        )
        .await;
    assert!(r.is_err(), "{r:?}");
    assert_eq!(c.calls(), ["node-a:ListSandboxes"], "the service never saw the plain call");

    // Nothing listening in the pod: the API server says so on the port's error channel.
    let mut pf = pods.portforward("agent-down", &[10555]).await.unwrap();
    let error = pf.take_error(10555).unwrap().await.unwrap();
    assert!(error.contains("connection refused"), "{error}");
}
