//! Logs: one line per event on stderr, text or JSON, each carrying the pid
//! and generation of the process (through a span every thread enters).

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the subscriber and returns the span that carries pid and
/// generation; every thread of the process enters it.
pub fn init(log: &LogConfig, generation: u64) -> tracing::Span {
    let filter = std::env::var("GRACESRV_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new(format!("warn,gracesrv={}", log.level)));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let installed = match log.format {
        LogFormat::Text => builder.with_ansi(false).try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
    // A library user may have installed a subscriber already; keep theirs.
    let _ = installed;
    tracing::info_span!("gracesrv", pid = std::process::id(), generation)
}
