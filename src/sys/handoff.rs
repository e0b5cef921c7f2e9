//! Sockets across exec: the systemd socket-activation protocol, both ways.
//!
//! Receiving: a new process adopts its listening sockets at fds 3.. and the
//! pipe to report readiness on ([`adopt_listener`], [`adopt_ready_fd`]; the
//! variables that name them are read in `successor.rs`). Sending: [`spawn`]
//! forks, moves the sockets to 3.. in the child and execs the binary.
//!
//! This is the only module with `unsafe` code: adopting raw fds and the
//! fork/exec. Each block says why it is sound.

use std::ffi::{CString, OsString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::sys::socket::{getsockopt, sockopt, SockType};
use nix::sys::stat::{fstat, SFlag};

/// First fd of the passed sockets, as in sd_listen_fds(3).
pub(crate) const LISTEN_FDS_START: RawFd = 3;

/// Names a supervised worker's link to its supervisor (see `apps::link`).
pub(crate) const APPS_FD: &str = "GRACESRV_APPS_FD";

/// Hands the TLS ticket secret to the next process (`tickets`).
pub(crate) const TICKET_SECRET_VAR: &str = "GRACESRV_TICKET_SECRET";
/// Hands the metrics' counters to the next process (`metrics::freeze`).
pub(crate) const METRICS_VAR: &str = "GRACESRV_METRICS";

/// Hands the health of proxy upstreams to the next process (`upstreams`).
pub(crate) const UPSTREAMS_VAR: &str = "GRACESRV_UPSTREAMS";

/// Environment variables of the handoff; read once and removed at start.
pub(crate) const HANDOFF_VARS: [&str; 13] = [
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "GRACESRV_READY_FD",
    "GRACESRV_GENERATION",
    "GRACESRV_SUPERVISOR",
    "GRACESRV_DRAINING",
    TICKET_SECRET_VAR,
    METRICS_VAR,
    UPSTREAMS_VAR,
    APPS_FD,
    crate::sys::forward::FD_VAR,
    crate::sys::forward::NEWEST_VAR,
];

/// A socket handed to this process, with the name it was given.
#[derive(Debug)]
pub(crate) struct InheritedSocket {
    pub(crate) name: String,
    pub(crate) socket: Socket,
}

/// A listener's TCP socket, or the UDP socket of its HTTP/3 (`<name>.quic`).
#[derive(Debug)]
pub(crate) enum Socket {
    Stream(std::net::TcpListener),
    Datagram(std::net::UdpSocket),
}

impl Socket {
    pub(crate) fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        match self {
            Socket::Stream(s) => s.local_addr(),
            Socket::Datagram(s) => s.local_addr(),
        }
    }
}

/// What is wrong with a descriptor handed to this process (`what` names
/// it: the variable and the fd), or why a process could not be started.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandoffError {
    #[error("{what}: fd {fd} is not a file descriptor")]
    NotAnFd { what: String, fd: RawFd },
    #[error("{what}: fd {fd} is not open")]
    NotOpen { what: String, fd: RawFd },
    #[error("{what} names a standard stream{hint}")]
    StandardStream { what: String, hint: &'static str },
    /// It is not the kind of file it must be ("a socket", "listening").
    #[error("{what} is not {kind}")]
    NotKind { what: String, kind: &'static str },
    #[error("{what} is neither a stream nor a datagram socket ({kind})")]
    SocketType { what: String, kind: String },
    /// The system refused what was asked about it.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("argument or environment holds a NUL byte")]
    Nul,
    /// A handoff variable holds what it cannot (`LISTEN_FDS=x`).
    #[error("{var}={value:?} is not {kind}")]
    Variable {
        var: String,
        value: String,
        kind: &'static str,
    },
}

impl HandoffError {
    fn io(what: impl Into<String>, e: impl Into<std::io::Error>) -> HandoffError {
        HandoffError::Io {
            what: what.into(),
            source: e.into(),
        }
    }

    fn not(what: impl Into<String>, kind: &'static str) -> HandoffError {
        HandoffError::NotKind {
            what: what.into(),
            kind,
        }
    }
}

/// Takes ownership of `fd` if it is open, and marks it close-on-exec so it
/// does not leak into any process this one starts.
fn adopt_fd(fd: RawFd, what: &str) -> Result<OwnedFd, HandoffError> {
    if fd < 0 {
        return Err(HandoffError::NotAnFd {
            what: what.into(),
            fd,
        });
    }
    // SAFETY: F_GETFD only reads the flags of `fd`; it fails with EBADF if
    // `fd` is not open, in which case we do not take it.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(HandoffError::NotOpen {
            what: what.into(),
            fd,
        });
    }
    // SAFETY: `fd` is open (checked above) and was handed to this process
    // (by LISTEN_FDS or GRACESRV_READY_FD, whose LISTEN_PID is ours), so
    // nothing else in this process owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sets a flag on an fd we own.
    unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) };
    Ok(owned)
}

