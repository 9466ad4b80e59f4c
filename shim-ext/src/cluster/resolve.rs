//! From "pod NAME to node NODE" to a checked plan: the pod's node, addresses and runtime class,
//! the destination's address, and the agent pod on each node.
//!
//! The checks are plain functions over Kubernetes objects ([`pod_facts`], [`destination_facts`],
//! [`pick_agent`], [`match_sandbox`]) so they are table-tested without a cluster; [`Resolver`]
//! only fetches the objects. Every refusal is one [`Error`] variant with a one-line message that
//! says what is wrong and, where it helps, what would be accepted.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Node, Pod};
use katamaran_protos::v1 as pb;
use kube::api::ListParams;
use kube::{Api, Client};

/// Label every katamaran node agent pod carries (set by the DaemonSet in `deploy/`).
pub const AGENT_LABEL: &str = "app.kubernetes.io/name=katamaran-agent";

/// A refusal or a failure while resolving the plan.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `GET pods/NAME` answered 404.
    #[error("pod {namespace}/{name} not found")]
    PodNotFound {
        /// Namespace searched.
        namespace: String,
        /// Pod name.
        name: String,
    },
    /// The pod's `spec.runtimeClassName` is not the katamaran one.
    #[error(
        "pod {pod} uses {found}; only pods of runtime class {wanted:?} can be migrated (see --runtime-class)"
    )]
    WrongRuntimeClass {
        /// `namespace/name`.
        pod: String,
        /// What the pod has, phrased for the message.
        found: String,
        /// The class katamaran serves.
        wanted: String,
    },
    /// The pod is being deleted.
    #[error("pod {pod} is terminating")]
    PodTerminating {
        /// `namespace/name`.
        pod: String,
    },
    /// `status.phase` is not `Running`.
    #[error("pod {pod} is {phase}, not Running")]
    PodNotRunning {
        /// `namespace/name`.
        pod: String,
        /// The phase it has.
        phase: String,
    },
    /// `spec.nodeName` is empty.
    #[error("pod {pod} is not scheduled on any node")]
    PodNotScheduled {
        /// `namespace/name`.
        pod: String,
    },
    /// No parsable `status.podIPs`.
    #[error("pod {pod} has no IP address yet")]
    PodHasNoIp {
        /// `namespace/name`.
        pod: String,
    },
    /// `GET nodes/NAME` answered 404.
    #[error("node {node:?} not found")]
    NodeNotFound {
        /// Node name as given.
        node: String,
    },
    /// `--to` names the node the pod is on.
    #[error("pod {pod} already runs on node {node}; choose another destination with --to")]
    SameNode {
        /// `namespace/name`.
        pod: String,
        /// The shared node.
        node: String,
    },
    /// The destination's `Ready` condition is not `True`.
    #[error("node {node} is NotReady ({detail})")]
    NodeNotReady {
        /// Node name.
        node: String,
        /// Reason and message of the condition.
        detail: String,
    },
    /// The destination has `spec.unschedulable` set.
    #[error("node {node} is cordoned (spec.unschedulable); uncordon it or choose another destination")]
    NodeCordoned {
        /// Node name.
        node: String,
    },
    /// The node lists no `InternalIP` of the pod's address family.
    #[error("node {node} has no {family} InternalIP, needed for the pod's address {pod_ip}")]
    NodeHasNoAddress {
        /// Node name.
        node: String,
        /// "IPv4" or "IPv6".
        family: &'static str,
        /// The pod address whose family is needed.
        pod_ip: IpAddr,
    },
    /// No usable agent pod on a node.
    #[error("no katamaran agent on node {node}: {detail} (label {AGENT_LABEL} in namespace {namespace})")]
    NoAgent {
        /// Node name.
        node: String,
        /// Agent namespace searched.
        namespace: String,
        /// What was found instead.
        detail: String,
    },
    /// The source agent lists no sandbox for the pod.
    #[error(
        "the katamaran agent on node {node} knows no Kata sandbox of pod {pod} ({count} sandboxes listed)"
    )]
    NoSandbox {
        /// `namespace/name`.
        pod: String,
        /// Source node.
        node: String,
        /// How many sandboxes the agent listed.
        count: usize,
    },
    /// The API server answered 403.
    #[error("forbidden: {message}")]
    Forbidden {
        /// The API server's Status message (names the verb, resource and user).
        message: String,
    },
    /// Any other API failure (unreachable, 5xx, timeouts).
    #[error("Kubernetes API request to {what} failed")]
    Api {
        /// What was requested, e.g. "get pod shop/web-0".
        what: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// A request did not complete within `--request-timeout`.
    #[error("Kubernetes API request to {what} did not complete within {after:?} (--request-timeout)")]
    RequestTimeout {
        /// What was requested.
        what: String,
        /// The limit.
        after: std::time::Duration,
    },
}

