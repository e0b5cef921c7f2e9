//! One listener's UDP socket for HTTP/3, shared by every generation.
//!
//! Exactly one generation reads the socket: the one holding the abstract
//! Unix name `@gracesrv.quic.<inode>` (the socket's inode, the same in
//! every process that shares it). A new generation, once ready, asks that
//! reader to hand over ([`Socket::keep`]): the reader stops reading, lets
//! go of the name and answers with the handshakes it has started (their
//! first flights carry a CID the client chose, which says nothing about
//! who owns them). From then on the new generation reads, and passes every
//! datagram of an older generation's connection (its CID says whose, see
//! `cid`) to that generation's inbox, `@gracesrv.quic.<inode>.<pid>`, with
//! the addresses it came with. The older generation keeps sending from its
//! own copy of the socket. If the reader dies (a rollback), the name is
//! free again and the generation before it reads again.
//!
//! Why this and not a reuseport BPF program steering by CID: it needs no
//! privileges (BPF needs CAP_BPF or root), works with sockets systemd
//! passes, and a forwarded datagram costs one local sendmsg, only while an
//! old generation drains.

use std::collections::HashMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use nix::sys::socket::{recvmsg, sendmsg, MsgFlags, UnixAddr};
use quinn::udp::{EcnCodepoint, RecvMeta, Transmit, UdpSocketState};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use super::cid;
use crate::observe::logging::Chain;
use crate::process::context::QuicStats;
use crate::process::drain::Drain;

/// What the inbox carries, in the first byte.
const PACKET: u8 = 1;
const HANDOVER: u8 = 2;
/// To the reader's name: `TAKEOVER ‖ pid`.
const TAKEOVER: u8 = 3;
/// kind, ECN, source (family, 16 bytes of address, port), destination IP
/// (family, 16 bytes).
const HEADER: usize = 1 + 1 + 1 + 16 + 2 + 1 + 16;

/// How long a handshake's client-chosen CID is remembered: the handshake
/// has ended (or timed out) by then.
const HANDSHAKE_MEMORY: Duration = Duration::from_secs(10);
/// At most this many are remembered, or handed over.
const HANDSHAKES_MAX: usize = 4096;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Handshakes by the CID their client chose.
#[derive(Default)]
struct Handshakes {
    /// Started by this generation while it read.
    mine: HashMap<Vec<u8>, Instant>,
    /// Started by an older one (handed over): their datagrams go to it.
    theirs: HashMap<Vec<u8>, (u32, Instant)>,
}

impl Handshakes {
    fn prune(&mut self, now: Instant) {
        self.mine
            .retain(|_, t| now.duration_since(*t) < HANDSHAKE_MEMORY);
        self.theirs
            .retain(|_, (_, t)| now.duration_since(*t) < HANDSHAKE_MEMORY);
    }
}

pub(crate) struct Socket {
    state: UdpSocketState,
    local: SocketAddr,
    /// This process's copy of the shared socket.
    udp: std::net::UdpSocket,
    /// Sending, registered for write readiness only: datagrams arriving for
    /// a newer generation never wake this one.
    send: AsyncFd<std::net::UdpSocket>,
    /// Reading, while this generation is the reader.
    recv: Mutex<Option<AsyncFd<std::net::UdpSocket>>>,
    /// quinn's receiving task: woken when this generation starts reading
    /// (it may wait on a reading copy that was closed meanwhile).
    receiver: Mutex<Option<Waker>>,
    /// Datagrams forwarded to this generation, and handovers.
    inbox: tokio::net::UnixDatagram,
    /// Sends to other generations (unbound).
    out: std::os::unix::net::UnixDatagram,
    inode: u64,
    pid: u32,
    key: Arc<cid::Key>,
    handshakes: Mutex<Handshakes>,
    /// A handover arrived.
    handed: Notify,
    stats: Arc<QuicStats>,
}

impl std::fmt::Debug for Socket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("quic::Socket")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

