//! What every connection and request of a serving process shares: its
//! facts and counters, each listener's context and the client's address
//! (`context`), the drain, and the health of proxy upstreams (`upstreams`).

pub(crate) mod context;
pub(crate) mod drain;
pub(crate) mod upstreams;
