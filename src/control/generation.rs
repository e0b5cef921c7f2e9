//! One generation: the process serving a config with a set of sockets.
//! Starting one opens (or adopts) the sockets, starts the serving threads and only
//! then reports ready: on the ready pipe, in `pid_file`, and to systemd.

use std::os::fd::OwnedFd;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tokio::sync::Semaphore;
use tracing::{info, warn};

use crate::config::Config;
use crate::control::prepare::Prepared;
use crate::control::successor::{notify_systemd, status_line, write_pid_file, Predecessor};
use crate::observe::access_log::AccessLog;
use crate::observe::logging::Chain;
use crate::process::context::{ListenerContext, ProcessInfo, Shared, ThreadStats};
use crate::process::drain::Drain;
use crate::serve::connection::ListenerSpec;
use crate::sys::handoff::InheritedSocket;
use crate::sys::listeners::Listener;
use crate::tls::tickets::Tickets;

pub(crate) struct Generation {
    pub(crate) config: Config,
    /// This process's own copies of the sockets, in listener order: what a
    /// restart hands over. Serving threads hold duplicates of their own.
    pub(crate) listeners: Vec<Listener>,
    pub(crate) process: Arc<ProcessInfo>,
    /// The ready pipe to the previous generation, kept open after `READY`:
    /// while it is open, the previous generation (still draining) can take
    /// over again if this one dies. `DONE` on it says this one ends on
    /// purpose (see [`Generation::ending`]).
    predecessor: Option<Predecessor>,
    /// Writing `pid_file` failed (a full disk): the control loop retries.
    pub(crate) pid_file_pending: bool,
    /// The HTTP/3 endpoints, until they read their sockets (once this is ready).
    http3: Option<crate::quic::Http3>,
    /// The proxy routes (their active health checks run while this serves).
    pub(crate) proxies: Vec<Arc<crate::http::proxy::Proxy>>,
    /// The ticket keys (a fleet's are kept in step with the store while
    /// this serves).
    pub(crate) tickets: Arc<Tickets>,
}

/// Serving threads: one per core, or `GRACESRV_THREADS` (`GRACESRV_WORKERS`,
/// its old name, is read too).
fn thread_count() -> usize {
    std::env::var("GRACESRV_THREADS")
        .or_else(|_| std::env::var("GRACESRV_WORKERS"))
        .ok()
        .and_then(|w| w.parse().ok())
        .filter(|w| *w > 0)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
}

