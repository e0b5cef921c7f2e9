//! The path routes match.

use std::borrow::Cow;

/// The path routes match (RFC 3986 section 6.2.2): escapes of unreserved
/// characters decoded, other escapes upper-cased, dot segments removed.
/// Borrowed when there is nothing to change (nearly always). `Err` for what
/// no route may see: an encoded `/`, `\` or NUL (they would change what
/// the path means to whoever decodes it next), a malformed escape, or dot
/// segments that climb above the root.
pub(super) fn normalize(path: &str) -> Result<Cow<'_, str>, ()> {
    if !path.contains('%') && !path.contains("/.") {
        return Ok(Cow::Borrowed(path));
    }
    let b = path.as_bytes();
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'%' {
            decoded.push(b[i] as char);
            i += 1;
            continue;
        }
        let hex = b.get(i + 1..i + 3).ok_or(())?;
        let hex = std::str::from_utf8(hex).map_err(|_| ())?;
        let byte = u8::from_str_radix(hex, 16).map_err(|_| ())?;
        match byte {
            b'/' | b'\\' | 0 => return Err(()),
            c if c.is_ascii_alphanumeric() || b"-._~".contains(&c) => decoded.push(c as char),
            c => decoded.push_str(&format!("%{c:02X}")),
        }
        i += 3;
    }
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded.split('/').skip(1).collect();
    for (n, seg) in segments.iter().enumerate() {
        let last = n + 1 == segments.len();
        match *seg {
            "." => {}
            ".." => {
                out.pop().ok_or(())?;
            }
            s => out.push(s),
        }
        // A trailing `.` or `..` leaves a directory: keep its slash.
        if last && (*seg == "." || *seg == "..") {
            out.push("");
        }
    }
    let normal = format!("/{}", out.join("/"));
    Ok(if normal == path {
        Cow::Borrowed(path)
    } else {
        Cow::Owned(normal)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalised_for_routing() {
        let n = |p| normalize(p).map(|c| c.into_owned());
        assert_eq!(n("/api/x"), Ok("/api/x".into()));
        assert!(matches!(normalize("/api/x"), Ok(Cow::Borrowed(_))));
        assert_eq!(n("/api/../admin"), Ok("/admin".into()));
        assert_eq!(n("/api/%2e%2e/admin"), Ok("/admin".into()));
        assert_eq!(n("/api/./a/./b"), Ok("/api/a/b".into()));
        assert_eq!(n("/a/b/.."), Ok("/a/".into()));
        assert_eq!(n("/%7euser/%41"), Ok("/~user/A".into()));
        assert_eq!(n("/a%20b/%c3%a9"), Ok("/a%20b/%C3%A9".into()));
        assert_eq!(n("/.well-known/x"), Ok("/.well-known/x".into()));
        assert_eq!(n("/api/a%2fb"), Err(()));
        assert_eq!(n("/api/a%00"), Err(()));
        assert_eq!(n("/api/a%5cb"), Err(()));
        assert_eq!(n("/../etc"), Err(()));
        assert_eq!(n("/a/%zz"), Err(()));
    }
}
