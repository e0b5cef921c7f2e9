//! A server's TLS connection over TCP, on rustls's unbuffered API: the
//! buffers are ours, so a connection at rest holds none.
//!
//! rustls's buffered `ServerConnection` (what tokio-rustls drives) keeps a
//! 4 KB buffer for incoming records from the first read to the end of the
//! connection, zeroed, so resident: of the 10.8 KB an idle TLS connection
//! cost, that buffer was the largest part. Here the incoming, outgoing and
//! decrypted bytes live in `Vec`s of our own, kept while the connection is
//! busy and freed when it rests ([`TlsStream::release_buffers`]).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::server::{Acceptor, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Each read from the socket has room for at least this much: a whole
/// record (16 KiB of payload and its overhead) in one read.
const READ_SIZE: usize = 17 * 1024;

/// TLS bytes read and not yet processed may grow to this (a handshake
/// message split over records: a client's certificate chain); beyond it the
/// connection fails, as rustls's own buffer does at 64 KiB.
const MAX_INCOMING: usize = 64 * 1024 + READ_SIZE;

/// At most this much is encrypted per write; what the socket has not yet
/// taken is sent before more is encrypted.
const WRITE_CHUNK: usize = 64 * 1024;

/// What the caller of [`TlsStream::advance`] wants from rustls.
enum Want<'a, 'b> {
    /// The handshake to complete.
    Handshake,
    /// Decrypted bytes, into this buffer.
    Read(&'a mut ReadBuf<'b>),
    /// These bytes encrypted.
    Write(&'a [u8]),
    /// A close_notify.
    Close,
}

/// Where [`TlsStream::advance`] stopped.
enum Step {
    /// rustls needs more bytes from the client.
    NeedBytes,
    /// Done what was wanted: decrypted bytes given, or `n` bytes encrypted.
    Done(usize),
    /// The client sent close_notify: no more bytes will come.
    Closed,
}

/// A TLS connection a server accepted: the TCP socket, rustls's state,
/// and the bytes that wait on either side of it.
pub(crate) struct TlsStream {
    tcp: TcpStream,
    conn: UnbufferedServerConnection,
    /// TLS bytes read from the client, not yet processed.
    incoming: Vec<u8>,
    /// Decrypted bytes the reader has not taken yet, from `plain_at` on.
    plain: Vec<u8>,
    plain_at: usize,
    /// TLS bytes for the client, not yet sent: `outgoing[sent..end]`. The
    /// `Vec`'s length is how much of it is initialised (rustls encrypts
    /// into a `&mut [u8]`), so reusing it zeroes nothing.
    outgoing: Vec<u8>,
    sent: usize,
    end: usize,
    /// The client ended its side (close_notify, or EOF).
    read_closed: bool,
    /// Our close_notify is in `outgoing` (or sent).
    close_queued: bool,
    /// The server name the client asked for, if asked to keep it.
    sni: Option<Box<str>>,
}

fn invalid(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl TlsStream {
    /// Runs the handshake with the client on `tcp` (the caller bounds it
    /// in time). `keep_sni`: the client's server name is wanted after the
    /// handshake (the unbuffered connection does not tell it; its
    /// ClientHello is read a second time, by rustls's `Acceptor`, for it).
    pub(crate) async fn accept(
        tcp: TcpStream,
        config: Arc<ServerConfig>,
        keep_sni: bool,
    ) -> io::Result<TlsStream> {
        let conn = UnbufferedServerConnection::new(config).map_err(invalid)?;
        let mut tls = TlsStream {
            tcp,
            conn,
            incoming: Vec::new(),
            plain: Vec::new(),
            plain_at: 0,
            outgoing: Vec::new(),
            sent: 0,
            end: 0,
            read_closed: false,
            close_queued: false,
            sni: None,
        };
        let mut hello = keep_sni.then(Acceptor::default);
        std::future::poll_fn(|cx| tls.poll_handshake(cx, &mut hello)).await?;
        Ok(tls)
    }

    fn poll_handshake(
        &mut self,
        cx: &mut Context<'_>,
        hello: &mut Option<Acceptor>,
    ) -> Poll<io::Result<()>> {
        loop {
            let step = match self.advance(&mut Want::Handshake) {
                Ok(step) => step,
                Err(e) => {
                    // The alert rustls queued, if the socket takes it now.
                    let _ = self.tcp.try_write(&self.outgoing[self.sent..self.end]);
                    return Poll::Ready(Err(e));
                }
            };
            // The server's flight, the session tickets: sent before waiting
            // for the client's next flight.
            ready!(self.poll_send(cx))?;
            match step {
                Step::Done(_) => return Poll::Ready(Ok(())),
                Step::Closed => return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into())),
                Step::NeedBytes => {}
            }
            let start = self.incoming.len();
            if ready!(self.poll_fill(cx))? == 0 {
                return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
            }
            if let Some(acceptor) = hello {
                if let Some(done) = read_sni(acceptor, &self.incoming[start..]) {
                    self.sni = done;
                    *hello = None;
                }
            }
        }
    }

