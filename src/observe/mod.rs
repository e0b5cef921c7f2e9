//! What people and programs watching gracesrv read: the access log, the
//! metrics (Prometheus and `status`), and the log.

pub(crate) mod access_log;
pub(crate) mod logging;
pub(crate) mod metrics;
