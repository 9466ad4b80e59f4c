//! katamaran's migration engine.
//!
//! | module | what it owns |
//! |---|---|
//! | [`qmp`] | the QMP client: handshake, commands, events, deadlines — no migration policy |
//! | [`dataplane`] | authenticated TCP streams between nodes (per-migration secret), the NBD server's gate, and the unix↔TCP relay |
//! | [`migration`] | the state machine (source, destination, storage, compute, cutover) and its pure decisions |
//! | [`net`] | netlink (links, routes, tunnels, qdiscs) and netns threads — the only syscall room |
//! | [`client`] | reaching an endpoint; driving a migration between two endpoints |
//! | [`cluster`] | the Kubernetes side: resolution, port-forward transport, the orchestration, the Migration controller |
//! | [`cli`], [`convert`] | flags shared by the clients; engine ↔ wire type mapping |
//! | [`host`] | the node's network namespace and VM cgroups as a pod-deployed agent reaches them |
//! | [`node`] | one node's engine: sandboxes, migrations of either role, request validation |
//! | [`peer`] | agents authenticate each other: the cluster CA, node certificates, mutual TLS on the control path |
//! | [`private_files`] | root-only key files: a 0700 directory of new 0600 files |
//! | [`kube_events`] | Kubernetes Events on the pods the node moves |
//! | [`metrics`], [`observe`] | Prometheus metrics followed from the migrations' events; `/healthz`, `/readyz`, `/metrics` |
//! | [`recovery`] | what a restarted agent does with its predecessor's unfinished migrations |
//! | [`service`] | the ttrpc `Migration` service over a node, and root-only socket serving |
//! | [`sandbox`] | discovery: OCI bundle, Kata run dir, command-line capture and rewrite |
//! | [`shim`] | `containerd-shim-katamaran-v2`: delegate to Kata's shim, start and stop the per-sandbox extension |

pub mod cli;
pub mod client;
pub mod cluster;
pub mod convert;
pub mod dataplane;
pub mod host;
pub mod kube_events;
pub mod metrics;
pub mod migration;
pub mod net;
pub mod node;
pub mod observe;
pub mod peer;
pub mod pidfd;
pub mod private_files;
pub mod qmp;
pub mod recovery;
pub mod sandbox;
pub mod service;
pub mod shim;
