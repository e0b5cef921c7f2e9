//! gracesrv: a multi-listener HTTP/HTTPS server, and a library, that restarts
//! with zero downtime.
//!
//! On SIGHUP the process re-executes its own binary and hands the new process
//! its listening sockets (the systemd socket-activation protocol); the new
//! process re-reads the config, reloads certificates, reports ready, and only
//! then does the old one stop accepting and drain.
//!
//! An application embeds it by handing over its own service per listener:
//!
//! ```no_run
//! use http_body_util::Full;
//! use hyper::{body::Bytes, Request, Response};
//!
//! let hello = tower::service_fn(|_req: Request<gracesrv::IncomingBody>| async {
//!     Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("hello\n"))))
//! });
//! let code = gracesrv::Server::new("app.yaml").service("web", hello).run();
//! std::process::exit(code);
//! ```
//!
//! The public API is small: [`Server`] (with [`Server::run`] and, for an
//! application on tokio already, [`Server::serve`]), [`check`], [`reload`],
//! [`ConfigError`] (what is wrong with a config, and where), and [`Peer`]
//! (who sent a request, in its extensions). `Config` is public only for the
//! fuzzer's `Config::parse`; its contents, like everything else, are the
//! binary's (`pub(crate)`), and may change.
//!
//! Inside, one folder per layer, each importing only those below it
//! (`tests/layout.rs` checks it): `control` (restarts, generations, the
//! supervisor) → `quic` (HTTP/3) → `serve` (accept loops, connections) →
//! `http` (routes and their actions) → `process` (what a serving process
//! shares: context, drain) → `apps` → `tls` → `observe` (logs, metrics) →
//! `wire` (bodies, heads, frames, upstream pools) → `sys` (the operating
//! system, the only `unsafe`) → `config`. A restart reads top to bottom
//! from `control::restart` (the old process's side: the state machine both
//! modes run, whose steps lead to `control::spawn` and `control::run`) and
//! `control::successor` (the new one's).

#![deny(unsafe_code)]

mod apps;
mod config;
mod control;
mod http;
mod observe;
mod process;
mod quic;
mod serve;
mod store;
mod sys;
mod tls;
mod wire;

use control::{deploy, generation, prepare, reload, restart, run, spawn, successor, supervisor};
use observe::{access_log, logging};
use sys::{handoff, reaper, signals, watch};
use tls::tickets;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use ::http::{Request, Response};
use bytes::Bytes;

pub use config::{Config, ConfigError};
pub use control::reload::ControlError;
use http::service::Handler;
pub use process::context::Peer;
use tracing::Instrument;
pub use wire::body::{BoxError, IncomingBody};

/// A gracesrv server: a config file, and optionally an application's own
/// services for some of its listeners.
pub struct Server {
    config: PathBuf,
    services: HashMap<String, Handler>,
    supervise: bool,
    hooks: run::Hooks,
}

impl Server {
    /// A server for the config at `config` (relative paths are resolved
    /// against the working directory once, at start).
    ///
    /// ```no_run
    /// let server = gracesrv::Server::new("/etc/gracesrv/server.yaml");
    /// std::process::exit(server.run());
    /// ```
    pub fn new(config: impl Into<PathBuf>) -> Server {
        Server {
            config: config.into(),
            services: HashMap::new(),
            supervise: false,
            hooks: run::Hooks::default(),
        }
    }

    /// Runs under a supervisor whose pid never changes (as `--supervise`, or
    /// `supervise: true` in the config): restarts replace worker processes.
    ///
    /// ```no_run
    /// let code = gracesrv::Server::new("server.yaml").supervise(true).run();
    /// std::process::exit(code);
    /// ```
    pub fn supervise(mut self, yes: bool) -> Server {
        self.supervise = yes;
        self
    }

