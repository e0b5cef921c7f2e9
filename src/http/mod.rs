//! What a request gets: the routes and their actions (`files`, `proxy`,
//! `tunnel`, and those in `routes`), and the service that runs them for a
//! connection.

pub mod files;
pub mod host;
pub mod proxy;
pub mod routes;
pub mod service;
pub mod tunnel;
