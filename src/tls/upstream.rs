//! TLS to `https://` proxy upstreams: the server's certificate checked
//! against the system's roots or the route's `ca:`, an optional client
//! certificate (mTLS), and no check at all only with
//! `tls_insecure_skip_verify: true` written out (and a warning logged).

use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::{file_error, load_pair, provider, read_error};
use crate::config::{ConfigError, UpstreamTls};
use crate::observe::logging::Chain;

/// The client config for a route's `https://` upstreams; `h2`: offer only
/// HTTP/2 by ALPN, else only HTTP/1.1.
pub(crate) fn client_config(
    file: &std::path::Path,
    tls: &UpstreamTls,
    h2: bool,
    route: &str,
) -> Result<Arc<ClientConfig>, ConfigError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::new(file, None, format!("{route}: TLS: {e}", e = Chain(&e))))?;
    let builder = if tls.insecure_skip_verify {
        tracing::warn!(
            route,
            "tls_insecure_skip_verify: the upstreams' certificates are not checked"
        );
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider.clone())))
    } else {
        let roots = match &tls.ca {
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&ca.path)
                    .map_err(|e| read_error(file, ca, e))?
                    .collect::<Result<_, _>>()
                    .map_err(|e| read_error(file, ca, e))?;
                if certs.is_empty() {
                    return Err(file_error(
                        file,
                        ca,
                        format!("{} holds no certificate", ca.written),
                    ));
                }
                for c in certs {
                    roots.add(c).map_err(|e| {
                        file_error(
                            file,
                            ca,
                            format!("{} is not a CA certificate: {e}", ca.written, e = Chain(&e)),
                        )
                    })?;
                }
                Arc::new(roots)
            }
            None => system_roots(),
        };
        builder.with_root_certificates(roots)
    };
    let mut config = match &tls.client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let pair = load_pair(file, cert, key, &provider)?;
            builder.with_client_cert_resolver(Arc::new(ClientCert(pair)))
        }
    };
    config.alpn_protocols = vec![if h2 {
        b"h2".to_vec()
    } else {
        b"http/1.1".to_vec()
    }];
    Ok(Arc::new(config))
}

/// The system's trusted roots, read once.
fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            for e in found.errors.iter().take(3) {
                tracing::warn!("reading the system's trusted roots: {e}", e = Chain(e));
            }
            let mut roots = RootCertStore::empty();
            let (added, ignored) = roots.add_parsable_certificates(found.certs);
            tracing::debug!(added, ignored, "system roots loaded for https upstreams");
            Arc::new(roots)
        })
        .clone()
}

/// The name an upstream's certificate must carry: `server_name`, else the
/// URL's host.
pub(crate) fn server_name(
    tls: &UpstreamTls,
    host: &str,
) -> Result<ServerName<'static>, rustls_pki_types::InvalidDnsNameError> {
    let name = tls.server_name.as_deref().unwrap_or(host);
    let name = name.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(name.to_string())
}

/// The route's client certificate, shown whenever an upstream asks.
#[derive(Debug)]
struct ClientCert(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for ClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// `tls_insecure_skip_verify`: any certificate is taken; the handshake's
/// signatures are still checked, so the peer holds the key it shows.
#[derive(Debug)]
pub(crate) struct NoVerification(pub(crate) Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
