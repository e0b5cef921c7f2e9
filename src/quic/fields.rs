//! What RFC 9114 section 4.3 asks of a request's field section that h3
//! 0.0.8 does not check, read from the encoded QPACK section (RFC 9204)
//! before h3 decodes it: h3 keeps the last of a repeated pseudo-header,
//! takes pseudo-headers after regular fields, and ignores `:status` in a
//! request, and the `http::Request` it gives shows none of that. Only the
//! names are looked at, in order; h3 decodes and checks everything else.
//! This server's decoder has no dynamic table (h3 advertises a capacity of
//! 0), so a field names itself literally or by the static table.

/// The first problem of `section` (a HEADERS frame's payload), if any.
pub(crate) fn check(section: &[u8]) -> Result<(), &'static str> {
    let mut r = Reader(section);
    // Required Insert Count, and the sign and Delta Base (RFC 9204 4.5.1).
    r.int(8).ok_or(MALFORMED)?;
    r.int(7).ok_or(MALFORMED)?;
    let mut seen: Vec<Pseudo> = Vec::new();
    let mut regular = false;
    while let Some(&b) = r.0.first() {
        let name = if b & 0x80 != 0 {
            // Indexed field line: 1 T index(6).
            let index = r.int(6).ok_or(MALFORMED)?;
            Name::indexed(b & 0x40 != 0, index)
        } else if b & 0x40 != 0 {
            // Literal with name reference: 01 N T index(4), then the value.
            let index = r.int(4).ok_or(MALFORMED)?;
            r.string(7).ok_or(MALFORMED)?;
            Name::indexed(b & 0x10 != 0, index)
        } else if b & 0x20 != 0 {
            // Literal with literal name: 001 N H length(3), then the value.
            let name = r.string(3).ok_or(MALFORMED)?;
            r.string(7).ok_or(MALFORMED)?;
            Name::literal(&name)
        } else if b & 0x10 != 0 {
            // Indexed with post-base index: the dynamic table.
            r.int(4).ok_or(MALFORMED)?;
            Name::Unknown
        } else {
            // Literal with post-base name reference, then the value.
            r.int(3).ok_or(MALFORMED)?;
            r.string(7).ok_or(MALFORMED)?;
            Name::Unknown
        };
        match name {
            Name::Pseudo(p) => {
                if regular {
                    return Err("a pseudo-header after a regular field");
                }
                if p == Pseudo::Status {
                    return Err(":status in a request");
                }
                if seen.contains(&p) {
                    return Err("a repeated pseudo-header");
                }
                seen.push(p);
            }
            Name::Regular => regular = true,
            Name::Unknown => {}
        }
    }
    Ok(())
}

/// h3 says what is wrong with an undecodable section itself.
const MALFORMED: &str = "an undecodable field section";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pseudo {
    Authority,
    Path,
    Method,
    Scheme,
    Status,
    Protocol,
    /// Another `:name`, which h3 refuses itself.
    Other,
}

enum Name {
    Pseudo(Pseudo),
    Regular,
    /// In the dynamic table, which this decoder does not have (h3 refuses it).
    Unknown,
}

impl Name {
    /// A field named by index, in the static table (`fixed`) or not.
    fn indexed(fixed: bool, index: u64) -> Name {
        if !fixed {
            return Name::Unknown;
        }
        // The pseudo-headers of RFC 9204 Appendix A.
        Name::Pseudo(match index {
            0 => Pseudo::Authority,
            1 => Pseudo::Path,
            15..=21 => Pseudo::Method,
            22 | 23 => Pseudo::Scheme,
            24..=28 | 63..=71 => Pseudo::Status,
            _ => return Name::Regular,
        })
    }

    fn literal(name: &[u8]) -> Name {
        if !name.starts_with(b":") {
            return Name::Regular;
        }
        Name::Pseudo(match name {
            b":authority" => Pseudo::Authority,
            b":path" => Pseudo::Path,
            b":method" => Pseudo::Method,
            b":scheme" => Pseudo::Scheme,
            b":status" => Pseudo::Status,
            b":protocol" => Pseudo::Protocol,
            _ => Pseudo::Other,
        })
    }
}

