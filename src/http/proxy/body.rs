//! The bodies a proxied request passes through on its way upstream: the
//! client's, watched for its failures, and one with a deadline per piece.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Frame, SizeHint};

use crate::apps::InFlight;
use crate::process::upstreams::UpstreamState;
use crate::wire::body::{BoxError, RequestBody};
use crate::wire::upstream::Pooled;

/// A request in flight on an upstream, until dropped.
pub(super) struct Busy(Arc<UpstreamState>);

impl Busy {
    pub(super) fn new(state: Arc<UpstreamState>) -> Busy {
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        Busy(state)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The client's request body on its way upstream, noting whether the
/// client broke it.
pub(super) struct ClientBody<B> {
    pub(super) inner: B,
    pub(super) failed: Arc<AtomicBool>,
}

impl<B: RequestBody> hyper::body::Body for ClientBody<B> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Err(e))) => {
                self.failed.store(true, Ordering::Relaxed);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(Some(Ok(f))) => Poll::Ready(Some(Ok(f))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that ends in an error at `deadline` (the route's
/// `timeout` covers the whole response), streamed frame by frame.
pub(super) struct Deadline {
    inner: Pooled,
    sleep: Pin<Box<tokio::time::Sleep>>,
    /// The request's count on its app instance and its upstream, until the
    /// body ends.
    _in_flight: (Option<InFlight>, Busy),
}

impl Deadline {
    /// `sleep`: the route's `timeout`, started when the request was sent.
    pub(super) fn new(
        inner: Pooled,
        sleep: Pin<Box<tokio::time::Sleep>>,
        in_flight: (Option<InFlight>, Busy),
    ) -> Self {
        Deadline {
            inner,
            sleep,
            _in_flight: in_flight,
        }
    }
}

impl hyper::body::Body for Deadline {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        match self.sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err("upstream response timed out".into()))),
            Poll::Pending => Poll::Pending,
        }
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
