//! Conversion between JSON (what the user types and reads) and MessagePack
//! (what travels on the wire), with tagged objects for the MessagePack types
//! JSON cannot express.
//!
//! | MessagePack | JSON |
//! |---|---|
//! | nil, bool, str | `null`, `true`/`false`, string |
//! | int | number (the full `u64` and `i64` ranges) |
//! | float (finite) | number (`f32` is shown as its `f64` value; input floats become `f64`) |
//! | float (infinite or NaN) | `{"$float": "inf"}`, `{"$float": "-inf"}`, `{"$float": "nan"}` |
//! | bin | `{"$bytes": "<base64>"}` (standard alphabet, with padding) |
//! | ext | `{"$ext": [type, "<base64>"]}` (`type` is -128..=127) |
//! | array | array |
//! | map with string keys | object |
//! | any other map | `{"$map": [[key, value], ...]}` |
//!
//! A map is written in the `$map` form when a key is not a valid UTF-8
//! string, when two keys are equal, or when it has exactly one key and that
//! key is one of the tags (`$bytes`, `$map`, `$float`, `$ext`), so that every
//! value converts back to itself. On input, an object with exactly one key
//! that is a tag is read as the tagged type; to send a map whose only key is
//! literally `"$bytes"`, write `{"$map": [["$bytes", ...]]}`. A `str` that is
//! not valid UTF-8 is shown as `{"$bytes": ...}`.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use rmpv::Value;
use serde_json::{Map, Number, Value as Json};

/// The tag of binary data.
pub const BYTES: &str = "$bytes";
/// The tag of maps that JSON objects cannot express.
pub const MAP: &str = "$map";
/// The tag of non-finite floats.
pub const FLOAT: &str = "$float";
/// The tag of MessagePack extension values.
pub const EXT: &str = "$ext";

const TAGS: [&str; 4] = [BYTES, MAP, FLOAT, EXT];

/// Converts JSON to a MessagePack value (see the module documentation).
/// Fails with a message naming the offending tagged object.
pub fn to_msgpack(j: &Json) -> Result<Value, String> {
    Ok(match j {
        Json::Null => Value::Nil,
        Json::Bool(b) => Value::Boolean(*b),
        Json::Number(n) => number(n)?,
        Json::String(s) => Value::from(s.as_str()),
        Json::Array(a) => Value::Array(a.iter().map(to_msgpack).collect::<Result<_, _>>()?),
        Json::Object(o) => {
            if o.len() == 1 {
                if let Some((k, v)) = o.iter().next() {
                    if TAGS.contains(&k.as_str()) {
                        return tagged(k, v);
                    }
                }
            }
            Value::Map(
                o.iter()
                    .map(|(k, v)| Ok((Value::from(k.as_str()), to_msgpack(v)?)))
                    .collect::<Result<_, String>>()?,
            )
        }
    })
}

fn number(n: &Number) -> Result<Value, String> {
    if let Some(u) = n.as_u64() {
        Ok(Value::from(u))
    } else if let Some(i) = n.as_i64() {
        Ok(Value::from(i))
    } else if let Some(f) = n.as_f64() {
        Ok(Value::F64(f))
    } else {
        Err(format!("the number {n} cannot be represented"))
    }
}

