//! What a request's handling knows about where it runs: the process
//! ([`ProcessInfo`]: pid, generation, counters, the drain), the listener it
//! arrived on ([`ListenerContext`]), the client ([`Peer`]), the serving
//! thread's counters ([`ThreadStats`]), and the settings every connection
//! shares ([`Shared`]). Plain data, below everything that serves.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::Semaphore;

use crate::config::Timeouts;
use crate::process::drain::Drain;

/// Facts about this process that responses report.
pub(crate) struct ProcessInfo {
    pub(crate) pid: u32,
    pub(crate) generation: u64,
    pub(crate) started_at: SystemTime,
    pub(crate) started: std::time::Instant,
    /// name, address (as bound), tls.
    pub(crate) listeners: Vec<(String, String, bool)>,
    /// Per thread: counted where the requests run, summed on demand.
    pub(crate) threads: Vec<Arc<ThreadStats>>,
    pub(crate) proxied_total: AtomicU64,
    pub(crate) upstream_errors_total: AtomicU64,
    /// Proxied requests whose body the client broke (answered 400).
    pub(crate) client_errors_total: AtomicU64,
    pub(crate) drain: Drain,
    /// With an `acme:` section: what `status` shows of each certificate
    /// it asks for (kept up to date by the orderer).
    pub(crate) acme: Option<Arc<crate::tls::acme::Status>>,
    /// With `tls_tickets: { storage }`: the fleet's ticket keys this process
    /// has (`status`).
    pub(crate) tickets: Option<Arc<crate::tls::tickets::Tickets>>,
    /// The access logs, for the lines they lost (`status`).
    pub(crate) access_logs: Vec<Arc<crate::observe::access_log::AccessLog>>,
    /// Set when some listener serves `metrics: {}`.
    pub(crate) metrics: Option<Arc<crate::observe::metrics::Metrics>>,
    /// The instances of the config's apps (`proxy: { app }`).
    pub(crate) apps: Arc<crate::apps::Table>,
    /// Every upstream of every proxy route (`status`, metrics, handover).
    pub(crate) upstreams: Vec<Arc<crate::process::upstreams::UpstreamState>>,
    /// What each listener's HTTP/3 counts (`http3: true`).
    pub(crate) http3: Vec<Arc<QuicStats>>,
    /// The socket requests of busy HTTP/2 connections go through to the
    /// newest generation while this one drains (`serve::forward`).
    pub(crate) forward: Option<Arc<crate::sys::forward::ForwardSocket>>,
}

/// One listener's HTTP/3 in this process (`quic`).
#[derive(Debug, Default)]
pub(crate) struct QuicStats {
    pub(crate) listener: String,
    /// QUIC connections open (handshakes done).
    pub(crate) connections: AtomicU64,
    pub(crate) requests_total: AtomicU64,
    /// Does this process read the listener's UDP socket (the newest does)?
    pub(crate) reading: std::sync::atomic::AtomicBool,
    /// Datagrams passed on to older generations.
    pub(crate) forwarded_total: AtomicU64,
    /// Datagrams a newer generation passed to this one.
    pub(crate) received_total: AtomicU64,
    /// Clients sent a Retry first (many handshakes under way).
    pub(crate) retries_total: AtomicU64,
    /// Connections refused at `max_connections`.
    pub(crate) refused_total: AtomicU64,
    /// Requests refused as malformed (RFC 9114 section 4.1.2).
    pub(crate) malformed_total: AtomicU64,
}

impl ProcessInfo {
    /// Requests being answered now, over all threads.
    pub(crate) fn requests_in_flight(&self) -> u64 {
        self.threads
            .iter()
            .map(|w| w.in_flight.load(Ordering::Relaxed))
            .sum()
    }
}

/// What a request's handler knows about where it arrived.
pub(crate) struct ListenerContext {
    pub(crate) name: String,
    pub(crate) process: Arc<ProcessInfo>,
}

/// Where a request came from: the client's address, and whether it came
/// over TLS. An application's service finds it in the request's extensions.
///
/// ```
/// fn client(req: &http::Request<()>) -> Option<std::net::SocketAddr> {
///     req.extensions().get::<gracesrv::Peer>().map(|p| p.addr)
/// }
/// # assert_eq!(client(&http::Request::new(())), None);
/// ```
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct Peer {
    pub addr: SocketAddr,
    pub tls: bool,
}

/// What one thread counts. Each thread writes only its own (aligned
/// to its own cache lines), so counting a request costs no cross-core
/// traffic; `status` and the drain sum them.
#[repr(align(128))]
#[derive(Default)]
pub(crate) struct ThreadStats {
    /// This thread's place among the process's (its access log buffer).
    pub(crate) index: usize,
    pub(crate) requests_total: AtomicU64,
    pub(crate) in_flight: AtomicU64,
    /// Connections this thread serves now (for balancing accepts).
    pub(crate) connections: AtomicU64,
    /// Accept loops of this thread deferring to the others, and the signal
    /// that one of its connections closed (so they look again).
    pub(crate) deferring: AtomicU32,
    pub(crate) closed: tokio::sync::Notify,
}

/// Settings shared by every connection of the process.
pub(crate) struct Shared {
    pub(crate) process: Arc<ProcessInfo>,
    pub(crate) timeouts: Timeouts,
    /// `max_connections`: beyond it, accept waits.
    pub(crate) limit: Arc<Semaphore>,
    /// `limits.max_headers`: header fields an HTTP/1.x request may carry.
    pub(crate) max_headers: usize,
    /// How long a draining generation keeps a busy HTTP/2 connection,
    /// handing its requests on, before the GOAWAY's two steps.
    pub(crate) forward_for: std::time::Duration,
}
