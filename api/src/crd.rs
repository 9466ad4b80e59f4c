//! The CustomResourceDefinition of every katamaran.io resource, generated from the Rust types.
//! deploy/crd-migration.yaml is this module's output, and a test fails when they differ.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use crate::v1alpha1::Migration;

/// The command that regenerates the committed CRD.
pub const REGENERATE: &str = "cargo run -p katamaran-api --bin katamaran-crdgen > deploy/crd-migration.yaml";

/// The committed file, relative to the repository root.
pub const PATH: &str = "deploy/crd-migration.yaml";

/// The Migration CRD, labelled as the rest of deploy/.
pub fn migration() -> CustomResourceDefinition {
    let mut crd = Migration::crd();
    crd.metadata.labels = Some(
        [("app.kubernetes.io/name", "katamaran"), ("app.kubernetes.io/component", "api")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
    );
    crd
}

/// A YAML rendering failed.
#[derive(Debug, thiserror::Error)]
pub enum CrdError {
    /// The CRD did not serialize.
    #[error("cannot render the CRD as YAML")]
    Render(#[source] serde_saphyr::SerializeError),
}

/// The file deploy/ ships: a header saying where it comes from, then the CRD. Byte-stable: the
/// schema's maps are ordered.
///
/// # Errors
/// [`CrdError::Render`] if serialization fails.
pub fn migration_yaml() -> Result<String, CrdError> {
    let body = serde_saphyr::to_string(&migration()).map_err(CrdError::Render)?;
    Ok(format!("# Generated from api/src/v1alpha1 (katamaran-api): do not edit. Regenerate with\n#   {REGENERATE}\n{body}"))
}
