//! What `kubectl get` needs besides the objects: legacy discovery (`/api`, `/apis`, one
//! APIResourceList per group version, with short names and subresources) and server-side
//! printing (`as=Table`) of custom resources from their CRD's additionalPrinterColumns, with
//! the NAME column first and `date` columns as ages, as the API server renders them.

use std::path::Path;

use serde_json::{json, Value};

use super::store::{ResourceType, TYPES};

/// Short names the API server advertises.
fn short_names(t: &ResourceType) -> Vec<&'static str> {
    match (t.group, t.plural) {
        ("", "pods") => vec!["po"],
        ("", "nodes") => vec!["no"],
        ("", "events") => vec!["ev"],
        ("", "namespaces") => vec!["ns"],
        ("katamaran.io", "migrations") => vec!["mig"],
        _ => vec![],
    }
}

/// The answer to a discovery path, if `path` is one.
pub fn serve(path: &str) -> Option<Value> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match parts.as_slice() {
        ["api"] => Some(json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []})),
        ["apis"] => {
            let mut groups: Vec<(&str, &str)> =
                TYPES.iter().filter(|t| !t.group.is_empty()).map(|t| (t.group, t.version)).collect();
            groups.dedup();
            let groups: Vec<Value> = groups
                .into_iter()
                .map(|(g, v)| {
                    let gv = json!({"groupVersion": format!("{g}/{v}"), "version": v});
                    json!({"name": g, "versions": [gv.clone()], "preferredVersion": gv})
                })
                .collect();
            Some(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}))
        }
        ["api", version] => Some(resource_list("", version)),
        ["apis", group, version] => Some(resource_list(group, version)),
        ["version"] => {
            Some(json!({"major": "1", "minor": "35", "gitVersion": "v1.35.0", "platform": "linux/amd64"}))
        }
        _ => None,
    }
}

fn resource_list(group: &str, version: &str) -> Value {
    let mut resources = Vec::new();
    for t in TYPES.iter().filter(|t| t.group == group && t.version == version) {
        resources.push(json!({
            "name": t.plural, "singularName": t.kind.to_lowercase(), "namespaced": t.namespaced, "kind": t.kind,
            "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
            "shortNames": short_names(t),
        }));
        if t.status_subresource {
            resources.push(json!({
                "name": format!("{}/status", t.plural), "singularName": "", "namespaced": t.namespaced,
                "kind": t.kind, "verbs": ["get", "patch", "update"]
            }));
        }
    }
    let group_version = if group.is_empty() { version.to_owned() } else { format!("{group}/{version}") };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources})
}

/// Whether the client asked for server-side printing.
pub fn wants_table(accept: &str) -> bool {
    accept.split(',').next().is_some_and(|first| first.contains("as=Table"))
}

/// The printer columns of the CRD of `t` in deploy/, if it is a custom resource.
fn printer_columns(t: &ResourceType) -> Option<Vec<Value>> {
    (t.group == "katamaran.io").then(|| {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crd-migration.yaml");
        let crd: Value = serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        crd["spec"]["versions"][0]["additionalPrinterColumns"].as_array().cloned().unwrap_or_default()
    })
}

/// `objects` as a meta.k8s.io/v1 Table, or None for a type printed client-side here.
pub fn table(t: &ResourceType, objects: &[Value], rv: u64, now: u64) -> Option<Value> {
    let columns = printer_columns(t)?;
    let mut definitions = vec![json!({
        "name": "Name", "type": "string", "format": "name", "priority": 0,
        "description": "Name must be unique within a namespace."
    })];
    for c in &columns {
        definitions.push(json!({
            "name": c["name"], "type": c["type"], "format": c["format"].as_str().unwrap_or(""),
            "description": c["description"].as_str().unwrap_or(""), "priority": c["priority"].as_i64().unwrap_or(0)
        }));
    }
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| {
            let mut cells = vec![o["metadata"]["name"].clone()];
            for c in &columns {
                let path = c["jsonPath"].as_str().unwrap_or_default();
                let v = path.trim_start_matches('.').split('.').fold(o, |v, p| &v[p]).clone();
                cells.push(match (c["type"].as_str(), &v) {
                    (Some("date"), Value::String(s)) => json!(age(s, now)),
                    _ => v,
                });
            }
            json!({
                "cells": cells,
                "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"]}
            })
        })
        .collect();
    Some(json!({
        "kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": rv.to_string()},
        "columnDefinitions": definitions, "rows": rows
    }))
}

/// `5s`, `3m`, `2h`, `4d`: seconds since an RFC 3339 UTC time (`YYYY-MM-DDTHH:MM:SSZ`).
fn age(time: &str, now: u64) -> String {
    let Some(then) = epoch_seconds(time) else { return "<invalid>".to_owned() };
    let s = now.saturating_sub(then);
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

fn epoch_seconds(t: &str) -> Option<u64> {
    let n = |r: std::ops::Range<usize>| t.get(r).and_then(|s| s.parse::<i64>().ok());
    let (y, m, d) = (n(0..4)?, n(5..7)?, n(8..10)?);
    let (hh, mm, ss) = (n(11..13)?, n(14..16)?, n(17..19)?);
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86400 + hh * 3600 + mm * 60 + ss).ok()
}
