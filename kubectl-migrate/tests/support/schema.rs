//! What the API server does with a custom resource's structural schema on every write, from the
//! committed CRD in deploy/: prune unknown fields, apply defaults, validate (type, nullable,
//! enum, pattern, length, minimum and maximum, required), and evaluate the CEL rules
//! (`x-kubernetes-validations`, transition rules only on updates). There is no CEL interpreter
//! here: [`cel`] knows the rules the CRD uses, and a rule it does not know fails the test, so a
//! new rule in the types comes with its meaning here.

use std::path::Path;

use serde_json::{Map, Value};

/// A custom resource as its CRD describes it.
#[derive(Debug, Clone)]
pub struct CrdSchema {
    pub group: String,
    pub plural: String,
    /// The first version's openAPIV3Schema.
    pub schema: Value,
    /// The first version's selectableFields, without the leading dot.
    pub selectable: Vec<String>,
}

/// The CRD in `deploy/<file>`.
pub fn from_deploy(file: &str) -> CrdSchema {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let crd: Value = serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let spec = &crd["spec"];
    let version = &spec["versions"][0];
    CrdSchema {
        group: spec["group"].as_str().unwrap_or_default().to_owned(),
        plural: spec["names"]["plural"].as_str().unwrap_or_default().to_owned(),
        schema: version["schema"]["openAPIV3Schema"].clone(),
        selectable: version["selectableFields"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|f| f["jsonPath"].as_str().map(|p| p.trim_start_matches('.').to_owned()))
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// Prunes, defaults and validates `obj` (a whole object: `metadata`, `apiVersion` and `kind` are
/// left alone). Returns the field errors, `path: detail`, in the API server's words.
pub fn admit(schema: &Value, obj: &mut Value, old: Option<&Value>) -> Vec<String> {
    let mut errors = Vec::new();
    if let (Some(props), Some(o)) = (schema["properties"].as_object(), obj.as_object_mut()) {
        o.retain(|k, _| matches!(k.as_str(), "metadata" | "apiVersion" | "kind") || props.contains_key(k));
        for (k, sub) in props {
            apply_default(sub, o, k);
            if let Some(v) = o.get_mut(k) {
                walk(sub, v, old.and_then(|o| o.get(k)), k, &mut errors);
            }
        }
        for r in strings(&schema["required"]) {
            if !o.contains_key(&r) {
                errors.push(format!("{r}: Required value"));
            }
        }
    }
    errors
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect()).unwrap_or_default()
}

fn apply_default(schema: &Value, parent: &mut Map<String, Value>, key: &str) {
    if !parent.contains_key(key) {
        if let Some(d) = schema.get("default") {
            parent.insert(key.to_owned(), d.clone());
        }
    }
}

fn walk(schema: &Value, v: &mut Value, old: Option<&Value>, path: &str, errors: &mut Vec<String>) {
    if v.is_null() {
        if schema["nullable"] != true {
            errors.push(format!(
                "{path}: Invalid value: \"null\": {path} in body must be of type {}",
                schema["type"]
            ));
        }
        return;
    }
    let ty = schema["type"].as_str().unwrap_or("");
    let type_ok = match ty {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        _ => true,
    };
    if !type_ok {
        errors
            .push(format!("{path}: Invalid value: \"{}\": {path} in body must be of type {ty}", kind_of(v)));
        return;
    }
    if let Some(allowed) = schema["enum"].as_array() {
        if !allowed.contains(v) {
            let list: Vec<String> = allowed.iter().map(|a| a.to_string()).collect();
            errors.push(format!("{path}: Unsupported value: {v}: supported values: {}", list.join(", ")));
        }
    }
    if let Some(s) = v.as_str() {
        let len = s.chars().count() as u64;
        if schema["maxLength"].as_u64().is_some_and(|m| len > m) {
            errors.push(format!("{path}: Too long: may not be more than {} bytes", schema["maxLength"]));
        }
        if schema["minLength"].as_u64().is_some_and(|m| len < m) {
            errors.push(format!(
                "{path}: Invalid value: {v}: {path} in body should be at least {} chars long",
                schema["minLength"]
            ));
        }
        if let Some(p) = schema["pattern"].as_str() {
            if !regex::Regex::new(p).is_ok_and(|re| re.is_match(s)) {
                errors.push(format!("{path}: Invalid value: {v}: {path} in body should match '{p}'"));
            }
        }
    }
    if let Some(n) = v.as_f64() {
        if schema["minimum"].as_f64().is_some_and(|m| n < m) {
            errors.push(format!(
                "{path}: Invalid value: {v}: {path} in body should be greater than or equal to {}",
                schema["minimum"]
            ));
        }
        if schema["maximum"].as_f64().is_some_and(|m| n > m) {
            errors.push(format!(
                "{path}: Invalid value: {v}: {path} in body should be less than or equal to {}",
                schema["maximum"]
            ));
        }
    }
    match v {
        Value::Object(o) => {
            if let Some(props) = schema["properties"].as_object() {
                if schema["x-kubernetes-preserve-unknown-fields"] != true {
                    o.retain(|k, _| props.contains_key(k));
                }
                for (k, sub) in props {
                    apply_default(sub, o, k);
                    if let Some(child) = o.get_mut(k) {
                        walk(sub, child, old.and_then(|o| o.get(k)), &format!("{path}.{k}"), errors);
                    }
                }
            }
            for r in strings(&schema["required"]) {
                if !o.contains_key(&r) {
                    errors.push(format!("{path}.{r}: Required value"));
                }
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                walk(&schema["items"], item, None, &format!("{path}[{i}]"), errors);
            }
        }
        _ => {}
    }
    for rule in schema["x-kubernetes-validations"].as_array().into_iter().flatten() {
        let text = rule["rule"].as_str().unwrap_or_default();
        if text.contains("oldSelf") && old.is_none() {
            continue;
        }
        if !cel(text, v, old) {
            let message =
                rule["message"].as_str().map_or_else(|| format!("failed rule: {text}"), str::to_owned);
            errors.push(format!("{path}: Invalid value: \"{}\": {message}", kind_of(v)));
        }
    }
}

/// The CEL rules the CRD uses, evaluated on `this` (`self`) and `old` (`oldSelf`).
///
/// # Panics
/// On a rule this fake does not know: teach it the rule's meaning.
pub fn cel(rule: &str, this: &Value, old: Option<&Value>) -> bool {
    let null = Value::Null;
    let old = old.unwrap_or(&null);
    let duration = |v: &Value| v.as_str().and_then(|s| katamaran_api::units::parse_duration(s).ok());
    let range = regex::Regex::new(
        r"^duration\(self\) (>=|>) duration\('([^']+)'\)(?: && duration\(self\) <= duration\('([^']+)'\))?$",
    )
    .unwrap();
    if let Some(c) = range.captures(rule) {
        let bound = |i: usize| c.get(i).map(|m| katamaran_api::units::parse_duration(m.as_str()).unwrap());
        let Some(d) = duration(this) else { return false };
        let low = bound(2).unwrap();
        let above = if &c[1] == ">=" { d >= low } else { d > low };
        return above && bound(3).is_none_or(|high| d <= high);
    }
    let has = |v: &Value, k: &str| v.get(k).is_some_and(|x| !x.is_null());
    match rule {
        "self.pod == oldSelf.pod && self.targetNode == oldSelf.targetNode && has(self.options) == has(oldSelf.options) && (!has(self.options) || self.options == oldSelf.options)" => {
            this["pod"] == old["pod"]
                && this["targetNode"] == old["targetNode"]
                && has(this, "options") == has(old, "options")
                && (!has(this, "options") || this["options"] == old["options"])
        }
        "!has(oldSelf.cancel) || !oldSelf.cancel || (has(self.cancel) && self.cancel)" => {
            !has(old, "cancel") || old["cancel"] != true || this["cancel"] == true
        }
        other => panic!("the fake API server does not evaluate the CEL rule {other:?}: teach support/schema.rs"),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}
