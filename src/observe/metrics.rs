//! Prometheus metrics (text exposition format 0.0.4), for `metrics: {}`.
//!
//! Requests are counted (by listener, route and status class, with a
//! duration histogram and bytes out) only when some listener serves
//! `metrics: {}`: otherwise the request path does not pay for them.
//!
//! Counters survive restarts. A generation that starts a restart freezes
//! what it exports at that moment and hands the same values to the new
//! generation (`GRACESRV_METRICS`), which counts on from them. A scrape
//! that reaches the old generation afterwards (both accept for a moment)
//! sees the handed values, never more, so no counter ever goes backwards
//! (Prometheus' `resets()` stays 0). A failed restart unfreezes them. The
//! price: requests the old generation finishes after the handoff are not
//! counted (the access log has them). Under `--supervise` the supervisor
//! hands each new worker the restart counters; request counters start
//! over with each worker.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Upper bounds of the duration histogram, in seconds.
const BUCKETS: [f64; 11] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
];
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// What one listener counts.
pub(crate) struct ListenerMetrics {
    name: String,
    /// Route labels, in the router's order; one more slot for requests no
    /// route took ("none"), or an application's service ("app").
    routes: Vec<String>,
    requests: Vec<[AtomicU64; 5]>,
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
    bytes: AtomicU64,
    pub(crate) handshakes: AtomicU64,
    pub(crate) handshake_failures: AtomicU64,
    /// Failed accepts (out of fds or buffers).
    pub(crate) accept_errors: AtomicU64,
    /// Open connections, HTTP/1.x and HTTP/2.
    connections: [AtomicI64; 2],
}

impl ListenerMetrics {
    pub(crate) fn new(name: &str, routes: Vec<String>, app: bool) -> ListenerMetrics {
        let mut routes = routes;
        routes.push(if app { "app" } else { "none" }.into());
        ListenerMetrics {
            name: name.into(),
            requests: routes.iter().map(|_| Default::default()).collect(),
            routes,
            buckets: Default::default(),
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            handshakes: AtomicU64::new(0),
            handshake_failures: AtomicU64::new(0),
            accept_errors: AtomicU64::new(0),
            connections: Default::default(),
        }
    }

    /// A finished request: the route that took it (`None`: none, or the
    /// application), its status, bytes sent and duration.
    pub(crate) fn record(&self, route: Option<usize>, status: u16, bytes: u64, seconds: f64) {
        let r = route
            .filter(|r| *r + 1 < self.requests.len())
            .unwrap_or(self.requests.len() - 1);
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.requests[r][class].fetch_add(1, Ordering::Relaxed);
        if let Some(b) = BUCKETS.iter().position(|le| seconds <= *le) {
            self.buckets[b].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Counts an open connection until the guard is dropped.
    pub(crate) fn connection(self: &Arc<Self>, h2: bool) -> ConnectionGuard {
        self.connections[usize::from(h2)].fetch_add(1, Ordering::Relaxed);
        ConnectionGuard(self.clone(), usize::from(h2))
    }
}

pub(crate) struct ConnectionGuard(Arc<ListenerMetrics>, usize);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections[self.1].fetch_sub(1, Ordering::Relaxed);
    }
}

/// Something else that counts, in series of its own (the proxy upstreams).
pub(crate) trait Source: Send + Sync {
    /// Counters, as `family{labels}` and value: handed over with the rest.
    fn counters(&self, out: &mut Vec<Series>);
    /// Gauges, as `family{labels}` and value.
    fn gauges(&self, out: &mut Vec<Series>);
}

/// The process's metrics.
pub(crate) struct Metrics {
    /// More series, from other parts of the process.
    pub(crate) sources: Vec<std::sync::Arc<dyn Source>>,
    pub(crate) listeners: Vec<Arc<ListenerMetrics>>,
    /// Counters handed over by the previous generation (by series).
    base: HashMap<String, u64>,
    /// What is exported while a restart hands the counters over.
    frozen: Mutex<Option<HashMap<String, u64>>>,
    pub(crate) restart_failures: AtomicU64,
    /// Served certificates: listener, serial, not after (Unix seconds).
    pub(crate) certificates: Vec<(String, String, i64)>,
    /// Older generations still draining, as this generation was told.
    pub(crate) predecessors: Mutex<Vec<crate::sys::pid::Gen>>,
    generation: u64,
}

/// A counter series: `family{labels}`, its raw value, and whether it is in
/// microseconds (exported as seconds).
pub(crate) type Series = (String, u64);