fn tagged(tag: &str, v: &Json) -> Result<Value, String> {
    match tag {
        BYTES => match v {
            Json::String(s) => decode_b64(s).map(Value::Binary),
            _ => Err(format!(
                r#"{{"{BYTES}": ...}} takes a base64 string, not {v}"#
            )),
        },
        FLOAT => match v.as_str() {
            Some("inf" | "+inf" | "infinity") => Ok(Value::F64(f64::INFINITY)),
            Some("-inf" | "-infinity") => Ok(Value::F64(f64::NEG_INFINITY)),
            Some("nan" | "NaN") => Ok(Value::F64(f64::NAN)),
            _ => Err(format!(
                r#"{{"{FLOAT}": ...}} takes "inf", "-inf" or "nan", not {v}"#
            )),
        },
        EXT => {
            let bad = || format!(r#"{{"{EXT}": ...}} takes [type, "<base64>"], not {v}"#);
            let Some([t, data]) = v.as_array().map(Vec::as_slice) else {
                return Err(bad());
            };
            let t = t
                .as_i64()
                .and_then(|t| i8::try_from(t).ok())
                .ok_or_else(|| format!("ext type {t} is not in -128..=127"))?;
            let data = data.as_str().ok_or_else(bad)?;
            Ok(Value::Ext(t, decode_b64(data)?))
        }
        MAP => {
            let bad = || format!(r#"{{"{MAP}": ...}} takes [[key, value], ...], not {v}"#);
            let pairs = v.as_array().ok_or_else(bad)?;
            pairs
                .iter()
                .map(|p| match p.as_array().map(Vec::as_slice) {
                    Some([k, v]) => Ok((to_msgpack(k)?, to_msgpack(v)?)),
                    _ => Err(bad()),
                })
                .collect::<Result<_, _>>()
                .map(Value::Map)
        }
        _ => Err(format!("unknown tag {tag:?}")),
    }
}

fn decode_b64(s: &str) -> Result<Vec<u8>, String> {
    B64.decode(s.trim())
        .map_err(|e| format!("invalid base64 in {{\"{BYTES}\": ...}}: {e}"))
}

fn tag(tag: &str, v: Json) -> Json {
    let mut m = Map::with_capacity(1);
    m.insert(tag.to_owned(), v);
    Json::Object(m)
}

fn float(f: f64) -> Json {
    match Number::from_f64(f) {
        Some(n) => Json::Number(n),
        None if f.is_nan() => tag(FLOAT, Json::from("nan")),
        None if f > 0.0 => tag(FLOAT, Json::from("inf")),
        None => tag(FLOAT, Json::from("-inf")),
    }
}

/// Converts a MessagePack value to JSON (see the module documentation).
/// Never fails: every value has a JSON form.
pub fn to_json(v: &Value) -> Json {
    match v {
        Value::Nil => Json::Null,
        Value::Boolean(b) => Json::Bool(*b),
        Value::Integer(i) => {
            if let Some(u) = i.as_u64() {
                Json::from(u)
            } else if let Some(s) = i.as_i64() {
                Json::from(s)
            } else {
                // rmpv integers are always u64 or i64.
                Json::Null
            }
        }
        Value::F32(f) => float(f64::from(*f)),
        Value::F64(f) => float(*f),
        Value::String(s) => match s.as_str() {
            Some(s) => Json::from(s),
            None => tag(BYTES, Json::from(B64.encode(s.as_bytes()))),
        },
        Value::Binary(b) => tag(BYTES, Json::from(B64.encode(b))),
        Value::Ext(t, data) => tag(
            EXT,
            Json::Array(vec![Json::from(*t), B64.encode(data).into()]),
        ),
        Value::Array(a) => Json::Array(a.iter().map(to_json).collect()),
        Value::Map(m) => map(m),
    }
}

fn map(m: &[(Value, Value)]) -> Json {
    // The form is chosen from the keys alone, so that each value is
    // converted once: converting the values and starting again on a key
    // that is not a string doubled the work at each level of nesting (a
    // 201-byte reply of 40 nested maps kept `zrpc call` busy for ever;
    // red-team pass 6).
    let mut seen = std::collections::HashSet::with_capacity(m.len());
    let plain = m
        .iter()
        .all(|(k, _)| k.as_str().is_some_and(|k| seen.insert(k)))
        && !(m.len() == 1
            && m.iter()
                .all(|(k, _)| k.as_str().is_some_and(|k| TAGS.contains(&k))));
    if plain {
        let obj: Map<String, Json> = m
            .iter()
            .filter_map(|(k, v)| Some((k.as_str()?.to_owned(), to_json(v))))
            .collect();
        return Json::Object(obj);
    }
    tag(
        MAP,
        Json::Array(
            m.iter()
                .map(|(k, v)| Json::Array(vec![to_json(k), to_json(v)]))
                .collect(),
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(v: Value) {
        let j = to_json(&v);
        let text = serde_json::to_string(&j).expect("serialise");
        let back: Json = serde_json::from_str(&text).expect("parse");
        let v2 = to_msgpack(&back).expect("convert back");
        // NaN != NaN: compare the encodings instead.
        let enc = |v: &Value| {
            let mut out = Vec::new();
            rmpv::encode::write_value(&mut out, v).expect("encode");
            out
        };
        assert_eq!(enc(&v), enc(&v2), "{text}");
    }

    /// Maps nested in maps whose last key is not a string: each value is
    /// converted once (when a map's values were converted again in the
    /// tagged form, 22 levels took 8 s and 40 for ever; 24 here would take
    /// about 30 s).
    #[test]
    fn nested_maps_with_other_keys_convert_in_linear_time() {
        let mut v = Value::Nil;
        for _ in 0..24 {
            v = Value::Map(vec![(Value::from("a"), v), (Value::from(1), Value::Nil)]);
        }
        let started = std::time::Instant::now();
        let j = to_json(&v);
        assert!(j.get(MAP).is_some(), "{j}");
        round_trip(v);
        // Linear work takes microseconds; the margin is for a loaded machine.
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn values_round_trip() {
        for v in [
            Value::Nil,
            Value::Boolean(true),
            Value::from(u64::MAX),
            Value::from(i64::MIN),
            Value::from(-1),
            Value::F64(1.5),
            Value::F64(-0.0),
            Value::F64(f64::INFINITY),
            Value::F64(f64::NEG_INFINITY),
            Value::F64(f64::NAN),
            Value::from("héllo"),
            Value::Binary(vec![0, 1, 255]),
            Value::Binary(vec![]),
            Value::Ext(-3, vec![1, 2]),
            Value::Array(vec![Value::Nil, Value::from(1)]),
            Value::Map(vec![(Value::from("a"), Value::from(1))]),
            Value::Map(vec![(Value::from(1), Value::from("one"))]),
            Value::Map(vec![(Value::from("$bytes"), Value::from("x"))]),
            Value::Map(vec![
                (Value::from("a"), Value::from(1)),
                (Value::from("a"), Value::from(2)),
            ]),
            Value::Map(vec![]),
        ] {
            round_trip(v);
        }
    }

    #[test]
    fn tagged_input() {
        let j: Json = serde_json::from_str(r#"{"$bytes": "AAH/"}"#).expect("json");
        assert_eq!(to_msgpack(&j), Ok(Value::Binary(vec![0, 1, 255])));
        let j: Json = serde_json::from_str(r#"{"$bytes": 5}"#).expect("json");
        assert!(to_msgpack(&j).is_err());
        let j: Json = serde_json::from_str(r#"{"$bytes": "!!"}"#).expect("json");
        assert!(to_msgpack(&j).is_err());
        let j: Json = serde_json::from_str(r#"{"$ext": [300, ""]}"#).expect("json");
        assert!(to_msgpack(&j).is_err());
        let j: Json = serde_json::from_str(r#"{"$map": [[1]]}"#).expect("json");
        assert!(to_msgpack(&j).is_err());
        let j: Json = serde_json::from_str(r#"{"$bytes": "", "b": 1}"#).expect("json");
        assert_eq!(
            to_msgpack(&j),
            Ok(Value::Map(vec![
                (Value::from("$bytes"), Value::from("")),
                (Value::from("b"), Value::from(1)),
            ]))
        );
    }
}
