//! The RBAC and krew manifests say what people and agents need and no more.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use serde_json::Value;

fn docs(relative: &str) -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(relative);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_saphyr::from_multiple::<Value>(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `group/resource verb` for every rule of the role named `name`.
fn grants(docs: &[Value], name: &str) -> Vec<String> {
    let role = docs
        .iter()
        .find(|d| d["metadata"]["name"] == name && (d["kind"] == "ClusterRole" || d["kind"] == "Role"))
        .unwrap_or_else(|| panic!("no role {name}"));
    let mut out = Vec::new();
    for rule in role["rules"].as_array().unwrap() {
        for group in rule["apiGroups"].as_array().unwrap() {
            for r in rule["resources"].as_array().unwrap() {
                for v in rule["verbs"].as_array().unwrap() {
                    let group = group.as_str().unwrap();
                    let resource = r.as_str().unwrap();
                    let qualified =
                        if group.is_empty() { resource.to_owned() } else { format!("{group}/{resource}") };
                    out.push(format!("{qualified} {}", v.as_str().unwrap()));
                }
            }
        }
    }
    out.sort();
    out
}

fn sorted(items: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = items.iter().map(|s| (*s).to_owned()).collect();
    v.sort();
    v
}

#[test]
fn people_get_migrations_in_their_namespace_and_nothing_on_the_agents() {
    let d = docs("deploy/rbac-kubectl-migrate.yaml");
    for x in &d {
        assert_eq!(x["apiVersion"], "rbac.authorization.k8s.io/v1", "{x}");
        assert_eq!(
            x["kind"], "ClusterRole",
            "roles only: bindings are per namespace, by the cluster's owner"
        );
    }
    assert_eq!(
        grants(&d, "katamaran-migrator"),
        sorted(&[
            "katamaran.io/migrations create",
            "katamaran.io/migrations delete",
            "katamaran.io/migrations get",
            "katamaran.io/migrations list",
            "katamaran.io/migrations patch",
            "katamaran.io/migrations watch",
            "pods get",
        ])
    );
    let labels =
        &d.iter().find(|x| x["metadata"]["name"] == "katamaran-migrator").unwrap()["metadata"]["labels"];
    assert_eq!(
        labels["rbac.authorization.k8s.io/aggregate-to-edit"], "true",
        "editors of a namespace may migrate"
    );
    assert_eq!(
        grants(&d, "katamaran-migration-viewer"),
        sorted(&[
            "katamaran.io/migrations get",
            "katamaran.io/migrations list",
            "katamaran.io/migrations watch"
        ])
    );
    // Port-forward to the agents is the administrators' debugging path, in its own role only,
    // with the agents' CA Secret (and no other Secret) to mint a client certificate.
    assert_eq!(
        grants(&d, "katamaran-debug"),
        sorted(&["pods get", "pods list", "pods/portforward create", "pods/portforward get", "secrets get"])
    );
    let debug = d.iter().find(|x| x["metadata"]["name"] == "katamaran-debug").unwrap();
    for rule in debug["rules"].as_array().unwrap() {
        if rule["resources"].as_array().unwrap().iter().any(|r| r == "secrets") {
            assert_eq!(rule["resourceNames"], serde_json::json!([katamaran::peer::CA_SECRET]), "{rule}");
        }
    }
    for role in ["katamaran-migrator", "katamaran-migration-viewer"] {
        assert!(
            !grants(&d, role).iter().any(|g| g.contains("portforward") || g.starts_with("nodes")),
            "{role}"
        );
    }
}

#[test]
fn the_agents_get_what_the_controller_needs_and_no_more() {
    let d = docs("deploy/agent-rbac.yaml");
    assert_eq!(
        grants(&d, "katamaran-agent"),
        sorted(&[
            "katamaran.io/migrations get",
            "katamaran.io/migrations list",
            "katamaran.io/migrations watch",
            "katamaran.io/migrations patch",
            "katamaran.io/migrations update",
            "katamaran.io/migrations/status get",
            "katamaran.io/migrations/status patch",
            "katamaran.io/migrations/status update",
            "katamaran.io/migrations/finalizers update",
            "pods get",
            "pods list",
            "nodes get",
            "nodes list",
            "events create",
            "events patch",
            "events.k8s.io/events create",
            "events.k8s.io/events patch",
        ])
    );
    assert!(!grants(&d, "katamaran-agent")
        .iter()
        .any(|g| g.ends_with(" create") && g.contains("migrations")));
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

#[test]
fn the_agents_probes_and_metrics_service_reach_the_port_it_serves_http_on() {
    let ds = docs("deploy/daemonset.yaml").into_iter().find(|d| d["kind"] == "DaemonSet").unwrap();
    let pod = &ds["spec"]["template"];
    let agent = pod["spec"]["containers"].as_array().unwrap().iter().find(|c| c["name"] == "agent").unwrap();
    let args: Vec<&str> = agent["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    let http = args.iter().find_map(|a| a.strip_prefix("--listen-http=")).expect("the agent serves HTTP");
    let port: u64 = http.rsplit(':').next().unwrap().parse().unwrap();
    assert!(
        !http.starts_with("127."),
        "kubelet and Prometheus reach the pod's address, not its loopback: {http}"
    );
    let named =
        agent["ports"].as_array().unwrap().iter().find(|p| p["name"] == "metrics").expect("port metrics");
    assert_eq!(named["containerPort"], port);
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        assert_eq!(agent[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(agent[probe]["httpGet"]["port"], port, "{probe}");
    }
    let svc = docs("deploy/metrics-service.yaml").into_iter().next().unwrap();
    assert_eq!(svc["kind"], "Service");
    assert_eq!(svc["metadata"]["namespace"], ds["metadata"]["namespace"]);
    for (k, v) in svc["spec"]["selector"].as_object().unwrap() {
        assert_eq!(&pod["metadata"]["labels"][k], v, "the Service selects the agent pods by {k}");
    }
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "metrics");
    let kustomization = docs("deploy/kustomization.yaml").into_iter().next().unwrap();
    let resources: Vec<&str> =
        kustomization["resources"].as_array().unwrap().iter().map(|r| r.as_str().unwrap()).collect();
    assert!(resources.contains(&"metrics-service.yaml"), "{resources:?}");
    let sm = docs("deploy/monitoring/servicemonitor.yaml").into_iter().next().unwrap();
    assert_eq!(sm["kind"], "ServiceMonitor");
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "metrics");
    for (k, v) in sm["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(&svc["metadata"]["labels"][k], v, "the ServiceMonitor selects the Service by {k}");
    }
}