fn reader_name(inode: u64) -> Vec<u8> {
    format!("gracesrv.quic.{inode}").into_bytes()
}

fn inbox_name(inode: u64, pid: u32) -> Vec<u8> {
    format!("gracesrv.quic.{inode}.{pid}").into_bytes()
}

fn bind_abstract(name: &[u8]) -> io::Result<tokio::net::UnixDatagram> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    let s = std::os::unix::net::UnixDatagram::bind_addr(&addr)?;
    s.set_nonblocking(true)?;
    tokio::net::UnixDatagram::from_std(s)
}

impl Socket {
    /// Wraps this process's copy of a listener's UDP socket. Reads nothing
    /// until [`Socket::keep`] has made this generation the reader.
    pub(crate) fn new(
        udp: std::net::UdpSocket,
        key: Arc<cid::Key>,
        stats: Arc<QuicStats>,
    ) -> io::Result<Socket> {
        let state = UdpSocketState::new((&udp).into())?;
        let local = udp.local_addr()?;
        let inode = nix::sys::stat::fstat(&udp).map_err(io::Error::from)?.st_ino;
        let pid = std::process::id();
        let send = crate::sys::handoff::register_udp(udp.try_clone()?, Interest::WRITABLE)?;
        let out = std::os::unix::net::UnixDatagram::unbound()?;
        out.set_nonblocking(true)?;
        Ok(Socket {
            state,
            local,
            send,
            recv: Mutex::new(None),
            receiver: Mutex::new(None),
            inbox: bind_abstract(&inbox_name(inode, pid))?,
            out,
            udp,
            inode,
            pid,
            key,
            handshakes: Mutex::default(),
            handed: Notify::new(),
            stats,
        })
    }

    /// Reads the shared socket from now on.
    fn start_reading(&self) -> io::Result<()> {
        let fd = crate::sys::handoff::register_udp(self.udp.try_clone()?, Interest::READABLE)?;
        *lock(&self.recv) = Some(fd);
        self.stats.reading.store(true, Ordering::Release);
        if let Some(w) = lock(&self.receiver).as_ref() {
            w.wake_by_ref();
        }
        Ok(())
    }

    /// Stops reading: this process's reading copy is closed (and out of its
    /// epoll); the sending one stays.
    fn stop_reading(&self) {
        self.stats.reading.store(false, Ordering::Release);
        *lock(&self.recv) = None;
    }

