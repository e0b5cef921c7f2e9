//! A cap on old generations draining at once.
//!
//! Each restart leaves the old generation draining for up to
//! `shutdown_timeout`. Under long-lived connections (WebSockets, slow
//! downloads) and frequent restarts (a watch on a busy directory), they would
//! pile up. Every generation therefore hands its successor the list of
//! generations still draining, itself included (`GRACESRV_DRAINING`), and the
//! successor, once ready, stops the oldest beyond `max_draining` (USR2,
//! "finish": their HTTP/2 connections get the GOAWAY every conforming client
//! keeps at once, what is left after 0.8 s is cut, and they log how many; a
//! generation still there two seconds later, stopped or hung, gets SIGKILL).
//!
//! A pid is identified with its start time, so a pid reused by an unrelated
//! process is never signalled.

use tracing::warn;

use crate::sys::pid::Gen;

/// How long a generation told to finish has before SIGKILL: the finish
/// (`signals::FINISH_WITHIN`), then its tunnels' close frames.
const FINISH_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Older generations still draining, oldest first.
#[derive(Debug, Default)]
pub(crate) struct Predecessors(Vec<Gen>);

impl Predecessors {
    /// The generations in the list.
    pub(crate) fn list(&self) -> &[Gen] {
        &self.0
    }
}

impl Predecessors {
    /// The list a predecessor handed over (`GRACESRV_DRAINING`).
    pub(crate) fn parse(s: &str) -> Predecessors {
        Predecessors(
            s.split(',')
                .filter_map(|item| {
                    let (pid, start) = item.split_once(':')?;
                    Some(Gen {
                        pid: pid.trim().parse().ok()?,
                        start: start.trim().parse().ok()?,
                    })
                })
                .collect(),
        )
    }

    /// `pid:start,pid:start`, oldest first, with this process last: what
    /// the next generation is handed when this one is replaced.
    pub(crate) fn with_current(&self) -> String {
        self.0
            .iter()
            .chain(Gen::current().as_ref())
            .map(|g| format!("{}:{}", g.pid, g.start))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A generation that starts draining now (the newest).
    pub(crate) fn push(&mut self, gen: Gen) {
        self.0.push(gen);
    }

    /// Forgets generations that have exited.
    pub(crate) fn forget_exited(&mut self) {
        self.0.retain(Gen::alive);
    }

    /// Forgets generations that have exited, and stops the oldest beyond
    /// `max` at once.
    pub(crate) fn enforce(&mut self, max: usize) {
        self.forget_exited();
        while self.0.len() > max {
            let oldest = self.0.remove(0);
            warn!(
                pid = oldest.pid,
                draining = self.0.len() + 1,
                max,
                "too many generations draining: stopping the oldest at once"
            );
            stop(oldest);
        }
    }
}

/// Stops `gen`: USR2 (it finishes: see `Sig::Finish`), then SIGKILL if it
/// is still there after `FINISH_GRACE` (a stopped or hung process never acts
/// on a signal).
fn stop(gen: Gen) {
    use nix::sys::signal::{kill, Signal};
    let pid = nix::unistd::Pid::from_raw(gen.pid);
    let _ = kill(pid, Signal::SIGUSR2);
    let spawned = std::thread::Builder::new()
        .name("gracesrv-stop".into())
        .spawn(move || {
            std::thread::sleep(FINISH_GRACE);
            if gen.alive() {
                warn!(
                    pid = gen.pid,
                    "still there after being told to finish: killing it"
                );
                let _ = kill(pid, Signal::SIGKILL);
            }
        });
    if spawned.is_err() {
        // No thread to wait with: the cap matters more than the grace.
        let _ = kill(pid, Signal::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_round_trip_and_the_dead_are_forgotten() {
        let me = Gen::current().unwrap();
        let dead = Gen {
            pid: me.pid,
            start: me.start + 1,
        };
        let mut list = Predecessors(vec![dead]);
        let handed = list.with_current();
        assert_eq!(
            handed,
            format!("{}:{},{}:{}", me.pid, me.start + 1, me.pid, me.start)
        );
        let mut list2 = Predecessors::parse(&handed);
        assert_eq!(list2.0, vec![dead, me]);
        list2.enforce(3);
        assert_eq!(
            list2.0,
            vec![me],
            "a pid with another start time is someone else"
        );
        list.forget_exited();
        assert!(list.0.is_empty());
        assert_eq!(
            Predecessors::parse("x,1:2,:").0,
            vec![Gen { pid: 1, start: 2 }]
        );
    }
}
