//! A fake Kubernetes API server on 127.0.0.1 speaking the JSON kube-rs reads, faithful enough for
//! a controller:
//!
//! - any object of the types in [`store::TYPES`] (pods, nodes, events of both groups,
//!   namespaces, `migrations.katamaran.io`): get, list (label and field selectors), watch
//!   (history from a resourceVersion, 410 Gone past compaction, bookmarks), create, update,
//!   merge and JSON patches, delete with finalizers, the status subresource — see [`store`];
//! - `Status` errors with the right `code` and `reason`;
//! - authorization: with [`State::rbac`] set, a request carries a bearer token naming a user or
//!   ServiceAccount ([`State::tokens`]); RBAC from deploy/ decides per verb, resource,
//!   subresource and namespace; a denial is the API server's 403 — see [`rbac`]; impersonation
//!   headers (`Impersonate-User`, `-Group`, `-Uid`) are checked as the `impersonate` verb on
//!   users, groups and uids, then the request is the impersonated user's;
//! - `pods/{name}/portforward` as the real API server serves it to WebSocket clients:
//!   subprotocol `v4.channel.k8s.io`, each port a data channel (0) and an error channel (1), each
//!   channel opened by a frame holding the port number (little endian), then data frames
//!   prefixed with their channel byte. Authorized as `get` and `create` (Kubernetes ≥ 1.35).
//!
//! Behind a port-forward is an [`AgentBackend`]: an in-process fake agent, a real agent's unix
//! socket (the lab's `katamaran-agent node`, whose TCP listener sits in a node namespace the host
//! cannot reach), or nothing (kubelet's "connection refused" on the error channel).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::header::{
    HeaderValue, AUTHORIZATION, CONNECTION, CONTENT_TYPE, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY,
    SEC_WEBSOCKET_PROTOCOL, UPGRADE,
};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{Node, Pod, Secret};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::net::{TcpListener, UnixStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::discovery;
use super::rbac::{Attributes, Rbac, UserInfo};
use super::store::{self, ApiError, Change, Filter, PatchKind, ResourceType, Store};

/// The subprotocol the API server picks among those kube-rs offers (v5 is not served for
/// port-forward).
const PORTFORWARD_PROTOCOL: &str = "v4.channel.k8s.io";

pub type Body = BoxBody<Bytes, Infallible>;

/// Where port-forward streams for one agent pod go.
#[derive(Debug, Clone)]
pub enum AgentBackend {
    /// An in-process fake agent: each stream is handed to its listener.
    InProcess(mpsc::UnboundedSender<DuplexStream>),
    /// A real agent serving its unix socket at this path: each stream is a new connection, as
    /// kubelet opens a new connection to the pod's port for each forwarded stream.
    Unix(PathBuf),
    /// A real agent in a container: each stream is a new TCP connection to 127.0.0.1 and the
    /// requested port inside the container's network namespace (this path, e.g.
    /// `/proc/<task pid>/ns/net`), the way kubelet dials a pod's port-forward.
    PodNetns(PathBuf),
    /// Nothing listens in the pod: the API server reports a refused connection on the error
    /// channel, as kubelet does.
    Refused,
}

/// A TCP connection to `127.0.0.1:port` made from inside the network namespace at `netns` (the
/// socket stays in the namespace it was created in).
fn connect_in_netns(netns: &std::path::Path, port: u16) -> std::io::Result<tokio::net::TcpStream> {
    let stream = katamaran_e2e::netns::in_netns_at(netns, move || {
        let connect = || -> std::io::Result<std::net::TcpStream> {
            let s = std::net::TcpStream::connect_timeout(
                &SocketAddr::from(([127, 0, 0, 1], port)),
                Duration::from_secs(5),
            )?;
            s.set_nonblocking(true)?;
            Ok(s)
        };
        Ok(connect())
    })
    .map_err(std::io::Error::other)??;
    tokio::net::TcpStream::from_std(stream)
}

#[derive(Default)]
pub struct State {
    /// Seeded into [`Self::store`] when the server starts.
    pub pods: Vec<Pod>,
    /// Seeded into [`Self::store`] when the server starts.
    pub nodes: Vec<Node>,
    /// Seeded into [`Self::store`] when the server starts (the agents' CA).
    pub secrets: Vec<Secret>,
    /// Agent pod name → what its port-forward leads to (a pod without an entry: refused).
    pub agents: HashMap<String, AgentBackend>,
    /// Answer 403 to port-forward requests (a user without `create pods/portforward`).
    pub forbid_portforward: bool,
    /// `METHOD path?query` of every request.
    pub requests: Vec<String>,
    /// Every object.
    pub store: Store,
    /// When set, every request needs a token of [`Self::tokens`] and these rules decide.
    pub rbac: Option<Rbac>,
    /// Bearer token → who presents it.
    pub tokens: HashMap<String, UserInfo>,
    /// Who a request without a token is (else 401). kubectl sends no bearer token to a plain
    /// http server, so a kubectl test names its user here.
    pub anonymous: Option<UserInfo>,
    /// `user verb group/resource[/sub] namespace allowed|denied` of every decision.
    pub decisions: Vec<String>,
}

pub struct FakeApiServer {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
    more: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
        for t in self.more.lock().unwrap().iter() {
            t.abort();
        }
    }
}