impl Error {
    /// Whether this refuses the request as given (exit code 2) rather than reporting a failure to
    /// find out (exit code 1).
    pub fn is_refusal(&self) -> bool {
        !matches!(self, Error::Api { .. } | Error::RequestTimeout { .. })
    }
}

/// Address family of the pod, which selects the node addresses used for tunnels and streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// The family of `ip`.
    pub fn of(ip: IpAddr) -> Self {
        if ip.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }

    fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

/// What the plan needs from the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `metadata.uid` (empty if the server sent none).
    pub uid: String,
    /// `spec.nodeName`.
    pub node: String,
    /// `status.podIPs`, primary first.
    pub ips: Vec<IpAddr>,
    /// `spec.runtimeClassName`.
    pub runtime_class: String,
}

impl PodFacts {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The family of the primary pod address.
    pub fn family(&self) -> Family {
        // `pod_facts` refuses pods without an address, so `ips` is never empty here.
        self.ips.first().map_or(Family::V4, |ip| Family::of(*ip))
    }
}

/// Checks that `pod` can be migrated by katamaran and extracts what the plan needs.
///
/// # Errors
/// A refusal when the pod is terminating, has another runtime class, is not Running, is not
/// scheduled or has no address.
pub fn pod_facts(pod: &Pod, runtime_class: &str) -> Result<PodFacts, Error> {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let key = format!("{namespace}/{name}");
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();

    let class = spec.and_then(|s| s.runtime_class_name.as_deref()).unwrap_or("");
    if class != runtime_class {
        let found = if class.is_empty() {
            "no runtime class (the node's default runtime, not Kata)".to_owned()
        } else {
            format!("runtime class {class:?}")
        };
        return Err(Error::WrongRuntimeClass { pod: key, found, wanted: runtime_class.to_owned() });
    }
    if pod.metadata.deletion_timestamp.is_some() {
        return Err(Error::PodTerminating { pod: key });
    }
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Unknown");
    if phase != "Running" {
        return Err(Error::PodNotRunning { pod: key, phase: phase.to_owned() });
    }
    let node = spec.and_then(|s| s.node_name.clone()).unwrap_or_default();
    if node.is_empty() {
        return Err(Error::PodNotScheduled { pod: key });
    }
    // `podIPs` is authoritative on dual-stack clusters; `podIP` is its first entry and the only
    // field older servers fill.
    let listed = status.and_then(|s| s.pod_ips.as_ref()).into_iter().flatten().map(|p| p.ip.as_str());
    let single = status.and_then(|s| s.pod_ip.as_deref());
    let mut ips: Vec<IpAddr> = Vec::new();
    for ip in listed.chain(single).filter_map(|s| s.parse().ok()) {
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    if ips.is_empty() {
        return Err(Error::PodHasNoIp { pod: key });
    }
    Ok(PodFacts {
        namespace,
        name,
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        node,
        ips,
        runtime_class: class.to_owned(),
    })
}

/// The node's first `InternalIP` of `family`.
pub fn internal_ip(node: &Node, family: Family) -> Option<IpAddr> {
    node.status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
        .filter_map(|a| a.address.parse::<IpAddr>().ok())
        .find(|ip| Family::of(*ip) == family)
}

fn node_address(node: &Node, pod: &PodFacts) -> Result<IpAddr, Error> {
    internal_ip(node, pod.family()).ok_or_else(|| Error::NodeHasNoAddress {
        node: node.metadata.name.clone().unwrap_or_default(),
        family: pod.family().name(),
        pod_ip: pod.ips[0],
    })
}

/// The source node's address for the pod's family. The source may be cordoned or even NotReady
/// (draining a node is the usual reason to migrate); only its agent must answer.
///
/// # Errors
/// [`Error::NodeHasNoAddress`].
pub fn source_address(node: &Node, pod: &PodFacts) -> Result<IpAddr, Error> {
    node_address(node, pod)
}

/// Checks that `node` can receive `pod` and returns its address for the pod's family.
///
/// # Errors
/// [`Error::SameNode`], [`Error::NodeNotReady`], [`Error::NodeCordoned`],
/// [`Error::NodeHasNoAddress`].
pub fn destination_facts(node: &Node, pod: &PodFacts) -> Result<IpAddr, Error> {
    let name = node.metadata.name.clone().unwrap_or_default();
    if name == pod.node {
        return Err(Error::SameNode { pod: pod.key(), node: name });
    }
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .find(|c| c.type_ == "Ready");
    match ready {
        Some(c) if c.status == "True" => {}
        Some(c) => {
            let detail = [c.reason.as_deref(), c.message.as_deref()]
                .into_iter()
                .flatten()
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join(": ");
            let detail = if detail.is_empty() { format!("Ready is {}", c.status) } else { detail };
            return Err(Error::NodeNotReady { node: name, detail });
        }
        None => return Err(Error::NodeNotReady { node: name, detail: "no Ready condition reported".into() }),
    }
    if node.spec.as_ref().and_then(|s| s.unschedulable).unwrap_or(false) {
        return Err(Error::NodeCordoned { node: name });
    }
    node_address(node, pod)
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True")
}

/// Picks the agent pod to port-forward to among those listed on `node`: Running, not
/// terminating, Ready preferred (a DaemonSet rollout briefly has two).
///
/// # Errors
/// [`Error::NoAgent`] saying what was found instead.
pub fn pick_agent(pods: &[Pod], node: &str, namespace: &str) -> Result<String, Error> {
    let on_node = pods.iter().filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node));
    let usable = |p: &&Pod| {
        p.metadata.deletion_timestamp.is_none()
            && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
    };
    let mut candidates: Vec<&Pod> = on_node.clone().filter(usable).collect();
    candidates.sort_by_key(|p| !pod_ready(p));
    if let Some(name) = candidates.first().and_then(|p| p.metadata.name.clone()) {
        return Ok(name);
    }
    let seen: Vec<String> = on_node
        .map(|p| {
            let phase = p.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("Unknown");
            let state = if p.metadata.deletion_timestamp.is_some() { "Terminating" } else { phase };
            format!("{} is {state}", p.metadata.name.as_deref().unwrap_or("?"))
        })
        .collect();
    let detail = if seen.is_empty() { "no agent pod runs there".to_owned() } else { seen.join(", ") };
    Err(Error::NoAgent { node: node.to_owned(), namespace: namespace.to_owned(), detail })
}

