//! An axum application served by gracesrv: the `Router` is the service of
//! the `app` listener (its address, TLS and limits come from the config),
//! and a SIGHUP restarts it with nothing lost: a request in flight, even
//! a slow one, is answered by the process that took it, while the next
//! ones go to the new process.
//!
//! Run: `cargo run --example axum -- -c app.yaml`, then
//! `curl localhost:PORT/slow?ms=3000 & kill -HUP <pid>`.

use std::time::Duration;

use axum::extract::Query;
use axum::routing::get;
use axum::Router;

#[derive(serde::Deserialize)]
struct Slow {
    ms: Option<u64>,
}

async fn hello() -> String {
    format!("hello from axum, pid {}\n", std::process::id())
}

/// Answers after `ms` milliseconds (1 s unless given): a request that is
/// still running when a restart begins.
async fn slow(Query(q): Query<Slow>) -> String {
    let ms = q.ms.unwrap_or(1000);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    format!("slept {ms} ms, pid {}\n", std::process::id())
}

fn main() {
    // Same command line as gracesrv: `-c FILE`.
    let args: Vec<String> = std::env::args().collect();
    let config = match args.iter().position(|a| a == "-c" || a == "--config") {
        Some(i) if i + 1 < args.len() => args[i + 1].clone(),
        _ => "app.yaml".to_string(),
    };
    let app = Router::new()
        .route("/", get(hello))
        .route("/slow", get(slow));
    let code = gracesrv::Server::new(config).service("app", app).run();
    std::process::exit(code);
}