/// Accepts HTTP connections on `listener` for the server's `state`.
fn serve(listener: TcpListener, state: Arc<Mutex<State>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let state = state.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(handle(state, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .with_upgrades()
                    .await;
            });
        }
    })
}

fn status(code: u16, reason: &str, message: String) -> Response<Body> {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code
    });
    json_response(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), &body)
}

fn error(e: &ApiError) -> Response<Body> {
    json_response(StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), &e.to_status())
}

fn json_response(code: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
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

impl FakeApiServer {
    pub async fn start(mut state: State) -> Self {
        let pods = store::find_type("", "v1", "pods").unwrap();
        let nodes = store::find_type("", "v1", "nodes").unwrap();
        for p in std::mem::take(&mut state.pods) {
            state.store.insert(&pods, serde_json::to_value(p).unwrap());
        }
        for n in std::mem::take(&mut state.nodes) {
            state.store.insert(&nodes, serde_json::to_value(n).unwrap());
        }
        let secrets = store::find_type("", "v1", "secrets").unwrap();
        for s in std::mem::take(&mut state.secrets) {
            state.store.insert(&secrets, serde_json::to_value(s).unwrap());
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(state));
        let task = serve(listener, state.clone());
        Self { addr, state, task, more: Mutex::new(Vec::new()) }
    }

    /// Serves the same objects on `listener` too (e.g. bound inside a lab namespace, where node
    /// agents reach it as they reach a cluster's API server); returns its address.
    pub fn also_serve_on(&self, listener: std::net::TcpListener) -> std::net::SocketAddr {
        listener.set_nonblocking(true).unwrap();
        let listener = TcpListener::from_std(listener).unwrap();
        let addr = listener.local_addr().unwrap();
        self.more.lock().unwrap().push(serve(listener, self.state.clone()));
        addr
    }

    /// A kubeconfig pointing at this server: context `fake` (namespace `shop`, the current one)
    /// and context `other` (namespace `default`).
    pub fn kubeconfig(&self) -> String {
        self.kubeconfig_with_namespace("shop")
    }

    /// [`Self::kubeconfig`] with `namespace` as the current context's namespace.
    pub fn kubeconfig_with_namespace(&self, namespace: &str) -> String {
        self.kubeconfig_for(namespace, None)
    }

    /// [`Self::kubeconfig`] with `namespace` as the current context's namespace and the user
    /// presenting `token`.
    pub fn kubeconfig_for(&self, namespace: &str, token: Option<&str>) -> String {
        Self::kubeconfig_at(self.addr, namespace, token)
    }

    /// [`Self::kubeconfig_for`] naming the server at `addr` (one of [`Self::also_serve_on`]'s).
    pub fn kubeconfig_at(addr: std::net::SocketAddr, namespace: &str, token: Option<&str>) -> String {
        let user = match token {
            Some(t) => format!("{{token: {t}}}"),
            None => "{}".to_owned(),
        };
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
             clusters:\n- name: fake\n  cluster:\n    server: http://{addr}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: tester\n    namespace: {namespace}\n\
             - name: other\n  context:\n    cluster: fake\n    user: tester\n    namespace: default\n\
             users:\n- name: tester\n  user: {user}\n"
        )
    }

    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }

    pub fn decisions(&self) -> Vec<String> {
        self.state.lock().unwrap().decisions.clone()
    }

    /// Sends a BOOKMARK with the current resource version to every watch that asked for them.
    pub fn bookmark(&self) {
        self.state.lock().unwrap().store.bookmark();
    }

    /// Forgets the watch history: watches from an older resource version get 410 Gone.
    pub fn compact(&self) {
        self.state.lock().unwrap().store.compact();
    }
}

