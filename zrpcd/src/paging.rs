//! Paged answers of the broker's `zrpcd.list` and `zrpcd.peers`: the
//! request a caller may send (nil for the whole answer, or a map
//! `{after, limit}` for a page), and the encoder that writes an answer
//! entry by entry within a byte budget, so that the broker never builds
//! more than it can send (a million names are not turned into a value to
//! be refused for size).
//!
//! - Payload nil (or none): the whole answer, an array of entries, as long
//!   as it fits in `--max-message-size`; else `LimitExceeded` (page
//!   instead), found after encoding at most that many bytes.
//! - Payload `{"after": KEY, "limit": N}` (both optional): the entries
//!   whose key (the name for `list`, the `conn_id` for `peers`) comes after
//!   `KEY`, in order, at most `N` ([`DEFAULT_LIMIT`] without it, at most
//!   [`MAX_LIMIT`]) and no more than fit in one message. The answer is
//!   `{"entries": [...], "next": KEY or nil}`: `next` is the key to pass as
//!   `after` for the following page, nil on the last page.

use bytes::Bytes;
use rmpv::Value;

/// Entries in a page when the caller gives no `limit`.
pub const DEFAULT_LIMIT: usize = 1024;

/// Most entries in a page (a larger `limit` is lowered to it).
pub const MAX_LIMIT: usize = 4096;

/// What a caller asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request<K> {
    /// Everything, as one array (payload nil).
    Whole,
    /// A page: the entries after `after` (from the first without it), at
    /// most `limit`.
    Page {
        /// The key of the last entry seen.
        after: Option<K>,
        /// Most entries wanted (1 to [`MAX_LIMIT`]).
        limit: usize,
    },
}

/// A key of the entries paged through: a name or a connection id.
pub trait Key: Sized {
    /// The key in a payload (None if it is not one).
    fn from_value(v: &Value) -> Option<Self>;
    /// The key as sent in `next`.
    fn to_value(&self) -> Value;
}

impl Key for String {
    fn from_value(v: &Value) -> Option<Self> {
        v.as_str().map(str::to_owned)
    }
    fn to_value(&self) -> Value {
        Value::from(self.as_str())
    }
}

impl Key for u64 {
    fn from_value(v: &Value) -> Option<Self> {
        v.as_u64()
    }
    fn to_value(&self) -> Value {
        Value::from(*self)
    }
}

/// Reads a request from a call's payload; the error is the `BadPayload`
/// message.
pub fn parse<K: Key>(payload: &[u8]) -> Result<Request<K>, String> {
    if payload.is_empty() {
        return Ok(Request::Whole);
    }
    let mut rest = payload;
    let value = rmpv::decode::read_value(&mut rest)
        .map_err(|e| format!("the payload is not MessagePack: {e}"))?;
    if !rest.is_empty() {
        // One value, as everywhere a payload is decoded (docs/protocol.md).
        return Err(usage("the payload has bytes after its value"));
    }
    let map = match value {
        Value::Nil => return Ok(Request::Whole),
        Value::Map(m) => m,
        _ => return Err(usage("the payload is neither nil nor a map")),
    };
    let mut after = None;
    let mut limit = DEFAULT_LIMIT;
    for (k, v) in &map {
        match k.as_str() {
            Some("after") if v.is_nil() => {}
            Some("after") => {
                after = Some(K::from_value(v).ok_or_else(|| usage("bad after"))?);
            }
            Some("limit") => {
                limit = v
                    .as_u64()
                    .filter(|&n| n > 0)
                    .map_or(Err(usage("bad limit")), |n| {
                        Ok(usize::try_from(n).unwrap_or(MAX_LIMIT).min(MAX_LIMIT))
                    })?;
            }
            _ => return Err(usage("unknown key")),
        }
    }
    Ok(Request::Page { after, limit })
}

fn usage(what: &str) -> String {
    format!(
        "{what}: the payload is nil (the whole answer) or a map {{\"after\": the name or conn_id of the last entry seen, \"limit\": entries, 1 to {MAX_LIMIT}}}"
    )
}

/// Why a whole answer (payload nil) was not given.
#[derive(Debug, PartialEq, Eq)]
pub struct TooLarge {
    /// The byte budget it passed.
    pub budget: usize,
}

impl std::fmt::Display for TooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the whole answer passes {} bytes (--max-message-size): ask for it in pages, with the payload {{\"after\": the name or conn_id of the last entry seen, \"limit\": entries}}",
            self.budget
        )
    }
}