impl Metrics {
    /// `base`: what the previous process handed over (JSON); `restarted`:
    /// this process is a new generation of a self-restarting server.
    pub(crate) fn new(
        listeners: Vec<Arc<ListenerMetrics>>,
        base: Option<&str>,
        restarted: bool,
        generation: u64,
    ) -> Metrics {
        let mut base: HashMap<String, u64> = base
            .and_then(|b| serde_json::from_str(b).ok())
            .unwrap_or_default();
        if restarted {
            *base.entry("gracesrv_restarts_total".into()).or_default() += 1;
        }
        Metrics {
            sources: Vec::new(),
            listeners,
            base,
            frozen: Mutex::new(None),
            restart_failures: AtomicU64::new(0),
            certificates: Vec::new(),
            predecessors: Mutex::new(Vec::new()),
            generation,
        }
    }

    /// This process's own counts, by series.
    fn live(&self) -> Vec<Series> {
        let mut out = Vec::new();
        for l in &self.listeners {
            let name = label(&l.name);
            for (route, classes) in l.routes.iter().zip(&l.requests) {
                for (class, n) in CLASSES.iter().zip(classes) {
                    let n = n.load(Ordering::Relaxed);
                    if n > 0 {
                        out.push((
                            format!(
                                "gracesrv_requests_total{{listener=\"{name}\",route=\"{}\",class=\"{class}\"}}",
                                label(route)
                            ),
                            n,
                        ));
                    }
                }
            }
            let mut cumulative = 0;
            for (le, n) in BUCKETS.iter().zip(&l.buckets) {
                cumulative += n.load(Ordering::Relaxed);
                out.push((
                    format!("gracesrv_request_duration_seconds_bucket{{listener=\"{name}\",le=\"{le}\"}}"),
                    cumulative,
                ));
            }
            let count = l.count.load(Ordering::Relaxed);
            out.push((
                format!(
                    "gracesrv_request_duration_seconds_bucket{{listener=\"{name}\",le=\"+Inf\"}}"
                ),
                count,
            ));
            out.push((
                format!("gracesrv_request_duration_seconds_sum{{listener=\"{name}\"}}"),
                l.sum_us.load(Ordering::Relaxed),
            ));
            out.push((
                format!("gracesrv_request_duration_seconds_count{{listener=\"{name}\"}}"),
                count,
            ));
            out.push((
                format!("gracesrv_response_bytes_total{{listener=\"{name}\"}}"),
                l.bytes.load(Ordering::Relaxed),
            ));
            out.push((
                format!("gracesrv_tls_handshakes_total{{listener=\"{name}\"}}"),
                l.handshakes.load(Ordering::Relaxed),
            ));
            out.push((
                format!("gracesrv_tls_handshake_failures_total{{listener=\"{name}\"}}"),
                l.handshake_failures.load(Ordering::Relaxed),
            ));
            out.push((
                format!("gracesrv_accept_errors_total{{listener=\"{name}\"}}"),
                l.accept_errors.load(Ordering::Relaxed),
            ));
        }
        out.push((
            "gracesrv_restart_failures_total".into(),
            self.restart_failures.load(Ordering::Relaxed),
        ));
        out.push(("gracesrv_restarts_total".into(), 0));
        for s in &self.sources {
            s.counters(&mut out);
        }
        out
    }

