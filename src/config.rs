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

/// A position in the config file, 1-based.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pos {
    pub line: u64,
    pub col: u64,
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
#[derive(Debug, Clone)]
pub struct ConfigError {
    pub file: PathBuf,
    pub pos: Option<Pos>,
    pub message: String,
}

impl ConfigError {
    pub fn new(file: &Path, pos: Option<Pos>, message: impl Into<String>) -> Self {
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
    pub path: PathBuf,
    pub pid_file: Option<PathBuf>,
    pub shutdown_timeout: Duration,
    pub startup_timeout: Duration,
    pub watch: bool,
    /// Run under a supervisor whose pid never changes (`--supervise`).
    pub supervise: bool,
    pub log: LogConfig,
    pub timeouts: Timeouts,
    pub max_connections: usize,
    /// Old generations that may drain at once; a restart past it stops the oldest.
    pub max_draining: usize,
    pub listeners: Vec<ListenerConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Per-connection timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// To receive a complete request head.
    pub header: Duration,
    /// Keep-alive idle: no request in flight.
    pub idle: Duration,
    /// TLS handshake.
    pub handshake: Duration,
    /// A response that makes no progress this long (the client stopped
    /// reading, or holds an HTTP/2 connection shut with flow control) is cut.
    pub send: Duration,
    /// While draining, an HTTP/1.x connection with no request in flight is
    /// closed after this.
    pub draining_idle: Duration,
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
pub struct ListenerConfig {
    /// The key a socket keeps across restarts.
    pub name: String,
    pub addr: SocketAddr,
    pub tls: Option<TlsConfig>,
    pub routes: Vec<RouteConfig>,
    pub pos: Pos,
}

#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub cert: FileRef,
    pub key: FileRef,
    pub sni: Vec<(FileRef, FileRef)>,
    pub alpn: Vec<String>,
}

/// A path from the config, resolved, with where it was written and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRef {
    pub path: PathBuf,
    /// As written in the config, for error messages.
    pub written: String,
    /// The config key, e.g. `listeners[1].tls.cert`.
    pub key: String,
    pub pos: Pos,
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub path: String,
    pub action: Action,
    pub pos: Pos,
}

#[derive(Debug, Clone)]
pub enum Action {
    Respond {
        status: http::StatusCode,
        body: String,
        headers: Vec<(http::HeaderName, http::HeaderValue)>,
        delay: Duration,
    },
    Static {
        root: FileRef,
        index: String,
    },
    Redirect {
        to: String,
        status: http::StatusCode,
    },
    Status,
    Proxy {
        upstream: http::Uri,
        connect_timeout: Duration,
        timeout: Duration,
        strip_prefix: bool,
        /// Largest request body forwarded; larger ones get 413.
        max_body: Option<u64>,
    },
}

