//! One HTTP/1.x exchange written by hand, for requests a client library
//! would tidy up (a missing or doubled Host, odd targets, broken framing).

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::TestServer;

/// One HTTP/1.x answer read off the wire.
#[derive(Debug)]
pub struct Raw {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
    /// The server closed the connection after this answer.
    pub closed: bool,
}

impl Raw {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Sends `request` as written, over plain TCP or TLS (ALPN http/1.1), and
/// reads one answer (a body of `content-length`; none for HEAD and 304),
/// then whether the connection ends.
pub async fn raw(srv: &TestServer, listener: &str, request: &str) -> Raw {
    let tcp = tokio::net::TcpStream::connect(srv.addr(listener))
        .await
        .unwrap();
    if listener == "web-tls" {
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = tokio_rustls::TlsConnector::from(srv.tls_h1())
            .connect(name, tcp)
            .await
            .unwrap();
        exchange(tls, request).await
    } else {
        exchange(tcp, request).await
    }
}

pub async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, request: &str) -> Raw {
    let go = async {
        s.write_all(request.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            let n = s.read(&mut chunk).await.unwrap();
            assert!(
                n > 0,
                "closed before an answer: {:?}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let mut raw = Raw {
            status: head[9..12].parse().unwrap(),
            head,
            body: buf[end + 4..].to_vec(),
            closed: false,
        };
        let len: usize = match raw.header("content-length") {
            Some(l) if !request.starts_with("HEAD") && raw.status != 304 => l.parse().unwrap(),
            _ => 0,
        };
        while raw.body.len() < len {
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed in the body");
            raw.body.extend_from_slice(&chunk[..n]);
        }
        raw.body.truncate(len);
        raw.closed = matches!(
            tokio::time::timeout(Duration::from_millis(300), s.read(&mut chunk)).await,
            Ok(Ok(0)) | Ok(Err(_))
        );
        raw
    };
    tokio::time::timeout(super::WAIT, go)
        .await
        .expect("an answer in time")
}
