//! The fake API server's object store: any resource of [`TYPES`] as JSON, with what a controller
//! relies on from etcd and the API server's registry:
//!
//! - one `resourceVersion` counter for the whole store, bumped by every write, with a bounded
//!   history of changes for watches (older than the history: 410 Gone, as after compaction);
//! - `uid`, `creationTimestamp`, `generation` (bumped when anything but metadata and status
//!   changes);
//! - optimistic concurrency: a write carrying a `resourceVersion` that is not the current one is
//!   a 409 Conflict;
//! - the status subresource: writes to the object leave `status` alone, writes to `/status`
//!   change only `status`;
//! - finalizers: DELETE of an object with finalizers sets `deletionTimestamp`; the object goes
//!   when a write leaves its finalizers empty; new finalizers cannot be added once deleting;
//! - JSON merge patches (RFC 7386), JSON patches (RFC 6902), and strategic-merge and apply
//!   patches treated as merge patches (no list merging by key, no field managers);
//! - label selectors (`=`, `==`, `!=`, `key`, `!key`) and field selectors on any dotted path;
//! - custom resources pruned, defaulted and validated by their CRD in deploy/ ([`super::schema`]).

use std::collections::{BTreeMap, VecDeque};

use serde_json::{json, Map, Value};

/// A resource the store serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceType {
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub status_subresource: bool,
}

impl ResourceType {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `migrations.katamaran.io`, `pods`: how error messages name it.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_owned()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

const fn rt(
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
    status_subresource: bool,
) -> ResourceType {
    ResourceType { group, version, plural, kind, namespaced, status_subresource }
}

pub const TYPES: &[ResourceType] = &[
    rt("", "v1", "pods", "Pod", true, true),
    rt("", "v1", "nodes", "Node", false, true),
    rt("", "v1", "events", "Event", true, false),
    rt("", "v1", "namespaces", "Namespace", false, true),
    rt("", "v1", "secrets", "Secret", true, false),
    rt("events.k8s.io", "v1", "events", "Event", true, false),
    rt("katamaran.io", "v1alpha1", "migrations", "Migration", true, true),
];

pub fn find_type(group: &str, version: &str, plural: &str) -> Option<ResourceType> {
    TYPES.iter().copied().find(|t| t.group == group && t.version == version && t.plural == plural)
}

/// A failed request, as the API server's `Status`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self { code, reason, message: message.into() }
    }

    pub fn to_status(&self) -> Value {
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": self.message, "reason": self.reason, "code": self.code
        })
    }

    fn not_found(t: &ResourceType, name: &str) -> Self {
        Self::new(404, "NotFound", format!("{} \"{name}\" not found", t.qualified()))
    }
}

/// A change, as a watch delivers it.
#[derive(Debug, Clone)]
pub struct Change {
    pub rv: u64,
    pub kind: &'static str,
    pub ty: ResourceType,
    pub namespace: Option<String>,
    pub object: Value,
}

/// How a patch body is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchKind {
    Merge,
    Json,
}

impl PatchKind {
    pub fn from_content_type(ct: &str) -> Option<Self> {
        match ct.split(';').next().unwrap_or("").trim() {
            "application/merge-patch+json"
            | "application/strategic-merge-patch+json"
            | "application/apply-patch+yaml" => Some(PatchKind::Merge),
            "application/json-patch+json" => Some(PatchKind::Json),
            _ => None,
        }
    }
}

type Key = (&'static str, &'static str, String, String);

fn key(t: &ResourceType, ns: Option<&str>, name: &str) -> Key {
    (t.group, t.plural, ns.unwrap_or("").to_owned(), name.to_owned())
}

pub struct Store {
    objects: BTreeMap<Key, Value>,
    rv: u64,
    history: VecDeque<Change>,
    /// Changes kept for watches; older resource versions are Gone.
    pub history_limit: usize,
    /// Resource versions at or below this were compacted away.
    compacted: u64,
    next_uid: u64,
    /// Watchers: changes matching their filter are sent as they happen.
    watchers: Vec<(Filter, tokio::sync::mpsc::UnboundedSender<Change>)>,
    /// The custom resources' CRDs, from deploy/.
    schemas: Vec<super::schema::CrdSchema>,
}

