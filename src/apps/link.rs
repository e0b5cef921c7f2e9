//! The link between the supervisor and each worker: a Unix stream socket
//! pair made when the worker is started (its end at `GRACESRV_APPS_FD`, `handoff::APPS_FD`),
//! carrying one JSON object a line.
//!
//! Supervisor to worker: an [`Update`] per app whenever its instances
//! change (which one serves, which are retired, and what `status` shows).
//! Worker to supervisor: [`Released`] once the worker has no request (or
//! tunnel) left on a retired instance, and, while a canary deploy compares
//! the app's instances, a [`Report`] of what it sent to each. The link closing is the same as a
//! release of everything: the worker is gone.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::unix::OwnedReadHalf;
use tokio::sync::mpsc;

/// One end of a link, for either side: its lines as they arrive, and a
/// queue whose lines a task writes, in order, until the link breaks.
pub(crate) fn open(
    stream: std::os::unix::net::UnixStream,
) -> std::io::Result<(
    Lines<BufReader<OwnedReadHalf>>,
    mpsc::UnboundedSender<String>,
)> {
    stream.set_nonblocking(true)?;
    let (read, mut write) = tokio::net::UnixStream::from_std(stream)?.into_split();
    let (tx, mut queued) = mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        while let Some(line) = queued.recv().await {
            if write.write_all(line.as_bytes()).await.is_err() {
                return;
            }
        }
    });
    Ok((BufReader::new(read).lines(), tx))
}

/// `message` as a line of the link.
pub(crate) fn line(message: &impl Serialize) -> String {
    serde_json::to_string(message).unwrap_or_default() + "\n"
}

/// An app's instances, as the supervisor sees them now.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct Update {
    pub(crate) app: String,
    /// The instance new requests go to; `None` while none is ready (they
    /// wait, up to the route's `connect_timeout`).
    pub(crate) serving: Option<Serving>,
    /// Instances to stop sending to: the worker answers [`Released`] for
    /// each once nothing of its own is in flight there.
    pub(crate) retire: Vec<u64>,
    /// Every live instance, for `status`.
    pub(crate) instances: Vec<InstanceInfo>,
    /// A canary deploy under way: the new instance, and its share of new
    /// requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) canary: Option<Canary>,
    /// What `status` shows of a canary deploy under way (step, share, both
    /// versions' figures).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) deploy: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Canary {
    pub(crate) id: u64,
    pub(crate) addr: SocketAddr,
    /// Percent of new requests (or of clients, on a route that hashes).
    pub(crate) share: u32,
}

/// Worker to supervisor: what it sent to an instance in the last moment
/// (see `figures`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct Report {
    pub(crate) report: String,
    pub(crate) id: u64,
    pub(crate) figures: super::figures::Figures,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Serving {
    pub(crate) id: u64,
    pub(crate) addr: SocketAddr,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct InstanceInfo {
    pub(crate) id: u64,
    pub(crate) pid: i32,
    /// `starting`, `serving`, `standby` (the previous instance, kept while
    /// a new one proves itself), `retiring`, `stopping`.
    pub(crate) state: String,
    pub(crate) started_at: String,
    pub(crate) addr: SocketAddr,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Released {
    pub(crate) released: String,
    pub(crate) id: u64,
}
