//! One HTTP/3 request: its head checked (RFC 9114 section 4.2 and 4.3), the
//! listener's handler, the response sent, and its body as it arrives
//! (`H3Body`).

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{header, HeaderValue, Request, Response};
use http_body::Frame;
use http_body_util::BodyExt;
use tracing::debug;

use crate::observe::access_log::{Entry, TlsInfo};
use crate::observe::logging::Chain;
use crate::process::context::Peer;
use crate::wire::body::{text, BoxError, IncomingBody, Reply, RequestBody};

use super::{fields, Spec};

type Stream = h3::server::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>;

pub(super) async fn request(
    mut resolver: h3::server::RequestResolver<h3_quinn::Connection, Bytes>,
    spec: &Arc<Spec>,
    peer: Peer,
    tls: Option<&TlsInfo>,
) {
    // The head as sent, for the checks h3 does not make (`fields`).
    let frame = std::future::poll_fn(|cx| resolver.frame_stream.poll_next(cx)).await;
    let order = match &frame {
        Ok(Some(h3::proto::frame::Frame::Headers(section))) => fields::check(section),
        _ => Ok(()),
    };
    let resolved = match resolver.accept_with_frame(frame) {
        Ok(r) => r.resolve().await,
        Err(e) => Err(e),
    };
    let (req, mut stream): (Request<()>, Stream) = match resolved {
        Ok(r) => r,
        Err(e) => {
            debug!(listener = %spec.ctx.name, "HTTP/3 request: {e}", e = Chain(&e));
            return;
        }
    };
    if let Err(why) = order.and_then(|()| malformed(&req)) {
        // A stream error (RFC 9114 section 4.1.2); the connection serves on.
        debug!(listener = %spec.ctx.name, "HTTP/3 malformed request: {why}");
        spec.stats.malformed_total.fetch_add(1, Ordering::Relaxed);
        stream.stop_sending(h3::error::Code::H3_MESSAGE_ERROR);
        stream.stop_stream(h3::error::Code::H3_MESSAGE_ERROR);
        return;
    }
    let declared = content_length(&req);
    // Set if the body breaks its declared length (see `H3Body`).
    let broke = declared.map(|_| Arc::new(std::sync::atomic::AtomicBool::new(false)));
    debug!(listener = %spec.ctx.name, method = %req.method(), path = req.uri().path(), "request started");
    let mut entry = (spec.access_log.is_some() || spec.metrics.is_some())
        .then(|| Entry::of(&req, http::Version::HTTP_3));
    let (mut send, recv) = stream.split();
    let mut req = req.map(|()| H3Body {
        stream: recv,
        done: false,
        reading: false,
        declared,
        received: 0,
        broke: broke.clone(),
        stop: h3::error::Code::H3_NO_ERROR,
    });
    let head = req.method() == http::Method::HEAD;
    let (res, route) = if let Err(why) = crate::http::host::check_host(&mut req) {
        debug!(listener = %spec.ctx.name, "bad request: {why}");
        drop(req);
        (text(http::StatusCode::BAD_REQUEST, "bad request\n"), None)
    } else {
        match spec.handler.call(req, &spec.ctx, peer) {
            (Reply::Now(res), route) => (res, route),
            (Reply::Later(fut), route) => (fut.await, route),
        }
    };
    if broke.is_some_and(|b| b.load(Ordering::Relaxed)) {
        // Whatever the route made of it, the request was malformed: the
        // stream ends with H3_MESSAGE_ERROR (RFC 9114 section 4.1.2).
        debug!(listener = %spec.ctx.name, "HTTP/3 request body does not match its content-length");
        spec.stats.malformed_total.fetch_add(1, Ordering::Relaxed);
        send.stop_stream(h3::error::Code::H3_MESSAGE_ERROR);
        return;
    }
    let res = if head {
        crate::wire::body::head_only(res)
    } else {
        res
    };
    let status = res.status().as_u16();
    let mut sent = 0;
    if let Err(e) = respond(&mut send, res, spec.shared.timeouts.send, &mut sent).await {
        debug!(listener = %spec.ctx.name, "HTTP/3 response: {e}", e = Chain(&e));
        send.stop_stream(h3::error::Code::H3_REQUEST_CANCELLED);
    }
    if let Some(e) = &mut entry {
        e.status = status;
        e.bytes = sent;
        if let Some(log) = &spec.access_log {
            // The buffer of the first serving thread: this thread has none.
            log.record(0, &spec.ctx.name, peer.addr, tls, e);
        }
        if let Some(m) = &spec.metrics {
            m.record(route, e.status, e.bytes, e.started.elapsed().as_secs_f64());
        }
    }
}

/// Headers that mean nothing in HTTP/3 (RFC 9114 section 4.2): a request
/// with one is malformed, and a response never carries one.
const CONNECTION_SPECIFIC: [header::HeaderName; 5] = [
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::HeaderName::from_static("keep-alive"),
    header::HeaderName::from_static("proxy-connection"),
];

