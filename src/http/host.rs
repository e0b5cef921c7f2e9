//! The request's host, checked before anything uses it.

use http::{header, HeaderValue, Request, Version};

/// The request's host, checked before anything uses it (RFC 9112 section
/// 3.2, RFC 9113 section 8.3.1): an HTTP/1.1 request has exactly one
/// `Host`, every host is a valid `host[:port]`, an absolute-form target's
/// authority wins over `Host` (which is set to it, so every later reader
/// sees one host), and an HTTP/2 `Host` agrees with `:authority`. Only a
/// host that passed here reaches a template, a header or a log line.
pub(crate) fn check_host<B>(req: &mut Request<B>) -> Result<(), &'static str> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err("more than one Host");
    }
    if host.is_some_and(|h| !valid_host(h.as_bytes())) {
        return Err("invalid Host");
    }
    let authority = req.uri().authority().map(|a| a.as_str());
    if authority.is_some_and(|a| !valid_host(a.as_bytes())) {
        return Err("invalid authority");
    }
    match (req.version(), authority) {
        (Version::HTTP_2, Some(a))
            if host.is_some_and(|h| !h.as_bytes().eq_ignore_ascii_case(a.as_bytes())) =>
        {
            return Err("Host differs from :authority");
        }
        (Version::HTTP_2, _) => {}
        (_, Some(a)) => {
            // Valid above, so a valid header value.
            if let Ok(v) = HeaderValue::from_str(a) {
                req.headers_mut().insert(header::HOST, v);
            }
        }
        (Version::HTTP_11, None) if host.is_none() => return Err("no Host"),
        _ => {}
    }
    Ok(())
}

/// The bytes a reg-name may hold besides percent-escapes (RFC 3986:
/// unreserved and sub-delims), looked up rather than searched for: every
/// request's host passes here.
const REG_NAME: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric();
        b += 1;
    }
    let other = b"-._~!$&'()*+,;=";
    let mut i = 0;
    while i < other.len() {
        t[other[i] as usize] = true;
        i += 1;
    }
    t
};

/// `host[:port]` as RFC 3986 has it: an IP literal in brackets, or a
/// reg-name (unreserved, sub-delims, percent-escapes); a port of digits.
fn valid_host(h: &[u8]) -> bool {
    let (host, port) = if h.first() == Some(&b'[') {
        let Some(end) = h.iter().position(|&b| b == b']') else {
            return false;
        };
        let inner = &h[1..end];
        if inner.is_empty()
            || !inner
                .iter()
                .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        {
            return false;
        }
        match &h[end + 1..] {
            [] => (&h[..=end], None),
            [b':', port @ ..] => (&h[..=end], Some(port)),
            _ => return false,
        }
    } else {
        match memchr::memrchr(b':', h) {
            Some(i) => (&h[..i], Some(&h[i + 1..])),
            None => (h, None),
        }
    };
    if port.is_some_and(|p| p.len() > 5 || !p.iter().all(u8::is_ascii_digit)) {
        return false;
    }
    if host.first() == Some(&b'[') {
        return true;
    }
    let mut i = 0;
    while i < host.len() {
        let b = host[i];
        if b == b'%' {
            if !host
                .get(i + 1..i + 3)
                .is_some_and(|x| x.iter().all(u8::is_ascii_hexdigit))
            {
                return false;
            }
            i += 3;
            continue;
        }
        if !REG_NAME[b as usize] {
            return false;
        }
        i += 1;
    }
    !host.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_checked() {
        for good in [
            "example.com",
            "example.com:8443",
            "127.0.0.1:80",
            "[::1]:8443",
            "[::1]",
            "a_b-c.example",
            "xn--bcher-kva.example",
        ] {
            assert!(valid_host(good.as_bytes()), "{good}");
        }
        for bad in [
            "",
            "a b",
            "a/b",
            "evil.example/phish?x=",
            "a:b",
            "user@host",
            "[::1",
            "[zz]",
            "[::1]x",
            "host:123456",
            "a\"b",
            "%zz",
        ] {
            assert!(!valid_host(bad.as_bytes()), "{bad}");
        }
        let req = |v: Version, uri: &str, hosts: &[&str]| {
            let mut b = Request::builder().version(v).uri(uri);
            for h in hosts {
                b = b.header("host", *h);
            }
            b.body(()).unwrap()
        };
        assert!(check_host(&mut req(Version::HTTP_11, "/", &["a"])).is_ok());
        assert!(check_host(&mut req(Version::HTTP_11, "/", &[])).is_err());
        assert!(check_host(&mut req(Version::HTTP_11, "/", &["a", "b"])).is_err());
        assert!(check_host(&mut req(Version::HTTP_10, "/", &[])).is_ok());
        let mut abs = req(Version::HTTP_11, "http://a.example/p", &["b.example"]);
        assert!(check_host(&mut abs).is_ok());
        assert_eq!(
            abs.headers()["host"],
            "a.example",
            "the target's authority wins"
        );
        assert!(check_host(&mut req(Version::HTTP_2, "https://a/", &["a"])).is_ok());
        assert!(check_host(&mut req(Version::HTTP_2, "https://a/", &["b"])).is_err());
    }
}
