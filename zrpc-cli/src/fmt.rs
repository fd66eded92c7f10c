//! Small formatting helpers: reading fields of MessagePack maps, durations,
//! tables.

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

/// Decodes a result payload (empty means nil).
pub fn decode(payload: &[u8]) -> Result<Value, Failure> {
    if payload.is_empty() {
        return Ok(Value::Nil);
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

/// Lays out rows as left-aligned columns separated by two spaces (the last
/// column is not padded). Widths count characters.
pub fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0; cols];
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in rows {
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

/// Compact one-line JSON of a MessagePack value.
pub fn json_line(v: &Value) -> String {
    crate::json::to_json(v).to_string()
}

/// Indented JSON of a MessagePack value, for humans.
pub fn json_pretty(v: &Value) -> String {
    let j = crate::json::to_json(v);
    serde_json::to_string_pretty(&j).unwrap_or_else(|_| j.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

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
