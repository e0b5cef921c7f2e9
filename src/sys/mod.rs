//! The operating system, and the only `unsafe` code: sockets and
//! descriptors handed across `exec` (`handoff`), listening sockets,
//! resource limits, reaping children, signals, watching files, writing
//! files atomically, telling a process from a reused pid, and back-off
//! between retries.

pub mod atomic;
pub mod backoff;
#[allow(unsafe_code)]
pub mod handoff;
pub mod limits;
pub mod listeners;
pub mod pid;
pub mod ready;
pub mod reaper;
pub mod signals;
pub mod watch;
