//! The `zrpc` command line's clap definitions, as a library so that the man
//! page generator (`cargo xtask man`) reads the same definitions as the
//! binary. The tool itself is the `zrpc` binary of this package.

#![warn(missing_docs)]

pub mod cli;
