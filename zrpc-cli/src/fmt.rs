//! Small formatting helpers: reading fields of MessagePack maps, durations,
//! tables, and what another user's strings may show on a terminal.

use std::borrow::Cow;

use rmpv::Value;

use crate::error::{exit, Failure};

/// The value of `key` in the map `v` (None if `v` is not a map or has no
/// such string key).
pub fn field<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.as_map()?
        .iter()
        .find(|(k, _)| k.as_str() == Some(key))
        .map(|(_, v)| v)
}

/// `field` as an unsigned integer (0 if missing).
pub fn u(v: &Value, key: &str) -> u64 {
    field(v, key).and_then(Value::as_u64).unwrap_or(0)
}

/// `field` as a float (also from an integer; 0 if missing).
pub fn f(v: &Value, key: &str) -> f64 {
    match field(v, key) {
        Some(Value::F64(x)) => *x,
        Some(Value::F32(x)) => f64::from(*x),
        Some(x) => x
            .as_u64()
            .map(|n| n as f64)
            .or_else(|| x.as_i64().map(|n| n as f64))
            .unwrap_or(0.0),
        None => 0.0,
    }
}

/// `field` as a string ("" if missing).
pub fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    field(v, key).and_then(Value::as_str).unwrap_or("")
}

/// Decodes a result payload (empty means nil) of at most
/// [`zrpc_cli::cli::DEFAULT_MAX_VALUES`] values.
pub fn decode(payload: &[u8]) -> Result<Value, Failure> {
    decode_at_most(payload, zrpc_cli::cli::DEFAULT_MAX_VALUES)
}

/// Decodes a result payload (empty means nil) of at most `most` values:
/// counted first, without building anything, since each decoded value
/// takes tens of bytes whatever its encoding (red-team pass 6: 16 MiB of
/// empty arrays took `zrpc call` to 1.96 GB).
pub fn decode_at_most(payload: &[u8], most: u64) -> Result<Value, Failure> {
    if payload.is_empty() {
        return Ok(Value::Nil);
    }
    if zrpc_proto::mp::Reader::new(payload)
        .count_values(most)
        .is_err()
    {
        // Either more values than allowed, or not MessagePack: the second
        // is said by the decoder below.
        if zrpc_proto::mp::Reader::new(payload)
            .count_values(u64::MAX)
            .is_ok()
        {
            return Err(Failure::new(
                exit::PROTOCOL,
                format!(
                    "the result holds more than {most} values ({} bytes); pass --max-values to print it anyway",
                    payload.len()
                ),
            ));
        }
    }
    let mut rd = payload;
    let v = rmpv::decode::read_value(&mut rd).map_err(|e| {
        Failure::new(
            exit::PROTOCOL,
            format!("the result is not valid MessagePack: {e}"),
        )
    })?;
    Ok(v)
}

/// A duration in seconds for humans: `12.3s`, `5m07s`, `3h02m`, `4d05h`.
pub fn secs(s: f64) -> String {
    if !s.is_finite() || s < 0.0 {
        return "?".into();
    }
    let whole = s as u64;
    match whole {
        0..=59 => format!("{s:.1}s"),
        60..=3599 => format!("{}m{:02}s", whole / 60, whole % 60),
        3600..=86399 => format!("{}h{:02}m", whole / 3600, (whole % 3600) / 60),
        _ => format!("{}d{:02}h", whole / 86400, (whole % 86400) / 3600),
    }
}

/// A latency in microseconds for humans: `347µs`, `1.23ms`, `2.50s`.
pub fn micros(us: u64) -> String {
    match us {
        0..=999 => format!("{us}µs"),
        1000..=999_999 => format!("{:.2}ms", us as f64 / 1e3),
        _ => format!("{:.2}s", us as f64 / 1e6),
    }
}

/// A byte count for humans: `12B`, `3.4KiB`, `1.2MiB`.
pub fn bytes(n: u64) -> String {
    match n {
        0..=1023 => format!("{n}B"),
        1024..=1_048_575 => format!("{:.1}KiB", n as f64 / 1024.0),
        _ => format!("{:.1}MiB", n as f64 / 1_048_576.0),
    }
}