pub(crate) fn adopt_ready_fd(fd: RawFd) -> Result<OwnedFd, HandoffError> {
    let what = format!("GRACESRV_READY_FD={fd}");
    if fd <= 2 {
        return Err(HandoffError::StandardStream {
            what,
            hint: ", not a pipe",
        });
    }
    let owned = adopt_fd(fd, "GRACESRV_READY_FD")?;
    let st = fstat(&owned).map_err(|e| HandoffError::io(&what, e))?;
    let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
    if kind != SFlag::S_IFIFO && kind != SFlag::S_IFSOCK {
        return Err(HandoffError::not(what, "a pipe or socket"));
    }
    Ok(owned)
}

/// The fd variable `var` names, past the standard streams, adopted; with
/// what names it in errors (`VAR=fd`).
fn adopt_named(var: &str, fd: RawFd) -> Result<(OwnedFd, String), HandoffError> {
    let what = format!("{var}={fd}");
    if fd <= 2 {
        return Err(HandoffError::StandardStream { what, hint: "" });
    }
    Ok((adopt_fd(fd, &what)?, what))
}

/// The Unix socket generations hand requests on through (see
/// `serve::forward`): listening, in the abstract namespace.
pub(crate) fn adopt_forward(fd: RawFd) -> Result<OwnedFd, HandoffError> {
    let (owned, what) = adopt_named(crate::sys::forward::FD_VAR, fd)?;
    let addr: nix::sys::socket::UnixAddr =
        nix::sys::socket::getsockname(owned.as_raw_fd()).map_err(|e| HandoffError::io(&what, e))?;
    let listening = getsockopt(&owned, sockopt::AcceptConn).unwrap_or(false);
    if addr.as_abstract().is_none() || !listening {
        return Err(HandoffError::not(what, "a listening abstract Unix socket"));
    }
    Ok(owned)
}

/// The memory holding the newest generation's pid (see `sys::forward`): a
/// regular file (a memfd) of four bytes.
pub(crate) fn adopt_newest(fd: RawFd) -> Result<OwnedFd, HandoffError> {
    let (owned, what) = adopt_named(crate::sys::forward::NEWEST_VAR, fd)?;
    let st = fstat(&owned).map_err(|e| HandoffError::io(&what, e))?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG || st.st_size < 4 {
        return Err(HandoffError::not(what, "a file of four bytes"));
    }
    Ok(owned)
}

/// The worker's end of its link to the supervisor (see `apps::link`).
pub(crate) fn adopt_link(fd: RawFd) -> Result<OwnedFd, HandoffError> {
    let (owned, what) = adopt_named(APPS_FD, fd)?;
    let st = fstat(&owned).map_err(|e| HandoffError::io(&what, e))?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFSOCK {
        return Err(HandoffError::not(what, "a socket"));
    }
    Ok(owned)
}

/// A passed socket: a listening TCP socket, or a bound UDP socket (HTTP/3;
/// systemd's `ListenDatagram=`).
pub(crate) fn adopt_listener(fd: RawFd) -> Result<Socket, HandoffError> {
    let what = format!("LISTEN_FDS: fd {fd}");
    let owned = adopt_fd(fd, &what)?;
    let st = fstat(&owned).map_err(|e| HandoffError::io(&what, e))?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFSOCK {
        return Err(HandoffError::not(what, "a socket"));
    }
    let socket = match getsockopt(&owned, sockopt::SockType) {
        Ok(SockType::Stream) => {
            if !getsockopt(&owned, sockopt::AcceptConn).unwrap_or(false) {
                return Err(HandoffError::not(what, "listening"));
            }
            Socket::Stream(std::net::TcpListener::from(owned))
        }
        Ok(SockType::Datagram) => Socket::Datagram(std::net::UdpSocket::from(owned)),
        Ok(other) => {
            return Err(HandoffError::SocketType {
                what,
                kind: format!("{other:?}"),
            })
        }
        Err(e) => return Err(HandoffError::io(what, e)),
    };
    // An IP socket (not a Unix one), and bound: a UDP socket's port is 0 until then.
    let addr = socket
        .local_addr()
        .map_err(|e| HandoffError::io(&what, e))?;
    if !(addr.is_ipv4() || addr.is_ipv6()) {
        return Err(HandoffError::not(what, "a TCP or UDP socket"));
    }
    if addr.port() == 0 {
        return Err(HandoffError::not(what, "bound"));
    }
    Ok(socket)
}