    /// Serves `svc` on the listener named `listener` instead of its routes.
    /// Anything implementing tower's `Service` works (an axum `Router` too).
    /// The listener keeps its address, TLS and limits from the config (and
    /// with `http3: true`, `svc` serves HTTP/3 as well: its requests carry
    /// an [`IncomingBody`] whatever the version); a service error becomes a
    /// 500 response and a log line.
    ///
    /// ```no_run
    /// use http_body_util::Full;
    /// use hyper::{body::Bytes, Request, Response};
    ///
    /// let who = tower::service_fn(|req: Request<gracesrv::IncomingBody>| async move {
    ///     let peer = req.extensions().get::<gracesrv::Peer>().copied();
    ///     let body = format!("hello {:?}\n", peer.map(|p| p.addr));
    ///     Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(body))))
    /// });
    /// let code = gracesrv::Server::new("app.yaml").service("web", who).run();
    /// std::process::exit(code);
    /// ```
    pub fn service<S, B>(mut self, listener: &str, svc: S) -> Server
    where
        S: tower::Service<Request<IncomingBody>, Response = Response<B>>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        self.services
            .insert(listener.to_string(), Handler::service(svc));
        self
    }

    /// Runs `hook` each time this process's generation is ready to serve:
    /// at start, and again if a restart is rolled back (the new generation
    /// died right after it said ready) and this one serves on. It runs
    /// beside the serving, on the runtime of [`Server::run`] or
    /// [`Server::serve`]. Under a supervisor, each worker runs it.
    ///
    /// ```no_run
    /// let code = gracesrv::Server::new("app.yaml")
    ///     .on_ready(|| async { println!("serving") })
    ///     .run();
    /// std::process::exit(code);
    /// ```
    pub fn on_ready<F, Fut>(mut self, hook: F) -> Server
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        self.hooks.ready = Some(Arc::new(move || Box::pin(hook())));
        self
    }

    /// Runs `hook` when this generation starts draining (replaced by a
    /// restart, or stopping): close a database pool's idle connections,
    /// stop background jobs. Requests in flight are still being answered;
    /// the process exits only once the hook is done as well, or at
    /// `shutdown_timeout`. QUIT (or a second TERM) does not wait for it.
    ///
    /// ```no_run
    /// let code = gracesrv::Server::new("app.yaml")
    ///     .on_drain(|| async { /* stop the jobs */ })
    ///     .run();
    /// std::process::exit(code);
    /// ```
    pub fn on_drain<F, Fut>(mut self, hook: F) -> Server
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        self.hooks.drain = Some(Arc::new(move || Box::pin(hook())));
        self
    }

    /// Runs `hook` when this process is about to exit, after its drain:
    /// flush what the application buffers. Awaited for at most
    /// `shutdown_timeout`.
    ///
    /// ```no_run
    /// let code = gracesrv::Server::new("app.yaml")
    ///     .on_exit(|| async { /* flush */ })
    ///     .run();
    /// std::process::exit(code);
    /// ```
    pub fn on_exit<F, Fut>(mut self, hook: F) -> Server
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        self.hooks.exit = Some(Arc::new(move || Box::pin(hook())));
        self
    }

    /// Runs the server in the foreground until it is stopped (or, after a
    /// restart, until this generation has drained), on a runtime of its own.
    /// Returns the exit code: 0 after a clean stop, 1 if it could not start.
    ///
    /// Call it from a plain `main`, before any thread is started: it reads
    /// and removes the handoff variables (`LISTEN_FDS`, ...) from the
    /// environment. Inside a tokio runtime, use [`Server::serve`] instead.
    ///
    /// ```no_run
    /// let code = gracesrv::Server::new("server.yaml").run();
    /// std::process::exit(code);
    /// ```
    pub fn run(self) -> i32 {
        // Before any thread exists: the handoff variables are read and
        // removed from the environment.
        let inherited = match successor::Inherited::from_env(true) {
            Ok(i) => i,
            Err(e) => {
                eprintln!("gracesrv: {e}", e = logging::Chain(&e));
                return 1;
            }
        };
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                let msg = format!("cannot start runtime: {e}", e = logging::Chain(&e));
                successor::report_error(inherited.ready, &msg);
                eprintln!("gracesrv: {msg}");
                return 1;
            }
        };
        rt.block_on(self.serve_inherited(inherited))
    }

    /// [`Server::run`] for an application that already runs tokio: serves
    /// until stopped, and resolves to the exit code.
    ///
    /// What it requires of the application:
    /// - a runtime with IO and time enabled (`#[tokio::main]` has both);
    /// - awaiting it where it is polled on one thread: the future is not
    ///   `Send` (await it in `main`, or spawn it on a `LocalSet`);
    /// - leaving process-wide things to gracesrv: it handles SIGHUP, SIGTERM,
    ///   SIGINT and SIGQUIT, reaps every child process (SIGCHLD; the
    ///   application must not wait for children of its own), and installs a
    ///   log subscriber unless the application has one.
    ///
    /// Unlike `run`, it leaves the handoff variables in the environment
    /// (changing it while threads run is unsound); they name this process's
    /// pid, so no child takes them for its own. They include the TLS
    /// session ticket secret (`GRACESRV_TICKET_SECRET`): an application
    /// that starts programs of its own should remove `GRACESRV_*` from
    /// their environment (`Command::env_remove`). gracesrv's own new
    /// generations never inherit them.
    ///
    /// ```no_run
    /// #[tokio::main]
    /// async fn main() {
    ///     let code = gracesrv::Server::new("server.yaml").serve().await;
    ///     std::process::exit(code);
    /// }
    /// ```
    pub async fn serve(self) -> i32 {
        match successor::Inherited::from_env(false) {
            Ok(inherited) => self.serve_inherited(inherited).await,
            Err(e) => {
                eprintln!("gracesrv: {e}", e = logging::Chain(&e));
                1
            }
        }
    }

    async fn serve_inherited(self, inherited: successor::Inherited) -> i32 {
        let generation = inherited.generation;
        let mut ready = inherited.ready;
        let fail = |ready: &mut Option<std::os::fd::OwnedFd>, msg: &str| {
            successor::report_error(ready.take(), msg);
            eprintln!("gracesrv: {msg}");
            1
        };
        let exe = match std::env::current_exe() {
            Ok(p) => p,
            Err(e) => {
                return fail(
                    &mut ready,
                    &format!("cannot find my own executable: {e}", e = logging::Chain(&e)),
                )
            }
        };
        // Handlers first, so a HUP during start is held, not fatal.
        let signals = match signals::Signals::install() {
            Ok(s) => s,
            Err(e) => {
                return fail(
                    &mut ready,
                    &format!(
                        "cannot install signal handlers: {e}",
                        e = logging::Chain(&e)
                    ),
                )
            }
        };
        handoff::unblock_hup();
        // Every child is reaped by one SIGCHLD handler (also orphans, as PID 1).
        let reaper = match reaper::Reaper::start() {
            Ok(r) => r,
            Err(e) => {
                return fail(
                    &mut ready,
                    &format!(
                        "cannot install SIGCHLD handler: {e}",
                        e = logging::Chain(&e)
                    ),
                )
            }
        };

        let config_path = config::absolute(&self.config);
        let config = match Config::load(&config_path) {
            Ok(c) => c,
            Err(e) => return fail(&mut ready, &e.to_string()),
        };
        let span = logging::init(&config.log, generation);
        // The TLS session ticket secret: the config's key file, else the one
        // handed over, else a new one (see `tickets`).
        let prepared = match span.in_scope(|| prepare::prepare_config(config, &self.services)) {
            Ok(p) => p,
            Err(e) => return fail(&mut ready, &e.to_string()),
        };
        let tickets = match prepared.tickets.clone().or(inherited.tickets.map(Arc::new)) {
            Some(t) => t,
            None => match tickets::Tickets::random() {
                Ok(t) => Arc::new(t),
                Err(e) => return fail(&mut ready, &e.to_string()),
            },
        };
        // The socket draining generations hand requests on through.
        let forward = match crate::sys::forward::ForwardSocket::open(
            inherited.forward,
            inherited.forward_newest,
        ) {
            Ok(f) => Some(Arc::new(f)),
            Err(e) => {
                tracing::warn!("no forward socket: a busy HTTP/2 connection gets its GOAWAY when a restart drains it: {e}", e = logging::Chain(&e));
                None
            }
        };
        let spawner = |role| spawn::Spawner {
            exe,
            argv: std::env::args_os().collect(),
            config_path: config_path.clone(),
            services: self.services.clone(),
            reaper,
            role,
            tickets: tickets.clone(),
            links: None,
            forward: forward.clone(),
        };
        // A process handed its sockets by a gracesrv parent is a generation
        // (or a worker), never a supervisor itself.
        let supervisor = inherited.supervisor;
        let config = &prepared.config;
        // With apps, the supervisor owns their processes: it runs supervised.
        let supervised = self.supervise || config.supervise || !config.apps.is_empty();
        if supervised && ready.is_none() && supervisor.is_none() {
            let restart = restart::Restart::new(spawner(spawn::Role::Worker(std::process::id())));
            return supervisor::run(restart, prepared.config, inherited.sockets, signals)
                .instrument(span)
                .await;
        }
        let started = {
            let _enter = span.enter();
            // What this generation loads, for `watch` to compare changes with.
            let watched = (config.watch && supervisor.is_none())
                .then(|| config.watched_files())
                .map(|files| (watch::fingerprint(&files), files));
            let mut gen = match generation::Generation::start(
                prepared,
                inherited.sockets,
                generation,
                generation::Handed {
                    tickets: tickets.clone(),
                    // A new generation of a self-restarting server counts its
                    // restart; a supervisor counts its workers' restarts.
                    metrics: Some((
                        inherited.metrics.clone(),
                        generation > 1 && supervisor.is_none(),
                    )),
                    upstreams: inherited.upstreams.as_deref(),
                    forward: forward.clone(),
                },
                span.clone(),
            ) {
                Ok(g) => g,
                Err(e) => {
                    tracing::error!("cannot start: {e}", e = logging::Chain(&e));
                    successor::report_error(ready.take(), &e.to_string());
                    return 1;
                }
            };
            if let Some(link) = inherited.apps_link {
                gen.process.apps.follow(link, gen.config.shutdown_timeout);
            }
            // The control socket before READY: a `reload` that reads the
            // new pid file finds it listening.
            if supervisor.is_none() {
                reload::serve_control(&config_path);
            }
            gen.report_ready(ready.take(), supervisor.is_some());
            if let Some(s) = supervisor {
                successor::serving_under_supervisor(s);
            }
            let mut predecessors = inherited.draining;
            predecessors.enforce(gen.config.max_draining);
            if let Some(m) = &gen.process.metrics {
                *m.predecessors.lock().unwrap_or_else(|p| p.into_inner()) =
                    predecessors.list().to_vec();
            }
            tracing::info!(version = env!("CARGO_PKG_VERSION"), "ready");
            self.hooks.ready();
            let watch =
                watched.and_then(|(loaded, files)| match watch::Watch::start(files, loaded) {
                    Ok(w) => Some(w),
                    Err(e) => {
                        tracing::error!(
                            "cannot watch files, restart with HUP instead: {e}",
                            e = logging::Chain(&e)
                        );
                        None
                    }
                });
            (gen, watch, predecessors)
        };
        let (gen, watch, predecessors) = started;
        let restart = restart::Restart::new(spawner(spawn::Role::Generation));
        let limit = gen.config.shutdown_timeout;
        let code = run::control(
            gen,
            restart,
            signals,
            watch,
            predecessors,
            supervisor,
            &self.hooks,
        )
        .instrument(span.clone())
        .await;
        self.hooks.exit(limit).instrument(span).await;
        access_log::flush_all();
        code
    }
}

