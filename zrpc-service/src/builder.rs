//! Services made of closures, for people who do not want the macro.

use std::fmt::Display;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::unwind::{panicked, CatchUnwind};
use crate::{Context, HandlerError, HandlerFuture, MethodInfo, ParamInfo, Service};

type SyncHandler = Box<dyn FnMut(&Context, Bytes) -> Result<Bytes, HandlerError>>;
type AsyncHandler = Box<dyn FnMut(Context, Bytes) -> HandlerFuture<'static>>;

enum Handler {
    Sync(SyncHandler),
    Async(AsyncHandler),
}

struct Entry {
    info: MethodInfo,
    handler: Handler,
}

/// Builds a [`FnService`] from closures.
///
/// ```
/// use zrpc_service::{Context, ServiceBuilder, Value};
///
/// let svc = ServiceBuilder::new("calc")
///     .method("add", |_ctx: &Context, (a, b): (i64, i64)| Ok::<_, String>(a + b))
///     .doc("Adds two integers.")
///     .method("echo", |_ctx: &Context, p: Value| Ok::<_, String>(p))
///     .build();
/// # let _ = svc;
/// ```
pub struct ServiceBuilder {
    name: String,
    entries: Vec<Entry>,
}

impl ServiceBuilder {
    /// Starts a service that will be registered as `name`.
    pub fn new(name: impl Into<String>) -> Self {
        ServiceBuilder {
            name: name.into(),
            entries: Vec::new(),
        }
    }

    fn push(
        &mut self,
        name: String,
        (param_ty, param_shape): (&str, crate::Shape),
        returns: &str,
        handler: Handler,
    ) {
        let info = MethodInfo {
            name: name.clone(),
            doc: String::new(),
            params: vec![ParamInfo {
                name: "payload".to_string(),
                ty: short_type_name(param_ty),
                shape: Some(param_shape),
            }],
            returns: short_type_name(returns),
            returns_shape: None,
            error_shape: None,
        };
        // A later registration of the same name replaces the earlier one.
        self.entries.retain(|e| e.info.name != name);
        self.entries.push(Entry { info, handler });
    }

    /// Adds a method. The closure receives the request context and the
    /// payload decoded as `A` (use [`Value`](crate::Value) to accept
    /// anything); `Ok(r)` is encoded as the reply, `Err(e)` becomes a
    /// `Remote` error with `e`'s message. A later method of the same name
    /// replaces an earlier one.
    pub fn method<F, A, R, E>(mut self, name: impl Into<String>, mut f: F) -> Self
    where
        F: FnMut(&Context, A) -> Result<R, E> + 'static,
        A: DeserializeOwned,
        R: Serialize,
        E: Display,
    {
        let name = name.into();
        let handler: SyncHandler = Box::new(move |ctx, payload| {
            let arg: A = crate::__private::decode(ctx.method(), &payload)?;
            crate::__private::encode_result(f(ctx, arg))
        });
        self.push(
            name,
            (std::any::type_name::<A>(), crate::shape_of::<A>()),
            std::any::type_name::<Result<R, E>>(),
            Handler::Sync(handler),
        );
        self
    }

    /// Adds an asynchronous method. The closure receives a copy of the
    /// context and the decoded payload and returns a future; the future is
    /// dropped if the broker cancels the request.
    pub fn async_method<F, Fut, A, R, E>(mut self, name: impl Into<String>, mut f: F) -> Self
    where
        F: FnMut(Context, A) -> Fut + 'static,
        Fut: Future<Output = Result<R, E>> + 'static,
        A: DeserializeOwned,
        R: Serialize,
        E: Display,
    {
        let name = name.into();
        let handler: AsyncHandler = Box::new(move |ctx, payload| {
            let arg: A = match crate::__private::decode(ctx.method(), &payload) {
                Ok(a) => a,
                Err(e) => return Box::pin(std::future::ready(Err(e))),
            };
            let fut = f(ctx, arg);
            crate::__private::guard(async move { crate::__private::encode_result(fut.await) })
        });
        self.push(
            name,
            (std::any::type_name::<A>(), crate::shape_of::<A>()),
            std::any::type_name::<Result<R, E>>(),
            Handler::Async(handler),
        );
        self
    }

