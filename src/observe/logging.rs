//! Logs: one line per event on stderr, text or JSON, each carrying the pid
//! and generation of the process (through a span every thread enters).

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// What the libraries that speak to clients (TLS, HTTP/2, HTTP/1) warn
/// about is what a client did: an illegal SNI, a PING ack never asked for,
/// a reset. Any client can provoke those at will, so by default they are
/// not logged below `error` (SPEC section 5: a client cannot flood the
/// log). `GRACESRV_LOG` overrides all of it.
const CLIENT_FACING: &str = "rustls=error,tokio_rustls=error,h2=error,hyper=error,hyper_util=error";

/// `e` and every cause under it, `outer: inner: innermost`: the reason a
/// library knows (a certificate refused, a connection reset) is often only
/// in the source chain, under a message that says little ("client error
/// (Connect)"). A cause whose text the message already holds is not
/// repeated.
pub(crate) fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !m.is_empty() && !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// An error and its whole source chain, `a: b: c` (as anyhow's `{:#}`):
/// how every error that reaches the log, `check`, `reload` or `deploy` is
/// written, so the cause a library knows is never left out.
pub(crate) struct Chain<'a>(pub(crate) &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&causes(self.0))
    }
}

/// Installs the subscriber and returns the span that carries pid and
/// generation; every thread of the process enters it.
pub(crate) fn init(log: &LogConfig, generation: u64) -> tracing::Span {
    let filter = std::env::var("GRACESRV_LOG")
        .ok()
        .filter(|f| !f.is_empty())
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new(format!("warn,{CLIENT_FACING},gracesrv={}", log.level)));
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

/// At most one log line a second for an event that requests can cause
/// (an upstream that is down answers every request with an error): the
/// first is logged, the rest counted and reported with the next one.
#[derive(Default)]
pub(crate) struct Throttle {
    /// When the last line was allowed, in seconds since the process began.
    last: std::sync::atomic::AtomicU64,
    suppressed: std::sync::atomic::AtomicU64,
}

impl Throttle {
    pub(crate) const fn new() -> Throttle {
        Throttle {
            last: std::sync::atomic::AtomicU64::new(0),
            suppressed: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// `Some(n)`: log now, mentioning `n` lines not logged since the last
    /// one. `None`: count this one and stay quiet.
    pub(crate) fn allow(&self) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        let now = START
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_secs()
            + 1;
        let last = self.last.load(Relaxed);
        if last != now
            && self
                .last
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Relaxed));
        }
        self.suppressed.fetch_add(1, Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    #[derive(Debug)]
    struct E(&'static str, Option<Box<E>>);
    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }
    impl std::error::Error for E {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn every_cause_is_said_once() {
        let e = E(
            "client error (Connect)",
            Some(Box::new(E(
                "invalid peer certificate: CaUsedAsEndEntity",
                Some(Box::new(E("CaUsedAsEndEntity", None))),
            ))),
        );
        assert_eq!(
            super::causes(&e),
            "client error (Connect): invalid peer certificate: CaUsedAsEndEntity"
        );
        assert_eq!(super::causes(&E("alone", None)), "alone");
    }

    #[test]
    fn a_throttle_lets_one_line_a_second_through() {
        let t = super::Throttle::default();
        assert_eq!(t.allow(), Some(0));
        assert_eq!(t.allow(), None);
        assert_eq!(t.allow(), None);
    }
}
