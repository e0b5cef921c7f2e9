//! Which upstream of a route takes a request: `round_robin` (smooth, by
//! weight), `least_conn` (fewest in flight for its weight), `random_two`
//! (the less busy of two picked at random by weight), or `hash` (a ring
//! with `weight` x 160 points per upstream, so adding or removing one moves
//! only its share of the keys). Upstreams that are out are skipped; the
//! hash walks on to the next upstream on the ring, so a client comes back
//! to its own once it is in again.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::config::{HashKey, Policy};
use crate::process::upstreams::UpstreamState;
use crate::sys::hash::{hash, random};

/// Points on the hash ring per unit of weight.
const POINTS: u32 = 160;

pub(super) struct Balancer {
    policy: Policy,
    pub(super) states: Vec<Arc<UpstreamState>>,
    weights: Vec<u32>,
    /// Round robin: upstream indices, each as often as its weight, spread.
    schedule: Vec<u16>,
    next: AtomicUsize,
    /// Hash: (point, upstream index), sorted by point.
    ring: Vec<(u64, u16)>,
}

impl Balancer {
    /// `upstreams`: each one's state, weight and stable name (its URL).
    pub(super) fn new(policy: Policy, upstreams: Vec<(Arc<UpstreamState>, u32)>) -> Balancer {
        let weights: Vec<u32> = upstreams.iter().map(|(_, w)| *w).collect();
        let mut ring = Vec::new();
        if matches!(policy, Policy::Hash(_)) {
            for (i, (s, w)) in upstreams.iter().enumerate() {
                for p in 0..w * POINTS {
                    ring.push((hash(format!("{}#{p}", s.upstream).as_bytes()), i as u16));
                }
            }
            ring.sort_unstable();
        }
        Balancer {
            schedule: smooth_schedule(&weights),
            policy,
            states: upstreams.into_iter().map(|(s, _)| s).collect(),
            weights,
            next: AtomicUsize::new(0),
            ring,
        }
    }

    pub(super) fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The hash policy's key of a request, if it has one.
    pub(super) fn key<B>(&self, req: &http::Request<B>, remote: std::net::IpAddr) -> Option<u64> {
        let Policy::Hash(key) = &self.policy else {
            return None;
        };
        match key {
            HashKey::Remote => Some(match remote {
                std::net::IpAddr::V4(a) => hash(&a.octets()),
                std::net::IpAddr::V6(a) => hash(&a.octets()),
            }),
            HashKey::Header(name) => req.headers().get(name).map(|v| hash(v.as_bytes())),
            HashKey::Cookie(name) => cookie(req.headers(), name).map(hash),
        }
    }

    /// An upstream for a request, healthy at `now` and not in `tried`.
    pub(super) fn pick(&self, key: Option<u64>, tried: &[usize], now: u64) -> Option<usize> {
        let n = self.states.len();
        let usable = |i: usize| !tried.contains(&i) && self.states[i].healthy(now);
        if n == 1 {
            return usable(0).then_some(0);
        }
        match (&self.policy, key) {
            (Policy::Hash(_), Some(key)) => {
                let start = self.ring.partition_point(|(p, _)| *p < key);
                (0..self.ring.len())
                    .map(|k| self.ring[(start + k) % self.ring.len()].1 as usize)
                    .find(|i| usable(*i))
            }
            (Policy::LeastConn, _) => self.least(usable, (0..n).collect::<Vec<_>>()),
            (Policy::RandomTwo, _) => {
                let candidates: Vec<usize> = (0..n).filter(|i| usable(*i)).collect();
                match candidates.len() {
                    0 => None,
                    1 => Some(candidates[0]),
                    _ => {
                        let a = self.weighted(&candidates, random());
                        let rest: Vec<usize> =
                            candidates.iter().copied().filter(|c| *c != a).collect();
                        let b = self.weighted(&rest, random());
                        self.least(|_| true, vec![a, b])
                    }
                }
            }
            // Round robin, and a hash with no key in the request.
            _ => {
                let len = self.schedule.len();
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                (0..len)
                    .map(|k| self.schedule[(start + k) % len] as usize)
                    .find(|i| usable(*i))
            }
        }
    }