/// The sandbox of `pod` among those an agent lists: by pod UID when both sides know it (a
/// recreated pod with the same name is another pod), otherwise by namespace and name.
///
/// # Errors
/// [`Error::NoSandbox`].
pub fn match_sandbox<'a>(sandboxes: &'a [pb::Sandbox], pod: &PodFacts) -> Result<&'a pb::Sandbox, Error> {
    sandboxes
        .iter()
        .find(|s| {
            if !s.pod_uid.is_empty() && !pod.uid.is_empty() {
                s.pod_uid == pod.uid
            } else {
                s.pod_namespace == pod.namespace && s.pod_name == pod.name
            }
        })
        .ok_or_else(|| Error::NoSandbox { pod: pod.key(), node: pod.node.clone(), count: sandboxes.len() })
}

/// One end of the migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeEnd {
    /// Node name.
    pub node: String,
    /// `InternalIP` of the pod's family.
    pub address: IpAddr,
    /// Name of the agent pod on the node (in the agent namespace).
    pub agent_pod: String,
}

/// Everything resolved from the Kubernetes API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The pod.
    pub pod: PodFacts,
    /// Where the pod runs.
    pub source: NodeEnd,
    /// Where it goes.
    pub destination: NodeEnd,
}

/// Reads pods and nodes from the API server.
#[derive(Clone)]
pub struct Resolver {
    client: Client,
    agent_namespace: String,
    request_timeout: Option<std::time::Duration>,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver").field("agent_namespace", &self.agent_namespace).finish_non_exhaustive()
    }
}

