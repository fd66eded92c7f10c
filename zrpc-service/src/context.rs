//! The per-request context handed to handlers.

use std::time::Instant;

/// Information about the request being handled, passed to handlers that
/// declare a `ctx: &Context` parameter.
#[derive(Debug, Clone)]
pub struct Context {
    pub(crate) counter: u64,
    pub(crate) request_id: u64,
    pub(crate) service: String,
    pub(crate) method: String,
    pub(crate) caller_instance: u64,
    pub(crate) caller_call: u64,
    pub(crate) deadline: Option<Instant>,
}

impl Context {
    /// A context for calling [`Service::handle`](crate::Service::handle)
    /// directly (tests, in-process dispatch): counter 0, no caller, no
    /// deadline.
    pub fn new(service: impl Into<String>, method: impl Into<String>) -> Self {
        Context {
            counter: 0,
            request_id: 0,
            service: service.into(),
            method: method.into(),
            caller_instance: 0,
            caller_call: 0,
            deadline: None,
        }
    }

    /// Sets the request counter (builder style, for direct calls).
    pub fn with_counter(mut self, counter: u64) -> Self {
        self.counter = counter;
        self
    }

    /// Sets the deadline (builder style, for direct calls).
    pub fn with_deadline(mut self, deadline: Option<Instant>) -> Self {
        self.deadline = deadline;
        self
    }

    /// Number of requests this server has received so far, including this
    /// one (the original `self.counter`). Re-sent calls answered from the
    /// reply cache do not count.
    pub fn counter(&self) -> u64 {
        self.counter
    }

    /// The broker-assigned id of this request (unique per connection).
    pub fn request_id(&self) -> u64 {
        self.request_id
    }

    /// The service name the call was addressed to (one of the server's
    /// names).
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The called method.
    pub fn method(&self) -> &str {
        &self.method
    }

    /// The caller's instance id (random, chosen once per client object).
    pub fn caller_instance(&self) -> u64 {
        self.caller_instance
    }

    /// The caller's own id for this call. With
    /// [`caller_instance`](Self::caller_instance) it identifies the call
    /// across reconnects and re-deliveries, e.g. to de-duplicate.
    pub fn caller_call(&self) -> u64 {
        self.caller_call
    }

    /// When the caller stops waiting, if it set a timeout.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Whether the caller has given up: its deadline has passed. Long
    /// running synchronous handlers can poll this to stop early. (Async
    /// handlers are simply dropped when the broker cancels their request.)
    pub fn is_cancelled(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }
}
