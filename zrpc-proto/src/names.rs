//! Service name validation.

use crate::ProtoError;

/// Longest service name accepted, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// Checks that `name` is a valid service name.
///
/// A name is 1 to [`MAX_NAME_LEN`] bytes of ASCII letters, digits, `_`, `-`
/// and `.`; it starts with a letter or `_`. The same rule applies to method
/// names.
pub fn validate_name(name: &str) -> Result<(), ProtoError> {
    let bytes = name.as_bytes();
    let ok_len = !bytes.is_empty() && bytes.len() <= MAX_NAME_LEN;
    let ok_first = bytes
        .first()
        .is_some_and(|b| b.is_ascii_alphabetic() || *b == b'_');
    let ok_rest = bytes
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok_len && ok_first && ok_rest {
        Ok(())
    } else {
        Err(ProtoError::InvalidName(
            name.chars().take(MAX_NAME_LEN + 8).collect(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_rejects() {
        for ok in ["test_server", "a", "_x", "org.example.Foo-1"] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        let long = "a".repeat(MAX_NAME_LEN + 1);
        for bad in ["", "1abc", "-x", "a b", "a/b", "é", long.as_str()] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }
}