    /// The counters as exported now: the frozen ones during a handoff,
    /// else the handed-over base plus this process's own.
    pub(crate) fn counters(&self) -> HashMap<String, u64> {
        if let Some(f) = self
            .frozen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            return f.clone();
        }
        let mut all = self.base.clone();
        for (k, v) in self.live() {
            *all.entry(k).or_default() += v;
        }
        all
    }

    /// A restart starts: export these values from now on, and hand them
    /// over (JSON, for `handoff::METRICS_VAR`).
    pub(crate) fn freeze(&self) -> String {
        let now = self.counters();
        let json = serde_json::to_string(&now).unwrap_or_default();
        *self.frozen.lock().unwrap_or_else(|p| p.into_inner()) = Some(now);
        json
    }

    /// The restart failed: count on.
    pub(crate) fn unfreeze(&self) {
        *self.frozen.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// The text exposition.
    pub(crate) fn render(&self) -> String {
        let mut families: BTreeMap<&str, Vec<(String, String)>> = BTreeMap::new();
        let counters = self.counters();
        let mut keys: Vec<&String> = counters.keys().collect();
        keys.sort();
        for key in keys {
            let family = key.split('{').next().unwrap_or(key);
            let family = family
                .strip_suffix("_bucket")
                .or_else(|| family.strip_suffix("_sum"))
                .or_else(|| family.strip_suffix("_count"))
                .filter(|f| f.ends_with("_seconds"))
                .unwrap_or(family);
            let value = counters[key];
            let value = if key.contains("_seconds_sum") {
                format!("{}", value as f64 / 1e6)
            } else {
                value.to_string()
            };
            families
                .entry(family_name(family))
                .or_default()
                .push((key.clone(), value));
        }
        let mut out = String::with_capacity(4096);
        for (family, series) in &families {
            let (kind, help) = describe(family);
            let _ = writeln!(out, "# HELP {family} {help}\n# TYPE {family} {kind}");
            // A histogram's buckets in order of `le`, then sum and count.
            let mut series = series.clone();
            series.sort_by_key(|(k, _)| histogram_order(k));
            for (k, v) in series {
                let _ = writeln!(out, "{k} {v}");
            }
        }
        self.gauges(&mut out);
        out
    }

    fn gauges(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP gracesrv_connections Open connections, by listener and protocol.\n# TYPE gracesrv_connections gauge");
        for l in &self.listeners {
            for (proto, n) in ["h1", "h2"].iter().zip(&l.connections) {
                let _ = writeln!(
                    out,
                    "gracesrv_connections{{listener=\"{}\",protocol=\"{proto}\"}} {}",
                    label(&l.name),
                    n.load(Ordering::Relaxed)
                );
            }
        }
        let mut more = Vec::new();
        for s in &self.sources {
            s.gauges(&mut more);
        }
        // Each family's series together, under one HELP and TYPE: sources
        // give theirs interleaved (two proxy routes: healthy, in flight,
        // healthy, in flight).
        more.sort_by(|a, b| a.0.split('{').next().cmp(&b.0.split('{').next()));
        let mut family = "";
        for (series, v) in &more {
            let f = series.split('{').next().unwrap_or(series);
            if f != family {
                family = f;
                let help = match f {
                    "gracesrv_upstream_healthy" => {
                        "Whether a proxy upstream gets requests (1) or is out (0)."
                    }
                    "gracesrv_upstream_in_flight" => "Requests in flight on a proxy upstream.",
                    "gracesrv_app_canary_share" => {
                        "A canary deploy's share of the app's requests now, in percent."
                    }
                    "gracesrv_app_canary_step" => "A canary deploy's step now, from 1.",
                    "gracesrv_app_canary_requests" => {
                        "Requests in the canary deploy's step, by version (old, new)."
                    }
                    "gracesrv_app_canary_errors" => {
                        "5xx answers in the canary deploy's step, by version."
                    }
                    "gracesrv_app_canary_upstream_errors" => {
                        "Requests never answered in the canary deploy's step, by version."
                    }
                    "gracesrv_app_canary_p99_seconds" => {
                        "99th percentile latency in the canary deploy's step, by version."
                    }
                    _ => "A gauge.",
                };
                let _ = writeln!(out, "# HELP {f} {help}\n# TYPE {f} gauge");
            }
            // A gauge in seconds is kept in microseconds, as the histograms.
            if f.ends_with("_seconds") {
                let _ = writeln!(out, "{series} {}", *v as f64 / 1e6);
            } else {
                let _ = writeln!(out, "{series} {v}");
            }
        }
        let draining = self
            .predecessors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|g| g.alive())
            .count();
        let _ = writeln!(out, "# HELP gracesrv_draining_generations Older generations still draining.\n# TYPE gracesrv_draining_generations gauge\ngracesrv_draining_generations {draining}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let _ = writeln!(out, "# HELP gracesrv_certificate_expiry_seconds Seconds until each served certificate expires.\n# TYPE gracesrv_certificate_expiry_seconds gauge");
        for (listener, serial, not_after) in &self.certificates {
            let _ = writeln!(
                out,
                "gracesrv_certificate_expiry_seconds{{listener=\"{}\",serial=\"{serial}\"}} {}",
                label(listener),
                not_after - now
            );
        }
        let rss = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            })
            .unwrap_or(0);
        let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
        let _ = writeln!(out, "# HELP gracesrv_process_resident_memory_bytes Resident memory of this process.\n# TYPE gracesrv_process_resident_memory_bytes gauge\ngracesrv_process_resident_memory_bytes {}", rss * 1024);
        let _ = writeln!(out, "# HELP gracesrv_process_open_fds Open file descriptors of this process.\n# TYPE gracesrv_process_open_fds gauge\ngracesrv_process_open_fds {fds}");
        let _ = writeln!(out, "# HELP gracesrv_build_info The version and the generation serving.\n# TYPE gracesrv_build_info gauge\ngracesrv_build_info{{version=\"{}\",generation=\"{}\"}} 1", env!("CARGO_PKG_VERSION"), self.generation);
    }
}