/// Why a generation could not start serving.
#[derive(Debug, thiserror::Error)]
pub(crate) enum GenerationError {
    #[error(transparent)]
    Listen(#[from] crate::sys::listeners::ListenError),
    #[error(transparent)]
    AccessLog(#[from] crate::observe::access_log::AccessLogError),
    #[error("listener {listener}: {source}")]
    Socket {
        listener: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Http3(#[from] crate::quic::Http3Error),
    #[error(transparent)]
    Threads(#[from] crate::serve::accept::ThreadsError),
}

/// What a generation takes over from the one before it, besides sockets.
pub(crate) struct Handed<'a> {
    pub(crate) tickets: Arc<Tickets>,
    /// The counters handed over (JSON), and whether this start counts as a
    /// restart.
    pub(crate) metrics: Option<(Option<String>, bool)>,
    /// The health of proxy upstreams (JSON).
    pub(crate) upstreams: Option<&'a str>,
    /// The socket requests are handed on through (`serve::forward`).
    pub(crate) forward: Option<Arc<crate::sys::forward::ForwardSocket>>,
}

impl Generation {
    pub(crate) fn start(
        prepared: Prepared,
        inherited: Vec<InheritedSocket>,
        generation: u64,
        handed: Handed<'_>,
        span: tracing::Span,
    ) -> Result<Generation, GenerationError> {
        let Handed {
            tickets,
            metrics: metrics_base,
            upstreams: upstreams_base,
            forward,
        } = handed;
        let Prepared {
            config,
            listeners: prepared,
            ..
        } = prepared;
        let listeners = crate::sys::listeners::open(&config.listeners, inherited)?;
        let threads = thread_count();
        // The proxy routes, whose upstreams' health the previous generation
        // may have handed over.
        let proxies: Vec<Arc<crate::http::proxy::Proxy>> = prepared
            .iter()
            .filter_map(|p| match &p.handler {
                crate::http::service::Handler::Routes(r) => Some(r.proxies()),
                crate::http::service::Handler::Service(_) => None,
            })
            .flatten()
            .cloned()
            .collect();
        let upstreams: Vec<Arc<crate::process::upstreams::UpstreamState>> = proxies
            .iter()
            .flat_map(|p| p.states().iter().cloned())
            .collect();
        let limiters: Vec<Arc<crate::http::limit::Limiter>> = prepared
            .iter()
            .filter_map(|p| match &p.handler {
                crate::http::service::Handler::Routes(r) => Some(r.limiters()),
                crate::http::service::Handler::Service(_) => None,
            })
            .flatten()
            .cloned()
            .collect();
        if let Some(handed) = upstreams_base {
            crate::process::upstreams::take_over(handed, upstreams.iter().map(|u| &**u));
        }
        // One writer per distinct access log, shared by its listeners.
        let mut logs: Vec<(crate::config::AccessLogConfig, Arc<AccessLog>)> = Vec::new();
        for a in config
            .listeners
            .iter()
            .filter_map(|c| c.access_log.as_ref())
        {
            if !logs.iter().any(|(c, _)| c == a) {
                let log = AccessLog::open(a, threads, std::process::id(), generation)?;
                logs.push((a.clone(), log));
            }
        }
        // What each listener counts, when the config serves `metrics: {}`.
        let listener_metrics: Vec<Option<Arc<crate::observe::metrics::ListenerMetrics>>> = config
            .listeners
            .iter()
            .zip(&prepared)
            .map(|(c, p)| {
                config.has_metrics().then(|| {
                    Arc::new(match &p.handler {
                        crate::http::service::Handler::Routes(r) => {
                            crate::observe::metrics::ListenerMetrics::new(
                                &c.name,
                                r.prefixes(),
                                false,
                            )
                        }
                        crate::http::service::Handler::Service(_) => {
                            crate::observe::metrics::ListenerMetrics::new(&c.name, Vec::new(), true)
                        }
                    })
                })
            })
            .collect();
        let apps = Arc::new(crate::apps::Table::new(&config));
        let metrics = config.has_metrics().then(|| {
            let (base, restarted) = metrics_base.unwrap_or((None, false));
            let mut m = crate::observe::metrics::Metrics::new(
                listener_metrics.iter().flatten().cloned().collect(),
                base.as_deref(),
                restarted,
                generation,
            );
            m.certificates = served_certificates(&config);
            m.sources = upstreams
                .iter()
                .map(|u| u.clone() as Arc<dyn crate::observe::metrics::Source>)
                .chain(
                    limiters
                        .iter()
                        .map(|l| l.clone() as Arc<dyn crate::observe::metrics::Source>),
                )
                .chain(std::iter::once(
                    apps.clone() as Arc<dyn crate::observe::metrics::Source>
                ))
                .collect();
            Arc::new(m)
        });
        let process = Arc::new(ProcessInfo {
            pid: std::process::id(),
            generation,
            started_at: SystemTime::now(),
            started: Instant::now(),
            listeners: config
                .listeners
                .iter()
                .zip(&listeners)
                .map(|(c, l)| (c.name.clone(), l.local_addr.to_string(), c.tls.is_some()))
                .collect(),
            threads: (0..threads)
                .map(|index| {
                    Arc::new(ThreadStats {
                        index,
                        ..Default::default()
                    })
                })
                .collect(),
            proxied_total: AtomicU64::new(0),
            upstream_errors_total: AtomicU64::new(0),
            client_errors_total: AtomicU64::new(0),
            drain: Drain::default(),
            acme: crate::tls::acme::Status::new(&config),
            tickets: matches!(
                config.tls_tickets,
                Some(crate::config::TicketsConfig::Store(_))
            )
            .then(|| tickets.clone()),
            access_logs: logs.iter().map(|(_, l)| l.clone()).collect(),
            metrics,
            apps,
            upstreams,
            http3: config
                .listeners
                .iter()
                .filter(|l| l.http3)
                .map(|l| {
                    Arc::new(crate::process::context::QuicStats {
                        listener: l.name.clone(),
                        ..Default::default()
                    })
                })
                .collect(),
            forward,
        });
        let mut specs = Vec::new();
        let mut quic = Vec::new();
        for (((l, p), c), metrics) in listeners
            .iter()
            .zip(prepared)
            .zip(&config.listeners)
            .zip(listener_metrics)
        {
            let access_log = c
                .access_log
                .as_ref()
                .and_then(|a| logs.iter().find(|(c, _)| c == a))
                .map(|(_, log)| log.clone());
            let socket = l
                .socket
                .try_clone()
                .map_err(|source| GenerationError::Socket {
                    listener: l.name.clone(),
                    source,
                })?;
            let ctx = Arc::new(ListenerContext {
                name: l.name.clone(),
                process: process.clone(),
            });
            // The service's ticket keys, so sessions resume across restarts
            // (see `tickets`); over TCP and QUIC alike.
            let tls = p.tls.map(|tls| {
                let mut tls = (*tls).clone();
                tls.ticketer = tickets.clone();
                Arc::new(tls)
            });
            let mut alt_svc = None;
            if let (Some(q), Some(tls)) = (&l.quic, &tls) {
                let stats = process
                    .http3
                    .iter()
                    .find(|s| s.listener == l.name)
                    .cloned()
                    .unwrap_or_default();
                quic.push(crate::quic::QuicListener {
                    socket: q
                        .socket
                        .try_clone()
                        .map_err(|source| GenerationError::Socket {
                            listener: l.name.clone(),
                            source,
                        })?,
                    tls: tls.clone(),
                    handler: p.handler.clone(),
                    ctx: ctx.clone(),
                    stats,
                    access_log: access_log.clone(),
                    metrics: metrics.clone(),
                });
                alt_svc = Some(crate::quic::alt_svc(l.local_addr.port()));
            }
            specs.push((
                socket,
                ListenerSpec {
                    tls,
                    handler: p.handler,
                    ctx,
                    nodelay_inherited: false,
                    access_log,
                    metrics,
                    alt_svc,
                },
            ));
        }
        let shared = Arc::new(Shared {
            process: process.clone(),
            timeouts: config.timeouts,
            max_headers: config.max_headers,
            forward_for: crate::serve::forward::busy_for(config.shutdown_timeout),
            limit: Arc::new(Semaphore::new(crate::sys::limits::connection_limit(
                config.max_connections,
                config.listeners.iter().any(|l| {
                    l.routes
                        .iter()
                        .any(|r| matches!(r.action, crate::config::Action::Proxy(_)))
                }),
            ))),
        });
        let http3 = crate::quic::start(quic, shared.clone(), &tickets, span.clone())?;
        crate::serve::accept::start(process.threads.len(), specs, shared, span)?;
        for (c, l) in config.listeners.iter().zip(&listeners) {
            let scheme = if c.tls.is_some() { "https" } else { "http" };
            info!(listener = %l.name, addr = %l.local_addr, %scheme, http3 = l.quic.is_some(), "listening");
        }
        Ok(Generation {
            config,
            listeners,
            process,
            predecessor: None,
            pid_file_pending: false,
            http3,
            proxies,
            tickets,
        })
    }

    /// Tells whoever waits that this generation serves: the parent (ready
    /// pipe), `pid_file`, systemd. A supervised worker tells only its
    /// supervisor, which owns the pid file and the systemd notifications.
    pub(crate) fn report_ready(&mut self, ready: Option<OwnedFd>, supervised: bool) {
        // Requests handed on by draining generations come here from now.
        if let Some(f) = &self.process.forward {
            f.set_newest();
        }
        if let Some(fd) = ready {
            self.predecessor = Predecessor::ready(fd);
        }
        // Only now may this generation read the UDP sockets (the previous
        // one hands them over). Once: a generation that reports ready again
        // after a rollback reads again by itself (see `quic::socket`).
        if let Some(h) = self.http3.take() {
            h.take_over();
        }
        if supervised {
            return;
        }
        self.pid_file_pending = false;
        if let Some(path) = &self.config.pid_file {
            if let Err(e) = write_pid_file(path, self.process.pid) {
                warn!(pid_file = %path.display(), "cannot write pid file, trying again every second: {e}", e = Chain(&e));
                self.pid_file_pending = true;
            }
        }
        let status = status_line(self.process.generation, self.process.pid, &self.listeners);
        notify_systemd(&[
            sd_notify::NotifyState::MainPid(self.process.pid),
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&status),
        ]);
    }

    /// Tries `pid_file` again (see `pid_file_pending`).
    pub(crate) fn retry_pid_file(&mut self) {
        let Some(path) = &self.config.pid_file else {
            self.pid_file_pending = false;
            return;
        };
        if write_pid_file(path, self.process.pid).is_ok() {
            info!(pid_file = %path.display(), "pid file written");
            self.pid_file_pending = false;
        }
    }

    /// This generation ends on purpose (replaced, or stopping): the previous
    /// one, if it still drains, must not take over when this one exits.
    pub(crate) fn ending(&mut self) {
        if let Some(p) = self.predecessor.take() {
            p.done();
        }
    }

    /// Removes `pid_file` if it still names this process (a newer generation
    /// may have written its own).
    pub(crate) fn remove_pid_file(&self) {
        if let Some(path) = &self.config.pid_file {
            crate::control::successor::remove_pid_file(path, self.process.pid);
        }
    }
}

/// The certificates the listeners serve (as loaded at start): listener,
/// serial, not after. For `gracesrv_certificate_expiry_seconds`.
fn served_certificates(config: &Config) -> Vec<(String, String, i64)> {
    use rustls_pki_types::pem::PemObject;
    let mut out = Vec::new();
    for l in &config.listeners {
        let Some(tls) = &l.tls else { continue };
        let files = std::iter::once(&tls.cert).chain(tls.sni.iter().map(|(c, _)| c));
        for f in files {
            let Some(der) = rustls_pki_types::CertificateDer::pem_file_iter(&f.path)
                .ok()
                .and_then(|mut it| it.next())
                .and_then(Result::ok)
            else {
                continue;
            };
            if let (Some(serial), Some((_, not_after))) =
                (crate::tls::serial(&der), crate::tls::validity(&der))
            {
                out.push((l.name.clone(), serial, not_after));
            }
        }
    }
    out
}
