//! Applications behind gracesrv (`apps:`, `proxy: { app }`,
//! `gracesrv deploy`), deployed with zero downtime.
//!
//! The supervisor owns the application processes; the workers proxy to
//! them. Between the two runs a [`link`] per worker.
//!
//! - Supervisor side: one task per app ([`runner`]) starts instances
//!   ([`instance`]: the process, its socket, its readiness check, its
//!   stop), switches the workers to a new instance once it is ready, and
//!   stops the old one only when every worker says nothing of it is in
//!   flight there ([`links`]). An instance that dies is replaced with
//!   back-off; a new version that fails leaves the old one serving.
//! - Worker side: the [`table`] of instances `proxy: { app }` routes send
//!   to, counting what is in flight on each.

pub(crate) mod figures;
pub(crate) mod link;
pub(crate) mod table;

pub(crate) use table::{InFlight, Table};

mod instance;
mod links;
mod runner;

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use crate::config::{AppConfig, Config};
use crate::sys::reaper::Reaper;
pub(crate) use links::Links;
pub(crate) use runner::{How, Outcome, PROBATION};

/// The supervisor's apps: a runner task per app of the config.
pub(crate) struct Apps {
    runners: HashMap<String, Runner>,
    pub(crate) links: Links,
    reaper: Reaper,
}

struct Runner {
    commands: mpsc::UnboundedSender<runner::Command>,
    task: tokio::task::JoinHandle<()>,
}

impl Apps {
    /// Starts every app of `config` (each its first instance).
    pub(crate) fn start(config: &Config, reaper: Reaper) -> Apps {
        let mut apps = Apps {
            runners: HashMap::new(),
            links: Links::default(),
            reaper,
        };
        for app in &config.apps {
            apps.run(app.clone(), config.shutdown_timeout);
        }
        apps
    }

    fn run(&mut self, app: AppConfig, shutdown_timeout: Duration) {
        let (commands, rx) = mpsc::unbounded_channel();
        let span = tracing::info_span!("app", app = %app.name);
        let name = app.name.clone();
        let task = tokio::spawn(
            runner::run(
                app,
                shutdown_timeout,
                self.links.clone(),
                self.reaper.clone(),
                rx,
            )
            .instrument(span),
        );
        self.runners.insert(name, Runner { commands, task });
    }

    /// A restart brought a new config: new apps start, changed ones are
    /// deployed, removed ones are retired and stopped. Unchanged apps are
    /// left alone.
    pub(crate) fn apply(&mut self, config: &Config) {
        for app in &config.apps {
            match self.runners.get(&app.name) {
                Some(r) => {
                    let _ = r.commands.send(runner::Command::Define {
                        app: Box::new(app.clone()),
                        shutdown_timeout: config.shutdown_timeout,
                        reply: None,
                        how: How::Switch,
                    });
                }
                None => {
                    tracing::info!(app = %app.name, "a new app: starting it");
                    self.run(app.clone(), config.shutdown_timeout);
                }
            }
        }
        let removed: Vec<String> = self
            .runners
            .keys()
            .filter(|n| !config.apps.iter().any(|a| &a.name == *n))
            .cloned()
            .collect();
        for name in removed {
            tracing::info!(app = %name, "app removed from the config: stopping it");
            if let Some(r) = self.runners.remove(&name) {
                let (done, _) = oneshot::channel();
                let _ = r.commands.send(runner::Command::Stop(done));
            }
            self.links.forget(&name);
        }
    }

    /// `gracesrv deploy`: deploys `app` as `config` (read now) defines it.
    pub(crate) fn deploy(
        &self,
        app: &AppConfig,
        shutdown_timeout: Duration,
        how: How,
    ) -> oneshot::Receiver<Outcome> {
        let (reply, rx) = oneshot::channel();
        match self.runners.get(&app.name) {
            Some(r) => {
                let _ = r.commands.send(runner::Command::Define {
                    app: Box::new(app.clone()),
                    shutdown_timeout,
                    reply: Some(reply),
                    how,
                });
            }
            None => {
                let _ = reply.send(Err(format!(
                    "app {:?} is not running: reload gracesrv to start it",
                    app.name
                )));
            }
        }
        rx
    }

    /// Stops every app: retired (the workers are gone by now, so at once),
    /// then `stop_signal`, then SIGKILL after `stop_timeout`.
    pub(crate) async fn stop(&mut self) {
        let mut waits = Vec::new();
        for (_, r) in self.runners.drain() {
            let (done, rx) = oneshot::channel();
            let _ = r.commands.send(runner::Command::Stop(done));
            waits.push((rx, r.task));
        }
        for (rx, task) in waits {
            let _ = rx.await;
            let _ = task.await;
        }
    }
}