/// Everything `spawn` needs, prepared before the fork: the child may only make
/// async-signal-safe calls, so it must not allocate.
pub(crate) struct SpawnArgs<'a> {
    pub(crate) exe: &'a Path,
    pub(crate) argv: &'a [OsString],
    /// Environment without any handoff variable; those are added here.
    pub(crate) env: Vec<(OsString, OsString)>,
    /// Sockets in listener order, with their names: fds 3.., and the
    /// `LISTEN_*` variables (none at all when there is no socket).
    pub(crate) sockets: Vec<(&'a str, RawFd)>,
    /// Further fds, placed after the sockets, each with the variable that
    /// tells the new process its number (`GRACESRV_READY_FD`, ...).
    pub(crate) fds: Vec<(&'static str, RawFd)>,
    /// Where a failed exec says why (`ERROR exec:<errno>`): the ready pipe,
    /// or an application's close-on-exec error pipe.
    pub(crate) exec_error: RawFd,
    /// `GRACESRV_GENERATION`, for a gracesrv process.
    pub(crate) generation: Option<u64>,
    /// The working directory, when not this process's.
    pub(crate) dir: Option<&'a Path>,
    pub(crate) group: Group,
}

/// What a new process is to its parent.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Group {
    /// The next generation of a self-restarting server: nothing changes.
    Same,
    /// A supervised worker: a process group of its own (Ctrl-C reaches it
    /// once, through the supervisor), and SIGKILL if the supervisor dies
    /// while it starts (a stopped or hung start would never act on TERM, and
    /// would keep the ports). Once it serves, it asks for TERM instead (a
    /// drain; see `serving_under_supervisor`).
    Worker,
    /// An application instance: a process group of its own (stopped by the
    /// supervisor after the workers drain, its children with it), and TERM
    /// if the supervisor dies.
    App,
}

fn cstring(bytes: &[u8]) -> Result<CString, HandoffError> {
    CString::new(bytes).map_err(|_| HandoffError::Nul)
}