    /// Makes this generation the reader, and keeps it so until a newer one
    /// takes over; reads again if that one goes away (a rollback) unless
    /// this process is stopping. Runs for the life of the endpoint.
    pub(crate) async fn keep(self: Arc<Self>, drain: Drain, listener: String) {
        let Some(mut reader) = self.claim(&listener).await else {
            return;
        };
        loop {
            let to = loop {
                let mut buf = [0u8; 8];
                match reader.recv(&mut buf).await {
                    Ok(5) if buf[0] == TAKEOVER => {
                        break u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]])
                    }
                    Ok(_) => continue,
                    Err(e) => {
                        warn!(%listener, "HTTP/3: reader socket: {e}", e = Chain(&e));
                        return;
                    }
                }
            };
            // Stop reading first, then let go of the name, then tell the
            // new reader which handshakes are ours.
            self.stop_reading();
            drop(reader);
            let n = self.hand_over(to);
            info!(%listener, to, handshakes = n, "HTTP/3: handed the UDP socket over");
            // Until the name is free again (the new reader died) or this
            // process stops. A resumed drain (a rollback) says so at once,
            // also when the takeover came before this drain began; the
            // check every second covers the rest.
            reader = loop {
                let tick = tokio::time::sleep(Duration::from_secs(1));
                tokio::select! {
                    _ = tick => {}
                    _ = drain.started(), if !drain.is_draining() => continue,
                    resumed = drain.resumed(), if drain.is_draining() => {
                        if !resumed {
                            return;
                        }
                    }
                }
                if let Ok(reader) = bind_abstract(&reader_name(self.inode)) {
                    if let Err(e) = self.start_reading() {
                        warn!(%listener, "HTTP/3: cannot read the UDP socket: {e}", e = Chain(&e));
                        return;
                    }
                    info!(%listener, "HTTP/3: nobody reads the UDP socket: reading it again");
                    break reader;
                }
            };
        }
    }

    /// Becomes the reader: takes the name, asking its holder to hand over
    /// first. `None` if this process cannot take part (no abstract sockets).
    async fn claim(&self, listener: &str) -> Option<tokio::net::UnixDatagram> {
        let name = reader_name(self.inode);
        let mut asked = 0u32;
        loop {
            match bind_abstract(&name) {
                Ok(reader) => {
                    if let Err(e) = self.start_reading() {
                        warn!(%listener, "HTTP/3: cannot read the UDP socket: {e}", e = Chain(&e));
                        return None;
                    }
                    if asked > 0 {
                        debug!(%listener, "HTTP/3: reading the UDP socket");
                    }
                    return Some(reader);
                }
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => {}
                Err(e) => {
                    warn!(%listener, "HTTP/3: cannot bind the reader's name, reading anyway: {e}", e = Chain(&e));
                    let _ = self.start_reading();
                    std::future::pending::<()>().await;
                }
            }
            let handed = self.handed.notified();
            tokio::pin!(handed);
            handed.as_mut().enable();
            let mut msg = [TAKEOVER, 0, 0, 0, 0];
            msg[1..].copy_from_slice(&self.pid.to_be_bytes());
            let _ = self.send_to(&name, &[IoSlice::new(&msg)]);
            asked += 1;
            tokio::select! {
                _ = handed => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {
                    warn!(%listener, asked, "HTTP/3: the generation reading the UDP socket has not handed it over yet");
                }
            }
        }
    }

    /// Tells generation `to` which handshakes are in flight here (and those
    /// an older generation handed here). Returns how many.
    fn hand_over(&self, to: u32) -> usize {
        let mut h = lock(&self.handshakes);
        h.prune(Instant::now());
        let mut body = Vec::new();
        let entries = h
            .mine
            .keys()
            .map(|c| (self.pid, c))
            .chain(h.theirs.iter().map(|(c, (pid, _))| (*pid, c)))
            .take(HANDSHAKES_MAX);
        let mut n = 0;
        for (pid, c) in entries {
            body.extend_from_slice(&pid.to_be_bytes());
            body.push(c.len() as u8);
            body.extend_from_slice(c);
            n += 1;
        }
        let mut header = [0u8; HEADER];
        header[0] = HANDOVER;
        let _ = self.send_to(
            &inbox_name(self.inode, to),
            &[IoSlice::new(&header), IoSlice::new(&body)],
        );
        n
    }

    fn send_to(&self, name: &[u8], iov: &[IoSlice<'_>]) -> io::Result<()> {
        let addr = UnixAddr::new_abstract(name).map_err(io::Error::from)?;
        sendmsg(
            self.out.as_raw_fd(),
            iov,
            &[],
            MsgFlags::MSG_DONTWAIT,
            Some(&addr),
        )
        .map(|_| ())
        .map_err(io::Error::from)
    }

    /// Passes a datagram to generation `pid`. False if it cannot take it
    /// (it has exited): then it is ours to drop.
    fn forward(&self, pid: u32, meta: &RecvMeta, datagram: &[u8]) -> bool {
        let mut header = [0u8; HEADER];
        header[0] = PACKET;
        header[1] = meta.ecn.map_or(0, |e| e as u8 | 0x80);
        put_addr(&mut header[2..19], meta.addr.ip());
        header[19..21].copy_from_slice(&meta.addr.port().to_be_bytes());
        if let Some(ip) = meta.dst_ip {
            put_addr(&mut header[21..38], ip);
        }
        let sent = self.send_to(
            &inbox_name(self.inode, pid),
            &[IoSlice::new(&header), IoSlice::new(datagram)],
        );
        match sent {
            Ok(()) => {
                self.stats.forwarded_total.fetch_add(1, Ordering::Relaxed);
                true
            }
            // A full inbox drops the datagram, as a full socket would.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => true,
            Err(_) => false,
        }
    }

    /// Where a datagram read from the shared socket goes: `Some(pid)` to
    /// pass it on.
    fn owner_of(&self, datagram: &[u8]) -> Option<u32> {
        match cid::owner(&self.key, self.pid, datagram) {
            cid::Owner::Me => None,
            cid::Owner::Generation(pid) => Some(pid),
            cid::Owner::Client(dcid) => {
                let mut h = lock(&self.handshakes);
                if let Some((pid, _)) = h.theirs.get(dcid) {
                    return Some(*pid);
                }
                if h.mine.len() >= HANDSHAKES_MAX {
                    h.prune(Instant::now());
                }
                if h.mine.len() < HANDSHAKES_MAX {
                    h.mine.insert(dcid.to_vec(), Instant::now());
                }
                None
            }
        }
    }

    /// Passes on what belongs to older generations, and compacts the rest
    /// (`n` buffers, each of segments of `stride` bytes) to the front.
    /// Returns how many buffers are left for quinn.
    fn route(&self, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta], n: usize) -> usize {
        let mut out = 0;
        for i in 0..n {
            let m = meta[i];
            let stride = m.stride.max(1);
            let mut kept = 0;
            let mut start = 0;
            while start < m.len {
                let end = (start + stride).min(m.len);
                let passed = match self.owner_of(&bufs[i][start..end]) {
                    Some(pid) => self.forward(pid, &m, &bufs[i][start..end]),
                    None => false,
                };
                if !passed {
                    if kept != start {
                        bufs[i].copy_within(start..end, kept);
                    }
                    kept += end - start;
                }
                start = end;
            }
            if kept == 0 {
                continue;
            }
            if out != i {
                let (head, tail) = bufs.split_at_mut(i);
                head[out][..kept].copy_from_slice(&tail[0][..kept]);
            }
            meta[out] = RecvMeta { len: kept, ..m };
            out += 1;
        }
        out
    }

    /// One message from the inbox: a datagram passed on to us (into
    /// `buf`, described in `meta`), or a handover (taken in here).
    fn poll_inbox(
        &self,
        cx: &mut Context<'_>,
        buf: &mut IoSliceMut<'_>,
        meta: &mut RecvMeta,
    ) -> Poll<Option<()>> {
        loop {
            if self.inbox.poll_recv_ready(cx).is_pending() {
                return Poll::Pending;
            }
            let mut header = [0u8; HEADER];
            let got = self.inbox.try_io(Interest::READABLE, || {
                let mut iov = [IoSliceMut::new(&mut header), IoSliceMut::new(buf)];
                recvmsg::<()>(
                    self.inbox.as_fd().as_raw_fd(),
                    &mut iov,
                    None,
                    MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_TRUNC,
                )
                .map(|m| m.bytes)
                .map_err(io::Error::from)
            });
            let n = match got {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    debug!("HTTP/3 inbox: {e}", e = Chain(&e));
                    continue;
                }
            };
            if n < HEADER || n - HEADER > buf.len() {
                continue;
            }
            let len = n - HEADER;
            match header[0] {
                PACKET => {
                    self.stats.received_total.fetch_add(1, Ordering::Relaxed);
                    let ecn = (header[1] & 0x80 != 0)
                        .then(|| EcnCodepoint::from_bits(header[1] & 0x3))
                        .flatten();
                    let port = u16::from_be_bytes([header[19], header[20]]);
                    let Some(ip) = get_addr(&header[2..19]) else {
                        continue;
                    };
                    *meta = RecvMeta {
                        addr: SocketAddr::new(ip, port),
                        len,
                        stride: len,
                        ecn,
                        dst_ip: get_addr(&header[21..38]),
                    };
                    return Poll::Ready(Some(()));
                }
                HANDOVER => {
                    self.take_handover(&buf[..len]);
                    return Poll::Ready(None);
                }
                _ => continue,
            }
        }
    }

    fn take_handover(&self, mut body: &[u8]) {
        let now = Instant::now();
        let mut h = lock(&self.handshakes);
        while body.len() >= 5 {
            let pid = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
            let len = body[4] as usize;
            let Some(c) = body.get(5..5 + len) else { break };
            if pid != self.pid {
                h.theirs.insert(c.to_vec(), (pid, now));
            }
            body = &body[5 + len..];
        }
        drop(h);
        self.handed.notify_waiters();
    }
}

