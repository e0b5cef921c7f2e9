//! HTTP as it crosses the wire, under every layer that speaks it: the body
//! type, request heads checked before hyper parses them, the HTTP/2 frames
//! a connection follows for its drain, and the connection pools to
//! upstreams.

pub mod body;
pub mod h2frames;
pub mod heads;
pub mod upstream;
