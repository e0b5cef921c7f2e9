//! An application that embeds gracesrv: its own service on the `app`
//! listener, the config's routes on the others, and zero-downtime restarts
//! on SIGHUP for all of them.
//!
//! Run: `cargo run --example embedded -- -c app.yaml`, then `kill -HUP <pid>`.

use std::convert::Infallible;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Request, Response};

async fn hello(req: Request<gracesrv::IncomingBody>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    // The request's body, over whichever HTTP version it came.
    let read = req
        .into_body()
        .collect()
        .await
        .map_or(0, |b| b.to_bytes().len());
    let mut body = format!(
        "hello from the app, pid {}, path {path}",
        std::process::id()
    );
    if read > 0 {
        body += &format!(", {read} bytes");
    }
    body.push('\n');
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
