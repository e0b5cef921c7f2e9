//! What the user asked for: the YAML config file, parsed and validated.
//!
//! Parsing happens in two steps. serde-saphyr turns the text into the `raw`
//! types below, which keep the position of every value that a later check may
//! reject (`Spanned`). `validate` then turns them into [`Config`], whose values
//! are known to be usable: durations parsed, paths resolved against the
//! config's directory, names unique, one action per route. Every error names
//! `FILE:LINE:COL` where a position is known.
//!
//! Files the config names (certificates, static roots) are checked by
//! [`crate::check`], which also loads them; this module only resolves paths.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::Spanned;

pub(crate) use options::{
    BasicAuthConfig, Cache, CompressConfig, CompressLevel, Encoding, RateLimitConfig, RouteOptions,
};

/// A position in the config file, 1-based.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Pos {
    pub(crate) line: u64,
    pub(crate) col: u64,
}

impl<T> From<&Spanned<T>> for Pos {
    fn from(s: &Spanned<T>) -> Self {
        Pos {
            line: s.referenced.line(),
            col: s.referenced.column(),
        }
    }
}

/// A config error: the file, where in it (when known), and what is wrong.
/// It prints as `FILE:LINE:COL: message`.
///
/// ```
/// let e = gracesrv::Config::parse(std::path::Path::new("/etc/g.yaml"), "listeners: [\n")
///     .unwrap_err();
/// assert!(e.to_string().starts_with("/etc/g.yaml:1:"), "{e}");
/// ```
#[derive(Debug, Clone)]
pub struct ConfigError {
    pub(crate) file: PathBuf,
    pub(crate) pos: Option<Pos>,
    pub(crate) message: String,
}

impl ConfigError {
    pub(crate) fn new(file: &Path, pos: Option<Pos>, message: impl Into<String>) -> Self {
        ConfigError {
            file: file.to_path_buf(),
            pos: pos.filter(|p| p.line > 0),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.pos {
            Some(p) => write!(
                f,
                "{}:{}:{}: {}",
                self.file.display(),
                p.line,
                p.col,
                self.message
            ),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// The validated configuration of one generation.
#[derive(Debug, Clone)]
pub struct Config {
    /// Absolute path of the config file.
    pub(crate) path: PathBuf,
    pub(crate) pid_file: Option<PathBuf>,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) startup_timeout: Duration,
    pub(crate) watch: bool,
    /// Run under a supervisor whose pid never changes (`--supervise`).
    pub(crate) supervise: bool,
    pub(crate) log: LogConfig,
    pub(crate) timeouts: Timeouts,
    pub(crate) max_connections: usize,
    /// Old generations that may drain at once; a restart past it stops the oldest.
    pub(crate) max_draining: usize,
    /// `limits.max_headers`: header fields an HTTP/1.x request may carry
    /// (the 64 KiB head limit holds beside it).
    pub(crate) max_headers: usize,
    /// `tls_tickets:`: where the TLS session ticket keys of a fleet come
    /// from (see `tickets`).
    pub(crate) tls_tickets: Option<TicketsConfig>,
    /// `acme:`: how certificates are obtained for `tls: { acme: [...] }`.
    pub(crate) acme: Option<AcmeConfig>,
    /// `apps:`: application processes the supervisor runs (see `apps`).
    pub(crate) apps: Vec<AppConfig>,
    pub(crate) listeners: Vec<ListenerConfig>,
}

/// One application of `apps:`: how to run it, hand it a socket, see that it
/// is ready and stop it.
#[derive(Debug, Clone)]
pub(crate) struct AppConfig {
    pub(crate) name: String,
    /// The program, resolved (on `PATH`, or against `dir`), then its
    /// arguments as written.
    pub(crate) program: PathBuf,
    pub(crate) command: Vec<String>,
    /// The working directory: `dir`, or the config's directory.
    pub(crate) dir: PathBuf,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) socket: AppSocket,
    pub(crate) ready: AppReady,
    pub(crate) start_timeout: Duration,
    pub(crate) stop_signal: nix::sys::signal::Signal,
    pub(crate) stop_timeout: Duration,
    /// Files whose change redeploys the app.
    pub(crate) watch: Vec<PathBuf>,
    /// How `gracesrv deploy --canary` goes (the defaults without one).
    /// Not part of the definition: changing it deploys nothing.
    pub(crate) canary: Canary,
    pub(crate) pos: Pos,
}

/// A progressive deploy's steps and limits (`apps[].canary`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Canary {
    /// The new version's share of the requests at each step, in percent,
    /// rising, the last 100.
    pub(crate) steps: Vec<u32>,
    /// How long each step lasts.
    pub(crate) step: Duration,
    /// How much more of its answers may be errors (5xx, or no answer) than
    /// the old version's, as a fraction (0.01 is one percentage point).
    pub(crate) max_error_increase: f64,
    /// How much slower its 99th percentile may be, as a ratio.
    pub(crate) max_p99_ratio: f64,
    /// The requests the new version must have answered in a step before
    /// it is judged.
    pub(crate) min_requests: u64,
}

impl Default for Canary {
    fn default() -> Canary {
        Canary {
            steps: vec![5, 25, 50, 100],
            step: Duration::from_secs(30),
            max_error_increase: 0.01,
            max_p99_ratio: 1.5,
            min_requests: 100,
        }
    }
}

/// A definition is the same when everything but its place in the file is:
/// an app whose definition did not change is left alone by a restart.
impl PartialEq for AppConfig {
    fn eq(&self, o: &Self) -> bool {
        (
            &self.name,
            &self.program,
            &self.command,
            &self.dir,
            &self.env,
            self.socket,
            &self.ready,
        ) == (
            &o.name, &o.program, &o.command, &o.dir, &o.env, o.socket, &o.ready,
        ) && (
            self.start_timeout,
            self.stop_signal,
            self.stop_timeout,
            &self.watch,
        ) == (o.start_timeout, o.stop_signal, o.stop_timeout, &o.watch)
    }
}

/// How an instance gets its socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AppSocket {
    /// gracesrv binds a fresh 127.0.0.1 socket per instance and passes it
    /// at fd 3 (`LISTEN_FDS=1`, `LISTEN_FDNAMES=<app>`).
    Fd,
    /// gracesrv picks a free port and passes `PORT=<n>`; the app binds it.
    Port,
}

