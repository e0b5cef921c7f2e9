//! TLS for a listener: certificates loaded from PEM, chosen by SNI.
//!
//! A certificate and its key are checked against each other when the pair is
//! loaded (`CertifiedKey::from_der` refuses a key that does not match), so a
//! half-written rotation (new cert, old key) fails validation before any
//! socket is touched, and the old generation keeps serving.

pub(crate) mod acme;
pub(crate) mod stream;
pub(crate) mod tickets;
pub(crate) mod upstream;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::config::{AcmeConfig, Challenge, ConfigError, FileRef, TlsConfig};
use crate::observe::logging::Chain;

/// The one crypto provider gracesrv uses.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The ALPN protocol of the tls-alpn-01 challenge (RFC 8737).
pub(crate) const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Builds the rustls server config for one listener, loading every cert and
/// key. An ACME listener whose certificate is not in storage yet serves a
/// self-signed placeholder for its names until it is obtained; with
/// tls-alpn-01 it also answers the challenge.
pub(crate) fn server_config(
    file: &std::path::Path,
    tls: &TlsConfig,
    acme: Option<&AcmeConfig>,
) -> Result<Arc<ServerConfig>, ConfigError> {
    let provider = provider();
    let acme = acme.filter(|_| !tls.acme.is_empty());
    let default = if acme.is_some() && !tls.cert.path.exists() {
        tracing::info!(names = ?tls.acme, "no certificate yet: serving a self-signed placeholder until ACME obtains one");
        placeholder(&tls.acme, &provider).map_err(|e| {
            ConfigError::new(
                file,
                Some(tls.cert.pos),
                format!("{}: placeholder: {e}", tls.cert.key, e = Chain(&e)),
            )
        })?
    } else {
        load_pair(file, &tls.cert, &tls.key, &provider)?
    };
    let mut extra = Vec::new();
    for (cert, key) in &tls.sni {
        extra.push(load_pair(file, cert, key, &provider)?);
    }
    let alpn_challenges = acme
        .filter(|a| a.challenge == Challenge::TlsAlpn01)
        .map(|a| a.storage.join("challenges/tls-alpn-01"));
    let resolver = SniResolver {
        default,
        extra,
        cache: RwLock::new(HashMap::new()),
        alpn_challenges: alpn_challenges.clone(),
        provider: provider.clone(),
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::new(file, None, format!("TLS setup: {e}", e = Chain(&e))))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = tls.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    if alpn_challenges.is_some() {
        // Last: a client offering h2 or http/1.1 never gets it.
        config.alpn_protocols.push(ACME_TLS_ALPN.to_vec());
    }
    // Resumption keeps reconnecting clients cheap; tickets are per generation,
    // so after a restart a client falls back to one full handshake.
    config.session_storage = rustls::server::ServerSessionMemoryCache::new(4096);
    if let Ok(ticketer) = rustls::crypto::aws_lc_rs::Ticketer::new() {
        config.ticketer = ticketer;
    }
    Ok(Arc::new(config))
}

fn file_error(file: &std::path::Path, f: &FileRef, what: String) -> ConfigError {
    ConfigError::new(file, Some(f.pos), format!("{}: {what}", f.key))
}

fn read_error(file: &std::path::Path, f: &FileRef, e: rustls_pki_types::pem::Error) -> ConfigError {
    use rustls_pki_types::pem::Error;
    let what = match e {
        Error::Io(io) if io.kind() == std::io::ErrorKind::NotFound => {
            format!("no such file {}", f.written)
        }
        Error::Io(io) => format!("cannot read {}: {io}", f.written),
        Error::NoItemsFound => format!("{} has no PEM item of the right kind", f.written),
        other => format!(
            "{} is not valid PEM: {other}",
            f.written,
            other = Chain(&other)
        ),
    };
    file_error(file, f, what)
}

