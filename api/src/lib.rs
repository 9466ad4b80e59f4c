//! The katamaran.io Kubernetes API.
//!
//! - [`v1alpha1`]: the `Migration` resource (spec, status, phases, conditions, event reasons)
//!   with kube's `CustomResource` derive;
//! - [`crd`]: the CustomResourceDefinition generated from those types, as `deploy/` ships it
//!   (`cargo run -p katamaran-api --bin katamaran-crdgen > deploy/crd-migration.yaml`);
//! - [`units`]: the textual durations and byte rates of the spec, with the patterns the schema
//!   enforces.
//!
//! The contract these types describe (who reconciles what, the finalizer, one migration per pod)
//! is in docs/KUBERNETES.md.

pub mod crd;
pub mod units;
pub mod v1alpha1;
