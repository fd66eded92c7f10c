//! The bridge's configuration file (`zrpcd --bridge FILE`, docs/bridge.md).

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Why the bridge's configuration file was refused.
#[derive(Debug, thiserror::Error)]
pub enum BridgeConfigError {
    /// The file could not be read.
    #[error("cannot read the bridge configuration {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML, or has unknown or mistyped keys.
    #[error("bridge configuration {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: Box<toml::de::Error>,
    },
    /// A value is not acceptable; the message says which and why.
    #[error("bridge configuration {path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// The bridge's configuration, checked.
#[derive(Clone, PartialEq, Eq)]
pub struct BridgeConfig {
    /// This host's id on NATS (`Zrpc-Origin`).
    pub host_id: String,
    /// The uid remote callers have locally.
    pub uid: u32,
    /// The gid remote callers have locally.
    pub gid: u32,
    /// First tokens of every subject (`<prefix>.svc.<name>`).
    pub subject_prefix: String,
    /// NATS servers (URLs).
    pub servers: Vec<String>,
    /// `user` and `password`.
    pub user_password: Option<(String, String)>,
    /// A token.
    pub token: Option<String>,
    /// Refuse a server without TLS.
    pub tls_required: bool,
    /// CA certificates (PEM) to trust.
    pub root_certificates: Option<PathBuf>,
    /// Client certificate and key (PEM).
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Names offered on NATS: exact, or a prefix ending in `*`.
    pub export: Vec<String>,
    /// How many requests repeating a running exported call's origin and
    /// caller may wait for its answer at once, in all (`[export]
    /// max_joins`); beyond, they are refused with `LimitExceeded`.
    pub max_joins: usize,
    /// Requests from NATS answered at once, in all (`[export]
    /// max_in_flight`); beyond, they are refused with `LimitExceeded`
    /// without a local call.
    pub max_in_flight: usize,
    /// The longest a call from NATS runs here, in milliseconds (`[export]
    /// max_timeout_ms`; 0: no bound): a request without `Zrpc-Timeout-Ms`,
    /// or with a longer one, gets this deadline.
    pub max_timeout_ms: u64,
    /// Names called on NATS when no local service holds them: exact
    /// (registered by the bridge), or a prefix ending in `*` (routed to
    /// the bridge by the broker when nobody holds the name).
    pub import: Vec<String>,
}

