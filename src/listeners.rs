//! The listening sockets of one generation: adopted from the previous one by
//! name, or bound fresh.
//!
//! A socket keeps its name across restarts; that name, not its position, is
//! how a new generation finds it. A socket whose listener is gone, or whose
//! address changed, is closed here (the old generation still holds its own
//! copy until it drains, so closing ours loses nothing).

use std::net::SocketAddr;
use std::os::fd::OwnedFd;

use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage};
use tracing::{info, warn};

use crate::config::ListenerConfig;
use crate::handoff::InheritedSocket;

/// A listening socket with the name of the listener it serves.
#[derive(Debug)]
pub struct Listener {
    pub name: String,
    pub socket: std::net::TcpListener,
    /// The address actually bound (a configured port 0 resolved).
    pub local_addr: SocketAddr,
}

/// Backlog of freshly bound sockets. Inherited sockets keep theirs.
const BACKLOG: i32 = 4096;

/// Does an inherited socket bound at `actual` serve a listener configured at `wanted`?
/// Port 0 means "any port", and the port picked once is kept across restarts.
fn same_addr(wanted: SocketAddr, actual: SocketAddr) -> bool {
    wanted.ip() == actual.ip() && (wanted.port() == 0 || wanted.port() == actual.port())
}

/// Matches the configured listeners with inherited sockets (by name first,
/// then by address for sockets without a known name, as systemd may pass),
/// and binds the rest. Returns them in config order.
pub fn open(
    configs: &[ListenerConfig],
    inherited: Vec<InheritedSocket>,
) -> Result<Vec<Listener>, String> {
    let mut pool: Vec<Option<(InheritedSocket, SocketAddr)>> = inherited
        .into_iter()
        .filter_map(|s| match s.socket.local_addr() {
            Ok(a) => Some(Some((s, a))),
            Err(_) => None,
        })
        .collect();

    let mut take = |pred: &dyn Fn(&InheritedSocket, SocketAddr) -> bool| -> Option<(InheritedSocket, SocketAddr)> {
        let slot = pool.iter_mut().find(|s| s.as_ref().is_some_and(|(s, a)| pred(s, *a)))?;
        slot.take()
    };

    let mut out = Vec::with_capacity(configs.len());
    let mut unmatched = Vec::new();
    for cfg in configs {
        match take(&|s, _| s.name == cfg.name) {
            Some((s, actual)) if same_addr(cfg.addr, actual) => out.push(Some(Listener {
                name: cfg.name.clone(),
                socket: s.socket,
                local_addr: actual,
            })),
            Some((_, actual)) => {
                info!(listener = %cfg.name, old = %actual, new = %cfg.addr, "listener moved: closing the old socket");
                out.push(None);
                unmatched.push(out.len() - 1);
            }
            None => {
                out.push(None);
                unmatched.push(out.len() - 1);
            }
        }
    }
    // Sockets passed without a name we know (systemd without FileDescriptorName):
    // match them by address.
    for &i in &unmatched {
        let cfg = &configs[i];
        if cfg.addr.port() == 0 {
            continue;
        }
        if let Some((s, actual)) =
            take(&|s, a| a == cfg.addr && !configs.iter().any(|c| c.name == s.name))
        {
            out[i] = Some(Listener {
                name: cfg.name.clone(),
                socket: s.socket,
                local_addr: actual,
            });
        }
    }
    for (s, addr) in pool.into_iter().flatten() {
        info!(listener = %s.name, addr = %addr, "listener removed: closing its socket");
    }
    let mut listeners = Vec::with_capacity(configs.len());
    for (cfg, l) in configs.iter().zip(out) {
        let l = match l {
            Some(l) => l,
            None => {
                let socket = bind(cfg.addr).map_err(|e| {
                    format!("listener {}: cannot listen on {}: {e}", cfg.name, cfg.addr)
                })?;
                let local_addr = socket.local_addr().map_err(|e| e.to_string())?;
                Listener {
                    name: cfg.name.clone(),
                    socket,
                    local_addr,
                }
            }
        };
        if let Err(e) = l.socket.set_nonblocking(true) {
            warn!(listener = %l.name, "cannot make socket non-blocking: {e}");
        }
        listeners.push(l);
    }
    Ok(listeners)
}

/// Binds a fresh listening socket: close-on-exec (only the handoff passes it
/// on, deliberately), SO_REUSEADDR (a restart after a crash must not wait for
/// TIME_WAIT), and a backlog deep enough to absorb a burst during a handoff.
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, nix::Error> {
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd: OwnedFd = socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    socket::setsockopt(&fd, socket::sockopt::ReuseAddr, &true)?;
    if addr.is_ipv6() {
        socket::setsockopt(&fd, socket::sockopt::Ipv6V6Only, &true)?;
    }
    socket::bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(addr),
    )?;
    socket::listen(&fd, Backlog::new(BACKLOG).unwrap_or(Backlog::MAXCONN))?;
    Ok(std::net::TcpListener::from(fd))
}
