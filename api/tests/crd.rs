//! The CRD deploy/ ships is the one the types generate, and it says what docs/KUBERNETES.md
//! promises: namespaced, `mig`, status subresource, the columns, defaults equal to the Rust
//! defaults, patterns that accept the defaults.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use katamaran_api::crd;
use katamaran_api::v1alpha1::{Migration, MigrationSpec, MigrationStatus, Options, Phase};
use serde_json::{json, Value};

fn generated() -> Value {
    serde_json::to_value(crd::migration()).unwrap()
}

fn schema() -> Value {
    generated()["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

#[test]
fn the_committed_crd_is_the_generated_one() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(crd::PATH);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let committed: Value = serde_saphyr::from_str(&text).unwrap();
    assert!(
        committed == generated(),
        "{} is out of date with api/src/v1alpha1; regenerate it with\n    {}",
        crd::PATH,
        crd::REGENERATE
    );
}

#[test]
fn the_yaml_rendering_loses_nothing() {
    let yaml = crd::migration_yaml().unwrap();
    assert!(yaml.starts_with("# Generated"), "says where it comes from");
    let parsed: Value = serde_saphyr::from_str(&yaml).unwrap();
    assert_eq!(parsed, generated());
    assert_eq!(crd::migration_yaml().unwrap(), yaml, "byte-stable");
}

#[test]
fn names_scope_and_subresources() {
    let c = generated();
    assert_eq!(c["metadata"]["name"], "migrations.katamaran.io");
    assert_eq!(c["spec"]["scope"], "Namespaced", "a Migration lives in its pod's namespace");
    assert_eq!(c["spec"]["names"]["shortNames"], json!(["mig"]));
    let v = &c["spec"]["versions"][0];
    assert_eq!(
        (v["name"].as_str(), v["served"].as_bool(), v["storage"].as_bool()),
        (Some("v1alpha1"), Some(true), Some(true))
    );
    assert_eq!(v["subresources"], json!({"status": {}}), "agents write status through its subresource");
    let columns: Vec<(&str, &str, i64)> = v["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap(),
                c["jsonPath"].as_str().unwrap(),
                c["priority"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        columns,
        [
            ("Pod", ".spec.pod", 0),
            ("Source", ".status.sourceNode", 0),
            ("Target", ".spec.targetNode", 0),
            ("Phase", ".status.phase", 0),
            ("Downtime", ".status.summary.downtime", 0),
            ("Progress", ".status.summary.progress", 1),
            ("Owner", ".status.owner", 1),
            ("Age", ".metadata.creationTimestamp", 0),
        ]
    );
    // Every column's path exists in the schema.
    let s = schema();
    for (_, path, _) in columns.iter().filter(|c| !c.1.starts_with(".metadata")) {
        let mut node = &s;
        for part in path.trim_start_matches('.').split('.') {
            node = &node["properties"][part];
        }
        assert_eq!(node["type"], "string", "{path}");
    }
    let selectable: Vec<&str> =
        v["selectableFields"].as_array().unwrap().iter().map(|f| f["jsonPath"].as_str().unwrap()).collect();
    assert_eq!(selectable, [".spec.pod", ".spec.targetNode"], "agents and the plugin select by pod");
}

#[test]
fn schema_defaults_are_the_rust_defaults() {
    let options = &schema()["properties"]["spec"]["properties"]["options"];
    assert_eq!(options["default"], serde_json::to_value(Options::default()).unwrap());
    for (field, value) in serde_json::to_value(Options::default()).unwrap().as_object().unwrap() {
        assert_eq!(&options["properties"][field]["default"], value, "{field}");
    }
    // What the API server stores for a bare {pod, targetNode} reads back as the defaults.
    let m: Migration = serde_json::from_value(json!({
        "apiVersion": "katamaran.io/v1alpha1", "kind": "Migration",
        "metadata": {"name": "web-0-to-node-b", "namespace": "shop"},
        "spec": {"pod": "web-0", "targetNode": "node-b"}
    }))
    .unwrap();
    assert_eq!(m.spec, MigrationSpec::new("web-0", "node-b"));
    assert_eq!(m.phase(), Phase::Pending, "no status yet");
}

#[test]
fn schema_patterns_accept_defaults_and_reject_junk() {
    let spec = &schema()["properties"]["spec"]["properties"];
    let pattern = |p: &Value| regex::Regex::new(p["pattern"].as_str().unwrap()).unwrap();
    let name = pattern(&spec["pod"]);
    for ok in ["web-0", "a", "db.shard-1"] {
        assert!(name.is_match(ok), "{ok}");
    }
    for bad in ["", "Web", "-x", "x-", "a_b", "a/b"] {
        assert!(!name.is_match(bad), "{bad}");
    }
    let o = &spec["options"]["properties"];
    for field in ["downtime", "storageTimeout", "ramTimeout"] {
        let value = o[field]["default"].as_str().unwrap();
        assert!(pattern(&o[field]).is_match(value), "{field} default {value}");
        assert!(
            !o[field]["x-kubernetes-validations"].as_array().unwrap().is_empty(),
            "{field} has a range rule"
        );
    }
    assert!(pattern(&o["bandwidth"]).is_match("500Mi") && !pattern(&o["bandwidth"]).is_match("0"));
    assert_eq!(o["tunnelMode"]["enum"], json!(["auto", "ipip", "gre", "ip6ip6", "ip6gre", "route"]));
    // The spec is immutable but for the cancel request, which cannot be withdrawn.
    let s = schema();
    let rules: Vec<&str> = s["properties"]["spec"]["x-kubernetes-validations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["rule"].as_str().unwrap())
        .collect();
    assert!(rules
        .iter()
        .any(|r| r.contains("self.pod == oldSelf.pod") && r.contains("self.options == oldSelf.options")));
    assert!(rules.iter().any(|r| r.contains("oldSelf.cancel")));
    let phases: Vec<Value> = Phase::ALL.iter().map(|p| json!(p.as_str())).collect();
    assert_eq!(schema()["properties"]["status"]["properties"]["phase"]["enum"], Value::Array(phases));
}

#[test]
fn a_full_status_round_trips() {
    let status = json!({
        "phase": "Completed", "owner": "Destination", "sourceNode": "node-a", "targetNode": "node-b",
        "observedGeneration": 2, "message": "the VM runs on node-b",
        "startTime": "2026-12-03T13:00:00Z", "completionTime": "2026-12-03T13:00:01Z",
        "phases": [
            {"phase": "Preparing", "startTime": "2026-12-03T13:00:00.000100Z", "endTime": "2026-12-03T13:00:00.009800Z"},
            {"phase": "Ram", "startTime": "2026-12-03T13:00:00.009800Z", "endTime": "2026-12-03T13:00:00.446600Z"}
        ],
        "progress": {"bytesTransferred": 134217728, "bytesRemaining": 0, "bytesTotal": 134217728, "iteration": 4,
                     "expectedDowntimeMicroseconds": 3000},
        "downtime": {"qemuMicroseconds": 3000, "guestPauseMicroseconds": 3140},
        "cutover": {"tunnelMode": "ipip", "routeSwapOffsetMicroseconds": -120, "plugReleaseMicroseconds": 112},
        "summary": {"downtime": "3.1ms", "progress": "100%"},
        "conditions": [{"type": "Finished", "status": "True", "reason": "Completed", "message": "",
                        "lastTransitionTime": "2026-12-03T13:00:01Z"}]
    });
    let parsed: MigrationStatus = serde_json::from_value(status.clone()).unwrap();
    assert_eq!(serde_json::to_value(&parsed).unwrap(), status);
    let summary = katamaran_api::v1alpha1::summarize(
        parsed.phase.unwrap(),
        parsed.progress.as_ref(),
        parsed.downtime.as_ref(),
    );
    assert_eq!(Some(summary), parsed.summary, "the summary is what summarize computes");
}