/// An address as the inbox header carries it: family (4 or 6; 0 for none)
/// and 16 bytes.
fn put_addr(out: &mut [u8], ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            out[0] = 4;
            out[1..5].copy_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            out[0] = 6;
            out[1..17].copy_from_slice(&v6.octets());
        }
    }
}

fn get_addr(b: &[u8]) -> Option<IpAddr> {
    match b[0] {
        4 => Some(IpAddr::from([b[1], b[2], b[3], b[4]])),
        6 => {
            let o: [u8; 16] = b[1..17].try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(o)))
        }
        _ => None,
    }
}

impl quinn::AsyncUdpSocket for Socket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn quinn::UdpPoller>> {
        Box::pin(Poller {
            socket: self,
            waiting: Mutex::new(None),
        })
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        self.send
            .try_io(Interest::WRITABLE, |s| self.state.send(s.into(), transmit))
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        {
            let mut receiver = lock(&self.receiver);
            if !receiver.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *receiver = Some(cx.waker().clone());
            }
        }
        loop {
            // What a newer generation passed on first: our connections.
            match self.poll_inbox(cx, &mut bufs[0], &mut meta[0]) {
                Poll::Ready(Some(())) => return Poll::Ready(Ok(1)),
                Poll::Ready(None) => continue,
                Poll::Pending => {}
            }
            let recv = lock(&self.recv);
            let Some(fd) = recv.as_ref() else {
                return Poll::Pending;
            };
            let mut ready = match fd.poll_read_ready(cx) {
                Poll::Ready(Ok(r)) => r,
                // quinn ends the endpoint on an error: wait for the next datagram.
                Poll::Ready(Err(e)) => {
                    warn!("HTTP/3: reading the UDP socket: {e}", e = Chain(&e));
                    return Poll::Pending;
                }
                Poll::Pending => return Poll::Pending,
            };
            match ready.try_io(|s| self.state.recv(s.get_ref().into(), bufs, meta)) {
                Ok(Ok(n)) => {
                    drop(recv);
                    let n = self.route(bufs, meta, n);
                    if n > 0 {
                        return Poll::Ready(Ok(n));
                    }
                }
                Ok(Err(e)) => {
                    debug!("HTTP/3: reading the UDP socket: {e}", e = Chain(&e));
                }
                Err(_would_block) => {}
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }

    fn may_fragment(&self) -> bool {
        self.state.may_fragment()
    }

    fn max_transmit_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.state.gro_segments()
    }
}

type Writable = Pin<Box<dyn std::future::Future<Output = io::Result<()>> + Send>>;

/// Waits for the socket to take datagrams again, one waiter per caller.
struct Poller {
    socket: Arc<Socket>,
    waiting: Mutex<Option<Writable>>,
}

impl std::fmt::Debug for Poller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("quic::Poller")
    }
}

impl quinn::UdpPoller for Poller {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let waiting = this.waiting.get_mut().unwrap_or_else(|p| p.into_inner());
        let fut = waiting.get_or_insert_with(|| {
            let s = this.socket.clone();
            Box::pin(async move { s.send.writable().await.map(|_| ()) })
        });
        let res = fut.as_mut().poll(cx);
        if res.is_ready() {
            *waiting = None;
        }
        res
    }
}
