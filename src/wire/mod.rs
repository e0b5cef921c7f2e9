//! HTTP as it crosses the wire, under every layer that speaks it: the body
//! type, request heads checked before hyper parses them, the HTTP/2 frames
//! a connection follows for its drain, and the connection pools to
//! upstreams.

pub(crate) mod body;
pub(crate) mod h2frames;
pub(crate) mod heads;
pub(crate) mod upstream;
