//! What a canary deploy compares: each instance's answers over a window
//! (requests, 5xx, requests it never answered) and their latencies.
//!
//! Each worker counts what it sends to each instance and reports the
//! counts of the last second to the supervisor (`link::Report`); the
//! supervisor adds them up per instance for the step under way
//! (`links::Links::take_figures`) and judges (`runner`).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::Canary;

/// Each bucket of the latency histogram is this much wider than the one
/// below it: percentiles within 5%.
const GROWTH: f64 = 1.05;

/// One instance's answers over a window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Figures {
    pub(crate) requests: u64,
    /// Answered with a 5xx by the app.
    pub(crate) errors: u64,
    /// Never answered: the connection failed, was reset, or timed out
    /// (the client got 502 or 504 from gracesrv).
    pub(crate) upstream_errors: u64,
    /// Latency to the response's head, microseconds: bucket -> count.
    pub(crate) latency: BTreeMap<u16, u64>,
}

impl Figures {
    /// One request: its status, or `None` if the app never answered.
    pub(crate) fn record(&mut self, status: Option<u16>, took: Duration) {
        self.requests += 1;
        match status {
            Some(s) if s >= 500 => self.errors += 1,
            Some(_) => {}
            None => self.upstream_errors += 1,
        }
        let us = (took.as_micros() as f64).max(1.0);
        let bucket = (us.ln() / GROWTH.ln()) as u16;
        *self.latency.entry(bucket).or_default() += 1;
    }

    pub(crate) fn add(&mut self, o: &Figures) {
        self.requests += o.requests;
        self.errors += o.errors;
        self.upstream_errors += o.upstream_errors;
        for (b, n) in &o.latency {
            *self.latency.entry(*b).or_default() += n;
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.requests == 0
    }

    /// The share of requests answered with a 5xx.
    pub(crate) fn error_share(&self) -> f64 {
        self.errors as f64 / self.requests.max(1) as f64
    }

    /// The share of requests never answered.
    pub(crate) fn upstream_error_share(&self) -> f64 {
        self.upstream_errors as f64 / self.requests.max(1) as f64
    }

    /// The 99th percentile latency (the top of its bucket), if any request.
    pub(crate) fn p99(&self) -> Option<Duration> {
        let total: u64 = self.latency.values().sum();
        let want = (total as f64 * 0.99).ceil() as u64;
        let mut seen = 0;
        for (b, n) in &self.latency {
            seen += n;
            if seen >= want.max(1) {
                let us = GROWTH.powi(i32::from(*b) + 1);
                return Some(Duration::from_micros(us as u64));
            }
        }
        None
    }

    /// For `status`, the metrics and `deploy`'s verdict.
    pub(crate) fn summary(&self) -> serde_json::Value {
        serde_json::json!({
            "requests": self.requests,
            "errors_5xx": self.errors,
            "upstream_errors": self.upstream_errors,
            "error_rate": round(self.error_share()),
            "upstream_error_rate": round(self.upstream_error_share()),
            "p99_ms": self.p99().map(|d| round(d.as_secs_f64() * 1000.0)),
        })
    }

    /// One line: `812 requests, 5xx 0.1%, no answer 0.0%, p99 12.3 ms`.
    pub(crate) fn line(&self) -> String {
        format!(
            "{} requests, 5xx {:.1}%, no answer {:.1}%, p99 {}",
            self.requests,
            self.error_share() * 100.0,
            self.upstream_error_share() * 100.0,
            self.p99().map_or("-".into(), |d| format!(
                "{:.1} ms",
                d.as_secs_f64() * 1000.0
            ))
        )
    }
}

fn round(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

/// Compares the new version with the old one on the same window, within
/// the app's `canary` margins: why it is worse, or `None` (also while it
/// has answered too few requests to tell).
pub(crate) fn worse(old: &Figures, new: &Figures, m: &Canary) -> Option<String> {
    if new.requests < m.min_requests.max(1) {
        return None;
    }
    let points = |x: f64| x * 100.0;
    if new.error_share() > old.error_share() + m.max_error_increase {
        return Some(format!(
            "5xx {:.1}% against {:.1}% (at most {:.1} points more)",
            points(new.error_share()),
            points(old.error_share()),
            points(m.max_error_increase)
        ));
    }
    if new.upstream_error_share() > old.upstream_error_share() + m.max_error_increase {
        return Some(format!(
            "no answer {:.1}% against {:.1}% (at most {:.1} points more)",
            points(new.upstream_error_share()),
            points(old.upstream_error_share()),
            points(m.max_error_increase)
        ));
    }
    // Latency needs the old version's figure on the same window.
    if let (Some(o), Some(n)) = (old.p99(), new.p99()) {
        if old.requests >= m.min_requests.max(1)
            && n.as_secs_f64() > o.as_secs_f64() * m.max_p99_ratio
        {
            return Some(format!(
                "p99 {:.1} ms against {:.1} ms (at most {}x)",
                n.as_secs_f64() * 1000.0,
                o.as_secs_f64() * 1000.0,
                m.max_p99_ratio
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(n: u64, errors: u64, ms: u64) -> Figures {
        let mut f = Figures::default();
        for i in 0..n {
            let status = if i < errors { 500 } else { 200 };
            f.record(Some(status), Duration::from_millis(ms));
        }
        f
    }

    #[test]
    fn the_99th_percentile_is_within_five_percent() {
        let mut f = Figures::default();
        for ms in 1..=1000 {
            f.record(Some(200), Duration::from_millis(ms));
        }
        let p99 = f.p99().unwrap().as_secs_f64() * 1000.0;
        assert!((990.0..=990.0 * 1.06).contains(&p99), "{p99}");
        assert_eq!(Figures::default().p99(), None);
    }

    #[test]
    fn a_version_is_judged_on_errors_and_latency_past_min_requests() {
        // The defaults: 1 point of errors, p99 1.5x, 100 requests.
        let m = &Canary::default();
        assert_eq!(
            (m.max_error_increase, m.max_p99_ratio, m.min_requests),
            (0.01, 1.5, 100)
        );
        let old = figures(1000, 5, 10);
        assert_eq!(
            worse(&old, &figures(99, 99, 10), m),
            None,
            "too few to tell"
        );
        assert_eq!(
            worse(&old, &figures(200, 2, 10), m),
            None,
            "1% against 0.5%"
        );
        let e = worse(&old, &figures(200, 20, 10), m).expect("10% against 0.5%");
        assert!(e.contains("5xx 10.0% against 0.5%"), "{e}");
        let e = worse(&old, &figures(200, 0, 30), m).expect("3x slower");
        assert!(e.starts_with("p99 3"), "{e}");
        assert_eq!(worse(&old, &figures(200, 0, 14), m), None, "1.4x");
        let mut dead = figures(150, 0, 10);
        for _ in 0..50 {
            dead.record(None, Duration::from_millis(10));
        }
        let e = worse(&old, &dead, m).expect("a quarter never answered");
        assert!(e.starts_with("no answer 25.0%"), "{e}");
        let mut sum = figures(10, 1, 10);
        sum.add(&figures(10, 1, 10));
        assert_eq!((sum.requests, sum.errors), (20, 2));
    }
}
