//! An upgraded connection (a WebSocket through the proxy) relayed both ways,
//! and how it ends when its generation cuts it.
//!
//! A tunnel lives until one side closes it, or until its generation must end
//! it (`shutdown_timeout`, `max_draining`, QUIT). A bare close then looks
//! like a crash to both ends (WebSocket close code 1006), so a WebSocket is
//! ended as a server going away would end it: a close frame with code 1001
//! "going away" to the client and to the upstream, then a half-close. The
//! relay follows the frame boundaries of each direction so the close frame
//! never lands inside another frame; a direction caught mid-frame is only
//! half-closed.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

/// How long the close frames and half-closes may take once a tunnel is cut.
const CLOSE_WRITE: std::time::Duration = std::time::Duration::from_secs(1);

/// Relays between `client` and `upstream` until both directions end, or
/// `cut` turns true. `websocket`: the upgrade is a WebSocket, so a cut sends
/// close frames. Returns the bytes relayed up and down.
pub(crate) async fn relay<C, U>(
    client: C,
    upstream: U,
    websocket: bool,
    cut: watch::Receiver<bool>,
) -> (u64, u64)
where
    C: AsyncRead + AsyncWrite + Send + 'static,
    U: AsyncRead + AsyncWrite + Send + 'static,
{
    let (client_read, client_write) = tokio::io::split(client);
    let (upstream_read, upstream_write) = tokio::io::split(upstream);
    let up = pipe(client_read, upstream_write, websocket, cut.clone());
    let down = pipe(upstream_read, client_write, websocket, cut);
    let (up, down) = tokio::join!(up, down);
    let bytes = (up.bytes, down.bytes);
    if !(up.cut || down.cut) {
        return bytes;
    }
    let key = mask_key();
    // Each side hears "going away", in its own framing: a client's frames
    // to the upstream are masked (RFC 6455 section 5.3), a server's are not.
    let (client_read, upstream_read) = tokio::join!(
        down.end(&key, websocket, false),
        up.end(&key, websocket, true)
    );
    // Then read and drop what either side still sends (its own close frame)
    // until it closes, so that closing never turns into a reset that could
    // throw our close frame away before it is read.
    let _ = tokio::time::timeout(CLOSE_WRITE, async {
        tokio::join!(discard(upstream_read), discard(client_read))
    })
    .await;
    bytes
}

async fn discard<R: AsyncRead + Unpin>(mut src: R) {
    let mut buf = [0u8; 1024];
    while let Ok(1..) = src.read(&mut buf).await {}
}

/// One direction, after it stopped.
struct Piped<R, W> {
    src: R,
    dst: W,
    frames: Frames,
    bytes: u64,
    /// Stopped by a cut (not by the source closing, or an error).
    cut: bool,
}

impl<R, W: AsyncWrite + Unpin> Piped<R, W> {
    /// After a cut: a close frame (at a frame boundary, for a WebSocket),
    /// then a half-close. A direction whose source ended was half-closed
    /// already. Returns the source, to read what else comes from it.
    async fn end(mut self, key: &[u8; 4], websocket: bool, masked: bool) -> R {
        if !self.cut {
            return self.src;
        }
        let _ = tokio::time::timeout(CLOSE_WRITE, async {
            if websocket && self.frames.at_boundary() {
                let frame = close_frame(1001, "going away", masked.then_some(key));
                let _ = self.dst.write_all(&frame).await;
            }
            let _ = self.dst.shutdown().await;
        })
        .await;
        self.src
    }
}

/// Copies `src` to `dst` until `src` ends (then half-closes `dst`), a write
/// fails, or `cut` turns true. A cut is only looked at between a read and
/// its write, so what was read is always written whole.
async fn pipe<R, W>(
    mut src: R,
    mut dst: W,
    websocket: bool,
    mut cut: watch::Receiver<bool>,
) -> Piped<R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut frames = Frames::default();
    let mut bytes = 0u64;
    let mut buf = vec![0u8; 16 * 1024];
    let cut = loop {
        let n = tokio::select! {
            r = src.read(&mut buf) => match r {
                Ok(0) | Err(_) => {
                    let _ = dst.shutdown().await;
                    break false;
                }
                Ok(n) => n,
            },
            _ = cut_signal(&mut cut) => break true,
        };
        if websocket {
            frames.feed(&buf[..n]);
        }
        if dst.write_all(&buf[..n]).await.is_err() {
            break false;
        }
        bytes += n as u64;
    };
    Piped {
        src,
        dst,
        frames,
        bytes,
        cut,
    }
}

