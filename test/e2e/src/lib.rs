//! Helpers for driving the two-node lab (`hack/lab.sh`, see `docs/LAB.md`) from tests.
//!
//! A test starts a [`Lab`] with its own root and namespace prefix ([`LabConfig::unique`]),
//! creates sandboxes and VMs through it, measures with the probe and the disk checker, and lets
//! the lab's `Drop` tear everything down even when an assertion fails. Tests that need root,
//! QEMU or the guest image print `skipped: <why>` and return (see [`artifacts`]).

pub mod agents;
pub mod artifacts;
pub mod capture;
pub mod containerd;
pub mod deployed;
mod error;
pub mod faults;
pub mod flood;
mod lab;
pub mod netns;
pub mod reports;

pub use artifacts::Skip;
pub use error::LabError;
pub use lab::{pid_is_live, Disks, Lab, LabConfig, Node, RunningProbe, SandboxPaths, VmOptions};
pub use reports::{DiskCheck, DiskProblem, ProbeReport};
