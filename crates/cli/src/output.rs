use crate::args::Output;
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use serde_json::Value;

/// A cell's text for a JSON value (`-` for nothing: null, or the empty string the prototype's
/// shapes send for an unknown address).
pub fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Prints `rows` (JSON objects) as a table of `cols` (header, key), or as JSON.
pub fn table(out: Output, rows: &Value, cols: &[(&str, &str)]) {
    if out == Output::Json {
        println!("{}", serde_json::to_string_pretty(rows).unwrap_or_default());
        return;
    }
    let items = rows.as_array().cloned().unwrap_or_default();
    if items.is_empty() {
        println!("(none)");
        return;
    }
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(cols.iter().map(|c| c.0));
    for it in &items {
        t.add_row(
            cols.iter()
                .map(|c| cell(it.pointer(c.1).unwrap_or(&Value::Null))),
        );
    }
    println!("{t}");
}

/// Prints a JSON object as `key: value` lines, or as JSON.
pub fn fields(out: Output, v: &Value) {
    if out == Output::Json {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
        return;
    }
    if let Some(m) = v.as_object() {
        let w = m.keys().map(|k| k.len()).max().unwrap_or(0);
        for (k, v) in m {
            match v {
                Value::Object(_) | Value::Array(_) => println!("{k:w$}  {}", v),
                _ => println!("{k:w$}  {}", cell(v)),
            }
        }
    } else {
        println!("{}", cell(v));
    }
}
