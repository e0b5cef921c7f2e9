//! The raw, deserialized shape of the file, with the position of every
//! value a later check may reject. Unknown keys are refused here.

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
    pub limits: Option<Limits>,
    pub tls_tickets: Option<TlsTickets>,
    pub acme: Option<Spanned<Acme>>,
    pub access_log: Option<Spanned<AccessLog>>,
    #[serde(default)]
    pub apps: Vec<Spanned<App>>,
    pub listeners: Spanned<Vec<Spanned<Listener>>>,
}

/// An application process gracesrv runs and proxies to (`apps:`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct App {
    pub name: Spanned<String>,
    pub command: Spanned<Vec<String>>,
    pub dir: Option<Spanned<String>>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub socket: Option<Spanned<String>>,
    pub ready: Option<Spanned<AppReady>>,
    pub start_timeout: Option<Spanned<String>>,
    pub stop_signal: Option<Spanned<String>>,
    pub stop_timeout: Option<Spanned<String>>,
    #[serde(default)]
    pub watch: Vec<Spanned<String>>,
}

/// `ready: notify`, or `ready: { http: /healthz }`.
#[derive(Deserialize)]
#[serde(untagged)]
pub enum AppReady {
    Word(String),
    Http(AppReadyHttp),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppReadyHttp {
    pub http: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLog {
    pub path: Spanned<String>,
    pub format: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Acme {
    pub directory: Spanned<String>,
    pub email: Option<Spanned<String>>,
    pub storage: Option<Spanned<String>>,
    pub ca_roots: Option<Spanned<String>>,
    pub challenge: Option<Spanned<String>>,
    pub renew_before: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsTickets {
    pub key_file: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Log {
    pub level: Option<Spanned<String>>,
    pub format: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub max_headers: Option<Spanned<u64>>,
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
    pub http3: Option<Spanned<bool>>,
    pub access_log: Option<Spanned<AccessLog>>,
    #[serde(default)]
    pub routes: Vec<Spanned<Route>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    pub cert: Option<Spanned<String>>,
    pub key: Option<Spanned<String>>,
    /// Names to obtain a certificate for (instead of `cert` and `key`).
    pub acme: Option<Spanned<Vec<Spanned<String>>>>,
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
    pub metrics: Option<Spanned<Empty>>,
    pub proxy: Option<Spanned<Proxy>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Proxy {
    pub upstream: Option<Spanned<String>>,
    /// An application of `apps:`, instead of an upstream.
    pub app: Option<Spanned<String>>,
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