    /// Sets the doc string of the most recently added method (shown by
    /// `zrpc.describe`). Does nothing if no method was added yet.
    pub fn doc(mut self, doc: impl Into<String>) -> Self {
        if let Some(e) = self.entries.last_mut() {
            e.info.doc = doc.into();
        }
        self
    }

    /// Finishes the service.
    pub fn build(self) -> FnService {
        FnService {
            name: self.name,
            entries: self.entries,
        }
    }
}

/// A service made of closures, built by [`ServiceBuilder`].
pub struct FnService {
    name: String,
    entries: Vec<Entry>,
}

impl std::fmt::Debug for FnService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FnService")
            .field("name", &self.name)
            .field(
                "methods",
                &self
                    .entries
                    .iter()
                    .map(|e| &e.info.name)
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Service for FnService {
    fn service_name(&self) -> String {
        self.name.clone()
    }

    fn methods(&self) -> Vec<MethodInfo> {
        self.entries.iter().map(|e| e.info.clone()).collect()
    }

    fn handle<'a>(
        &'a mut self,
        ctx: &'a Context,
        method: &'a str,
        payload: Bytes,
    ) -> HandlerFuture<'a> {
        let Some(entry) = self.entries.iter_mut().find(|e| e.info.name == method) else {
            return crate::__private::no_such_method(ctx, method);
        };
        match &mut entry.handler {
            Handler::Sync(f) => {
                let r = catch_unwind(AssertUnwindSafe(|| f(ctx, payload)))
                    .unwrap_or_else(|p| Err(panicked(&*p)));
                Box::pin(std::future::ready(r))
            }
            Handler::Async(f) => match catch_unwind(AssertUnwindSafe(|| f(ctx.clone(), payload))) {
                Ok(fut) => Box::pin(CatchUnwind::new(fut)),
                Err(p) => Box::pin(std::future::ready(Err(panicked(&*p)))),
            },
        }
    }

    fn handle_now(
        &mut self,
        ctx: &Context,
        method: &str,
        payload: &Bytes,
    ) -> Option<Result<Bytes, HandlerError>> {
        let entry = self.entries.iter_mut().find(|e| e.info.name == method)?;
        match &mut entry.handler {
            Handler::Sync(f) => Some(
                catch_unwind(AssertUnwindSafe(|| f(ctx, payload.clone())))
                    .unwrap_or_else(|p| Err(panicked(&*p))),
            ),
            Handler::Async(_) => None,
        }
    }
}

/// A type name as a user writes it: every path shortened to its last
/// segment (`core::result::Result<alloc::string::String, i64>` becomes
/// `Result<String, i64>`), for introspection of closure services.
pub(crate) fn short_type_name(full: &str) -> String {
    let mut out = String::with_capacity(full.len());
    // Where the path being read starts in `out`.
    let mut path_start = 0;
    let mut rest = full;
    while let Some(c) = rest.chars().next() {
        if let Some(after) = rest.strip_prefix("::") {
            // A path separator: only the segment after it stays.
            out.truncate(path_start);
            rest = after;
            continue;
        }
        out.push(c);
        if !(c.is_alphanumeric() || c == '_') {
            path_start = out.len();
        }
        rest = &rest[c.len_utf8()..];
    }
    out
}

#[cfg(test)]
mod short_name_tests {
    use super::short_type_name;

    #[test]
    fn paths_are_shortened_to_their_last_segment() {
        for (full, short) in [
            (
                "core::result::Result<alloc::string::String, i64>",
                "Result<String, i64>",
            ),
            ("(i64, i64)", "(i64, i64)"),
            (
                "alloc::vec::Vec<std::collections::hash::map::HashMap<u8, rmpv::Value>>",
                "Vec<HashMap<u8, Value>>",
            ),
            ("&[u8]", "&[u8]"),
            ("my_crate::Pair", "Pair"),
        ] {
            assert_eq!(short_type_name(full), short, "{full}");
        }
    }
}
