//! HTTP/3 (RFC 9114, QUIC v1) on the listeners with `http3: true`: the
//! listener's routes, certificates and SNI, on a UDP socket at its address.
//!
//! Each generation runs one QUIC endpoint per such listener on a thread of
//! its own. Only the newest generation reads the shared UDP socket and
//! passes older generations' datagrams on to them (`socket`), recognised
//! by the connection IDs they issued (`cid`); so a restart breaks no QUIC
//! connection. A draining generation sends HTTP/3 GOAWAY, lets its
//! requests finish, and closes each connection once it is idle (or the
//! client closes it), as HTTP/1.1 connections are closed after
//! `timeouts.draining_idle` (`connection`). Each request goes to the
//! listener's handler, its routes or an application's service (`request`).

mod cid;
mod connection;
mod fields;
mod request;
mod socket;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use http::HeaderValue;
use tracing::debug;

use crate::http::service::Handler;
use crate::process::context::{ListenerContext, QuicStats, Shared};

/// Requests a client may have open at once on a connection.
const MAX_STREAMS: u32 = 100;
/// Handshakes in progress beyond which a client must first prove its
/// address with a Retry (RFC 9000 section 8.1.2): a flood of spoofed
/// Initials then costs one stateless packet each.
const RETRY_ABOVE: u64 = 64;
/// The largest request head (QPACK-decoded field section).
pub(super) const MAX_HEAD: u64 = 64 * 1024;

/// Why HTTP/3 could not start.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Http3Error {
    #[error("cannot make the connection ID key")]
    CidKey,
    #[error("HTTP/3 runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("cannot start the HTTP/3 thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("the HTTP/3 thread died at start")]
    Died,
    #[error("listener {listener}: HTTP/3: {source}")]
    Listener {
        listener: String,
        #[source]
        source: Box<Http3Error>,
    },
    #[error("TLS for QUIC: {0}")]
    Tls(#[source] quinn::crypto::rustls::NoInitialCipherSuite),
    #[error("UDP socket: {0}")]
    Udp(#[source] std::io::Error),
    #[error("{0}")]
    Endpoint(#[source] std::io::Error),
}

/// One listener's HTTP/3, before it serves.
pub(crate) struct QuicListener {
    pub(crate) socket: std::net::UdpSocket,
    pub(crate) tls: Arc<rustls::ServerConfig>,
    pub(crate) handler: Handler,
    pub(crate) ctx: Arc<ListenerContext>,
    pub(crate) stats: Arc<QuicStats>,
    /// Where the listener's requests are logged and counted, as over TCP.
    pub(crate) access_log: Option<Arc<crate::observe::access_log::AccessLog>>,
    pub(crate) metrics: Option<Arc<crate::observe::metrics::ListenerMetrics>>,
}

/// `Alt-Svc` for a listener on `port`.
pub(crate) fn alt_svc(port: u16) -> HeaderValue {
    HeaderValue::from_str(&format!("h3=\":{port}\"; ma=86400"))
        .unwrap_or_else(|_| HeaderValue::from_static("clear"))
}

/// This generation's HTTP/3 endpoints, started but not reading yet.
pub(crate) struct Http3 {
    runtime: tokio::runtime::Handle,
    sockets: Vec<(String, Arc<socket::Socket>)>,
    shared: Arc<Shared>,
}

/// Starts an endpoint per listener on a thread of its own. They answer
/// nothing until [`Http3::take_over`]: before `READY` the previous
/// generation still reads the sockets.
///
/// The key of the connection IDs, the stateless reset key and the key of
/// address validation tokens (Retry, NEW_TOKEN) derive from the service's
/// secret (`tickets`): the same in every generation, so each accepts the
/// others'.
pub(crate) fn start(
    listeners: Vec<QuicListener>,
    shared: Arc<Shared>,
    tickets: &crate::tls::tickets::Tickets,
    span: tracing::Span,
) -> Result<Option<Http3>, Http3Error> {
    if listeners.is_empty() {
        return Ok(None);
    }
    let cid_secret = tickets.derive(b"gracesrv quic cid");
    let mut cid_key = [0u8; 16];
    cid_key.copy_from_slice(&cid_secret[..16]);
    let key = Arc::new(cid::Key::new(&cid_key).ok_or(Http3Error::CidKey)?);
    let reset = Arc::new(aws_lc_rs::hmac::Key::new(
        aws_lc_rs::hmac::HMAC_SHA256,
        &tickets.derive(b"gracesrv quic stateless reset"),
    ));
    let token: Arc<dyn quinn::crypto::HandshakeTokenKey> = Arc::new(
        aws_lc_rs::hkdf::Salt::new(aws_lc_rs::hkdf::HKDF_SHA256, &[])
            .extract(&tickets.derive(b"gracesrv quic address token")),
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let shared2 = shared.clone();
    std::thread::Builder::new()
        .name("gracesrv-h3".into())
        .spawn(move || {
            let _enter = span.enter();
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(Http3Error::Runtime(e)));
                    return;
                }
            };
            rt.block_on(async move {
                let mut sockets = Vec::new();
                for l in listeners {
                    let name = l.ctx.name.clone();
                    match endpoint(l, &key, &reset, &token, &shared2) {
                        Ok(s) => sockets.push((name, s)),
                        Err(e) => {
                            let _ = tx.send(Err(Http3Error::Listener {
                                listener: name,
                                source: Box::new(e),
                            }));
                            return;
                        }
                    }
                }
                let _ = tx.send(Ok((tokio::runtime::Handle::current(), sockets)));
                std::future::pending::<()>().await;
            });
        })
        .map_err(Http3Error::Thread)?;
    let (runtime, sockets) = rx.recv().map_err(|_| Http3Error::Died)??;
    Ok(Some(Http3 {
        runtime,
        sockets,
        shared,
    }))
}

