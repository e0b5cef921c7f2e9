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
#[derive(Debug, PartialEq, Eq)]
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
                    let fast = crlf_head(&data[i..], self.fields);
                    let Some(len) = fast.as_ref().map(|f| f.0).or_else(|| head_end(&data[i..]))
                    else {
                        if data.len() - i > MAX_HEAD {
                            self.state = State::Through;
                            return (data.len(), data.len());
                        }
                        return (i, i);
                    };
                    let verdict = match fast {
                        Some((_, verdict)) => verdict,
                        None => inspect(&mut data[i..i + len], self.fields),
                    };
                    match verdict {
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
/// if it is all there. (Line ends are found with `memchr`, a word at a
/// time: a byte-by-byte search here was a tenth of a keep-alive request's
/// instructions.)
fn head_end(data: &[u8]) -> Option<usize> {
    let mut from = 0;
    loop {
        let nl = from + memchr::memchr(b'\n', &data[from..])?;
        let line = &data[from..nl];
        if from > 0 && (line.is_empty() || line == b"\r") {
            return Some(nl + 1);
        }
        from = nl + 1;
    }
}

/// The lines of a head, without their line ends, empty ones skipped.
fn lines(head: &[u8]) -> Lines<'_> {
    Lines { rest: head }
}

struct Lines<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Lines<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        while !self.rest.is_empty() {
            let (line, rest) = match memchr::memchr(b'\n', self.rest) {
                Some(i) => (&self.rest[..i], &self.rest[i + 1..]),
                None => (self.rest, &[][..]),
            };
            self.rest = rest;
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if !line.is_empty() {
                return Some(line);
            }
        }
        None
    }
}

/// Looks at a complete head: rewrites a later HTTP/1 minor version to 1.1,
/// refuses another major version and transfer codings it does not know,
/// and says how the body that follows is framed; or that it has more than
/// `fields` header fields (nothing rewritten then).
fn inspect(head: &mut [u8], fields: usize) -> Verdict {
    let line_end = memchr::memchr(b'\n', head).unwrap_or(head.len());
    let line = &head[..line_end];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    // Three parts: the method, the target and the version, one space
    // between each.
    let (Some(first), Some(last)) = (memchr::memchr(b' ', line), memchr::memrchr(b' ', line))
    else {
        return Verdict::Pass(State::Through);
    };
    if first == last || memchr::memchr(b' ', &line[first + 1..last]).is_some() {
        return Verdict::Pass(State::Through);
    }
    let (method, version) = (&line[..first], &line[last + 1..]);
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
    let mut framing = Framing::default();
    let mut count = 0;
    for field in lines(head).skip(1) {
        count += 1;
        if field[0] == b' ' || field[0] == b'\t' {
            // Obsolete line folding: hyper refuses it.
            return Verdict::Pass(State::Through);
        }
        let Some(colon) = memchr::memchr(b':', field) else {
            return Verdict::Pass(State::Through);
        };
        if let Err(verdict) = framing.field(&field[..colon], &field[colon + 1..]) {
            return verdict;
        }
    }
    if count > fields {
        return Verdict::MoreFields;
    }
    if let Some(at) = later {
        head[at] = b'1';
    }
    framing.verdict(http10, connect)
}

/// The common head at the start of `data`, read without a parser: every
/// line ends in CRLF, the request line in ` HTTP/1.1` or ` HTTP/1.0`, and
/// only fields that may frame a body (their names start with `c`, `t` or
/// `u`) are looked at. One walk over the line ends finds the head's end
/// too (its first empty line; a `memmem` for it cost as much as the walk).
/// Its length and verdict, at a fifth of what [`head_end`] and [`inspect`]
/// cost a keep-alive request (a tenth of its instructions); `None` leaves
/// the head to them: incomplete, a bare LF, another version, folded lines,
/// more fields than `fields`.
fn crlf_head(data: &[u8], fields: usize) -> Option<(usize, Verdict)> {
    let mut ends = memchr::memchr_iter(b'\n', data);
    let first = ends.next()?;
    let line = data[..first].strip_suffix(b"\r")?;
    let http10 = match line.get(line.len().checked_sub(9)?..)? {
        b" HTTP/1.1" => false,
        b" HTTP/1.0" => true,
        _ => return None,
    };
    let connect = line.starts_with(b"CONNECT ");
    let mut framing = Framing::default();
    let mut count = 0;
    let mut from = first + 1;
    loop {
        // No empty line yet: the head is not all here.
        let nl = ends.next()?;
        let line = data[from..nl].strip_suffix(b"\r")?;
        from = nl + 1;
        let Some(&start) = line.first() else {
            // The empty line: the head ends here.
            break;
        };
        count += 1;
        match start.to_ascii_lowercase() {
            b' ' | b'\t' => return None,
            b'c' | b't' | b'u' => {
                let colon = memchr::memchr(b':', line)?;
                if let Err(verdict) = framing.field(&line[..colon], &line[colon + 1..]) {
                    // The verdict is in (hyper reads the rest as it is):
                    // only the head's end is wanted. Rare: an upgrade, a
                    // Content-Length that is not one number.
                    return head_end(data).map(|end| (end, verdict));
                }
            }
            _ => {}
        }
    }
    if count > fields {
        return None;
    }
    Some((from, framing.verdict(http10, connect)))
}

