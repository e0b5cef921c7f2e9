//! Who may use a route: `allow` and `deny` by the client's address (the one
//! a proxy of `trusted_proxies` names, behind one), and `basic_auth` against
//! a users file of bcrypt hashes (`htpasswd -B`) or argon2 ones (the PHC
//! strings `argon2 -e` prints, `$argon2id$v=19$m=...`).
//!
//! A password is checked on tokio's blocking threads (bcrypt and argon2 are
//! slow on purpose, and would stall every connection of a serving thread),
//! as many at once as there are cores (so that a flood of wrong passwords
//! cannot take every blocking thread, or, with argon2, their memory); a user
//! and password that passed are remembered, as a SHA-256 digest compared in
//! constant time, so that a browser's every request does not pay the hash
//! again. An unknown user costs the same as a known one (a hash of the kind
//! of the file's first: bcrypt at the file's highest cost, or argon2 with
//! the first's parameters). No password or hash is ever logged.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use http::{header, HeaderMap, HeaderValue, StatusCode};
use ipnet::IpNet;

use crate::config::{BasicAuthConfig, ConfigError};
use crate::observe::logging::Chain;
use crate::wire::body::{text, Body};

/// Remembered logins, at most (then forgotten all at once).
const REMEMBERED: usize = 4096;

/// A route's access rules.
pub(crate) struct Access {
    allow: Option<Vec<IpNet>>,
    deny: Option<Vec<IpNet>>,
    auth: Option<BasicAuth>,
}

pub(crate) struct BasicAuth {
    /// `Basic realm="..."`, for 401s.
    challenge: HeaderValue,
    /// User and bcrypt or argon2 hash.
    users: HashMap<String, String>,
    /// Digests of user:password pairs that passed.
    passed: Mutex<Vec<[u8; 32]>>,
    /// A hash of the kind of the file's first (bcrypt at the users' highest
    /// cost, or argon2 with the first's parameters) that no password
    /// matches: what an unknown user is checked against.
    dummy: String,
}

/// What the rules say of a request.
pub(crate) enum Verdict {
    Pass,
    /// Refused: the answer.
    Refused(http::Response<Body>),
    /// A password to check (off the serving thread) before it passes.
    Check(Login),
}

/// A user and password to check.
pub(crate) struct Login {
    user: String,
    password: String,
}

impl Access {
    pub(crate) fn new(
        file: &std::path::Path,
        allow: Option<Vec<IpNet>>,
        deny: Option<Vec<IpNet>>,
        auth: Option<&BasicAuthConfig>,
    ) -> Result<Option<Access>, ConfigError> {
        let auth = match auth {
            Some(a) => Some(BasicAuth::load(file, a)?),
            None => None,
        };
        if allow.is_none() && deny.is_none() && auth.is_none() {
            return Ok(None);
        }
        Ok(Some(Access { allow, deny, auth }))
    }

    /// Checks the client (its address: see [`client_address`]) and its
    /// credentials.
    pub(crate) fn check(&self, client: IpAddr, headers: &HeaderMap) -> Verdict {
        let denied = self
            .deny
            .as_ref()
            .is_some_and(|d| d.iter().any(|n| n.contains(&client)))
            || self
                .allow
                .as_ref()
                .is_some_and(|a| !a.iter().any(|n| n.contains(&client)));
        if denied {
            return Verdict::Refused(text(StatusCode::FORBIDDEN, "forbidden\n"));
        }
        let Some(auth) = &self.auth else {
            return Verdict::Pass;
        };
        match credentials(headers) {
            None => Verdict::Refused(auth.unauthorized()),
            Some(login) if auth.remembered(&login) => Verdict::Pass,
            Some(login) => Verdict::Check(login),
        }
    }

    /// Checks a password on a blocking thread: pass, or the 401.
    pub(crate) async fn login(&self, login: Login) -> Result<(), http::Response<Body>> {
        let Some(auth) = &self.auth else {
            return Ok(());
        };
        // An unknown user is checked against a hash all the same, so the
        // time taken does not say whether the user exists.
        let hash = auth.users.get(&login.user).cloned();
        let known = hash.is_some();
        let hash = hash.unwrap_or_else(|| auth.dummy.clone());
        let password = login.password.clone();
        let ok = match checks().acquire().await {
            Ok(_permit) => tokio::task::spawn_blocking(move || verify(&password, &hash))
                .await
                .unwrap_or(false),
            Err(_) => false,
        };
        if ok && known {
            auth.remember(&login);
            Ok(())
        } else {
            tracing::debug!(user = %login.user, "basic_auth: refused");
            Err(auth.unauthorized())
        }
    }
}

