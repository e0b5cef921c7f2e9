//! An application that already runs tokio (`#[tokio::main]`) and embeds
//! gracesrv with `Server::serve`: its own service on the `app` listener,
//! the config's routes on the others, zero-downtime restarts on SIGHUP.
//!
//! Run: `cargo run --example tokio_app -- -c app.yaml`, then `kill -HUP <pid>`.

use std::convert::Infallible;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response};

async fn hello(req: Request<gracesrv::IncomingBody>) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = format!(
        "hello from the app, pid {}, path {}\n",
        std::process::id(),
        req.uri().path()
    );
    Ok(Response::new(Full::new(Bytes::from(body))))
}

#[tokio::main]
async fn main() {
    // Same command line as gracesrv: `-c FILE`.
    let args: Vec<String> = std::env::args().collect();
    let config = match args.iter().position(|a| a == "-c" || a == "--config") {
        Some(i) if i + 1 < args.len() => args[i + 1].clone(),
        _ => "app.yaml".to_string(),
    };
    let code = gracesrv::Server::new(config)
        .service("app", tower::service_fn(hello))
        .serve()
        .await;
    std::process::exit(code);
}
