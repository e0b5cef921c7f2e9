//! `proxy:` routes, checked and given their defaults: the upstreams and how
//! one is picked, their health, TLS and protocol, and the header rules.

use super::validate::Validator;
use super::*;

/// Placeholders a header rule's value may name.
const PLACEHOLDERS: [(&str, Piece); 3] = [
    ("host", Piece::Host),
    ("remote", Piece::Remote),
    ("pid", Piece::Pid),
];

impl Validator<'_> {
    pub(super) fn proxy(
        &self,
        key: &str,
        p: &Spanned<raw::Proxy>,
    ) -> Result<ProxyConfig, ConfigError> {
        let v = &p.value;
        let key = format!("{key}.proxy");
        let upstreams = match (&v.upstream, &v.app, &v.upstreams) {
            (Some(url), None, None) => vec![UpstreamConfig {
                target: self.upstream_url(url, &format!("{key}.upstream"))?,
                weight: 1,
            }],
            (None, Some(app), None) => vec![UpstreamConfig {
                target: ProxyTarget::App(app.value.clone()),
                weight: 1,
            }],
            (None, None, Some(list)) if !list.value.is_empty() => {
                let mut out = Vec::new();
                for (i, u) in list.value.iter().enumerate() {
                    out.push(self.upstream(u, &format!("{key}.upstreams[{i}]"))?);
                }
                out
            }
            (None, None, Some(list)) => {
                return self.err(
                    Pos::from(list),
                    format!("{key}.upstreams: name at least one upstream"),
                )
            }
            _ => {
                return self.err(
                    Pos::from(p),
                    format!("{key}: give exactly one of upstream, app, upstreams"),
                )
            }
        };
        let policy = self.policy(v, &key)?;
        let protocol = match v.protocol.as_ref().map(|s| (s, s.value.as_str())) {
            None | Some((_, "h1")) => UpstreamProtocol::H1,
            Some((_, "h2")) => UpstreamProtocol::H2,
            Some((_, "h2c")) => UpstreamProtocol::H2c,
            Some((s, other)) => {
                return self.err(
                    Pos::from(s),
                    format!("{key}.protocol: {other:?} is not a protocol (use h1, h2 or h2c)"),
                )
            }
        };
        // h2 is negotiated by TLS (ALPN), h2c spoken in the clear.
        for u in &upstreams {
            let ProxyTarget::Upstream(uri) = &u.target else {
                continue;
            };
            let tls = uri.scheme_str() == Some("https");
            let wrong = match protocol {
                UpstreamProtocol::H2 if !tls => {
                    Some("h2 is spoken over TLS: use https:// upstreams, or protocol: h2c")
                }
                UpstreamProtocol::H2c if tls => {
                    Some("h2c is HTTP/2 in the clear: use http:// upstreams, or protocol: h2")
                }
                _ => None,
            };
            if let Some(why) = wrong {
                let pos = v.protocol.as_ref().map(Pos::from);
                return self.err(pos, format!("{key}.protocol: {why} ({uri})"));
            }
        }
        let tls = self.upstream_tls(v, &key)?;
        Ok(ProxyConfig {
            upstreams,
            policy,
            health: match &v.health {
                Some(h) => Some(self.active_health(h, &format!("{key}.health"))?),
                None => None,
            },
            passive: self.passive(&v.passive, &format!("{key}.passive"))?,
            try_duration: self.duration(
                &v.try_duration,
                &format!("{key}.try_duration"),
                Duration::ZERO,
            )?,
            tls,
            protocol,
            request_headers: self
                .header_rules(&v.request_headers, &format!("{key}.request_headers"))?,
            response_headers: self
                .header_rules(&v.response_headers, &format!("{key}.response_headers"))?,
            host: match v.host.as_ref().map(|h| (h, h.value.as_str())) {
                None | Some((_, "keep")) => HostRule::Keep,
                Some((_, "upstream")) => HostRule::Upstream,
                Some((h, value)) => match http::HeaderValue::from_str(value) {
                    Ok(v) if !value.is_empty() && value.parse::<http::uri::Authority>().is_ok() => {
                        HostRule::Fixed(v)
                    }
                    _ => {
                        return self.err(
                            Pos::from(h),
                            format!("{key}.host: {value:?} is not keep, upstream or a host name"),
                        )
                    }
                },
            },
            connect_timeout: self.duration(
                &v.connect_timeout,
                &format!("{key}.connect_timeout"),
                Duration::from_secs(5),
            )?,
            timeout: self.duration(
                &v.timeout,
                &format!("{key}.timeout"),
                Duration::from_secs(60),
            )?,
            strip_prefix: v.strip_prefix,
            max_body: match &v.max_body {
                None => None,
                Some(m) => Some(
                    parse_size(&m.value)
                        .or_else(|e| self.err(Pos::from(m), format!("{key}.max_body: {e}")))?,
                ),
            },
        })
    }

    fn upstream(
        &self,
        u: &Spanned<raw::Upstream>,
        key: &str,
    ) -> Result<UpstreamConfig, ConfigError> {
        let target = match (&u.value.url, &u.value.app) {
            (Some(url), None) => self.upstream_url(url, &format!("{key}.url"))?,
            (None, Some(app)) => ProxyTarget::App(app.value.clone()),
            _ => return self.err(Pos::from(u), format!("{key}: give exactly one of url, app")),
        };
        let weight = match &u.value.weight {
            None => 1,
            Some(w) => match u32::try_from(w.value) {
                Ok(w @ 1..=1000) => w,
                _ => {
                    return self.err(
                        Pos::from(w),
                        format!("{key}.weight: {} is not a weight (1 to 1000)", w.value),
                    )
                }
            },
        };
        Ok(UpstreamConfig { target, weight })
    }

    /// `http://host:port` or `https://host:port`, with no path or query.
    fn upstream_url(&self, url: &Spanned<String>, key: &str) -> Result<ProxyTarget, ConfigError> {
        let bad = |why: &str| self.err(Pos::from(url), format!("{key}: {:?} {why}", url.value));
        let Ok(uri) = url.value.parse::<http::Uri>() else {
            return bad("is not http://host:port or https://host:port");
        };
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.authority().is_none() {
            return bad("is not http://host:port or https://host:port");
        }
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            return bad("has user information, which an upstream URL cannot carry");
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return bad("has a path: an upstream is an origin (the route's path is kept, or stripped with strip_prefix)");
        }
        Ok(ProxyTarget::Upstream(uri))
    }

    fn policy(&self, v: &raw::Proxy, key: &str) -> Result<Policy, ConfigError> {
        let policy = match v.policy.as_ref().map(|s| (s, s.value.as_str())) {
            None | Some((_, "round_robin")) => Policy::RoundRobin,
            Some((_, "least_conn")) => Policy::LeastConn,
            Some((_, "random_two")) => Policy::RandomTwo,
            Some((_, "hash")) => {
                let hash_key = match v.hash_key.as_ref().map(|s| (s, s.value.as_str())) {
                    None | Some((_, "remote")) => HashKey::Remote,
                    Some((s, k)) => {
                        if let Some(name) = k.strip_prefix("header:") {
                            match http::HeaderName::from_bytes(name.as_bytes()) {
                                Ok(n) => HashKey::Header(n),
                                Err(_) => {
                                    return self.err(
                                        Pos::from(s),
                                        format!("{key}.hash_key: {name:?} is not a header name"),
                                    )
                                }
                            }
                        } else if let Some(name) = k.strip_prefix("cookie:").filter(|n| {
                            !n.is_empty() && n.bytes().all(|b| b.is_ascii_graphic() && !b"=;,".contains(&b))
                        }) {
                            HashKey::Cookie(name.to_string())
                        } else {
                            return self.err(
                                Pos::from(s),
                                format!(
                                    "{key}.hash_key: {k:?} is not a key (use remote, header:NAME or cookie:NAME)"
                                ),
                            );
                        }
                    }
                };
                return Ok(Policy::Hash(hash_key));
            }
            Some((s, other)) => {
                return self.err(
                    Pos::from(s),
                    format!(
                        "{key}.policy: {other:?} is not a policy (use round_robin, least_conn, random_two or hash)"
                    ),
                )
            }
        };
        if let Some(k) = &v.hash_key {
            return self.err(
                Pos::from(k),
                format!("{key}.hash_key: only with policy: hash"),
            );
        }
        Ok(policy)
    }

    fn active_health(
        &self,
        h: &Spanned<raw::Health>,
        key: &str,
    ) -> Result<ActiveHealth, ConfigError> {
        let v = &h.value;
        let path = match &v.path {
            Some(p)
                if p.value.starts_with('/')
                    && p.value.parse::<http::uri::PathAndQuery>().is_ok() =>
            {
                p.value.clone()
            }
            Some(p) => {
                return self.err(
                    Pos::from(p),
                    format!("{key}.path: {:?} is not a path starting with /", p.value),
                )
            }
            None => return self.err(Pos::from(h), format!("{key}.path: missing")),
        };
        let interval = self.duration(
            &v.interval,
            &format!("{key}.interval"),
            Duration::from_secs(5),
        )?;
        let timeout = self.duration(
            &v.timeout,
            &format!("{key}.timeout"),
            Duration::from_secs(2),
        )?;
        if interval.is_zero() {
            return self.err(
                v.interval.as_ref().map(Pos::from),
                format!("{key}.interval: must be more than 0s"),
            );
        }
        let expect_status = match &v.expect_status {
            None => 200,
            Some(s) if (100..600).contains(&s.value) => s.value,
            Some(s) => {
                return self.err(
                    Pos::from(s),
                    format!("{key}.expect_status: {} is not a status", s.value),
                )
            }
        };
        Ok(ActiveHealth {
            path,
            interval,
            timeout: timeout.max(Duration::from_millis(1)),
            expect_status,
        })
    }

    fn passive(
        &self,
        p: &Option<Spanned<raw::Passive>>,
        key: &str,
    ) -> Result<Passive, ConfigError> {
        let none = raw::Passive {
            max_fails: None,
            fail_window: None,
            fail_timeout: None,
            unhealthy_status: Vec::new(),
        };
        let v = p.as_ref().map(|p| &p.value).unwrap_or(&none);
        let max_fails = match &v.max_fails {
            None => 1,
            Some(m) => match u32::try_from(m.value) {
                Ok(m @ 1..) => m,
                _ => {
                    return self.err(
                        Pos::from(m),
                        format!("{key}.max_fails: {} is not a count (1 or more)", m.value),
                    )
                }
            },
        };
        let mut unhealthy_status = Vec::new();
        for s in &v.unhealthy_status {
            if !(100..600).contains(&s.value) {
                return self.err(
                    Pos::from(s),
                    format!("{key}.unhealthy_status: {} is not a status", s.value),
                );
            }
            unhealthy_status.push(s.value);
        }
        Ok(Passive {
            max_fails,
            fail_window: self.duration(
                &v.fail_window,
                &format!("{key}.fail_window"),
                Duration::from_secs(10),
            )?,
            fail_timeout: self.duration(
                &v.fail_timeout,
                &format!("{key}.fail_timeout"),
                Duration::from_secs(10),
            )?,
            unhealthy_status,
        })
    }

    fn upstream_tls(&self, v: &raw::Proxy, key: &str) -> Result<UpstreamTls, ConfigError> {
        let insecure = v.tls_insecure_skip_verify.as_ref().is_some_and(|b| b.value);
        let Some(t) = &v.tls else {
            return Ok(UpstreamTls {
                insecure_skip_verify: insecure,
                ..Default::default()
            });
        };
        let t = &t.value;
        let file =
            |f: &Option<Spanned<String>>, name: &str| -> Result<Option<FileRef>, ConfigError> {
                f.as_ref()
                    .map(|f| self.file_ref(f, format!("{key}.tls.{name}")))
                    .transpose()
            };
        let client = match (file(&t.cert, "cert")?, file(&t.key, "key")?) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            (Some(c), None) => {
                return self.err(c.pos, format!("{key}.tls: a client cert needs its key"))
            }
            (None, Some(k)) => {
                return self.err(k.pos, format!("{key}.tls: a client key needs its cert"))
            }
        };
        let server_name = match &t.server_name {
            None => None,
            Some(s) => match rustls_pki_types::ServerName::try_from(s.value.as_str()) {
                Ok(_) => Some(s.value.clone()),
                Err(_) => {
                    return self.err(
                        Pos::from(s),
                        format!(
                            "{key}.tls.server_name: {:?} is not a DNS name or address",
                            s.value
                        ),
                    )
                }
            },
        };
        Ok(UpstreamTls {
            ca: file(&t.ca, "ca")?,
            client,
            server_name,
            insecure_skip_verify: insecure,
        })
    }

    pub(super) fn header_rules(
        &self,
        r: &Option<Spanned<raw::HeaderRules>>,
        key: &str,
    ) -> Result<HeaderRules, ConfigError> {
        let Some(r) = r else {
            return Ok(HeaderRules::default());
        };
        let name = |n: &str, pos: Pos, what: &str| {
            http::HeaderName::from_bytes(n.as_bytes())
                .or_else(|_| self.err(pos, format!("{key}.{what}: {n:?} is not a header name")))
        };
        let mut rules = HeaderRules::default();
        for (what, map, out) in [
            ("set", &r.value.set, &mut rules.set),
            ("add", &r.value.add, &mut rules.add),
        ] {
            for (n, value) in map {
                let n = name(n, Pos::from(value), what)?;
                let t = self.template(value, &format!("{key}.{what}.{n}"))?;
                out.push((n, t));
            }
        }
        for n in &r.value.remove {
            rules.remove.push(name(&n.value, Pos::from(n), "remove")?);
        }
        Ok(rules)
    }

    /// A header value with `{host}`, `{remote}`, `{pid}` in it.
    fn template(&self, v: &Spanned<String>, key: &str) -> Result<Template, ConfigError> {
        let mut pieces = Vec::new();
        let mut rest = v.value.as_str();
        while let Some(open) = rest.find('{') {
            let Some(len) = rest[open..].find('}') else {
                break;
            };
            let name = &rest[open + 1..open + len];
            let Some((_, piece)) = PLACEHOLDERS.iter().find(|(n, _)| *n == name) else {
                return self.err(
                    Pos::from(v),
                    format!("{key}: unknown placeholder {{{name}}} (use {{host}}, {{remote}} or {{pid}})"),
                );
            };
            if open > 0 {
                pieces.push(Piece::Text(rest[..open].to_string()));
            }
            pieces.push(piece.clone());
            rest = &rest[open + len + 1..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.to_string()));
        }
        for p in &pieces {
            if let Piece::Text(t) = p {
                if http::HeaderValue::from_str(t).is_err() {
                    return self.err(
                        Pos::from(v),
                        format!("{key}: {:?} is not a header value", v.value),
                    );
                }
            }
        }
        Ok(Template(pieces))
    }
}