impl std::fmt::Debug for BridgeConfig {
    // Never prints the secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BridgeConfig")
            .field("host_id", &self.host_id)
            .field("uid", &self.uid)
            .field("gid", &self.gid)
            .field("subject_prefix", &self.subject_prefix)
            .field("servers", &self.servers)
            .field("export", &self.export)
            .field("max_joins", &self.max_joins)
            .field("max_in_flight", &self.max_in_flight)
            .field("max_timeout_ms", &self.max_timeout_ms)
            .field("import", &self.import)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    host_id: Option<String>,
    uid: Option<u32>,
    gid: Option<u32>,
    subject_prefix: Option<String>,
    nats: Nats,
    #[serde(default)]
    export: Export,
    #[serde(default)]
    import: Names,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Nats {
    servers: Vec<String>,
    user: Option<String>,
    password: Option<String>,
    token: Option<String>,
    #[serde(default)]
    tls_required: bool,
    root_certificates: Option<PathBuf>,
    client_certificate: Option<PathBuf>,
    client_key: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Names {
    #[serde(default)]
    names: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Export {
    #[serde(default)]
    names: Vec<String>,
    max_joins: Option<usize>,
    max_in_flight: Option<usize>,
    max_timeout_ms: Option<u64>,
}

/// Default `[export] max_joins`.
const DEFAULT_MAX_JOINS: usize = 1_024;

/// Default `[export] max_in_flight`.
const DEFAULT_MAX_IN_FLIGHT: usize = 1_024;

/// Default `[export] max_timeout_ms`: five minutes. A remote caller that
/// sends no deadline cannot keep a place of `max_in_flight` for longer.
pub const DEFAULT_MAX_TIMEOUT_MS: u64 = 300_000;

/// `nobody`: the default identity of remote callers.
const NOBODY: u32 = 65534;

impl BridgeConfig {
    /// Reads and checks the file.
    pub fn load(path: &Path) -> Result<BridgeConfig, BridgeConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| BridgeConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config = Self::parse(&text).map_err(|e| match e {
            ParseError::Toml(source) => BridgeConfigError::Parse {
                path: path.to_path_buf(),
                source,
            },
            ParseError::Invalid(message) => BridgeConfigError::Invalid {
                path: path.to_path_buf(),
                message,
            },
        })?;
        let has_secret = config.user_password.is_some() || config.token.is_some();
        if has_secret {
            use std::os::unix::fs::PermissionsExt;
            if let Ok(meta) = std::fs::metadata(path) {
                if meta.permissions().mode() & 0o077 != 0 {
                    tracing::warn!(
                        file = %path.display(),
                        "the bridge configuration holds NATS credentials and is readable by \
                         other users: chmod 600 it"
                    );
                }
            }
        }
        Ok(config)
    }

    /// The configuration in `text`, if valid (for other modules' tests).
    #[cfg(test)]
    pub(super) fn from_text(text: &str) -> Option<BridgeConfig> {
        Self::parse(text).ok()
    }

    fn parse(text: &str) -> Result<BridgeConfig, ParseError> {
        let file: File = toml::from_str(text).map_err(|e| ParseError::Toml(Box::new(e)))?;
        let host_id = match file.host_id {
            Some(h) => h,
            None => hostname().ok_or_else(|| {
                ParseError::Invalid("no host_id, and the hostname cannot be read".into())
            })?,
        };
        if !is_token(&host_id) {
            return Err(ParseError::Invalid(format!(
                "host_id {host_id:?}: use letters, digits, '-', '_' and '.' only"
            )));
        }
        let subject_prefix = file.subject_prefix.unwrap_or_else(|| "zrpc".into());
        if !is_subject(&subject_prefix) {
            return Err(ParseError::Invalid(format!(
                "subject_prefix {subject_prefix:?}: use NATS subject tokens of letters, \
                 digits, '-' and '_', separated by '.' (no wildcards)"
            )));
        }
        if file.nats.servers.is_empty() {
            return Err(ParseError::Invalid(
                "[nats] servers is empty: name at least one, e.g. \"nats://127.0.0.1:4222\"".into(),
            ));
        }
        let user_password = match (file.nats.user, file.nats.password) {
            (Some(u), Some(p)) => Some((u, p)),
            (None, None) => None,
            _ => {
                return Err(ParseError::Invalid(
                    "[nats] user and password go together".into(),
                ))
            }
        };
        let client_cert = match (file.nats.client_certificate, file.nats.client_key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => {
                return Err(ParseError::Invalid(
                    "[nats] client_certificate and client_key go together".into(),
                ))
            }
        };
        if file.export.max_in_flight == Some(0) {
            return Err(ParseError::Invalid(
                "[export] max_in_flight = 0 would refuse every request from NATS: \
                 give at least 1 (default 1024), or export no names"
                    .into(),
            ));
        }
        if file
            .export
            .max_timeout_ms
            .is_some_and(|ms| ms > zrpc_proto::MAX_TIMEOUT_MS)
        {
            return Err(ParseError::Invalid(format!(
                "[export] max_timeout_ms is at most {} (365 days; a longer deadline is none); \
                 0 for no bound",
                zrpc_proto::MAX_TIMEOUT_MS
            )));
        }
        for pattern in &file.export.names {
            let name = pattern.strip_suffix('*').unwrap_or(pattern);
            if !(name.is_empty() || zrpc_proto::validate_name(name).is_ok() || name.ends_with('.'))
            {
                return Err(ParseError::Invalid(format!(
                    "[export] {pattern:?} is neither a service name nor a prefix ending in '*'"
                )));
            }
        }
        for pattern in &file.import.names {
            let name = pattern.strip_suffix('*').unwrap_or(pattern);
            let valid = (pattern.ends_with('*') && (name.is_empty() || name.ends_with('.')))
                || zrpc_proto::validate_name(name).is_ok();
            if !valid || pattern == zrpc_proto::BROKER_SERVICE || pattern == "*" {
                return Err(ParseError::Invalid(format!(
                    "[import] {pattern:?} is neither a service name nor a prefix ending in '*' \
                     (\"*\" alone would import every name, {:?} included)",
                    zrpc_proto::BROKER_SERVICE
                )));
            }
        }
        Ok(BridgeConfig {
            host_id,
            uid: file.uid.unwrap_or(NOBODY),
            gid: file.gid.unwrap_or(NOBODY),
            subject_prefix,
            servers: file.nats.servers,
            user_password,
            token: file.nats.token,
            tls_required: file.nats.tls_required,
            root_certificates: file.nats.root_certificates,
            client_cert,
            export: file.export.names,
            max_joins: file.export.max_joins.unwrap_or(DEFAULT_MAX_JOINS),
            max_in_flight: file.export.max_in_flight.unwrap_or(DEFAULT_MAX_IN_FLIGHT),
            max_timeout_ms: file.export.max_timeout_ms.unwrap_or(DEFAULT_MAX_TIMEOUT_MS),
            import: file.import.names,
        })
    }

    /// Whether `name` is exported (matches an `[export]` pattern). The
    /// broker's own service never is.
    pub fn exports(&self, name: &str) -> bool {
        name != zrpc_proto::BROKER_SERVICE
            && self.export.iter().any(|p| match p.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix),
                None => p == name,
            })
    }

