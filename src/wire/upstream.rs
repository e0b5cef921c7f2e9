//! Connections to what the proxy sends to: an upstream of the config, or an
//! app instance. Each [`Pool`] keeps, per serving thread, the idle HTTP/1.1
//! connections to one endpoint (or its one HTTP/2 connection), on hyper's
//! `client::conn`.
//!
//! A pool of our own rather than hyper-util's: the address connected to is
//! the endpoint's, whatever `Host` the request carries (`host: keep` over
//! HTTP/2 and TLS); a request that was never written is handed back
//! (`try_send_request`), so the proxy knows it may go to another upstream
//! whatever its method; and checking a connection out is a pop from a list
//! only this thread uses, with no task spawned per request.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, Uri};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::wire::body::Body;

/// Idle connections kept per thread and endpoint.
const MAX_IDLE: usize = 256;
/// An idle connection older than this is closed rather than used: upstreams
/// close theirs after a while (nginx after 60 s), and a request written as
/// one closes is lost for all but idempotent methods.
const IDLE_TIMEOUT: Duration = Duration::from_secs(50);

/// Where a pool connects, and how.
pub(crate) struct Endpoint {
    /// `host:port`, as connected to.
    pub(crate) addr: String,
    /// TLS: the client config and the name the server must prove.
    pub(crate) tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    /// HTTP/2 (over TLS by ALPN, or in the clear with prior knowledge).
    pub(crate) h2: bool,
    pub(crate) connect_timeout: Duration,
}

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    #[error("connecting to {addr} timed out after {timeout:?}")]
    TimedOut { addr: String, timeout: Duration },
    #[error("cannot connect to {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS handshake with {addr}")]
    Tls {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr} did not agree to HTTP/2 (ALPN)")]
    NoH2 { addr: String },
    #[error("HTTP handshake with {addr}")]
    Handshake {
        addr: String,
        #[source]
        source: hyper::Error,
    },
}

/// Why a request got no response.
#[derive(thiserror::Error)]
pub(crate) enum SendError {
    /// Nothing of the request was written; it is handed back.
    #[error("{error}")]
    NotSent {
        request: Box<Request<Body>>,
        #[source]
        error: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Written (maybe in part), and then the connection failed.
    #[error("the upstream connection failed")]
    Failed(#[source] hyper::Error),
}

impl std::fmt::Debug for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::NotSent { error, .. } => write!(f, "NotSent({error:?})"),
            SendError::Failed(e) => write!(f, "Failed({e:?})"),
        }
    }
}

impl From<hyper::client::conn::TrySendError<Request<Body>>> for SendError {
    /// The request back if none of it was written, else the failure.
    fn from(mut e: hyper::client::conn::TrySendError<Request<Body>>) -> SendError {
        match e.take_message() {
            Some(back) => SendError::NotSent {
                request: Box::new(back),
                error: Box::new(e.into_error()),
            },
            None => SendError::Failed(e.into_error()),
        }
    }
}

/// An endpoint's connections, one set per serving thread.
pub(crate) struct Pool {
    shared: Arc<Shared>,
}

struct Shared {
    endpoint: Endpoint,
    slots: Box<[Mutex<Slot>]>,
    /// Set when the pool is dropped: connections in use are not kept.
    closed: AtomicBool,
}

#[derive(Default)]
struct Slot {
    /// Most recently used last.
    idle: Vec<(http1::SendRequest<Body>, Instant)>,
    h2: Option<http2::SendRequest<Body>>,
}

/// Most serving threads with a pool of their own; more share by index.
const SLOTS: usize = 64;

impl Pool {
    pub(crate) fn new(endpoint: Endpoint) -> Pool {
        Pool {
            shared: Arc::new(Shared {
                endpoint,
                slots: (0..SLOTS).map(|_| Mutex::default()).collect(),
                closed: AtomicBool::new(false),
            }),
        }
    }

    /// Sends `req` (its URI in origin form, `/path?query`) on a pooled
    /// connection, or a new one. Over HTTP/2, `Host` becomes `:authority`; over
    /// HTTP/1.1, a request without one is given the endpoint's.
    pub(crate) async fn send(&self, req: Request<Body>) -> Result<Response<Pooled>, SendError> {
        self.send_in(req, serving_thread() % SLOTS).await
    }

