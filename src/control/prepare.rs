//! Everything `gracesrv check` does, which is also what an old generation does
//! before it spawns a new one (SPEC 4.2) and what a new one does at start:
//! parse the config, load every certificate and key, build every route.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use crate::config::{Config, ConfigError};
use crate::http::routes::Router;
use crate::http::service::Handler;
use crate::observe::logging::Chain;

/// A config with everything it names loaded and checked.
pub(crate) struct Prepared {
    pub(crate) config: Config,
    /// The ticket secret from `tls_tickets.key_file`, if the config has one.
    pub(crate) tickets: Option<Arc<crate::tls::tickets::Tickets>>,
    /// Per listener, in config order.
    pub(crate) listeners: Vec<PreparedListener>,
}

pub(crate) struct PreparedListener {
    pub(crate) tls: Option<Arc<rustls::ServerConfig>>,
    pub(crate) handler: Handler,
}

/// Loads and checks `path`. Listeners named in `services` serve the embedding application's
/// service instead of their routes; every one must exist in the config.
pub(crate) fn prepare(
    path: &Path,
    services: &HashMap<String, Handler>,
) -> Result<Prepared, ConfigError> {
    prepare_config(Config::load(path)?, services)
}

/// Like [`prepare`], for a config already parsed.
pub(crate) fn prepare_config(
    config: Config,
    services: &HashMap<String, Handler>,
) -> Result<Prepared, ConfigError> {
    for name in services.keys() {
        if !config.listeners.iter().any(|l| &l.name == name) {
            return Err(ConfigError::new(
                &config.path,
                None,
                format!(
                    "the application serves listener {name:?}, which the config does not define"
                ),
            ));
        }
    }
    let mut listeners = Vec::new();
    for l in &config.listeners {
        let tls = match &l.tls {
            Some(t) => Some(crate::tls::server_config(
                &config.path,
                t,
                config.acme.as_ref(),
            )?),
            None => None,
        };
        let router = Router::new(&config.path, l, config.acme.as_ref())?;
        let handler = match services.get(&l.name) {
            Some(h) => h.clone(),
            None => Handler::Routes(Arc::new(router)),
        };
        listeners.push(PreparedListener { tls, handler });
    }
    for (i, app) in config.apps.iter().enumerate() {
        app.resolve_program().map_err(|e| {
            ConfigError::new(
                &config.path,
                Some(app.pos),
                format!("apps[{i}].command: {e}"),
            )
        })?;
        if !app.dir.is_dir() {
            return Err(ConfigError::new(
                &config.path,
                Some(app.pos),
                format!("apps[{i}].dir: {} is not a directory", app.dir.display()),
            ));
        }
    }
    if let Some(f) = config.acme.as_ref().and_then(|a| a.ca_roots.as_ref()) {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::CertificateDer::from_pem_file(&f.path).map_err(|e| {
            ConfigError::new(
                &config.path,
                Some(f.pos),
                format!("{}: {}: {e}", f.key, f.written, e = Chain(&e)),
            )
        })?;
    }
    for f in config.store_files() {
        let bytes = std::fs::read(&f.path).map_err(|e| {
            ConfigError::new(
                &config.path,
                Some(f.pos),
                format!("{}: cannot read {}: {e}", f.key, f.written, e = Chain(&e)),
            )
        })?;
        if f.key.ends_with("storage_key_file") {
            crate::store::seal::Sealer::from_key_file(&bytes).map_err(|e| {
                ConfigError::new(
                    &config.path,
                    Some(f.pos),
                    format!("{}: {} {e}", f.key, f.written),
                )
            })?;
        }
    }
    let tickets = match &config.tls_tickets {
        Some(crate::config::TicketsConfig::KeyFile(f)) => {
            let bytes = std::fs::read(&f.path).map_err(|e| {
                let what = if e.kind() == std::io::ErrorKind::NotFound {
                    format!("no such file {}", f.written)
                } else {
                    format!("cannot read {}: {e}", f.written, e = Chain(&e))
                };
                ConfigError::new(&config.path, Some(f.pos), format!("{}: {what}", f.key))
            })?;
            let t = crate::tls::tickets::Tickets::from_key_file(&bytes).map_err(|e| {
                ConfigError::new(
                    &config.path,
                    Some(f.pos),
                    format!("{}: {} {e}", f.key, f.written, e = Chain(&e)),
                )
            })?;
            Some(Arc::new(t))
        }
        _ => None,
    };
    Ok(Prepared {
        config,
        tickets,
        listeners,
    })
}

