//! The raw, deserialized shape of the file, with the position of every
//! value a later check may reject. Unknown keys are refused here.

use super::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Config {
    pub(crate) pid_file: Option<Spanned<String>>,
    pub(crate) shutdown_timeout: Option<Spanned<String>>,
    pub(crate) startup_timeout: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) watch: bool,
    #[serde(default)]
    pub(crate) supervise: bool,
    pub(crate) log: Option<Log>,
    pub(crate) timeouts: Option<Timeouts>,
    pub(crate) max_connections: Option<Spanned<u64>>,
    pub(crate) max_draining: Option<Spanned<u64>>,
    pub(crate) limits: Option<Limits>,
    pub(crate) tls_tickets: Option<Spanned<TlsTickets>>,
    pub(crate) acme: Option<Spanned<Acme>>,
    pub(crate) access_log: Option<Spanned<AccessLog>>,
    #[serde(default)]
    pub(crate) apps: Vec<Spanned<App>>,
    pub(crate) listeners: Spanned<Vec<Spanned<Listener>>>,
}

/// An application process gracesrv runs and proxies to (`apps:`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct App {
    pub(crate) name: Spanned<String>,
    pub(crate) command: Spanned<Vec<String>>,
    pub(crate) dir: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) env: BTreeMap<String, String>,
    pub(crate) socket: Option<Spanned<String>>,
    pub(crate) ready: Option<Spanned<AppReady>>,
    pub(crate) start_timeout: Option<Spanned<String>>,
    pub(crate) stop_signal: Option<Spanned<String>>,
    pub(crate) stop_timeout: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) watch: Vec<Spanned<String>>,
    pub(crate) canary: Option<Spanned<Canary>>,
}

/// An app's `canary:`: how `gracesrv deploy --canary` goes. Numbers read
/// as their text (`min_requests: 100`), as `1%` does.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Canary {
    pub(crate) steps: Option<Spanned<Vec<Spanned<String>>>>,
    pub(crate) step: Option<Spanned<String>>,
    pub(crate) max_error_increase: Option<Spanned<String>>,
    pub(crate) max_p99_ratio: Option<Spanned<String>>,
    pub(crate) min_requests: Option<Spanned<String>>,
}

