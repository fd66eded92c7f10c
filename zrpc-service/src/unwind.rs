//! Turning handler panics into `Remote` errors.

use std::any::Any;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;

use crate::HandlerError;

/// The text of a panic payload (`&str` or `String`; anything else is
/// reported generically).
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

/// The error reported for a panicking handler.
pub(crate) fn panicked(payload: &(dyn Any + Send)) -> HandlerError {
    HandlerError::Remote(format!("handler panicked: {}", panic_message(payload)))
}

/// Wraps a handler future: a panic during any poll resolves the future to a
/// `Remote` error instead of unwinding into the service loop. The inner
/// future is dropped (in place) after it completes or panics and is never
/// polled again.
///
/// The inner future is stored inline, so wrapping allocates nothing.
pub(crate) struct CatchUnwind<F> {
    inner: Option<F>,
}

impl<F> CatchUnwind<F> {
    pub(crate) fn new(fut: F) -> Self {
        CatchUnwind { inner: Some(fut) }
    }
}

impl<F> Future for CatchUnwind<F>
where
    F: Future<Output = Result<Bytes, HandlerError>>,
{
    type Output = Result<Bytes, HandlerError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // SAFETY: `inner` is structurally pinned: it is never moved out of
        // `self`, only polled through a pinned reference and dropped in
        // place by assigning `None` (dropping pinned data is allowed).
        // `CatchUnwind` implements neither `Unpin` by hand nor `Drop`.
        let this = unsafe { self.get_unchecked_mut() };
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(Err(HandlerError::Remote(
                "handler polled after completion".to_string(),
            )));
        };
        // SAFETY: see above; `inner` stays where it is until dropped.
        let inner = unsafe { Pin::new_unchecked(inner) };
        match catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Ready(v)) => {
                this.inner = None;
                Poll::Ready(v)
            }
            Ok(Poll::Pending) => Poll::Pending,
            Err(payload) => {
                // Dropping a future that panicked may panic again; contain it.
                let _ = catch_unwind(AssertUnwindSafe(|| this.inner = None));
                Poll::Ready(Err(panicked(&*payload)))
            }
        }
    }
}
