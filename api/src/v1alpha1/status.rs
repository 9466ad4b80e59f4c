//! `status`: written by the agents only (the status subresource), read by everyone.
//!
//! Figures measured on QEMU's own event timestamps are integers in microseconds, named with
//! their unit as Kubernetes names `...Seconds` fields; times of day are `MicroTime` for phases
//! (sub-second phases are common) and `Time` for the whole migration, as a Job has them.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::options::TunnelMode;

/// Where a migration is, in the order a successful migration goes through them; Completed,
/// Failed and Cancelled are terminal.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema)]
pub enum Phase {
    /// Created; no agent has taken it yet.
    Pending,
    /// The source agent checks the request and the target's agent prepares the incoming VM.
    Preparing,
    /// The disks are mirrored to the target (skipped with shared storage).
    Storage,
    /// RAM pre-copy, then the stop-and-copy.
    Ram,
    /// The VM is stopped on the source; ownership moves; the target resumes it.
    Cutover,
    /// The VM runs on the target; the source forwards its traffic until the cluster routes the
    /// VM's address to the target.
    Forwarding,
    /// Done: the VM runs on the target and nothing is left to undo.
    Completed,
    /// Stopped by an error; the VM runs where `owner` says.
    Failed,
    /// Stopped by a cancel request; the VM runs on the source.
    Cancelled,
}

impl Phase {
    /// Every phase, in order.
    pub const ALL: [Phase; 9] = [
        Phase::Pending,
        Phase::Preparing,
        Phase::Storage,
        Phase::Ram,
        Phase::Cutover,
        Phase::Forwarding,
        Phase::Completed,
        Phase::Failed,
        Phase::Cancelled,
    ];

    /// Whether nothing more will happen.
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Completed | Phase::Failed | Phase::Cancelled)
    }

    /// The name in the resource.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Preparing => "Preparing",
            Phase::Storage => "Storage",
            Phase::Ram => "Ram",
            Phase::Cutover => "Cutover",
            Phase::Forwarding => "Forwarding",
            Phase::Completed => "Completed",
            Phase::Failed => "Failed",
            Phase::Cancelled => "Cancelled",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which side owns the VM. Ownership moves once, at the commit point both agents record before
/// acting: before it the source owns the VM and every failure or cancel ends with the source
/// running; after it the destination does and the source never resumes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Owner {
    /// The source node's VM is the VM.
    Source,
    /// The destination node's VM is the VM.
    Destination,
}

/// The condition types and reasons the agents set (metav1 conditions: `type`, `status` True,
/// False or Unknown, a CamelCase `reason`, a `message`).
pub mod condition {
    /// True once the source agent validated the request (pod found on a katamaran node, target
    /// Ready, no other migration of the pod running); False with the reason otherwise.
    pub const ACCEPTED: &str = "Accepted";
    /// True once both agents recorded the commit point: the destination owns the VM and a cancel
    /// is no longer honoured.
    pub const COMMITTED: &str = "Committed";
    /// True while the source node forwards the VM's traffic to the target.
    pub const FORWARDING: &str = "Forwarding";
    /// True when the migration reached a terminal phase, with the phase as the reason
    /// (Completed, Failed, Cancelled).
    pub const FINISHED: &str = "Finished";

    /// Accepted=False: another migration of the same pod is not finished.
    pub const POD_BUSY: &str = "PodBusy";
    /// Accepted=False: the pod does not exist, is not running, or is not a katamaran pod.
    pub const POD_NOT_MIGRATABLE: &str = "PodNotMigratable";
    /// Accepted=False: the target node is missing, not Ready, cordoned, or the pod's node.
    pub const TARGET_UNAVAILABLE: &str = "TargetUnavailable";
    /// Accepted=False: an option the engine cannot honour on these nodes (tunnel family, ...).
    pub const INVALID_OPTIONS: &str = "InvalidOptions";
    /// Accepted=True.
    pub const VALIDATED: &str = "Validated";
    /// Committed=True.
    pub const OWNERSHIP_MOVED: &str = "OwnershipMoved";
    /// Forwarding=False: the cluster routes the VM's address to the target, or the VM stopped.
    pub const FORWARD_RELEASED: &str = "ForwardReleased";
}

/// When one phase ran.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PhaseTiming {
    /// The phase.
    pub phase: Phase,
    /// When it began.
    pub start_time: MicroTime,
    /// When it ended; absent while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<MicroTime>,
}

/// Live figures of the running phase (the storage mirror or RAM pre-copy), as QEMU reports them.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// Bytes sent so far in this phase.
    #[schemars(range(min = 0))]
    pub bytes_transferred: i64,
    /// Bytes still to send (dirty RAM, or disk not yet mirrored).
    #[schemars(range(min = 0))]
    pub bytes_remaining: i64,
    /// Total bytes of the phase (guest RAM or disk size).
    #[schemars(range(min = 0))]
    pub bytes_total: i64,
    /// RAM pre-copy pass (QEMU's dirty-sync count); 0 in the storage phase.
    #[schemars(range(min = 0))]
    pub iteration: i64,
    /// Bytes the guest dirties per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub dirty_bytes_per_second: Option<i64>,
    /// The downtime QEMU expects if it stopped the VM now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub expected_downtime_microseconds: Option<i64>,
}

/// How long the VM did not run.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Downtime {
    /// QEMU's own downtime figure (`query-migrate` on the source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub qemu_microseconds: Option<i64>,
    /// The guest's pause: the source's STOP to the destination's RESUME, from QEMU's event
    /// timestamps. What a client of the pod experiences.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub guest_pause_microseconds: Option<i64>,
}

/// What the network did at cutover.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Cutover {
    /// The forwarding mode used (auto resolved to a concrete mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel_mode: Option<TunnelMode>,
    /// When the VM's route moved into the tunnel, relative to the source's STOP; negative when
    /// the engine moved it before stopping the VM (the controlled switchover).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_swap_offset_microseconds: Option<i64>,
    /// The destination's RESUME to the plug releasing the packets it held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub plug_release_microseconds: Option<i64>,
    /// Packets the destination's plug dropped while holding (its limit was too small).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub plug_drops: Option<i64>,
}

/// Strings for `kubectl get mig` (printer columns read JSON paths and cannot format numbers);
/// computed by the agents from the phase and the figures.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    /// The guest pause once known (`3.1ms`), QEMU's downtime failing that, else the downtime
    /// expected during RAM pre-copy (`~25ms`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub downtime: String,
    /// Share of the current phase's data sent (`63%`), with the RAM pass (`63% pass 3`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub progress: String,
}

/// What the agents report.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationStatus {
    /// Where the migration is; Pending when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Which side owns the VM; absent until the source agent took the migration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<Owner>,
    /// The node the pod ran on when the migration was accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_node: Option<String>,
    /// The node the VM moves to (spec.targetNode, as accepted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_node: Option<String>,
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// A sentence for people: what happens now, or why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When the source agent accepted the migration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When it reached a terminal phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// Each phase entered, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<PhaseTiming>,
    /// Live figures of the running phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// The VM's downtime, once cut over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime: Option<Downtime>,
    /// The network's figures at cutover.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cutover: Option<Cutover>,
    /// Strings for the printer columns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<Summary>,
    /// Standard conditions: Accepted, Committed, Forwarding, Finished.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}
