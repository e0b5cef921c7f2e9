//! The bare stack gracesrv is built on, for `bench/run` to measure what
//! gracesrv's own work costs: hyper-util's auto server (HTTP/1.1 and HTTP/2)
//! with tokio-rustls, one current-thread runtime per core, and a fixed
//! response. No timeouts, no drain, no handoff, no routes.
//!
//! With `--reuseport` each worker has its own socket (`SO_REUSEPORT`) and the
//! kernel spreads connections over them by hash; without it the workers
//! share one queue, and whichever wakes first takes a connection.
//!
//!   bare --plain 127.0.0.1:8080 --tls 127.0.0.1:8443 --cert certs/localhost.crt --key certs/localhost.key [--reuseport]

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

fn main() {
    let mut plain = None;
    let mut tls = None;
    let (mut cert, mut key) = (String::new(), String::new());
    let mut reuse = false;
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        if k == "--reuseport" {
            reuse = true;
            continue;
        }
        let v = it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--plain" => plain = Some(v),
            "--tls" => tls = Some(v),
            "--cert" => cert = v,
            "--key" => key = v,
            _ => panic!("unknown argument {k}"),
        }
    }
    let acceptor = tls.as_ref().map(|_| {
        let certs = CertificateDer::pem_file_iter(&cert)
            .expect("cert")
            .collect::<Result<Vec<_>, _>>()
            .expect("cert");
        let key = PrivateKeyDer::from_pem_file(&key).expect("key");
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocols")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("certificate");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    });
    let mut sockets = Vec::new();
    for (addr, acceptor) in [(plain, None), (tls, acceptor)] {
        if let Some(addr) = addr {
            let l = if reuse {
                reuseport(addr.parse().expect("addr"))
            } else {
                std::net::TcpListener::bind(&addr).expect("bind")
            };
            l.set_nonblocking(true).expect("nonblocking");
            sockets.push((l, acceptor));
        }
    }
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads: Vec<_> = (0..workers)
        .map(|w| {
            let sockets: Vec<_> = sockets
                .iter()
                .map(|(l, a)| {
                    if w > 0 && reuse {
                        (reuseport(l.local_addr().expect("addr")), a.clone())
                    } else {
                        (l.try_clone().expect("dup"), a.clone())
                    }
                })
                .collect();
            std::thread::spawn(move || worker(sockets))
        })
        .collect();
    println!("ready");
    for t in threads {
        let _ = t.join();
    }
}

fn reuseport(addr: std::net::SocketAddr) -> std::net::TcpListener {
    use nix::sys::socket::*;
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    setsockopt(&fd, sockopt::ReusePort, &true).unwrap();
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(addr),
    )
    .unwrap();
    listen(&fd, Backlog::new(4096).unwrap()).unwrap();
    let l = std::net::TcpListener::from(fd);
    l.set_nonblocking(true).unwrap();
    l
}

/// `pid <pid>\n`, made once.
fn body() -> Bytes {
    static BODY: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
    BODY.get_or_init(|| Bytes::from(format!("pid {}\n", std::process::id())))
        .clone()
}

fn worker(sockets: Vec<(std::net::TcpListener, Option<tokio_rustls::TlsAcceptor>)>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
        for (l, acceptor) in sockets {
            let l = tokio::net::TcpListener::from_std(l).expect("listener");
            let builder = builder.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = l.accept().await else {
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let (builder, acceptor) = (builder.clone(), acceptor.clone());
                    tokio::spawn(async move {
                        // The same bytes as gracesrv's `respond` route.
                        let svc = service_fn(|_req| {
                            let mut res = hyper::Response::new(Full::new(body()));
                            res.headers_mut().insert(
                                http::header::CONTENT_TYPE,
                                http::HeaderValue::from_static("text/plain; charset=utf-8"),
                            );
                            std::future::ready(Ok::<_, Infallible>(res))
                        });
                        match acceptor {
                            None => {
                                let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                            }
                            Some(a) => {
                                if let Ok(tls) = a.accept(stream).await {
                                    let _ = builder.serve_connection(TokioIo::new(tls), svc).await;
                                }
                            }
                        }
                    });
                }
            });
        }
        std::future::pending::<()>().await
    });
}