/// The family a series belongs to, as a static name.
fn family_name(f: &str) -> &'static str {
    const FAMILIES: [&str; 11] = [
        "gracesrv_accept_errors_total",
        "gracesrv_rate_limited_total",
        "gracesrv_upstream_requests_total",
        "gracesrv_upstream_failures_total",
        "gracesrv_requests_total",
        "gracesrv_request_duration_seconds",
        "gracesrv_response_bytes_total",
        "gracesrv_tls_handshakes_total",
        "gracesrv_tls_handshake_failures_total",
        "gracesrv_restarts_total",
        "gracesrv_restart_failures_total",
    ];
    FAMILIES
        .iter()
        .find(|n| **n == f)
        .copied()
        .unwrap_or("gracesrv_unknown_total")
}

fn describe(family: &str) -> (&'static str, &'static str) {
    match family {
        "gracesrv_requests_total" => (
            "counter",
            "Requests answered, by listener, route and status class.",
        ),
        "gracesrv_request_duration_seconds" => (
            "histogram",
            "Time from request head to the end of the response.",
        ),
        "gracesrv_response_bytes_total" => ("counter", "Response body bytes sent."),
        "gracesrv_rate_limited_total" => (
            "counter",
            "Requests refused with 429 by a route's rate_limit.",
        ),
        "gracesrv_upstream_requests_total" => (
            "counter",
            "Requests sent to a proxy upstream, by route and upstream.",
        ),
        "gracesrv_upstream_failures_total" => (
            "counter",
            "Requests to a proxy upstream that failed: connection errors, resets, timeouts, unhealthy statuses.",
        ),
        "gracesrv_tls_handshakes_total" => ("counter", "TLS handshakes completed."),
        "gracesrv_tls_handshake_failures_total" => {
            ("counter", "TLS handshakes that failed or timed out.")
        }
        "gracesrv_restarts_total" => ("counter", "Restarts since the service started."),
        "gracesrv_accept_errors_total" => (
            "counter",
            "Accepts that failed (out of file descriptors or buffers); clients wait in the queue.",
        ),
        "gracesrv_restart_failures_total" => {
            ("counter", "Restarts that failed since the service started.")
        }
        _ => ("counter", "A counter handed over by an older version."),
    }
}

/// Sort key within a family: buckets by `le`, then `_sum`, then `_count`.
fn histogram_order(key: &str) -> (String, u8, u64) {
    let labels = key.split_once('{').map_or("", |(_, l)| l);
    let without_le = labels.split(",le=").next().unwrap_or(labels).to_string();
    if key.contains("_sum{") {
        return (without_le, 1, 0);
    }
    if key.contains("_count{") {
        return (without_le, 2, 0);
    }
    let le = labels
        .split("le=\"")
        .nth(1)
        .and_then(|v| v.split('"').next())
        .map_or(0, |v| {
            if v == "+Inf" {
                u64::MAX
            } else {
                (v.parse::<f64>().unwrap_or(0.0) * 1e6) as u64
            }
        });
    (without_le, 0, le)
}

/// A label value: `\`, `"` and newlines escaped.
pub(crate) fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_survive_a_handoff_and_never_go_back() {
        let l = Arc::new(ListenerMetrics::new("web", vec!["/".into()], false));
        let old = Metrics::new(vec![l.clone()], None, false, 1);
        l.record(Some(0), 200, 10, 0.002);
        l.record(None, 404, 0, 0.0001);
        let handed = old.freeze();
        l.record(Some(0), 200, 10, 0.002);
        assert_eq!(
            old.counters()["gracesrv_requests_total{listener=\"web\",route=\"/\",class=\"2xx\"}"],
            1,
            "frozen during the handoff"
        );
        let l2 = Arc::new(ListenerMetrics::new("web", vec!["/".into()], false));
        let new = Metrics::new(vec![l2.clone()], Some(&handed), true, 2);
        l2.record(Some(0), 200, 10, 0.002);
        let c = new.counters();
        assert_eq!(
            c["gracesrv_requests_total{listener=\"web\",route=\"/\",class=\"2xx\"}"],
            2
        );
        assert_eq!(
            c["gracesrv_requests_total{listener=\"web\",route=\"none\",class=\"4xx\"}"],
            1
        );
        assert_eq!(c["gracesrv_restarts_total"], 1);
        let text = new.render();
        assert!(
            text.contains("# TYPE gracesrv_request_duration_seconds histogram"),
            "{text}"
        );
        assert!(
            text.contains(
                "gracesrv_request_duration_seconds_bucket{listener=\"web\",le=\"+Inf\"} 3"
            ),
            "{text}"
        );
        let inf = text.find("le=\"+Inf\"").unwrap();
        let sum = text.find("gracesrv_request_duration_seconds_sum").unwrap();
        assert!(inf < sum, "buckets, then sum: {text}");
        old.unfreeze();
        assert_eq!(
            old.counters()["gracesrv_requests_total{listener=\"web\",route=\"/\",class=\"2xx\"}"],
            2,
            "a failed restart counts on"
        );
    }
}
