//! What a request gets: the routes and their actions (`files`, `proxy`,
//! `tunnel`, and those in `routes`), who may use them (`access`) and how often (`limit`), what they
//! add to their answers (`decorate`) and how they are compressed
//! (`compress`), and the service that runs them for a
//! connection.

pub(crate) mod access;
pub(crate) mod compress;
pub(crate) mod decorate;
pub(crate) mod files;
pub(crate) mod host;
pub(crate) mod limit;
pub(crate) mod proxy;
pub(crate) mod routes;
pub(crate) mod service;
pub(crate) mod tunnel;