/// `ready: notify`, or `ready: { http: /healthz }`.
#[derive(Deserialize)]
#[serde(untagged)]
pub(crate) enum AppReady {
    Word(String),
    Http(AppReadyHttp),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AppReadyHttp {
    pub(crate) http: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AccessLog {
    pub(crate) path: Spanned<String>,
    pub(crate) format: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Acme {
    pub(crate) directory: Spanned<String>,
    pub(crate) email: Option<Spanned<String>>,
    pub(crate) storage: Option<Spanned<String>>,
    pub(crate) storage_key_file: Option<Spanned<String>>,
    pub(crate) storage_ca: Option<Spanned<String>>,
    pub(crate) cache: Option<Spanned<String>>,
    pub(crate) lock_ttl: Option<Spanned<String>>,
    pub(crate) ca_roots: Option<Spanned<String>>,
    pub(crate) challenge: Option<Spanned<String>>,
    pub(crate) renew_before: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TlsTickets {
    pub(crate) key_file: Option<Spanned<String>>,
    pub(crate) storage: Option<Spanned<String>>,
    pub(crate) storage_key_file: Option<Spanned<String>>,
    pub(crate) storage_ca: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Log {
    pub(crate) level: Option<Spanned<String>>,
    pub(crate) format: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Limits {
    pub(crate) max_headers: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Timeouts {
    pub(crate) header: Option<Spanned<String>>,
    pub(crate) idle: Option<Spanned<String>>,
    pub(crate) handshake: Option<Spanned<String>>,
    pub(crate) send: Option<Spanned<String>>,
    pub(crate) draining_idle: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Listener {
    pub(crate) name: Spanned<String>,
    pub(crate) addr: Spanned<String>,
    pub(crate) tls: Option<Spanned<Tls>>,
    pub(crate) http3: Option<Spanned<bool>>,
    pub(crate) access_log: Option<Spanned<AccessLog>>,
    #[serde(default)]
    pub(crate) routes: Vec<Spanned<Route>>,
    /// Proxies whose `X-Forwarded-For` / `Forwarded` name the client.
    #[serde(default)]
    pub(crate) trusted_proxies: Vec<Spanned<String>>,
    // What every route of the listener gets, unless it says otherwise.
    pub(crate) headers: Option<Spanned<HeaderRules>>,
    pub(crate) cache: Option<Spanned<Cache>>,
    pub(crate) allow: Option<Spanned<Vec<Spanned<String>>>>,
    pub(crate) deny: Option<Spanned<Vec<Spanned<String>>>>,
    pub(crate) basic_auth: Option<Spanned<BasicAuth>>,
    pub(crate) rate_limit: Option<Spanned<RateLimit>>,
    pub(crate) compress: Option<Spanned<Compress>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Tls {
    pub(crate) cert: Option<Spanned<String>>,
    pub(crate) key: Option<Spanned<String>>,
    /// Names to obtain a certificate for (instead of `cert` and `key`).
    pub(crate) acme: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    pub(crate) sni: Vec<Spanned<CertPair>>,
    pub(crate) alpn: Option<Spanned<Vec<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CertPair {
    pub(crate) cert: Spanned<String>,
    pub(crate) key: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Route {
    pub(crate) path: Option<Spanned<String>>,
    pub(crate) respond: Option<Spanned<Respond>>,
    #[serde(rename = "static")]
    pub(crate) static_: Option<Spanned<Static>>,
    pub(crate) redirect: Option<Spanned<Redirect>>,
    pub(crate) status: Option<Spanned<Empty>>,
    pub(crate) metrics: Option<Spanned<Empty>>,
    pub(crate) proxy: Option<Spanned<Proxy>>,
    // Options that compose with every action.
    pub(crate) headers: Option<Spanned<HeaderRules>>,
    pub(crate) cache: Option<Spanned<Cache>>,
    pub(crate) allow: Option<Spanned<Vec<Spanned<String>>>>,
    pub(crate) deny: Option<Spanned<Vec<Spanned<String>>>>,
    pub(crate) basic_auth: Option<Spanned<BasicAuth>>,
    pub(crate) rate_limit: Option<Spanned<RateLimit>>,
    pub(crate) compress: Option<Spanned<Compress>>,
}

/// `cache:`: the `Cache-Control` of the route's answers.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Cache {
    pub(crate) max_age: Spanned<String>,
    #[serde(default)]
    pub(crate) immutable: bool,
    pub(crate) public: Option<bool>,
}

/// `compress: true`, or its settings.
pub(crate) enum Compress {
    On(bool),
    With(CompressWith),
}

/// By hand rather than `untagged`: the settings are read by the YAML
/// reader itself, so their errors keep their line and column, and a
/// number (`level: 5`, `min_size: 2048`) reads as its text.
impl<'de> Deserialize<'de> for Compress {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Compress, D::Error> {
        struct Either;
        impl<'de> serde::de::Visitor<'de> for Either {
            type Value = Compress;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("true, false, or { encodings, min_size, level }")
            }
            fn visit_bool<E>(self, on: bool) -> Result<Compress, E> {
                Ok(Compress::On(on))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Compress, A::Error> {
                CompressWith::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(Compress::With)
            }
        }
        d.deserialize_any(Either)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CompressWith {
    pub(crate) encodings: Option<Vec<Spanned<String>>>,
    pub(crate) min_size: Option<Spanned<String>>,
    pub(crate) level: Option<Spanned<String>>,
}

/// `rate_limit:`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RateLimit {
    pub(crate) requests: Spanned<i64>,
    pub(crate) per: Option<Spanned<String>>,
    pub(crate) burst: Option<Spanned<i64>>,
    pub(crate) key: Option<Spanned<String>>,
}

/// `basic_auth:`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BasicAuth {
    pub(crate) realm: Option<Spanned<String>>,
    pub(crate) users_file: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Proxy {
    pub(crate) upstream: Option<Spanned<String>>,
    /// An application of `apps:`, instead of an upstream.
    pub(crate) app: Option<Spanned<String>>,
    /// Several upstreams, balanced by `policy`.
    pub(crate) upstreams: Option<Spanned<Vec<Spanned<Upstream>>>>,
    pub(crate) policy: Option<Spanned<String>>,
    pub(crate) hash_key: Option<Spanned<String>>,
    pub(crate) health: Option<Spanned<Health>>,
    pub(crate) passive: Option<Spanned<Passive>>,
    pub(crate) try_duration: Option<Spanned<String>>,
    pub(crate) tls: Option<Spanned<UpstreamTls>>,
    pub(crate) tls_insecure_skip_verify: Option<Spanned<bool>>,
    pub(crate) protocol: Option<Spanned<String>>,
    pub(crate) request_headers: Option<Spanned<HeaderRules>>,
    pub(crate) response_headers: Option<Spanned<HeaderRules>>,
    pub(crate) host: Option<Spanned<String>>,
    pub(crate) connect_timeout: Option<Spanned<String>>,
    pub(crate) timeout: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) strip_prefix: bool,
    pub(crate) max_body: Option<Spanned<String>>,
}

/// One of `proxy.upstreams`: a URL or an app, and its weight.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Upstream {
    pub(crate) url: Option<Spanned<String>>,
    pub(crate) app: Option<Spanned<String>>,
    pub(crate) weight: Option<Spanned<i64>>,
}

/// `proxy.health`: the active check.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Health {
    pub(crate) path: Option<Spanned<String>>,
    pub(crate) interval: Option<Spanned<String>>,
    pub(crate) timeout: Option<Spanned<String>>,
    pub(crate) expect_status: Option<Spanned<u16>>,
}

/// `proxy.passive`: what takes an upstream out from the answers it gives.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Passive {
    pub(crate) max_fails: Option<Spanned<i64>>,
    pub(crate) fail_window: Option<Spanned<String>>,
    pub(crate) fail_timeout: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) unhealthy_status: Vec<Spanned<u16>>,
}

/// `proxy.tls`: how gracesrv checks `https://` upstreams and proves itself.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpstreamTls {
    pub(crate) ca: Option<Spanned<String>>,
    pub(crate) cert: Option<Spanned<String>>,
    pub(crate) key: Option<Spanned<String>>,
    pub(crate) server_name: Option<Spanned<String>>,
}

/// `request_headers` / `response_headers`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HeaderRules {
    #[serde(default)]
    pub(crate) set: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    pub(crate) add: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    pub(crate) remove: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Respond {
    pub(crate) status: Option<Spanned<u16>>,
    #[serde(default)]
    pub(crate) body: String,
    #[serde(default)]
    pub(crate) headers: BTreeMap<String, Spanned<String>>,
    pub(crate) delay: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Static {
    pub(crate) root: Spanned<String>,
    pub(crate) index: Option<String>,
    /// A single-page app's page, for missing paths without an extension.
    pub(crate) fallback: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) browse: bool,
    /// Small files kept in memory, exactly as on disk (on by default).
    pub(crate) file_cache: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Redirect {
    pub(crate) to: Spanned<String>,
    pub(crate) status: Option<Spanned<u16>>,
}

/// `status: {}` takes no fields.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Empty {}
