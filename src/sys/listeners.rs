//! The listening sockets of one generation: adopted from the previous one by
//! name, or bound fresh.
//!
//! A socket keeps its name across restarts; that name, not its position, is
//! how a new generation finds it. A socket whose listener is gone, or whose
//! address changed, is closed here (the old generation still holds its own
//! copy until it drains, so closing ours loses nothing).

use std::net::SocketAddr;
use std::os::fd::{OwnedFd, RawFd};

use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage};
use tracing::{info, warn};

use crate::config::ListenerConfig;
use crate::sys::handoff::{InheritedSocket, Socket};

/// A listening socket with the name of the listener it serves.
#[derive(Debug)]
pub(crate) struct Listener {
    pub(crate) name: String,
    pub(crate) socket: std::net::TcpListener,
    /// The address actually bound (a configured port 0 resolved).
    pub(crate) local_addr: SocketAddr,
    /// The UDP socket of its HTTP/3, on the same address (`http3: true`).
    pub(crate) quic: Option<QuicSocket>,
}

/// A listener's UDP socket, and the name it is handed over with.
#[derive(Debug)]
pub(crate) struct QuicSocket {
    /// `<listener>.quic`
    pub(crate) name: String,
    pub(crate) socket: std::net::UdpSocket,
}

impl Listener {
    /// What a restart hands over of this listener: its sockets and their names.
    pub(crate) fn handed_over(&self) -> impl Iterator<Item = (&str, RawFd)> {
        let tcp = (self.name.as_str(), crate::sys::handoff::raw(&self.socket));
        let udp = self
            .quic
            .as_ref()
            .map(|q| (q.name.as_str(), crate::sys::handoff::raw(&q.socket)));
        std::iter::once(tcp).chain(udp)
    }
}

/// The name of a listener's UDP socket in `LISTEN_FDNAMES`.
pub(crate) fn quic_name(listener: &str) -> String {
    format!("{listener}.quic")
}

/// Backlog of freshly bound sockets. Inherited sockets keep theirs.
const BACKLOG: i32 = 4096;

/// Does an inherited socket bound at `actual` serve a listener configured at `wanted`?
/// Port 0 means "any port", and the port picked once is kept across restarts.
fn same_addr(wanted: SocketAddr, actual: SocketAddr) -> bool {
    wanted.ip() == actual.ip() && (wanted.port() == 0 || wanted.port() == actual.port())
}

/// Inherited sockets not yet taken, with their addresses.
struct Pool(Vec<Option<(InheritedSocket, SocketAddr)>>);

impl Pool {
    fn take(
        &mut self,
        pred: impl Fn(&InheritedSocket, SocketAddr) -> bool,
    ) -> Option<(InheritedSocket, SocketAddr)> {
        let slot = self
            .0
            .iter_mut()
            .find(|s| s.as_ref().is_some_and(|(s, a)| pred(s, *a)))?;
        slot.take()
    }
}

fn is_stream(s: &InheritedSocket) -> bool {
    matches!(s.socket, Socket::Stream(_))
}

/// Why a listener's socket could not be had.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ListenError {
    #[error("listener {listener}: cannot listen on {addr}: {source}")]
    Listen {
        listener: String,
        addr: SocketAddr,
        #[source]
        source: nix::Error,
    },
    #[error("listener {listener}: cannot bind UDP {addr} for HTTP/3: {source}")]
    Udp {
        listener: String,
        addr: SocketAddr,
        #[source]
        source: nix::Error,
    },
    #[error("listener {listener}: {source}")]
    Io {
        listener: String,
        #[source]
        source: std::io::Error,
    },
}