/// When an instance counts as ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AppReady {
    /// `GET path` answers 2xx or 3xx.
    Http(String),
    /// No `ready:`: it answers an HTTP request at all (any status).
    Answers,
    /// It sends `READY=1` to `NOTIFY_SOCKET`.
    Notify,
}

/// `access_log:` (top level, or a listener's own).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct AccessLogConfig {
    /// `None`: standard error.
    pub(crate) path: Option<PathBuf>,
    pub(crate) format: AccessLogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum AccessLogFormat {
    /// One JSON object a line.
    Json,
    /// The combined format nginx and Apache write.
    Combined,
}

/// Which ACME challenge proves control of a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Challenge {
    /// RFC 8737: answered by the TLS listener itself (ALPN `acme-tls/1`).
    TlsAlpn01,
    /// Answered on the plain listeners under `/.well-known/acme-challenge/`.
    Http01,
}

/// Where a fleet's ticket keys come from (`tls_tickets:`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TicketsConfig {
    /// `key_file`: the secret is the file's SHA-256, the same on every
    /// machine given the file.
    KeyFile(FileRef),
    /// `storage`: the keys are in the store, rotated by whoever comes first.
    Store(Box<StoreConfig>),
}

/// A store a fleet shares (`acme.storage` or `tls_tickets.storage` given
/// as `redis://` or `rediss://`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StoreConfig {
    /// The URL as written (password included): for the client only.
    pub(crate) url: String,
    /// The URL without its password: for logs and `status`.
    pub(crate) shown: String,
    /// `storage_ca`: the roots a `rediss://` server is verified with (the
    /// system's without it).
    pub(crate) ca: Option<FileRef>,
    /// `storage_key_file`: values are sealed with a key derived from it.
    pub(crate) key_file: Option<FileRef>,
    /// `redis+sentinel://`: the master is found through these Sentinels.
    pub(crate) sentinel: Option<SentinelUrl>,
}