/// What one list or watch selects.
#[derive(Debug, Clone)]
pub struct Filter {
    pub ty: ResourceType,
    pub namespace: Option<String>,
    pub labels: String,
    pub fields: String,
}

impl Filter {
    pub fn matches(&self, t: &ResourceType, ns: Option<&str>, obj: &Value) -> bool {
        t == &self.ty
            && (self.namespace.is_none() || self.namespace.as_deref() == ns)
            && label_selector_matches(&self.labels, &obj["metadata"]["labels"])
            && field_selector_matches(&self.fields, obj)
    }
}

impl Default for Store {
    fn default() -> Self {
        Self {
            objects: BTreeMap::new(),
            rv: 1,
            history: VecDeque::new(),
            history_limit: 1000,
            compacted: 0,
            next_uid: 1,
            watchers: Vec::new(),
            schemas: vec![super::schema::from_deploy("crd-migration.yaml")],
        }
    }
}

fn now() -> String {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = t.as_secs();
    let (days, rem) = (secs / 86400, secs % 86400);
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Everything but `metadata` and `status`: what `generation` follows.
fn spec_part(obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Some(m) = v.as_object_mut() {
        for k in ["metadata", "status", "resourceVersion"] {
            m.remove(k);
        }
    }
    v
}

fn finalizers(obj: &Value) -> Vec<String> {
    obj["metadata"]["finalizers"]
        .as_array()
        .map(|a| a.iter().filter_map(|f| f.as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

impl Store {
    /// Prunes, defaults and validates a custom resource as its CRD says (422 Invalid).
    fn admit(
        &self,
        t: &ResourceType,
        name: &str,
        obj: &mut Value,
        old: Option<&Value>,
    ) -> Result<(), ApiError> {
        let Some(crd) = self.schemas.iter().find(|c| c.group == t.group && c.plural == t.plural) else {
            return Ok(());
        };
        let errors = super::schema::admit(&crd.schema, obj, old);
        match errors.as_slice() {
            [] => Ok(()),
            [one] => Err(ApiError::new(
                422,
                "Invalid",
                format!("{}.{} \"{name}\" is invalid: {one}", t.kind, t.group),
            )),
            many => Err(ApiError::new(
                422,
                "Invalid",
                format!("{}.{} \"{name}\" is invalid: [{}]", t.kind, t.group, many.join(", ")),
            )),
        }
    }

    /// Refuses a field selector on a field the API server does not index for this type: the
    /// built-in types' field labels, a custom resource's metadata.name, metadata.namespace and
    /// its CRD's selectableFields.
    pub fn check_field_selector(&self, t: &ResourceType, selector: &str) -> Result<(), ApiError> {
        let builtin: Option<&[&str]> = match (t.group, t.plural) {
            ("", "pods") => Some(&[
                "metadata.name",
                "metadata.namespace",
                "spec.nodeName",
                "spec.restartPolicy",
                "spec.schedulerName",
                "spec.serviceAccountName",
                "spec.hostNetwork",
                "status.phase",
                "status.podIP",
                "status.podIPs",
                "status.nominatedNodeName",
            ]),
            ("", "nodes") => Some(&["metadata.name", "spec.unschedulable"]),
            ("", "namespaces") => Some(&["metadata.name", "status.phase"]),
            ("", "events") => Some(&[
                "metadata.name",
                "metadata.namespace",
                "involvedObject.kind",
                "involvedObject.namespace",
                "involvedObject.name",
                "involvedObject.uid",
                "involvedObject.apiVersion",
                "involvedObject.resourceVersion",
                "involvedObject.fieldPath",
                "reason",
                "reportingComponent",
                "source",
                "type",
            ]),
            _ => None,
        };
        let custom = self.schemas.iter().find(|c| c.group == t.group && c.plural == t.plural);
        for term in selector.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let field = term.split(['=', '!']).next().unwrap_or_default().trim();
            let known = match (builtin, custom) {
                (Some(list), _) => list.contains(&field),
                (None, Some(c)) => {
                    matches!(field, "metadata.name" | "metadata.namespace")
                        || c.selectable.iter().any(|f| f == field)
                }
                (None, None) => true,
            };
            if !known {
                return Err(ApiError::new(400, "BadRequest", format!("field label not supported: {field}")));
            }
        }
        Ok(())
    }

    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    /// Sends every watch a BOOKMARK at the current resource version (watches that did not ask
    /// for bookmarks drop it).
    pub fn bookmark(&mut self) {
        let rv = self.rv;
        self.watchers.retain(|(f, tx)| {
            let object = json!({
                "kind": f.ty.kind, "apiVersion": f.ty.api_version(),
                "metadata": {"resourceVersion": rv.to_string()}
            });
            tx.send(Change { rv, kind: "BOOKMARK", ty: f.ty, namespace: None, object }).is_ok()
        });
    }

    /// Forgets the watch history up to now: a watch from an older version gets 410 Gone.
    pub fn compact(&mut self) {
        self.compacted = self.rv;
        self.history.clear();
    }

    fn record(&mut self, kind: &'static str, t: ResourceType, ns: Option<&str>, object: &Value) {
        let change =
            Change { rv: self.rv, kind, ty: t, namespace: ns.map(str::to_owned), object: object.clone() };
        self.watchers.retain(|(f, tx)| !f.matches(&t, ns, object) || tx.send(change.clone()).is_ok());
        self.history.push_back(change);
        while self.history.len() > self.history_limit {
            if let Some(old) = self.history.pop_front() {
                self.compacted = old.rv;
            }
        }
    }

    fn bump(&mut self, obj: &mut Value) {
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
    }

    pub fn get(&self, t: &ResourceType, ns: Option<&str>, name: &str) -> Result<Value, ApiError> {
        self.objects.get(&key(t, ns, name)).cloned().ok_or_else(|| ApiError::not_found(t, name))
    }

    /// The objects `filter` selects and the list's resource version.
    pub fn list(&self, filter: &Filter) -> (Vec<Value>, u64) {
        let items = self
            .objects
            .iter()
            .filter(|((g, p, ns, _), obj)| {
                *g == filter.ty.group
                    && *p == filter.ty.plural
                    && filter.matches(&filter.ty, (!ns.is_empty()).then_some(ns.as_str()), obj)
            })
            .map(|(_, v)| v.clone())
            .collect();
        (items, self.rv)
    }

    /// Registers a watch from resource version `from` (None: from now, after synthetic ADDED
    /// events for what exists). Returns the changes to replay first.
    ///
    /// A version older than the history answers 410 Gone.
    pub fn watch(
        &mut self,
        filter: Filter,
        from: Option<u64>,
        tx: tokio::sync::mpsc::UnboundedSender<Change>,
    ) -> Result<Vec<Change>, ApiError> {
        let replay = match from {
            Some(rv) if rv < self.compacted => {
                return Err(ApiError::new(
                    410,
                    "Expired",
                    format!("too old resource version: {rv} ({})", self.compacted + 1),
                ))
            }
            Some(rv) => self
                .history
                .iter()
                .filter(|c| c.rv > rv && filter.matches(&c.ty, c.namespace.as_deref(), &c.object))
                .cloned()
                .collect(),
            None => {
                let (items, rv) = self.list(&filter);
                items
                    .into_iter()
                    .map(|object| Change {
                        rv,
                        kind: "ADDED",
                        ty: filter.ty,
                        namespace: object["metadata"]["namespace"].as_str().map(str::to_owned),
                        object,
                    })
                    .collect()
            }
        };
        self.watchers.push((filter, tx));
        Ok(replay)
    }

    /// Whether a list at `rv` can be served: older than the history is Gone.
    pub fn check_list_version(&self, rv: Option<u64>) -> Result<(), ApiError> {
        match rv {
            Some(rv) if rv != 0 && rv < self.compacted => Err(ApiError::new(
                410,
                "Expired",
                format!("too old resource version: {rv} ({})", self.compacted + 1),
            )),
            _ => Ok(()),
        }
    }

    pub fn create(&mut self, t: &ResourceType, ns: Option<&str>, mut obj: Value) -> Result<Value, ApiError> {
        if !obj.is_object() {
            return Err(ApiError::new(400, "BadRequest", "the body is not an object"));
        }
        if obj["metadata"].is_null() {
            obj["metadata"] = json!({});
        }
        let name = match (obj["metadata"]["name"].as_str(), obj["metadata"]["generateName"].as_str()) {
            (Some(n), _) if !n.is_empty() => n.to_owned(),
            (_, Some(prefix)) => format!("{prefix}{:05x}", self.next_uid * 7919 % 0xfffff),
            _ => {
                return Err(ApiError::new(
                    422,
                    "Invalid",
                    format!("{} \"\" is invalid: metadata.name: Required value", t.kind),
                ))
            }
        };
        if let Some(body_ns) = obj["metadata"]["namespace"].as_str() {
            if Some(body_ns) != ns {
                return Err(ApiError::new(
                    400,
                    "BadRequest",
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
        }
        let k = key(t, ns, &name);
        if self.objects.contains_key(&k) {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", t.qualified()),
            ));
        }
        obj["apiVersion"] = json!(t.api_version());
        obj["kind"] = json!(t.kind);
        let m = &mut obj["metadata"];
        m["name"] = json!(name);
        if let Some(ns) = ns {
            m["namespace"] = json!(ns);
        }
        m["uid"] = json!(format!("00000000-0000-4000-8000-{:012x}", self.next_uid));
        self.next_uid += 1;
        m["creationTimestamp"] = json!(now());
        m["generation"] = json!(1);
        if let Some(m) = m.as_object_mut() {
            m.remove("deletionTimestamp");
        }
        if t.status_subresource && t.group == "katamaran.io" {
            // A custom resource's status is set through /status only.
            if let Some(o) = obj.as_object_mut() {
                o.remove("status");
            }
        }
        self.admit(t, &name, &mut obj, None)?;
        self.bump(&mut obj);
        self.objects.insert(k, obj.clone());
        self.record("ADDED", *t, ns, &obj);
        Ok(obj)
    }

    /// Seeds an object as it is (fixtures), with a resource version.
    pub fn insert(&mut self, t: &ResourceType, mut obj: Value) {
        let ns = obj["metadata"]["namespace"].as_str().map(str::to_owned);
        let name = obj["metadata"]["name"].as_str().unwrap_or_default().to_owned();
        obj["apiVersion"] = json!(t.api_version());
        obj["kind"] = json!(t.kind);
        self.bump(&mut obj);
        self.objects.insert(key(t, ns.as_deref(), &name), obj.clone());
        self.record("ADDED", *t, ns.as_deref(), &obj);
    }

    /// PUT: the whole object (or its status with `status`).
    pub fn update(
        &mut self,
        t: &ResourceType,
        ns: Option<&str>,
        name: &str,
        obj: Value,
        status: bool,
    ) -> Result<Value, ApiError> {
        let current = self.get(t, ns, name)?;
        if obj["metadata"]["name"].as_str().is_some_and(|n| n != name) {
            return Err(ApiError::new(
                400,
                "BadRequest",
                "the name of the object does not match the name on the URL",
            ));
        }
        if let Some(rv) = obj["metadata"]["resourceVersion"].as_str() {
            if Some(rv) != current["metadata"]["resourceVersion"].as_str() {
                return Err(ApiError::new(
                    409,
                    "Conflict",
                    format!(
                        "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; \
                         please apply your changes to the latest version and try again",
                        t.qualified()
                    ),
                ));
            }
        }
        let mut next = if status {
            let mut next = current.clone();
            next["status"] = obj["status"].clone();
            next
        } else {
            let mut next = obj;
            if t.status_subresource {
                next["status"] = current["status"].clone();
                if next["status"].is_null() {
                    if let Some(o) = next.as_object_mut() {
                        o.remove("status");
                    }
                }
            }
            // What the server owns stays the server's.
            for field in ["uid", "creationTimestamp", "deletionTimestamp", "generation", "namespace", "name"]
            {
                match current["metadata"].get(field) {
                    Some(v) => next["metadata"][field] = v.clone(),
                    None => {
                        if let Some(m) = next["metadata"].as_object_mut() {
                            m.remove(field);
                        }
                    }
                }
            }
            next["apiVersion"] = json!(t.api_version());
            next["kind"] = json!(t.kind);
            next
        };
        if !current["metadata"]["deletionTimestamp"].is_null() {
            let before = finalizers(&current);
            if finalizers(&next).iter().any(|f| !before.contains(f)) {
                return Err(ApiError::new(
                    422,
                    "Invalid",
                    format!("{} \"{name}\" is invalid: metadata.finalizers: Forbidden: no new finalizers can be added if the object is being deleted", t.kind),
                ));
            }
        }
        self.admit(t, name, &mut next, Some(&current))?;
        if spec_part(&next) != spec_part(&current) {
            let g = current["metadata"]["generation"].as_i64().unwrap_or(1);
            next["metadata"]["generation"] = json!(g + 1);
        }
        if next == current {
            return Ok(current);
        }
        let k = key(t, ns, name);
        if !next["metadata"]["deletionTimestamp"].is_null() && finalizers(&next).is_empty() {
            self.bump(&mut next);
            self.objects.remove(&k);
            self.record("DELETED", *t, ns, &next);
            return Ok(next);
        }
        self.bump(&mut next);
        self.objects.insert(k, next.clone());
        self.record("MODIFIED", *t, ns, &next);
        Ok(next)
    }

    /// PATCH: `body` applied to the current object, then written as [`Self::update`] does.
    pub fn patch(
        &mut self,
        t: &ResourceType,
        ns: Option<&str>,
        name: &str,
        kind: PatchKind,
        body: &Value,
        status: bool,
    ) -> Result<Value, ApiError> {
        let current = self.get(t, ns, name)?;
        let mut next = current.clone();
        match kind {
            PatchKind::Merge => merge_patch(&mut next, body),
            PatchKind::Json => json_patch(&mut next, body)?,
        }
        self.update(t, ns, name, next, status)
    }

    /// DELETE: gone at once without finalizers; otherwise marked for deletion.
    pub fn delete(&mut self, t: &ResourceType, ns: Option<&str>, name: &str) -> Result<Value, ApiError> {
        let mut current = self.get(t, ns, name)?;
        let k = key(t, ns, name);
        if finalizers(&current).is_empty() {
            self.bump(&mut current);
            self.objects.remove(&k);
            self.record("DELETED", *t, ns, &current);
            return Ok(current);
        }
        if current["metadata"]["deletionTimestamp"].is_null() {
            current["metadata"]["deletionTimestamp"] = json!(now());
            current["metadata"]["deletionGracePeriodSeconds"] = json!(0);
            self.bump(&mut current);
            self.objects.insert(k, current.clone());
            self.record("MODIFIED", *t, ns, &current);
        }
        Ok(current)
    }
}

/// RFC 7386.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Some(p) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Some(t) = target.as_object_mut() {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

fn pointer_parts(path: &str) -> Result<Vec<String>, ApiError> {
    if path.is_empty() {
        return Ok(Vec::new());
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err(ApiError::new(422, "Invalid", format!("JSON pointer {path:?} does not start with /")));
    };
    Ok(rest.split('/').map(|p| p.replace("~1", "/").replace("~0", "~")).collect())
}

fn bad_path(path: &str) -> ApiError {
    ApiError::new(422, "Invalid", format!("the JSON patch path {path:?} does not exist"))
}

fn remove_at(doc: &mut Value, path: &str) -> Result<Value, ApiError> {
    let parts = pointer_parts(path)?;
    let (last, parents) = parts.split_last().ok_or_else(|| bad_path(path))?;
    let parent = parents.iter().try_fold(doc, |v, p| match v {
        Value::Object(m) => m.get_mut(p),
        Value::Array(a) => p.parse::<usize>().ok().and_then(|i| a.get_mut(i)),
        _ => None,
    });
    match parent {
        Some(Value::Object(m)) => m.remove(last).ok_or_else(|| bad_path(path)),
        Some(Value::Array(a)) => match last.parse::<usize>() {
            Ok(i) if i < a.len() => Ok(a.remove(i)),
            _ => Err(bad_path(path)),
        },
        _ => Err(bad_path(path)),
    }
}

fn add_at(doc: &mut Value, path: &str, value: Value) -> Result<(), ApiError> {
    let parts = pointer_parts(path)?;
    let Some((last, parents)) = parts.split_last() else {
        *doc = value;
        return Ok(());
    };
    let parent = parents.iter().try_fold(doc, |v, p| match v {
        Value::Object(m) => m.get_mut(p),
        Value::Array(a) => p.parse::<usize>().ok().and_then(|i| a.get_mut(i)),
        _ => None,
    });
    match parent {
        Some(Value::Object(m)) => {
            m.insert(last.clone(), value);
            Ok(())
        }
        Some(Value::Array(a)) if last == "-" => {
            a.push(value);
            Ok(())
        }
        Some(Value::Array(a)) => match last.parse::<usize>() {
            Ok(i) if i <= a.len() => {
                a.insert(i, value);
                Ok(())
            }
            _ => Err(bad_path(path)),
        },
        _ => Err(bad_path(path)),
    }
}

/// RFC 6902: add, remove, replace, move, copy, test.
pub fn json_patch(doc: &mut Value, ops: &Value) -> Result<(), ApiError> {
    let ops = ops.as_array().ok_or_else(|| ApiError::new(400, "BadRequest", "a JSON patch is an array"))?;
    let mut work = doc.clone();
    for op in ops {
        let path = op["path"]
            .as_str()
            .ok_or_else(|| ApiError::new(422, "Invalid", "a JSON patch op needs a path"))?;
        match op["op"].as_str() {
            Some("add") => add_at(&mut work, path, op["value"].clone())?,
            Some("remove") => {
                remove_at(&mut work, path)?;
            }
            Some("replace") => {
                remove_at(&mut work, path)?;
                add_at(&mut work, path, op["value"].clone())?;
            }
            Some("move") => {
                let from = op["from"].as_str().unwrap_or_default();
                let v = remove_at(&mut work, from)?;
                add_at(&mut work, path, v)?;
            }
            Some("copy") => {
                let from = op["from"].as_str().unwrap_or_default();
                let v = work.pointer(from).cloned().ok_or_else(|| bad_path(from))?;
                add_at(&mut work, path, v)?;
            }
            Some("test") => {
                if work.pointer(path) != Some(&op["value"]) {
                    return Err(ApiError::new(
                        422,
                        "Invalid",
                        format!("the server rejected our request due to an error in our request: testing value {path} failed"),
                    ));
                }
            }
            other => return Err(ApiError::new(422, "Invalid", format!("unknown JSON patch op {other:?}"))),
        }
    }
    *doc = work;
    Ok(())
}

/// `a=b,c!=d,e,!f`.
pub fn label_selector_matches(selector: &str, labels: &Value) -> bool {
    selector.split(',').map(str::trim).filter(|s| !s.is_empty()).all(|term| {
        if let Some((k, v)) = term.split_once("!=") {
            labels[k.trim()].as_str() != Some(v.trim())
        } else if let Some((k, v)) = term.split_once('=') {
            labels[k.trim_end_matches('=').trim()].as_str() == Some(v.trim_start_matches('=').trim())
        } else if let Some(k) = term.strip_prefix('!') {
            labels[k].is_null()
        } else {
            !labels[term].is_null()
        }
    })
}

/// `spec.nodeName=x,metadata.name!=y`: any dotted path of the object.
pub fn field_selector_matches(selector: &str, obj: &Value) -> bool {
    let field = |path: &str| {
        let v = path.trim().trim_start_matches('.').split('.').fold(obj, |v, p| &v[p]);
        match v {
            Value::String(s) => s.clone(),
            Value::Null => String::new(),
            other => other.to_string(),
        }
    };
    selector.split(',').map(str::trim).filter(|s| !s.is_empty()).all(|term| {
        if let Some((k, v)) = term.split_once("!=") {
            field(k) != v.trim()
        } else if let Some((k, v)) = term.split_once('=') {
            field(k.trim_end_matches('=')) == v.trim_start_matches('=').trim()
        } else {
            false
        }
    })
}
