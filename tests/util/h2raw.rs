//! HTTP/2 frames by hand, for the shapes a well-behaved client library
//! hides: DATA sent after the stream's answer, frames sent to a connection
//! the server is closing, a window that never opens.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const DATA: u8 = 0;
pub const HEADERS: u8 = 1;
pub const RST_STREAM: u8 = 3;
pub const SETTINGS: u8 = 4;
pub const PING: u8 = 6;
pub const GOAWAY: u8 = 7;
pub const WINDOW_UPDATE: u8 = 8;
pub const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;

/// The largest flow control window.
pub const MAX_WINDOW: u32 = (1 << 31) - 1;

#[derive(Debug)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

/// A prior-knowledge (h2c) connection that answers SETTINGS and PING by
/// itself and keeps count of the server's connection window for our DATA.
pub struct RawH2 {
    io: TcpStream,
    authority: String,
    /// How much DATA the server lets us send on the connection.
    pub send_window: i64,
}

impl RawH2 {
    /// Connects; our windows (`window` for each stream, and the
    /// connection's) are as given.
    pub async fn connect(addr: SocketAddr, window: u32) -> RawH2 {
        let io = TcpStream::connect(addr).await.unwrap();
        let mut c = RawH2 {
            io,
            authority: addr.to_string(),
            send_window: 65_535,
        };
        c.io.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        let mut settings = vec![0, 4];
        settings.extend_from_slice(&window.to_be_bytes());
        c.send(SETTINGS, 0, 0, &settings).await.unwrap();
        if window > 65_535 {
            c.send(WINDOW_UPDATE, 0, 0, &(window - 65_535).to_be_bytes())
                .await
                .unwrap();
        }
        c
    }

    pub async fn send(
        &mut self,
        kind: u8,
        flags: u8,
        stream: u32,
        payload: &[u8],
    ) -> std::io::Result<()> {
        let len = payload.len() as u32;
        let mut frame = len.to_be_bytes()[1..].to_vec();
        frame.extend_from_slice(&[kind, flags]);
        frame.extend_from_slice(&stream.to_be_bytes());
        frame.extend_from_slice(payload);
        if kind == DATA {
            self.send_window -= i64::from(len);
        }
        self.io.write_all(&frame).await
    }

    /// A request head: `method` GET or POST, `path`.
    pub async fn request(&mut self, stream: u32, method: &str, path: &str, end: bool) {
        let authority = self.authority.clone();
        self.request_with(stream, method, path, &authority, &[], end)
            .await;
    }

    /// A request head with this `:authority` and extra fields, each named
    /// by its index in HPACK's static table (`host` is 38).
    pub async fn request_with(
        &mut self,
        stream: u32,
        method: &str,
        path: &str,
        authority: &str,
        extra: &[(u8, &str)],
        end: bool,
    ) {
        let mut block = vec![if method == "POST" { 0x83 } else { 0x82 }, 0x86];
        if path == "/" {
            block.push(0x84);
        } else {
            literal(&mut block, 4, path);
        }
        literal(&mut block, 1, authority);
        for (index, value) in extra {
            literal(&mut block, *index, value);
        }
        let flags = END_HEADERS | if end { END_STREAM } else { 0 };
        self.send(HEADERS, flags, stream, &block).await.unwrap();
    }

    /// The `:status` of a response HEADERS frame (literal or indexed).
    pub fn status(block: &[u8]) -> Option<u16> {
        match block.first()? {
            0x88 => Some(200),
            0x89 => Some(204),
            0x8a => Some(206),
            0x8b => Some(304),
            0x8c => Some(400),
            0x8d => Some(404),
            0x8e => Some(500),
            // Literal with the name `:status` (index 8), any of the forms.
            b if b & 0x0f == 8 || b & 0x3f == 8 => {
                let len = (*block.get(1)? & 0x7f) as usize;
                std::str::from_utf8(block.get(2..2 + len)?)
                    .ok()?
                    .parse()
                    .ok()
            }
            _ => None,
        }
    }

    /// The next frame that is not SETTINGS or PING (those are answered
    /// here); `None` at the end of the stream. A read error is returned.
    pub async fn next(&mut self) -> std::io::Result<Option<Frame>> {
        loop {
            let mut head = [0u8; 9];
            match self.io.read_exact(&mut head).await {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
                Err(e) => return Err(e),
            }
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            self.io.read_exact(&mut payload).await?;
            let frame = Frame {
                kind: head[3],
                flags: head[4],
                stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & MAX_WINDOW,
                payload,
            };
            match frame.kind {
                SETTINGS if frame.flags & ACK == 0 => self.send(SETTINGS, ACK, 0, &[]).await?,
                SETTINGS => {}
                PING if frame.flags & ACK == 0 => self.send(PING, ACK, 0, &frame.payload).await?,
                PING => {}
                WINDOW_UPDATE if frame.stream == 0 => {
                    let n = u32::from_be_bytes(frame.payload[..4].try_into().unwrap());
                    self.send_window += i64::from(n & MAX_WINDOW);
                }
                _ => return Ok(Some(frame)),
            }
        }
    }

    /// Reads frames until the server lets us send `n` bytes of DATA.
    pub async fn wait_send_window(&mut self, n: usize) {
        while self.send_window < n as i64 {
            let f = tokio::time::timeout(Duration::from_secs(30), self.next())
                .await
                .expect("a WINDOW_UPDATE in time")
                .unwrap()
                .expect("the connection stays open");
            assert_ne!(
                f.kind,
                GOAWAY,
                "GOAWAY: {:?}",
                String::from_utf8_lossy(&f.payload)
            );
        }
    }
}

/// A header field "literal without indexing", its name from the static
/// table, its value as a plain string.
fn literal(block: &mut Vec<u8>, name_index: u8, value: &str) {
    // The index is an integer with a 4-bit prefix (RFC 7541 section 5.1).
    if name_index < 15 {
        block.push(name_index);
    } else {
        block.extend_from_slice(&[15, name_index - 15]);
    }
    assert!(value.len() < 127);
    block.push(value.len() as u8);
    block.extend_from_slice(value.as_bytes());
}
