//! What the process knows of each proxy upstream: requests in flight and
//! counted, failures, and its health (passive: out for `fail_timeout` after
//! `max_fails` failures within `fail_window`; active: the last check).
//!
//! Times are milliseconds since the Unix epoch, so that the health of every
//! upstream can be handed to the next generation (`GRACESRV_UPSTREAMS`): a
//! restart does not send traffic to an upstream known to be down.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// One upstream of one proxy route.
#[derive(Debug)]
pub(crate) struct UpstreamState {
    /// `listener path`: the route, as `status` names it.
    pub(crate) route: String,
    /// The upstream's URL, or `app NAME`.
    pub(crate) upstream: String,
    pub(crate) in_flight: AtomicU64,
    pub(crate) requests_total: AtomicU64,
    pub(crate) failures_total: AtomicU64,
    /// Out (passively) until this time; 0 when in.
    out_until: AtomicU64,
    /// Failures within the current `fail_window`.
    fails: Mutex<Vec<u64>>,
    /// The last active check failed.
    check_failed: AtomicBool,
}

/// What the next generation is told of an upstream.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Handed {
    out_until: u64,
    check_failed: bool,
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl UpstreamState {
    pub(crate) fn new(route: String, upstream: String) -> UpstreamState {
        UpstreamState {
            route,
            upstream,
            in_flight: AtomicU64::new(0),
            requests_total: AtomicU64::new(0),
            failures_total: AtomicU64::new(0),
            out_until: AtomicU64::new(0),
            fails: Mutex::new(Vec::new()),
            check_failed: AtomicBool::new(false),
        }
    }

    /// The key this upstream is handed over by.
    fn key(&self) -> String {
        format!("{} {}", self.route, self.upstream)
    }

    /// May it get requests at `now`?
    pub(crate) fn healthy(&self, now: u64) -> bool {
        !self.check_failed.load(Ordering::Relaxed) && self.out_until.load(Ordering::Relaxed) <= now
    }

    /// When it comes back (passively), if it is out at `now`.
    pub(crate) fn back_at(&self, now: u64) -> Option<u64> {
        let until = self.out_until.load(Ordering::Relaxed);
        (until > now).then_some(until)
    }

    /// A failed request. With `passive` (`max_fails`, `fail_window`,
    /// `fail_timeout`), says whether this failure took it out (it was in).
    pub(crate) fn failed(&self, passive: Option<(u32, Duration, Duration)>) -> bool {
        self.failures_total.fetch_add(1, Ordering::Relaxed);
        let Some((max_fails, window, timeout)) = passive else {
            return false;
        };
        let now = now_ms();
        let mut fails = self.fails.lock().unwrap_or_else(|p| p.into_inner());
        let since = now.saturating_sub(window.as_millis() as u64);
        fails.retain(|t| *t > since);
        fails.push(now);
        if fails.len() < max_fails as usize {
            return false;
        }
        fails.clear();
        let was_out = self
            .out_until
            .swap(now + timeout.as_millis() as u64, Ordering::Relaxed)
            > now;
        !was_out
    }

    /// A request it answered: if failures had taken it out (a request tried
    /// while every upstream was out), it is back.
    pub(crate) fn answered(&self) {
        if self.out_until.load(Ordering::Relaxed) != 0 {
            self.out_until.store(0, Ordering::Relaxed);
        }
    }

    /// The outcome of an active check; says whether the health changed.
    pub(crate) fn checked(&self, ok: bool) -> bool {
        let was_failed = self.check_failed.swap(!ok, Ordering::Relaxed);
        // A passing check brings back an upstream that failures took out.
        let was_out = ok && self.out_until.swap(0, Ordering::Relaxed) > now_ms();
        was_failed == ok || was_out
    }

    pub(crate) fn json(&self) -> serde_json::Value {
        let now = now_ms();
        let mut v = serde_json::json!({
            "upstream": self.upstream,
            "healthy": self.healthy(now),
            "in_flight": self.in_flight.load(Ordering::Relaxed),
            "requests_total": self.requests_total.load(Ordering::Relaxed),
            "failures_total": self.failures_total.load(Ordering::Relaxed),
        });
        if let Some(at) = self.back_at(now) {
            v["out_for_s"] = ((at - now) as f64 / 1000.0).into();
        }
        if self.check_failed.load(Ordering::Relaxed) {
            v["check_failed"] = true.into();
        }
        v
    }
}

impl crate::observe::metrics::Source for UpstreamState {
    fn counters(&self, out: &mut Vec<(String, u64)>) {
        let labels = self.labels();
        out.push((
            format!("gracesrv_upstream_requests_total{{{labels}}}"),
            self.requests_total.load(Ordering::Relaxed),
        ));
        out.push((
            format!("gracesrv_upstream_failures_total{{{labels}}}"),
            self.failures_total.load(Ordering::Relaxed),
        ));
    }

    fn gauges(&self, out: &mut Vec<(String, u64)>) {
        let labels = self.labels();
        out.push((
            format!("gracesrv_upstream_healthy{{{labels}}}"),
            u64::from(self.healthy(now_ms())),
        ));
        out.push((
            format!("gracesrv_upstream_in_flight{{{labels}}}"),
            self.in_flight.load(Ordering::Relaxed),
        ));
    }
}

impl UpstreamState {
    fn labels(&self) -> String {
        use crate::observe::metrics::label;
        let (listener, route) = self.route.split_once(' ').unwrap_or((&self.route, ""));
        format!(
            "listener=\"{}\",route=\"{}\",upstream=\"{}\"",
            label(listener),
            label(route),
            label(&self.upstream)
        )
    }
}

/// The health of `states`, for the next generation (JSON).
pub(crate) fn hand_over<'a>(states: impl Iterator<Item = &'a UpstreamState>) -> String {
    let now = now_ms();
    let map: HashMap<String, Handed> = states
        .filter(|s| s.back_at(now).is_some() || s.check_failed.load(Ordering::Relaxed))
        .map(|s| {
            (
                s.key(),
                Handed {
                    out_until: s.out_until.load(Ordering::Relaxed),
                    check_failed: s.check_failed.load(Ordering::Relaxed),
                },
            )
        })
        .collect();
    serde_json::to_string(&map).unwrap_or_default()
}

/// Takes over what the previous generation knew of the same upstreams (the
/// same route and URL).
pub(crate) fn take_over<'a>(handed: &str, states: impl Iterator<Item = &'a UpstreamState>) {
    let Ok(map) = serde_json::from_str::<HashMap<String, Handed>>(handed) else {
        return;
    };
    for s in states {
        if let Some(h) = map.get(&s.key()) {
            s.out_until.store(h.out_until, Ordering::Relaxed);
            s.check_failed.store(h.check_failed, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_after_max_fails_within_the_window() {
        let s = UpstreamState::new("main /".into(), "http://a".into());
        let passive = Some((2, Duration::from_secs(10), Duration::from_secs(30)));
        assert!(!s.failed(passive));
        assert!(s.healthy(now_ms()));
        assert!(s.failed(passive));
        assert!(!s.healthy(now_ms()));
        assert!(s.healthy(now_ms() + 31_000));
        // Handed over, it is out in the next generation too.
        let next = UpstreamState::new("main /".into(), "http://a".into());
        take_over(&hand_over([&s].into_iter()), [&next].into_iter());
        assert!(!next.healthy(now_ms()));
        // A passing check brings it back.
        assert!(next.checked(true));
        assert!(next.healthy(now_ms()));
        assert!(next.checked(false));
        assert!(!next.healthy(now_ms()));
    }
}
