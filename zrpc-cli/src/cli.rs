//! Command-line definitions (clap derive).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use clap_complete::Shell;

/// The exit-code table as shown in `zrpc call --help` (the codes of the
/// binary's `error::exit`).
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
   0  success
   1  usage error (bad flag, invalid JSON payload, invalid name) or other local error
   2  cannot connect to zrpcd, or the connection was lost
   3  timeout
   4  no such service (with --no-wait)
   5  no such method
   6  remote error: the handler failed or panicked
   7  bad payload: the service could not decode the arguments
   8  service gone: the instance disconnected during the call (with --no-retry, or
      with --no-wait when no other instance holds the name); the call may have run
   9  the broker is shutting down
  10  protocol error, version mismatch or limit exceeded
  11  access denied by the broker's policy, or an untrusted broker
 130  interrupted (Ctrl-C during a --concurrency run with a finite --count)";

const MAIN_EXAMPLES: &str = "\
Examples:
  zrpc call echo echo '{\"hello\": [1, 2.5, null]}'
  zrpc list
  zrpc list echo
  zrpc monitor
  zrpc stats --json
  zrpc --socket-dir /run/zrpc list
  zrpc completions bash > /etc/bash_completion.d/zrpc";

/// The zrpc command-line tool: call services through the zrpcd broker, list
/// them and their methods, watch calls live, and read the broker's
/// statistics.
#[derive(Debug, Parser)]
#[command(name = "zrpc", version, after_help = MAIN_EXAMPLES)]
pub struct Cli {
    /// Directory of the broker's socket (`zrpcd.sock`); default /run/zrpc
    /// (the system broker), else $XDG_RUNTIME_DIR/zrpc.
    #[arg(long, global = true, env = "ZRPC_SOCKET_DIR", value_name = "DIR")]
    pub socket_dir: Option<PathBuf>,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Call SERVICE.METHOD with a JSON payload and print the result.
    #[command(after_help = call_help())]
    Call(CallArgs),
    /// List services and their instances, or the methods of one service.
    #[command(after_help = LIST_HELP)]
    List(ListArgs),
    /// Print the calls passing through the broker as they finish.
    #[command(after_help = MONITOR_HELP)]
    Monitor(MonitorArgs),
    /// Print the broker's counters and per-service latency percentiles.
    #[command(after_help = STATS_HELP)]
    Stats(StatsArgs),
    /// Print a shell completion script for zrpc.
    #[command(after_help = COMPLETIONS_HELP)]
    Completions(CompletionsArgs),
}

fn call_help() -> String {
    format!("{CALL_HELP}\n\n{}\n\n{CALL_EXAMPLES}", EXIT_CODES_HELP)
}

const CALL_HELP: &str = r#"Payload (JSON <-> MessagePack):
  JSON integers become MessagePack integers (u64/i64), other numbers f64;
  strings, arrays and objects map to str, array and map. MessagePack types
  JSON lacks use tagged objects, the same way in and out:
    {"$bytes": "<base64>"}            binary data (bin), standard base64
    {"$map": [[key, value], ...]}     a map with non-string keys
    {"$float": "inf"|"-inf"|"nan"}    a non-finite float
    {"$ext": [type, "<base64>"]}      an extension value
  Only an object with exactly one key that is a tag is read as a tag; a
  map whose only key is literally "$bytes" is written with "$map".
  No PAYLOAD sends nil; '-' reads the JSON payload from standard input.

Output:
  By default the result is printed as indented JSON (with the tags above).
  With --json each result is one line of compact JSON. With --concurrency,
  results are not printed; a summary is (calls, errors, calls/s, latency
  p50/p99), as one JSON object with --json. Without --concurrency, --count
  stops at the first error; with it, errors are counted, and the exit code
  is that of the first error. Ctrl-C ends a --concurrency run with its
  summary (exit code 0 with --count inf, 130 otherwise).