/// Sends `res`; each piece must leave within `send` (a client that stops
/// reading cannot hold the stream forever).
/// Why a response was not sent whole.
#[derive(Debug, thiserror::Error)]
enum RespondError {
    /// The client took nothing of `what` for `within`.
    #[error("{what}: no progress for {within:?}")]
    Stalled {
        what: &'static str,
        within: Duration,
    },
    #[error(transparent)]
    Stream(#[from] h3::error::StreamError),
    /// The response body failed (an upstream that went away).
    #[error("{0}")]
    Body(BoxError),
}

async fn respond(
    send: &mut h3::server::RequestStream<h3_quinn::SendStream<Bytes>, Bytes>,
    res: Response<crate::wire::body::Body>,
    within: Duration,
    sent: &mut u64,
) -> Result<(), RespondError> {
    let (mut parts, mut body) = res.into_parts();
    for h in &CONNECTION_SPECIFIC {
        parts.headers.remove(h);
    }
    let timed = |what: &'static str| move |_| RespondError::Stalled { what, within };
    tokio::time::timeout(within, send.send_response(Response::from_parts(parts, ())))
        .await
        .map_err(timed("head"))??;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(RespondError::Body)?;
        match frame.into_data() {
            Ok(data) => {
                if !data.is_empty() {
                    *sent += data.len() as u64;
                    tokio::time::timeout(within, send.send_data(data))
                        .await
                        .map_err(timed("body"))??;
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    tokio::time::timeout(within, send.send_trailers(trailers))
                        .await
                        .map_err(timed("trailers"))??;
                    return Ok(());
                }
            }
        }
    }
    Ok(tokio::time::timeout(within, send.finish())
        .await
        .map_err(timed("end"))??)
}

/// Why `req` is malformed (RFC 9114 section 4.2, and RFC 9110 section 8.6
/// for `content-length`), in what h3 does not check: connection-specific
/// fields, `te` other than `trailers`, a length that is not one number.
fn malformed(req: &Request<()>) -> Result<(), &'static str> {
    let h = req.headers();
    if CONNECTION_SPECIFIC.iter().any(|name| h.contains_key(name)) {
        return Err("a connection-specific field");
    }
    if h.get_all(header::TE)
        .iter()
        .any(|v| !v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        return Err("te other than trailers");
    }
    let mut lengths = h.get_all(header::CONTENT_LENGTH).iter();
    if let Some(first) = lengths.next() {
        let valid = |v: &HeaderValue| !v.is_empty() && v.as_bytes().iter().all(u8::is_ascii_digit);
        if !valid(first) || first.len() > 19 || lengths.any(|v| v != first) {
            return Err("content-length is not one number");
        }
    }
    Ok(())
}

/// The request's `content-length` (checked by [`malformed`]).
fn content_length(req: &Request<()>) -> Option<u64> {
    req.headers()
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// An HTTP/3 request's body, for the routes. Its DATA must add up to the
/// request's `content-length` (RFC 9114 section 4.1.2): more, or fewer at
/// the end, is the client's error, and the stream's.
pub(crate) struct H3Body {
    stream: h3::server::RequestStream<h3_quinn::RecvStream, Bytes>,
    done: bool,
    /// A read is under way: h3-quinn holds the QUIC stream inside it, and
    /// cannot stop it meanwhile.
    reading: bool,
    declared: Option<u64>,
    received: u64,
    /// Set when the body breaks `declared`, for the request to see.
    broke: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// What STOP_SENDING says if the body is let go unread.
    stop: h3::error::Code,
}

impl H3Body {
    /// The client sent a body that does not match its `content-length`.
    fn mismatch(&mut self, why: &'static str) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(b) = &self.broke {
            b.store(true, Ordering::Relaxed);
        }
        self.stop = h3::error::Code::H3_MESSAGE_ERROR;
        self.stop_reading();
        self.done = true;
        Poll::Ready(Some(Err(why.into())))
    }

    fn stop_reading(&mut self) {
        if !self.done && !self.reading {
            self.stream.stop_sending(self.stop);
            self.done = true;
        }
    }
}

impl http_body::Body for H3Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let polled = self.stream.poll_recv_data(cx);
        self.reading = polled.is_pending();
        match polled {
            Poll::Ready(Ok(Some(mut data))) => {
                let n = data.remaining();
                self.received += n as u64;
                if self.declared.is_some_and(|d| self.received > d) {
                    return self.mismatch("request body longer than its content-length");
                }
                Poll::Ready(Some(Ok(Frame::data(data.copy_to_bytes(n)))))
            }
            Poll::Ready(Ok(None)) => {
                self.done = true;
                if self.declared.is_some_and(|d| self.received != d) {
                    return self.mismatch("request body shorter than its content-length");
                }
                Poll::Ready(None)
            }
            Poll::Ready(Err(e)) => {
                self.done = true;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// A body let go unread tells the client to stop sending, with H3_NO_ERROR
/// (RFC 9114 section 4.1.1: the answer does not need the rest), or
/// H3_MESSAGE_ERROR for a body that broke its length; quinn would say 0.
impl Drop for H3Body {
    fn drop(&mut self) {
        self.stop_reading();
    }
}

impl From<H3Body> for IncomingBody {
    fn from(b: H3Body) -> IncomingBody {
        IncomingBody::boxed(b)
    }
}

impl RequestBody for H3Body {
    /// HTTP/3 needs no read-and-drop: STOP_SENDING (on drop) tells the
    /// client the answer does not need the rest. (Also when the request
    /// had no body: h3 cannot tell before a read.)
    fn discard(self, _: http::Version) -> Option<crate::wire::body::Unread> {
        None
    }
}
