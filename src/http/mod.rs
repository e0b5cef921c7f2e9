//! What a request gets: the routes and their actions (`files`, `proxy`,
//! `tunnel`, and those in `routes`), and the service that runs them for a
//! connection.

pub(crate) mod files;
pub(crate) mod host;
pub(crate) mod proxy;
pub(crate) mod routes;
pub(crate) mod service;
pub(crate) mod tunnel;
