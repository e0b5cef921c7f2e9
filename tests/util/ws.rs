//! A minimal WebSocket client over a raw TCP stream (RFC 6455): the
//! handshake, a masked text frame and its echo, and the close frame a
//! server sends when it cuts a tunnel.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
/// The `Sec-WebSocket-Accept` for [`KEY`] (RFC 6455 section 1.3).
pub const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// Opens a WebSocket at `path`; returns the stream after the 101.
pub async fn open(addr: SocketAddr, path: &str) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    let head = String::from_utf8(head).unwrap().to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(
        head.contains(&format!("sec-websocket-accept: {}", ACCEPT.to_lowercase())),
        "{head}"
    );
    s
}

/// Sends a masked text frame and reads the echo.
pub async fn echo(s: &mut tokio::net::TcpStream, msg: &str) -> std::io::Result<String> {
    let mask = [1u8, 2, 3, 4];
    let mut frame = vec![0x81, 0x80 | msg.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(msg.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    s.write_all(&frame).await?;
    let mut head = [0u8; 2];
    s.read_exact(&mut head).await?;
    let mut data = vec![0u8; (head[1] & 0x7f) as usize];
    s.read_exact(&mut data).await?;
    Ok(String::from_utf8(data).unwrap())
}

/// Reads the close frame the server sends a client when it cuts a tunnel,
/// then the end of the stream; returns the close code.
pub async fn closed(s: &mut tokio::net::TcpStream) -> u16 {
    let read = async {
        let mut head = [0u8; 2];
        s.read_exact(&mut head).await.unwrap();
        assert_eq!(head[0], 0x88, "a close frame, final");
        assert_eq!(head[1] & 0x80, 0, "server frames are not masked");
        let mut data = vec![0u8; (head[1] & 0x7f) as usize];
        s.read_exact(&mut data).await.unwrap();
        assert_eq!(&data[2..], b"going away");
        let mut rest = [0u8; 16];
        assert_eq!(s.read(&mut rest).await.unwrap_or(0), 0, "then closed");
        u16::from_be_bytes([data[0], data[1]])
    };
    tokio::time::timeout(super::WAIT, read).await.unwrap()
}
