//! What the macros expand to: not a public API (see `__private` in lib.rs).

use super::*;

/// Decodes a method's arguments; [`Blob`]s in them are views into
/// `payload` (no copy).
pub fn decode<T: serde::de::DeserializeOwned>(
    method: &str,
    payload: &Bytes,
) -> Result<T, HandlerError> {
    zrpc_proto::blob::decode_from(payload, |p| decode_payload(p)).map_err(|e| {
        HandlerError::BadPayload(format!(
            "cannot decode the payload of method {:?} as {}: {}",
            method,
            std::any::type_name::<T>(),
            zrpc_proto::blob::decode_error_text(&e)
        ))
    })
}

pub fn encode<T: serde::Serialize>(value: &T) -> Result<Bytes, HandlerError> {
    encode_value(value)
}

/// A closure's result (`ServiceBuilder`, where `E` is generic: the
/// message alone).
pub fn encode_result<T: serde::Serialize, E: Display>(
    value: Result<T, E>,
) -> Result<Bytes, HandlerError> {
    match value {
        Ok(v) => encode_value(&v),
        Err(e) => Err(HandlerError::Remote(e.to_string())),
    }
}

/// The shape of `T` if it can be derived: `(&&ShapeOf::<T>::new()).zrpc_shape()`
/// at a site where `T` is concrete gives `Some(shape_of::<T>())` when
/// `T: DeserializeOwned`, else `None` (autoref specialisation).
pub struct ShapeOf<T: ?Sized>(std::marker::PhantomData<T>);

impl<T: ?Sized> ShapeOf<T> {
    /// The probe for `T`.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        ShapeOf(std::marker::PhantomData)
    }
}

/// `T: DeserializeOwned` step of [`ShapeOf`].
pub trait TracedShape {
    /// The shape, if any.
    fn zrpc_shape(&self) -> Option<crate::Shape>;
}
impl<T: serde::de::DeserializeOwned> TracedShape for &ShapeOf<T> {
    fn zrpc_shape(&self) -> Option<crate::Shape> {
        Some(crate::shape_of::<T>())
    }
}

/// Fallback step of [`ShapeOf`].
pub trait NoShape {
    /// The shape, if any.
    fn zrpc_shape(&self) -> Option<crate::Shape>;
}
impl<T: ?Sized> NoShape for ShapeOf<T> {
    fn zrpc_shape(&self) -> Option<crate::Shape> {
        None
    }
}

/// A handler's `Err(e)` as the error sent: `(&&&ErrorOf(&e)).zrpc_error()`
/// at a site where `E` is a concrete type picks the first of these that
/// `E` implements (autoref specialisation; `#[service]` expands it at
/// each method):
/// 1. `Serialize + Display`: the message is `e.to_string()`, the value
///    `e` encoded ([`HandlerError::RemoteValue`]);
/// 2. `Serialize + Debug`: the same with `{e:?}` as the message;
/// 3. `Display`: the message alone ([`HandlerError::Remote`]).
pub struct ErrorOf<'a, E>(pub &'a E);

/// Step 1 of [`ErrorOf`].
pub trait SerializeDisplayError {
    /// The error to send.
    fn zrpc_error(&self) -> HandlerError;
}
impl<E: serde::Serialize + Display> SerializeDisplayError for &&ErrorOf<'_, E> {
    fn zrpc_error(&self) -> HandlerError {
        HandlerError::remote_value(self.0, self.0.to_string())
    }
}

/// Step 2 of [`ErrorOf`].
pub trait SerializeDebugError {
    /// The error to send.
    fn zrpc_error(&self) -> HandlerError;
}
impl<E: serde::Serialize + std::fmt::Debug> SerializeDebugError for &ErrorOf<'_, E> {
    fn zrpc_error(&self) -> HandlerError {
        HandlerError::remote_value(self.0, format!("{:?}", self.0))
    }
}

/// Step 3 of [`ErrorOf`].
pub trait DisplayError {
    /// The error to send.
    fn zrpc_error(&self) -> HandlerError;
}
impl<E: Display> DisplayError for ErrorOf<'_, E> {
    fn zrpc_error(&self) -> HandlerError {
        HandlerError::Remote(self.0.to_string())
    }
}

/// Runs the synchronous interface method `f` with `ctx` as
/// [`Context::current`].
pub fn with_context<T>(ctx: &Context, f: impl FnOnce() -> T) -> T {
    crate::context::enter(&mut Some(ctx.clone()), f)
}

pin_project_lite::pin_project! {
    /// An `async` interface method's future, polled with its context as
    /// [`Context::current`].
    pub struct InContext<F> {
        ctx: Option<Context>,
        #[pin]
        fut: F,
    }
}

/// `fut` polled with `ctx` as [`Context::current`].
pub fn in_context<F: Future>(ctx: &Context, fut: F) -> InContext<F> {
    InContext {
        ctx: Some(ctx.clone()),
        fut,
    }
}

impl<F: Future> Future for InContext<F> {
    type Output = F::Output;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        let this = self.project();
        crate::context::enter(this.ctx, || this.fut.poll(cx))
    }
}

pub fn guard<'a, F>(fut: F) -> HandlerFuture<'a>
where
    F: Future<Output = Result<Bytes, HandlerError>> + 'a,
{
    // One allocation per call: the guard holds the future inline.
    Box::pin(unwind::CatchUnwind::new(fut))
}

/// A synchronous handler's outcome as a (ready) handler future.
pub fn ready(outcome: Result<Bytes, HandlerError>) -> HandlerFuture<'static> {
    Box::pin(std::future::ready(outcome))
}

pub fn no_such_method<'a>(ctx: &Context, method: &str) -> HandlerFuture<'a> {
    let err = HandlerError::no_such_method(ctx, method);
    Box::pin(std::future::ready(Err(err)))
}
