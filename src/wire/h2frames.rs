//! The frames of an HTTP/2 connection, as they pass between the socket and
//! hyper, for the drain hyper does not offer: one GOAWAY with the real last
//! stream ID, sent when no stream is open, and no PING after it.
//!
//! hyper's drain is h2's two steps (GOAWAY with the largest ID, a PING, and
//! the real GOAWAY once the PING comes back), right per RFC 9113 section
//! 6.8. python-h2 (httpx, the most used Python client) moves to CLOSED on
//! the first GOAWAY and then fails on the PING and on any response that
//! follows it, so each restart cost it the requests in flight. A GOAWAY at a
//! moment when every stream the client opened has been answered, with that
//! stream's ID, is what every client keeps: nothing answers after it, and a
//! request that crosses it has a higher ID, which the client knows was not
//! processed and may send again (httpx does).
//!
//! Only frame headers are read (nine bytes: length, type, flags, stream);
//! payloads pass untouched.

const HEADERS: u8 = 0x1;
const DATA: u8 = 0x0;
const RST_STREAM: u8 = 0x3;
const END_STREAM: u8 = 0x1;

/// The client's connection preface, before its first frame.
const PREFACE_LEN: usize = 24;

/// One direction of the connection.
#[derive(Default)]
struct Side {
    /// Bytes of the client preface still to come (reads only).
    preface: usize,
    header: [u8; 9],
    /// Bytes of the current frame header seen.
    have: usize,
    /// Payload bytes of the current frame still to pass.
    payload: usize,
    /// Frames seen whole (their headers).
    frames: u64,
}

impl Side {
    /// Follows `data`; calls `frame(type, flags, stream)` for each frame
    /// whose header completes in it.
    fn feed(&mut self, mut data: &[u8], mut frame: impl FnMut(u8, u8, u32)) {
        let skip = self.preface.min(data.len());
        self.preface -= skip;
        data = &data[skip..];
        while !data.is_empty() {
            if self.payload > 0 {
                let n = self.payload.min(data.len());
                self.payload -= n;
                data = &data[n..];
                continue;
            }
            let n = (9 - self.have).min(data.len());
            self.header[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have == 9 {
                let h = self.header;
                self.have = 0;
                self.payload = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                self.frames += 1;
                frame(h[3], h[4], stream);
            }
        }
    }

    /// Between two frames.
    fn at_boundary(&self) -> bool {
        self.have == 0 && self.payload == 0
    }
}

/// What a server's HTTP/2 connection has open, from its frames.
pub(crate) struct Frames {
    read: Side,
    write: Side,
    /// The highest stream the client opened.
    last: u32,
    /// Streams the client opened that the server has not ended or reset
    /// (nor the client reset).
    open: Vec<u32>,
}

impl Default for Frames {
    fn default() -> Frames {
        Frames {
            read: Side {
                preface: PREFACE_LEN,
                ..Side::default()
            },
            write: Side::default(),
            last: 0,
            open: Vec::new(),
        }
    }
}

impl Frames {
    /// Bytes the client sent, as hyper reads them.
    pub(crate) fn read(&mut self, data: &[u8]) {
        let (last, open) = (&mut self.last, &mut self.open);
        self.read.feed(data, |kind, _, stream| match kind {
            HEADERS if stream > *last && stream % 2 == 1 => {
                *last = stream;
                open.push(stream);
            }
            RST_STREAM => open.retain(|s| *s != stream),
            _ => {}
        });
    }

    /// Bytes hyper wrote to the client.
    pub(crate) fn wrote(&mut self, data: &[u8]) {
        let open = &mut self.open;
        self.write.feed(data, |kind, flags, stream| match kind {
            HEADERS | DATA if flags & END_STREAM != 0 => open.retain(|s| *s != stream),
            RST_STREAM => open.retain(|s| *s != stream),
            _ => {}
        });
    }

    /// No stream open, each direction between two frames, and both
    /// prefaces through (a GOAWAY before the server's SETTINGS would break
    /// the protocol): hyper may be dropped here and a GOAWAY written, and
    /// nothing is cut.
    pub(crate) fn quiet(&self) -> bool {
        self.open.is_empty()
            && self.read.preface == 0
            && self.read.frames > 0
            && self.read.have == 0
            && self.write.frames > 0
            && self.write.at_boundary()
    }

    /// The highest stream the client opened.
    pub(crate) fn last(&self) -> u32 {
        self.last
    }
}

/// GOAWAY(NO_ERROR) naming `last`, the last stream the client opened: every
/// one of them was answered, and any after it was not processed.
pub(crate) fn goaway(last: u32) -> [u8; 17] {
    let mut f = [0u8; 17];
    f[2] = 8; // length
    f[3] = 0x7; // GOAWAY
    f[9..13].copy_from_slice(&last.to_be_bytes());
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn streams_open_and_close_across_any_split() {
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        let client = [
            &preface[..],
            &frame(0x4, 0, 0, &[0; 6]),
            &frame(HEADERS, 0x4, 1, b"abc"),
            &frame(HEADERS, 0x5, 3, b"abc"),
            &frame(DATA, 0x1, 1, b"body"),
        ]
        .concat();
        let server = [
            frame(0x4, 0, 0, &[0; 12]),
            frame(HEADERS, 0x4, 3, b"h"),
            frame(DATA, 0x1, 3, b"answer"),
        ]
        .concat();
        for size in [1, 2, 5, 9, 10, 1000] {
            let mut f = Frames::default();
            for piece in client.chunks(size) {
                f.read(piece);
            }
            assert_eq!((f.last, f.open.clone()), (3, vec![1, 3]), "size {size}");
            assert!(!f.quiet());
            let mut pieces = server.chunks(size).peekable();
            while let Some(piece) = pieces.next() {
                f.wrote(piece);
                if pieces.peek().is_some() && !f.write.at_boundary() {
                    assert!(!f.quiet());
                }
            }
            assert_eq!(f.open, vec![1], "stream 3 answered");
            f.read(&frame(RST_STREAM, 0, 1, &[0, 0, 0, 8]));
            assert!(f.quiet(), "size {size}");
            assert_eq!(&goaway(f.last())[9..13], &[0, 0, 0, 3]);
        }
    }
}
