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

/// Converts a CamelCase name to snake_case, the way service names are
/// derived from type names: `TestServer` -> `test_server`, `MyClass` ->
/// `my_class`, `HTTPServer` -> `http_server`. Shared by `zrpc-service` (at
/// run time) and its `#[service]` macro (at compile time).
pub fn to_snake_case(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len() + 4);
    for (i, &c) in chars.iter().enumerate() {
        if c.is_uppercase() {
            if i > 0 {
                let prev = chars[i - 1];
                let next_lower = chars.get(i + 1).is_some_and(|n| n.is_lowercase());
                if prev != '_'
                    && (prev.is_lowercase()
                        || prev.is_ascii_digit()
                        || (prev.is_uppercase() && next_lower))
                {
                    out.push('_');
                }
            }
            out.extend(c.to_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snake_case() {
        assert_eq!(to_snake_case("TestServer"), "test_server");
        assert_eq!(to_snake_case("MyClass"), "my_class");
        assert_eq!(to_snake_case("HTTPServer"), "http_server");
        assert_eq!(to_snake_case("echo"), "echo");
    }

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