    /// The server name the client asked for (when `accept` was asked to
    /// keep it).
    pub(crate) fn server_name(&self) -> Option<&str> {
        self.sni.as_deref()
    }

    pub(crate) fn alpn_protocol(&self) -> Option<&[u8]> {
        self.conn.alpn_protocol()
    }

    pub(crate) fn protocol_version(&self) -> Option<rustls::ProtocolVersion> {
        self.conn.protocol_version()
    }

    pub(crate) fn get_ref(&self) -> &TcpStream {
        &self.tcp
    }

    /// Frees every buffer that holds nothing: called when the connection
    /// rests, so that a resting TLS connection costs rustls's state alone.
    pub(crate) fn release_buffers(&mut self) {
        if self.incoming.is_empty() {
            self.incoming = Vec::new();
        }
        if self.plain_at == self.plain.len() {
            (self.plain, self.plain_at) = (Vec::new(), 0);
        }
        if self.sent == self.end {
            (self.outgoing, self.sent, self.end) = (Vec::new(), 0, 0);
        }
    }

    /// Runs rustls on the bytes read until it has what `want` asks for, or
    /// needs more bytes. What it has to send (handshake messages, alerts,
    /// records) lands in `outgoing`, for the caller to send.
    fn advance(&mut self, want: &mut Want<'_, '_>) -> io::Result<Step> {
        loop {
            let UnbufferedStatus { mut discard, state } =
                self.conn.process_tls_records(&mut self.incoming);
            let state = match state {
                Ok(state) => state,
                Err(e) => {
                    self.incoming.drain(..discard);
                    self.queue_alert();
                    return Err(invalid(e));
                }
            };
            let step = match state {
                ConnectionState::ReadTraffic(mut traffic) => {
                    while let Some(record) = traffic.next_record() {
                        let record = record.map_err(invalid)?;
                        discard += record.discard;
                        let mut payload = record.payload;
                        if let Want::Read(buf) = want {
                            let n = payload.len().min(buf.remaining());
                            buf.put_slice(&payload[..n]);
                            payload = &payload[n..];
                        }
                        self.plain.extend_from_slice(payload);
                    }
                    // Writing (or closing) goes on past what it read.
                    matches!(want, Want::Read(_) | Want::Handshake).then_some(Step::Done(0))
                }
                ConnectionState::EncodeTlsData(mut data) => {
                    encode(&mut self.outgoing, &mut self.end, 0, |out| {
                        encoded(data.encode(out))
                    })?;
                    None
                }
                // Sent by the caller, from `outgoing`, before it waits.
                ConnectionState::TransmitTlsData(data) => {
                    data.done();
                    None
                }
                ConnectionState::BlockedHandshake => Some(Step::NeedBytes),
                ConnectionState::WriteTraffic(mut traffic) => match want {
                    Want::Write(data) => {
                        let data = &data[..data.len().min(WRITE_CHUNK)];
                        let size = data.len() + (data.len() / 16384 + 1) * 64;
                        encode(&mut self.outgoing, &mut self.end, size, |out| {
                            encrypted(traffic.encrypt(data, out))
                        })?;
                        Some(Step::Done(data.len()))
                    }
                    Want::Close => {
                        encode(&mut self.outgoing, &mut self.end, 0, |out| {
                            encrypted(traffic.queue_close_notify(out))
                        })?;
                        self.close_queued = true;
                        Some(Step::Done(0))
                    }
                    // Reading wants the client's bytes; the handshake is
                    // done once the client's Finished came (a TLS 1.3 server
                    // may write before it).
                    Want::Read(_) | Want::Handshake => Some(Step::NeedBytes),
                },
                ConnectionState::PeerClosed => {
                    self.read_closed = true;
                    matches!(want, Want::Read(_) | Want::Handshake).then_some(Step::Closed)
                }
                ConnectionState::Closed => {
                    self.read_closed = true;
                    Some(Step::Closed)
                }
                // Early data is off (`max_early_data_size` is 0).
                _ => return Err(invalid("unexpected TLS state")),
            };
            self.incoming.drain(..discard);
            let step = match step {
                Some(Step::NeedBytes)
                    if matches!(want, Want::Handshake) && !self.conn.is_handshaking() =>
                {
                    Some(Step::Done(0))
                }
                step => step,
            };
            if let Some(step) = step {
                return Ok(step);
            }
        }
    }

