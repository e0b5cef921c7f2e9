//! TCP connections, plain and TLS, HTTP/1.1 and HTTP/2: the accept loops
//! (`accept`), and each connection from its first byte to its lingering
//! close (`connection`).

pub(crate) mod accept;
mod activity;
pub(crate) mod connection;
mod exchange;
pub(crate) mod forward;
mod inline;
mod linger;
