//! Active health checks (`proxy.health`): every `interval`, each URL
//! upstream of the route gets `GET path`; an answer other than
//! `expect_status` within `timeout` takes it out until a check passes.
//! Only the serving generation checks; a draining one has stopped.

use std::sync::Arc;

use http::{header, Request};
use tracing::{info, warn};

use super::{Proxy, Target};
use crate::config::ActiveHealth;
use crate::wire::body::full;

/// Checks the route's upstreams until the task is dropped (aborted).
pub(crate) async fn check(proxy: Arc<Proxy>) {
    let Some(health) = proxy.config.health.clone() else {
        return;
    };
    let mut tick = tokio::time::interval(health.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mut checks = tokio::task::JoinSet::new();
        for (i, t) in proxy.targets.iter().enumerate() {
            if matches!(t, Target::Url { .. }) {
                let (proxy, health) = (proxy.clone(), health.clone());
                checks.spawn(async move { (i, once(&proxy, i, &health).await) });
            }
        }
        while let Some(Ok((i, outcome))) = checks.join_next().await {
            let state = &proxy.balancer.states[i];
            if !state.checked(outcome.is_ok()) {
                continue;
            }
            match outcome {
                Ok(()) => {
                    info!(route = %proxy.route, upstream = %state.upstream, "upstream is back: its health check passed");
                    proxy.changed.notify_waiters();
                }
                Err(why) => {
                    warn!(route = %proxy.route, upstream = %state.upstream, path = %health.path, "upstream is out: health check failed: {why}")
                }
            }
        }
    }
}

/// One check of upstream `i`: why it failed, if it did.
async fn once(proxy: &Proxy, i: usize, health: &ActiveHealth) -> Result<(), String> {
    let Target::Url { pool, authority } = &proxy.targets[i] else {
        return Ok(());
    };
    let req = Request::get(health.path.as_str())
        .header(header::HOST, authority.clone())
        .header(header::USER_AGENT, "gracesrv-health-check")
        .body(full(bytes::Bytes::new()))
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(health.timeout, pool.send_aside(req)).await {
        Err(_) => Err(format!("no answer within {:?}", health.timeout)),
        Ok(Err(e)) => Err(crate::observe::logging::causes(&e)),
        Ok(Ok(res)) if res.status().as_u16() == health.expect_status => {
            // Read to the end, so that the connection is used again.
            let _ = tokio::time::timeout(
                health.timeout,
                http_body_util::BodyExt::collect(res.into_body()),
            )
            .await;
            Ok(())
        }
        Ok(Ok(res)) => Err(format!(
            "answered {}, not {}",
            res.status().as_u16(),
            health.expect_status
        )),
    }
}