/// Resolves when `cut` turns true; never, if its sender is gone.
async fn cut_signal(cut: &mut watch::Receiver<bool>) {
    if cut.wait_for(|c| *c).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Where a stream of WebSocket frames is: in a frame's header, in its
/// payload, or between frames.
#[derive(Default)]
struct Frames {
    head: [u8; 14],
    have: usize,
    payload_left: u64,
}

impl Frames {
    fn at_boundary(&self) -> bool {
        self.have == 0 && self.payload_left == 0
    }

    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.payload_left > 0 {
                let n = usize::try_from(self.payload_left)
                    .unwrap_or(usize::MAX)
                    .min(data.len());
                self.payload_left -= n as u64;
                data = &data[n..];
                continue;
            }
            self.head[self.have] = data[0];
            self.have += 1;
            data = &data[1..];
            if let Some((len, payload)) = header(&self.head[..self.have]) {
                if self.have == len {
                    self.have = 0;
                    self.payload_left = payload;
                }
            }
        }
    }
}

/// A frame header's length and its payload's, once enough of it is known.
fn header(h: &[u8]) -> Option<(usize, u64)> {
    let (&b1, _) = h.get(1).zip(h.first())?;
    let masked = b1 & 0x80 != 0;
    let (ext, payload) = match b1 & 0x7f {
        126 => (
            2,
            u64::from(u16::from_be_bytes(h.get(2..4)?.try_into().ok()?)),
        ),
        127 => (8, u64::from_be_bytes(h.get(2..10)?.try_into().ok()?)),
        n => (0, u64::from(n)),
    };
    Some((2 + ext + if masked { 4 } else { 0 }, payload))
}

/// A close frame with `code` and `reason` (under 124 bytes), masked with
/// `key` when sent as a client.
fn close_frame(code: u16, reason: &str, key: Option<&[u8; 4]>) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(&reason.as_bytes()[..reason.len().min(123)]);
    let mut frame = vec![0x88, payload.len() as u8];
    if let Some(key) = key {
        frame[1] |= 0x80;
        frame.extend_from_slice(key);
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= key[i % 4];
        }
    }
    frame.extend_from_slice(&payload);
    frame
}

/// A masking key: unpredictable, as RFC 6455 asks of a client.
fn mask_key() -> [u8; 4] {
    let mut key = [0u8; 4];
    let rng = rustls::crypto::aws_lc_rs::default_provider().secure_random;
    if rng.fill(&mut key).is_err() {
        key = std::process::id().to_be_bytes();
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_boundaries_are_followed() {
        let mut f = Frames::default();
        assert!(f.at_boundary());
        // A masked text frame of 5 bytes, fed in pieces.
        let frame = [0x81, 0x85, 1, 2, 3, 4, b'a', b'b', b'c', b'd', b'e'];
        f.feed(&frame[..1]);
        assert!(!f.at_boundary());
        f.feed(&frame[1..7]);
        assert!(!f.at_boundary());
        f.feed(&frame[7..]);
        assert!(f.at_boundary());
        // 16-bit and 64-bit lengths, unmasked.
        let mut long = vec![0x82, 126, 0x01, 0x00];
        long.extend(vec![0u8; 256]);
        long.extend([0x82, 127, 0, 0, 0, 0, 0, 0, 0, 3, 9, 9, 9]);
        f.feed(&long[..long.len() - 1]);
        assert!(!f.at_boundary());
        f.feed(&long[long.len() - 1..]);
        assert!(f.at_boundary());
        // An empty frame ends with its header.
        f.feed(&[0x89, 0x00]);
        assert!(f.at_boundary());
    }

    #[test]
    fn close_frames_both_ways() {
        assert_eq!(close_frame(1001, "", None), vec![0x88, 2, 0x03, 0xe9]);
        let key = [1, 2, 3, 4];
        let masked = close_frame(1001, "x", Some(&key));
        assert_eq!(&masked[..6], &[0x88, 0x83, 1, 2, 3, 4]);
        let unmasked: Vec<u8> = masked[6..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ key[i % 4])
            .collect();
        assert_eq!(unmasked, vec![0x03, 0xe9, b'x']);
    }
}