fn api_error(what: String, e: kube::Error, not_found: impl FnOnce() -> Error) -> Error {
    match &e {
        kube::Error::Api(s) if s.code == 404 => not_found(),
        kube::Error::Api(s) if s.code == 403 => Error::Forbidden { message: s.message.clone() },
        _ => Error::Api { what, source: e },
    }
}

impl Resolver {
    /// A resolver using `client`, looking for agents in `agent_namespace`.
    pub fn new(client: Client, agent_namespace: String) -> Self {
        Self { client, agent_namespace, request_timeout: None }
    }

    /// Bounds every API request (kubectl's `--request-timeout`; `None` or zero: no bound).
    #[must_use]
    pub fn with_request_timeout(mut self, limit: Option<std::time::Duration>) -> Self {
        self.request_timeout = limit.filter(|d| !d.is_zero());
        self
    }

    /// Runs one API request within the request timeout.
    async fn request<T>(
        &self,
        what: impl FnOnce() -> String,
        call: impl std::future::Future<Output = Result<T, kube::Error>>,
    ) -> Result<Result<T, kube::Error>, Error> {
        match self.request_timeout {
            Some(after) => tokio::time::timeout(after, call)
                .await
                .map_err(|_| Error::RequestTimeout { what: what(), after }),
            None => Ok(call.await),
        }
    }

    /// Resolves and checks pod `namespace/name` moving to node `to`.
    ///
    /// # Errors
    /// Any refusal of this module, or [`Error::Api`] when the API cannot be read.
    pub async fn resolve(
        &self,
        namespace: &str,
        name: &str,
        to: &str,
        runtime_class: &str,
    ) -> Result<Resolved, Error> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let pod =
            self.request(|| format!("get pod {namespace}/{name}"), pods.get(name)).await?.map_err(|e| {
                api_error(format!("get pod {namespace}/{name}"), e, || Error::PodNotFound {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                })
            })?;
        let pod = pod_facts(&pod, runtime_class)?;

        let nodes: Api<Node> = Api::all(self.client.clone());
        let dest_node = self.request(|| format!("get node {to}"), nodes.get(to)).await?.map_err(|e| {
            api_error(format!("get node {to}"), e, || Error::NodeNotFound { node: to.to_owned() })
        })?;
        let dest_address = destination_facts(&dest_node, &pod)?;
        let source_node =
            self.request(|| format!("get node {}", pod.node), nodes.get(&pod.node)).await?.map_err(|e| {
                api_error(format!("get node {}", pod.node), e, || Error::NodeNotFound {
                    node: pod.node.clone(),
                })
            })?;
        let source_address = source_address(&source_node, &pod)?;

        let source_agent = self.agent_on(&pod.node).await?;
        let dest_agent = self.agent_on(to).await?;
        Ok(Resolved {
            source: NodeEnd { node: pod.node.clone(), address: source_address, agent_pod: source_agent },
            destination: NodeEnd { node: to.to_owned(), address: dest_address, agent_pod: dest_agent },
            pod,
        })
    }

    /// The agent pod on `node`.
    ///
    /// # Errors
    /// [`Error::NoAgent`], [`Error::Forbidden`], [`Error::Api`].
    pub async fn agent_on(&self, node: &str) -> Result<String, Error> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.agent_namespace);
        let params = ListParams::default().labels(AGENT_LABEL).fields(&format!("spec.nodeName={node}"));
        let ns = &self.agent_namespace;
        let list =
            self.request(|| format!("list agent pods in {ns}"), pods.list(&params)).await?.map_err(|e| {
                api_error(format!("list agent pods in {ns}"), e, || Error::NoAgent {
                    node: node.to_owned(),
                    namespace: ns.clone(),
                    detail: format!("namespace {ns} not found"),
                })
            })?;
        pick_agent(&list.items, node, ns)
    }
}

#[cfg(test)]
#[path = "resolve_tests.rs"]
mod tests;
