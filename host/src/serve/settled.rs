//! A response body whose end waits for its instance to be settled.
//!
//! The component finishes a response's body a moment before its call returns and the instance
//! goes back to the idle list. A client that sends its next request as soon as the last byte
//! arrives would otherwise race that moment and often get a fresh instance (a start and a
//! tokenizer parse) where a warm one was about to be free. Responses are chunked, so the client
//! sees the end only when the body ends: holding that end until the request's task has settled
//! its instance (kept or dropped) makes sequential requests reuse it every time.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::oneshot;

/// `inner`, with its end held until `settled` fires (or its sender is dropped: an aborted task).
pub struct EndsWhenSettled<B> {
    inner: B,
    settled: oneshot::Receiver<()>,
}

impl<B> EndsWhenSettled<B> {
    pub fn new(inner: B, settled: oneshot::Receiver<()>) -> Self {
        EndsWhenSettled { inner, settled }
    }
}

impl<B> Body for EndsWhenSettled<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(None) => Pin::new(&mut this.settled).poll(cx).map(|_| None),
            other => other,
        }
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    fn body(text: &'static str) -> Full<Bytes> {
        Full::new(Bytes::from(text))
    }

    #[tokio::test]
    async fn the_end_waits_for_the_signal_and_the_data_does_not() {
        let (tx, rx) = oneshot::channel();
        let mut wrapped = EndsWhenSettled::new(body("hello"), rx);
        let frame = wrapped.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "hello");
        let end = tokio::time::timeout(std::time::Duration::from_millis(50), wrapped.frame()).await;
        assert!(end.is_err(), "the end came before the instance was settled");
        tx.send(()).unwrap();
        assert!(wrapped.frame().await.is_none());
    }

    #[tokio::test]
    async fn a_dropped_task_ends_the_body_too() {
        let (tx, rx) = oneshot::channel::<()>();
        let mut wrapped = EndsWhenSettled::new(body("x"), rx);
        drop(tx);
        assert!(wrapped.frame().await.unwrap().is_ok());
        assert!(wrapped.frame().await.is_none());
    }
}
