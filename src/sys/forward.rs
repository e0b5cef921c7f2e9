//! The socket draining generations hand requests on through (see
//! `serve::forward`): one listening Unix socket in the abstract namespace,
//! made by the first process and handed to every generation after it
//! (`GRACESRV_FORWARD_FD`). Like the listeners, only the newest generation
//! accepts on it, so a connection to it reaches whichever is newest. Beside
//! it, four bytes of shared memory (a memfd, `GRACESRV_FORWARD_NEWEST_FD`)
//! hold the pid of the newest generation, written before it says ready: a
//! draining generation reads it before each request it hands on, and keeps
//! using a connection only while the generation at its other end is the
//! newest.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use tokio::net::UnixStream;

/// Names the forward socket's fd in a new generation.
pub(crate) const FD_VAR: &str = "GRACESRV_FORWARD_FD";
/// Names the fd of the newest generation's pid.
pub(crate) const NEWEST_VAR: &str = "GRACESRV_FORWARD_NEWEST_FD";

/// The socket every generation shares for the requests it hands on.
#[derive(Debug)]
pub(crate) struct ForwardSocket {
    listener: std::os::unix::net::UnixListener,
    /// Its name in the abstract namespace.
    name: Vec<u8>,
    me: u32,
    /// The newest generation's pid (a memfd of four bytes).
    newest: OwnedFd,
}

impl ForwardSocket {
    /// The socket and the newest pid's memory handed over by the previous
    /// generation, or new ones (both, if either is missing).
    pub(crate) fn open(
        inherited: Option<OwnedFd>,
        newest: Option<OwnedFd>,
    ) -> io::Result<ForwardSocket> {
        use std::os::linux::net::SocketAddrExt;
        let (listener, newest) = match (inherited, newest) {
            (Some(fd), Some(newest)) => (std::os::unix::net::UnixListener::from(fd), newest),
            _ => {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.subsec_nanos());
                let name = format!("gracesrv.forward.{}.{nanos}", std::process::id());
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                let newest = nix::sys::memfd::memfd_create(
                    c"gracesrv-newest",
                    nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
                )?;
                nix::unistd::ftruncate(&newest, 4)?;
                (std::os::unix::net::UnixListener::bind_addr(&addr)?, newest)
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
            newest,
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

    /// The fds a restart hands over: the socket, the newest pid's memory.
    pub(crate) fn raw(&self) -> (RawFd, RawFd) {
        (self.listener.as_raw_fd(), self.newest.as_raw_fd())
    }

    /// This process is the newest generation now (written before it says
    /// ready, and again when it takes over after a failed restart).
    pub(crate) fn set_newest(&self) {
        let _ = nix::sys::uio::pwrite(&self.newest, &std::process::id().to_le_bytes(), 0);
    }

    /// The newest generation's pid (0: none said yet). Reading memory, not
    /// a disk: fine on a serving thread.
    pub(crate) fn newest(&self) -> u32 {
        let mut b = [0; 4];
        match nix::sys::uio::pread(&self.newest, &mut b, 0) {
            Ok(4) => u32::from_le_bytes(b),
            _ => 0,
        }
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