    /// The deadline a call from NATS gets here, from the request's own
    /// (`None`: none), and whether `[export] max_timeout_ms` set it: the
    /// request's deadline, at most that bound; the bound when the request
    /// has none.
    pub fn cap_timeout(&self, requested: Option<u64>) -> (Option<u64>, bool) {
        match (requested, self.max_timeout_ms) {
            (r, 0) => (r, false),
            (Some(r), max) if r <= max => (Some(r), false),
            (_, max) => (Some(max), true),
        }
    }

    /// The exact `[import]` names (the bridge registers them).
    pub fn imported_names(&self) -> impl Iterator<Item = &str> {
        self.import
            .iter()
            .filter(|p| !p.ends_with('*'))
            .map(String::as_str)
    }

    /// Whether `name` matches an `[import]` prefix pattern (the broker
    /// routes calls to such a name to the bridge while nobody holds it).
    pub fn imports_by_pattern(&self, name: &str) -> bool {
        name != zrpc_proto::BROKER_SERVICE
            && self
                .import
                .iter()
                .filter_map(|p| p.strip_suffix('*'))
                .any(|prefix| name.starts_with(prefix))
    }

    /// The subject of calls to `name`.
    pub fn subject(&self, name: &str) -> String {
        format!("{}.svc.{name}", self.subject_prefix)
    }

    /// The subject of cancel messages for calls to `name`.
    pub fn cancel_subject(&self, name: &str) -> String {
        format!("{}.cancel.{name}", self.subject_prefix)
    }

    /// The queue group of the exporters of `name`.
    pub fn queue_group(&self, name: &str) -> String {
        format!("{}.q.{name}", self.subject_prefix)
    }
}