Timeout:
  A call gives up after --timeout seconds, 30 by default; --timeout inf
  waits as long as it takes (like the libraries and the original zrpc).
  Meanwhile it waits for the service to register if nobody holds the name:
  after a second of that, zrpc says so on standard error, and the timeout
  error says the name was never registered. --no-wait fails at once
  instead (exit code 4)."#;

const CALL_EXAMPLES: &str = r#"Examples:
  zrpc call echo echo '"hello"'
  zrpc call echo echo '{"data": {"$bytes": "AAEC"}}' --json
  echo '[1, 2]' | zrpc call calc add -
  zrpc call echo pid --timeout 2 --no-wait
  zrpc call echo counter --count 3
  zrpc call echo echo '"x"' --count 10000 --concurrency 16"#;

const LIST_HELP: &str = "\
Without SERVICE, lists the registered services with one line per instance:
connection id, pid, uid (from the socket, not from what the peer claims),
how long it has been connected, calls served and failed, and its agent.
With SERVICE, calls SERVICE.zrpc.describe and prints each method's signature
and documentation.

Examples:
  zrpc list
  zrpc list --json
  zrpc list echo
  zrpc list zrpcd";

const MONITOR_HELP: &str = "\
Subscribes with zrpcd.monitor and prints one line per finished call: local
time, caller pid, service.method, argument and reply sizes, latency and
outcome (ok, timeout, remote, ...). Without SERVICE, all services are shown.
Calls made by the monitor itself are not shown. Stop with Ctrl-C or --count.

Examples:
  zrpc monitor
  zrpc monitor echo calc
  zrpc monitor --json --count 100 > calls.jsonl";

const STATS_HELP: &str = "\
Examples:
  zrpc stats
  zrpc stats --json | jq .services";

const COMPLETIONS_HELP: &str = "\
Examples:
  zrpc completions bash > ~/.local/share/bash-completion/completions/zrpc
  zrpc completions zsh > ~/.zfunc/_zrpc
  zrpc completions fish > ~/.config/fish/completions/zrpc.fish";

/// How many times to repeat a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    /// This many times (at least 1).
    N(u64),
    /// Until interrupted (or, without --concurrency, until a call fails).
    Inf,
}

fn parse_count(s: &str) -> Result<Count, String> {
    if s.eq_ignore_ascii_case("inf") {
        return Ok(Count::Inf);
    }
    match s.parse::<u64>() {
        Ok(0) => Err("the count must be at least 1".into()),
        Ok(n) => Ok(Count::N(n)),
        Err(_) => Err(format!("expected a positive number or \"inf\", not {s:?}")),
    }
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("expected a number of seconds, not {s:?}"))?;
    if secs.is_nan() || secs <= 0.0 {
        return Err("the timeout must be positive".into());
    }
    if secs.is_infinite() {
        return Err("expected a finite number of seconds".into());
    }
    Duration::try_from_secs_f64(secs).map_err(|_| format!("{s} seconds is too long a timeout"))
}

/// `zrpc call`'s default `--timeout`, in seconds.
pub const DEFAULT_CALL_TIMEOUT_S: u64 = 30;

/// A call's `--timeout`: seconds, or `inf` for none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallTimeout(pub Option<Duration>);

fn parse_call_timeout(s: &str) -> Result<CallTimeout, String> {
    if ["inf", "infinity", "none"]
        .iter()
        .any(|w| s.eq_ignore_ascii_case(w))
    {
        return Ok(CallTimeout(None));
    }
    parse_timeout(s).map(|d| CallTimeout(Some(d)))
}

fn parse_concurrency(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=10_000).contains(&n) => Ok(n),
        _ => Err(format!("expected a number from 1 to 10000, not {s:?}")),
    }
}

/// How many values (elements, keys and values at any depth) a result may
/// hold before `zrpc` refuses to decode it (`zrpc call --max-values`).
pub const DEFAULT_MAX_VALUES: u64 = 1_000_000;

