//! HTTP/1.x request heads on their way to hyper, for what RFC 9112 asks
//! and hyper's parser (httparse) cannot be told: a request of a later
//! HTTP/1 minor version is served as HTTP/1.1 (section 2.3: `HTTP/1.2`
//! is rewritten to `HTTP/1.1`, same length, before hyper sees it), a
//! request of another major version gets 505, and a request with a
//! transfer coding the server does not know (anything but `chunked`
//! alone, `identity` included) gets 501 (section 6.1); hyper answers all
//! three with 400.
//!
//! To find each request's head the filter follows the framing of the
//! bodies between them (Content-Length, chunked), as hyper will; anything
//! it does not follow (an upgrade, CONNECT, a head hyper will refuse
//! anyway) switches it off for the rest of the connection, and hyper
//! decides alone. A refused head reaches hyper as a request without a body
//! (its request line and fields, less its framing fields), which the
//! connection answers with the status the filter chose (see
//! [`Heads::refused`]); nothing after it is read.

use bytes::{Buf, BytesMut};
use http::StatusCode;
use tokio::io::ReadBuf;

/// Heads longer than this are left to hyper (it answers 431).
const MAX_HEAD: usize = 64 * 1024;

/// The header fields hyper parses on its stack (its default). A larger
/// limit makes it allocate arrays of that size for every request (16% of
/// keep-alive throughput at 500), so a connection starts with this one and
/// moves to the configured limit only when a head needs it (see
/// [`Heads::wants_more_fields`]).
pub(crate) const STACK_FIELDS: usize = 100;

/// The filter of one HTTP/1.x connection.
#[derive(Default)]
pub(crate) struct Heads {
    state: State,
    /// Only while a head spans reads or bytes wait for hyper: a connection
    /// carries its filter for its whole life (through its rests too), and
    /// nearly every head arrives in one read.
    bufs: Option<Box<Buffers>>,
    /// Heads passed on (the refused one included).
    count: u64,
    refused: Option<(u64, StatusCode)>,
    /// The most fields the parser behind this filter takes.
    fields: usize,
}

#[derive(Default, Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Before a request head (or inside one: see `held`).
    #[default]
    Head,
    /// This many bytes of a body left.
    Body(u64),
    Chunked(Chunk),
    /// Not followed: everything goes to hyper as it is.
    Through,
    /// After a refused head: nothing more is read for hyper.
    Refused,
    /// A head with more fields than this parser takes is held (with all
    /// after it) until the connection moves to one that takes them.
    MoreFields,
}

#[derive(Default)]
struct Buffers {
    /// The start of a head not complete yet, held back from hyper.
    held: BytesMut,
    /// Bytes for hyper before anything newly read (a held head, complete).
    out: BytesMut,
    /// What hyper reads for a refused head, after the bytes before it.
    stand_in: Option<Vec<u8>>,
}

impl Buffers {
    fn is_empty(&self) -> bool {
        self.held.is_empty() && self.out.is_empty() && self.stand_in.is_none()
    }
}

/// Where in a chunked body (RFC 9112 section 7.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    /// The chunk size (hex), then extensions until the line ends.
    Size { size: u64, digits: bool, ext: bool },
    /// This many bytes of chunk data left.
    Data(u64),
    /// The CRLF after chunk data.
    DataEnd { cr: bool },
    /// Trailer lines after the last chunk, until an empty one.
    Trailers { line_start: bool, cr: bool },
}

/// What to do with a complete head.
enum Verdict {
    /// Pass it on (maybe rewritten in place); what follows it.
    Pass(State),
    Refuse(StatusCode),
    /// It has more fields than the parser takes.
    MoreFields,
}

impl Heads {
    /// A filter for a parser that takes at most `fields` header fields.
    pub(crate) fn new(fields: usize) -> Heads {
        Heads {
            fields,
            ..Default::default()
        }
    }

    /// A head needs a parser that takes more fields than this one: hyper
    /// has been given nothing of it (nor of what follows), which
    /// [`Heads::more_fields`] hands on.
    pub(crate) fn wants_more_fields(&self) -> bool {
        self.state == State::MoreFields
    }

    /// The filter for a parser taking `fields`, and what this one held
    /// back, for hyper to read first.
    pub(crate) fn more_fields(&mut self, fields: usize) -> (Heads, BytesMut) {
        let held = self.bufs.take().map(|b| b.held).unwrap_or_default();
        let next = Heads {
            fields,
            count: self.count,
            ..Default::default()
        };
        (next, held)
    }

    /// The ordinal (from 1) of the head the filter refused, and the status
    /// its request must get.
    pub(crate) fn refused(&self) -> Option<(u64, StatusCode)> {
        self.refused
    }