/// What a head's fields say of the body after it.
#[derive(Default)]
struct Framing {
    length: Option<u64>,
    /// The transfer codings, lowercase, when there is a Transfer-Encoding.
    codings: Vec<Vec<u8>>,
    encoded: bool,
}

impl Framing {
    /// Takes one field; `Err` with the verdict when the head goes to hyper
    /// as it is, whatever follows (a Content-Length that is not one
    /// number, an upgrade).
    fn field(&mut self, name: &[u8], value: &[u8]) -> Result<(), Verdict> {
        let value = value.trim_ascii();
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            self.encoded = true;
            self.codings.extend(
                value
                    .split(|&b| b == b',')
                    .map(|c| c.trim_ascii().to_ascii_lowercase())
                    .filter(|c| !c.is_empty()),
            );
        } else if name.eq_ignore_ascii_case(b"content-length") {
            let Some(n) = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok()) else {
                return Err(Verdict::Pass(State::Through));
            };
            if self.length.is_some_and(|l| l != n) {
                return Err(Verdict::Pass(State::Through));
            }
            self.length = Some(n);
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            return Err(Verdict::Pass(State::Through));
        }
        Ok(())
    }

    /// How the body after the head is framed, every field taken.
    fn verdict(self, http10: bool, connect: bool) -> Verdict {
        if connect {
            return Verdict::Pass(State::Through);
        }
        if self.encoded {
            if http10 {
                // hyper refuses a transfer coding in HTTP/1.0 with 400.
                return Verdict::Pass(State::Through);
            }
            if self.codings != [b"chunked".to_vec()] {
                return Verdict::Refuse(StatusCode::NOT_IMPLEMENTED);
            }
            return Verdict::Pass(State::Chunked(Chunk::Size {
                size: 0,
                digits: false,
                ext: false,
            }));
        }
        Verdict::Pass(match self.length {
            Some(n) if n > 0 => State::Body(n),
            _ => State::Head,
        })
    }
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
    fn the_crlf_path_agrees_with_the_full_one() {
        let heads: &[&[u8]] = &[
            b"GET / HTTP/1.1\r\nHost: a\r\nuser-agent: x\r\n\r\n",
            b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\ncontent-length: 12\r\nCookie: c=1\r\n\r\nbody",
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
            b"POST / HTTP/1.1\r\nTRANSFER-ENCODING:  chunked \r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
            b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n",
            // A verdict before the end: the length is still the head's.
            b"GET / HTTP/1.1\r\nUpgrade: h2c\r\nA: 1\r\n\r\nGET / HTTP/1.1\r\n\r\n",
        ];
        for head in heads {
            let got = crlf_head(head, 100).expect("a CRLF head");
            let len = head_end(head).unwrap();
            assert_eq!(got.0, len, "{}", String::from_utf8_lossy(head));
            let want = inspect(&mut head[..len].to_vec(), 100);
            assert_eq!(got.1, want, "{}", String::from_utf8_lossy(head));
        }
        // More fields than the parser takes: left to the full path.
        assert_eq!(crlf_head(heads[10], 2), None);
        assert_eq!(inspect(&mut heads[10].to_vec(), 2), Verdict::MoreFields);
        // Not the common form: left to the full path.
        for head in [
            &b"GET / HTTP/1.1\nHost: a\n\n"[..],
            b"GET / HTTP/1.1\r\nHost: a\nX: 1\r\n\r\n",
            b"GET / HTTP/1.2\r\nHost: a\r\n\r\n",
            b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nA: 1\r\n folded\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\n",
            b"GET / HTTP/1.1\r\nUpgrade: h2c\r\nHost: a\r\n",
        ] {
            assert_eq!(
                crlf_head(head, 100),
                None,
                "{}",
                String::from_utf8_lossy(head)
            );
        }
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