    /// [`Pool::send`] from a thread that does not serve (health checks),
    /// on connections of its own.
    pub(crate) async fn send_aside(
        &self,
        req: Request<Body>,
    ) -> Result<Response<Pooled>, SendError> {
        self.send_in(req, SLOTS - 1).await
    }

    async fn send_in(
        &self,
        mut req: Request<Body>,
        slot: usize,
    ) -> Result<Response<Pooled>, SendError> {
        if self.shared.endpoint.h2 {
            return self.send_h2(req, slot).await;
        }
        // HTTP/1.1 requires a Host (an HTTP/1.0 client may have sent none).
        if !req.headers().contains_key(http::header::HOST) {
            if let Ok(v) = http::HeaderValue::from_str(&self.shared.endpoint.addr) {
                req.headers_mut().insert(http::header::HOST, v);
            }
        }
        // Idle connections first, the most recently used (so the least
        // likely closed by the upstream) first.
        loop {
            let idle = lock(&self.shared.slots[slot]).idle.pop();
            let Some((mut sender, since)) = idle else {
                break;
            };
            if sender.is_closed() || since.elapsed() > IDLE_TIMEOUT {
                continue;
            }
            // Ready once its connection has read the last response's end.
            if !sender.is_ready()
                && tokio::time::timeout(self.shared.endpoint.connect_timeout, sender.ready())
                    .await
                    .map_or(true, |r| r.is_err())
            {
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(res) => return Ok(self.pooled(res, Some(sender), slot)),
                Err(e) => match SendError::from(e) {
                    // The connection closed before anything was written.
                    SendError::NotSent { request, .. } => req = *request,
                    failed => return Err(failed),
                },
            }
        }
        let mut sender = match self.connect().await {
            Ok(Sender::H1(s)) => s,
            Ok(Sender::H2(_)) => unreachable!("an HTTP/1.1 endpoint makes HTTP/1.1 connections"),
            Err(e) => {
                return Err(SendError::NotSent {
                    request: Box::new(req),
                    error: Box::new(e),
                })
            }
        };
        match sender.try_send_request(req).await {
            Ok(res) => Ok(self.pooled(res, Some(sender), slot)),
            Err(e) => Err(e.into()),
        }
    }

    async fn send_h2(
        &self,
        mut req: Request<Body>,
        slot: usize,
    ) -> Result<Response<Pooled>, SendError> {
        // HTTP/2 carries the target as :scheme and :authority.
        let host = req.headers_mut().remove(http::header::HOST);
        let scheme = if self.shared.endpoint.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let authority = host
            .as_ref()
            .and_then(|h| h.to_str().ok())
            .unwrap_or(&self.shared.endpoint.addr);
        let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
        if let Ok(uri) = Uri::builder()
            .scheme(scheme)
            .authority(authority)
            .path_and_query(pq)
            .build()
        {
            *req.uri_mut() = uri;
        }
        *req.version_mut() = http::Version::HTTP_2;
        let current = lock(&self.shared.slots[slot]).h2.clone();
        if let Some(mut sender) = current.filter(|s| !s.is_closed()) {
            match sender.try_send_request(req).await {
                Ok(res) => return Ok(self.pooled(res, None, slot)),
                Err(e) => match SendError::from(e) {
                    SendError::NotSent { request, .. } => req = *request,
                    failed => return Err(failed),
                },
            }
        }
        let mut sender = match self.connect().await {
            Ok(Sender::H2(s)) => s,
            Ok(Sender::H1(_)) => unreachable!("an HTTP/2 endpoint makes HTTP/2 connections"),
            Err(e) => {
                return Err(SendError::NotSent {
                    request: Box::new(req),
                    error: Box::new(e),
                })
            }
        };
        lock(&self.shared.slots[slot]).h2 = Some(sender.clone());
        match sender.try_send_request(req).await {
            Ok(res) => Ok(self.pooled(res, None, slot)),
            Err(e) => Err(e.into()),
        }
    }