    /// Moves what is waiting for hyper into `buf`; true if anything was.
    pub(crate) fn pending(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        let Some(bufs) = self.bufs.as_mut().filter(|b| !b.out.is_empty()) else {
            return false;
        };
        let n = bufs.out.len().min(buf.remaining());
        buf.put_slice(&bufs.out[..n]);
        bufs.out.advance(n);
        self.release();
        true
    }

    fn bufs(&mut self) -> &mut Buffers {
        self.bufs.get_or_insert_with(Box::default)
    }

    /// Frees the buffers once nothing is in them.
    fn release(&mut self) {
        if self.bufs.as_ref().is_some_and(|b| b.is_empty()) {
            self.bufs = None;
        }
    }

    /// Filters the bytes just read into `buf` (from `start`): passes what
    /// hyper may read now, holds back the start of an incomplete head, and
    /// queues what must go before later reads ([`Heads::pending`]).
    pub(crate) fn filter(&mut self, buf: &mut ReadBuf<'_>, start: usize) {
        if self.state == State::Through {
            return;
        }
        if self.state == State::Refused {
            buf.set_filled(start);
            return;
        }
        if self.state == State::MoreFields {
            self.bufs().held.extend_from_slice(&buf.filled()[start..]);
            buf.set_filled(start);
            return;
        }
        if self.bufs.as_ref().is_some_and(|b| !b.held.is_empty()) {
            // A head spans reads: go on with it in `held`.
            let bufs = self.bufs();
            bufs.held.extend_from_slice(&buf.filled()[start..]);
            buf.set_filled(start);
            let mut held = std::mem::take(&mut bufs.held);
            let (ready, rest) = self.run(&mut held);
            let bufs = self.bufs();
            bufs.held = held.split_off(rest);
            bufs.out.extend_from_slice(&held[..ready]);
        } else {
            let new = &mut buf.filled_mut()[start..];
            let (ready, rest) = self.run(new);
            if rest < new.len() {
                self.bufs().held.extend_from_slice(&new[rest..]);
            }
            buf.set_filled(start + ready);
        }
        if let Some(bufs) = self.bufs.as_mut() {
            if let Some(stand_in) = bufs.stand_in.take() {
                bufs.out.extend_from_slice(&stand_in);
            }
        }
        self.release();
    }

    /// Runs the filter over `data`: returns how many bytes from the start
    /// go to hyper as they are (or rewritten in place), and where an
    /// incomplete head starts (bytes from there are held). A refused head
    /// stops it: its stand-in is kept for after the bytes before it, and
    /// what follows is dropped.
    fn run(&mut self, data: &mut [u8]) -> (usize, usize) {
        let mut i = 0;
        while i < data.len() {
            match self.state {
                State::Through => return (data.len(), data.len()),
                State::Refused => return (i, data.len()),
                State::MoreFields => return (i, i),
                State::Body(left) => {
                    let n = left.min((data.len() - i) as u64);
                    i += n as usize;
                    self.state = if n == left {
                        State::Head
                    } else {
                        State::Body(left - n)
                    };
                }
                State::Chunked(c) => {
                    let (next, used) = chunk(c, &data[i..]);
                    i += used;
                    self.state = next;
                }
                State::Head => {
                    // Empty lines before a request line are allowed.
                    if data[i] == b'\r' || data[i] == b'\n' {
                        i += 1;
                        continue;
                    }
                    let Some(len) = head_end(&data[i..]) else {
                        if data.len() - i > MAX_HEAD {
                            self.state = State::Through;
                            return (data.len(), data.len());
                        }
                        return (i, i);
                    };
                    match inspect(&mut data[i..i + len], self.fields) {
                        Verdict::Pass(next) => {
                            self.count += 1;
                            i += len;
                            self.state = next;
                        }
                        Verdict::MoreFields => {
                            self.state = State::MoreFields;
                            return (i, i);
                        }
                        Verdict::Refuse(status) => {
                            self.count += 1;
                            self.refused = Some((self.count, status));
                            self.bufs().stand_in = Some(stand_in(&data[i..i + len]));
                            self.state = State::Refused;
                            return (i, data.len());
                        }
                    }
                }
            }
        }
        (data.len(), data.len())
    }
}

/// The length of the head at the start of `data` (through its empty line),
/// if it is all there.
fn head_end(data: &[u8]) -> Option<usize> {
    let mut from = 0;
    loop {
        let nl = from + data[from..].iter().position(|&b| b == b'\n')?;
        let line = &data[from..nl];
        if from > 0 && (line.is_empty() || line == b"\r") {
            return Some(nl + 1);
        }
        from = nl + 1;
    }
}

