//! `status`: what this process serves, as JSON.

use std::sync::atomic::Ordering;

use http::{header, HeaderValue, Response};

use crate::process::context::ListenerContext;
use crate::wire::body::{full, Body};

pub(super) fn response(ctx: &ListenerContext) -> Response<Body> {
    let p = &ctx.process;
    let listeners: Vec<serde_json::Value> = p
        .listeners
        .iter()
        .map(|(name, addr, tls)| serde_json::json!({"name": name, "addr": addr, "tls": tls}))
        .collect();
    let body = serde_json::json!({
        "pid": p.pid,
        "generation": p.generation,
        "version": env!("CARGO_PKG_VERSION"),
        "started_at": crate::config::rfc3339(p.started_at),
        "uptime_s": p.started.elapsed().as_secs_f64(),
        "listeners": listeners,
        "connections_active": p.drain.active(),
        "requests_total": p.threads.iter().map(|w| w.requests_total.load(Ordering::Relaxed)).sum::<u64>(),
        "proxied_total": p.proxied_total.load(Ordering::Relaxed),
        "upstream_errors_total": p.upstream_errors_total.load(Ordering::Relaxed),
        "client_errors_total": p.client_errors_total.load(Ordering::Relaxed),
        "upgraded_active": p.drain.upgraded_active(),
        "threads": p.threads.iter().map(|w| serde_json::json!({
            "connections": w.connections.load(Ordering::Relaxed),
            "requests_total": w.requests_total.load(Ordering::Relaxed),
        })).collect::<Vec<_>>(),
        "draining": p.drain.is_draining(),
    });
    let mut body = body;
    if !p.http3.is_empty() {
        body["http3"] = p
            .http3
            .iter()
            .map(|q| {
                serde_json::json!({
                    "listener": q.listener,
                    "connections": q.connections.load(Ordering::Relaxed),
                    "requests_total": q.requests_total.load(Ordering::Relaxed),
                    "reading": q.reading.load(Ordering::Relaxed),
                    "forwarded_total": q.forwarded_total.load(Ordering::Relaxed),
                    "received_total": q.received_total.load(Ordering::Relaxed),
                    "retries_total": q.retries_total.load(Ordering::Relaxed),
                    "refused_total": q.refused_total.load(Ordering::Relaxed),
                    "malformed_total": q.malformed_total.load(Ordering::Relaxed),
                })
            })
            .collect::<Vec<_>>()
            .into();
    }
    if !p.access_logs.is_empty() {
        body["access_log_dropped"] = p
            .access_logs
            .iter()
            .map(|l| l.dropped.load(Ordering::Relaxed))
            .sum::<u64>()
            .into();
    }
    if !p.upstreams.is_empty() {
        body["upstreams"] = p
            .upstreams
            .iter()
            .map(|u| {
                let mut j = u.json();
                j["route"] = u.route.clone().into();
                j
            })
            .collect::<Vec<_>>()
            .into();
    }
    if !p.apps.is_empty() {
        body["apps"] = p.apps.status();
    }
    if let Some(acme) = &p.acme {
        body["acme"] = acme.json();
        if let Some(store) = acme.store_json() {
            body["acme_store"] = store;
        }
    }
    if let Some(tickets) = &p.tickets {
        body["tls_tickets"] = tickets.json();
    }
    let mut res = Response::new(full(body.to_string() + "\n"));
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}
