//! The socket draining generations hand requests on through (see
//! `serve::forward`): one listening Unix socket in the abstract namespace,
//! made by the first process and handed to every generation after it
//! (`GRACESRV_FORWARD_FD`). Like the listeners, only the newest generation
//! accepts on it, so a connection to it reaches whichever is newest.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use tokio::net::UnixStream;

/// Names the forward socket's fd in a new generation.
pub(crate) const FD_VAR: &str = "GRACESRV_FORWARD_FD";

/// The socket every generation shares for the requests it hands on.
#[derive(Debug)]
pub(crate) struct ForwardSocket {
    listener: std::os::unix::net::UnixListener,
    /// Its name in the abstract namespace.
    name: Vec<u8>,
    me: u32,
}

impl ForwardSocket {
    /// The socket handed over by the previous generation, or a new one.
    pub(crate) fn open(inherited: Option<OwnedFd>) -> io::Result<ForwardSocket> {
        use std::os::linux::net::SocketAddrExt;
        let listener = match inherited {
            Some(fd) => std::os::unix::net::UnixListener::from(fd),
            None => {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.subsec_nanos());
                let name = format!("gracesrv.forward.{}.{nanos}", std::process::id());
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                std::os::unix::net::UnixListener::bind_addr(&addr)?
            }
        };
        let name = listener
            .local_addr()?
            .as_abstract_name()
            .map(<[u8]>::to_vec)
            .ok_or_else(|| io::Error::other("the forward socket has no abstract name"))?;
        listener.set_nonblocking(true)?;
        Ok(ForwardSocket {
            listener,
            name,
            me: nix::unistd::geteuid().as_raw(),
        })
    }

    /// A copy of the listening socket, for an accept loop.
    pub(crate) fn listener(&self) -> io::Result<std::os::unix::net::UnixListener> {
        self.listener.try_clone()
    }

    /// Who may connect besides root: this process's user.
    pub(crate) fn owner(&self) -> u32 {
        self.me
    }

    /// The fd a restart hands over.
    pub(crate) fn raw(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// A connection to whichever generation accepts now, made without
    /// blocking (a full queue is an error, not a wait).
    pub(crate) async fn connect(&self) -> io::Result<UnixStream> {
        use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        connect(fd.as_raw_fd(), &UnixAddr::new_abstract(&self.name)?)?;
        UnixStream::from_std(std::os::unix::net::UnixStream::from(fd))
    }
}
