//! A fake Kubernetes API server on 127.0.0.1 speaking the JSON kube-rs reads: Pod, PodList (with
//! `labelSelector` and `fieldSelector=spec.nodeName=`), Node, NodeList, `Status` errors with the right
//! `code` and `reason`, and `pods/{name}/portforward` as the real API server serves it to
//! WebSocket clients: subprotocol `v4.channel.k8s.io`, each port a data channel (0) and an error
//! channel (1), each channel opened by a frame holding the port number (little endian), then
//! data frames prefixed with their channel byte.
//!
//! Behind a port-forward is an [`AgentBackend`]: an in-process fake agent, a real agent's unix
//! socket (the lab's `katamaran-agent node`, whose TCP listener sits in a node namespace the host
//! cannot reach), or nothing (kubelet's "connection refused" on the error channel).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use futures::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{
    HeaderValue, CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_PROTOCOL, UPGRADE,
};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{Node, Pod};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::net::{TcpListener, UnixStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// The subprotocol the API server picks among those kube-rs offers (v5 is not served for
/// port-forward).
const PORTFORWARD_PROTOCOL: &str = "v4.channel.k8s.io";

/// Where port-forward streams for one agent pod go.
#[derive(Debug, Clone)]
pub enum AgentBackend {
    /// An in-process fake agent: each stream is handed to its listener.
    InProcess(mpsc::UnboundedSender<DuplexStream>),
    /// A real agent serving its unix socket at this path: each stream is a new connection, as
    /// kubelet opens a new connection to the pod's port for each forwarded stream.
    Unix(PathBuf),
    /// Nothing listens in the pod: the API server reports a refused connection on the error
    /// channel, as kubelet does.
    Refused,
}

#[derive(Default)]
pub struct State {
    pub pods: Vec<Pod>,
    pub nodes: Vec<Node>,
    /// Agent pod name → what its port-forward leads to (a pod without an entry: refused).
    pub agents: HashMap<String, AgentBackend>,
    /// Answer 403 to port-forward requests (a user without `create pods/portforward`).
    pub forbid_portforward: bool,
    /// `METHOD path?query` of every request.
    pub requests: Vec<String>,
}

pub struct FakeApiServer {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn status(code: u16, reason: &str, message: String) -> Response<Full<Bytes>> {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code
    });
    json_response(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), &body)
}

fn json_response(code: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

fn query_param(query: &str, key: &str) -> Option<String> {
    url_decode_pairs(query).into_iter().find(|(k, _)| k == key).map(|(_, v)| v)
}

fn url_decode_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `a=b,c=d` equality selectors, the only kind the plugin sends.
fn matches_selector(selector: &str, get: impl Fn(&str) -> Option<String>) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|term| match term.split_once('=') {
        Some((k, v)) => get(k.trim_end_matches('=')).as_deref() == Some(v.trim_start_matches('=')),
        None => false,
    })
}

fn pod_field(p: &Pod, field: &str) -> Option<String> {
    match field {
        "spec.nodeName" => p.spec.as_ref().and_then(|s| s.node_name.clone()),
        "metadata.name" => p.metadata.name.clone(),
        _ => None,
    }
}

impl FakeApiServer {
    pub async fn start(state: State) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(state));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let state = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, std::convert::Infallible>(handle(state, req)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Self { addr, state, task }
    }

    /// A kubeconfig pointing at this server: context `fake` (namespace `shop`, the current one)
    /// and context `other` (namespace `default`).
    pub fn kubeconfig(&self) -> String {
        self.kubeconfig_with_namespace("shop")
    }

    /// [`Self::kubeconfig`] with `namespace` as the current context's namespace.
    pub fn kubeconfig_with_namespace(&self, namespace: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
             clusters:\n- name: fake\n  cluster:\n    server: http://{addr}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: tester\n    namespace: {namespace}\n\
             - name: other\n  context:\n    cluster: fake\n    user: tester\n    namespace: default\n\
             users:\n- name: tester\n  user: {{}}\n",
            addr = self.addr
        )
    }

    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }
}