/// The lines of a head, without their line ends.
fn lines(head: &[u8]) -> impl Iterator<Item = &[u8]> {
    head.split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .filter(|l| !l.is_empty())
}

/// Looks at a complete head: rewrites a later HTTP/1 minor version to 1.1,
/// refuses another major version and transfer codings it does not know,
/// and says how the body that follows is framed; or that it has more than
/// `fields` header fields (nothing rewritten then).
fn inspect(head: &mut [u8], fields: usize) -> Verdict {
    let line_end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
    let line = &head[..line_end];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(_), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Verdict::Pass(State::Through);
    };
    let connect = method == b"CONNECT";
    let v = version;
    if v.len() != 8 || !v.starts_with(b"HTTP/") || v[6] != b'.' {
        return Verdict::Pass(State::Through);
    }
    let (major, minor) = (v[5], v[7]);
    if !major.is_ascii_digit() || !minor.is_ascii_digit() {
        return Verdict::Pass(State::Through);
    }
    if major != b'1' {
        return if major == b'0' {
            Verdict::Pass(State::Through)
        } else {
            Verdict::Refuse(StatusCode::HTTP_VERSION_NOT_SUPPORTED)
        };
    }
    let http10 = minor == b'0';
    // The version's last digit: `HTTP/1.x` ends at the line's end.
    let later = (minor > b'1').then_some(line.len() - 1);
    let mut count = 0;
    let mut length: Option<u64> = None;
    let mut codings: Vec<Vec<u8>> = Vec::new();
    let mut encoded = false;
    for field in lines(head).skip(1) {
        count += 1;
        if field[0] == b' ' || field[0] == b'\t' {
            // Obsolete line folding: hyper refuses it.
            return Verdict::Pass(State::Through);
        }
        let Some(colon) = field.iter().position(|&b| b == b':') else {
            return Verdict::Pass(State::Through);
        };
        let (name, value) = (&field[..colon], field[colon + 1..].trim_ascii());
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            encoded = true;
            codings.extend(
                value
                    .split(|&b| b == b',')
                    .map(|c| c.trim_ascii().to_ascii_lowercase())
                    .filter(|c| !c.is_empty()),
            );
        } else if name.eq_ignore_ascii_case(b"content-length") {
            let Some(n) = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok()) else {
                return Verdict::Pass(State::Through);
            };
            if length.is_some_and(|l| l != n) {
                return Verdict::Pass(State::Through);
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            return Verdict::Pass(State::Through);
        }
    }
    if count > fields {
        return Verdict::MoreFields;
    }
    if let Some(at) = later {
        head[at] = b'1';
    }
    if connect {
        return Verdict::Pass(State::Through);
    }
    if encoded {
        if http10 {
            // hyper refuses a transfer coding in HTTP/1.0 with 400.
            return Verdict::Pass(State::Through);
        }
        if codings != [b"chunked".to_vec()] {
            return Verdict::Refuse(StatusCode::NOT_IMPLEMENTED);
        }
        return Verdict::Pass(State::Chunked(Chunk::Size {
            size: 0,
            digits: false,
            ext: false,
        }));
    }
    Verdict::Pass(match length {
        Some(n) if n > 0 => State::Body(n),
        _ => State::Head,
    })
}