impl Http3 {
    /// This generation is ready: it becomes the one reading the UDP
    /// sockets (see `socket`).
    pub(crate) fn take_over(self) {
        for (name, s) in self.sockets {
            let drain = self.shared.process.drain.clone();
            self.runtime.spawn(s.keep(drain, name));
        }
    }
}

fn endpoint(
    l: QuicListener,
    key: &Arc<cid::Key>,
    reset: &Arc<aws_lc_rs::hmac::Key>,
    token: &Arc<dyn quinn::crypto::HandshakeTokenKey>,
    shared: &Arc<Shared>,
) -> Result<Arc<socket::Socket>, Http3Error> {
    let mut tls = (*l.tls).clone();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(tls))
        .map_err(Http3Error::Tls)?;
    let t = shared.timeouts;
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(t.idle.try_into().ok())
        .max_concurrent_bidi_streams(MAX_STREAMS.into())
        // A client opens 3 (control and QPACK); a little room for more.
        .max_concurrent_uni_streams(8u32.into());
    let mut server = quinn::ServerConfig::new(Arc::new(crypto), token.clone());
    server.transport_config(Arc::new(transport));
    let mut config = quinn::EndpointConfig::new(reset.clone());
    let pid = std::process::id();
    let k = key.clone();
    config.cid_generator(move || {
        Box::new(cid::Generator {
            key: k.clone(),
            pid,
        })
    });
    let socket = Arc::new(
        socket::Socket::new(l.socket, key.clone(), l.stats.clone()).map_err(Http3Error::Udp)?,
    );
    let endpoint = quinn::Endpoint::new_with_abstract_socket(
        config,
        Some(server),
        socket.clone(),
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(Http3Error::Endpoint)?;
    let spec = Arc::new(Spec {
        handler: l.handler,
        ctx: l.ctx,
        stats: l.stats,
        shared: shared.clone(),
        handshaking: Default::default(),
        access_log: l.access_log,
        metrics: l.metrics,
    });
    tokio::spawn(accept(endpoint, spec));
    Ok(socket)
}

/// What a listener's connections share.
pub(super) struct Spec {
    handler: Handler,
    ctx: Arc<ListenerContext>,
    stats: Arc<QuicStats>,
    shared: Arc<Shared>,
    /// Handshakes under way.
    handshaking: std::sync::atomic::AtomicU64,
    access_log: Option<Arc<crate::observe::access_log::AccessLog>>,
    metrics: Option<Arc<crate::observe::metrics::ListenerMetrics>>,
}

async fn accept(endpoint: quinn::Endpoint, spec: Arc<Spec>) {
    while let Some(incoming) = endpoint.accept().await {
        if !incoming.remote_address_validated()
            && incoming.may_retry()
            && spec.handshaking.load(Ordering::Relaxed) >= RETRY_ABOVE
        {
            spec.stats.retries_total.fetch_add(1, Ordering::Relaxed);
            let _ = incoming.retry();
            continue;
        }
        // `max_connections` counts QUIC connections too. A client cannot
        // wait in a queue here: it is refused, and tries again.
        let Ok(permit) = spec.shared.limit.clone().try_acquire_owned() else {
            debug!(listener = %spec.ctx.name, "max_connections reached: HTTP/3 connection refused");
            spec.stats.refused_total.fetch_add(1, Ordering::Relaxed);
            incoming.refuse();
            continue;
        };
        let guard = spec.shared.process.drain.connection();
        let spec = spec.clone();
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            connection::connection(incoming, &spec, &endpoint).await;
            drop(guard);
            drop(permit);
        });
    }
}

/// A count held while it is alive.
pub(super) struct Held<'a>(&'a std::sync::atomic::AtomicU64);

impl<'a> Held<'a> {
    fn new(n: &'a std::sync::atomic::AtomicU64) -> Held<'a> {
        n.fetch_add(1, Ordering::Relaxed);
        Held(n)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// This process's open QUIC connections, for the restart log.
pub(crate) fn open_connections(stats: &[Arc<QuicStats>]) -> u64 {
    stats
        .iter()
        .map(|s| s.connections.load(Ordering::Relaxed))
        .sum()
}
