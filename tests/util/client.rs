//! A small HTTP client for the tests, on hyper's connection API, so each
//! test controls exactly which protocol and which connection it uses.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode, Version};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

pub fn tls_config(ca_pem: &str, alpn: &[Vec<u8>]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.to_vec();
    Arc::new(config)
}

/// Prefix of the error for a request the server did not process (and a
/// client may retry).
pub const NOT_SENT: &str = "not sent";

#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: String,
}

impl Resp {
    /// The pid a `respond` body names ("pid 1234 ..." or "slow 1234").
    pub fn pid(&self) -> u32 {
        self.body
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no pid in {:?}", self.body))
    }
}

enum Sender {
    H1(http1::SendRequest<Empty<Bytes>>),
    H2(http2::SendRequest<Empty<Bytes>>),
}

/// One client connection.
pub struct Conn {
    sender: Sender,
    host: String,
    /// DER of the server's leaf certificate (TLS only).
    pub peer_cert: Option<Vec<u8>>,
    pub alpn: Option<Vec<u8>>,
    /// The TLS session was resumed (a ticket the server accepted).
    pub resumed: bool,
}

/// How to connect: TLS config and server name, or plain; HTTP/2 or HTTP/1.1.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub tls: Option<(Arc<rustls::ClientConfig>, String)>,
    pub h2: bool,
}

impl Target {
    pub fn plain(addr: SocketAddr) -> Target {
        Target {
            addr,
            tls: None,
            h2: false,
        }
    }
    pub fn tls(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Target {
        Target {
            addr,
            tls: Some((config, "localhost".into())),
            h2: false,
        }
    }
    /// TLS (HTTP/1.1) to `addr` for the server name `name`, trusting
    /// `roots_pem` only.
    pub fn named(addr: SocketAddr, roots_pem: &str, name: &str) -> Target {
        Target {
            addr,
            tls: Some((tls_config(roots_pem, &[b"http/1.1".to_vec()]), name.into())),
            h2: false,
        }
    }
    pub fn h2(mut self) -> Target {
        self.h2 = true;
        self
    }
}

/// No request or connect in a test may wait forever: a hang fails with a
/// message instead of stalling the suite.
const DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

pub async fn connect(t: &Target) -> Result<Conn, String> {
    tokio::time::timeout(DEADLINE, connect_inner(t))
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "connect to {}: no answer within {DEADLINE:?}",
                t.addr
            ))
        })
}

async fn connect_inner(t: &Target) -> Result<Conn, String> {
    let tcp = TcpStream::connect(t.addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    tcp.set_nodelay(true).ok();
    let host = t.addr.to_string();
    match &t.tls {
        None => handshake(TokioIo::new(tcp), t.h2, host, None, None, false).await,
        Some((config, name)) => {
            let name = ServerName::try_from(name.clone()).map_err(|e| e.to_string())?;
            let tls = tokio_rustls::TlsConnector::from(config.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| format!("tls: {e}"))?;
            let (_, session) = tls.get_ref();
            let cert = session
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.to_vec());
            let alpn = session.alpn_protocol().map(|p| p.to_vec());
            let h2 = alpn.as_deref() == Some(b"h2");
            let resumed = session.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
            handshake(TokioIo::new(tls), h2, host, cert, alpn, resumed).await
        }
    }
}

async fn handshake<T>(
    io: TokioIo<T>,
    h2: bool,
    host: String,
    peer_cert: Option<Vec<u8>>,
    alpn: Option<Vec<u8>>,
    resumed: bool,
) -> Result<Conn, String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let sender = if h2 {
        let (s, conn) = http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| format!("h2 handshake: {e}"))?;
        tokio::spawn(conn);
        Sender::H2(s)
    } else {
        let (s, conn) = http1::handshake(io)
            .await
            .map_err(|e| format!("h1 handshake: {e}"))?;
        tokio::spawn(conn);
        Sender::H1(s)
    };
    Ok(Conn {
        sender,
        host,
        peer_cert,
        alpn,
        resumed,
    })
}

