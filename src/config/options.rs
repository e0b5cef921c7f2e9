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
}

impl RouteOptions {
    /// Each option the route does not set, from the listener.
    fn or(self, listener: &RouteOptions) -> RouteOptions {
        RouteOptions {
            headers: self.headers.or_else(|| listener.headers.clone()),
            cache: self.cache.or_else(|| listener.cache.clone()),
            allow: self.allow.or_else(|| listener.allow.clone()),
            deny: self.deny.or_else(|| listener.deny.clone()),
            basic_auth: self.basic_auth.or_else(|| listener.basic_auth.clone()),
        }
    }
}

/// `cache: { max_age, immutable, public }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cache {
    pub(crate) max_age: Duration,
    pub(crate) immutable: bool,
    pub(crate) public: bool,
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
                public: c.value.public.unwrap_or(true),
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
        let own = RouteOptions {
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
