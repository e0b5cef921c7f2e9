//! How each certificate stands: for `status` (`acme::Status`, in memory,
//! what this generation serves and what storage holds), and in
//! `storage/status.json`.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::Config;

use super::{not_after, wanted, Wanted};

/// How each certificate stands, for `status` (`storage/status.json`).
#[derive(Serialize, Deserialize, Default, Clone, Debug)]
pub(crate) struct CertStatus {
    pub(crate) names: Vec<String>,
    pub(crate) not_after: Option<String>,
    pub(crate) last_error: Option<String>,
    pub(crate) next_attempt: Option<String>,
}

/// Writes the orderer's records to `storage/status.json`; what it wrote.
pub(super) fn write_status(
    storage: &Path,
    status: &HashMap<Vec<String>, CertStatus>,
) -> Option<Vec<u8>> {
    let list: Vec<&CertStatus> = status.values().collect();
    let json = serde_json::to_vec_pretty(&list).ok()?;
    let _ = crate::sys::atomic::write_atomically(&storage.join("status.json"), &json);
    Some(json)
}

/// What `status` shows of ACME, kept in memory so that a `status` request
/// never touches the disk: per certificate the config asks for, the
/// `not_after` of the one this generation serves (loaded at its start) and
/// of the one in storage (a renewal lands there before the restart that
/// serves it), and the orderer's last error and next attempt. The orderer
/// ([`run`]) refreshes it.
pub(crate) struct Status {
    certs: std::sync::Mutex<Vec<Shown>>,
    /// The fleet's store, once the orderer opened it (`status.acme_store`).
    store: std::sync::OnceLock<std::sync::Arc<crate::store::Store>>,
}

#[derive(Serialize, Clone, Debug)]
struct Shown {
    names: Vec<String>,
    /// The served certificate's, as before `served_not_after` existed.
    not_after: Option<String>,
    served_not_after: Option<String>,
    stored_not_after: Option<String>,
    last_error: Option<String>,
    next_attempt: Option<String>,
}

impl Shown {
    /// The orderer's last error and next attempt, from its record.
    fn record(&mut self, r: &CertStatus) {
        self.last_error = r.last_error.clone();
        self.next_attempt = r.next_attempt.clone();
    }
}

impl Status {
    /// The certificates `config` asks for, as this generation loaded them
    /// (`None` without an `acme:` section). Reads the files: call it where
    /// the generation loads its certificates, not on a serving thread.
    pub(crate) fn new(config: &Config) -> Option<std::sync::Arc<Status>> {
        let acme = config.acme.as_ref()?;
        let recorded = recorded(&acme.storage);
        let certs = wanted(config)
            .into_iter()
            .map(|w| {
                let served = w.loaded.as_deref().and_then(not_after);
                let mut shown = Shown {
                    not_after: served.clone(),
                    stored_not_after: served.clone(),
                    served_not_after: served,
                    last_error: None,
                    next_attempt: None,
                    names: w.names,
                };
                if let Some(r) = recorded.iter().find(|r| r.names == shown.names) {
                    shown.record(r);
                }
                shown
            })
            .collect();
        Some(std::sync::Arc::new(Status {
            certs: std::sync::Mutex::new(certs),
            store: std::sync::OnceLock::new(),
        }))
    }

    /// The store this generation's orderer shares ACME state through.
    pub(super) fn set_store(&self, store: std::sync::Arc<crate::store::Store>) {
        let _ = self.store.set(store);
    }

    /// For the `status` route: the store and whether it answers.
    pub(crate) fn store_json(&self) -> Option<serde_json::Value> {
        self.store.get().map(|s| s.json())
    }

    /// For the `status` route.
    pub(crate) fn json(&self) -> serde_json::Value {
        let certs = self.certs.lock().unwrap_or_else(|p| p.into_inner());
        serde_json::to_value(&*certs).unwrap_or_default()
    }

    /// The orderer's failure for a certificate, at once.
    pub(super) fn failed(&self, record: &CertStatus) {
        let mut certs = self.certs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(shown) = certs.iter_mut().find(|c| c.names == record.names) {
            shown.record(record);
        }
    }

    /// What storage holds now: each certificate's `not_after`, and the
    /// orderers' records (this process's or another's that shares storage).
    pub(super) fn refresh(&self, storage: &Path, wanted: &[Wanted]) {
        let recorded = recorded(storage);
        let stored: Vec<Option<String>> = wanted
            .iter()
            .map(|w| std::fs::read(&w.cert).ok().as_deref().and_then(not_after))
            .collect();
        let mut certs = self.certs.lock().unwrap_or_else(|p| p.into_inner());
        for (shown, stored) in certs.iter_mut().zip(stored) {
            shown.stored_not_after = stored;
            if let Some(r) = recorded.iter().find(|r| r.names == shown.names) {
                shown.record(r);
            }
        }
    }
}

/// The orderers' records in `storage/status.json`.
pub(super) fn recorded(storage: &Path) -> Vec<CertStatus> {
    std::fs::read(storage.join("status.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}