impl BasicAuth {
    fn load(file: &std::path::Path, c: &BasicAuthConfig) -> Result<BasicAuth, ConfigError> {
        let f = &c.users_file;
        let fail = |what: String| ConfigError::new(file, Some(f.pos), format!("{}: {what}", f.key));
        let text = std::fs::read_to_string(&f.path)
            .map_err(|e| fail(format!("cannot read {}: {e}", f.written, e = Chain(&e))))?;
        let mut users = HashMap::new();
        let mut first: Option<String> = None;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = format!("{} line {}", f.written, n + 1);
            let Some((user, hash)) = line.split_once(':') else {
                return Err(fail(format!("{at}: not user:hash")));
            };
            if user.is_empty() {
                return Err(fail(format!("{at}: no user name")));
            }
            // bcrypt or argon2 only: the others htpasswd writes (MD5,
            // SHA-1, crypt) are broken or weak.
            let bcrypt =
                ["$2y$", "$2b$", "$2a$"].iter().any(|p| hash.starts_with(p)) && hash.len() == 60;
            if !bcrypt {
                if let Err(e) = argon2_of(hash) {
                    return Err(fail(format!(
                        "{at}: the hash of {user:?} is not bcrypt or argon2 ({e}; make the file with htpasswd -B, or argon2 -e)"
                    )));
                }
            }
            first.get_or_insert_with(|| hash.to_string());
            users.insert(user.to_string(), hash.to_string());
        }
        let Some(first) = first else {
            return Err(fail(format!("{} has no users", f.written)));
        };
        // bcrypt: the costliest of the file's, as before argon2 was taken.
        let like = match first.starts_with("$argon2") {
            true => first,
            false => users
                .values()
                .filter(|h| !h.starts_with("$argon2"))
                .max_by_key(|h| bcrypt_cost(h))
                .cloned()
                .unwrap_or(first),
        };
        let dummy = dummy_like(&like).map_err(|e| fail(format!("a hash like the first: {e}")))?;
        let challenge =
            HeaderValue::from_str(&format!("Basic realm=\"{}\", charset=\"UTF-8\"", c.realm))
                .map_err(|_| fail("the realm cannot be a header value".into()))?;
        Ok(BasicAuth {
            challenge,
            users,
            passed: Mutex::new(Vec::new()),
            dummy,
        })
    }

    fn unauthorized(&self) -> http::Response<Body> {
        let mut res = text(StatusCode::UNAUTHORIZED, "unauthorized\n");
        res.headers_mut()
            .insert(header::WWW_AUTHENTICATE, self.challenge.clone());
        res
    }

    fn digest(login: &Login) -> [u8; 32] {
        let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        ctx.update(login.user.as_bytes());
        ctx.update(b"\0");
        ctx.update(login.password.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        out
    }

    fn remembered(&self, login: &Login) -> bool {
        let d = Self::digest(login);
        let passed = self.passed.lock().unwrap_or_else(|p| p.into_inner());
        // Every entry compared in full, in constant time.
        passed.iter().fold(false, |found, p| {
            found | aws_lc_rs::constant_time::verify_slices_are_equal(p, &d).is_ok()
        })
    }

    fn remember(&self, login: &Login) {
        let d = Self::digest(login);
        let mut passed = self.passed.lock().unwrap_or_else(|p| p.into_inner());
        if passed.len() >= REMEMBERED {
            passed.clear();
        }
        passed.push(d);
    }
}

/// Password checks running at once, at most: one per core.
fn checks() -> &'static tokio::sync::Semaphore {
    static CHECKS: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    CHECKS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        tokio::sync::Semaphore::new(cores)
    })
}

/// Most memory an argon2 hash of the users file may ask of a check (its
/// `m`, in KiB): 256 MiB, beyond RFC 9106's second recommended option
/// (64 MiB).
const ARGON2_MAX_KIB: u32 = 256 * 1024;

/// `hash` as an argon2 PHC string, within [`ARGON2_MAX_KIB`], with the
/// hasher its parameters make.
fn argon2_of(hash: &str) -> Result<(argon2::PasswordHash<'_>, argon2::Argon2<'static>), String> {
    let parsed = argon2::PasswordHash::new(hash).map_err(|e| e.to_string())?;
    let algorithm = argon2::Algorithm::try_from(parsed.algorithm).map_err(|e| e.to_string())?;
    let params = argon2::Params::try_from(&parsed).map_err(|e| e.to_string())?;
    if params.m_cost() > ARGON2_MAX_KIB {
        return Err(format!(
            "m={} KiB is more than {ARGON2_MAX_KIB} a check may take",
            params.m_cost()
        ));
    }
    let version = parsed
        .version
        .and_then(|v| argon2::Version::try_from(v).ok())
        .unwrap_or_default();
    Ok((parsed, argon2::Argon2::new(algorithm, version, params)))
}

/// A bcrypt hash's cost (`$2y$10$...`).
fn bcrypt_cost(hash: &str) -> u32 {
    hash.get(4..6)
        .and_then(|c| c.parse().ok())
        .unwrap_or(bcrypt::DEFAULT_COST)
}