/// Loads a certificate chain and its private key and checks that they match.
pub(crate) fn load_pair(
    file: &std::path::Path,
    cert: &FileRef,
    key: &FileRef,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, ConfigError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert.path)
        .map_err(|e| read_error(file, cert, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| read_error(file, cert, e))?;
    if chain.is_empty() {
        return Err(file_error(
            file,
            cert,
            format!("{} holds no certificate", cert.written),
        ));
    }
    webpki::EndEntityCert::try_from(&chain[0]).map_err(|e| {
        file_error(
            file,
            cert,
            format!(
                "{} is not a usable certificate: {e}",
                cert.written,
                e = Chain(&e)
            ),
        )
    })?;
    warn_if_not_valid_now(&chain[0], &cert.written);
    tracing::debug!(cert = %cert.written, serial = serial(&chain[0]).as_deref().unwrap_or("?"), "certificate loaded");
    let key_der = PrivateKeyDer::from_pem_file(&key.path).map_err(|e| read_error(file, key, e))?;
    let ck = CertifiedKey::from_der(chain, key_der, provider).map_err(|e| {
        let what = match e {
            rustls::Error::InconsistentKeys(_) => {
                format!(
                    "{} does not match the certificate {}",
                    key.written, cert.written
                )
            }
            other => format!(
                "{} cannot be used: {other}",
                key.written,
                other = Chain(&other)
            ),
        };
        file_error(file, key, what)
    })?;
    Ok(Arc::new(ck))
}

/// Logs a warning for a certificate that has expired or is not valid yet.
/// It is still served: refusing to start (or to restart) over a date would
/// turn an expired certificate into an outage.
fn warn_if_not_valid_now(cert: &CertificateDer<'_>, written: &str) {
    let Some((not_before, not_after)) = validity(cert) else {
        return;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let date = |t: i64| {
        crate::config::rfc3339(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(t.max(0) as u64),
        )
    };
    if now > not_after {
        tracing::warn!(cert = written, not_after = %date(not_after), "certificate has expired");
    } else if now < not_before {
        tracing::warn!(cert = written, not_before = %date(not_before), "certificate is not valid yet");
    }
}

/// The tls-alpn-01 certificate for `name`, written by the orderer as
/// `DIR/NAME.pem` (certificate and key).
pub(crate) fn challenge_cert(
    dir: &std::path::Path,
    name: &str,
    provider: &CryptoProvider,
) -> Option<Arc<CertifiedKey>> {
    if name.contains('/') || name.starts_with('.') {
        return None;
    }
    let pem = std::fs::read(dir.join(format!("{name}.pem"))).ok()?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .ok()?;
    let key = PrivateKeyDer::from_pem_slice(&pem).ok()?;
    // Not `from_der`: its key check parses the certificate with webpki,
    // which refuses the critical acmeIdentifier extension RFC 8737 requires.
    let key = provider.key_provider.load_private_key(key).ok()?;
    Some(Arc::new(CertifiedKey::new(chain, key)))
}

/// A self-signed certificate for `names`: what an ACME listener serves
/// until its first certificate is obtained (clients see an untrusted
/// certificate, a clear failure, rather than a handshake error).
fn placeholder(
    names: &[String],
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, PlaceholderError> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(names.to_vec())?;
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        "gracesrv placeholder: certificate pending",
    );
    let cert = params.self_signed(&key)?;
    let key_der = PrivateKeyDer::try_from(key.serialize_der())
        .map_err(|e| PlaceholderError::Key(e.into()))?;
    Ok(Arc::new(CertifiedKey::from_der(
        vec![cert.der().clone()],
        key_der,
        provider,
    )?))
}

/// Why the placeholder certificate could not be made.
#[derive(Debug, thiserror::Error)]
enum PlaceholderError {
    #[error(transparent)]
    Generate(#[from] rcgen::Error),
    #[error("{0}")]
    Key(String),
    #[error(transparent)]
    Rustls(#[from] rustls::Error),
}

/// One DER element: (tag, content, rest).
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | *b as usize);
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// An X.509 Time (UTCTime or GeneralizedTime, in UTC) as Unix seconds.
fn der_time(tag: u8, content: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(content).ok()?.strip_suffix('Z')?;
    let (year, rest) = match tag {
        0x17 if s.len() == 12 => {
            let yy: i64 = s[..2].parse().ok()?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, &s[2..])
        }
        0x18 if s.len() == 14 => (s[..4].parse().ok()?, &s[4..]),
        _ => return None,
    };
    let n = |i: usize| rest.get(i..i + 2).and_then(|d| d.parse::<i64>().ok());
    let (month, day, h, m, sec) = (n(0)?, n(2)?, n(4)?, n(6)?, n(8)?);
    let month = time::Month::try_from(u8::try_from(month).ok()?).ok()?;
    let date = time::Date::from_calendar_date(i32::try_from(year).ok()?, month, day as u8).ok()?;
    let at = date.with_hms(h as u8, m as u8, sec as u8).ok()?;
    Some(at.assume_utc().unix_timestamp())
}

