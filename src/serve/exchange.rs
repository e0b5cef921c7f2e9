//! One request and its response on a connection: counted while in flight,
//! tracked for the connection's timeouts, logged and measured once its body
//! is done; during a drain, an HTTP/1.x response closes its connection.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, Version};
use hyper::body::{Frame, Incoming, SizeHint};
use tracing::debug;

use crate::http::host::check_host;
use crate::observe::access_log::{AccessLog, Entry, TlsInfo};
use crate::process::context::{Peer, ThreadStats};
use crate::wire::body::{Body, Reply};

use super::activity::Activity;
use super::connection::ListenerSpec;

/// The per-connection hyper service: counts the request, tracks it for the
/// timeouts, and during a drain adds `Connection: close` to HTTP/1.x responses.
#[derive(Clone)]
pub(super) struct ConnService {
    pub(super) peer: Peer,
    /// The connection's TLS facts, when its listener has an access log.
    pub(super) tls: Option<Arc<TlsInfo>>,
    pub(super) spec: Arc<ListenerSpec>,
    pub(super) stats: Arc<ThreadStats>,
    pub(super) activity: Arc<Activity>,
}

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response<TrackedBody>;
    type Error = std::convert::Infallible;
    type Future = ResponseFuture;

    fn call(&self, mut req: Request<Incoming>) -> ResponseFuture {
        let version = req.version();
        self.stats.requests_total.fetch_add(1, Ordering::Relaxed);
        debug!(listener = %self.spec.ctx.name, method = %req.method(), path = req.uri().path(), "request started");
        if self.activity.forwarding.load(Ordering::Relaxed) && req.method() != http::Method::CONNECT
        {
            return self.forward(req, version);
        }
        let logged = (self.spec.access_log.is_some() || self.spec.metrics.is_some()).then(|| {
            Box::new(Logged {
                log: self.spec.access_log.clone(),
                spec: self.spec.clone(),
                remote: self.peer.addr,
                tls: self.tls.clone(),
                entry: Entry::of(&req, version),
                route: None,
            })
        });
        let finish = Finish {
            guard: InFlight::new(self.activity.clone(), self.stats.clone(), logged),
            version,
            head: req.method() == http::Method::HEAD,
        };
        if version < Version::HTTP_2 {
            let done = asks_to_close(&req) && hyper::body::Body::is_end_stream(req.body());
            self.activity.client_done.store(done, Ordering::Relaxed);
            let a = &self.activity;
            if a.requests.fetch_add(1, Ordering::Relaxed) + 1
                == a.refused_at.load(Ordering::Relaxed)
            {
                // The head `heads` refused (an HTTP version other than 1.x,
                // a transfer coding other than chunked): nothing after it
                // was read, so the connection closes.
                let status =
                    http::StatusCode::from_u16(a.refused_status.load(Ordering::Relaxed) as u16)
                        .unwrap_or(http::StatusCode::BAD_REQUEST);
                debug!(listener = %self.spec.ctx.name, %status, "request refused");
                let msg = if status == http::StatusCode::NOT_IMPLEMENTED {
                    "transfer coding not implemented\n"
                } else {
                    "HTTP version not supported\n"
                };
                let mut res = crate::wire::body::text(status, msg);
                res.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                return ResponseFuture::Now(std::future::ready(Ok(finish.wrap(res, &self.spec))));
            }
        }
        if let Err(why) = check_host(&mut req) {
            debug!(listener = %self.spec.ctx.name, "bad request: {why}");
            let mut res = crate::wire::body::text(http::StatusCode::BAD_REQUEST, "bad request\n");
            if version < Version::HTTP_2 {
                res.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            return ResponseFuture::Now(std::future::ready(Ok(finish.wrap(res, &self.spec))));
        }
        let mut finish = finish;
        let (reply, route) = self.spec.handler.call(req, &self.spec.ctx, self.peer);
        if let Some(l) = &mut finish.guard.logged {
            l.route = route;
        }
        match reply {
            Reply::Now(res) => {
                ResponseFuture::Now(std::future::ready(Ok(finish.wrap(res, &self.spec))))
            }
            Reply::Later(fut) => ResponseFuture::Later(fut, Some((finish, self.spec.clone()))),
        }
    }
}