enum ParseError {
    Toml(Box<toml::de::Error>),
    Invalid(String),
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn is_subject(s: &str) -> bool {
    is_token(s) && s.split('.').all(|t| !t.is_empty())
}

fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into the valid
    // local buffer.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8(buf[..end].to_vec()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_file_and_matches_patterns() {
        let c = BridgeConfig::parse(
            r#"
            host_id = "a"
            uid = 1234
            [nats]
            servers = ["nats://127.0.0.1:4222"]
            user = "u"
            password = "p"
            [export]
            names = ["calc", "billing.*"]
            [import]
            names = ["inventory"]
            "#,
        )
        .ok()
        .expect("valid");
        assert_eq!(c.uid, 1234);
        assert_eq!(c.gid, NOBODY);
        assert!(c.exports("calc"));
        assert!(c.exports("billing.eu"));
        assert!(!c.exports("calcx"));
        assert!(!c.exports("billing"));
        assert_eq!(c.subject("billing.eu"), "zrpc.svc.billing.eu");
        assert_eq!(c.max_joins, DEFAULT_MAX_JOINS);
        assert_eq!(c.max_in_flight, DEFAULT_MAX_IN_FLIGHT);
        let zero = BridgeConfig::parse(
            "host_id = \"a\"\n[nats]\nservers = [\"x\"]\n[export]\nmax_in_flight = 0",
        );
        assert!(
            matches!(&zero, Err(ParseError::Invalid(m)) if m.contains("max_in_flight")),
            "a zero max_in_flight was taken"
        );
        assert!(
            !format!("{c:?}").contains("\"p\""),
            "secrets are not printed"
        );
        let c = BridgeConfig::parse(
            "host_id = \"a\"\n[nats]\nservers = [\"x\"]\n[import]\nnames = [\"inv\", \"shop.*\"]",
        )
        .ok()
        .expect("valid");
        assert_eq!(c.imported_names().collect::<Vec<_>>(), ["inv"]);
        assert!(c.imports_by_pattern("shop.cart"));
        assert!(!c.imports_by_pattern("inv") && !c.imports_by_pattern("shopping"));
        let c = BridgeConfig::parse(
            "host_id = \"a\"\n[nats]\nservers = [\"x\"]\n[export]\nnames = [\"e\"]\nmax_joins = 0",
        )
        .ok()
        .expect("valid");
        assert_eq!(c.max_joins, 0);
    }

    #[test]
    fn calls_from_nats_get_at_most_max_timeout_ms() {
        let with = |extra: &str| {
            BridgeConfig::parse(&format!(
                "host_id = \"a\"\n[nats]\nservers = [\"x\"]\n[export]\n{extra}"
            ))
            .ok()
            .expect("valid")
        };
        let default = with("");
        assert_eq!(default.max_timeout_ms, DEFAULT_MAX_TIMEOUT_MS);
        assert_eq!(
            default.cap_timeout(None),
            (Some(DEFAULT_MAX_TIMEOUT_MS), true)
        );
        let c = with("max_timeout_ms = 500");
        assert_eq!(c.cap_timeout(None), (Some(500), true));
        assert_eq!(c.cap_timeout(Some(60_000)), (Some(500), true));
        assert_eq!(c.cap_timeout(Some(500)), (Some(500), false));
        assert_eq!(c.cap_timeout(Some(20)), (Some(20), false));
        let none = with("max_timeout_ms = 0");
        assert_eq!(none.cap_timeout(None), (None, false));
        assert_eq!(none.cap_timeout(Some(u64::MAX)), (Some(u64::MAX), false));
    }

    #[test]
    fn refuses_bad_values() {
        for bad in [
            "host_id = \"a b\"\n[nats]\nservers = [\"x\"]",
            "host_id = \"a\"\n[nats]\nservers = []",
            "host_id = \"a\"\nsubject_prefix = \"z.*\"\n[nats]\nservers = [\"x\"]",
            "host_id = \"a\"\n[nats]\nservers = [\"x\"]\nuser = \"u\"",
            "host_id = \"a\"\n[nats]\nservers = [\"x\"]\n[import]\nnames = [\"*\"]",
            "host_id = \"a\"\n[nats]\nservers = [\"x\"]\n[import]\nnames = [\"a b*\"]",
            "host_id = \"a\"\n[nats]\nservers = [\"x\"]\nbogus = 1",
            "host_id = \"a\"\n[nats]\nservers = [\"x\"]\n[export]\nmax_joins = -1",
            "host_id = \"a\"\n[nats]\nservers = [\"x\"]\n[import]\nmax_joins = 1",
            "host_id = \"a\"\n[nats]\nservers = [\"x\"]\n[export]\nmax_timeout_ms = 31536000001",
        ] {
            assert!(BridgeConfig::parse(bad).is_err(), "accepted: {bad}");
        }
    }
}