/// `gracesrv check`: validates the config and everything it names
/// (certificates and keys loaded, static roots and upstreams checked).
/// Returns the summary to print, or the error, which names file, line and
/// column.
///
/// ```no_run
/// match gracesrv::check(std::path::Path::new("server.yaml")) {
///     Ok(summary) => print!("{summary}"),
///     Err(e) => eprintln!("{e}"),
/// }
/// ```
pub fn check(config: &std::path::Path) -> Result<String, ConfigError> {
    let path = config::absolute(config);
    prepare::prepare(&path, &HashMap::new()).map(|p| prepare::summary(&p))
}

/// `gracesrv reload`: restarts the server running on `config` (found through
/// its control socket, or the config's `pid_file`) and waits for the
/// outcome: what to tell a person once the new generation is ready, or why
/// not (the config, no server running, the restart failed).
///
/// ```no_run
/// match gracesrv::reload(std::path::Path::new("server.yaml")) {
///     Ok(done) => println!("{done}"),
///     Err(gracesrv::ControlError::NotRunning(why)) => eprintln!("not running: {why}"),
///     Err(e) => eprintln!("{e}"),
/// }
/// ```
pub fn reload(config: &std::path::Path) -> Result<String, ControlError> {
    reload::reload(config)
}

/// `gracesrv deploy -c FILE APP`: deploys a new instance of an app of the
/// running service (see SPEC section 7) and waits until it serves.
pub fn deploy(config: &std::path::Path, app: &str) -> Result<String, ControlError> {
    deploy::deploy(config, app, apps::How::Switch)
}

/// How [`deploy_as`] deploys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deploy {
    /// As [`deploy`]: the new instance takes everything once it is ready.
    Switch,
    /// `--canary`: the new instance takes a share of the requests in the
    /// app's `canary.steps`, compared with the old one at each step, and is
    /// promoted or rolled back by itself (docs/apps.md).
    Canary,
    /// `--abort`: rolls the canary deploy under way back.
    Abort,
    /// `--promote`: the canary deploy under way takes everything now.
    Promote,
}

/// `gracesrv deploy -c FILE APP [--canary | --abort | --promote]`: waits
/// until the deploy ends; `Err` if it failed or was rolled back.
pub fn deploy_as(config: &std::path::Path, app: &str, how: Deploy) -> Result<String, ControlError> {
    let how = match how {
        Deploy::Switch => apps::How::Switch,
        Deploy::Canary => apps::How::Canary,
        Deploy::Abort => apps::How::Abort,
        Deploy::Promote => apps::How::Promote,
    };
    deploy::deploy(config, app, how)
}