/// The request's resource, as the API server's request-info resolver reads the path.
#[derive(Debug)]
struct Target {
    ty: ResourceType,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

fn target(path: &str) -> Result<Target, ApiError> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match parts.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => {
            return Err(ApiError::new(
                404,
                "NotFound",
                format!("the server could not find the requested resource ({path})"),
            ))
        }
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some((*ns).to_owned()), rest),
        _ => (None, rest),
    };
    let (plural, name, subresource) = match rest {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some((*name).to_owned()), None),
        [plural, name, sub] => (*plural, Some((*name).to_owned()), Some((*sub).to_owned())),
        _ => {
            return Err(ApiError::new(
                404,
                "NotFound",
                format!("the server could not find the requested resource ({path})"),
            ))
        }
    };
    let ty = store::find_type(group, version, plural).ok_or_else(|| {
        ApiError::new(404, "NotFound", format!("the server could not find the requested resource ({path})"))
    })?;
    if ty.namespaced == namespace.is_none() && name.is_some() {
        return Err(ApiError::new(
            404,
            "NotFound",
            format!("the server could not find the requested resource ({path})"),
        ));
    }
    match subresource.as_deref() {
        None => {}
        Some("status") if ty.status_subresource => {}
        Some("portforward") if ty.plural == "pods" => {}
        Some(_) => {
            return Err(ApiError::new(
                404,
                "NotFound",
                format!("the server could not find the requested resource ({path})"),
            ))
        }
    }
    Ok(Target { ty, namespace, name, subresource })
}

/// Who a request says it is: its bearer token and the impersonation headers
/// (`Impersonate-User`, `Impersonate-Group` (repeated), `Impersonate-Uid`).
#[derive(Debug, Clone, Default)]
pub struct Caller {
    pub token: Option<String>,
    pub as_user: Option<String>,
    pub as_groups: Vec<String>,
    pub as_uid: Option<String>,
}

impl Caller {
    fn of(headers: &hyper::HeaderMap) -> Self {
        let one = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        Self {
            token: one(AUTHORIZATION.as_str()).and_then(|v| v.strip_prefix("Bearer ").map(str::to_owned)),
            as_user: one("impersonate-user"),
            as_groups: headers
                .get_all("impersonate-group")
                .iter()
                .filter_map(|v| v.to_str().ok().map(str::to_owned))
                .collect(),
            as_uid: one("impersonate-uid"),
        }
    }
}

/// Authenticates the caller, then, when it impersonates, checks the `impersonate` verb on each
/// user, group and uid it asks for (as the API server does) and answers for the impersonated
/// user from there on.
fn authenticate(st: &mut State, rbac: &Rbac, who: &Caller) -> Result<UserInfo, ApiError> {
    let user = match &who.token {
        Some(t) => st.tokens.get(t).cloned(),
        None => st.anonymous.clone(),
    };
    let Some(user) = user else {
        return Err(ApiError::new(401, "Unauthorized", "Unauthorized"));
    };
    let Some(as_user) = &who.as_user else {
        if who.as_groups.is_empty() && who.as_uid.is_none() {
            return Ok(user);
        }
        return Err(ApiError::new(
            400,
            "BadRequest",
            "requested groups or uid impersonation without impersonating a user",
        ));
    };
    let mut asked = vec![("", "users", as_user.clone())];
    asked.extend(who.as_groups.iter().map(|g| ("", "groups", g.clone())));
    asked.extend(who.as_uid.iter().map(|u| ("authentication.k8s.io", "uids", u.clone())));
    for (group, resource, name) in asked {
        let attrs = Attributes {
            verb: "impersonate".into(),
            group: group.into(),
            resource: resource.into(),
            subresource: None,
            namespace: None,
            name: Some(name),
        };
        let allowed = rbac.allows(&user, &attrs);
        st.decisions.push(format!(
            "{} impersonate {resource} - {}",
            user.name,
            if allowed { "allowed" } else { "denied" }
        ));
        if !allowed {
            return Err(ApiError::new(403, "Forbidden", attrs.forbidden(&user)));
        }
    }
    let groups: Vec<&str> = who.as_groups.iter().map(String::as_str).collect();
    Ok(UserInfo::user(as_user, &groups))
}

