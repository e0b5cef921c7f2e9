//! The link between the supervisor and each worker: a Unix stream socket
//! pair made when the worker is started (its end at `GRACESRV_APPS_FD`, `handoff::APPS_FD`),
//! carrying one JSON object a line.
//!
//! Supervisor to worker: an [`Update`] per app whenever its instances
//! change (which one serves, which are retired, and what `status` shows).
//! Worker to supervisor: [`Released`] once the worker has no request (or
//! tunnel) left on a retired instance. The link closing is the same as a
//! release of everything: the worker is gone.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// An app's instances, as the supervisor sees them now.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Update {
    pub app: String,
    /// The instance new requests go to; `None` while none is ready (they
    /// wait, up to the route's `connect_timeout`).
    pub serving: Option<Serving>,
    /// Instances to stop sending to: the worker answers [`Released`] for
    /// each once nothing of its own is in flight there.
    pub retire: Vec<u64>,
    /// Every live instance, for `status`.
    pub instances: Vec<InstanceInfo>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Serving {
    pub id: u64,
    pub addr: SocketAddr,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InstanceInfo {
    pub id: u64,
    pub pid: i32,
    /// `starting`, `serving`, `standby` (the previous instance, kept while
    /// a new one proves itself), `retiring`, `stopping`.
    pub state: String,
    pub started_at: String,
    pub addr: SocketAddr,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Released {
    pub released: String,
    pub id: u64,
}