    /// After a fatal error: the alert rustls queued, into `outgoing`.
    fn queue_alert(&mut self) {
        for _ in 0..4 {
            let UnbufferedStatus { discard, state } =
                self.conn.process_tls_records(&mut self.incoming);
            let Ok(ConnectionState::EncodeTlsData(mut data)) = state else {
                return;
            };
            let queued = encode(&mut self.outgoing, &mut self.end, 0, |out| {
                encoded(data.encode(out))
            });
            self.incoming.drain(..discard);
            if queued.is_err() {
                return;
            }
        }
    }

    /// Reads from the socket into `incoming`. Ready(Ok(0)) is the client's
    /// EOF.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.incoming.len() >= MAX_INCOMING {
            return Poll::Ready(Err(invalid("TLS message too large")));
        }
        if self.incoming.capacity() - self.incoming.len() < READ_SIZE / 4 {
            self.incoming.reserve(READ_SIZE);
        }
        // Through `poll_read`, not `try_read`: a read that leaves space
        // unfilled shows tokio the socket is drained, and the next read
        // waits for readiness instead of failing with EAGAIN (a recvfrom
        // more per request: 2.0 a request where the bare stack made 1.0).
        let read = tokio::io::AsyncReadExt::read_buf(&mut self.tcp, &mut self.incoming);
        std::future::Future::poll(std::pin::pin!(read), cx)
    }

    /// Sends what waits in `outgoing`.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.end {
            let out = &self.outgoing[self.sent..self.end];
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, out))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        (self.sent, self.end) = (0, 0);
        Poll::Ready(Ok(()))
    }
}

/// Writes into `out` from `end` on what `f` writes into a slice, and moves
/// `end` past it: the slice is `size` bytes (at least a small record's
/// worth), and grows to the size `f` asks for (`Ok(Err(size))`) when too
/// small. Only bytes never used before are zeroed.
fn encode(
    out: &mut Vec<u8>,
    end: &mut usize,
    size: usize,
    mut f: impl FnMut(&mut [u8]) -> io::Result<Result<usize, usize>>,
) -> io::Result<()> {
    let mut room = size.max(256);
    loop {
        if out.len() < *end + room {
            out.resize(*end + room, 0);
        }
        match f(&mut out[*end..]) {
            Ok(Ok(n)) => {
                *end += n;
                return Ok(());
            }
            Ok(Err(size)) if size > out.len() - *end => room = size,
            Ok(Err(_)) => return Err(invalid("TLS encoding failed")),
            Err(e) => return Err(e),
        }
    }
}

