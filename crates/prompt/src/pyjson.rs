//! JSON written the way Python's `json.dumps` writes it.
//!
//! Hugging Face's `tojson` filter is `json.dumps(x, ensure_ascii=False,
//! indent=indent, separators=separators, sort_keys=sort_keys)`, so a
//! template prints `{"name": "f", "arguments": {"x": 1}}`, with a space after
//! every `,` and `:`, and leaves `<` and non-ASCII text alone. Models are
//! trained on exactly that text (tool lists, earlier tool calls), while
//! minijinja's own `tojson` writes compact, HTML-escaped JSON. This module
//! reproduces Python's output; the Hermes-style tool-call convention uses it
//! too.

use serde_json::Value;

/// The options of Python's `json.dumps` that templates use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DumpOptions {
    /// The indentation of each nesting level; `None` writes one line.
    pub(crate) indent: Option<String>,
    /// Between items: `", "` on one line, `","` when indented.
    pub(crate) item_separator: String,
    /// Between a key and its value.
    pub(crate) key_separator: String,
    /// Sort object keys instead of keeping their order.
    pub(crate) sort_keys: bool,
    /// Escape every non-ASCII character as `\uXXXX`.
    pub(crate) ensure_ascii: bool,
}

impl Default for DumpOptions {
    fn default() -> Self {
        Self {
            indent: None,
            item_separator: ", ".to_owned(),
            key_separator: ": ".to_owned(),
            sort_keys: false,
            ensure_ascii: false,
        }
    }
}

impl DumpOptions {
    /// Python's defaults for an indentation: the item separator loses its
    /// trailing space, since a newline follows it.
    pub(crate) fn indented(indent: String) -> Self {
        Self {
            indent: Some(indent),
            item_separator: ",".to_owned(),
            ..Self::default()
        }
    }
}

/// `json.dumps(value)` with Python's default separators.
pub(crate) fn dumps(value: &Value) -> String {
    dumps_with(value, &DumpOptions::default())
}

/// `json.dumps(value, ...)` with `options`.
pub(crate) fn dumps_with(value: &Value, options: &DumpOptions) -> String {
    let mut out = String::new();
    write_value(&mut out, value, options, 0);
    out
}

fn newline(out: &mut String, options: &DumpOptions, depth: usize) {
    if let Some(indent) = &options.indent {
        out.push('\n');
        for _ in 0..depth {
            out.push_str(indent);
        }
    }
}

fn write_value(out: &mut String, value: &Value, options: &DumpOptions, depth: usize) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => write_string(out, s, options.ensure_ascii),
        Value::Array(items) => {
            if items.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&options.item_separator);
                }
                newline(out, options, depth + 1);
                write_value(out, item, options, depth + 1);
            }
            newline(out, options, depth);
            out.push(']');
        }
        Value::Object(map) => {
            if map.is_empty() {
                out.push_str("{}");
                return;
            }
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            if options.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(&options.item_separator);
                }
                newline(out, options, depth + 1);
                write_string(out, key, options.ensure_ascii);
                out.push_str(&options.key_separator);
                write_value(out, item, options, depth + 1);
            }
            newline(out, options, depth);
            out.push('}');
        }
    }
}

/// A JSON string literal with Python's escapes: `"`, `\`, `\n`, `\r`,
/// `\t`, `\b`, `\f`, other control characters as `\u00XX`, and with
/// `ensure_ascii` every non-ASCII character as `\uXXXX` (surrogate pairs
/// above the BMP).
fn write_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && !c.is_ascii()) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    // Each expected string is what CPython 3's json.dumps prints.
    #[test]
    fn matches_python_json_dumps() {
        let v = json!({"b": [1, 2.5, null], "a": "<x> é \"q\"\n", "e": {}, "f": []});
        assert_eq!(
            dumps(&v),
            r#"{"b": [1, 2.5, null], "a": "<x> é \"q\"\n", "e": {}, "f": []}"#
        );
        let sorted = DumpOptions {
            sort_keys: true,
            ensure_ascii: true,
            ..DumpOptions::default()
        };
        assert_eq!(
            dumps_with(&json!({"b": "é🙂", "a": "\u{1}"}), &sorted),
            r#"{"a": "\u0001", "b": "\u00e9\ud83d\ude42"}"#
        );
        assert_eq!(
            dumps_with(
                &json!({"a": [1, {"b": true}], "c": {}}),
                &DumpOptions::indented("  ".to_owned())
            ),
            "{\n  \"a\": [\n    1,\n    {\n      \"b\": true\n    }\n  ],\n  \"c\": {}\n}"
        );
    }
}