impl Config {
    /// Reads and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let abs = absolute(path);
        let text = std::fs::read_to_string(&abs)
            .map_err(|e| ConfigError::new(&abs, None, format!("cannot read config: {e}")))?;
        Config::parse(&abs, &text)
    }

    /// Parses and validates `text` as if read from `path` (absolute).
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

    /// Every file this config depends on: itself, certificates and keys.
    /// These are what `watch: true` watches.
    pub fn watched_files(&self) -> Vec<PathBuf> {
        let mut files = vec![self.path.clone()];
        for l in &self.listeners {
            if let Some(tls) = &l.tls {
                files.push(tls.cert.path.clone());
                files.push(tls.key.path.clone());
                for (c, k) in &tls.sni {
                    files.push(c.path.clone());
                    files.push(k.path.clone());
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
pub fn absolute(path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(path))
            .unwrap_or_else(|_| path.to_path_buf())
    }
}

/// Parses a size: `1048576`, `512KB`, `10MB`, `1GB` (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("size {s:?} does not start with a number (e.g. \"10MB\")"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "K" => 1 << 10,
        "MB" | "M" => 1 << 20,
        "GB" | "G" => 1 << 30,
        other => {
            return Err(format!(
                "size {s:?} has unknown unit {other:?} (use KB, MB or GB)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

/// Parses `500ms`, `30s`, `2m`, `1h` (also `0`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .ok_or_else(|| format!("duration {s:?} has no unit (use ms, s, m or h, e.g. \"30s\")"))?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("duration {s:?} does not start with a number (e.g. \"30s\")"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => {
            return Err(format!(
                "duration {s:?} has unknown unit {unit:?} (use ms, s, m or h)"
            ))
        }
    };
    if !secs.is_finite() || secs > 365.0 * 86400.0 {
        return Err(format!("duration {s:?} is too long"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// The raw, deserialized shape of the file. Unknown keys are refused here.
mod raw {
    use super::*;

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Config {
        pub pid_file: Option<Spanned<String>>,
        pub shutdown_timeout: Option<Spanned<String>>,
        pub startup_timeout: Option<Spanned<String>>,
        #[serde(default)]
        pub watch: bool,
        #[serde(default)]
        pub supervise: bool,
        pub log: Option<Log>,
        pub timeouts: Option<Timeouts>,
        pub max_connections: Option<Spanned<u64>>,
        pub max_draining: Option<Spanned<u64>>,
        pub listeners: Spanned<Vec<Spanned<Listener>>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Log {
        pub level: Option<Spanned<String>>,
        pub format: Option<Spanned<String>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Timeouts {
        pub header: Option<Spanned<String>>,
        pub idle: Option<Spanned<String>>,
        pub handshake: Option<Spanned<String>>,
        pub send: Option<Spanned<String>>,
        pub draining_idle: Option<Spanned<String>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Listener {
        pub name: Spanned<String>,
        pub addr: Spanned<String>,
        pub tls: Option<Spanned<Tls>>,
        #[serde(default)]
        pub routes: Vec<Spanned<Route>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Tls {
        pub cert: Spanned<String>,
        pub key: Spanned<String>,
        #[serde(default)]
        pub sni: Vec<Spanned<CertPair>>,
        pub alpn: Option<Spanned<Vec<String>>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct CertPair {
        pub cert: Spanned<String>,
        pub key: Spanned<String>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Route {
        pub path: Option<Spanned<String>>,
        pub respond: Option<Spanned<Respond>>,
        #[serde(rename = "static")]
        pub static_: Option<Spanned<Static>>,
        pub redirect: Option<Spanned<Redirect>>,
        pub status: Option<Spanned<Empty>>,
        pub proxy: Option<Spanned<Proxy>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Proxy {
        pub upstream: Spanned<String>,
        pub connect_timeout: Option<Spanned<String>>,
        pub timeout: Option<Spanned<String>>,
        #[serde(default)]
        pub strip_prefix: bool,
        pub max_body: Option<Spanned<String>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Respond {
        pub status: Option<Spanned<u16>>,
        #[serde(default)]
        pub body: String,
        #[serde(default)]
        pub headers: BTreeMap<String, Spanned<String>>,
        pub delay: Option<Spanned<String>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Static {
        pub root: Spanned<String>,
        pub index: Option<String>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Redirect {
        pub to: Spanned<String>,
        pub status: Option<Spanned<u16>>,
    }

    /// `status: {}` takes no fields.
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Empty {}
}

struct Validator<'a> {
    file: &'a Path,
}

impl Validator<'_> {
    fn err<T>(
        &self,
        pos: impl Into<Option<Pos>>,
        msg: impl Into<String>,
    ) -> Result<T, ConfigError> {
        Err(ConfigError::new(self.file, pos.into(), msg))
    }

    fn duration(
        &self,
        v: &Option<Spanned<String>>,
        key: &str,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        match v {
            None => Ok(default),
            Some(s) => {
                parse_duration(&s.value).or_else(|e| self.err(Pos::from(s), format!("{key}: {e}")))
            }
        }
    }

    fn file_ref(&self, s: &Spanned<String>, key: String) -> Result<FileRef, ConfigError> {
        if s.value.is_empty() {
            return self.err(Pos::from(s), format!("{key}: must not be empty"));
        }
        let dir = self.file.parent().unwrap_or(Path::new("/"));
        Ok(FileRef {
            path: dir.join(&s.value),
            written: s.value.clone(),
            key,
            pos: Pos::from(s),
        })
    }

    fn config(&self, raw: raw::Config) -> Result<Config, ConfigError> {
        let dir = self.file.parent().unwrap_or(Path::new("/"));
        let pid_file = match &raw.pid_file {
            Some(p) if p.value.is_empty() => {
                return self.err(Pos::from(p), "pid_file: must not be empty")
            }
            Some(p) => Some(dir.join(&p.value)),
            None => None,
        };
        let shutdown_timeout = self.duration(
            &raw.shutdown_timeout,
            "shutdown_timeout",
            Duration::from_secs(30),
        )?;
        let startup_timeout = self.duration(
            &raw.startup_timeout,
            "startup_timeout",
            Duration::from_secs(10),
        )?;
        if startup_timeout.is_zero() {
            let pos = raw.startup_timeout.as_ref().map(Pos::from);
            return self.err(pos, "startup_timeout: must be more than 0");
        }

        let log = match raw.log {
            None => LogConfig {
                level: "info".into(),
                format: LogFormat::Text,
            },
            Some(l) => {
                let level = match l.level {
                    None => "info".to_string(),
                    Some(s) => match s.value.as_str() {
                        "error" | "warn" | "info" | "debug" | "trace" => s.value.clone(),
                        other => {
                            return self.err(
                                Pos::from(&s),
                                format!("log.level: {other:?} is not one of error, warn, info, debug, trace"),
                            )
                        }
                    },
                };
                let format = match l.format {
                    None => LogFormat::Text,
                    Some(s) => match s.value.as_str() {
                        "text" => LogFormat::Text,
                        "json" => LogFormat::Json,
                        other => {
                            return self.err(
                                Pos::from(&s),
                                format!("log.format: {other:?} is not text or json"),
                            )
                        }
                    },
                };
                LogConfig { level, format }
            }
        };

        let d = Timeouts::default();
        let timeouts = match &raw.timeouts {
            None => d,
            Some(t) => Timeouts {
                header: self.duration(&t.header, "timeouts.header", d.header)?,
                idle: self.duration(&t.idle, "timeouts.idle", d.idle)?,
                handshake: self.duration(&t.handshake, "timeouts.handshake", d.handshake)?,
                send: self.duration(&t.send, "timeouts.send", d.send)?,
                draining_idle: self.duration(
                    &t.draining_idle,
                    "timeouts.draining_idle",
                    d.draining_idle,
                )?,
            },
        };
        for (v, key) in [
            (timeouts.header, "timeouts.header"),
            (timeouts.idle, "timeouts.idle"),
            (timeouts.handshake, "timeouts.handshake"),
            (timeouts.send, "timeouts.send"),
            (timeouts.draining_idle, "timeouts.draining_idle"),
        ] {
            if v.is_zero() {
                return self.err(None, format!("{key}: must be more than 0"));
            }
        }

        let max_connections = match &raw.max_connections {
            None => 10_000,
            Some(m) if m.value == 0 => {
                return self.err(Pos::from(m), "max_connections: must be at least 1")
            }
            Some(m) => usize::try_from(m.value).unwrap_or(usize::MAX).min(1 << 24),
        };

        let max_draining = match &raw.max_draining {
            None => 3,
            Some(m) if m.value == 0 => {
                return self.err(Pos::from(m), "max_draining: must be at least 1")
            }
            Some(m) => usize::try_from(m.value).unwrap_or(usize::MAX).min(1024),
        };

        if raw.listeners.value.is_empty() {
            return self.err(
                Pos::from(&raw.listeners),
                "listeners: at least one listener is needed",
            );
        }
        let mut names = HashSet::new();
        let mut addrs = HashSet::new();
        let mut listeners = Vec::new();
        for (i, l) in raw.listeners.value.iter().enumerate() {
            let listener = self.listener(i, l)?;
            if !names.insert(listener.name.clone()) {
                return self.err(
                    Pos::from(&l.value.name),
                    format!(
                        "listeners[{i}].name: duplicate listener name {:?}",
                        listener.name
                    ),
                );
            }
            if listener.addr.port() != 0 && !addrs.insert(listener.addr) {
                return self.err(
                    Pos::from(&l.value.addr),
                    format!(
                        "listeners[{i}].addr: {} is used by another listener",
                        listener.addr
                    ),
                );
            }
            listeners.push(listener);
        }

        Ok(Config {
            path: self.file.to_path_buf(),
            pid_file,
            shutdown_timeout,
            startup_timeout,
            watch: raw.watch,
            supervise: raw.supervise,
            log,
            timeouts,
            max_connections,
            max_draining,
            listeners,
        })
    }

    fn listener(
        &self,
        i: usize,
        l: &Spanned<raw::Listener>,
    ) -> Result<ListenerConfig, ConfigError> {
        let raw = &l.value;
        let name = &raw.name.value;
        let valid_name = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !valid_name {
            return self.err(
                Pos::from(&raw.name),
                format!("listeners[{i}].name: {name:?} must be made of a-z, 0-9, '_' and '-'"),
            );
        }
        let addr: SocketAddr = raw.addr.value.parse().or_else(|_| {
            self.err(
                Pos::from(&raw.addr),
                format!(
                    "listeners[{i}].addr: {:?} is not host:port with an IPv4 or [IPv6] address",
                    raw.addr.value
                ),
            )
        })?;
        let tls = match &raw.tls {
            None => None,
            Some(t) => {
                let t = &t.value;
                let k = |f: &str| format!("listeners[{i}].tls.{f}");
                let mut sni = Vec::new();
                for (j, pair) in t.sni.iter().enumerate() {
                    sni.push((
                        self.file_ref(&pair.value.cert, k(&format!("sni[{j}].cert")))?,
                        self.file_ref(&pair.value.key, k(&format!("sni[{j}].key")))?,
                    ));
                }
                let alpn = match &t.alpn {
                    None => vec!["h2".to_string(), "http/1.1".to_string()],
                    Some(a) => {
                        for p in &a.value {
                            if p != "h2" && p != "http/1.1" {
                                return self.err(
                                    Pos::from(a),
                                    format!(
                                        "{}: {p:?} is not supported (use h2, http/1.1)",
                                        k("alpn")
                                    ),
                                );
                            }
                        }
                        if a.value.is_empty() {
                            return self.err(
                                Pos::from(a),
                                format!("{}: must name at least one protocol", k("alpn")),
                            );
                        }
                        a.value.clone()
                    }
                };
                Some(TlsConfig {
                    cert: self.file_ref(&t.cert, k("cert"))?,
                    key: self.file_ref(&t.key, k("key"))?,
                    sni,
                    alpn,
                })
            }
        };
        let mut routes = Vec::new();
        let mut paths = HashSet::new();
        for (j, r) in raw.routes.iter().enumerate() {
            let route = self.route(&format!("listeners[{i}].routes[{j}]"), r)?;
            if !paths.insert(route.path.clone()) {
                return self.err(
                    route.pos,
                    format!(
                        "listeners[{i}].routes[{j}].path: duplicate path {:?}",
                        route.path
                    ),
                );
            }
            routes.push(route);
        }
        Ok(ListenerConfig {
            name: name.clone(),
            addr,
            tls,
            routes,
            pos: Pos::from(l),
        })
    }

    fn route(&self, key: &str, r: &Spanned<raw::Route>) -> Result<RouteConfig, ConfigError> {
        let raw = &r.value;
        let pos = Pos::from(r);
        let path = match &raw.path {
            None => "/".to_string(),
            Some(p) if !p.value.starts_with('/') => {
                return self.err(
                    Pos::from(p),
                    format!("{key}.path: {:?} must start with '/'", p.value),
                )
            }
            Some(p) => p.value.clone(),
        };
        let count = [
            raw.respond.is_some(),
            raw.static_.is_some(),
            raw.redirect.is_some(),
            raw.status.is_some(),
            raw.proxy.is_some(),
        ]
        .iter()
        .filter(|x| **x)
        .count();
        if count != 1 {
            let what = if count == 0 {
                "has no action"
            } else {
                "has more than one action"
            };
            return self.err(
                pos,
                format!(
                    "{key}: route {what}: give exactly one of respond, static, redirect, status, proxy"
                ),
            );
        }
        let action = if let Some(resp) = &raw.respond {
            let v = &resp.value;
            let status = self.status(&v.status, &format!("{key}.respond.status"), 200, |_| true)?;
            let mut headers = Vec::new();
            for (name, value) in &v.headers {
                let n = http::HeaderName::from_bytes(name.as_bytes()).or_else(|_| {
                    self.err(
                        Pos::from(value),
                        format!("{key}.respond.headers: {name:?} is not a header name"),
                    )
                })?;
                let val = http::HeaderValue::from_str(&value.value).or_else(|_| {
                    self.err(
                        Pos::from(value),
                        format!("{key}.respond.headers.{name}: not a valid header value"),
                    )
                })?;
                headers.push((n, val));
            }
            Action::Respond {
                status,
                body: v.body.clone(),
                headers,
                delay: self.duration(&v.delay, &format!("{key}.respond.delay"), Duration::ZERO)?,
            }
        } else if let Some(s) = &raw.static_ {
            Action::Static {
                root: self.file_ref(&s.value.root, format!("{key}.static.root"))?,
                index: s.value.index.clone().unwrap_or_else(|| "index.html".into()),
            }
        } else if let Some(r) = &raw.redirect {
            let status = self.status(
                &r.value.status,
                &format!("{key}.redirect.status"),
                308,
                |s| matches!(s, 301 | 302 | 303 | 307 | 308),
            )?;
            if r.value.to.value.is_empty() {
                return self.err(
                    Pos::from(&r.value.to),
                    format!("{key}.redirect.to: must not be empty"),
                );
            }
            Action::Redirect {
                to: r.value.to.value.clone(),
                status,
            }
        } else if let Some(p) = &raw.proxy {
            let v = &p.value;
            let bad = || {
                ConfigError::new(
                    self.file,
                    Some(Pos::from(&v.upstream)),
                    format!(
                        "{key}.proxy.upstream: {:?} is not http://host:port",
                        v.upstream.value
                    ),
                )
            };
            let upstream: http::Uri = v.upstream.value.parse().map_err(|_| bad())?;
            let plain_origin = upstream.scheme_str() == Some("http")
                && upstream.authority().is_some()
                && matches!(upstream.path(), "" | "/")
                && upstream.query().is_none();
            if !plain_origin {
                return Err(bad());
            }
            Action::Proxy {
                upstream,
                connect_timeout: self.duration(
                    &v.connect_timeout,
                    &format!("{key}.proxy.connect_timeout"),
                    Duration::from_secs(5),
                )?,
                timeout: self.duration(
                    &v.timeout,
                    &format!("{key}.proxy.timeout"),
                    Duration::from_secs(60),
                )?,
                strip_prefix: v.strip_prefix,
                max_body: match &v.max_body {
                    None => None,
                    Some(m) => Some(parse_size(&m.value).or_else(|e| {
                        self.err(Pos::from(m), format!("{key}.proxy.max_body: {e}"))
                    })?),
                },
            }
        } else {
            Action::Status
        };
        Ok(RouteConfig { path, action, pos })
    }

    fn status(
        &self,
        v: &Option<Spanned<u16>>,
        key: &str,
        default: u16,
        allowed: impl Fn(u16) -> bool,
    ) -> Result<http::StatusCode, ConfigError> {
        let (code, pos) = match v {
            None => (default, None),
            Some(s) => (s.value, Some(Pos::from(s))),
        };
        match http::StatusCode::from_u16(code) {
            Ok(s) if code >= 200 && allowed(code) => Ok(s),
            _ => self.err(pos, format!("{key}: {code} is not a valid status here")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/g/server.yaml"), text)
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("10MB"), Ok(10 << 20));
        assert_eq!(parse_size("2 KB"), Ok(2048));
        assert!(parse_size("ten").is_err());
        assert!(parse_size("3PB").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("30").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("3 days").is_err());
    }

    #[test]
    fn minimal_config_gets_defaults_and_resolves_paths() {
        let c = parse(
            "pid_file: run/g.pid\nlisteners:\n  - name: web\n    addr: 127.0.0.1:0\n    tls: { cert: ../c.crt, key: c.key }\n",
        )
        .unwrap();
        assert_eq!(c.shutdown_timeout, Duration::from_secs(30));
        assert_eq!(c.startup_timeout, Duration::from_secs(10));
        assert_eq!(c.max_connections, 10_000);
        assert_eq!(c.pid_file.unwrap(), Path::new("/etc/g/run/g.pid"));
        let tls = c.listeners[0].tls.as_ref().unwrap();
        assert_eq!(tls.cert.path, Path::new("/etc/g/../c.crt"));
        assert_eq!(tls.alpn, vec!["h2", "http/1.1"]);
    }

    #[test]
    fn errors_name_line_and_column() {
        let e =
            parse("listeners:\n  - name: web\n    addr: 127.0.0.1:80\n    bogus: 1\n").unwrap_err();
        assert_eq!(e.pos.map(|p| p.line), Some(4), "{e}");
        assert!(e.to_string().starts_with("/etc/g/server.yaml:4:"), "{e}");
        assert!(e.message.contains("bogus"), "{e}");

        let e = parse("shutdown_timeout: 10x\nlisteners:\n  - {name: a, addr: '127.0.0.1:1'}\n")
            .unwrap_err();
        assert_eq!(e.to_string(), "/etc/g/server.yaml:1:19: shutdown_timeout: duration \"10x\" has unknown unit \"x\" (use ms, s, m or h)");

        let e = parse(
            "listeners:\n  - {name: a, addr: '127.0.0.1:1'}\n  - {name: a, addr: '127.0.0.1:2'}\n",
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("/etc/g/server.yaml:3:"), "{e}");
        assert!(e.message.contains("duplicate listener name"), "{e}");
    }

    #[test]
    fn routes_need_exactly_one_action() {
        let e = parse(
            "listeners:\n  - name: a\n    addr: 127.0.0.1:1\n    routes:\n      - path: /x\n",
        )
        .unwrap_err();
        assert!(e.message.contains("has no action"), "{e}");
        assert_eq!(e.pos.map(|p| p.line), Some(5));
        let e = parse(
            "listeners:\n  - name: a\n    addr: 127.0.0.1:1\n    routes:\n      - path: /x\n        status: {}\n        respond: {}\n",
        )
        .unwrap_err();
        assert!(e.message.contains("more than one action"), "{e}");
    }
}