/// The fields of a DER certificate's TBSCertificate after the version.
fn tbs_fields(cert: &[u8]) -> Option<&[u8]> {
    let (_, certificate, _) = der(cert)?;
    let (_, tbs, _) = der(certificate)?;
    let (tag, _, after) = der(tbs)?;
    Some(if tag == 0xA0 { after } else { tbs })
}

/// The serial number of a DER certificate, as hex (for logs and tests).
pub(crate) fn serial(cert: &[u8]) -> Option<String> {
    let (_, serial, _) = der(tbs_fields(cert)?)?;
    Some(serial.iter().map(|b| format!("{b:02x}")).collect())
}

/// notBefore and notAfter of a DER certificate, as Unix seconds.
pub(crate) fn validity(cert: &[u8]) -> Option<(i64, i64)> {
    let mut rest = tbs_fields(cert)?;
    for _ in 0..3 {
        rest = der(rest)?.2; // serialNumber, signature, issuer
    }
    let (_, validity, _) = der(rest)?;
    let (t1, c1, rest) = der(validity)?;
    let (t2, c2, _) = der(rest)?;
    Some((der_time(t1, c1)?, der_time(t2, c2)?))
}

/// Picks the certificate whose SANs cover the client's SNI name; the
/// listener's main certificate otherwise (and for clients that send none).
#[derive(Debug)]
struct SniResolver {
    default: Arc<CertifiedKey>,
    extra: Vec<Arc<CertifiedKey>>,
    /// Name → certificate, so each name is matched against SANs once.
    /// Bounded: a client can send any name.
    cache: RwLock<HashMap<String, Arc<CertifiedKey>>>,
    /// Where tls-alpn-01 challenge certificates are (`NAME.pem`), when this
    /// listener answers them.
    alpn_challenges: Option<std::path::PathBuf>,
    provider: Arc<CryptoProvider>,
}

const SNI_CACHE_MAX: usize = 1024;

impl SniResolver {
    fn lookup(&self, name: &str) -> Arc<CertifiedKey> {
        let Ok(server_name) = ServerName::try_from(name) else {
            return self.default.clone();
        };
        for ck in &self.extra {
            let matches = ck
                .end_entity_cert()
                .ok()
                .and_then(|der| webpki::EndEntityCert::try_from(der).ok())
                .is_some_and(|ee| ee.verify_is_valid_for_subject_name(&server_name).is_ok());
            if matches {
                return ck.clone();
            }
        }
        self.default.clone()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if let Some(dir) = &self.alpn_challenges {
            let acme = hello
                .alpn()
                .is_some_and(|mut protocols| protocols.any(|p| p == ACME_TLS_ALPN));
            if acme {
                // Only the ACME server's validation asks for this protocol.
                let name = hello.server_name()?.to_ascii_lowercase();
                return challenge_cert(dir, &name, &self.provider);
            }
        }
        let Some(name) = hello.server_name() else {
            return Some(self.default.clone());
        };
        if self.extra.is_empty() {
            return Some(self.default.clone());
        }
        if let Some(ck) = self.cache.read().ok().and_then(|c| c.get(name).cloned()) {
            return Some(ck);
        }
        let ck = self.lookup(name);
        if let Ok(mut cache) = self.cache.write() {
            if cache.len() < SNI_CACHE_MAX {
                cache.insert(name.to_string(), ck.clone());
            }
        }
        Some(ck)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn validity_of_a_certificate() {
        let mut params = rcgen::CertificateParams::new(vec!["a.test".to_string()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2001, 2, 3);
        params.not_after = rcgen::date_time_ymd(2061, 12, 31);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let (nb, na) = super::validity(cert.der()).unwrap();
        assert_eq!(nb, 981_158_400); // 2001-02-03T00:00:00Z
        assert_eq!(na, 2_903_212_800); // 2061-12-31T00:00:00Z
        assert_eq!(super::validity(b"\x30\x03\x02\x01\x01"), None);
        let mut params = rcgen::CertificateParams::new(vec!["a.test".to_string()]).unwrap();
        params.serial_number = Some(rcgen::SerialNumber::from(0x1234u64));
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(super::serial(cert.der()).as_deref(), Some("1234"));
    }
}
