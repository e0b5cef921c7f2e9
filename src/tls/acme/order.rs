//! Ordering a certificate: the ACME account, the order, its challenges
//! answered from storage, and the certificate and key written owner-only.

use std::path::Path;
use std::time::Duration;

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use tracing::info;

use crate::config::{AcmeConfig, Challenge};

use super::fleet::{challenge_file, Fleet};
use super::Wanted;

/// Why an ACME account or order failed. Its causes (a refused
/// certificate, a reset connection) are in its source chain: log it with
/// `observe::logging::causes`.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OrderError {
    /// A step of the protocol (`new account`, `new order`, `validation`...).
    #[error("{step}: {source}")]
    Acme {
        step: &'static str,
        #[source]
        source: instant_acme::Error,
    },
    /// The CA's roots (`acme.ca_roots`) or the HTTP client cannot be set up.
    #[error("{0}")]
    Client(#[source] instant_acme::Error),
    /// Storage: the account, a challenge answer, the certificate.
    #[error("{}: {source}", path.display())]
    Storage {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    AccountFile {
        path: std::path::PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("authorization is {0}")]
    Authorization(String),
    #[error("the server offers no {0} challenge")]
    NoChallenge(String),
    #[error("not a DNS identifier")]
    NotDns,
    #[error("order is {status}: {why}")]
    Invalid { status: String, why: String },
    #[error("tls-alpn-01 certificate: {0}")]
    AlpnCertificate(#[source] rcgen::Error),
    /// The fleet's store did not take a challenge answer.
    #[error("challenge answer: {0}")]
    Store(#[source] crate::store::StoreError),
}

impl OrderError {
    fn acme(step: &'static str) -> impl Fn(instant_acme::Error) -> OrderError {
        move |source| OrderError::Acme { step, source }
    }

    fn storage(path: &Path) -> impl Fn(std::io::Error) -> OrderError + '_ {
        move |source| OrderError::Storage {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Writes `bytes` to `path` atomically, readable by the owner only, from
/// the moment the file exists.
pub(super) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    crate::sys::atomic::write_atomically_mode(path, bytes, 0o600)
}

/// The account: created once, kept in `storage/account.json` (and in the
/// fleet's store, which `Fleet::sync` copies it from).
pub(super) async fn account(
    acme: &AcmeConfig,
    fleet: Option<&Fleet>,
) -> Result<Account, OrderError> {
    let builder = || match &acme.ca_roots {
        Some(roots) => Account::builder_with_root(&roots.path),
        None => Account::builder(),
    };
    let path = acme.storage.join("account.json");
    if let Ok(bytes) = std::fs::read(&path) {
        let creds: AccountCredentials =
            serde_json::from_slice(&bytes).map_err(|source| OrderError::AccountFile {
                path: path.clone(),
                source,
            })?;
        return builder()
            .map_err(OrderError::Client)?
            .from_credentials(creds)
            .await
            .map_err(OrderError::acme("account"));
    }
    let contact = acme.email.as_ref().map(|e| format!("mailto:{e}"));
    let contact: Vec<&str> = contact.iter().map(String::as_str).collect();
    let (account, creds) = builder()
        .map_err(OrderError::Client)?
        .create(
            &NewAccount {
                contact: &contact,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            acme.directory.clone(),
            None,
        )
        .await
        .map_err(OrderError::acme("new account"))?;
    let json = serde_json::to_vec(&creds).map_err(|source| OrderError::AccountFile {
        path: path.clone(),
        source,
    })?;
    write_private(&path, &json).map_err(OrderError::storage(&path))?;
    if let Some(fleet) = fleet {
        fleet.put_account(&json).await;
    }
    info!(directory = %acme.directory, "ACME account created");
    Ok(account)
}

/// Orders `w`'s certificate and stores it.
pub(super) async fn order(
    acme: &AcmeConfig,
    w: &Wanted,
    fleet: Option<&Fleet>,
) -> Result<(), OrderError> {
    let account = account(acme, fleet).await?;
    let ids: Vec<Identifier> = w.names.iter().map(|n| Identifier::Dns(n.clone())).collect();
    let mut order = account
        .new_order(&NewOrder::new(&ids))
        .await
        .map_err(OrderError::acme("new order"))?;
    let kind = match acme.challenge {
        Challenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
        Challenge::Http01 => ChallengeType::Http01,
    };
    let mut written = Vec::new();
    let result = async {
        let mut authzs = order.authorizations();
        while let Some(authz) = authzs.next().await {
            let mut authz = authz.map_err(OrderError::acme("authorization"))?;
            match authz.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => return Err(OrderError::Authorization(format!("{other:?}"))),
            }
            let mut challenge = authz
                .challenge(kind.clone())
                .ok_or_else(|| OrderError::NoChallenge(format!("{kind:?}")))?;
            let Identifier::Dns(name) = challenge.identifier().identifier.clone() else {
                return Err(OrderError::NotDns);
            };
            let ka = challenge.key_authorization();
            let (id, answer) = match acme.challenge {
                Challenge::Http01 => (challenge.token.clone(), ka.as_str().as_bytes().to_vec()),
                Challenge::TlsAlpn01 => {
                    let pem = alpn_certificate(&name, ka.digest().as_ref())
                        .map_err(OrderError::AlpnCertificate)?;
                    (name.clone(), pem.into_bytes())
                }
            };
            let file = challenge_file(&acme.storage, acme.challenge, &id).ok_or_else(|| {
                OrderError::Authorization(format!("unusable challenge id {id:?}"))
            })?;
            write_private(&file, &answer).map_err(OrderError::storage(&file))?;
            written.push((file, id.clone()));
            if let Some(fleet) = fleet {
                fleet
                    .offer(acme.challenge, &id, &answer)
                    .await
                    .map_err(OrderError::Store)?;
            }
            challenge
                .set_ready()
                .await
                .map_err(OrderError::acme("challenge"))?;
        }
        Ok(())
    }
    .await;
    let result = match result {
        Ok(()) => finish(&mut order, w).await,
        Err(e) => Err(e),
    };
    for (file, id) in written {
        let _ = std::fs::remove_file(file);
        if let Some(fleet) = fleet {
            fleet.withdraw(acme.challenge, &id).await;
        }
    }
    result
}

/// Waits for validation, finalizes, downloads and stores the certificate.
pub(super) async fn finish(order: &mut instant_acme::Order, w: &Wanted) -> Result<(), OrderError> {
    let retries = RetryPolicy::default().timeout(Duration::from_secs(90));
    let status = order
        .poll_ready(&retries)
        .await
        .map_err(OrderError::acme("validation"))?;
    if status != OrderStatus::Ready {
        return Err(OrderError::Invalid {
            status: format!("{status:?}"),
            why: why_invalid(order).await,
        });
    }
    let key_pem = order
        .finalize()
        .await
        .map_err(OrderError::acme("finalize"))?;
    let chain = order
        .poll_certificate(&retries)
        .await
        .map_err(OrderError::acme("certificate"))?;
    store_pair(w, &key_pem, &chain)
}

/// Writes `w`'s key and certificate, owner-only; key first, so a reader
/// that sees the new certificate finds its key.
pub(super) fn store_pair(w: &Wanted, key_pem: &str, chain: &str) -> Result<(), OrderError> {
    let (key_new, cert_new) = (w.key.with_extension("new"), w.cert.with_extension("new"));
    write_private(&key_new, key_pem.as_bytes()).map_err(OrderError::storage(&key_new))?;
    write_private(&cert_new, chain.as_bytes()).map_err(OrderError::storage(&cert_new))?;
    std::fs::rename(&key_new, &w.key).map_err(OrderError::storage(&w.key))?;
    std::fs::rename(&cert_new, &w.cert).map_err(OrderError::storage(&w.cert))?;
    Ok(())
}

/// The problems the server gives for an invalid order's challenges.
pub(super) async fn why_invalid(order: &mut instant_acme::Order) -> String {
    let mut why = Vec::new();
    let mut authzs = order.authorizations();
    while let Some(Ok(authz)) = authzs.next().await {
        for c in &authz.challenges {
            if let Some(e) = &c.error {
                why.push(e.to_string());
            }
        }
    }
    if why.is_empty() {
        "no reason given".into()
    } else {
        why.join("; ")
    }
}

/// The tls-alpn-01 certificate for `name` (RFC 8737): self-signed, with the
/// key authorization's digest in the acmeIdentifier extension; certificate
/// and key in one PEM.
pub(super) fn alpn_certificate(name: &str, digest: &[u8]) -> Result<String, rcgen::Error> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()])?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let cert = params.self_signed(&key)?;
    Ok(cert.pem() + &key.serialize_pem())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_tls_alpn_certificate_loads() {
        let pem = super::alpn_certificate("a.test", &[7u8; 32]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.test.pem"), pem).unwrap();
        let provider = crate::tls::provider();
        assert!(crate::tls::challenge_cert(dir.path(), "a.test", &provider).is_some());
    }
}