/// Writes the answer to `req` from `entries`: (key, entry) in key order,
/// from the first after the request's `after` (the caller starts the
/// iterator there, [`Request::after`]). At most `budget` bytes are encoded
/// (and at most the page's limit of entries built, plus one to know whether
/// there are more); a page holds at least one entry, whatever its size.
pub fn answer<K: Key>(
    req: &Request<K>,
    entries: impl Iterator<Item = (K, Value)>,
    budget: usize,
) -> Result<Bytes, TooLarge> {
    let mut body = Vec::new();
    let mut count: u32 = 0;
    let mut entries = entries.peekable();
    let (limit, paged) = match req {
        Request::Whole => (usize::MAX, false),
        Request::Page { limit, .. } => (*limit, true),
    };
    // Room for the headers around the entries (array and map lengths,
    // the keys and `next`, a name of at most 128 bytes).
    let budget = budget.saturating_sub(if paged { 256 } else { 8 });
    let mut last = None;
    while (count as usize) < limit {
        let Some((key, entry)) = entries.next() else {
            break;
        };
        let before = body.len();
        // Writing to a Vec cannot fail.
        let _ = rmpv::encode::write_value(&mut body, &entry);
        if body.len() > budget && (count > 0 || !paged) {
            if !paged {
                return Err(TooLarge { budget });
            }
            body.truncate(before);
            // This entry starts the next page.
            return Ok(page(count, &body, last.map(|k: K| k.to_value())));
        }
        count += 1;
        last = Some(key);
    }
    if !paged {
        let mut out = Vec::with_capacity(body.len() + 5);
        array_len(&mut out, count);
        out.extend_from_slice(&body);
        return Ok(out.into());
    }
    let next = if entries.peek().is_some() {
        last.map(|k| k.to_value())
    } else {
        None
    };
    Ok(page(count, &body, next))
}

/// `{"entries": [body], "next": next}`.
fn page(count: u32, body: &[u8], next: Option<Value>) -> Bytes {
    let mut out = Vec::with_capacity(body.len() + 160);
    // A map of 2, the key "entries" (fixstr), the array.
    out.push(0x82);
    out.push(0xa7);
    out.extend_from_slice(b"entries");
    array_len(&mut out, count);
    out.extend_from_slice(body);
    out.push(0xa4);
    out.extend_from_slice(b"next");
    // Writing to a Vec cannot fail.
    let _ = rmpv::encode::write_value(&mut out, &next.unwrap_or(Value::Nil));
    out.into()
}

