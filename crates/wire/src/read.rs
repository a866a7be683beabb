//! Reading a request body (a JSON object) field by field, so that every field of the wrong
//! JSON type is reported at once. What a well-typed value means (a valid name, a known spec)
//! is the service's to decide.

use basphere_core::FieldErrors;
use serde_json::{Map, Value};

/// The refusal of text holding a NUL character.
const NUL: &str = "must not contain a NUL character (\\u0000)";

/// A JSON object being read; the fields of the wrong type collect in `errors`.
pub struct Object<'a> {
    map: &'a Map<String, Value>,
    pub errors: FieldErrors,
}

impl<'a> Object<'a> {
    pub fn new(map: &'a Map<String, Value>) -> Self {
        Self {
            map,
            errors: FieldErrors::new(),
        }
    }

    /// A string field: `None` when absent, `null`, of another type or holding a NUL character
    /// (then recorded: no database stores that in text).
    pub fn str(&mut self, key: &str) -> Option<String> {
        match self.map.get(key) {
            Some(Value::String(s)) if s.contains('\0') => {
                self.errors.push(key, NUL);
                None
            }
            Some(Value::String(s)) => Some(s.clone()),
            None | Some(Value::Null) => None,
            Some(_) => {
                self.errors.push(key, "must be a string");
                None
            }
        }
    }

    /// A whole-number field (a JSON number, or a string holding one, as forms send).
    pub fn int(&mut self, key: &str) -> Option<i64> {
        let bad = |o: &mut Self| {
            o.errors.push(key, "must be a whole number");
            None
        };
        match self.map.get(key) {
            Some(Value::Number(n)) => match n.as_i64() {
                Some(v) => Some(v),
                None => bad(self),
            },
            Some(Value::String(s)) => match s.parse() {
                Ok(v) => Some(v),
                Err(_) => bad(self),
            },
            None | Some(Value::Null) => None,
            Some(_) => bad(self),
        }
    }
}

impl Object<'_> {
    /// A list of extra disks: `[{"size_gb": 20, "mode": "raw"}, …]`, or (as a form sends it)
    /// one string of comma-separated `SIZE[G][:MODE]`. Bad entries are recorded by position.
    pub fn disks(&mut self, key: &str) -> Option<Vec<crate::DiskRequest>> {
        match self.map.get(key) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => {
                let mut out = vec![];
                for (i, part) in s
                    .split(',')
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .enumerate()
                {
                    match crate::DiskRequest::parse(part) {
                        Ok(d) => out.push(d),
                        Err(e) => self.errors.push(&format!("{key}[{i}]"), e),
                    }
                }
                Some(out)
            }
            Some(Value::Array(items)) => {
                let mut out = vec![];
                for (i, item) in items.iter().enumerate() {
                    let at = format!("{key}[{i}]");
                    let Value::Object(m) = item else {
                        self.errors.push(
                            &at,
                            "must be an object {\"size_gb\": N, \"mode\": \"auto\"|\"raw\"}",
                        );
                        continue;
                    };
                    let mut o = Object::new(m);
                    let size_gb = o.int("size_gb");
                    let mode = o.str("mode");
                    for e in &o.errors.0 {
                        self.errors
                            .push(&format!("{at}.{}", e.field), e.message.clone());
                    }
                    match size_gb {
                        Some(size_gb) => out.push(crate::DiskRequest { size_gb, mode }),
                        // Absent or null (a wrong type was recorded by `int`).
                        None if m.get("size_gb").is_none_or(Value::is_null) => {
                            self.errors.push(&format!("{at}.size_gb"), "is required")
                        }
                        None => {}
                    }
                }
                Some(out)
            }
            Some(_) => {
                self.errors.push(key, "must be a list of {size_gb, mode}");
                None
            }
        }
    }

    /// A list of strings, or (as a form sends it) one string of comma-separated items.
    pub fn strs(&mut self, key: &str) -> Option<Vec<String>> {
        match self.map.get(key) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.contains('\0') => {
                self.errors.push(key, NUL);
                None
            }
            Some(Value::String(s)) => Some(
                s.split(',')
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .map(str::to_string)
                    .collect(),
            ),
            Some(Value::Array(items)) => {
                let mut out = vec![];
                for (i, item) in items.iter().enumerate() {
                    match item {
                        Value::String(s) if s.contains('\0') => {
                            self.errors.push(&format!("{key}[{i}]"), NUL)
                        }
                        Value::String(s) => out.push(s.clone()),
                        _ => self.errors.push(&format!("{key}[{i}]"), "must be a string"),
                    }
                }
                Some(out)
            }
            Some(_) => {
                self.errors.push(key, "must be a list of strings");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn wrong_types_are_recorded_per_field() {
        let v = json!({"a": "x", "b": 5, "c": "7", "d": "seven", "e": null, "f": [1],
            "g": "a\u{0}b", "h": ["ok", "n\u{0}"]});
        let mut o = Object::new(v.as_object().unwrap());
        assert_eq!(o.str("a").as_deref(), Some("x"));
        assert_eq!(o.str("b"), None);
        assert_eq!(o.int("b"), Some(5));
        assert_eq!(o.int("c"), Some(7));
        assert_eq!(o.int("d"), None);
        assert_eq!(o.str("e"), None);
        assert_eq!(o.int("f"), None);
        assert_eq!(o.str("missing"), None);
        assert_eq!(o.str("g"), None);
        assert_eq!(o.strs("h"), Some(vec!["ok".to_string()]));
        assert_eq!(
            o.errors.lines(),
            [
                "b: must be a string",
                "d: must be a whole number",
                "f: must be a whole number",
                "g: must not contain a NUL character (\\u0000)",
                "h[1]: must not contain a NUL character (\\u0000)",
            ]
        );
    }
}
