//! What every connection and request of a serving process shares: its
//! facts and counters, each listener's context and the client's address
//! (`context`), and the drain.

pub(crate) mod context;
pub(crate) mod drain;
