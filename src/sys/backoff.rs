//! Back-off for replacing a process that dies (a supervisor's worker, an
//! app instance): doubles up to a cap, and starts over once a process has
//! served for a while.

use std::time::Duration;

pub(crate) struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: Self::FIRST }
    }
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(10);
    /// A process that served this long before dying resets the back-off.
    const STABLE: Duration = Duration::from_secs(30);

    /// The next delay.
    pub(crate) fn take(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        d
    }

    /// A process died after serving `for_`.
    pub(crate) fn served(&mut self, for_: Duration) {
        if for_ > Self::STABLE {
            self.next = Self::FIRST;
        }
    }
}
