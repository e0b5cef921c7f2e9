//! From the raw model to a [`Config`] whose values are known to be usable:
//! durations parsed, paths resolved against the config's directory, names
//! unique, one action per route. Every error names `FILE:LINE:COL`.

use super::*;

pub(super) struct Validator<'a> {
    pub(super) file: &'a Path,
}

impl Validator<'_> {
    pub(super) fn err<T>(
        &self,
        pos: impl Into<Option<Pos>>,
        msg: impl Into<String>,
    ) -> Result<T, ConfigError> {
        Err(ConfigError::new(self.file, pos.into(), msg))
    }

    /// A name that keys something across restarts (a listener, an app):
    /// `[a-z0-9_-]+`.
    pub(super) fn name(&self, s: &Spanned<String>, key: &str) -> Result<String, ConfigError> {
        let name = &s.value;
        let valid = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !valid {
            return self.err(
                Pos::from(s),
                format!("{key}: {name:?} must be made of a-z, 0-9, '_' and '-'"),
            );
        }
        Ok(name.clone())
    }

    pub(super) fn duration(
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

    pub(super) fn file_ref(
        &self,
        s: &Spanned<String>,
        key: String,
    ) -> Result<FileRef, ConfigError> {
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

    pub(super) fn config(&self, raw: raw::Config) -> Result<Config, ConfigError> {
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

        // hyper's default is 100, which real requests (behind several
        // proxies, with many cookies) exceed; nginx and HTTP/2 take hundreds.
        // A field takes at least 4 bytes of the 64 KiB head.
        let max_headers =
            match raw.limits.as_ref().and_then(|l| l.max_headers.as_ref()) {
                None => 500,
                Some(m) if m.value == 0 || m.value > 16_384 => return self.err(
                    Pos::from(m),
                    "limits.max_headers: must be between 1 and 16384 (a head is at most 64 KiB)",
                ),
                Some(m) => m.value as usize,
            };

        if raw.listeners.value.is_empty() {
            return self.err(
                Pos::from(&raw.listeners),
                "listeners: at least one listener is needed",
            );
        }
        let acme = match &raw.acme {
            Some(a) => Some(self.acme(a)?),
            None => None,
        };
        let access_log = match &raw.access_log {
            Some(a) => Some(self.access_log(a, "access_log")?),
            None => None,
        };
        let apps = self.apps(&raw.apps)?;
        let mut names = HashSet::new();
        let mut addrs = HashSet::new();
        let mut listeners = Vec::new();
        for (i, l) in raw.listeners.value.iter().enumerate() {
            let mut listener = self.listener(i, l, acme.as_ref().map(|a| a.storage.as_path()))?;
            if listener.access_log.is_none() {
                listener.access_log = access_log.clone();
            }
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
            for (j, r) in listener.routes.iter().enumerate() {
                let Action::Proxy(p) = &r.action else {
                    continue;
                };
                for (k, u) in p.upstreams.iter().enumerate() {
                    let ProxyTarget::App(app) = &u.target else {
                        continue;
                    };
                    if !apps.iter().any(|a| &a.name == app) {
                        let key = match p.upstreams.len() {
                            1 => "app".to_string(),
                            _ => format!("upstreams[{k}].app"),
                        };
                        return self.err(
                            r.pos,
                            format!("listeners[{i}].routes[{j}].proxy.{key}: no app named {app:?} in apps:"),
                        );
                    }
                }
            }
            listeners.push(listener);
        }

        let tls_tickets = match &raw.tls_tickets {
            Some(t) => Some(self.tickets(t)?),
            None => None,
        };
        Ok(Config {
            path: self.file.to_path_buf(),
            tls_tickets,
            acme,
            apps,
            pid_file,
            shutdown_timeout,
            startup_timeout,
            watch: raw.watch,
            supervise: raw.supervise,
            log,
            timeouts,
            max_connections,
            max_draining,
            max_headers,
            listeners,
        })
    }

    fn access_log(
        &self,
        a: &Spanned<raw::AccessLog>,
        key: &str,
    ) -> Result<AccessLogConfig, ConfigError> {
        let a = &a.value;
        let path = match a.path.value.as_str() {
            "" => return self.err(Pos::from(&a.path), format!("{key}.path: must not be empty")),
            "stderr" => None,
            p => Some(self.file.parent().unwrap_or(Path::new("/")).join(p)),
        };
        let format = match a.format.as_ref().map(|f| (f, f.value.as_str())) {
            None | Some((_, "json")) => AccessLogFormat::Json,
            Some((_, "combined")) => AccessLogFormat::Combined,
            Some((f, other)) => {
                return self.err(
                    Pos::from(f),
                    format!("{key}.format: {other:?} is not a format (use json or combined)"),
                )
            }
        };
        Ok(AccessLogConfig { path, format })
    }

    /// The stored certificate and key of an ACME listener, and its names
    /// (lower case, each a DNS name).
    fn acme_cert(
        &self,
        names: &Spanned<Vec<Spanned<String>>>,
        storage: Option<&Path>,
        key: String,
    ) -> Result<(FileRef, FileRef, Vec<String>), ConfigError> {
        let Some(storage) = storage else {
            return self.err(
                Pos::from(names),
                format!("{key}: needs an `acme:` section (directory, storage)"),
            );
        };
        if names.value.is_empty() {
            return self.err(
                Pos::from(names),
                format!("{key}: must name at least one name"),
            );
        }
        let mut list = Vec::new();
        for n in &names.value {
            let name = n.value.to_ascii_lowercase();
            if rustls_pki_types::DnsName::try_from(name.as_str()).is_err() || !name.contains('.') {
                return self.err(
                    Pos::from(n),
                    format!("{key}: {:?} is not a DNS name", n.value),
                );
            }
            list.push(name);
        }
        let dir = storage.join("certs").join(&list[0]);
        let stored = |file: &str| FileRef {
            path: dir.join(file),
            written: dir.join(file).display().to_string(),
            key: key.clone(),
            pos: Pos::from(names),
        };
        Ok((stored("cert.pem"), stored("key.pem"), list))
    }

    /// Refuses the first of `keys` of `section` that is given: they only
    /// mean something with a shared store.
    fn only_with_store(
        &self,
        section: &str,
        keys: &[(&Option<Spanned<String>>, &str)],
    ) -> Result<(), ConfigError> {
        match keys
            .iter()
            .find_map(|(v, key)| v.as_ref().map(|v| (v, key)))
        {
            Some((v, key)) => self.err(
                Pos::from(v),
                format!("{section}.{key}: only with a shared store (storage: redis://...)"),
            ),
            None => Ok(()),
        }
    }

    /// `tls_tickets:`: a key file or a store, one of them.
    fn tickets(&self, t: &Spanned<raw::TlsTickets>) -> Result<TicketsConfig, ConfigError> {
        let raw = &t.value;
        match (&raw.key_file, &raw.storage) {
            (Some(f), None) => {
                self.only_with_store(
                    "tls_tickets",
                    &[
                        (&raw.storage_key_file, "storage_key_file"),
                        (&raw.storage_ca, "storage_ca"),
                    ],
                )?;
                Ok(TicketsConfig::KeyFile(
                    self.file_ref(f, "tls_tickets.key_file".into())?,
                ))
            }
            (None, Some(s)) if is_store_url(&s.value) => Ok(TicketsConfig::Store(Box::new(self.store(
                s,
                &raw.storage_key_file,
                &raw.storage_ca,
                "tls_tickets",
            )?))),
            (None, Some(s)) => self.err(
                Pos::from(s),
                format!(
                    "tls_tickets.storage: {:?} is not a redis://, rediss:// or redis+sentinel:// URL",
                    s.value
                ),
            ),
            (Some(_), Some(s)) => {
                self.err(Pos::from(s), "tls_tickets: key_file or storage, not both")
            }
            (None, None) => self.err(
                Pos::from(t),
                "tls_tickets: needs key_file or storage (redis://...)",
            ),
        }
    }

    /// A shared store: `url` (checked as the Redis client reads it), and
    /// the `storage_key_file` and `storage_ca` beside it in `section`.
    fn store(
        &self,
        url: &Spanned<String>,
        key_file: &Option<Spanned<String>>,
        ca: &Option<Spanned<String>>,
        section: &str,
    ) -> Result<StoreConfig, ConfigError> {
        use redis::IntoConnectionInfo;
        let shown = without_password(&url.value);
        let sentinel = if url.value.starts_with(SENTINEL) {
            match sentinel_url(&url.value) {
                Ok(s) => Some(s),
                Err(e) => {
                    return self.err(Pos::from(url), format!("{section}.storage: {shown}: {e}"))
                }
            }
        } else {
            if let Err(e) = url.value.as_str().into_connection_info() {
                return self.err(Pos::from(url), format!("{section}.storage: {shown}: {e}"));
            }
            None
        };
        if let (Some(_), Some(ca)) = (&sentinel, ca) {
            return self.err(
                Pos::from(ca),
                format!("{section}.storage_ca: Sentinels over TLS are not supported (redis+sentinel:// is plain)"),
            );
        }
        let file = |v: &Option<Spanned<String>>, key: &str| match v {
            Some(v) => self.file_ref(v, format!("{section}.{key}")).map(Some),
            None => Ok(None),
        };
        Ok(StoreConfig {
            url: url.value.clone(),
            shown,
            ca: file(ca, "storage_ca")?,
            key_file: file(key_file, "storage_key_file")?,
            sentinel,
        })
    }

    fn acme(&self, a: &Spanned<raw::Acme>) -> Result<AcmeConfig, ConfigError> {
        let a = &a.value;
        let directory = a.directory.value.clone();
        if !(directory.starts_with("https://") || directory.starts_with("http://"))
            || directory.parse::<http::Uri>().is_err()
        {
            return self.err(
                Pos::from(&a.directory),
                format!("acme.directory: {directory:?} is not an http(s) URL"),
            );
        }
        let dir = self.file.parent().unwrap_or(Path::new("/"));
        let shared = match &a.storage {
            Some(s) if is_store_url(&s.value) => {
                Some(self.store(s, &a.storage_key_file, &a.storage_ca, "acme")?)
            }
            _ => None,
        };
        if shared.is_none() {
            self.only_with_store(
                "acme",
                &[
                    (&a.storage_key_file, "storage_key_file"),
                    (&a.storage_ca, "storage_ca"),
                    (&a.cache, "cache"),
                ],
            )?;
        }
        let local = if shared.is_some() {
            &a.cache
        } else {
            &a.storage
        };
        let storage = match local {
            Some(s) if s.value.is_empty() => {
                let key = if shared.is_some() { "cache" } else { "storage" };
                return self.err(Pos::from(s), format!("acme.{key}: must not be empty"));
            }
            Some(s) => dir.join(&s.value),
            None => dir.join("acme"),
        };
        let challenge = match a.challenge.as_ref().map(|c| (c, c.value.as_str())) {
            None | Some((_, "tls-alpn-01")) => Challenge::TlsAlpn01,
            Some((_, "http-01")) => Challenge::Http01,
            Some((c, other)) => {
                return self.err(
                    Pos::from(c),
                    format!(
                        "acme.challenge: {other:?} is not supported (use tls-alpn-01 or http-01)"
                    ),
                )
            }
        };
        let ca_roots = match &a.ca_roots {
            Some(c) => Some(self.file_ref(c, "acme.ca_roots".into())?),
            None => None,
        };
        let lock_ttl = self.duration(&a.lock_ttl, "acme.lock_ttl", Duration::from_secs(60))?;
        if lock_ttl < Duration::from_secs(3) {
            if let Some(v) = &a.lock_ttl {
                return self.err(
                    Pos::from(v),
                    "acme.lock_ttl: at least 3s (it is renewed every third of it)",
                );
            }
        }
        Ok(AcmeConfig {
            directory,
            email: a.email.as_ref().map(|e| e.value.clone()),
            storage,
            shared,
            lock_ttl,
            ca_roots,
            challenge,
            renew_before: self.duration(
                &a.renew_before,
                "acme.renew_before",
                Duration::from_secs(30 * 86400),
            )?,
        })
    }

    fn listener(
        &self,
        i: usize,
        l: &Spanned<raw::Listener>,
        acme_storage: Option<&Path>,
    ) -> Result<ListenerConfig, ConfigError> {
        let raw = &l.value;
        let name = &self.name(&raw.name, &format!("listeners[{i}].name"))?;
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
                let (cert, key, acme) = match (&t.cert, &t.key, &t.acme) {
                    (Some(c), Some(k2), None) => (
                        self.file_ref(c, k("cert"))?,
                        self.file_ref(k2, k("key"))?,
                        Vec::new(),
                    ),
                    (None, None, Some(names)) => self.acme_cert(names, acme_storage, k("acme"))?,
                    (_, _, Some(names)) => {
                        return self.err(
                            Pos::from(names),
                            format!(
                                "{}: a listener has either acme or cert and key, not both",
                                k("acme")
                            ),
                        )
                    }
                    _ => {
                        return self.err(
                            Pos::from(l),
                            format!("{}: needs cert and key (or acme)", k("cert")),
                        )
                    }
                };
                Some(TlsConfig {
                    cert,
                    key,
                    acme,
                    sni,
                    alpn,
                })
            }
        };
        let defaults = self.options(
            super::options::RawOptions {
                headers: &raw.headers,
                cache: &raw.cache,
                allow: &raw.allow,
                deny: &raw.deny,
                basic_auth: &raw.basic_auth,
                rate_limit: &raw.rate_limit,
                compress: &raw.compress,
            },
            &format!("listeners[{i}]"),
            None,
        )?;
        let mut trusted_proxies = Vec::new();
        for (k, c) in raw.trusted_proxies.iter().enumerate() {
            trusted_proxies.push(self.cidr(c, &format!("listeners[{i}].trusted_proxies[{k}]"))?);
        }
        let mut routes = Vec::new();
        let mut paths = HashSet::new();
        for (j, r) in raw.routes.iter().enumerate() {
            let route = self.route(&format!("listeners[{i}].routes[{j}]"), r, &defaults)?;
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
        let access_log = match &raw.access_log {
            Some(a) => Some(self.access_log(a, &format!("listeners[{i}].access_log"))?),
            None => None,
        };
        let http3 = match &raw.http3 {
            Some(h) if h.value && tls.is_none() => {
                return self.err(
                    Pos::from(h),
                    format!("listeners[{i}].http3: HTTP/3 needs tls on the listener"),
                )
            }
            Some(h) => h.value,
            None => false,
        };
        Ok(ListenerConfig {
            name: name.clone(),
            addr,
            tls,
            http3,
            access_log,
            routes,
            trusted_proxies,
        })
    }

    fn route(
        &self,
        key: &str,
        r: &Spanned<raw::Route>,
        listener: &RouteOptions,
    ) -> Result<RouteConfig, ConfigError> {
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
            raw.metrics.is_some(),
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
                    "{key}: route {what}: give exactly one of respond, static, redirect, status, metrics, proxy"
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
            let fallback = match &s.value.fallback {
                None => None,
                Some(f) => {
                    // A file under root, named relative to it.
                    let bad = f.value.is_empty()
                        || f.value.starts_with('/')
                        || f.value.split('/').any(|c| c == ".." || c.is_empty());
                    if bad {
                        return self.err(
                            Pos::from(f),
                            format!("{key}.static.fallback: {:?} is not a file under root (index.html, app/index.html)", f.value),
                        );
                    }
                    Some(f.value.clone())
                }
            };
            Action::Static {
                root: self.file_ref(&s.value.root, format!("{key}.static.root"))?,
                index: s.value.index.clone().unwrap_or_else(|| "index.html".into()),
                fallback,
                browse: s.value.browse,
                file_cache: s.value.file_cache.unwrap_or(true),
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
            Action::Proxy(Box::new(self.proxy(key, p)?))
        } else if raw.metrics.is_some() {
            Action::Metrics
        } else {
            Action::Status
        };
        let options = self.options(
            super::options::RawOptions {
                headers: &raw.headers,
                cache: &raw.cache,
                allow: &raw.allow,
                deny: &raw.deny,
                basic_auth: &raw.basic_auth,
                rate_limit: &raw.rate_limit,
                compress: &raw.compress,
            },
            key,
            Some(listener),
        )?;
        Ok(RouteConfig {
            path,
            action,
            pos,
            options,
        })
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

const SENTINEL: &str = "redis+sentinel://";

/// Is `storage` a store's URL rather than a directory?
fn is_store_url(storage: &str) -> bool {
    storage.starts_with("redis://")
        || storage.starts_with("rediss://")
        || storage.starts_with(SENTINEL)
}

/// The parts of a `redis+sentinel://` URL.
fn sentinel_url(url: &str) -> Result<SentinelUrl, String> {
    use redis::IntoConnectionInfo;
    let rest = url.strip_prefix(SENTINEL).unwrap_or(url);
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let (user, password) = match userinfo.map(|u| u.split_once(':').unwrap_or(("", u))) {
        Some((u, p)) => (
            (!u.is_empty()).then(|| u.to_string()),
            (!p.is_empty()).then(|| p.to_string()),
        ),
        None => (None, None),
    };
    let mut sentinels = Vec::new();
    for host in hosts.split(',') {
        let one = format!("redis://{host}");
        let port_given = host
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok());
        if !port_given || one.as_str().into_connection_info().is_err() {
            return Err(format!("{host:?} is not a Sentinel's HOST:PORT"));
        }
        sentinels.push(one);
    }
    let mut parts = path.split('/');
    let service = parts.next().unwrap_or("").to_string();
    if service.is_empty() {
        return Err("names no service (redis+sentinel://HOST:PORT/SERVICE/DB)".into());
    }
    let db = match parts.next() {
        None | Some("") => 0,
        Some(d) => d
            .parse()
            .map_err(|_| format!("database {d:?} is not a number"))?,
    };
    Ok(SentinelUrl {
        sentinels,
        service,
        db,
        user,
        password,
    })
}

/// `url` with the password of its user part (if any) replaced by `***`.
pub(crate) fn without_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let user = rest[..at].split(':').next().unwrap_or("");
            let user = if rest[..at].contains(':') {
                format!("{user}:***")
            } else {
                "***".to_string()
            };
            format!("{scheme}://{user}@{}", &rest[at + 1..])
        }
        None => url.to_string(),
    }
}