fn handle(state: Arc<Mutex<State>>, mut req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let mut st = state.lock().unwrap();
    st.requests.push(format!("{} {path}?{query}", req.method()));
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match parts.as_slice() {
        ["api", "v1", "namespaces", ns, "pods", name] => {
            match st.pods.iter().find(|p| {
                p.metadata.namespace.as_deref() == Some(*ns) && p.metadata.name.as_deref() == Some(*name)
            }) {
                Some(p) => json_response(StatusCode::OK, &serde_json::to_value(p).unwrap()),
                None => status(404, "NotFound", format!("pods \"{name}\" not found")),
            }
        }
        ["api", "v1", "namespaces", ns, "pods"] => {
            let labels = query_param(&query, "labelSelector").unwrap_or_default();
            let fields = query_param(&query, "fieldSelector").unwrap_or_default();
            let items: Vec<serde_json::Value> = st
                .pods
                .iter()
                .filter(|p| p.metadata.namespace.as_deref() == Some(*ns))
                .filter(|p| {
                    matches_selector(&labels, |k| p.metadata.labels.as_ref().and_then(|l| l.get(k).cloned()))
                })
                .filter(|p| matches_selector(&fields, |k| pod_field(p, k)))
                .map(|p| serde_json::to_value(p).unwrap())
                .collect();
            json_response(
                StatusCode::OK,
                &json!({"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": items}),
            )
        }
        ["api", "v1", "nodes"] => {
            let items: Vec<serde_json::Value> =
                st.nodes.iter().map(|n| serde_json::to_value(n).unwrap()).collect();
            json_response(
                StatusCode::OK,
                &json!({"kind": "NodeList", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": items}),
            )
        }
        ["api", "v1", "nodes", name] => {
            match st.nodes.iter().find(|n| n.metadata.name.as_deref() == Some(*name)) {
                Some(n) => json_response(StatusCode::OK, &serde_json::to_value(n).unwrap()),
                None => status(404, "NotFound", format!("nodes \"{name}\" not found")),
            }
        }
        ["api", "v1", "namespaces", ns, "pods", name, "portforward"] => {
            if st.forbid_portforward {
                return status(
                    403,
                    "Forbidden",
                    format!(
                        "pods \"{name}\" is forbidden: User \"tester\" cannot create resource \"pods/portforward\" \
                         in API group \"\" in the namespace \"{ns}\""
                    ),
                );
            }
            if !st.pods.iter().any(|p| {
                p.metadata.namespace.as_deref() == Some(*ns) && p.metadata.name.as_deref() == Some(*name)
            }) {
                return status(404, "NotFound", format!("pods \"{name}\" not found"));
            }
            let Some(port) = query_param(&query, "ports").and_then(|p| p.parse::<u16>().ok()) else {
                return status(400, "BadRequest", "exactly one numeric port is served by this fake".into());
            };
            let backend = st.agents.get(*name).cloned().unwrap_or(AgentBackend::Refused);
            let pod = (*name).to_owned();
            drop(st);
            upgrade(&mut req, port, backend, pod)
        }
        _ => status(404, "NotFound", format!("the server could not find the requested resource ({path})")),
    }
}

fn upgrade(
    req: &mut Request<Incoming>,
    port: u16,
    backend: AgentBackend,
    pod: String,
) -> Response<Full<Bytes>> {
    let headers = req.headers();
    let is_ws = headers
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let offered = headers.get(SEC_WEBSOCKET_PROTOCOL).and_then(|v| v.to_str().ok()).unwrap_or("");
    let Some(key) = headers.get(SEC_WEBSOCKET_KEY).map(|k| derive_accept_key(k.as_bytes())) else {
        return status(400, "BadRequest", "missing Sec-WebSocket-Key".into());
    };
    if !is_ws || !offered.split(',').any(|p| p.trim() == PORTFORWARD_PROTOCOL) {
        return status(
            400,
            "BadRequest",
            format!("upgrade to websocket with {PORTFORWARD_PROTOCOL} required"),
        );
    }
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else { return };
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        forward(ws, port, backend, pod).await;
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(CONNECTION, "Upgrade")
        .header(UPGRADE, "websocket")
        .header(SEC_WEBSOCKET_ACCEPT, HeaderValue::from_str(&key).unwrap())
        .header(SEC_WEBSOCKET_PROTOCOL, PORTFORWARD_PROTOCOL)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

async fn forward<S>(ws: WebSocketStream<S>, port: u16, backend: AgentBackend, pod: String)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut tx, mut rx) = ws.split();
    let [lo, hi] = port.to_le_bytes();
    for channel in [0u8, 1] {
        if tx.send(Message::binary(vec![channel, lo, hi])).await.is_err() {
            return;
        }
    }
    let refused = match backend {
        AgentBackend::InProcess(sink) => {
            let (near, far) = tokio::io::duplex(1 << 20);
            if sink.send(far).is_err() {
                return;
            }
            relay(&mut tx, &mut rx, near).await;
            return;
        }
        AgentBackend::Unix(path) => match UnixStream::connect(&path).await {
            Ok(stream) => {
                relay(&mut tx, &mut rx, stream).await;
                return;
            }
            Err(e) => format!("failed to connect to {}: {e}", path.display()),
        },
        AgentBackend::Refused => format!("failed to connect to localhost:{port}: connection refused"),
    };
    let msg = format!("error forwarding port {port} to pod {pod}, uid : {refused}");
    let mut frame = vec![1u8];
    frame.extend_from_slice(msg.as_bytes());
    let _ = tx.send(Message::binary(frame)).await;
    let _ = tx.send(Message::Close(None)).await;
}

/// Copies channel 0 of the WebSocket to `pod` and `pod`'s bytes back as channel-0 frames.
async fn relay<T, R, P>(tx: &mut T, rx: &mut R, pod: P)
where
    T: futures::Sink<Message> + Unpin,
    R: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
    P: AsyncRead + AsyncWrite,
{
    let (mut read, mut write) = tokio::io::split(pod);
    let to_pod = async {
        while let Some(Ok(msg)) = rx.next().await {
            match msg {
                Message::Binary(b) if b.first() == Some(&0) && write.write_all(&b[1..]).await.is_err() => {
                    break
                }
                Message::Close(_) => break,
                _ => {}
            }
        }
        let _ = write.shutdown().await;
    };
    let from_pod = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let mut frame = Vec::with_capacity(n + 1);
                    frame.push(0u8);
                    frame.extend_from_slice(&buf[..n]);
                    if tx.send(Message::binary(frame)).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = tx.send(Message::Close(None)).await;
    };
    // Either direction ending ends the forward, as the API server drops the whole stream.
    tokio::select! {
        () = to_pod => {}
        () = from_pod => {}
    }
}
