//! Options every route action composes with (`headers`, `cache`, `allow`,
//! `deny`, `basic_auth`), checked; written on a listener they apply to each
//! of its routes that does not write its own.

use super::validate::Validator;
use super::*;

/// A route's options, the listener's filled in.
#[derive(Debug, Clone, Default)]
pub(crate) struct RouteOptions {
    /// Response header rules.
    pub(crate) headers: Option<HeaderRules>,
    pub(crate) cache: Option<Cache>,
    /// Only these client addresses (empty: any).
    pub(crate) allow: Option<Vec<ipnet::IpNet>>,
    /// Never these.
    pub(crate) deny: Option<Vec<ipnet::IpNet>>,
    pub(crate) basic_auth: Option<BasicAuthConfig>,
    pub(crate) rate_limit: Option<RateLimitConfig>,
    /// `Some(None)`: written off; `None`: not written (then `static`
    /// compresses, the others do not).
    pub(crate) compress: Option<Option<CompressConfig>>,
}

/// An encoding `compress` may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Encoding {
    Zstd,
    Br,
    Gzip,
}

/// `compress: { encodings, min_size, level }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CompressConfig {
    /// In order of preference.
    pub(crate) encodings: Vec<Encoding>,
    pub(crate) min_size: u64,
    pub(crate) level: CompressLevel,
}

/// `level:`: `default` is each encoding's level for answers made on the
/// fly (gzip 6, as nginx's `gzip_comp_level` people set; Brotli 4; zstd 3),
/// not the slow maximum of Brotli's own default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CompressLevel {
    Default,
    Fastest,
    Best,
    Precise(i32),
}

impl Default for CompressConfig {
    fn default() -> CompressConfig {
        CompressConfig {
            encodings: vec![Encoding::Zstd, Encoding::Br, Encoding::Gzip],
            min_size: 1024,
            level: CompressLevel::Default,
        }
    }
}

/// `rate_limit: { requests, per, burst, key }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RateLimitConfig {
    pub(crate) requests: u32,
    pub(crate) per: Duration,
    pub(crate) burst: u32,
    /// `None`: the client's address; else this header's value.
    pub(crate) key: Option<http::HeaderName>,
}

impl RouteOptions {
    /// How the route compresses: as written, else `static` routes with the
    /// defaults and the others not at all.
    pub(crate) fn compression(&self, is_static: bool) -> Option<CompressConfig> {
        match &self.compress {
            Some(c) => c.clone(),
            None if is_static => Some(CompressConfig::default()),
            None => None,
        }
    }

    /// The options in force, for `gracesrv check`: one short item each
    /// (`static` routes compress unless told not to).
    pub(crate) fn summary(&self, is_static: bool) -> Vec<String> {
        let nets = |n: &[ipnet::IpNet]| {
            n.iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        };
        let mut out = Vec::new();
        if let Some(c) = self.compression(is_static) {
            let names: Vec<&str> = c.encodings.iter().map(|e| e.token()).collect();
            let level = match c.level {
                CompressLevel::Default => "default".to_string(),
                CompressLevel::Fastest => "fastest".to_string(),
                CompressLevel::Best => "best".to_string(),
                CompressLevel::Precise(n) => n.to_string(),
            };
            out.push(format!(
                "compress {} (min {} B, level {level})",
                names.join(","),
                c.min_size,
            ));
        }
        if let Some(c) = &self.cache {
            out.push(format!(
                "cache {}max-age={}{}",
                match c.public {
                    Some(true) => "public ",
                    Some(false) => "private ",
                    None => "",
                },
                c.max_age.as_secs(),
                if c.immutable { " immutable" } else { "" }
            ));
        }
        if let Some(h) = self.headers.as_ref().filter(|h| !h.is_empty()) {
            let names = |v: &[(http::HeaderName, Template)]| {
                v.iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            };
            let mut rules = Vec::new();
            if !h.set.is_empty() {
                rules.push(format!("set {}", names(&h.set)));
            }
            if !h.add.is_empty() {
                rules.push(format!("add {}", names(&h.add)));
            }
            if !h.remove.is_empty() {
                let removed: Vec<&str> = h.remove.iter().map(|n| n.as_str()).collect();
                rules.push(format!("remove {}", removed.join(",")));
            }
            out.push(format!("headers {}", rules.join(" ")));
        }
        if let Some(a) = self.allow.as_deref().filter(|a| !a.is_empty()) {
            out.push(format!("allow {}", nets(a)));
        }
        if let Some(d) = self.deny.as_deref().filter(|d| !d.is_empty()) {
            out.push(format!("deny {}", nets(d)));
        }
        if let Some(b) = &self.basic_auth {
            out.push(format!(
                "basic_auth {:?} ({})",
                b.realm, b.users_file.written
            ));
        }
        if let Some(r) = &self.rate_limit {
            let key = r.key.as_ref().map_or("remote", |k| k.as_str());
            out.push(format!(
                "rate_limit {}/{:?} burst {} by {key}",
                r.requests, r.per, r.burst
            ));
        }
        out
    }