/// `redis+sentinel://[user:pass@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SentinelUrl {
    /// Each Sentinel, as `redis://HOST:PORT`.
    pub(crate) sentinels: Vec<String>,
    /// The name the Sentinels know the master by.
    pub(crate) service: String,
    pub(crate) db: i64,
    /// For the master (the Sentinels are asked without).
    pub(crate) user: Option<String>,
    pub(crate) password: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AcmeConfig {
    pub(crate) directory: String,
    pub(crate) email: Option<String>,
    /// Account key, certificates, keys, challenges, the lock; with a
    /// `shared` store, this host's copy of what it serves (`acme.cache`).
    pub(crate) storage: PathBuf,
    /// `storage: redis://...`: what the fleet shares, and the order lock.
    pub(crate) shared: Option<StoreConfig>,
    /// How long the order lock outlives a holder that stopped renewing it.
    pub(crate) lock_ttl: Duration,
    /// Extra roots to trust the directory with (test CAs).
    pub(crate) ca_roots: Option<FileRef>,
    pub(crate) challenge: Challenge,
    pub(crate) renew_before: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LogConfig {
    pub(crate) level: String,
    pub(crate) format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

/// Per-connection timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Timeouts {
    /// To receive a complete request head.
    pub(crate) header: Duration,
    /// Keep-alive idle: no request in flight.
    pub(crate) idle: Duration,
    /// TLS handshake.
    pub(crate) handshake: Duration,
    /// A response that makes no progress this long (the client stopped
    /// reading, or holds an HTTP/2 connection shut with flow control) is cut.
    pub(crate) send: Duration,
    /// While draining, an HTTP/1.x connection with no request in flight is
    /// closed after this.
    pub(crate) draining_idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            header: Duration::from_secs(10),
            idle: Duration::from_secs(60),
            handshake: Duration::from_secs(10),
            send: Duration::from_secs(60),
            draining_idle: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct ListenerConfig {
    /// The key a socket keeps across restarts.
    pub(crate) name: String,
    pub(crate) addr: SocketAddr,
    pub(crate) tls: Option<TlsConfig>,
    /// Also serve HTTP/3 on a UDP socket at the same address (`src/quic/`).
    pub(crate) http3: bool,
    /// Where this listener's requests are logged: its own `access_log`, or
    /// the top-level one.
    pub(crate) access_log: Option<AccessLogConfig>,
    pub(crate) routes: Vec<RouteConfig>,
    /// Proxies whose forwarding headers name the client (`allow`, `deny`).
    pub(crate) trusted_proxies: Vec<ipnet::IpNet>,
}

#[derive(Debug, Clone)]
pub(crate) struct TlsConfig {
    /// The certificate chain and key; for an ACME listener, where the
    /// obtained ones are kept in `acme.storage`.
    pub(crate) cert: FileRef,
    pub(crate) key: FileRef,
    /// Names whose certificate is obtained by ACME (empty: `cert`/`key`
    /// are the user's files).
    pub(crate) acme: Vec<String>,
    pub(crate) sni: Vec<(FileRef, FileRef)>,
    pub(crate) alpn: Vec<String>,
}

/// A path from the config, resolved, with where it was written and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileRef {
    pub(crate) path: PathBuf,
    /// As written in the config, for error messages.
    pub(crate) written: String,
    /// The config key, e.g. `listeners[1].tls.cert`.
    pub(crate) key: String,
    pub(crate) pos: Pos,
}

#[derive(Debug, Clone)]
pub(crate) struct RouteConfig {
    pub(crate) path: String,
    pub(crate) action: Action,
    pub(crate) pos: Pos,
    /// Access control and response rules (the listener's filled in).
    pub(crate) options: RouteOptions,
}

#[derive(Debug, Clone)]
pub(crate) enum Action {
    Respond {
        status: http::StatusCode,
        body: String,
        headers: Vec<(http::HeaderName, http::HeaderValue)>,
        delay: Duration,
    },
    Static {
        root: FileRef,
        index: String,
        /// Served for a missing path without an extension (a single-page app).
        fallback: Option<String>,
        /// A directory without its index is listed.
        browse: bool,
        /// Small files are kept in memory (see `http::files::cache`).
        file_cache: bool,
    },
    Redirect {
        to: String,
        status: http::StatusCode,
    },
    Status,
    /// Prometheus text exposition of the service's metrics.
    Metrics,
    Proxy(Box<ProxyConfig>),
}

/// A `proxy` route: where it sends requests and how.
#[derive(Debug, Clone)]
pub(crate) struct ProxyConfig {
    /// In config order; at least one.
    pub(crate) upstreams: Vec<UpstreamConfig>,
    pub(crate) policy: Policy,
    pub(crate) health: Option<ActiveHealth>,
    pub(crate) passive: Passive,
    /// How long a request waits for an upstream when all are out.
    pub(crate) try_duration: Duration,
    pub(crate) tls: UpstreamTls,
    pub(crate) protocol: UpstreamProtocol,
    pub(crate) request_headers: HeaderRules,
    pub(crate) response_headers: HeaderRules,
    pub(crate) host: HostRule,
    pub(crate) connect_timeout: Duration,
    pub(crate) timeout: Duration,
    pub(crate) strip_prefix: bool,
    /// Largest request body forwarded; larger ones get 413.
    pub(crate) max_body: Option<u64>,
}

/// One upstream of a proxy route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UpstreamConfig {
    pub(crate) target: ProxyTarget,
    pub(crate) weight: u32,
}

