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
/// derived from type names, by the original Python zrpc's rule (so that a
/// service keeps its name when it moves from Python to Rust): an
/// underscore before each run of capitals, underscores at either end
/// dropped, then lower case. `TestServer` -> `test_server`, `MyClass` ->
/// `my_class`, `HTTPServer` -> `httpserver`, `MyHTTPServer` ->
/// `my_httpserver`, `HttpServer` -> `http_server`. Shared by
/// `zrpc-service` (at run time) and its `#[service]` macro (at compile
/// time); the Python package applies the same rule.
pub fn to_snake_case(s: &str) -> String {
    // Python: re.sub('([A-Z]+)', r'_\1', name).strip('_').lower()
    let mut out = String::with_capacity(s.len() + 4);
    let mut in_run = false;
    for c in s.chars() {
        let upper = c.is_ascii_uppercase();
        if upper && !in_run {
            out.push('_');
        }
        in_run = upper;
        out.push(c);
    }
    out.trim_matches('_').to_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snake_case() {
        assert_eq!(to_snake_case("TestServer"), "test_server");
        assert_eq!(to_snake_case("MyClass"), "my_class");
        assert_eq!(to_snake_case("echo"), "echo");
        // The original Python zrpc's rule, acronyms included.
        for (a, b) in [
            ("HTTPServer", "httpserver"),
            ("MyHTTPServer", "my_httpserver"),
            ("HttpServer", "http_server"),
            ("XMLRpcThing", "xmlrpc_thing"),
            ("Server2Go", "server2_go"),
            ("A", "a"),
            ("My_Type", "my__type"),
            ("_Private", "private"),
            ("already_snake", "already_snake"),
        ] {
            assert_eq!(to_snake_case(a), b, "{a}");
        }
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
