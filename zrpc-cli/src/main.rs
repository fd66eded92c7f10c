//! `zrpc`: the command-line tool of zrpc.
//!
//! - `zrpc call SERVICE METHOD [PAYLOAD]`: call a method with a JSON payload;
//! - `zrpc list [SERVICE]`: the registered services, or one service's methods;
//! - `zrpc monitor [SERVICE...]`: the calls passing through the broker, live;
//! - `zrpc stats`: the broker's counters and latency percentiles;
//! - `zrpc completions SHELL`: a shell completion script.
//!
//! Errors are printed as `zrpc: <message>` on standard error, and the exit
//! code tells the kind of failure (see [`error::exit`]).

#![warn(missing_docs)]

mod call;
mod error;
mod fmt;
mod json;
mod list;
mod monitor;
mod openmetrics;
mod stats;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser};
use zrpc_client::{Client, ClientBuilder};

use crate::error::{exit, Failure};
use zrpc_cli::cli::{self, Cli, Command};

/// The agent string sent in `Hello`.
pub const AGENT: &str = concat!("zrpc-cli/", env!("CARGO_PKG_VERSION"));

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version print to stdout and succeed; usage errors
            // exit with 1 like every other local error.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            });
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::from(exit::OK),
        Err(f) => {
            if !f.message.is_empty() {
                // Error messages carry services' text (another user's).
                eprintln!("zrpc: {}", fmt::printable(&f.message));
            }
            ExitCode::from(f.code)
        }
    }
}

fn run(cli: Cli) -> Result<(), Failure> {
    let dir = cli.socket_dir;
    match cli.command {
        Command::Completions(args) => {
            let mut cmd = Cli::command();
            let mut out = Vec::new();
            clap_complete::generate(args.shell, &mut cmd, "zrpc", &mut out);
            write_out(&String::from_utf8_lossy(&out))
        }
        Command::Monitor(args) => {
            monitor::run(&zrpc_proto::resolve_socket_dir(dir.as_deref()), &args)
        }
        Command::Call(args) => block_on(async move {
            let client = connect(dir.as_deref(), args.timeout.0).await?;
            call::run(client, args).await
        }),
        Command::List(args) => block_on(async move {
            let client = connect(dir.as_deref(), Some(args.timeout)).await?;
            list::run(&client, &args).await
        }),
        Command::Stats(args) => block_on(async move {
            let client = connect(dir.as_deref(), Some(args.timeout)).await?;
            stats::run(&client, &args).await
        }),
    }
}

fn block_on<F: std::future::Future<Output = Result<(), Failure>>>(f: F) -> Result<(), Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::usage(format!("cannot start the async runtime: {e}")))?
        .block_on(f)
}

/// The shortest bound on connecting to zrpcd a command's `--timeout` gives:
/// a short call timeout (0.2 s, say) must not turn a slow handshake on a
/// loaded machine into "cannot connect" (exit 2) instead of the call's own
/// outcome.
const MIN_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// A client of the broker in `dir`. Connecting (and every reconnection) is
/// bounded by the command's `timeout` too (`None`: no timeout), so that a
/// stopped or wedged broker does not hold a command long past it: between
/// [`MIN_CONNECT_TIMEOUT`] and the clients' default.
async fn connect(dir: Option<&Path>, timeout: Option<Duration>) -> Result<Client, Failure> {
    let most = zrpc_client::DEFAULT_CONNECT_TIMEOUT;
    let bound = timeout.map_or(most, |t| t.clamp(MIN_CONNECT_TIMEOUT, most));
    let mut b = ClientBuilder::default().agent(AGENT).connect_timeout(bound);
    if let Some(d) = dir {
        b = b.socket_dir(PathBuf::from(d));
    }
    Ok(b.connect().await?)
}

/// Writes `text` to standard output. A closed pipe (`zrpc ... | head`) ends
/// the program quietly with success.
pub fn write_out(text: &str) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(Failure::new(exit::OK, "")),
        Err(e) => Err(Failure::usage(format!(
            "cannot write to standard output: {e}"
        ))),
    }
}

/// Writes `line` and a newline to standard output (see [`write_out`]).
pub fn write_line(line: &str) -> Result<(), Failure> {
    let mut s = String::with_capacity(line.len() + 1);
    s.push_str(line);
    s.push('\n');
    write_out(&s)
}