    /// The candidate with the fewest requests in flight for its weight; ties
    /// go to the earliest after a rotating start, so they share.
    fn least(&self, usable: impl Fn(usize) -> bool, candidates: Vec<usize>) -> Option<usize> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let len = candidates.len();
        let mut best: Option<(u64, usize)> = None;
        for k in 0..len {
            let i = candidates[(start + k) % len];
            if !usable(i) {
                continue;
            }
            // in_flight / weight, compared without division.
            let load = self.states[i].in_flight.load(Ordering::Relaxed);
            let better = match best {
                None => true,
                Some((l, j)) => {
                    u128::from(load) * u128::from(self.weights[j])
                        < u128::from(l) * u128::from(self.weights[i])
                }
            };
            if better {
                best = Some((load, i));
            }
        }
        best.map(|(_, i)| i)
    }

    /// One of `candidates`, with a chance in proportion to its weight.
    fn weighted(&self, candidates: &[usize], r: u64) -> usize {
        let total: u64 = candidates.iter().map(|i| u64::from(self.weights[*i])).sum();
        let mut at = r % total.max(1);
        for i in candidates {
            let w = u64::from(self.weights[*i]);
            if at < w {
                return *i;
            }
            at -= w;
        }
        candidates[0]
    }
}

/// Smooth weighted round robin (as nginx's): weights 5, 1, 1 give
/// a a b a c a a, not a a a a a b c.
fn smooth_schedule(weights: &[u32]) -> Vec<u16> {
    let total: i64 = weights.iter().map(|w| i64::from(*w)).sum();
    let mut current = vec![0i64; weights.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (i, w) in weights.iter().enumerate() {
            current[i] += i64::from(*w);
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        out.push(best as u16);
    }
    out
}

/// The value of cookie `name` in the request's `Cookie` fields.
fn cookie<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a [u8]> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b';'))
        .find_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|b| *b == b'=')?;
            (&pair[..eq] == name.as_bytes()).then(|| &pair[eq + 1..])
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn balancer(policy: Policy, weights: &[u32]) -> Balancer {
        Balancer::new(
            policy,
            weights
                .iter()
                .enumerate()
                .map(|(i, w)| {
                    (
                        Arc::new(UpstreamState::new("l /".into(), format!("http://u{i}"))),
                        *w,
                    )
                })
                .collect(),
        )
    }

    #[test]
    fn round_robin_follows_weights_smoothly() {
        assert_eq!(smooth_schedule(&[5, 1, 1]), [0, 0, 1, 0, 2, 0, 0]);
        let b = balancer(Policy::RoundRobin, &[2, 1]);
        let picks: Vec<usize> = (0..6).map(|_| b.pick(None, &[], 0).unwrap()).collect();
        assert_eq!(picks.iter().filter(|i| **i == 0).count(), 4);
        // An upstream already tried is skipped.
        assert!((0..6).all(|_| b.pick(None, &[0], 0) == Some(1)));
        assert_eq!(b.pick(None, &[0, 1], 0), None);
    }

    #[test]
    fn least_conn_prefers_the_least_busy_for_its_weight() {
        let b = balancer(Policy::LeastConn, &[1, 1, 3]);
        b.states[0].in_flight.store(1, Ordering::Relaxed);
        b.states[1].in_flight.store(2, Ordering::Relaxed);
        b.states[2].in_flight.store(2, Ordering::Relaxed);
        assert!((0..5).all(|_| b.pick(None, &[], 0) == Some(2)));
        b.states[2].in_flight.store(4, Ordering::Relaxed);
        assert!((0..5).all(|_| b.pick(None, &[], 0) == Some(0)));
    }

    #[test]
    fn random_two_never_picks_the_busiest_of_three() {
        let b = balancer(Policy::RandomTwo, &[1, 1, 1]);
        b.states[1].in_flight.store(100, Ordering::Relaxed);
        assert!((0..200).all(|_| b.pick(None, &[], 0) != Some(1)));
    }

    #[test]
    fn hashing_is_consistent() {
        let three = balancer(Policy::Hash(HashKey::Remote), &[1, 1, 1]);
        let four = balancer(Policy::Hash(HashKey::Remote), &[1, 1, 1, 1]);
        let keys: Vec<u64> = (0..3000u32).map(|k| hash(&k.to_le_bytes())).collect();
        let mut moved = 0;
        let mut counts = [0; 3];
        for k in &keys {
            let a = three.pick(Some(*k), &[], 0).unwrap();
            assert_eq!(
                three.pick(Some(*k), &[], 0),
                Some(a),
                "one key, one upstream"
            );
            counts[a] += 1;
            let b = four.pick(Some(*k), &[], 0).unwrap();
            if a != b {
                assert_eq!(b, 3, "a key moves only to the new upstream");
                moved += 1;
            }
        }
        // The new upstream takes about a quarter; the others share evenly.
        assert!((500..1000).contains(&moved), "{moved}");
        assert!(counts.iter().all(|c| (800..1200).contains(c)), "{counts:?}");
    }

    #[test]
    fn cookies_are_found_by_name() {
        let mut h = http::HeaderMap::new();
        h.insert(
            http::header::COOKIE,
            "a=1; session=xyz; b=2".parse().unwrap(),
        );
        assert_eq!(cookie(&h, "session"), Some(&b"xyz"[..]));
        assert_eq!(cookie(&h, "sess"), None);
    }
}