impl ConnService {
    /// A request on a busy HTTP/2 connection of a draining generation: the
    /// newest generation serves it (and logs it); if it cannot be handed
    /// on, this one does.
    fn forward(&self, req: Request<Incoming>, version: Version) -> ResponseFuture {
        let finish = Finish {
            guard: InFlight::new(self.activity.clone(), self.stats.clone(), None),
            version,
            head: req.method() == http::Method::HEAD,
        };
        if let Some(socket) = &self.spec.ctx.process.forward {
            self.activity.forward.get_or_init(|| {
                Box::new(super::forward::Forwarder::new(
                    socket.clone(),
                    &self.spec.ctx.name,
                    self.peer,
                    self.tls.as_deref(),
                ))
            });
        }
        let (activity, spec, peer) = (self.activity.clone(), self.spec.clone(), self.peer);
        let fut = async move {
            let mut req = match activity.forward.get() {
                Some(forwarder) => match forwarder.send(req).await {
                    Ok(res) => return res,
                    Err(super::forward::NotSent(req)) => req,
                },
                None => req,
            };
            if check_host(&mut req).is_err() {
                return crate::wire::body::text(http::StatusCode::BAD_REQUEST, "bad request\n");
            }
            match spec.handler.call(req, &spec.ctx, peer).0 {
                Reply::Now(res) => res,
                Reply::Later(fut) => fut.await,
            }
        };
        ResponseFuture::Later(Box::pin(fut), Some((finish, self.spec.clone())))
    }
}

/// Does this HTTP/1.x request close its connection itself (`Connection:
/// close`, or HTTP/1.0 without `keep-alive`)? One look at the field, for
/// both tokens: every HTTP/1.x request asks this.
pub(super) fn asks_to_close<B>(req: &Request<B>) -> bool {
    let (mut close, mut keep_alive) = (false, false);
    for token in crate::wire::body::tokens(req.headers(), header::CONNECTION) {
        close |= token.eq_ignore_ascii_case("close");
        keep_alive |= token.eq_ignore_ascii_case("keep-alive");
    }
    close || (req.version() == Version::HTTP_10 && !keep_alive)
}

/// A response on its way: ready at once (no allocation), or awaited.
pub(super) enum ResponseFuture {
    Now(std::future::Ready<Result<Response<TrackedBody>, std::convert::Infallible>>),
    Later(
        Pin<Box<dyn std::future::Future<Output = Response<Body>> + Send>>,
        Option<(Finish, Arc<ListenerSpec>)>,
    ),
}

impl std::future::Future for ResponseFuture {
    type Output = Result<Response<TrackedBody>, std::convert::Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            ResponseFuture::Now(res) => Pin::new(res).poll(cx),
            ResponseFuture::Later(fut, finish) => {
                let res = std::task::ready!(fut.as_mut().poll(cx));
                match finish.take() {
                    Some((finish, spec)) => Poll::Ready(Ok(finish.wrap(res, &spec))),
                    // Polled again after it completed: it never completes again.
                    None => Poll::Pending,
                }
            }
        }
    }
}

/// What a response needs once the handler has made it.
pub(super) struct Finish {
    pub(super) guard: InFlight,
    /// The request's HTTP version.
    pub(super) version: Version,
    /// A HEAD request: over HTTP/2 its answer goes without its body.
    pub(super) head: bool,
}