/// Forks and execs `exe` with the sockets at fds 3.., the further fds after
/// them, and the handoff variables. Returns the child's pid.
pub(crate) fn spawn(args: SpawnArgs<'_>) -> Result<libc::pid_t, HandoffError> {
    let n = args.sockets.len() as i32;
    let group = args.group;
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };

    let path = cstring(args.exe.as_os_str().as_bytes())?;
    let dir = args
        .dir
        .map(|d| cstring(d.as_os_str().as_bytes()))
        .transpose()?;
    let argv: Vec<CString> = args
        .argv
        .iter()
        .map(|a| cstring(a.as_bytes()))
        .collect::<Result<_, _>>()?;
    let mut env: Vec<CString> = Vec::new();
    for (k, v) in &args.env {
        let mut kv = k.as_bytes().to_vec();
        kv.push(b'=');
        kv.extend_from_slice(v.as_bytes());
        env.push(cstring(&kv)?);
    }
    if n > 0 {
        let names: Vec<&str> = args.sockets.iter().map(|(name, _)| *name).collect();
        env.push(cstring(format!("LISTEN_FDS={n}").as_bytes())?);
        env.push(cstring(
            format!("LISTEN_FDNAMES={}", names.join(":")).as_bytes(),
        )?);
    }
    for (i, (var, _)) in args.fds.iter().enumerate() {
        let target = LISTEN_FDS_START + n + i as i32;
        env.push(cstring(format!("{var}={target}").as_bytes())?);
    }
    if let Some(g) = args.generation {
        env.push(cstring(format!("GRACESRV_GENERATION={g}").as_bytes())?);
    }
    // LISTEN_PID must be the child's own pid, known only after fork: reserve
    // room for the digits now, and write them in the child without allocating.
    let mut listen_pid: Vec<u8> = b"LISTEN_PID=".to_vec();
    let digits_at = listen_pid.len();
    listen_pid.extend_from_slice(&[0u8; 21]);

    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut env_ptrs: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
    if n > 0 || !args.fds.is_empty() {
        env_ptrs.push(listen_pid.as_ptr().cast());
    }
    env_ptrs.push(std::ptr::null());

    // Every fd the child keeps, in target order, then the exec error fd
    // (moved like the others, but left close-on-exec).
    let sources: Vec<RawFd> = args
        .sockets
        .iter()
        .map(|(_, fd)| *fd)
        .chain(args.fds.iter().map(|(_, fd)| *fd))
        .chain([args.exec_error])
        .collect();
    let kept = sources.len() - 1;
    let mut moved: Vec<RawFd> = vec![-1; sources.len()];
    // Copies are made at or above this fd, so they never land on a target.
    let scratch_floor = LISTEN_FDS_START + kept as i32;

    // Hold SIGHUP from before the fork until the new process has installed
    // its handler (it unblocks it then): the child inherits this thread's
    // mask, and a blocked signal stays pending across exec. A HUP sent to the
    // new process while it starts is then delivered later, neither fatal
    // (the default action) nor swallowed by this process's inherited handler.
    // An application gets the mask it would have had: nothing blocked.
    let mut hup = nix::sys::signal::SigSet::empty();
    hup.add(nix::sys::signal::Signal::SIGHUP);
    let mut old_mask = nix::sys::signal::SigSet::empty();
    nix::sys::signal::pthread_sigmask(
        nix::sys::signal::SigmaskHow::SIG_BLOCK,
        Some(&hup),
        Some(&mut old_mask),
    )
    .map_err(|e| HandoffError::io("sigprocmask", e))?;
    let empty = nix::sys::signal::SigSet::empty();
    let empty_ptr = empty.as_ref() as *const libc::sigset_t;

    // SAFETY: fork in a multi-threaded process. The child calls only
    // async-signal-safe functions (getpid, fcntl, dup2, setpgid, prctl,
    // getppid, chdir, sigprocmask, signal, execve, write, _exit) and writes
    // only into memory allocated above, before the fork.
    let pid = unsafe { libc::fork() };
    if pid != 0 {
        // Parent: restore this thread's mask (a HUP meanwhile is pending, not lost).
        let _ = nix::sys::signal::pthread_sigmask(
            nix::sys::signal::SigmaskHow::SIG_SETMASK,
            Some(&old_mask),
            None,
        );
    }
    if pid < 0 {
        return Err(HandoffError::io("fork", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        // Child. No allocation, no locks, no panics from here on.
        // SAFETY: each call is async-signal-safe (see above); pointers point
        // into buffers that live until execve replaces the process image.
        unsafe {
            let child_pid = libc::getpid();
            write_decimal(child_pid as u64, &mut listen_pid[digits_at..]);
            // Move every source fd out of the target range first: a source
            // may already sit on another source's target number.
            for (i, fd) in sources.iter().enumerate() {
                moved[i] = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, scratch_floor);
                if moved[i] < 0 {
                    libc::_exit(126);
                }
            }
            let error_fd = moved[kept];
            if group != Group::Same {
                // See `Group`. The parent may have died before the prctl
                // took effect: then end now.
                let on_parent_death = match group {
                    Group::App => libc::SIGTERM,
                    _ => libc::SIGKILL,
                };
                if libc::setpgid(0, 0) < 0
                    || libc::prctl(libc::PR_SET_PDEATHSIG, on_parent_death) < 0
                    || libc::getppid() != parent
                {
                    libc::_exit(126);
                }
            }
            if group == Group::App {
                // Signals this process ignores or blocks would be inherited.
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
                libc::sigprocmask(libc::SIG_SETMASK, empty_ptr, std::ptr::null_mut());
            }
            if let Some(dir) = &dir {
                if libc::chdir(dir.as_ptr()) < 0 {
                    exec_failed(error_fd);
                }
            }
            // dup2 clears close-on-exec on the target: these survive exec.
            for (i, fd) in moved[..kept].iter().enumerate() {
                if libc::dup2(*fd, LISTEN_FDS_START + i as i32) < 0 {
                    libc::_exit(126);
                }
            }
            libc::execve(path.as_ptr(), argv_ptrs.as_ptr(), env_ptrs.as_ptr());
            exec_failed(error_fd);
        }
    }
    Ok(pid)
}