/// Where a proxy route sends requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ProxyTarget {
    /// `http://host:port` or `https://host:port`.
    Upstream(http::Uri),
    /// `app: NAME`: the serving instance of an application of `apps:`.
    App(String),
}

impl fmt::Display for ProxyTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProxyTarget::Upstream(uri) => {
                let s = uri.to_string();
                f.write_str(s.strip_suffix('/').unwrap_or(&s))
            }
            ProxyTarget::App(app) => write!(f, "app {app}"),
        }
    }
}

/// How a proxy route picks an upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Policy {
    RoundRobin,
    LeastConn,
    /// The less busy of two picked at random (power of two choices).
    RandomTwo,
    /// Consistent hashing on a key of the request.
    Hash(HashKey),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HashKey {
    /// The client's address.
    Remote,
    Header(http::HeaderName),
    Cookie(String),
}

/// `proxy.health`: an active check of every URL upstream.
#[derive(Debug, Clone)]
pub(crate) struct ActiveHealth {
    pub(crate) path: String,
    pub(crate) interval: Duration,
    pub(crate) timeout: Duration,
    pub(crate) expect_status: u16,
}

/// `proxy.passive`.
#[derive(Debug, Clone)]
pub(crate) struct Passive {
    pub(crate) max_fails: u32,
    pub(crate) fail_window: Duration,
    pub(crate) fail_timeout: Duration,
    pub(crate) unhealthy_status: Vec<u16>,
}

/// `proxy.tls` (and `tls_insecure_skip_verify`).
#[derive(Debug, Clone, Default)]
pub(crate) struct UpstreamTls {
    /// Trusted instead of the system's roots.
    pub(crate) ca: Option<FileRef>,
    /// A client certificate and key (mTLS).
    pub(crate) client: Option<(FileRef, FileRef)>,
    pub(crate) server_name: Option<String>,
    pub(crate) insecure_skip_verify: bool,
}

/// The protocol spoken to upstreams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UpstreamProtocol {
    H1,
    /// HTTP/2 over TLS (ALPN `h2`).
    H2,
    /// HTTP/2 in the clear, with prior knowledge.
    H2c,
}

/// `set`, `add`, `remove` on a message's header fields.
#[derive(Debug, Clone, Default)]
pub(crate) struct HeaderRules {
    pub(crate) set: Vec<(http::HeaderName, Template)>,
    pub(crate) add: Vec<(http::HeaderName, Template)>,
    pub(crate) remove: Vec<http::HeaderName>,
}

impl HeaderRules {
    pub(crate) fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

/// A header value that may name `{host}`, `{remote}` and `{pid}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Template(pub(crate) Vec<Piece>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Piece {
    Text(String),
    Host,
    Remote,
    Pid,
}

/// The `Host` an upstream is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HostRule {
    /// The client's.
    Keep,
    /// The upstream's `host:port`.
    Upstream,
    Fixed(http::HeaderValue),
}