impl Finish {
    /// During a drain, an HTTP/1.x response closes its connection.
    pub(super) fn wrap(
        mut self,
        mut res: Response<Body>,
        spec: &ListenerSpec,
    ) -> Response<TrackedBody> {
        if let Some(l) = &mut self.guard.logged {
            l.entry.status = res.status().as_u16();
        }
        if res.status() == http::StatusCode::SWITCHING_PROTOCOLS {
            self.guard.activity.upgraded.store(true, Ordering::Relaxed);
        }
        if let Some(v) = &spec.alt_svc {
            res.headers_mut().insert(header::ALT_SVC, v.clone());
        }
        if self.head && self.version >= Version::HTTP_2 {
            res = crate::wire::body::head_only(res);
        }
        if self.version < Version::HTTP_2 && spec.ctx.process.drain.is_draining() {
            res.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            if self.version == Version::HTTP_10 {
                // hyper reads the keep-alive of an HTTP/1.0 exchange from the
                // response's version: with 1.1 it appends `keep-alive` to our
                // `close` (`Connection: close, keep-alive`), and clients such
                // as ab keep the connection and lose their next request.
                *res.version_mut() = Version::HTTP_10;
            }
        }
        self.guard.activity.park();
        res.map(|body| TrackedBody {
            inner: body,
            parked: true,
            guard: self.guard,
        })
    }
}

/// A request counted as in flight until its response body is done, and
/// then logged, if its listener has an access log.
pub(super) struct InFlight {
    pub(super) activity: Arc<Activity>,
    pub(super) stats: Arc<ThreadStats>,
    pub(super) logged: Option<Box<Logged>>,
}

/// A request on its way to the access log and the metrics.
pub(super) struct Logged {
    pub(super) log: Option<Arc<AccessLog>>,
    /// The route that took it (for the metrics).
    pub(super) route: Option<usize>,
    pub(super) spec: Arc<ListenerSpec>,
    pub(super) remote: SocketAddr,
    pub(super) tls: Option<Arc<TlsInfo>>,
    pub(super) entry: Entry,
}

impl InFlight {
    pub(super) fn new(
        activity: Arc<Activity>,
        stats: Arc<ThreadStats>,
        logged: Option<Box<Logged>>,
    ) -> Self {
        activity.request_started();
        stats.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            activity,
            stats,
            logged,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.activity.request_finished();
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        if let Some(l) = self.logged.take() {
            if let Some(log) = &l.log {
                log.record(
                    self.stats.index,
                    &l.spec.ctx.name,
                    l.remote,
                    l.tls.as_deref(),
                    &l.entry,
                );
            }
            if let Some(m) = &l.spec.metrics {
                let e = &l.entry;
                m.record(
                    l.route,
                    e.status,
                    e.bytes,
                    e.started.elapsed().as_secs_f64(),
                );
            }
        }
    }
}

/// A response body, counted as in flight until it is done, and parked
/// (see `Activity::parked`) while it waits on the client.
pub(crate) struct TrackedBody {
    inner: Body,
    parked: bool,
    guard: InFlight,
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        if self.parked {
            self.guard.activity.parked.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl hyper::body::Body for TrackedBody {
    type Data = Bytes;
    type Error = crate::wire::body::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if this.parked {
            this.parked = false;
            this.guard.activity.unpark();
        }
        let res = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &res {
            this.parked = true;
            this.guard.activity.park();
            if let (Some(l), Some(data)) = (&mut this.guard.logged, frame.data_ref()) {
                l.entry.bytes += data.len() as u64;
            }
        }
        res
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_that_close_themselves() {
        let req = |v: Version, conn: Option<&str>| {
            let mut b = Request::builder().version(v);
            if let Some(c) = conn {
                b = b.header("connection", c);
            }
            b.body(()).unwrap()
        };
        assert!(asks_to_close(&req(Version::HTTP_11, Some("close"))));
        assert!(asks_to_close(&req(Version::HTTP_11, Some("foo, Close"))));
        assert!(!asks_to_close(&req(Version::HTTP_11, None)));
        assert!(!asks_to_close(&req(Version::HTTP_11, Some("keep-alive"))));
        assert!(asks_to_close(&req(Version::HTTP_10, None)));
        assert!(!asks_to_close(&req(Version::HTTP_10, Some("keep-alive"))));
    }
}
