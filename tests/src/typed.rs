//! A zrpc interface for the typed-client tests: the trait and its types,
//! shared by the service (`zrpc-test-typed`) and the tests that call it.

use serde::{Deserialize, Serialize};

/// Two numbers.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Pair {
    /// The first.
    pub a: f64,
    /// The second.
    pub b: f64,
}

/// Why `divide` failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CalcError {
    /// The divisor was zero.
    DivisionByZero,
}

impl std::fmt::Display for CalcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CalcError::DivisionByZero => write!(f, "division by zero"),
        }
    }
}

/// Why `check` refused: a serde type without `Display` (its message is
/// its `Debug` form).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Refusal {
    /// The largest accepted value.
    pub limit: i64,
}

/// What `Calc::hold` saw: how its handlers overlapped and ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldStats {
    /// `hold` handlers started.
    pub started: u64,
    /// Those that ran to their end.
    pub finished: u64,
    /// Those dropped before their end (cancelled).
    pub dropped: u64,
    /// Those running now.
    pub running: u64,
    /// The most that ran at once.
    pub max_overlap: u64,
}

/// The calculator: every kind of method a typed client calls.
#[zrpc_client::interface]
pub trait Calc {
    /// A struct argument.
    fn add(&self, p: Pair) -> f64;
    /// No argument.
    fn version(&self) -> String;
    /// A `Result` with an error type.
    fn divide(&self, p: Pair) -> Result<f64, CalcError>;
    /// A `Result` whose error type has no `Display`.
    fn check(&self, x: i64) -> Result<i64, Refusal>;
    /// An `async fn`.
    async fn double_later(&self, x: u64) -> u64;
    /// State: `&mut self`, no result.
    fn bump(&mut self);
    /// How many times `bump` ran.
    fn bumps(&self) -> u64;
    /// This request's counter, from `Context::current()`.
    fn counter(&self) -> u64;
    /// The same, read after an `.await` inside an `async fn`.
    async fn counter_later(&self) -> u64;
    /// Waits `ms` milliseconds and returns `ms` (`&self`, `async`: calls
    /// overlap); counted in [`HoldStats`].
    async fn hold(&self, ms: u64) -> u64;
    /// How the `hold` handlers ran so far.
    fn hold_stats(&self) -> HoldStats;
}