impl Config {
    /// Does any listener serve `metrics: {}`? (Only then are requests
    /// counted by route and status.)
    pub(crate) fn has_metrics(&self) -> bool {
        self.listeners
            .iter()
            .any(|l| l.routes.iter().any(|r| matches!(r.action, Action::Metrics)))
    }

    /// Reads and validates the config file at `path` (what the library's
    /// users get from [`crate::check`]).
    pub(crate) fn load(path: &Path) -> Result<Config, ConfigError> {
        let abs = absolute(path);
        let text = std::fs::read_to_string(&abs)
            .map_err(|e| ConfigError::new(&abs, None, format!("cannot read config: {e}")))?;
        Config::parse(&abs, &text)
    }

    /// Parses and validates `text` as if read from `path` (absolute):
    /// relative paths in it are resolved against `path`'s directory. Files
    /// it names are not read here (see [`crate::check`]).
    ///
    /// ```
    /// let text = "listeners:\n  - name: web\n    addr: 127.0.0.1:8080\n    routes:\n      - path: /\n        status: {}\n";
    /// let config = gracesrv::Config::parse(std::path::Path::new("/etc/g.yaml"), text);
    /// assert!(config.is_ok());
    /// ```
    ///
    /// Public for the fuzzer (`fuzz/`); the config's contents are not.
    #[doc(hidden)]
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw: raw::Config = serde_saphyr::from_str(text).map_err(|e| {
            let pos = e.location().map(|l| Pos {
                line: l.line(),
                col: l.column(),
            });
            ConfigError::new(path, pos, yaml_message(&e))
        })?;
        Validator { file: path }.config(raw)
    }

    /// Every file this config depends on: itself, certificates and keys
    /// (the listeners', and the proxies' upstream CAs and client certificates).
    /// These are what `watch: true` watches.
    /// The files of the shared stores (`storage_key_file`, `storage_ca`).
    pub(crate) fn store_files(&self) -> Vec<&FileRef> {
        let acme = self.acme.as_ref().and_then(|a| a.shared.as_ref());
        let tickets = match &self.tls_tickets {
            Some(TicketsConfig::Store(s)) => Some(&**s),
            _ => None,
        };
        acme.into_iter()
            .chain(tickets)
            .flat_map(|s| s.key_file.iter().chain(&s.ca))
            .collect()
    }

    pub(crate) fn watched_files(&self) -> Vec<PathBuf> {
        let mut files = vec![self.path.clone()];
        if let Some(TicketsConfig::KeyFile(f)) = &self.tls_tickets {
            files.push(f.path.clone());
        }
        files.extend(self.store_files().iter().map(|f| f.path.clone()));
        for l in &self.listeners {
            if let Some(tls) = &l.tls {
                files.push(tls.cert.path.clone());
                files.push(tls.key.path.clone());
                for (c, k) in &tls.sni {
                    files.push(c.path.clone());
                    files.push(k.path.clone());
                }
            }
            // A proxy's upstream CA and client certificate rotate too, and
            // basic_auth's users.
            for r in &l.routes {
                files.extend(
                    r.options
                        .basic_auth
                        .iter()
                        .map(|b| b.users_file.path.clone()),
                );
                if let Action::Proxy(p) = &r.action {
                    files.extend(p.tls.ca.iter().map(|f| f.path.clone()));
                    if let Some((c, k)) = &p.tls.client {
                        files.push(c.path.clone());
                        files.push(k.path.clone());
                    }
                }
            }
        }
        files
    }
}

/// serde-saphyr's message without its own position suffix or snippet; we
/// print the position in front, as `FILE:LINE:COL:`.
fn yaml_message(e: &serde_saphyr::Error) -> String {
    let msg = e.without_snippet().to_string();
    // The bare message ends with " at line X, column Y" (or similar); drop it.
    let cut = msg
        .find(" at line ")
        .or_else(|| msg.find(" (line "))
        .unwrap_or(msg.len());
    msg[..cut].trim().to_string()
}

/// `path` made absolute against the cwd, without touching the filesystem.
pub(crate) fn absolute(path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(path))
            .unwrap_or_else(|_| path.to_path_buf())
    }
}

mod apps;
mod options;
mod proxy;
mod raw;
#[cfg(test)]
mod tests;
mod units;
mod validate;

pub(crate) use units::{parse_duration, parse_size, rfc3339};
use validate::Validator;