/// Authenticates and authorizes one request of verb `verb`.
fn authorize(st: &mut State, who: &Caller, verb: &str, t: &Target) -> Result<(), ApiError> {
    let Some(rbac) = st.rbac.clone() else { return Ok(()) };
    let user = authenticate(st, &rbac, who)?;
    let attrs = Attributes {
        verb: verb.to_owned(),
        group: t.ty.group.to_owned(),
        resource: t.ty.plural.to_owned(),
        subresource: t.subresource.clone(),
        namespace: t.namespace.clone(),
        name: t.name.clone(),
    };
    let allowed = rbac.allows(&user, &attrs);
    let resource = match &t.subresource {
        Some(s) => format!("{}/{s}", t.ty.qualified()),
        None => t.ty.qualified(),
    };
    st.decisions.push(format!(
        "{} {verb} {resource} {} {}",
        user.name,
        t.namespace.as_deref().unwrap_or("-"),
        if allowed { "allowed" } else { "denied" }
    ));
    if allowed {
        Ok(())
    } else {
        Err(ApiError::new(403, "Forbidden", attrs.forbidden(&user)))
    }
}

async fn handle(state: Arc<Mutex<State>>, mut req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let method = req.method().clone();
    let caller = Caller::of(req.headers());
    let content_type = req.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let accept =
        req.headers().get(hyper::header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    state.lock().unwrap().requests.push(format!("{method} {path}?{query}"));
    if method == Method::GET {
        if let Some(v) = discovery::serve(&path) {
            return json_response(StatusCode::OK, &v);
        }
    }
    let t = match target(&path) {
        Ok(t) => t,
        Err(e) => return error(&e),
    };
    let watch = query_param(&query, "watch").is_some_and(|w| w == "true" || w == "1");
    let verb = match (&method, t.name.is_some()) {
        (&Method::GET, _) if watch => "watch",
        (&Method::GET, true) => "get",
        (&Method::GET, false) => "list",
        (&Method::POST, _) => "create",
        (&Method::PUT, _) => "update",
        (&Method::PATCH, _) => "patch",
        (&Method::DELETE, true) => "delete",
        (&Method::DELETE, false) => "deletecollection",
        _ => return status(405, "MethodNotAllowed", format!("{method} is not supported")),
    };

    if t.subresource.as_deref() == Some("portforward") {
        return portforward(&state, &mut req, &t, &caller, &query);
    }
    {
        let mut st = state.lock().unwrap();
        if let Err(e) = authorize(&mut st, &caller, verb, &t) {
            return error(&e);
        }
    }
    let body: Value = match method {
        Method::POST | Method::PUT | Method::PATCH => {
            let Ok(bytes) = req.into_body().collect().await.map(|b| b.to_bytes()) else {
                return status(400, "BadRequest", "the request body could not be read".into());
            };
            match serde_json::from_slice(&bytes).or_else(|_| serde_saphyr::from_slice::<Value>(&bytes)) {
                Ok(v) => v,
                Err(e) => return status(400, "BadRequest", format!("the body is not JSON: {e}")),
            }
        }
        _ => Value::Null,
    };
    let ns = t.namespace.as_deref();
    let is_status = t.subresource.as_deref() == Some("status");
    let mut st = state.lock().unwrap();
    if matches!(verb, "list" | "watch") {
        let fields = query_param(&query, "fieldSelector").unwrap_or_default();
        if let Err(e) = st.store.check_field_selector(&t.ty, &fields) {
            return error(&e);
        }
    }
    let created = StatusCode::CREATED;
    let result = match verb {
        "get" => st.store.get(&t.ty, ns, t.name.as_deref().unwrap_or_default()).map(|v| {
            let rv = st.store.resource_version();
            let now =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            match discovery::wants_table(&accept)
                .then(|| discovery::table(&t.ty, std::slice::from_ref(&v), rv, now))
                .flatten()
            {
                Some(table) => (StatusCode::OK, table),
                None => (StatusCode::OK, v),
            }
        }),
        "list" => {
            let rv = query_param(&query, "resourceVersion").and_then(|v| v.parse().ok());
            st.store.check_list_version(rv).map(|()| {
                let (items, rv) = st.store.list(&filter(&t, &query));
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                if let Some(table) = discovery::wants_table(&accept)
                    .then(|| discovery::table(&t.ty, &items, rv, now))
                    .flatten()
                {
                    return (StatusCode::OK, table);
                }
                let list = json!({
                    "kind": format!("{}List", t.ty.kind), "apiVersion": t.ty.api_version(),
                    "metadata": {"resourceVersion": rv.to_string()}, "items": items
                });
                (StatusCode::OK, list)
            })
        }
        "watch" => {
            // A streaming list (sendInitialEvents): the current state as ADDED events, then a
            // bookmark marking the end of them, then changes.
            let initial = query_param(&query, "sendInitialEvents").is_some_and(|b| b == "true");
            let from = query_param(&query, "resourceVersion")
                .and_then(|v| v.parse::<u64>().ok())
                .filter(|v| *v != 0 && !initial);
            let bookmarks = query_param(&query, "allowWatchBookmarks").is_some_and(|b| b == "true");
            let timeout = query_param(&query, "timeoutSeconds").and_then(|s| s.parse().ok()).unwrap_or(1800);
            let (tx, rx) = mpsc::unbounded_channel();
            return match st.store.watch(filter(&t, &query), from, tx) {
                Ok(mut replay) => {
                    if initial {
                        let rv = st.store.resource_version();
                        replay.push(Change {
                            rv,
                            kind: "BOOKMARK",
                            ty: t.ty,
                            namespace: None,
                            object: json!({
                                "kind": t.ty.kind, "apiVersion": t.ty.api_version(),
                                "metadata": {
                                    "resourceVersion": rv.to_string(),
                                    "annotations": {"k8s.io/initial-events-end": "true"}
                                }
                            }),
                        });
                    }
                    drop(st);
                    watch_response(replay, rx, bookmarks, Duration::from_secs(timeout))
                }
                Err(e) => {
                    // As the API server does: a 200 whose only event is the error.
                    let line = json!({"type": "ERROR", "object": e.to_status()}).to_string() + "\n";
                    Response::builder()
                        .status(StatusCode::OK)
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(line)).boxed())
                        .unwrap()
                }
            };
        }
        "create" if query_param(&query, "dryRun").is_some() => {
            let name = body["metadata"]["name"].as_str().unwrap_or_default().to_owned();
            match st.store.get(&t.ty, ns, &name) {
                Ok(_) => Err(ApiError::new(
                    409,
                    "AlreadyExists",
                    format!("{} \"{name}\" already exists", t.ty.qualified()),
                )),
                Err(_) => Ok((created, body)),
            }
        }
        "create" => st.store.create(&t.ty, ns, body).map(|v| (created, v)),
        "update" => st
            .store
            .update(&t.ty, ns, t.name.as_deref().unwrap_or_default(), body, is_status)
            .map(|v| (StatusCode::OK, v)),
        "patch" => match PatchKind::from_content_type(&content_type) {
            Some(kind) => st
                .store
                .patch(&t.ty, ns, t.name.as_deref().unwrap_or_default(), kind, &body, is_status)
                .map(|v| (StatusCode::OK, v)),
            None => Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                format!("the body of the request was in an unknown format: {content_type}"),
            )),
        },
        "delete" => {
            st.store.delete(&t.ty, ns, t.name.as_deref().unwrap_or_default()).map(|v| (StatusCode::OK, v))
        }
        _ => Err(ApiError::new(405, "MethodNotAllowed", format!("{verb} is not served by this fake"))),
    };
    match result {
        Ok((code, v)) => json_response(code, &v),
        Err(e) => error(&e),
    }
}