/// A MessagePack array header for `n` entries (its elements follow).
fn array_len(out: &mut Vec<u8>, n: u32) {
    match n {
        0..=15 => out.push(0x90 | n as u8),
        16..=0xffff => {
            out.push(0xdc);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        _ => {
            out.push(0xdd);
            out.extend_from_slice(&n.to_be_bytes());
        }
    }
}

impl<K> Request<K> {
    /// The key to start after (None: from the first).
    pub fn after(&self) -> Option<&K> {
        match self {
            Request::Whole => None,
            Request::Page { after, .. } => after.as_ref(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(b: &Bytes) -> Value {
        rmpv::decode::read_value(&mut &b[..]).expect("msgpack")
    }

    fn field<'a>(v: &'a Value, k: &str) -> &'a Value {
        v.as_map()
            .and_then(|m| m.iter().find(|(key, _)| key.as_str() == Some(k)))
            .map(|(_, v)| v)
            .expect("field")
    }

    /// Entries 1..=n keyed by number, from after `after`.
    fn entries(n: u64, after: Option<u64>) -> impl Iterator<Item = (u64, Value)> {
        (after.map_or(1, |a| a + 1)..=n).map(|i| (i, Value::from(i)))
    }

    /// Pages through 1..=n `limit` at a time: the pages' entries.
    fn pages(n: u64, limit: usize, budget: usize) -> Vec<Vec<u64>> {
        let mut out = Vec::new();
        let mut after = None;
        loop {
            let req = Request::Page { after, limit };
            let v = decode(&answer(&req, entries(n, after), budget).expect("page"));
            let got: Vec<u64> = field(&v, "entries")
                .as_array()
                .expect("entries")
                .iter()
                .filter_map(Value::as_u64)
                .collect();
            out.push(got);
            match field(&v, "next") {
                Value::Nil => return out,
                next => after = Some(next.as_u64().expect("next")),
            }
            assert!(out.len() < 100, "paging does not end");
        }
    }

    #[test]
    fn requests() {
        assert_eq!(parse::<u64>(b""), Ok(Request::Whole));
        assert_eq!(parse::<u64>(b"\xc0"), Ok(Request::Whole));
        // {} and {"after": 7, "limit": 9999}
        assert_eq!(
            parse::<u64>(b"\x80"),
            Ok(Request::Page {
                after: None,
                limit: DEFAULT_LIMIT
            })
        );
        assert_eq!(
            parse::<u64>(b"\x82\xa5after\x07\xa5limit\xcd\x27\x0f"),
            Ok(Request::Page {
                after: Some(7),
                limit: MAX_LIMIT
            })
        );
        assert_eq!(
            parse::<String>(b"\x81\xa5after\xa1a"),
            Ok(Request::Page {
                after: Some("a".to_owned()),
                limit: DEFAULT_LIMIT
            })
        );
        // limit 0, a string where a conn_id is due, an unknown key, an
        // array, a map cut short, bytes after nil or after a map.
        for bad in [
            &b"\x81\xa5limit\x00"[..],
            b"\xc0\xc0",
            b"\x80\xc0",
            b"\x81\xa5after\xa1a",
            b"\x81\xa4size\x01",
            b"\x90",
            b"\x82\xa5limit",
        ] {
            assert!(parse::<u64>(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn array_headers_are_messagepacks() {
        for n in [0u32, 15, 16, 0xffff, 0x10000] {
            let mut ours = Vec::new();
            array_len(&mut ours, n);
            let mut theirs = Vec::new();
            let _ =
                rmpv::encode::write_value(&mut theirs, &Value::Array(vec![Value::Nil; n as usize]));
            assert_eq!(ours, theirs[..ours.len()], "{n}");
        }
    }

    #[test]
    fn empty() {
        let whole = answer(&Request::Whole, entries(0, None), 1000).expect("whole");
        assert_eq!(decode(&whole), Value::Array(vec![]));
        assert_eq!(pages(0, 3, 1000), vec![Vec::<u64>::new()]);
    }

    #[test]
    fn exact_pages_end_without_an_empty_one() {
        assert_eq!(pages(6, 3, 1000), vec![vec![1, 2, 3], vec![4, 5, 6]]);
        assert_eq!(
            pages(7, 3, 1000),
            vec![vec![1, 2, 3], vec![4, 5, 6], vec![7]]
        );
        assert_eq!(pages(3, 3, 1000), vec![vec![1, 2, 3]]);
    }

    #[test]
    fn after_the_last_is_an_empty_last_page() {
        let req = Request::Page {
            after: Some(5),
            limit: 3,
        };
        let v = decode(&answer(&req, entries(5, Some(5)), 1000).expect("page"));
        assert_eq!(field(&v, "entries"), &Value::Array(vec![]));
        assert_eq!(field(&v, "next"), &Value::Nil);
    }

    #[test]
    fn the_budget_ends_a_page_early_and_the_whole_answer_fails() {
        // Entries of 1 byte: 256 header bytes plus 4 of them.
        let budget = 256 + 4;
        let got = pages(10, 100, budget);
        assert_eq!(got, vec![vec![1, 2, 3, 4], vec![5, 6, 7, 8], vec![9, 10]]);
        let whole = answer(&Request::Whole, entries(10, None), 8 + 4);
        assert_eq!(whole, Err(TooLarge { budget: 4 }));
        let whole = answer(&Request::Whole, entries(4, None), 8 + 4).expect("fits");
        assert_eq!(decode(&whole).as_array().map(Vec::len), Some(4));
    }

    #[test]
    fn the_work_is_bounded_by_the_budget() {
        // An endless source: the whole answer stops at the budget, a page
        // at its limit.
        let built = std::cell::Cell::new(0u64);
        let endless = || {
            (1..).map(|i| {
                built.set(built.get() + 1);
                (i, Value::from("x".repeat(100)))
            })
        };
        assert!(answer::<u64>(&Request::Whole, endless(), 10_000).is_err());
        assert!(built.get() < 100, "{} entries built", built.get());
        built.set(0);
        let req = Request::Page {
            after: None,
            limit: 10,
        };
        answer::<u64>(&req, endless(), 1 << 20).expect("page");
        assert_eq!(built.get(), 11);
    }

    #[test]
    fn one_entry_larger_than_the_budget_is_still_a_page() {
        let req = Request::Page {
            after: None,
            limit: 10,
        };
        let big = (1..=2u64).map(|i| (i, Value::from("x".repeat(1000))));
        let v = decode(&answer(&req, big, 300).expect("page"));
        assert_eq!(field(&v, "entries").as_array().map(Vec::len), Some(1));
        assert_eq!(field(&v, "next"), &Value::from(1u64));
    }
}
