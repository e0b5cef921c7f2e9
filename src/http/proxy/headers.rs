//! The headers a proxied request and response lose and gain: hop-by-hop
//! fields removed both ways (RFC 9110 section 7.6.1), the forwarding fields
//! set.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Request;

use crate::process::context::Peer;
use crate::wire::body::has_token;

/// Headers that describe one hop, not the message (RFC 9110 7.6.1).
pub(super) const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers, and those the `Connection` header names.
/// `Upgrade` (and `Connection: upgrade`) are kept when `upgrade` is set.
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // `Connection: keep-alive` and `close` (nearly every message that has
    // the field) name nothing else to remove: no allocation for them.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|n| !n.eq_ignore_ascii_case("keep-alive") && !n.eq_ignore_ascii_case("close"))
        .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
        .filter(|n| !(upgrade && n == header::UPGRADE))
        .collect();
    for n in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(n);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// Does the request ask for trailers (`TE: trailers`, as gRPC clients
/// send)? The field is hop-by-hop, and sent on as only that.
pub(super) fn wants_trailers(h: &HeaderMap) -> bool {
    has_token(h, header::TE, "trailers")
}

/// A WebSocket upgrade: the only upgrade that is tunnelled. Any other
/// (`h2c` above all: a tunnel would carry requests past routing) is
/// forwarded as a plain request, its `Upgrade` removed with the hop-by-hop
/// headers.
pub(super) fn is_websocket<B>(req: &Request<B>) -> bool {
    let h = req.headers();
    has_token(h, header::CONNECTION, "upgrade") && has_token(h, header::UPGRADE, "websocket")
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Sets `X-Forwarded-For` (appended), `-Proto`, `-Host` and `Forwarded`.
/// Each value is written once into a buffer the header then owns (this runs
/// for every proxied request).
pub(super) fn set_forwarded(h: &mut HeaderMap, peer: Peer, host: Option<&HeaderValue>) {
    use std::fmt::Write;
    let ip = peer.addr.ip();
    let proto = if peer.tls { "https" } else { "http" };
    let mut xff = String::with_capacity(64);
    if let Some(prev) = h.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        xff.push_str(prev);
        xff.push_str(", ");
    }
    push_ip(&mut xff, ip);
    if let Some(v) = owned(xff) {
        h.insert(X_FORWARDED_FOR, v);
    }
    h.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    if let Some(v) = host.cloned() {
        h.insert(X_FORWARDED_HOST, v);
    }
    let mut fwd = String::with_capacity(96);
    if let Some(prev) = h.get(header::FORWARDED).and_then(|v| v.to_str().ok()) {
        fwd.push_str(prev);
        fwd.push_str(", ");
    }
    // RFC 7239: an IPv6 address is quoted and bracketed.
    let _ = match ip {
        std::net::IpAddr::V6(ip) => write!(fwd, "for=\"[{ip}]\";proto={proto}"),
        std::net::IpAddr::V4(_) => {
            fwd.push_str("for=");
            push_ip(&mut fwd, ip);
            write!(fwd, ";proto={proto}")
        }
    };
    if let Some(host) = host.and_then(|v| v.to_str().ok()) {
        // A quoted-string (RFC 7239 section 4): `"` and `\` escaped, so a
        // host can never end the value and add fields of its own.
        fwd.push_str(";host=\"");
        for c in host.chars() {
            if c == '"' || c == '\\' {
                fwd.push('\\');
            }
            fwd.push(c);
        }
        fwd.push('"');
    }
    if let Some(v) = owned(fwd) {
        h.insert(header::FORWARDED, v);
    }
}

/// Writes `ip`; an IPv4 address by hand (its `Display` goes through the
/// formatter's padding machinery, measurable on this path).
fn push_ip(out: &mut String, ip: std::net::IpAddr) {
    use std::fmt::Write;
    match ip {
        std::net::IpAddr::V4(v4) => {
            for (i, o) in v4.octets().iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                let o = *o;
                if o >= 100 {
                    out.push(char::from(b'0' + o / 100));
                }
                if o >= 10 {
                    out.push(char::from(b'0' + (o / 10) % 10));
                }
                out.push(char::from(b'0' + o % 10));
            }
        }
        std::net::IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// A header value that takes `s` as it is (no copy), if it is valid.
fn owned(s: String) -> Option<HeaderValue> {
    HeaderValue::from_maybe_shared(bytes::Bytes::from(s)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_both_ways() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        let mut plain = h.clone();
        strip_hop_by_hop(&mut plain, false);
        assert_eq!(plain.len(), 1, "{plain:?}");
        assert!(plain.contains_key("x-kept"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
        assert!(!h.contains_key("x-private"));
    }

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for ip in [
            "0.0.0.0",
            "10.0.9.255",
            "127.0.0.1",
            "192.168.100.7",
            "::1",
            "fe80::1",
        ] {
            let mut s = String::new();
            push_ip(&mut s, ip.parse().unwrap());
            assert_eq!(s, ip);
        }
    }

    #[test]
    fn a_long_chain_of_proxies_is_kept() {
        let mut h = HeaderMap::new();
        let chain = (0..40)
            .map(|i| format!("10.0.0.{i}"))
            .collect::<Vec<_>>()
            .join(", ");
        h.insert("x-forwarded-for", HeaderValue::from_str(&chain).unwrap());
        let peer = Peer {
            addr: "127.0.0.1:5000".parse().unwrap(),
            tls: false,
        };
        set_forwarded(&mut h, peer, None);
        assert_eq!(h["x-forwarded-for"], format!("{chain}, 127.0.0.1").as_str());
    }

    #[test]
    fn forwarding_headers() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        let peer = Peer {
            addr: "127.0.0.1:5000".parse().unwrap(),
            tls: true,
        };
        set_forwarded(&mut h, peer, Some(&HeaderValue::from_static("example.com")));
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "example.com");
        assert_eq!(
            h["forwarded"],
            "for=127.0.0.1;proto=https;host=\"example.com\""
        );
        // A host can never close the quoted string and add fields.
        let mut h = HeaderMap::new();
        let sneaky = HeaderValue::from_static("a\";for=evil\\");
        set_forwarded(&mut h, peer, Some(&sneaky));
        assert_eq!(
            h["forwarded"],
            "for=127.0.0.1;proto=https;host=\"a\\\";for=evil\\\\\""
        );
    }
}