fn filter(t: &Target, query: &str) -> Filter {
    Filter {
        ty: t.ty,
        namespace: t.namespace.clone(),
        labels: query_param(query, "labelSelector").unwrap_or_default(),
        fields: query_param(query, "fieldSelector").unwrap_or_default(),
    }
}

/// A watch: one JSON line per event, the replay first, then changes as they happen, until the
/// client goes or `timeout` passes.
fn watch_response(
    replay: Vec<Change>,
    mut rx: mpsc::UnboundedReceiver<Change>,
    bookmarks: bool,
    timeout: Duration,
) -> Response<Body> {
    let (tx, body_rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(16);
    let line = |c: &Change| Bytes::from(json!({"type": c.kind, "object": c.object}).to_string() + "\n");
    tokio::spawn(async move {
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        for c in &replay {
            if tx.send(Ok(Frame::data(line(c)))).await.is_err() {
                return;
            }
        }
        loop {
            tokio::select! {
                () = &mut deadline => return,
                () = tx.closed() => return,
                change = rx.recv() => {
                    let Some(c) = change else { return };
                    if c.kind == "BOOKMARK" && !bookmarks {
                        continue;
                    }
                    if tx.send(Ok(Frame::data(line(&c)))).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let stream = futures::stream::unfold(body_rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .header("transfer-encoding", "chunked")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap()
}

fn portforward(
    state: &Arc<Mutex<State>>,
    req: &mut Request<Incoming>,
    t: &Target,
    caller: &Caller,
    query: &str,
) -> Response<Body> {
    let mut st = state.lock().unwrap();
    let (ns, name) = (t.namespace.clone().unwrap_or_default(), t.name.clone().unwrap_or_default());
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
    // The WebSocket upgrade is a GET, authorized as `get` and, from Kubernetes 1.35, `create`.
    for verb in ["get", "create"] {
        if let Err(e) = authorize(&mut st, caller, verb, t) {
            return error(&e);
        }
    }
    if st.store.get(&t.ty, Some(&ns), &name).is_err() {
        return status(404, "NotFound", format!("pods \"{name}\" not found"));
    }
    let Some(port) = query_param(query, "ports").and_then(|p| p.parse::<u16>().ok()) else {
        return status(400, "BadRequest", "exactly one numeric port is served by this fake".into());
    };
    let backend = st.agents.get(&name).cloned().unwrap_or(AgentBackend::Refused);
    drop(st);
    upgrade(req, port, backend, name)
}

fn upgrade(req: &mut Request<Incoming>, port: u16, backend: AgentBackend, pod: String) -> Response<Body> {
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
        .body(Full::new(Bytes::new()).boxed())
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
        AgentBackend::PodNetns(netns) => match connect_in_netns(&netns, port) {
            Ok(stream) => {
                relay(&mut tx, &mut rx, stream).await;
                return;
            }
            Err(e) => format!("failed to connect to localhost:{port} in {}: {e}", netns.display()),
        },
        AgentBackend::Refused => format!("failed to connect to localhost:{port}: connection refused"),
    };
    let msg = format!("error forwarding port {port} to pod {pod}, uid : {refused}");
    let mut frame = vec![1u8];
    frame.extend_from_slice(msg.as_bytes());
    let _ = tx.send(Message::binary(frame)).await;
    // A kubelet's dial takes a while, so the client's first bytes are usually on their way when
    // the reason comes. Holding the close until they arrive (or the client leaves) keeps that
    // order here: kube's client drops a reason that is still queued when one of its writes meets
    // an already closed connection (the transport reports that case on its own).
    let _ = tokio::time::timeout(Duration::from_secs(2), rx.next()).await;
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
