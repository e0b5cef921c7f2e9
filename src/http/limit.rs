//! `rate_limit: { requests, per, burst, key }`: each client (its address,
//! or a header's value) may send `requests` per `per`, and `burst` more at
//! once; beyond, 429 with `Retry-After`.
//!
//! The algorithm is GCRA (a token bucket kept as one timestamp: when the
//! client's next request is due). The timestamps live in a table of fixed
//! size, 4-way set-associative: a key's set is chosen by a keyed hash, and a
//! new key takes the place of the set's entry due longest ago. So memory is
//! bounded whatever the number of clients; a flood of new addresses can only
//! push other clients' entries out, which forgets their use (more lenient),
//! never limits them more.

use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::{header, HeaderMap, HeaderValue, StatusCode};

use crate::config::RateLimitConfig;
use crate::wire::body::{text, Body};

/// Sets of the table; with [`WAYS`], 65,536 clients remembered (1 MB).
const SETS: usize = 16_384;
const WAYS: usize = 4;

#[derive(Clone, Copy, Default)]
struct Entry {
    /// The key's hash (0: free).
    key: u64,
    /// When its next request is due (ns since `start`).
    due: u64,
}

pub(crate) struct Limiter {
    /// Between two requests of a client, in ns.
    interval: u64,
    /// How far ahead of time a client may be (the burst), in ns.
    tolerance: u64,
    key: Option<http::HeaderName>,
    hasher: std::collections::hash_map::RandomState,
    sets: Box<[Mutex<[Entry; WAYS]>]>,
    start: Instant,
    /// `listener route`, for the metrics.
    pub(crate) route: String,
    pub(crate) limited_total: AtomicU64,
}

impl Limiter {
    pub(crate) fn new(c: &RateLimitConfig, route: String) -> Limiter {
        let interval = (c.per.as_nanos() / u128::from(c.requests)).max(1) as u64;
        Limiter {
            interval,
            tolerance: interval.saturating_mul(u64::from(c.burst)),
            key: c.key.clone(),
            hasher: Default::default(),
            sets: (0..SETS)
                .map(|_| Mutex::new([Entry::default(); WAYS]))
                .collect(),
            start: Instant::now(),
            route,
            limited_total: AtomicU64::new(0),
        }
    }

    /// Counts a request of `client` (or of the key header's value); the
    /// 429 if it is over its limit.
    pub(crate) fn check(
        &self,
        client: std::net::IpAddr,
        headers: &HeaderMap,
    ) -> Option<http::Response<Body>> {
        let mut h = self.hasher.build_hasher();
        match self.key.as_ref().and_then(|k| headers.get(k)) {
            Some(v) => v.as_bytes().hash(&mut h),
            None => client.hash(&mut h),
        }
        let key = h.finish() | 1;
        let now = self.start.elapsed().as_nanos() as u64;
        let mut set = self.sets[(key >> 32) as usize % SETS]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let slot = match set.iter().position(|e| e.key == key) {
            Some(i) => i,
            None => {
                // The entry due longest ago (a free one is due at 0).
                let i = (0..WAYS).min_by_key(|i| set[*i].due).unwrap_or(0);
                set[i] = Entry { key, due: now };
                i
            }
        };
        let due = set[slot].due.max(now);
        if due - now > self.tolerance {
            drop(set);
            self.limited_total.fetch_add(1, Ordering::Relaxed);
            let wait = Duration::from_nanos(due - now - self.tolerance);
            let mut res = text(StatusCode::TOO_MANY_REQUESTS, "too many requests\n");
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
            return Some(res);
        }
        set[slot].due = due + self.interval;
        None
    }
}

impl crate::observe::metrics::Source for Limiter {
    fn counters(&self, out: &mut Vec<(String, u64)>) {
        use crate::observe::metrics::label;
        let (listener, route) = self.route.split_once(' ').unwrap_or((&self.route, ""));
        out.push((
            format!(
                "gracesrv_rate_limited_total{{listener=\"{}\",route=\"{}\"}}",
                label(listener),
                label(route)
            ),
            self.limited_total.load(Ordering::Relaxed),
        ));
    }

    fn gauges(&self, _: &mut Vec<(String, u64)>) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(requests: u32, per: Duration, burst: u32) -> Limiter {
        Limiter::new(
            &RateLimitConfig {
                requests,
                per,
                burst,
                key: None,
            },
            "web /".into(),
        )
    }

    #[test]
    fn a_burst_then_the_rate() {
        let l = limiter(10, Duration::from_secs(3600), 4);
        let ip = "192.0.2.1".parse().unwrap();
        let h = HeaderMap::new();
        // One at its time and four ahead of it: five, then 429.
        for _ in 0..5 {
            assert!(l.check(ip, &h).is_none());
        }
        let res = l.check(ip, &h).unwrap();
        assert_eq!(res.status(), 429);
        // Six minutes until the next (3600 s / 10).
        let after: u64 = res.headers()[header::RETRY_AFTER]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((350..=360).contains(&after), "{after}");
        // Another client is not limited.
        assert!(l.check("192.0.2.2".parse().unwrap(), &h).is_none());
    }

    #[test]
    fn memory_is_bounded_whatever_the_clients() {
        let l = limiter(1, Duration::from_secs(3600), 0);
        let h = HeaderMap::new();
        for i in 0..200_000u32 {
            let ip = std::net::IpAddr::V4(std::net::Ipv4Addr::from(i));
            let _ = l.check(ip, &h);
        }
        // The table does not grow: 65,536 entries, whatever came.
        assert_eq!(l.sets.len() * WAYS, 65_536);
        let used = l
            .sets
            .iter()
            .map(|s| s.lock().unwrap().iter().filter(|e| e.key != 0).count())
            .sum::<usize>();
        assert!(used <= 65_536 && used > 60_000, "{used}");
    }
}