/// Does `password` match `hash` (bcrypt or argon2)? Slow on purpose:
/// blocking.
fn verify(password: &str, hash: &str) -> bool {
    use argon2::PasswordVerifier;
    match hash.starts_with("$argon2") {
        true => argon2_of(hash)
            .is_ok_and(|(h, argon2)| argon2.verify_password(password.as_bytes(), &h).is_ok()),
        false => bcrypt::verify(password, hash).unwrap_or(false),
    }
}

/// A hash of the same kind and cost as `like`, that no password matches.
fn dummy_like(like: &str) -> Result<String, String> {
    let secret = "gracesrv: no such user";
    if !like.starts_with("$argon2") {
        return bcrypt::hash(secret, bcrypt_cost(like)).map_err(|e| e.to_string());
    }
    use argon2::PasswordHasher;
    let (_, argon2) = argon2_of(like)?;
    let salt = argon2::password_hash::SaltString::encode_b64(b"gracesrv-no-user")
        .map_err(|e| e.to_string())?;
    argon2
        .hash_password(secret.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// `Authorization: Basic base64(user:password)`.
fn credentials(headers: &HeaderMap) -> Option<Login> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    use base64::Engine;
    let token = token.trim();
    if token.len() > 4096 {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(token)
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some(Login {
        user: user.to_string(),
        password: password.to_string(),
    })
}

/// The client's address: the peer's, or behind proxies the peer trusts,
/// the nearest address in `X-Forwarded-For` (else `Forwarded`) that is not
/// one of them (as nginx's `real_ip_recursive on`).
pub(crate) fn client_address(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let xff: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|a| a.trim().parse().ok())
        .collect();
    let chain = if xff.is_empty() {
        headers
            .get_all(header::FORWARDED)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|element| {
                element.split(';').find_map(|pair| {
                    let (k, v) = pair.trim().split_once('=')?;
                    if !k.eq_ignore_ascii_case("for") {
                        return None;
                    }
                    let v = v.trim_matches('"');
                    let v = v
                        .strip_prefix('[')
                        .and_then(|v| v.split_once(']'))
                        .map_or(v, |(a, _)| a);
                    v.parse::<IpAddr>()
                        .ok()
                        .or_else(|| v.rsplit_once(':').and_then(|(a, _)| a.parse().ok()))
                })
            })
            .collect()
    } else {
        xff
    };
    chain
        .iter()
        .rev()
        .find(|ip| !is_trusted(ip))
        .or(chain.first())
        .copied()
        .unwrap_or(peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An unknown user is checked against a hash as costly as the file's
    /// costliest bcrypt one, whichever user comes first.
    #[test]
    fn an_unknown_user_costs_the_costliest_bcrypt() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("users");
        let cheap = bcrypt::hash("a", 4).unwrap();
        let dear = bcrypt::hash("b", 6).unwrap();
        std::fs::write(&file, format!("ann:{cheap}\nbob:{dear}\n")).unwrap();
        let config = BasicAuthConfig {
            realm: "r".into(),
            users_file: crate::config::FileRef {
                path: file.clone(),
                written: "users".into(),
                key: "basic_auth.users_file".into(),
                pos: Default::default(),
            },
        };
        let auth = BasicAuth::load(&file, &config).unwrap();
        assert_eq!(bcrypt_cost(&auth.dummy), 6, "{}", auth.dummy);
    }

    #[test]
    fn credentials_as_browsers_send_them() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            "Basic YWxpY2U6czNjOnJldA==".parse().unwrap(),
        );
        let login = credentials(&h).unwrap();
        assert_eq!(
            (login.user.as_str(), login.password.as_str()),
            ("alice", "s3c:ret")
        );
        h.insert(
            header::AUTHORIZATION,
            "Bearer YWxpY2U6czNjcmV0".parse().unwrap(),
        );
        assert!(credentials(&h).is_none());
        h.insert(header::AUTHORIZATION, "Basic Y!==".parse().unwrap());
        assert!(credentials(&h).is_none());
    }

    #[test]
    fn the_client_behind_trusted_proxies() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            "203.0.113.9, 198.51.100.2, 10.0.0.7".parse().unwrap(),
        );
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(
            client_address(proxy, &h, &trusted),
            "198.51.100.2".parse::<IpAddr>().unwrap()
        );
        // Not from a trusted proxy: the header is the client's word, ignored.
        let other: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(client_address(other, &h, &trusted), other);
        let mut h = HeaderMap::new();
        h.insert(
            header::FORWARDED,
            "for=\"[2001:db8::1]:443\";proto=https".parse().unwrap(),
        );
        assert_eq!(
            client_address(proxy, &h, &trusted),
            "2001:db8::1".parse::<IpAddr>().unwrap()
        );
    }
}