/// What `encode` needs of rustls's answer: the bytes written, or the size
/// it asks for.
fn encoded(r: Result<usize, EncodeError>) -> io::Result<Result<usize, usize>> {
    match r {
        Ok(n) => Ok(Ok(n)),
        Err(EncodeError::InsufficientSize(s)) => Ok(Err(s.required_size)),
        Err(e) => Err(invalid(e)),
    }
}

fn encrypted(r: Result<usize, EncryptError>) -> io::Result<Result<usize, usize>> {
    match r {
        Ok(n) => Ok(Ok(n)),
        Err(EncryptError::InsufficientSize(s)) => Ok(Err(s.required_size)),
        Err(e) => Err(invalid(e)),
    }
}

/// Feeds the client's first bytes to an `Acceptor`, for the server name of
/// its ClientHello. `Some` once that is known (or will not be).
fn read_sni(acceptor: &mut Acceptor, mut bytes: &[u8]) -> Option<Option<Box<str>>> {
    while !bytes.is_empty() {
        match acceptor.read_tls(&mut bytes) {
            Ok(0) | Err(_) => return Some(None),
            Ok(_) => {}
        }
    }
    match acceptor.accept() {
        Ok(None) => None,
        Ok(Some(accepted)) => Some(accepted.client_hello().server_name().map(Into::into)),
        Err(_) => Some(None),
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.plain_at < this.plain.len() {
                let n = (this.plain.len() - this.plain_at).min(buf.remaining());
                buf.put_slice(&this.plain[this.plain_at..this.plain_at + n]);
                this.plain_at += n;
                if this.plain_at == this.plain.len() {
                    this.plain.clear();
                    this.plain_at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.read_closed {
                return Poll::Ready(Ok(()));
            }
            let filled = buf.filled().len();
            match this.advance(&mut Want::Read(&mut *buf))? {
                Step::Done(_) if buf.filled().len() > filled => return Poll::Ready(Ok(())),
                Step::Done(_) => continue,
                Step::Closed => return Poll::Ready(Ok(())),
                Step::NeedBytes => {}
            }
            // What rustls answers by itself (a key update) goes out; a
            // socket that does not take it now does not stop the read.
            if this.sent < this.end {
                if let Poll::Ready(Err(e)) = this.poll_send(cx) {
                    return Poll::Ready(Err(e));
                }
            }
            if ready!(this.poll_fill(cx))? == 0 {
                this.read_closed = true;
            }
        }
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.close_queued {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        // What waits to go out is bounded: past a chunk, it goes first.
        if this.end - this.sent >= WRITE_CHUNK {
            ready!(this.poll_send(cx))?;
        }
        let n = match this.advance(&mut Want::Write(buf))? {
            Step::Done(n) => n,
            Step::NeedBytes | Step::Closed => {
                return Poll::Ready(Err(invalid("TLS not ready to write")))
            }
        };
        // Sent now if the socket takes it; else at the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    /// close_notify, then the TCP FIN after it.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_queued {
            this.advance(&mut Want::Close)?;
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn certs() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("certs")
    }

    fn server_config(alpn: &[&[u8]]) -> Arc<ServerConfig> {
        let chain = CertificateDer::pem_file_iter(certs().join("localhost.crt"))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(certs().join("localhost.key")).unwrap();
        let mut config = ServerConfig::builder_with_provider(super::super::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    /// tokio-rustls as the client. (The development certificate is its own
    /// CA, which webpki refuses as a server's certificate; not checked.)
    async fn client(
        addr: std::net::SocketAddr,
        alpn: &[&[u8]],
        tls12: bool,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let versions: &[&rustls::SupportedProtocolVersion] = if tls12 {
            &[&rustls::version::TLS12]
        } else {
            &[&rustls::version::TLS13]
        };
        let mut config = rustls::ClientConfig::builder_with_provider(super::super::provider())
            .with_protocol_versions(versions)
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(super::super::upstream::NoVerification(
                super::super::provider(),
            )))
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::try_from("localhost").unwrap();
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
    }

    /// Echoes what it reads, through a small read buffer and a large one in
    /// turn (a record larger than the reader's buffer waits in `plain`),
    /// until the client's close_notify; then sends its own.
    async fn echo(mut tls: TlsStream) -> io::Result<usize> {
        let mut buf = vec![0u8; 40_000];
        let mut total = 0;
        for round in 0.. {
            let size = if round % 2 == 0 { 7 } else { buf.len() };
            let n = tls.read(&mut buf[..size]).await?;
            if n == 0 {
                break;
            }
            total += n;
            tls.write_all(&buf[..n]).await?;
        }
        tls.shutdown().await?;
        Ok(total)
    }

    #[tokio::test]
    async fn bytes_go_both_ways_intact_over_tls_13_and_12() {
        for tls12 in [false, true] {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let config = server_config(&[b"h2", b"http/1.1"]);
            let server = tokio::spawn(async move {
                let (tcp, _) = listener.accept().await.unwrap();
                let tls = TlsStream::accept(tcp, config, true).await.unwrap();
                assert_eq!(tls.server_name(), Some("localhost"));
                assert_eq!(tls.alpn_protocol(), Some(&b"http/1.1"[..]));
                let want = if tls12 {
                    rustls::ProtocolVersion::TLSv1_2
                } else {
                    rustls::ProtocolVersion::TLSv1_3
                };
                assert_eq!(tls.protocol_version(), Some(want));
                echo(tls).await.unwrap()
            });
            let c = client(addr, &[b"http/1.1"], tls12).await.unwrap();
            // Random-ish bytes, in writes of many sizes (records of 1 byte
            // to 16 KiB and more); read back concurrently.
            let data: Vec<u8> = (0..600_000u32)
                .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
                .collect();
            let (mut r, mut w) = tokio::io::split(c);
            let sent = data.clone();
            let writer = tokio::spawn(async move {
                let mut at = 0;
                for size in [1, 100, 16_384, 70_000, 3].iter().cycle() {
                    let end = (at + size).min(sent.len());
                    w.write_all(&sent[at..end]).await.unwrap();
                    at = end;
                    if at == sent.len() {
                        break;
                    }
                }
                w.shutdown().await.unwrap();
                w
            });
            // rustls's reader ends cleanly only on the server's
            // close_notify (a bare EOF is `UnexpectedEof`).
            let mut back = Vec::new();
            r.read_to_end(&mut back).await.unwrap();
            assert!(
                back == data,
                "echoed {} of {} bytes, or not the same",
                back.len(),
                data.len()
            );
            writer.await.unwrap();
            assert_eq!(server.await.unwrap(), data.len());
        }
    }

    #[tokio::test]
    async fn a_resting_connection_holds_no_buffer() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = server_config(&[]);
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = TlsStream::accept(tcp, config, false).await.unwrap();
            assert_eq!(tls.server_name(), None, "not asked to keep it");
            let mut buf = [0u8; 5];
            tls.read_exact(&mut buf).await.unwrap();
            tls.write_all(b"world").await.unwrap();
            tls.flush().await.unwrap();
            tls.release_buffers();
            let held = tls.incoming.capacity() + tls.plain.capacity() + tls.outgoing.capacity();
            // And it goes on after: buffers come back when bytes do.
            tls.read_exact(&mut buf).await.unwrap();
            (held, buf)
        });
        let mut c = client(addr, &[], false).await.unwrap();
        c.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"world");
        c.write_all(b"again").await.unwrap();
        let (held, buf) = server.await.unwrap();
        assert_eq!(held, 0, "bytes of buffer held at rest");
        assert_eq!(&buf, b"again");
    }

    #[tokio::test]
    async fn a_failed_handshake_tells_the_client_why() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = server_config(&[b"h2"]);
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            TlsStream::accept(tcp, config, true)
                .await
                .err()
                .map(|e| e.to_string())
        });
        let e = client(addr, &[b"spdy/1"], false)
            .await
            .err()
            .map(|e| e.to_string());
        let e = e.expect("the handshake fails");
        assert!(e.contains("NoApplicationProtocol"), "the client heard: {e}");
        let server = server.await.unwrap().expect("the handshake fails");
        assert!(server.contains("any known protocol"), "{server}");
    }
}