impl Conn {
    /// Can this connection take another request? (False once the server
    /// closed it, e.g. after `Connection: close` or a GOAWAY.)
    pub async fn usable(&mut self) -> bool {
        match &mut self.sender {
            Sender::H1(s) => s.ready().await.is_ok(),
            Sender::H2(s) => s.ready().await.is_ok(),
        }
    }

    pub async fn get(&mut self, path: &str) -> Result<Resp, String> {
        self.request(
            Request::get(path)
                .header("host", &self.host)
                .body(Empty::new())
                .unwrap(),
        )
        .await
    }

    pub async fn request(&mut self, req: Request<Empty<Bytes>>) -> Result<Resp, String> {
        let what = format!("{} {}", req.method(), req.uri());
        tokio::time::timeout(DEADLINE, self.request_inner(req))
            .await
            .unwrap_or_else(|_| Err(format!("request {what}: no response within {DEADLINE:?}")))
    }

    async fn request_inner(&mut self, mut req: Request<Empty<Bytes>>) -> Result<Resp, String> {
        // try_send_request hands the request back if it never reached the
        // connection (e.g. queued when a GOAWAY arrived): such a request was
        // not processed and is safe to retry (RFC 9113 section 6.8).
        let res = match &mut self.sender {
            Sender::H1(s) => s.try_send_request(req).await,
            Sender::H2(s) => {
                *req.version_mut() = Version::HTTP_2;
                let uri = format!("https://{}{}", self.host, req.uri());
                *req.uri_mut() = uri.parse().unwrap();
                req.headers_mut().remove("host");
                s.try_send_request(req).await
            }
        };
        let res = match res {
            Ok(res) => res,
            Err(mut e) => {
                // Not processed by the server: the request never reached the
                // connection, or the stream ended by a graceful GOAWAY (h2
                // refuses new streams once one arrives; RFC 9113 6.8 says
                // such streams were not processed and may be retried).
                let unsent = e.take_message().is_some();
                let detail = format!("{:?}", e.error());
                let goaway = detail.contains("GoAway(") && detail.contains("NO_ERROR");
                let kind = if unsent || goaway {
                    NOT_SENT
                } else {
                    "request"
                };
                return Err(format!("{kind}: {detail}"));
            }
        };
        let (parts, body) = res.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        Ok(Resp {
            status: parts.status,
            version: parts.version,
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).to_string(),
        })
    }

    /// Sends a GET and returns the response with its body not read: a
    /// client that stops reading (HTTP/2: its flow control window stays
    /// shut once the server has used it up).
    pub async fn get_unread(
        &mut self,
        path: &str,
    ) -> Result<http::Response<hyper::body::Incoming>, String> {
        let mut req = Request::get(path)
            .header("host", &self.host)
            .body(Empty::new())
            .unwrap();
        let res = match &mut self.sender {
            Sender::H1(s) => s.send_request(req).await,
            Sender::H2(s) => {
                *req.version_mut() = Version::HTTP_2;
                *req.uri_mut() = format!("https://{}{path}", self.host).parse().unwrap();
                req.headers_mut().remove("host");
                s.send_request(req).await
            }
        };
        res.map_err(|e| format!("request: {e}"))
    }

    /// A second handle on an HTTP/2 connection, for concurrent streams.
    pub fn h2_clone(&self) -> Option<Conn> {
        match &self.sender {
            Sender::H2(s) => Some(Conn {
                sender: Sender::H2(s.clone()),
                host: self.host.clone(),
                peer_cert: self.peer_cert.clone(),
                alpn: self.alpn.clone(),
                resumed: self.resumed,
            }),
            Sender::H1(_) => None,
        }
    }
}

/// One request on a new connection.
pub async fn get(t: &Target, path: &str) -> Result<Resp, String> {
    connect(t).await?.get(path).await
}