    /// Each option the route does not set, from the listener.
    fn or(self, listener: &RouteOptions) -> RouteOptions {
        RouteOptions {
            headers: self.headers.or_else(|| listener.headers.clone()),
            cache: self.cache.or_else(|| listener.cache.clone()),
            allow: self.allow.or_else(|| listener.allow.clone()),
            deny: self.deny.or_else(|| listener.deny.clone()),
            basic_auth: self.basic_auth.or_else(|| listener.basic_auth.clone()),
            rate_limit: self.rate_limit.or_else(|| listener.rate_limit.clone()),
            compress: self.compress.or_else(|| listener.compress.clone()),
        }
    }
}

/// `cache: { max_age, immutable, public }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cache {
    pub(crate) max_age: Duration,
    pub(crate) immutable: bool,
    /// `public` or `private` written; neither when not said (any cache may
    /// store the answer to a request without credentials: `public` is for
    /// answers to requests with them).
    pub(crate) public: Option<bool>,
}

/// `basic_auth: { realm, users_file }`; the file is read with the routes.
#[derive(Debug, Clone)]
pub(crate) struct BasicAuthConfig {
    pub(crate) realm: String,
    pub(crate) users_file: FileRef,
}

/// The raw options of a route or a listener.
pub(super) struct RawOptions<'a> {
    pub(super) headers: &'a Option<Spanned<raw::HeaderRules>>,
    pub(super) cache: &'a Option<Spanned<raw::Cache>>,
    pub(super) allow: &'a Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) deny: &'a Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) basic_auth: &'a Option<Spanned<raw::BasicAuth>>,
    pub(super) rate_limit: &'a Option<Spanned<raw::RateLimit>>,
    pub(super) compress: &'a Option<Spanned<raw::Compress>>,
}

