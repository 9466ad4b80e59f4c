//! What a sandbox's OCI bundle tells us: its network namespace and who it is in Kubernetes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespaceType, Spec};

use super::Error;

/// CRI annotation naming the container type (`sandbox` or `container`).
pub const ANNOTATION_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// CRI annotation with the sandbox id (on both sandbox and workload containers).
pub const ANNOTATION_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// CRI annotation with the pod name.
pub const ANNOTATION_SANDBOX_NAME: &str = "io.kubernetes.cri.sandbox-name";
/// CRI annotation with the pod namespace.
pub const ANNOTATION_SANDBOX_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
/// CRI annotation with the pod uid.
pub const ANNOTATION_SANDBOX_UID: &str = "io.kubernetes.cri.sandbox-uid";
/// CRI-O's spelling of the container type.
const ANNOTATION_CRIO_CONTAINER_TYPE: &str = "io.kubernetes.cri-o.ContainerType";

/// Which kind of container a bundle describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerType {
    /// The pod's sandbox (pause) container: one per Kata VM.
    Sandbox,
    /// A workload container inside an existing sandbox.
    Container,
    /// No CRI annotation (e.g. `ctr run` without one).
    Unknown,
}

/// The facts the extension takes from a bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleInfo {
    /// The `config.json` read.
    pub config_path: PathBuf,
    /// Sandbox or workload container.
    pub container_type: ContainerType,
    /// `io.kubernetes.cri.sandbox-id`, if present.
    pub sandbox_id: Option<String>,
    /// Pod name.
    pub pod_name: Option<String>,
    /// Pod namespace.
    pub pod_namespace: Option<String>,
    /// Pod uid.
    pub pod_uid: Option<String>,
    /// The network namespace the pod's interfaces live in (`linux.namespaces[type=network].path`).
    pub netns_path: Option<PathBuf>,
    /// Every annotation, for `inspect`.
    pub annotations: HashMap<String, String>,
}

impl BundleInfo {
    /// Reads `<bundle>/config.json`.
    ///
    /// # Errors
    /// [`Error::BundleConfig`] when the file is missing or not an OCI runtime spec.
    pub fn load(bundle_dir: &Path) -> Result<Self, Error> {
        let config_path = bundle_dir.join("config.json");
        let spec = Spec::load(&config_path)
            .map_err(|source| Error::BundleConfig { path: config_path.clone(), source })?;
        Ok(Self::from_spec(config_path, &spec))
    }

    /// Extracts the facts from an already parsed spec.
    pub fn from_spec(config_path: PathBuf, spec: &Spec) -> Self {
        let annotations = spec.annotations().clone().unwrap_or_default();
        let get = |key: &str| annotations.get(key).filter(|v| !v.is_empty()).cloned();
        let container_type =
            match get(ANNOTATION_CONTAINER_TYPE).or_else(|| get(ANNOTATION_CRIO_CONTAINER_TYPE)).as_deref() {
                Some("sandbox") => ContainerType::Sandbox,
                Some(_) => ContainerType::Container,
                None => ContainerType::Unknown,
            };
        let netns_path =
            spec.linux().as_ref().and_then(|linux| linux.namespaces().as_ref()).and_then(|namespaces| {
                namespaces
                    .iter()
                    .find(|ns| ns.typ() == LinuxNamespaceType::Network)
                    .and_then(|ns| ns.path().clone())
            });
        Self {
            config_path,
            container_type,
            sandbox_id: get(ANNOTATION_SANDBOX_ID),
            pod_name: get(ANNOTATION_SANDBOX_NAME),
            pod_namespace: get(ANNOTATION_SANDBOX_NAMESPACE),
            pod_uid: get(ANNOTATION_SANDBOX_UID),
            netns_path,
            annotations,
        }
    }

    /// The network namespace path, required for a sandbox the extension serves.
    ///
    /// # Errors
    /// [`Error::BundleMissing`] when the spec names no network namespace path.
    pub fn require_netns(&self) -> Result<&Path, Error> {
        self.netns_path.as_deref().ok_or_else(|| Error::BundleMissing {
            path: self.config_path.clone(),
            what: "network namespace path (linux.namespaces[type=network].path)",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_bundle(json: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("config.json"), json).expect("write");
        dir
    }

    const SANDBOX: &str = r#"{
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs"},
        "process": {"cwd": "/", "args": ["/pause"], "user": {"uid": 0, "gid": 0}},
        "linux": {"namespaces": [
            {"type": "pid"},
            {"type": "network", "path": "/var/run/netns/cni-1234"},
            {"type": "ipc"}
        ]},
        "annotations": {
            "io.kubernetes.cri.container-type": "sandbox",
            "io.kubernetes.cri.sandbox-id": "abc123",
            "io.kubernetes.cri.sandbox-name": "web-0",
            "io.kubernetes.cri.sandbox-namespace": "shop",
            "io.kubernetes.cri.sandbox-uid": "6f1e0b3c-0000-4000-8000-000000000001",
            "io.katacontainers.pkg.oci.bundle_path": "/ignored",
            "unknown.example.com/extra": "kept"
        }
    }"#;

    #[test]
    fn reads_a_cri_sandbox_bundle() {
        let dir = write_bundle(SANDBOX);
        let info = BundleInfo::load(dir.path()).expect("load");
        assert_eq!(info.container_type, ContainerType::Sandbox);
        assert_eq!(info.sandbox_id.as_deref(), Some("abc123"));
        assert_eq!(info.pod_name.as_deref(), Some("web-0"));
        assert_eq!(info.pod_namespace.as_deref(), Some("shop"));
        assert_eq!(info.pod_uid.as_deref(), Some("6f1e0b3c-0000-4000-8000-000000000001"));
        assert_eq!(info.require_netns().expect("netns"), Path::new("/var/run/netns/cni-1234"));
        assert_eq!(info.annotations.get("unknown.example.com/extra").map(String::as_str), Some("kept"));
    }

    #[test]
    fn workload_container_and_missing_netns() {
        let json = SANDBOX
            .replace("\"sandbox\",", "\"container\",")
            .replace(r#"{"type": "network", "path": "/var/run/netns/cni-1234"},"#, "");
        let dir = write_bundle(&json);
        let info = BundleInfo::load(dir.path()).expect("load");
        assert_eq!(info.container_type, ContainerType::Container);
        let err = info.require_netns().expect_err("no netns").to_string();
        assert!(err.contains("network namespace path"), "{err}");
    }

    #[test]
    fn no_annotations_is_unknown() {
        let dir = write_bundle(r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"}}"#);
        let info = BundleInfo::load(dir.path()).expect("load");
        assert_eq!(info.container_type, ContainerType::Unknown);
        assert_eq!(info.sandbox_id, None);
    }

    #[test]
    fn bad_bundles_name_the_file() {
        let empty = tempfile::tempdir().expect("tempdir");
        let err = BundleInfo::load(empty.path()).expect_err("missing");
        assert!(err.to_string().contains("config.json"), "{err}");
        let garbage = write_bundle("{not json");
        let err = BundleInfo::load(garbage.path()).expect_err("garbage");
        assert!(matches!(err, Error::BundleConfig { .. }), "{err}");
    }
}