/// `zrpc call`.
#[derive(Debug, Args)]
pub struct CallArgs {
    /// Service name.
    pub service: String,
    /// Method name.
    pub method: String,
    /// Arguments as JSON ('-' reads them from standard input; none sends nil).
    pub payload: Option<String>,
    /// Give up after this many seconds (fractions allowed), or "inf" to
    /// wait as long as it takes.
    #[arg(long, short = 't', value_name = "SECONDS|inf", value_parser = parse_call_timeout,
          default_value_t = CallTimeout(Some(Duration::from_secs(DEFAULT_CALL_TIMEOUT_S))))]
    pub timeout: CallTimeout,
    /// Fail at once (exit code 4) if no service holds the name, instead of
    /// waiting for one to register.
    #[arg(long)]
    pub no_wait: bool,
    /// Fail (exit code 8) if the instance handling the call disconnects,
    /// instead of letting the broker re-deliver the call.
    #[arg(long)]
    pub no_retry: bool,
    /// Make the call N times, or "inf" to repeat until it fails or Ctrl-C.
    #[arg(long, short = 'n', value_name = "N|inf", value_parser = parse_count, default_value = "1")]
    pub count: Count,
    /// Keep K calls in flight (simple load generator); prints a summary
    /// instead of the results.
    #[arg(long, short = 'c', value_name = "K", value_parser = parse_concurrency)]
    pub concurrency: Option<usize>,
    /// Print results as compact JSON, one per line.
    #[arg(long)]
    pub json: bool,
    /// Refuse a result holding more than N values (elements, keys and
    /// values at any depth) before decoding it: each takes tens of bytes
    /// in memory however short its encoding (a service's 16 MiB of empty
    /// arrays would take gigabytes).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_VALUES)]
    pub max_values: u64,
}

/// `zrpc list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Show the methods of this service instead of the list of services.
    pub service: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Timeout of each call to the broker or the service, in seconds.
    #[arg(long, short = 't', value_name = "SECONDS", value_parser = parse_timeout, default_value = "10")]
    pub timeout: Duration,
}

/// `zrpc monitor`.
#[derive(Debug, Args)]
pub struct MonitorArgs {
    /// Only show calls to these services (default: all).
    pub services: Vec<String>,
    /// Print each event as one line of JSON.
    #[arg(long)]
    pub json: bool,
    /// Exit after N events.
    #[arg(long, short = 'n', value_name = "N")]
    pub count: Option<u64>,
}

/// `zrpc stats`.
#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Output format: a table, the broker's answer as JSON, or OpenMetrics
    /// text (alias: prometheus) for node_exporter's textfile collector or a
    /// scraper.
    #[arg(long, value_enum, default_value_t = StatsFormat::Text)]
    pub format: StatsFormat,
    /// Same as --format json.
    #[arg(long, conflicts_with = "format")]
    pub json: bool,
    /// Timeout of the call to the broker, in seconds.
    #[arg(long, short = 't', value_name = "SECONDS", value_parser = parse_timeout, default_value = "10")]
    pub timeout: Duration,
}

/// What `zrpc stats` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StatsFormat {
    /// Tables for humans.
    Text,
    /// The broker's answer as one line of JSON.
    Json,
    /// OpenMetrics text exposition (Prometheus reads it too).
    #[value(alias = "prometheus")]
    Openmetrics,
}

/// `zrpc completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to generate completions for.
    #[arg(value_enum)]
    pub shell: Shell,
}

impl std::fmt::Display for CallTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            None => f.write_str("inf"),
            Some(d) => write!(f, "{}", d.as_secs_f64()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_timeouts() {
        assert_eq!(parse_call_timeout("inf"), Ok(CallTimeout(None)));
        assert_eq!(parse_call_timeout("INF"), Ok(CallTimeout(None)));
        assert_eq!(
            parse_call_timeout("1.5"),
            Ok(CallTimeout(Some(Duration::from_millis(1500))))
        );
        assert!(parse_call_timeout("0").is_err());
        assert!(parse_call_timeout("1e300").is_err_and(|e| e.contains("too long")));
        assert!(parse_timeout("inf").is_err_and(|e| e.contains("finite")));
    }
}
