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
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::unix::OwnedReadHalf;
use tokio::sync::mpsc;

/// One end of a link, for either side: its lines as they arrive, and a
/// queue whose lines a task writes, in order, until the link breaks.
pub fn open(
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
pub fn line(message: &impl Serialize) -> String {
    serde_json::to_string(message).unwrap_or_default() + "\n"
}

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