    fn pooled(
        &self,
        res: Response<Incoming>,
        sender: Option<http1::SendRequest<Body>>,
        slot: usize,
    ) -> Response<Pooled> {
        // An upgraded connection is the tunnel's, never pooled again.
        let upgraded = res.status() == http::StatusCode::SWITCHING_PROTOCOLS;
        let lease = sender.filter(|_| !upgraded).map(|sender| Lease {
            sender,
            shared: self.shared.clone(),
            slot,
        });
        res.map(|inner| Pooled { inner, lease })
    }

    /// A new connection, its task spawned on this thread.
    async fn connect(&self) -> Result<Sender, ConnectError> {
        let e = &self.shared.endpoint;
        let addr = &e.addr;
        let tcp = match tokio::time::timeout(e.connect_timeout, TcpStream::connect(addr)).await {
            Err(_) => {
                return Err(ConnectError::TimedOut {
                    addr: addr.clone(),
                    timeout: e.connect_timeout,
                })
            }
            Ok(Err(source)) => {
                return Err(ConnectError::Connect {
                    addr: addr.clone(),
                    source,
                })
            }
            Ok(Ok(tcp)) => tcp,
        };
        let _ = tcp.set_nodelay(true);
        let Some((config, name)) = &e.tls else {
            return handshake(tcp, e.h2, addr).await;
        };
        let tls = tokio_rustls::TlsConnector::from(config.clone());
        let stream =
            match tokio::time::timeout(e.connect_timeout, tls.connect(name.clone(), tcp)).await {
                Err(_) => {
                    return Err(ConnectError::TimedOut {
                        addr: addr.clone(),
                        timeout: e.connect_timeout,
                    })
                }
                Ok(Err(source)) => {
                    return Err(ConnectError::Tls {
                        addr: addr.clone(),
                        source,
                    })
                }
                Ok(Ok(s)) => s,
            };
        if e.h2 && stream.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Err(ConnectError::NoH2 { addr: addr.clone() });
        }
        handshake(stream, e.h2, addr).await
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Relaxed);
        for slot in self.shared.slots.iter() {
            *lock(slot) = Slot::default();
        }
    }
}

enum Sender {
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>),
}

async fn handshake<T>(io: T, h2: bool, addr: &str) -> Result<Sender, ConnectError>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let failed = |source| ConnectError::Handshake {
        addr: addr.to_string(),
        source,
    };
    let io = TokioIo::new(io);
    if h2 {
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .handshake(io)
            .await
            .map_err(failed)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("upstream HTTP/2 connection ended: {e}");
            }
        });
        Ok(Sender::H2(sender))
    } else {
        let (sender, conn) = http1::Builder::new().handshake(io).await.map_err(failed)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!("upstream connection ended: {e}");
            }
        });
        Ok(Sender::H1(sender))
    }
}

fn lock(slot: &Mutex<Slot>) -> std::sync::MutexGuard<'_, Slot> {
    slot.lock().unwrap_or_else(|p| p.into_inner())
}

/// An HTTP/1.1 connection lent to one response: back in its pool once the
/// response has been read to its end.
struct Lease {
    sender: http1::SendRequest<Body>,
    shared: Arc<Shared>,
    slot: usize,
}

impl Lease {
    fn release(self) {
        if self.shared.closed.load(Ordering::Relaxed) || self.sender.is_closed() {
            return;
        }
        let mut slot = lock(&self.shared.slots[self.slot]);
        if slot.idle.len() < MAX_IDLE {
            slot.idle.push((self.sender, Instant::now()));
        }
    }
}

/// A response body from a pooled connection, which goes back to the pool
/// when the body ends.
pub(crate) struct Pooled {
    inner: Incoming,
    lease: Option<Lease>,
}

impl hyper::body::Body for Pooled {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) {
            if let Some(lease) = self.lease.take() {
                lease.release();
            }
        }
        polled
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        // A body read to its end (or empty, and never polled) leaves the
        // connection reusable; one dropped midway does not.
        if hyper::body::Body::is_end_stream(&self.inner) {
            if let Some(lease) = self.lease.take() {
                lease.release();
            }
        }
    }
}

thread_local! {
    /// This serving thread's place among the process's (0 elsewhere).
    static SERVING_THREAD: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks the current thread as serving thread `index`: its pools are its own.
pub(crate) fn set_serving_thread(index: usize) {
    SERVING_THREAD.with(|t| t.set(index));
}

fn serving_thread() -> usize {
    SERVING_THREAD.with(|t| t.get())
}
