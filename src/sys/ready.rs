//! What a new process says to the one that started it, a line each on its
//! ready pipe: the one vocabulary of the new process's side
//! (`control::successor`), the old one's (`control::spawn`), the forked
//! child whose exec failed (`handoff`), and an app instance's start.

/// One line on a ready pipe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Said {
    /// `READY`: serving; the old process may drain.
    Ready,
    /// `DONE`: this generation ends on purpose (replaced, or stopping), so
    /// the one before it must not take over when it exits.
    Done,
    /// `ERROR reason`: the start failed, and why (one line).
    Error(String),
}

/// How a forked child whose exec failed starts its line, the errno after
/// it in decimal: written with async-signal-safe calls only (`handoff`).
pub(crate) const EXEC_ERROR: &[u8] = b"ERROR exec:";

impl Said {
    /// The line, newline included.
    pub(crate) fn line(&self) -> String {
        match self {
            Said::Ready => "READY\n".into(),
            Said::Done => "DONE\n".into(),
            Said::Error(why) => format!("ERROR {}\n", why.replace('\n', " ")),
        }
    }

    /// A line read (without its newline); `None` if it is none of these.
    pub(crate) fn parse(line: &str) -> Option<Said> {
        match line.trim_end() {
            "READY" => Some(Said::Ready),
            "DONE" => Some(Said::Done),
            l => l.strip_prefix("ERROR ").map(|why| Said::Error(why.into())),
        }
    }

    /// The errno of a failed exec (`ERROR exec:<errno>`), if this is one.
    pub(crate) fn exec_errno(&self) -> Option<i32> {
        let prefix = std::str::from_utf8(&EXEC_ERROR[b"ERROR ".len()..]).ok()?;
        match self {
            Said::Error(why) => why.strip_prefix(prefix)?.trim().parse().ok(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip() {
        for said in [Said::Ready, Said::Done, Said::Error("bad config: x".into())] {
            let line = said.line();
            assert!(line.ends_with('\n'));
            assert_eq!(Said::parse(line.trim_end_matches('\n')), Some(said));
        }
        assert_eq!(Said::Error("a\nb".into()).line(), "ERROR a b\n");
        assert_eq!(Said::parse("HELLO"), None);
        let exec = format!("{}13", std::str::from_utf8(EXEC_ERROR).unwrap());
        assert_eq!(Said::parse(&exec).unwrap().exec_errno(), Some(13));
        assert_eq!(Said::Ready.exec_errno(), None);
    }
}
