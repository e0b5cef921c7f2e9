//! A process identified by its pid and its start time, so that a pid reused
//! by an unrelated process is never taken for it (old generations, the
//! supervisor's children).

/// A generation (or any process): pid and start time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Gen {
    pub(crate) pid: i32,
    /// Start time in clock ticks since boot (/proc/PID/stat, field 22).
    pub(crate) start: u64,
}

/// The start time of `pid`, if it runs (a zombie does not).
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields follow the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    if fields.first() == Some(&"Z") {
        return None;
    }
    // Field 22 overall is the 20th after the command name.
    fields.get(19)?.parse().ok()
}

impl Gen {
    /// Process `pid`, if it runs.
    pub(crate) fn of(pid: i32) -> Option<Gen> {
        start_time(pid).map(|start| Gen { pid, start })
    }

    /// This process.
    pub(crate) fn current() -> Option<Gen> {
        Gen::of(std::process::id() as i32)
    }

    pub(crate) fn alive(&self) -> bool {
        start_time(self.pid) == Some(self.start)
    }
}
