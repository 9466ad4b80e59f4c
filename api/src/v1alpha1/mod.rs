//! `katamaran.io/v1alpha1`: the `Migration` resource.
//!
//! A Migration asks for one pod to move to one node. It lives in the pod's namespace, so RBAC on
//! `migrations.katamaran.io` there decides who may move the pod. The spec is fixed at creation
//! except for [`MigrationSpec::cancel`]; the agents report everything else in
//! [`MigrationStatus`]. docs/KUBERNETES.md describes who reconciles what.

mod options;
mod status;
mod summary;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use options::{Options, ResolvedOptions, TunnelMode};
pub use status::{
    condition, Cutover, Downtime, MigrationStatus, Owner, Phase, PhaseTiming, Progress, Summary,
};
pub use summary::{format_micros, summarize};

/// The API group.
pub const GROUP: &str = "katamaran.io";
/// The finalizer the source agent puts on a Migration it starts, and removes once everything the
/// migration left on either node is undone.
pub const FINALIZER: &str = "katamaran.io/migration";

/// Event reasons recorded on the Pod and on the Migration.
pub mod reason {
    /// Normal: the source agent accepted the migration and started preparing.
    pub const STARTED: &str = "MigrationStarted";
    /// Normal: the VM runs on the target node.
    pub const COMPLETED: &str = "MigrationCompleted";
    /// Warning: the migration failed; the VM runs where [`super::MigrationStatus::owner`] says.
    pub const FAILED: &str = "MigrationFailed";
    /// Warning: the cancel request was honoured; the VM runs on the source node.
    pub const CANCELLED: &str = "MigrationCancelled";
    /// Warning: the cancel request came after the commit point; the migration went on.
    pub const CANCEL_REFUSED: &str = "MigrationCancelRefused";
}

/// A DNS-1123 subdomain (pod and node names).
pub const NAME_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// What to move where, and how.
// `printcolumn(...)` entries repeat keys such as `type_ = "string"`, which clippy reads as
// duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "katamaran.io",
    version = "v1alpha1",
    kind = "Migration",
    namespaced,
    shortname = "mig",
    status = "MigrationStatus",
    derive = "PartialEq",
    doc = "A live migration of one Kata pod to another node, reconciled by the katamaran agents.",
    printcolumn(
        name = "Pod",
        type_ = "string",
        json_path = ".spec.pod",
        description = "The pod being moved"
    ),
    printcolumn(
        name = "Source",
        type_ = "string",
        json_path = ".status.sourceNode",
        description = "The node the pod ran on when the migration started"
    ),
    printcolumn(
        name = "Target",
        type_ = "string",
        json_path = ".spec.targetNode",
        description = "The node to move to"
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Where the migration is"
    ),
    printcolumn(
        name = "Downtime",
        type_ = "string",
        json_path = ".status.summary.downtime",
        description = "Guest pause (STOP to RESUME) once known, else the downtime expected"
    ),
    printcolumn(
        name = "Progress",
        type_ = "string",
        json_path = ".status.summary.progress",
        description = "Share of the current phase's data sent",
        priority = 1
    ),
    printcolumn(
        name = "Owner",
        type_ = "string",
        json_path = ".status.owner",
        description = "The side that owns the VM",
        priority = 1
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    selectable = ".spec.pod",
    selectable = ".spec.targetNode"
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.pod == oldSelf.pod && self.targetNode == oldSelf.targetNode && has(self.options) == has(oldSelf.options) && (!has(self.options) || self.options == oldSelf.options)",
        "message": "only spec.cancel may change once a Migration exists: create a new Migration instead"
    },
    {
        "rule": "!has(oldSelf.cancel) || !oldSelf.cancel || (has(self.cancel) && self.cancel)",
        "message": "a cancel request cannot be withdrawn"
    }
]))]
pub struct MigrationSpec {
    /// The pod to move, in the Migration's namespace.
    #[schemars(length(min = 1, max = 253), pattern(NAME_PATTERN))]
    pub pod: String,
    /// The node to move the pod to.
    #[schemars(length(min = 1, max = 253), pattern(NAME_PATTERN))]
    pub target_node: String,
    /// Ask for the migration to stop and the VM to stay on the source node. Honoured until the
    /// commit point (status.owner Source); afterwards the migration completes and a
    /// MigrationCancelRefused event says so. Once true it stays true.
    #[serde(default)]
    pub cancel: bool,
    /// How to migrate; every field has a default.
    #[serde(default)]
    pub options: Options,
}

impl MigrationSpec {
    /// A spec for `pod` to `target_node` with default options.
    pub fn new(pod: impl Into<String>, target_node: impl Into<String>) -> Self {
        Self { pod: pod.into(), target_node: target_node.into(), cancel: false, options: Options::default() }
    }
}

impl Migration {
    /// The phase, [`Phase::Pending`] while no agent has written a status.
    pub fn phase(&self) -> Phase {
        self.status.as_ref().and_then(|s| s.phase).unwrap_or(Phase::Pending)
    }
}
