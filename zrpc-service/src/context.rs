//! The per-request context handed to handlers.

use std::fmt;
use std::time::Instant;

pub use zrpc_proto::Caller;

use bytes::Bytes;

/// A service or method name: UTF-8 in a [`Bytes`], usually a view into the
/// request's envelope, so a request's names cost no allocation.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Name(Bytes);

impl Name {
    /// `s` as a view into `buf` if it lies inside it, else a copy.
    pub(crate) fn within(buf: &Bytes, s: &str) -> Name {
        let range = buf.as_ptr_range();
        let p = s.as_ptr();
        if !s.is_empty() && range.contains(&p) && p as usize + s.len() <= range.end as usize {
            Name(buf.slice_ref(s.as_bytes()))
        } else {
            Name(Bytes::copy_from_slice(s.as_bytes()))
        }
    }

    /// The name as a string slice.
    pub(crate) fn as_str(&self) -> &str {
        // SAFETY: every constructor (`within`, `From<String>`) takes the
        // bytes of a `str` or `String`, whole, so they are valid UTF-8, and a
        // `Name`'s bytes never change.
        unsafe { std::str::from_utf8_unchecked(&self.0) }
    }
}

impl From<String> for Name {
    fn from(s: String) -> Self {
        Name(Bytes::from(s))
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Information about the request being handled, passed to handlers that
/// declare a `ctx: &Context` parameter.
#[derive(Debug, Clone)]
pub struct Context {
    pub(crate) counter: u64,
    pub(crate) request_id: u64,
    pub(crate) service: Name,
    pub(crate) method: Name,
    pub(crate) caller_instance: u64,
    pub(crate) caller_call: u64,
    pub(crate) caller: Option<Caller>,
    pub(crate) deadline: Option<Instant>,
}

thread_local! {
    /// The context of the interface method running on this thread (see
    /// [`Context::current`]).
    static CURRENT: std::cell::RefCell<Option<Context>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` with `slot`'s context as [`Context::current`], and puts it back
/// in `slot` afterwards (also if `f` unwinds): the context moves, it is not
/// copied.
pub(crate) fn enter<T>(slot: &mut Option<Context>, f: impl FnOnce() -> T) -> T {
    struct Restore<'a> {
        slot: &'a mut Option<Context>,
        prev: Option<Context>,
    }
    impl Drop for Restore<'_> {
        fn drop(&mut self) {
            *self.slot = CURRENT.with(|c| c.replace(self.prev.take()));
        }
    }
    let prev = CURRENT.with(|c| c.replace(slot.take()));
    let _restore = Restore { slot, prev };
    f()
}

impl Context {
    /// The context of the request being handled on this thread by a method
    /// of a zrpc interface (`#[service] impl Calc for CalcServer`), whose
    /// signature, shared with the callers, cannot take a `&Context`; `None`
    /// anywhere else (inherent `#[service]` methods take `ctx: &Context`
    /// instead).
    pub fn current() -> Option<Context> {
        CURRENT.with(|c| c.borrow().clone())
    }

    /// A context for calling [`Service::handle`](crate::Service::handle)
    /// directly (tests, in-process dispatch): counter 0, no caller, no
    /// deadline.
    pub fn new(service: impl Into<String>, method: impl Into<String>) -> Self {
        Context {
            counter: 0,
            request_id: 0,
            service: Name::from(service.into()),
            method: Name::from(method.into()),
            caller_instance: 0,
            caller_call: 0,
            caller: None,
            deadline: None,
        }
    }

    /// Sets the caller (builder style, for direct calls).
    pub fn with_caller(mut self, caller: Option<Caller>) -> Self {
        self.caller = caller;
        self
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
        self.service.as_str()
    }

    /// The called method.
    pub fn method(&self) -> &str {
        self.method.as_str()
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

    /// Who is calling: uid, gid and pid as the kernel reported them to the
    /// broker when the caller connected (`SO_PEERCRED`), never what the
    /// caller claims; `None` only with a broker older than the security
    /// model. A service can authorise by it:
    ///
    /// ```
    /// # use zrpc_service::Context;
    /// fn only_root(ctx: &Context) -> Result<(), String> {
    ///     match ctx.caller() {
    ///         Some(c) if c.uid == 0 => Ok(()),
    ///         other => Err(format!("access denied for {other:?}")),
    ///     }
    /// }
    /// # assert!(only_root(&Context::new("s", "m")).is_err());
    /// ```
    pub fn caller(&self) -> Option<Caller> {
        self.caller
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_views_into_their_buffer_when_they_can_be() {
        let buf = Bytes::from_static(b"xxechoyy");
        let s = std::str::from_utf8(&buf[2..6]).expect("utf8");
        let n = Name::within(&buf, s);
        assert_eq!(n.as_str(), "echo");
        assert_eq!(n.as_str().as_ptr(), s.as_ptr(), "a view, not a copy");
        let elsewhere = String::from("echo");
        let c = Name::within(&buf, &elsewhere);
        assert_eq!(c.as_str(), "echo");
        assert_ne!(c.as_str().as_ptr(), elsewhere.as_ptr(), "a copy");
        assert_eq!(Name::within(&buf, "").as_str(), "");
        let ctx = Context::new("svc", "méthode");
        assert_eq!((ctx.service(), ctx.method()), ("svc", "méthode"));
        assert_eq!(format!("{:?}", ctx.method), "\"méthode\"");
    }
}