/// What hyper reads instead of a refused head: its request line as
/// HTTP/1.1 and its fields, less those that frame a body (so hyper reads
/// none), for the connection to answer with the refusal.
fn stand_in(head: &[u8]) -> Vec<u8> {
    let mut lines = lines(head);
    let mut out = Vec::with_capacity(head.len());
    if let Some(first) = lines.next() {
        let target_end = first
            .iter()
            .rposition(|&b| b == b' ')
            .unwrap_or(first.len());
        out.extend_from_slice(&first[..target_end]);
        out.extend_from_slice(b" HTTP/1.1\r\n");
    }
    for field in lines {
        let name = field.split(|&b| b == b':').next().unwrap_or(field);
        if name.eq_ignore_ascii_case(b"transfer-encoding")
            || name.eq_ignore_ascii_case(b"content-length")
        {
            continue;
        }
        out.extend_from_slice(field);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Follows a chunked body over `data`: the state after it, and the bytes
/// used (all of them, unless the body ends inside `data`).
fn chunk(mut c: Chunk, data: &[u8]) -> (State, usize) {
    let through = |i| (State::Through, i);
    let mut i = 0;
    while i < data.len() {
        let b = data[i];
        match &mut c {
            Chunk::Size { size, digits, ext } => match b {
                b'\n' => {
                    if !*digits {
                        return through(i);
                    }
                    c = if *size == 0 {
                        Chunk::Trailers {
                            line_start: true,
                            cr: false,
                        }
                    } else {
                        Chunk::Data(*size)
                    };
                }
                b'\r' => {}
                _ if *ext => {}
                b';' => *ext = true,
                _ => {
                    let Some(d) = (b as char).to_digit(16) else {
                        return through(i);
                    };
                    let Some(s) = size.checked_mul(16).and_then(|s| s.checked_add(d.into())) else {
                        return through(i);
                    };
                    *size = s;
                    *digits = true;
                }
            },
            Chunk::Data(left) => {
                let n = (*left).min((data.len() - i) as u64);
                i += n as usize;
                *left -= n;
                if *left == 0 {
                    c = Chunk::DataEnd { cr: false };
                }
                continue;
            }
            Chunk::DataEnd { cr } => match b {
                b'\r' if !*cr => *cr = true,
                b'\n' => {
                    c = Chunk::Size {
                        size: 0,
                        digits: false,
                        ext: false,
                    }
                }
                _ => return through(i),
            },
            Chunk::Trailers { line_start, cr } => match b {
                b'\n' if *line_start => return (State::Head, i + 1),
                b'\n' => {
                    *line_start = true;
                    *cr = false;
                }
                b'\r' if *line_start => *cr = true,
                _ => {
                    if *cr {
                        return through(i);
                    }
                    *line_start = false;
                }
            },
        }
        i += 1;
    }
    (State::Chunked(c), data.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `input`, split into reads of `size` bytes, through a filter;
    /// what hyper would read, and the refusal.
    fn through(input: &[u8], size: usize) -> (Vec<u8>, Option<(u64, StatusCode)>) {
        let mut h = Heads::new(STACK_FIELDS);
        let mut seen = Vec::new();
        let mut storage = vec![0u8; 1 << 17];
        for piece in input.chunks(size) {
            loop {
                let mut buf = ReadBuf::new(&mut storage);
                if !h.pending(&mut buf) {
                    break;
                }
                seen.extend_from_slice(buf.filled());
            }
            let mut buf = ReadBuf::new(&mut storage);
            buf.put_slice(piece);
            h.filter(&mut buf, 0);
            seen.extend_from_slice(buf.filled());
        }
        loop {
            let mut buf = ReadBuf::new(&mut storage);
            if !h.pending(&mut buf) {
                break;
            }
            seen.extend_from_slice(buf.filled());
        }
        (seen, h.refused())
    }

    #[test]
    fn heads_pass_rewritten_or_refused_in_any_split() {
        let plain = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec();
        let later = b"GET / HTTP/1.2\r\nHost: a\r\n\r\n".to_vec();
        let chunked = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nHTTP/\r\n0\r\nT: 1\r\n\r\n".to_vec();
        let counted =
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 14\r\n\r\nGET / HTTP/2.0".to_vec();
        for size in [1, 2, 3, 7, 64, 4096] {
            assert_eq!(through(&plain, size), (plain.clone(), None));
            assert_eq!(through(&later, size).0, plain, "size {size}");
            // Bodies are followed: the version inside them is not a head.
            let input = [chunked.clone(), counted.clone(), later.clone()].concat();
            let want = [chunked.clone(), counted.clone(), plain.clone()].concat();
            assert_eq!(through(&input, size), (want, None), "size {size}");
            // HTTP/2.0 on the third head: 505, nothing after it.
            let input = [
                plain.clone(),
                counted.clone(),
                b"GET /x HTTP/2.0\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\n\r\n".to_vec(),
            ]
            .concat();
            let (seen, refused) = through(&input, size);
            let want = [
                plain.clone(),
                counted.clone(),
                b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
            ]
            .concat();
            assert_eq!(
                (seen, refused),
                (want, Some((3, StatusCode::HTTP_VERSION_NOT_SUPPORTED))),
                "size {size}"
            );
        }
        for coding in ["identity", "gzip, chunked", "chunked, chunked"] {
            let input = format!("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: {coding}\r\nContent-Length: 3\r\n\r\nabc");
            let (seen, refused) = through(input.as_bytes(), 5);
            assert_eq!(seen, b"POST / HTTP/1.1\r\nHost: a\r\n\r\n");
            assert_eq!(refused, Some((1, StatusCode::NOT_IMPLEMENTED)), "{coding}");
        }
        // Left to hyper: an upgrade, a folded line, HTTP/1.0 with a coding.
        for input in [
            &b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\nGET / HTTP/2.0\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\nGET / HTTP/2.0\r\n\r\n",
            b"POST / HTTP/1.0\r\nTransfer-Encoding: gzip\r\n\r\n",
        ] {
            assert_eq!(through(input, 3), (input.to_vec(), None));
        }
    }
}