/// The one-screen summary `gracesrv check` prints.
pub(crate) fn summary(p: &Prepared) -> String {
    let c = &p.config;
    let mut out = format!("{}: ok\n", c.path.display());
    for (l, prepared) in c.listeners.iter().zip(&p.listeners) {
        let scheme = if l.tls.is_some() { "https" } else { "http" };
        let h3 = if l.http3 { " + HTTP/3 (UDP)" } else { "" };
        out += &format!("  {:<16} {scheme}://{}{h3}  routes: ", l.name, l.addr);
        let routes: Vec<String> = l
            .routes
            .iter()
            .map(|r| {
                let kind = match r.action {
                    crate::config::Action::Respond { .. } => "respond",
                    crate::config::Action::Static { .. } => "static",
                    crate::config::Action::Redirect { .. } => "redirect",
                    crate::config::Action::Status => "status",
                    crate::config::Action::Metrics => "metrics",
                    crate::config::Action::Proxy(_) => "proxy",
                };
                format!("{} {kind}", r.path)
            })
            .collect();
        out += &if routes.is_empty() {
            "(none)".to_string()
        } else {
            routes.join(", ")
        };
        out.push('\n');
        if let Some(t) = &l.tls {
            out += &format!("  {:<16} cert {}", "", t.cert.written);
            if !t.sni.is_empty() {
                out += &format!(" (+{} by SNI)", t.sni.len());
            }
            out += &format!(", alpn {}\n", t.alpn.join(","));
        }
        for r in &l.routes {
            let is_static = matches!(r.action, crate::config::Action::Static { .. });
            let mut options = r.options.summary(is_static);
            if let crate::config::Action::Static {
                fallback,
                browse,
                file_cache,
                ..
            } = &r.action
            {
                if let Some(f) = fallback {
                    options.push(format!("fallback {f}"));
                }
                if *browse {
                    options.push("browse".into());
                }
                if !file_cache {
                    options.push("file_cache off".into());
                }
            }
            if !options.is_empty() {
                out += &format!("  {:<16} {}: {}\n", "", r.path, options.join("; "));
            }
        }
        if let Handler::Routes(r) = &prepared.handler {
            for proxy in r.proxies() {
                out += &format!("  {:<16} proxy {}\n", "", proxy.summary());
            }
        }
    }
    for a in &c.apps {
        let socket = match a.socket {
            crate::config::AppSocket::Fd => "fd 3",
            crate::config::AppSocket::Port => "PORT",
        };
        out += &format!(
            "  app {:<12} {}  (socket: {socket})\n",
            a.name,
            a.command.join(" ")
        );
    }
    if let Some(a) = &c.acme {
        out += &match &a.shared {
            Some(s) => format!(
                "  acme             {}, shared through {} (this host's copy: {}{})\n",
                a.directory,
                s.shown,
                a.storage.display(),
                if s.key_file.is_some() { "; sealed" } else { "" }
            ),
            None => format!(
                "  acme             {}, storage {}\n",
                a.directory,
                a.storage.display()
            ),
        };
    }
    match &c.tls_tickets {
        Some(crate::config::TicketsConfig::Store(s)) => {
            out += &format!("  tls_tickets      shared through {}\n", s.shown);
        }
        Some(crate::config::TicketsConfig::KeyFile(f)) => {
            out += &format!("  tls_tickets      key file {}\n", f.written);
        }
        None => {}
    }
    out += &format!(
        "  shutdown_timeout {:?}, startup_timeout {:?}, max_connections {}, watch {}\n",
        c.shutdown_timeout, c.startup_timeout, c.max_connections, c.watch
    );
    out
}
