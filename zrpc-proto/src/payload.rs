//! Payload decoding shared by the libraries, and the bounds the protocol
//! puts on values peers send.

use serde::de::{Deserialize, DeserializeOwned, IgnoredAny};

/// The longest deadline a `Call` may carry, in milliseconds: 365 days.
///
/// A larger `timeout_ms` (up to `u64::MAX`) is accepted and means "no
/// deadline", exactly like `nil`: no caller can tell a year from forever,
/// and the broker's timer wheel holds deadlines only up to about two years.
pub const MAX_TIMEOUT_MS: u64 = 365 * 24 * 3600 * 1000;

/// Decodes one MessagePack value that must fill `payload` exactly; an empty
/// payload decodes as nil. Bytes left after the value are an error (a
/// payload is one value, see `docs/protocol.md`), so that `\x01\x02` is not
/// silently read as `1`. So are a value nested more than
/// [`MAX_DEPTH`](crate::depth::MAX_DEPTH) levels and a payload of more than
/// [`max_values`](crate::depth::max_values) values.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, rmp_serde::decode::Error> {
    let bytes = if payload.is_empty() {
        crate::NIL_PAYLOAD
    } else {
        payload
    };
    let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
    // Every level counted, not only arrays and maps (see `crate::depth`).
    let levels = crate::depth::Levels::default();
    let value = T::deserialize(crate::depth::Limited::new(&mut de, &levels))?;
    // The deserializer continues after the value: at the end of the input
    // the next read fails at once (no extra pass over the value); anything
    // else means trailing bytes.
    match IgnoredAny::deserialize(&mut de) {
        Err(rmp_serde::decode::Error::InvalidMarkerRead(e))
            if e.kind() == std::io::ErrorKind::UnexpectedEof =>
        {
            Ok(value)
        }
        _ => Err(rmp_serde::decode::Error::Syntax(
            "the payload has bytes left after its MessagePack value (a payload is exactly one value)"
                .into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_one_value() {
        assert_eq!(decode_payload::<u8>(b"\x01").ok(), Some(1));
        assert_eq!(decode_payload::<Option<u8>>(b"").ok(), Some(None));
        let err = decode_payload::<u8>(b"\x01\x02").expect_err("trailing byte");
        assert!(err.to_string().contains("bytes left"), "{err}");
        assert!(decode_payload::<rmpv::Value>(b"\x92\x01\x02\xc0").is_err());
        assert!(decode_payload::<rmpv::Value>(b"\x92\x01").is_err());
        assert_eq!(
            decode_payload::<Vec<u8>>(b"\x92\x01\x02").ok(),
            Some(vec![1, 2])
        );
    }
}
