//! The operating system, and the only `unsafe` code: sockets and
//! descriptors handed across `exec` (`handoff`), listening sockets (and
//! the one generations hand requests on through, `forward`),
//! resource limits, reaping children, signals, watching files, writing
//! files atomically, telling a process from a reused pid, back-off
//! between retries, and stable hashes.

pub(crate) mod atomic;
pub(crate) mod backoff;
pub(crate) mod forward;
#[allow(unsafe_code)]
pub(crate) mod handoff;
pub(crate) mod hash;
pub(crate) mod limits;
pub(crate) mod listeners;
pub(crate) mod pid;
pub(crate) mod ready;
pub(crate) mod reaper;
pub(crate) mod signals;
pub(crate) mod watch;