/// Whether `c` must not reach a terminal as it is: a control character
/// (C0, DEL, C1: escape sequences, carriage returns, new lines) or a
/// bidirectional override. Services, agents and error messages come from
/// other users; printed raw, they could set the terminal's title, clear
/// it, or forge lines of output (red-team pass 6).
fn unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{61c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` with the characters that must not reach a terminal as `\u{1b}`
/// escapes (see [`unsafe_char`]); borrowed when there are none.
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(unsafe_char) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if unsafe_char(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// JSON text with the characters serde_json leaves as they are (DEL, C1,
/// bidirectional overrides) written as `\uXXXX` escapes: the same JSON,
/// safe on a terminal (serde_json escapes C0 itself).
fn json_safe(text: String) -> String {
    // Outside strings, only the layout's new lines (indented JSON).
    let escape = |c: char| c != '\n' && unsafe_char(c);
    if !text.chars().any(escape) {
        return text;
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if escape(c) {
            // Outside the C0 range serde_json escaped, and all in the
            // basic multilingual plane: one \uXXXX each.
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// Lays out rows as left-aligned columns separated by two spaces (the last
/// column is not padded). Widths count characters. Cells are shown
/// [`printable`].
pub fn table(rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<Cow<'_, str>>> = rows
        .iter()
        .map(|r| r.iter().map(|c| printable(c)).collect())
        .collect();
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0; cols];
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in &rows {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(c);
            if i + 1 < r.len() {
                let pad = widths[i].saturating_sub(c.chars().count());
                line.push_str(&" ".repeat(pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Compact one-line JSON of a MessagePack value (safe on a terminal: see
/// [`json_safe`]).
pub fn json_line(v: &Value) -> String {
    json_safe(crate::json::to_json(v).to_string())
}

/// Indented JSON of a MessagePack value, for humans.
pub fn json_pretty(v: &Value) -> String {
    let j = crate::json::to_json(v);
    json_safe(serde_json::to_string_pretty(&j).unwrap_or_else(|_| j.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_users_text_reaches_the_terminal_escaped() {
        let hostile = "a\u{1b}]0;title\u{7}\u{1b}[2J\r\nzrpc: call ok\u{9b}1m\u{202e}z";
        let shown = printable(hostile);
        assert!(!shown.chars().any(unsafe_char), "{shown}");
        assert_eq!(
            shown,
            "a\\u{1b}]0;title\\u{7}\\u{1b}[2J\\u{d}\\u{a}zrpc: call ok\\u{9b}1m\\u{202e}z"
        );
        assert!(matches!(printable("plain ünïcode"), Cow::Borrowed(_)));
        // JSON: the same value, with what serde_json leaves raw escaped
        // (and the indented form's new lines kept).
        let v = Value::Array(vec![Value::from(hostile)]);
        for text in [json_line(&v), json_pretty(&v)] {
            assert!(!text.chars().any(|c| c != '\n' && unsafe_char(c)), "{text}");
            let back: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
            assert_eq!(back, serde_json::json!([hostile]));
        }
        // Tables: cells escaped, columns still aligned on what is shown.
        let t = table(&[
            vec!["A".into(), "B".into()],
            vec!["x\u{1b}".into(), "y".into()],
        ]);
        assert_eq!(t, "A        B\nx\\u{1b}  y\n");
    }

    #[test]
    fn human_units() {
        assert_eq!(secs(3.25), "3.2s");
        assert_eq!(secs(307.0), "5m07s");
        assert_eq!(secs(7320.0), "2h02m");
        assert_eq!(secs(90000.0), "1d01h");
        assert_eq!(micros(347), "347µs");
        assert_eq!(micros(1234), "1.23ms");
        assert_eq!(bytes(2048), "2.0KiB");
    }

    #[test]
    fn table_pads_columns() {
        let t = table(&[
            vec!["A".into(), "BB".into(), "C".into()],
            vec!["aaa".into(), "b".into(), "c".into()],
        ]);
        assert_eq!(t, "A    BB  C\naaa  b   c\n");
    }
}