/// Matches the configured listeners with inherited sockets (by name first,
/// then by address for sockets without a known name, as systemd may pass),
/// and binds the rest. Returns them in config order.
pub(crate) fn open(
    configs: &[ListenerConfig],
    inherited: Vec<InheritedSocket>,
) -> Result<Vec<Listener>, ListenError> {
    let mut pool = Pool(
        inherited
            .into_iter()
            .filter_map(|s| match s.socket.local_addr() {
                Ok(a) => Some(Some((s, a))),
                Err(_) => None,
            })
            .collect(),
    );
    let known = |name: &str| {
        configs
            .iter()
            .any(|c| c.name == name || (c.http3 && quic_name(&c.name) == name))
    };

    let mut tcp: Vec<Option<(std::net::TcpListener, SocketAddr)>> = Vec::new();
    for cfg in configs {
        let by_name = pool.take(|s, _| s.name == cfg.name && is_stream(s));
        let found = match by_name {
            Some((s, actual)) if same_addr(cfg.addr, actual) => Some((s, actual)),
            Some((_, actual)) => {
                info!(listener = %cfg.name, old = %actual, new = %cfg.addr, "listener moved: closing the old socket");
                None
            }
            None => None,
        };
        tcp.push(match found {
            Some((
                InheritedSocket {
                    socket: Socket::Stream(s),
                    ..
                },
                a,
            )) => Some((s, a)),
            _ => None,
        });
    }
    // Sockets passed without a name we know (systemd without
    // FileDescriptorName): matched by address, once every name has been.
    for (cfg, slot) in configs.iter().zip(tcp.iter_mut()) {
        if slot.is_none() && cfg.addr.port() != 0 {
            if let Some((
                InheritedSocket {
                    socket: Socket::Stream(s),
                    ..
                },
                a,
            )) = pool.take(|s, a| a == cfg.addr && is_stream(s) && !known(&s.name))
            {
                *slot = Some((s, a));
            }
        }
    }
    let mut listeners = Vec::with_capacity(configs.len());
    for (cfg, slot) in configs.iter().zip(tcp) {
        let (socket, local_addr) = match slot {
            Some(found) => found,
            None => {
                let socket = bind(cfg.addr).map_err(|source| ListenError::Listen {
                    listener: cfg.name.clone(),
                    addr: cfg.addr,
                    source,
                })?;
                let local_addr = socket.local_addr().map_err(|source| ListenError::Io {
                    listener: cfg.name.clone(),
                    source,
                })?;
                (socket, local_addr)
            }
        };
        if let Err(e) = socket.set_nonblocking(true) {
            warn!(listener = %cfg.name, "cannot make socket non-blocking: {e}");
        }
        // HTTP/3: a UDP socket on the TCP socket's address (its port too,
        // when the config said 0).
        let quic = match cfg.http3 {
            false => None,
            true => Some(open_quic(cfg, local_addr, &mut pool, &known)?),
        };
        listeners.push(Listener {
            name: cfg.name.clone(),
            socket,
            local_addr,
            quic,
        });
    }
    for (s, addr) in pool.0.into_iter().flatten() {
        info!(listener = %s.name, addr = %addr, "listener removed: closing its socket");
    }
    Ok(listeners)
}

/// The UDP socket of `cfg`'s HTTP/3 at `addr`: inherited by name
/// (`<listener>.quic`), or by address (a systemd `ListenDatagram=` socket
/// with the listener's name or none we know), or bound.
fn open_quic(
    cfg: &ListenerConfig,
    addr: SocketAddr,
    pool: &mut Pool,
    known: &dyn Fn(&str) -> bool,
) -> Result<QuicSocket, ListenError> {
    let name = quic_name(&cfg.name);
    let datagram = |s: &InheritedSocket| matches!(s.socket, Socket::Datagram(_));
    let found = pool
        .take(|s, a| datagram(s) && s.name == name && a == addr)
        .or_else(|| {
            pool.take(|s, a| datagram(s) && a == addr && (s.name == cfg.name || !known(&s.name)))
        });
    let socket = match found {
        Some((
            InheritedSocket {
                socket: Socket::Datagram(s),
                ..
            },
            _,
        )) => s,
        _ => bind_udp(addr).map_err(|source| ListenError::Udp {
            listener: cfg.name.clone(),
            addr,
            source,
        })?,
    };
    if let Err(e) = socket.set_nonblocking(true) {
        warn!(listener = %cfg.name, "cannot make the UDP socket non-blocking: {e}");
    }
    Ok(QuicSocket { name, socket })
}

/// A fresh socket bound at `addr`: close-on-exec (only the handoff passes it
/// on, deliberately), IPv6 sockets IPv6 only; a TCP one with SO_REUSEADDR (a
/// restart after a crash must not wait for TIME_WAIT).
fn bound(addr: SocketAddr, kind: SockType) -> Result<OwnedFd, nix::Error> {
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd: OwnedFd = socket::socket(family, kind, SockFlag::SOCK_CLOEXEC, None)?;
    if kind == SockType::Stream {
        socket::setsockopt(&fd, socket::sockopt::ReuseAddr, &true)?;
    }
    if addr.is_ipv6() {
        socket::setsockopt(&fd, socket::sockopt::Ipv6V6Only, &true)?;
    }
    socket::bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(addr),
    )?;
    Ok(fd)
}

/// Binds a fresh UDP socket for HTTP/3.
pub(crate) fn bind_udp(addr: SocketAddr) -> Result<std::net::UdpSocket, nix::Error> {
    bound(addr, SockType::Datagram).map(std::net::UdpSocket::from)
}

/// Binds a fresh listening socket, with a backlog deep enough to absorb a
/// burst during a handoff.
pub(crate) fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, nix::Error> {
    let fd = bound(addr, SockType::Stream)?;
    socket::listen(&fd, Backlog::new(BACKLOG).unwrap_or(Backlog::MAXCONN))?;
    Ok(std::net::TcpListener::from(fd))
}
