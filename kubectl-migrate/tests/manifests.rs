//! The RBAC and krew manifests shipped for the plugin say what the plugin needs and no more.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use serde_json::Value;

fn docs(relative: &str) -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(relative);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_saphyr::from_multiple::<Value>(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `(namespace or "*", resource, verb)` for every rule of every role kind `kind`.
fn grants(docs: &[Value], kind: &str) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for d in docs.iter().filter(|d| d["kind"] == kind) {
        let ns = d["metadata"]["namespace"].as_str().unwrap_or("*").to_owned();
        for rule in d["rules"].as_array().unwrap() {
            assert_eq!(rule["apiGroups"], serde_json::json!([""]), "core group only: {rule}");
            for r in rule["resources"].as_array().unwrap() {
                for v in rule["verbs"].as_array().unwrap() {
                    out.push((ns.clone(), r.as_str().unwrap().to_owned(), v.as_str().unwrap().to_owned()));
                }
            }
        }
    }
    out.sort();
    out
}

fn g(ns: &str, resource: &str, verb: &str) -> (String, String, String) {
    (ns.into(), resource.into(), verb.into())
}

#[test]
fn rbac_grants_exactly_what_the_plugin_uses() {
    let d = docs("deploy/rbac-kubectl-migrate.yaml");
    // Cluster-wide: reads of the pod (any namespace) and of nodes. No port-forward, no writes.
    assert_eq!(grants(&d, "ClusterRole"), [g("*", "nodes", "get"), g("*", "pods", "get")]);
    // The agent namespace: find the agent pods and port-forward to them.
    assert_eq!(
        grants(&d, "Role"),
        [
            g("katamaran-system", "pods", "get"),
            g("katamaran-system", "pods", "list"),
            g("katamaran-system", "pods/portforward", "create"),
            g("katamaran-system", "pods/portforward", "get"),
        ]
    );
    // Each role is bound, the Role in its own namespace.
    for (binding, role) in [("ClusterRoleBinding", "ClusterRole"), ("RoleBinding", "Role")] {
        let b = d.iter().find(|x| x["kind"] == binding).unwrap_or_else(|| panic!("no {binding}"));
        let r = d.iter().find(|x| x["kind"] == role).unwrap();
        assert_eq!(b["roleRef"]["kind"], role);
        assert_eq!(b["roleRef"]["name"], r["metadata"]["name"]);
        assert_eq!(b["metadata"]["namespace"], r["metadata"]["namespace"]);
        assert!(!b["subjects"].as_array().unwrap().is_empty());
    }
    for x in &d {
        assert_eq!(x["apiVersion"], "rbac.authorization.k8s.io/v1", "{x}");
    }
}

#[test]
fn the_krew_manifest_installs_this_binary() {
    let d = docs("deploy/krew/migrate.yaml");
    assert_eq!(d.len(), 1);
    let m = &d[0];
    assert_eq!(m["apiVersion"], "krew.googlecontainertools.github.com/v1alpha2");
    assert_eq!(m["kind"], "Plugin");
    assert_eq!(m["metadata"]["name"], "migrate", "kubectl migrate");
    assert_eq!(m["spec"]["version"], format!("v{}", env!("CARGO_PKG_VERSION")));
    assert!(m["spec"]["shortDescription"].as_str().unwrap().len() < 64);
    let platforms = m["spec"]["platforms"].as_array().unwrap();
    assert!(!platforms.is_empty());
    for p in platforms {
        assert_eq!(p["bin"], "kubectl-migrate");
        assert_eq!(p["selector"]["matchLabels"]["os"], "linux", "Kata runs on Linux nodes only");
        let sha = p["sha256"].as_str().unwrap();
        assert!(sha.len() == 64 && sha.chars().all(|c| c.is_ascii_hexdigit()), "{sha}");
        assert!(p["uri"].as_str().unwrap().contains(&format!("v{}", env!("CARGO_PKG_VERSION"))));
        assert!(p["files"].as_array().unwrap().iter().any(|f| f["from"] == "kubectl-migrate"));
    }
}
