//! The open-file limit. Every connection is an fd (two through a proxy), and
//! so is everything a restart opens: the config, certificates, the ready
//! pipe, the new process's copies of the sockets. Distributions start
//! services with a soft limit of 1024 under a far higher hard one; at 1024
//! the server refuses work and, worse, a restart cannot read its config.

use nix::sys::resource::{getrlimit, setrlimit, Resource};
use tracing::{info, warn};

/// Fds kept free for what a restart opens, and for the process itself.
const RESERVE: u64 = 64;

/// Raises the soft limit on open files to the hard one, as Go's runtime and
/// nginx's `worker_rlimit_nofile` do. Returns the soft limit now in force.
pub(crate) fn raise_nofile() -> u64 {
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return u64::MAX;
    };
    if soft < hard {
        if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            warn!(soft, hard, "cannot raise the open-file limit: {e}");
            return soft;
        }
    }
    hard.max(soft)
}

/// How many connections fit under `nofile` with `open` fds already in use
/// and `RESERVE` kept free; halved when connections may each hold an
/// upstream connection too (`proxies`).
pub(crate) fn connections_that_fit(nofile: u64, open: u64, proxies: bool) -> u64 {
    let room = nofile.saturating_sub(open + RESERVE);
    if proxies {
        room / 2
    } else {
        room
    }
}

/// `max_connections`, or fewer if that many would not fit under the fd
/// limit (with a warning that says what to raise).
pub(crate) fn connection_limit(max_connections: usize, proxies: bool) -> usize {
    let nofile = raise_nofile();
    let open = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
    let fit = connections_that_fit(nofile, open, proxies);
    if (max_connections as u64) <= fit {
        return max_connections;
    }
    let fit = fit.max(1) as usize;
    warn!(
        max_connections,
        nofile,
        fit,
        "max_connections does not fit under the open-file limit: at most {fit} connections at once \
         (the rest wait in the listen queue); raise the limit (systemd: LimitNOFILE=)"
    );
    info!(reserve = RESERVE, "fds kept free for restarts");
    fit
}

#[cfg(test)]
mod tests {
    #[test]
    fn connections_fit_under_the_limit() {
        use super::connections_that_fit as fit;
        assert_eq!(fit(1024, 20, false), 1024 - 20 - 64);
        assert_eq!(fit(1024, 20, true), (1024 - 20 - 64) / 2);
        assert_eq!(fit(50, 20, false), 0);
    }
}