/// In the child, after a failed chdir or exec: says why on `fd`
/// (`ERROR exec:<errno>`), for the parent to report instead of a bare exit
/// status, and exits 127.
///
/// # Safety
/// Only in a forked child: async-signal-safe calls, no allocation.
unsafe fn exec_failed(fd: RawFd) -> ! {
    let errno = *libc::__errno_location();
    const AT: usize = crate::sys::ready::EXEC_ERROR.len();
    let mut msg = [0u8; AT + 22];
    msg[..AT].copy_from_slice(crate::sys::ready::EXEC_ERROR);
    write_decimal(errno.max(0) as u64, &mut msg[AT..]);
    let len = msg[AT..]
        .iter()
        .position(|b| *b == 0)
        .map_or(msg.len(), |n| AT + n);
    msg[len] = b'\n';
    libc::write(fd, msg.as_ptr().cast(), len + 1);
    libc::_exit(127);
}

/// Writes `n` as decimal digits followed by NUL into `buf` (21 bytes fit any u64).
fn write_decimal(mut n: u64, buf: &mut [u8]) {
    let mut tmp = [0u8; 20];
    let mut len = 0;
    loop {
        tmp[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        buf[i] = tmp[len - 1 - i];
    }
    buf[len] = 0;
}

/// Unblocks SIGHUP, which a parent holds blocked across fork and exec (see
/// `spawn`). Called once this process's own handler is installed.
pub(crate) fn unblock_hup() {
    let mut set = nix::sys::signal::SigSet::empty();
    set.add(nix::sys::signal::Signal::SIGHUP);
    let _ = nix::sys::signal::pthread_sigmask(
        nix::sys::signal::SigmaskHow::SIG_UNBLOCK,
        Some(&set),
        None,
    );
}

/// The pipe a new generation reports on: the parent keeps the read end, the
/// child gets the write end at `GRACESRV_READY_FD`.
pub(crate) fn ready_pipe() -> Result<(OwnedFd, OwnedFd), HandoffError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| HandoffError::io("pipe", e))
}

/// Bytes this side of a TCP connection has queued and the peer has not yet
/// acknowledged (SIOCOUTQ). A closing connection lingers while there are
/// any (see `connection::linger`); 0 if the socket cannot say.
pub(crate) fn unacknowledged(socket: &impl AsRawFd) -> usize {
    let mut queued: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ on a TCP socket) writes one c_int through
    // the pointer, which points at a live c_int on this stack frame; the fd
    // is borrowed from a socket that stays open for the call.
    let r = unsafe { libc::ioctl(socket.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
    if r < 0 {
        0
    } else {
        usize::try_from(queued).unwrap_or(0)
    }
}

/// The round-trip time the kernel measures on a TCP socket (its smoothed
/// estimate); `None` for another kind of socket.
pub(crate) fn round_trip(socket: &impl AsRawFd) -> Option<std::time::Duration> {
    // SAFETY: `tcp_info` is a plain C struct of integers, for which all
    // zeros is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: TCP_INFO writes at most `len` bytes into `info`, a live struct
    // of that size on this stack frame, and the length into `len`; the fd is
    // borrowed from a socket that stays open for the call.
    let r = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    (r == 0 && len as usize >= std::mem::size_of::<libc::tcp_info>())
        .then(|| std::time::Duration::from_micros(u64::from(info.tcpi_rtt)))
}

/// Registers a UDP socket with this thread's reactor for `interest` only:
/// a socket another process reads must not wake this one (`quic::socket`).
pub(crate) fn register_udp(
    socket: std::net::UdpSocket,
    interest: tokio::io::Interest,
) -> std::io::Result<tokio::io::unix::AsyncFd<std::net::UdpSocket>> {
    // SAFETY: `socket` is moved into the AsyncFd, which owns it (and its
    // fd, which therefore stays open and the same) until the AsyncFd drops.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(socket, interest) }
        .map_err(std::io::Error::from)
}

/// Raw fd of anything that has one, for `SpawnArgs`.
pub(crate) fn raw(fd: &impl AsRawFd) -> RawFd {
    fd.as_raw_fd()
}

#[cfg(test)]
mod tests {
    #[test]
    fn decimal() {
        let mut b = [9u8; 21];
        super::write_decimal(0, &mut b);
        assert_eq!(&b[..2], b"0\0");
        super::write_decimal(4194304, &mut b);
        assert_eq!(&b[..8], b"4194304\0");
        super::write_decimal(u64::MAX, &mut b);
        assert_eq!(&b[..21], b"18446744073709551615\0");
    }
}