/// The section, consumed from the front.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    /// An integer with an `n`-bit prefix in the first byte (RFC 7541 5.1);
    /// the first byte's other bits are the caller's.
    fn int(&mut self, n: u32) -> Option<u64> {
        let (&first, mut rest) = self.0.split_first()?;
        let max = (1u64 << n) - 1;
        let mut value = u64::from(first) & max;
        if value == max {
            let mut shift = 0;
            loop {
                let (&b, more) = rest.split_first()?;
                rest = more;
                value = value.checked_add(u64::from(b & 0x7f).checked_shl(shift)?)?;
                shift += 7;
                if b & 0x80 == 0 {
                    break;
                }
                if shift > 56 {
                    return None;
                }
            }
        }
        self.0 = rest;
        Some(value)
    }

    /// A string whose length has an `n`-bit prefix, with the Huffman flag
    /// just above it; decoded.
    fn string(&mut self, n: u32) -> Option<Vec<u8>> {
        let huffman = self.0.first()? & (1 << n) != 0;
        let len = usize::try_from(self.int(n)?).ok()?;
        if len > self.0.len() {
            return None;
        }
        let (raw, rest) = self.0.split_at(len);
        self.0 = rest;
        if !huffman {
            return Some(raw.to_vec());
        }
        let mut out = Vec::with_capacity(len * 2);
        httlib_huffman::decode(raw, &mut out, httlib_huffman::DecoderSpeed::FourBits).ok()?;
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::check;

    /// A section with no dynamic table references: the two zero bytes, then `lines`.
    fn section(lines: &[&[u8]]) -> Vec<u8> {
        let mut s = vec![0, 0];
        for l in lines {
            s.extend_from_slice(l);
        }
        s
    }

    /// A literal field line with a literal, plain name (shorter than 134
    /// bytes: a 3-bit prefix and at most one more byte).
    fn literal(name: &str, value: &str) -> Vec<u8> {
        let mut l = if name.len() < 7 {
            vec![0x20 | name.len() as u8]
        } else {
            vec![0x20 | 7, (name.len() - 7) as u8]
        };
        l.extend_from_slice(name.as_bytes());
        l.push(value.len() as u8);
        l.extend_from_slice(value.as_bytes());
        l
    }

    #[test]
    fn pseudo_headers_come_first_once_and_never_status() {
        // :method GET (17), :scheme https (23), :path / (1), :authority (0) with a value.
        let get = [0xc0 | 17, 0xc0 | 23, 0xc0 | 1];
        let authority = [0x50, 1, b'a'];
        let ok = section(&[&get, &authority, &literal("x-a", "b")]);
        assert_eq!(check(&ok), Ok(()));
        let twice = section(&[&get, &authority, &[0xc0 | 1]]);
        assert_eq!(check(&twice), Err("a repeated pseudo-header"));
        let late = section(&[&get, &literal("x-a", "b"), &authority]);
        assert_eq!(check(&late), Err("a pseudo-header after a regular field"));
        let status = section(&[&get, &authority, &[0xc0 | 25]]);
        assert_eq!(check(&status), Err(":status in a request"));
        let literal_status = section(&[&get, &authority, &literal(":status", "200")]);
        assert_eq!(check(&literal_status), Err(":status in a request"));
        // ":path" Huffman-coded (RFC 7541 Appendix B): a repeated one still counts.
        let huffman_path = [0x28 | 4, 0xb9, 0x58, 0xd3, 0x3f, 1, b'/'];
        let twice = section(&[&get, &authority, &huffman_path]);
        assert_eq!(check(&twice), Err("a repeated pseudo-header"));
        assert_eq!(check(&[0x00]), Err("an undecodable field section"));
        assert_eq!(
            check(&section(&[&[0x2f, 0xff]])),
            Err("an undecodable field section")
        );
    }
}
