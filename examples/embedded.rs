//! An application that embeds gracesrv: its own service on the `app`
//! listener, the config's routes on the others, and zero-downtime restarts
//! on SIGHUP for all of them.
//!
//! Run: `cargo run --example embedded -- -c app.yaml`, then `kill -HUP <pid>`.

use std::convert::Infallible;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};

async fn hello(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = format!(
        "hello from the app, pid {}, path {}\n",
        std::process::id(),
        req.uri().path()
    );
    Ok(Response::new(Full::new(Bytes::from(body))))
}

fn main() {
    // Same command line as gracesrv: `-c FILE`.
    let args: Vec<String> = std::env::args().collect();
    let config = match args.iter().position(|a| a == "-c" || a == "--config") {
        Some(i) if i + 1 < args.len() => args[i + 1].clone(),
        _ => "app.yaml".to_string(),
    };
    let code = gracesrv::Server::new(config)
        .service("app", tower::service_fn(hello))
        .run();
    std::process::exit(code);
}
