//! What may be sent again when an upstream fails: which requests are
//! idempotent, which failures left a request unanswered, and a body kept so
//! that it can be sent again.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Request;
use hyper::body::{Frame, SizeHint};

use crate::wire::body::{Body, BoxError};

/// A copy of `parts` for one attempt: a request to an app may be sent again.
pub(super) fn copy(parts: &http::request::Parts) -> http::request::Parts {
    let mut req = Request::new(());
    *req.method_mut() = parts.method.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    req.into_parts().0
}

/// RFC 9110 section 9.2.2: a request that may be sent twice.
pub(super) fn idempotent(method: &http::Method) -> bool {
    use http::Method;
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::TRACE,
        Method::PUT,
        Method::DELETE,
    ]
    .contains(method)
}

/// The connection closed (or was reset) before any response: an instance
/// that just died, with this request written to a connection it had open.
pub(super) fn closed_unanswered(e: &hyper::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if let Some(h) = c.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() || h.is_canceled() {
                return true;
            }
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ) {
                return true;
            }
        }
        cur = c.source();
    }
    false
}

/// A request body that can be sent again while none of it has been read:
/// a connection refused by a dying instance leaves it untouched, for the
/// next instance.
pub(super) struct Reclaimable {
    body: std::sync::Mutex<Body>,
    touched: AtomicBool,
}

impl Reclaimable {
    pub(super) fn new(body: Body) -> Reclaimable {
        Reclaimable {
            body: std::sync::Mutex::new(body),
            touched: AtomicBool::new(false),
        }
    }

    pub(super) fn touched(&self) -> bool {
        self.touched.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Body> {
        self.body.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The body of one attempt.
    pub(super) fn attempt(self: &Arc<Self>) -> Attempt {
        Attempt(self.clone())
    }
}

pub(super) struct Attempt(Arc<Reclaimable>);

impl hyper::body::Body for Attempt {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.0.touched.store(true, Ordering::Relaxed);
        let mut body = self.0.lock();
        Pin::new(&mut *body).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.0.lock().is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.0.lock().size_hint()
    }
}
