//! `zrpc-bench`: measures zrpc (a real `zrpcd`, a real echo service, real
//! client processes) against a raw UNIX-socket relay baseline in the same
//! run, and checks the targets of issue 6.
//!
//! ```text
//! cargo build --release --workspace --bins && target/release/zrpc-bench [--quick] [--json]
//! ```
//!
//! The binary plays every role: without a subcommand it orchestrates; the
//! hidden subcommands (`service`, `client`, `relay`, `raw-server`,
//! `raw-client`, `raw-tokio-client`, `idle`, `namer`, `sink`, `caller`) are the processes it
//! starts by re-executing itself. See `docs/performance.md`.

#![warn(missing_docs)]

mod guard;
mod orchestrate;
mod raw;
mod raw_tokio;
mod roles;
mod util;

use std::collections::HashMap;
use std::path::PathBuf;

use roles::{dir_arg, Flavour};
use util::die;

const USAGE: &str = "\
usage: zrpc-bench [--quick] [--json] [--zrpcd PATH] [--threshold CORES] [--max-wait SECS] [--retries N]

  --quick          smaller counts; finishes in under a minute
  --json           print the results as JSON instead of a table
  --json-out FILE  also write the JSON to FILE
  --no-cache       diagnostic: run the echo services with the reply cache off
  --only A,B       run only these scenarios (seq_small, conc_small_64, many_clients,
                   default_client, large_1mib, large_8mib, names, client_flavour,
                   idle_connections,
                   pending_calls, busy_poll_cost)
  --zrpcd PATH     the broker binary (default: zrpcd next to this executable)
  --threshold C    other processes may use at most C cores for a run to be clean (default 0.15)
  --max-wait S     longest wait for a quiet machine before each run (default 60, quick 10)
  --retries N      repeats of a disturbed run (default 2, quick 1)
";

/// Parsed `--key value` arguments and bare `--flag`s.
pub struct Args {
    map: HashMap<String, String>,
}

impl Args {
    fn parse(args: &[String]) -> Args {
        let mut map = HashMap::new();
        let mut i = 0;
        while i < args.len() {
            let a = &args[i];
            let Some(key) = a.strip_prefix("--") else {
                die(format!("unexpected argument {a:?}\n{USAGE}"));
            };
            let has_value = i + 1 < args.len() && !args[i + 1].starts_with("--");
            if has_value {
                map.insert(key.to_string(), args[i + 1].clone());
                i += 2;
            } else {
                map.insert(key.to_string(), String::new());
                i += 1;
            }
        }
        Args { map }
    }

    /// Whether a bare flag is present.
    pub fn flag(&self, k: &str) -> bool {
        self.map.contains_key(k)
    }

    /// A string value.
    pub fn str(&self, k: &str) -> Option<&str> {
        self.map.get(k).map(String::as_str)
    }

    /// A parsed value, or the default.
    pub fn get<T: std::str::FromStr>(&self, k: &str, default: T) -> T {
        match self.map.get(k) {
            Some(v) => v
                .parse()
                .unwrap_or_else(|_| die(format!("bad value for --{k}: {v:?}"))),
            None => default,
        }
    }

    fn need(&self, k: &str) -> &str {
        self.str(k).unwrap_or_else(|| die(format!("missing --{k}")))
    }
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let (role, rest) = match argv.first().map(String::as_str) {
        Some(r) if !r.starts_with("--") => (r.to_string(), &argv[1..]),
        _ => (String::new(), &argv[..]),
    };
    let a = Args::parse(rest);
    match role.as_str() {
        "" => {
            if a.flag("help") {
                print!("{USAGE}");
                return;
            }
            std::process::exit(orchestrate::main(&a));
        }
        "service" => roles::service(&dir_arg(a.need("dir")), a.flag("raw"), a.flag("no-cache")),
        "client" => roles::client(
            &dir_arg(a.need("dir")),
            Flavour::parse(a.need("flavour")).unwrap_or_else(|| die("bad --flavour")),
            a.get("inflight", 1),
            a.get("warmup", 0),
            a.get("calls", 1000),
            a.get("size", 64),
        ),
        "paced" => roles::paced(
            &dir_arg(a.need("dir")),
            a.get("rate", 10_000),
            a.get("seconds", 2.0),
        ),
        "relay" => raw::relay(&PathBuf::from(a.need("path"))),
        "raw-server" => raw::server(&PathBuf::from(a.need("path"))),
        "raw-client" => raw::client(
            &PathBuf::from(a.need("path")),
            a.get("inflight", 1),
            a.get("warmup", 0),
            a.get("calls", 1000),
            a.get("size", 64),
        ),
        "raw-tokio-client" => raw_tokio::client(
            &PathBuf::from(a.need("path")),
            a.str("flavour") != Some("current"),
            a.get("inflight", 1),
            a.get("warmup", 0),
            a.get("calls", 1000),
            a.get("size", 64),
        ),
        "idle" => roles::idle(&dir_arg(a.need("dir")), a.get("count", 1000)),
        "namer" => roles::namer(
            &dir_arg(a.need("dir")),
            a.get("count", 10_000),
            a.str("prefix").unwrap_or("bench_name_"),
        ),
        "sink" => roles::sink(
            &dir_arg(a.need("dir")),
            a.need("name"),
            a.get("count", 1000),
        ),
        "caller" => roles::caller(
            &dir_arg(a.need("dir")),
            a.need("name"),
            a.get("count", 1000),
        ),
        other => die(format!("unknown role {other:?}\n{USAGE}")),
    }
}
