//! Just enough JSON output for the agent's reports, without a serialisation framework.

use std::fmt::Write;

/// Appends `s` as a JSON string literal.
pub fn push_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Builds one JSON object, field by field.
#[derive(Debug)]
pub struct Object {
    out: String,
    first: bool,
}

impl Default for Object {
    fn default() -> Self {
        Self::new()
    }
}

impl Object {
    /// An empty object.
    pub fn new() -> Self {
        Self { out: String::from("{"), first: true }
    }

    fn key(&mut self, key: &str) -> &mut String {
        if !self.first {
            self.out.push(',');
        }
        self.first = false;
        push_str(&mut self.out, key);
        self.out.push(':');
        &mut self.out
    }

    /// A string field.
    pub fn str(mut self, key: &str, value: &str) -> Self {
        push_str(self.key(key), value);
        self
    }

    /// An unsigned number field.
    pub fn u64(mut self, key: &str, value: u64) -> Self {
        let _ = write!(self.key(key), "{value}");
        self
    }

    /// A number field, or `null`.
    pub fn opt_u64(mut self, key: &str, value: Option<u64>) -> Self {
        match value {
            Some(v) => {
                let _ = write!(self.key(key), "{v}");
            }
            None => self.key(key).push_str("null"),
        }
        self
    }

    /// A boolean field.
    pub fn bool(mut self, key: &str, value: bool) -> Self {
        self.key(key).push_str(if value { "true" } else { "false" });
        self
    }

    /// A field whose value is already JSON (an object or array built elsewhere).
    pub fn raw(mut self, key: &str, json: &str) -> Self {
        self.key(key).push_str(json);
        self
    }

    /// The finished object.
    pub fn finish(mut self) -> String {
        self.out.push('}');
        self.out
    }
}

/// A JSON array of already-serialised items.
pub fn array<I: IntoIterator<Item = String>>(items: I) -> String {
    let mut out = String::from("[");
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&item);
    }
    out.push(']');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_nests() {
        let inner = Object::new().u64("a", 1).opt_u64("b", None).finish();
        let json = Object::new()
            .str("s", "q\"b\\n\nt\u{1}é")
            .bool("ok", true)
            .raw("inner", &inner)
            .raw("list", &array(vec!["1".to_owned(), "2".to_owned()]))
            .finish();
        assert_eq!(json, r#"{"s":"q\"b\\n\nt\u0001é","ok":true,"inner":{"a":1,"b":null},"list":[1,2]}"#);
    }
}
