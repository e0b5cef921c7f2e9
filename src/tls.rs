//! TLS for a listener: certificates loaded from PEM, chosen by SNI.
//!
//! A certificate and its key are checked against each other when the pair is
//! loaded (`CertifiedKey::from_der` refuses a key that does not match), so a
//! half-written rotation (new cert, old key) fails validation before any
//! socket is touched, and the old generation keeps serving.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::config::{ConfigError, FileRef, TlsConfig};

/// The one crypto provider gracesrv uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Builds the rustls server config for one listener, loading every cert and key.
pub fn server_config(
    file: &std::path::Path,
    tls: &TlsConfig,
) -> Result<Arc<ServerConfig>, ConfigError> {
    let provider = provider();
    let default = load_pair(file, &tls.cert, &tls.key, &provider)?;
    let mut extra = Vec::new();
    for (cert, key) in &tls.sni {
        extra.push(load_pair(file, cert, key, &provider)?);
    }
    let resolver = SniResolver {
        default,
        extra,
        cache: RwLock::new(HashMap::new()),
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::new(file, None, format!("TLS setup: {e}")))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = tls.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
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
        other => format!("{} is not valid PEM: {other}", f.written),
    };
    file_error(file, f, what)
}

/// Loads a certificate chain and its private key and checks that they match.
pub fn load_pair(
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
            format!("{} is not a usable certificate: {e}", cert.written),
        )
    })?;
    let key_der = PrivateKeyDer::from_pem_file(&key.path).map_err(|e| read_error(file, key, e))?;
    let ck = CertifiedKey::from_der(chain, key_der, provider).map_err(|e| {
        let what = match e {
            rustls::Error::InconsistentKeys(_) => {
                format!(
                    "{} does not match the certificate {}",
                    key.written, cert.written
                )
            }
            other => format!("{} cannot be used: {other}", key.written),
        };
        file_error(file, key, what)
    })?;
    Ok(Arc::new(ck))
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