impl Validator<'_> {
    /// `o` checked (`key` names where it is), over `listener`'s.
    pub(super) fn options(
        &self,
        o: RawOptions<'_>,
        key: &str,
        listener: Option<&RouteOptions>,
    ) -> Result<RouteOptions, ConfigError> {
        let headers = match o.headers {
            Some(_) => Some(self.header_rules(o.headers, &format!("{key}.headers"))?),
            None => None,
        };
        let cache = match o.cache {
            None => None,
            Some(c) => Some(Cache {
                max_age: self.duration(
                    &Some(c.value.max_age.clone()),
                    &format!("{key}.cache.max_age"),
                    Duration::ZERO,
                )?,
                immutable: c.value.immutable,
                public: c.value.public,
            }),
        };
        let basic_auth = match o.basic_auth {
            None => None,
            Some(b) => {
                let realm = b.value.realm.as_ref().map_or("restricted", |r| &r.value);
                if realm.is_empty() || realm.contains(['"', '\\']) || !realm.is_ascii() {
                    return self.err(
                        b.value.realm.as_ref().map(Pos::from),
                        format!("{key}.basic_auth.realm: {realm:?} must be ASCII, not empty, without quotes or backslashes"),
                    );
                }
                Some(BasicAuthConfig {
                    realm: realm.to_string(),
                    users_file: self
                        .file_ref(&b.value.users_file, format!("{key}.basic_auth.users_file"))?,
                })
            }
        };
        let rate_limit = match o.rate_limit {
            None => None,
            Some(r) => Some(self.rate_limit(&r.value, &format!("{key}.rate_limit"))?),
        };
        let compress = match o.compress {
            None => None,
            Some(c) => Some(self.compress(&c.value, &format!("{key}.compress"))?),
        };
        let own = RouteOptions {
            compress,
            rate_limit,
            headers,
            cache,
            allow: self.cidrs(o.allow, &format!("{key}.allow"))?,
            deny: self.cidrs(o.deny, &format!("{key}.deny"))?,
            basic_auth,
        };
        Ok(match listener {
            Some(l) => own.or(l),
            None => own,
        })
    }

    fn compress(
        &self,
        c: &raw::Compress,
        key: &str,
    ) -> Result<Option<CompressConfig>, ConfigError> {
        let w = match c {
            raw::Compress::On(false) => return Ok(None),
            raw::Compress::On(true) => return Ok(Some(CompressConfig::default())),
            raw::Compress::With(w) => w,
        };
        let mut out = CompressConfig::default();
        if let Some(list) = &w.encodings {
            out.encodings.clear();
            for e in list {
                let enc = match e.value.as_str() {
                    "zstd" => Encoding::Zstd,
                    "br" => Encoding::Br,
                    "gzip" => Encoding::Gzip,
                    other => {
                        return self.err(
                            Pos::from(e),
                            format!(
                            "{key}.encodings: {other:?} is not an encoding (use zstd, br, gzip)"
                        ),
                        )
                    }
                };
                if !out.encodings.contains(&enc) {
                    out.encodings.push(enc);
                }
            }
            if out.encodings.is_empty() {
                return self.err(
                    None,
                    format!("{key}.encodings: name at least one (or compress: false)"),
                );
            }
        }
        if let Some(m) = &w.min_size {
            out.min_size = parse_size(&m.value)
                .or_else(|e| self.err(Pos::from(m), format!("{key}.min_size: {e}")))?;
        }
        if let Some(l) = &w.level {
            out.level = match l.value.as_str() {
                "default" => CompressLevel::Default,
                "fastest" => CompressLevel::Fastest,
                "best" => CompressLevel::Best,
                n => match n.parse::<i32>() {
                    Ok(n @ 1..=22) => CompressLevel::Precise(n),
                    _ => {
                        return self.err(
                            Pos::from(l),
                            format!("{key}.level: {n:?} is not a level (default, fastest, best, or 1 to 22; each encoding clamps to its own range)"),
                        )
                    }
                },
            };
        }
        Ok(Some(out))
    }

    fn rate_limit(&self, r: &raw::RateLimit, key: &str) -> Result<RateLimitConfig, ConfigError> {
        let requests = match u32::try_from(r.requests.value) {
            Ok(n @ 1..) => n,
            _ => {
                return self.err(
                    Pos::from(&r.requests),
                    format!(
                        "{key}.requests: {} is not a count (1 or more)",
                        r.requests.value
                    ),
                )
            }
        };
        let per = self.duration(&r.per, &format!("{key}.per"), Duration::from_secs(1))?;
        if per.is_zero() {
            return self.err(
                r.per.as_ref().map(Pos::from),
                format!("{key}.per: must be more than 0s"),
            );
        }
        let burst = match &r.burst {
            None => 0,
            Some(b) => match u32::try_from(b.value) {
                Ok(n) => n,
                Err(_) => {
                    return self.err(
                        Pos::from(b),
                        format!("{key}.burst: {} is not a count", b.value),
                    )
                }
            },
        };
        let key_name = match r.key.as_ref().map(|k| (k, k.value.as_str())) {
            None | Some((_, "remote")) => None,
            Some((k, v)) => match v
                .strip_prefix("header:")
                .map(|n| http::HeaderName::from_bytes(n.as_bytes()))
            {
                Some(Ok(n)) => Some(n),
                _ => {
                    return self.err(
                        Pos::from(k),
                        format!("{key}.key: {v:?} is not remote or header:NAME"),
                    )
                }
            },
        };
        Ok(RateLimitConfig {
            requests,
            per,
            burst,
            key: key_name,
        })
    }

    /// A list of addresses and networks (`10.0.0.0/8`, `::1`, `192.0.2.7`).
    pub(super) fn cidrs(
        &self,
        list: &Option<Spanned<Vec<Spanned<String>>>>,
        key: &str,
    ) -> Result<Option<Vec<ipnet::IpNet>>, ConfigError> {
        let Some(list) = list else { return Ok(None) };
        let mut out = Vec::new();
        for (i, c) in list.value.iter().enumerate() {
            out.push(self.cidr(c, &format!("{key}[{i}]"))?);
        }
        Ok(Some(out))
    }

    pub(super) fn cidr(&self, c: &Spanned<String>, key: &str) -> Result<ipnet::IpNet, ConfigError> {
        let v = c.value.trim();
        let net = v
            .parse::<ipnet::IpNet>()
            .or_else(|_| v.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
        match net {
            Ok(n) if n.network() == n.addr() => Ok(n),
            Ok(n) => self.err(
                Pos::from(c),
                format!(
                    "{key}: {v:?} has host bits set (did you mean {}?)",
                    n.trunc()
                ),
            ),
            Err(_) => self.err(
                Pos::from(c),
                format!("{key}: {v:?} is not an address or a network (10.0.0.0/8, ::1)"),
            ),
        }
    }
}
