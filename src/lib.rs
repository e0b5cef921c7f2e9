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
//! use hyper::{body::{Bytes, Incoming}, Request, Response};
//!
//! let hello = tower::service_fn(|_req: Request<Incoming>| async {
//!     Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("hello\n"))))
//! });
//! let code = gracesrv::Server::new("app.yaml").service("web", hello).run();
//! std::process::exit(code);
//! ```
//!
//! Layout: [`config`] (what the user asked for) → [`listeners`] and
//! [`handoff`] (sockets across exec) → [`tls`] → [`serve`] (connections) →
//! [`routes`]. [`restart`] is the state machine, [`signals`] what triggers it.

#![deny(unsafe_code)]

pub mod body;
pub mod config;
pub mod connection;
pub mod context;
pub mod drain;
pub mod files;
pub mod generation;
#[allow(unsafe_code)]
pub mod handoff;
pub mod limits;
pub mod listeners;
pub mod logging;
pub mod predecessors;
pub mod prepare;
pub mod proxy;
pub mod reaper;
pub mod reload;
pub mod restart;
pub mod routes;
pub mod serve;
pub mod service;
pub mod signals;
pub mod successor;
pub mod supervisor;
pub mod tls;
pub mod tunnel;
pub mod watch;

use std::collections::HashMap;
use std::path::PathBuf;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;

pub use body::{Body, BoxError};
pub use config::{Config, ConfigError};
pub use context::Peer;
pub use service::Handler;

/// A gracesrv server: a config file, and optionally an application's own
/// services for some of its listeners.
pub struct Server {
    config: PathBuf,
    apps: HashMap<String, Handler>,
    supervise: bool,
}

impl Server {
    /// A server for the config at `config`.
    pub fn new(config: impl Into<PathBuf>) -> Server {
        Server {
            config: config.into(),
            apps: HashMap::new(),
            supervise: false,
        }
    }

    /// Runs under a supervisor whose pid never changes (as `--supervise`, or
    /// `supervise: true` in the config): restarts replace worker processes.
    pub fn supervise(mut self, yes: bool) -> Server {
        self.supervise = yes;
        self
    }

    /// Serves `svc` on the listener named `listener` instead of its routes.
    /// Anything implementing tower's `Service` works (an axum `Router` too).
    pub fn service<S, B>(mut self, listener: &str, svc: S) -> Server
    where
        S: tower::Service<Request<Incoming>, Response = Response<B>>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        self.apps.insert(listener.to_string(), Handler::app(svc));
        self
    }

    /// Runs the server in the foreground until it is stopped (or, after a
    /// restart, until this generation has drained). Returns the exit code:
    /// 0 after a clean stop, 1 if it could not start.
    pub fn run(self) -> i32 {
        // Before any thread exists: the handoff variables are read and
        // removed from the environment.
        let inherited = match successor::Inherited::from_env() {
            Ok(i) => i,
            Err(e) => {
                eprintln!("gracesrv: {e}");
                return 1;
            }
        };
        let generation = inherited.generation;
        let mut ready = inherited.ready;
        let fail = |ready: &mut Option<std::os::fd::OwnedFd>, msg: &str| {
            successor::report_error(ready.take(), msg);
            eprintln!("gracesrv: {msg}");
            1
        };
        let exe = match std::env::current_exe() {
            Ok(p) => p,
            Err(e) => return fail(&mut ready, &format!("cannot find my own executable: {e}")),
        };
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => return fail(&mut ready, &format!("cannot start runtime: {e}")),
        };
        let _rt = rt.enter();
        // Handlers first, so a HUP during start is held, not fatal.
        let signals = match signals::Signals::install() {
            Ok(s) => s,
            Err(e) => return fail(&mut ready, &format!("cannot install signal handlers: {e}")),
        };
        handoff::unblock_hup();
        // Every child is reaped by one SIGCHLD handler (also orphans, as PID 1).
        let reaper = match reaper::Reaper::start() {
            Ok(r) => r,
            Err(e) => return fail(&mut ready, &format!("cannot install SIGCHLD handler: {e}")),
        };

        let config_path = config::absolute(&self.config);
        let config = match Config::load(&config_path) {
            Ok(c) => c,
            Err(e) => return fail(&mut ready, &e.to_string()),
        };
        let span = logging::init(&config.log, generation);
        let _enter = span.clone().entered();
        // A process handed its sockets by a gracesrv parent is a generation
        // (or a worker), never a supervisor itself.
        let supervisor = inherited.supervisor;
        if (self.supervise || config.supervise) && ready.is_none() && supervisor.is_none() {
            if let Err(e) = prepare::prepare_config(config.clone(), &self.apps) {
                return fail(&mut ready, &e.to_string());
            }
            let restart = restart::Restart::new(restart::Spawner {
                exe,
                argv: std::env::args_os().collect(),
                config_path,
                apps: self.apps,
                reaper,
                role: restart::Role::Worker(std::process::id()),
            });
            return rt.block_on(supervisor::run(restart, config, inherited.sockets, signals));
        }
        // What this generation loads, for `watch` to compare changes with.
        let watched = (config.watch && supervisor.is_none())
            .then(|| config.watched_files())
            .map(|files| (watch::fingerprint(&files), files));
        let prepared = match prepare::prepare_config(config, &self.apps) {
            Ok(p) => p,
            Err(e) => return fail(&mut ready, &e.to_string()),
        };
        let mut gen =
            match generation::Generation::start(prepared, inherited.sockets, generation, span) {
                Ok(g) => g,
                Err(e) => {
                    tracing::error!("cannot start: {e}");
                    successor::report_error(ready.take(), &e);
                    return 1;
                }
            };
        gen.report_ready(ready.take(), supervisor.is_some());
        match supervisor {
            Some(s) => successor::serving_under_supervisor(s),
            None => reload::serve_control(&config_path),
        }
        let mut predecessors = inherited.draining;
        predecessors.enforce(gen.config.max_draining);
        tracing::info!(version = env!("CARGO_PKG_VERSION"), "ready");
        let watch = watched.and_then(|(loaded, files)| match watch::Watch::start(files, loaded) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::error!("cannot watch files, restart with HUP instead: {e}");
                None
            }
        });
        let restart = restart::Restart::new(restart::Spawner {
            exe,
            argv: std::env::args_os().collect(),
            config_path,
            apps: self.apps,
            reaper,
            role: restart::Role::Generation,
        });
        rt.block_on(restart::control(
            gen,
            restart,
            signals,
            watch,
            predecessors,
            supervisor,
        ))
    }
}

/// `gracesrv check`: validates the config and everything it names.
/// Returns the summary to print, or the error.
pub fn check(config: &std::path::Path) -> Result<String, ConfigError> {
    let path = config::absolute(config);
    prepare::prepare(&path, &HashMap::new()).map(|p| prepare::summary(&p))
}
