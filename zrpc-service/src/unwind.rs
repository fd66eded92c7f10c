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
/// future is dropped after a panic and never polled again.
pub(crate) struct CatchUnwind<F> {
    inner: Option<Pin<Box<F>>>,
}

impl<F> CatchUnwind<F> {
    pub(crate) fn new(fut: F) -> Self {
        CatchUnwind {
            inner: Some(Box::pin(fut)),
        }
    }
}

impl<F> Future for CatchUnwind<F>
where
    F: Future<Output = Result<Bytes, HandlerError>>,
{
    type Output = Result<Bytes, HandlerError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(Err(HandlerError::Remote(
                "handler polled after completion".to_string(),
            )));
        };
        match catch_unwind(AssertUnwindSafe(|| inner.as_mut().poll(cx))) {
            Ok(Poll::Ready(v)) => {
                self.inner = None;
                Poll::Ready(v)
            }
            Ok(Poll::Pending) => Poll::Pending,
            Err(payload) => {
                // Dropping a future that panicked may panic again; contain it.
                let inner = self.inner.take();
                let _ = catch_unwind(AssertUnwindSafe(move || drop(inner)));
                Poll::Ready(Err(panicked(&*payload)))
            }
        }
    }
}
