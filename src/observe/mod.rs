//! What people and programs watching gracesrv read: the access log, the
//! metrics (Prometheus and `status`), and the log.

pub mod access_log;
pub mod logging;
pub mod metrics;
