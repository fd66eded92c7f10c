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

pin_project_lite::pin_project! {
    /// Wraps a handler future: a panic during any poll resolves the future
    /// to a `Remote` error instead of unwinding into the service loop. The
    /// inner future is dropped (in place) after it completes or panics and
    /// is never polled again.
    ///
    /// The inner future is stored inline, so wrapping allocates nothing.
    pub(crate) struct CatchUnwind<F> {
        #[pin]
        inner: Option<F>,
    }

    impl<F> PinnedDrop for CatchUnwind<F> {
        fn drop(this: Pin<&mut Self>) {
            drop_inner(this.project().inner);
        }
    }
}

impl<F> CatchUnwind<F> {
    pub(crate) fn new(fut: F) -> Self {
        CatchUnwind { inner: Some(fut) }
    }
}

/// Drops the inner future in place (it may panic while being dropped:
/// after finishing, after panicking, or abandoned by a cancelled call; the
/// panic is contained).
fn drop_inner<F>(mut inner: Pin<&mut Option<F>>) {
    if inner.is_some() {
        let _ = catch_unwind(AssertUnwindSafe(|| inner.set(None)));
    }
}

impl<F> Future for CatchUnwind<F>
where
    F: Future<Output = Result<Bytes, HandlerError>>,
{
    type Output = Result<Bytes, HandlerError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut inner = self.project().inner;
        let Some(fut) = inner.as_mut().as_pin_mut() else {
            return Poll::Ready(Err(HandlerError::Remote(
                "handler polled after completion".to_string(),
            )));
        };
        match catch_unwind(AssertUnwindSafe(|| fut.poll(cx))) {
            Ok(Poll::Ready(v)) => {
                drop_inner(inner);
                Poll::Ready(v)
            }
            Ok(Poll::Pending) => Poll::Pending,
            Err(payload) => {
                drop_inner(inner);
                Poll::Ready(Err(panicked(&*payload)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;

    /// Resolves at its first or second poll, and panics when dropped.
    struct PanicOnDrop {
        pending_first: bool,
    }

    impl Future for PanicOnDrop {
        type Output = Result<Bytes, HandlerError>;
        fn poll(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Self::Output> {
            if std::mem::take(&mut self.pending_first) {
                Poll::Pending
            } else {
                Poll::Ready(Ok(Bytes::from_static(b"ok")))
            }
        }
    }

    impl Drop for PanicOnDrop {
        fn drop(&mut self) {
            panic!("dropping the handler future");
        }
    }

    #[test]
    fn panics_while_dropping_a_handler_future_are_contained() {
        let mut cx = Context::from_waker(Waker::noop());
        // Finished: the result comes through, the drop's panic does not.
        let mut f = Box::pin(CatchUnwind::new(PanicOnDrop {
            pending_first: false,
        }));
        match f.as_mut().poll(&mut cx) {
            Poll::Ready(Ok(b)) => assert_eq!(&b[..], b"ok"),
            other => panic!("unexpected {other:?}"),
        }
        drop(f);
        // Abandoned before it finished (a cancelled call).
        let mut f = Box::pin(CatchUnwind::new(PanicOnDrop {
            pending_first: true,
        }));
        assert!(f.as_mut().poll(&mut cx).is_pending());
        drop(f);
    }
}
