//! The access log: one line per request, JSON or the combined format.
//!
//! Written off the request path. A finished request formats its line into a
//! buffer of the serving thread it ran on (a mutex no other thread takes
//! but the flusher, once a second); one flusher thread per process writes
//! the buffers out at least every second and at exit. A disk that is slow
//! never blocks a response; one that is full or failing loses lines, which
//! are counted (`dropped`, in `status`), never serving. Every generation
//! opens the file with `O_APPEND` and writes whole lines per `write(2)`, so
//! the lines of a draining generation and of the new one interleave by
//! line, never within one. SIGUSR1 reopens the file (logrotate's
//! `postrotate`).

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use crate::config::{AccessLogConfig, AccessLogFormat};
use crate::observe::logging::Chain;

/// A thread's buffer holds at most this much; lines beyond it are dropped
/// (and counted) until the next flush.
const BUFFER_MAX: usize = 4 << 20;
/// How often buffers are written out.
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// The largest single write: whole lines, so that no line is split.
const WRITE_MAX: usize = 64 << 10;

pub(crate) struct AccessLog {
    config: AccessLogConfig,
    /// One per serving thread.
    buffers: Vec<Mutex<Vec<u8>>>,
    file: Mutex<Option<std::fs::File>>,
    /// Lines lost to a full buffer or a failed write.
    pub(crate) dropped: AtomicU64,
    pid: u32,
    generation: u64,
}

/// What is logged of a request, gathered while it runs.
pub(crate) struct Entry {
    pub(crate) started: Instant,
    pub(crate) method: http::Method,
    pub(crate) target: String,
    pub(crate) version: http::Version,
    pub(crate) referer: Option<http::HeaderValue>,
    pub(crate) user_agent: Option<http::HeaderValue>,
    pub(crate) status: u16,
    pub(crate) bytes: u64,
}

impl Entry {
    /// The entry of `req`, before it is answered.
    pub(crate) fn of<B>(req: &http::Request<B>, version: http::Version) -> Entry {
        Entry {
            started: Instant::now(),
            method: req.method().clone(),
            target: req
                .uri()
                .path_and_query()
                .map_or_else(|| req.uri().to_string(), |p| p.as_str().to_string()),
            version,
            referer: req.headers().get(http::header::REFERER).cloned(),
            user_agent: req.headers().get(http::header::USER_AGENT).cloned(),
            // Until a response exists: the client went away (nginx's 499).
            status: 499,
            bytes: 0,
        }
    }
}

/// The TLS side of a connection, for its requests' lines.
pub(crate) struct TlsInfo {
    pub(crate) version: &'static str,
    pub(crate) sni: Option<Box<str>>,
}

/// Every access log of this process, for the flusher, SIGUSR1 and exit.
struct Registry {
    logs: Mutex<Vec<Weak<AccessLog>>>,
    /// Set to ask the flusher to reopen the files.
    reopen: AtomicBool,
    wake: Condvar,
    woken: Mutex<bool>,
}

fn registry() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(|| Registry {
        logs: Mutex::new(Vec::new()),
        reopen: AtomicBool::new(false),
        wake: Condvar::new(),
        woken: Mutex::new(false),
    })
}

impl AccessLog {
    /// Opens the log for `threads` serving threads, and starts the flusher
    /// if it is the process's first.
    pub(crate) fn open(
        config: &AccessLogConfig,
        threads: usize,
        pid: u32,
        generation: u64,
    ) -> Result<Arc<AccessLog>, AccessLogError> {
        let file = match &config.path {
            Some(p) => Some(open_append(p)?),
            None => None,
        };
        let log = Arc::new(AccessLog {
            config: config.clone(),
            buffers: (0..threads.max(1))
                .map(|_| Mutex::new(Vec::new()))
                .collect(),
            file: Mutex::new(file),
            dropped: AtomicU64::new(0),
            pid,
            generation,
        });
        let r = registry();
        let mut logs = r.logs.lock().unwrap_or_else(|p| p.into_inner());
        if logs.is_empty() {
            std::thread::Builder::new()
                .name("gracesrv-log".into())
                .spawn(flusher)
                .map_err(AccessLogError::Thread)?;
        }
        logs.push(Arc::downgrade(&log));
        Ok(log)
    }

    /// Records a finished request, served on thread `thread`.
    pub(crate) fn record(
        &self,
        thread: usize,
        listener: &str,
        remote: SocketAddr,
        tls: Option<&TlsInfo>,
        e: &Entry,
    ) {
        let mut line = Vec::with_capacity(256);
        match self.config.format {
            AccessLogFormat::Json => self.json(&mut line, listener, remote, tls, e),
            AccessLogFormat::Combined => combined(&mut line, remote, e),
        }
        let Some(buffer) = self.buffers.get(thread % self.buffers.len()) else {
            return;
        };
        let mut b = buffer.lock().unwrap_or_else(|p| p.into_inner());
        if b.len() + line.len() > BUFFER_MAX {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        b.extend_from_slice(&line);
    }

    fn json(
        &self,
        out: &mut Vec<u8>,
        listener: &str,
        remote: SocketAddr,
        tls: Option<&TlsInfo>,
        e: &Entry,
    ) {
        let time = time::OffsetDateTime::now_utc();
        let time = time
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let _ = write!(out, r#"{{"time":"{time}","listener":"#);
        json_str(out, listener);
        let _ = write!(out, r#","remote":"{remote}","method":"#);
        json_str(out, e.method.as_str());
        out.extend_from_slice(br#","target":"#);
        json_str(out, &e.target);
        let _ = write!(
            out,
            r#","protocol":"{:?}","status":{},"bytes":{},"duration_ms":{:.3},"tls_version":"#,
            e.version,
            e.status,
            e.bytes,
            e.started.elapsed().as_secs_f64() * 1000.0
        );
        match tls {
            Some(t) => {
                json_str(out, t.version);
                out.extend_from_slice(br#","sni":"#);
                match &t.sni {
                    Some(s) => json_str(out, s),
                    None => out.extend_from_slice(b"null"),
                }
            }
            None => out.extend_from_slice(br#"null,"sni":null"#),
        }
        let _ = writeln!(
            out,
            r#","pid":{},"generation":{}}}"#,
            self.pid, self.generation
        );
    }

    /// Writes the buffers out (and reopens the file first if asked).
    fn flush(&self, reopen: bool) {
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if reopen {
            if let Some(p) = &self.config.path {
                match open_append(p) {
                    Ok(f) => *file = Some(f),
                    Err(e) => tracing::warn!("{e}", e = Chain(&e)),
                }
            }
        }
        for buffer in &self.buffers {
            let data = std::mem::take(&mut *buffer.lock().unwrap_or_else(|p| p.into_inner()));
            if data.is_empty() {
                continue;
            }
            let result = match file.as_mut() {
                Some(f) => write_lines(f, &data),
                None => write_lines(&mut std::io::stderr().lock(), &data),
            };
            if let Err((unwritten, e)) = result {
                let lost = data[unwritten..].iter().filter(|b| **b == b'\n').count();
                self.dropped.fetch_add(lost as u64, Ordering::Relaxed);
                static WARNED: crate::observe::logging::Throttle =
                    crate::observe::logging::Throttle::new();
                if let Some(suppressed) = WARNED.allow() {
                    tracing::warn!(
                        lost,
                        suppressed,
                        "access log: cannot write: {e}",
                        e = Chain(&e)
                    );
                }
            }
        }
    }
}

/// Writes `data` (whole lines) in writes of whole lines; on failure, where
/// the unwritten part starts.
fn write_lines(w: &mut impl Write, data: &[u8]) -> Result<(), (usize, std::io::Error)> {
    let mut at = 0;
    while at < data.len() {
        let end = if data.len() - at <= WRITE_MAX {
            data.len()
        } else {
            data[at..at + WRITE_MAX]
                .iter()
                .rposition(|b| *b == b'\n')
                .map_or(data.len(), |i| at + i + 1)
        };
        w.write_all(&data[at..end]).map_err(|e| (at, e))?;
        at = end;
    }
    Ok(())
}

/// Why an access log cannot be written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AccessLogError {
    #[error("access log {}: {source}", path.display())]
    Open {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("access log: cannot start its thread: {0}")]
    Thread(#[source] std::io::Error),
}

fn open_append(path: &Path) -> Result<std::fs::File, AccessLogError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
        .map_err(|source| AccessLogError::Open {
            path: path.to_path_buf(),
            source,
        })
}

/// The flusher: every second, or when woken (SIGUSR1, exit).
fn flusher() {
    let r = registry();
    loop {
        {
            let woken = r.woken.lock().unwrap_or_else(|p| p.into_inner());
            let (mut woken, _) = r
                .wake
                .wait_timeout_while(woken, FLUSH_EVERY, |w| !*w)
                .unwrap_or_else(|p| p.into_inner());
            *woken = false;
        }
        flush_all_now(r.reopen.swap(false, Ordering::AcqRel));
    }
}

fn flush_all_now(reopen: bool) {
    let logs: Vec<Arc<AccessLog>> = {
        let mut logs = registry().logs.lock().unwrap_or_else(|p| p.into_inner());
        logs.retain(|l| l.strong_count() > 0);
        logs.iter().filter_map(Weak::upgrade).collect()
    };
    for log in logs {
        log.flush(reopen);
    }
}

/// SIGUSR1: the flusher reopens every file (after a rotation renamed it).
pub(crate) fn reopen_all() {
    let r = registry();
    r.reopen.store(true, Ordering::Release);
    *r.woken.lock().unwrap_or_else(|p| p.into_inner()) = true;
    r.wake.notify_all();
}

/// Writes out every buffer now (at exit).
pub(crate) fn flush_all() {
    flush_all_now(false);
}

/// A JSON string: quoted, with `"`, `\` and control characters escaped.
fn json_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out.push(b'"');
}

/// `127.0.0.1 - - [26/Nov/2026:16:50:00 +0000] "GET /x HTTP/1.1" 200 12 "referer" "agent"`
fn combined(out: &mut Vec<u8>, remote: SocketAddr, e: &Entry) {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let t = time::OffsetDateTime::now_utc();
    let _ = write!(
        out,
        "{} - - [{:02}/{}/{}:{:02}:{:02}:{:02} +0000] \"",
        remote.ip(),
        t.day(),
        MONTHS[usize::from(u8::from(t.month())) - 1],
        t.year(),
        t.hour(),
        t.minute(),
        t.second()
    );
    quoted_part(out, e.method.as_str());
    out.push(b' ');
    quoted_part(out, &e.target);
    let _ = write!(out, " {:?}\" {} {} \"", e.version, e.status, e.bytes);
    header_part(out, e.referer.as_ref());
    out.extend_from_slice(b"\" \"");
    header_part(out, e.user_agent.as_ref());
    out.extend_from_slice(b"\"\n");
}

/// Text inside a combined-format quoted field: `"` and `\` escaped, and
/// bytes outside printable ASCII as `\xHH` (as nginx does).
fn quoted_part(out: &mut Vec<u8>, s: &str) {
    for b in s.bytes() {
        match b {
            b'"' | b'\\' => {
                out.push(b'\\');
                out.push(b);
            }
            0x20..=0x7e => out.push(b),
            _ => {
                let _ = write!(out, "\\x{b:02X}");
            }
        }
    }
}

fn header_part(out: &mut Vec<u8>, v: Option<&http::HeaderValue>) {
    match v {
        Some(v) => quoted_part(out, &String::from_utf8_lossy(v.as_bytes())),
        None => out.push(b'-'),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        Entry {
            started: Instant::now(),
            method: http::Method::GET,
            target: "/a?\"b\"".into(),
            version: http::Version::HTTP_11,
            referer: None,
            user_agent: Some(http::HeaderValue::from_static("curl/8")),
            status: 200,
            bytes: 12,
        }
    }

    #[test]
    fn lines_in_both_formats() {
        let log = AccessLog {
            config: AccessLogConfig {
                path: None,
                format: AccessLogFormat::Json,
            },
            buffers: vec![Mutex::new(Vec::new())],
            file: Mutex::new(None),
            dropped: AtomicU64::new(0),
            pid: 7,
            generation: 2,
        };
        let mut out = Vec::new();
        let remote: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let tls = TlsInfo {
            version: "TLSv1.3",
            sni: Some("a.test".into()),
        };
        log.json(&mut out, "web\"x", remote, Some(&tls), &entry());
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["listener"], "web\"x");
        assert_eq!(v["target"], "/a?\"b\"");
        assert_eq!(v["protocol"], "HTTP/1.1");
        assert_eq!(v["status"], 200);
        assert_eq!(v["sni"], "a.test");
        assert_eq!(v["pid"], 7);
        assert!(out.ends_with(b"}\n"));
        let mut out = Vec::new();
        combined(&mut out, remote, &entry());
        let line = String::from_utf8(out).unwrap();
        assert!(line.starts_with("127.0.0.1 - - ["), "{line}");
        assert!(
            line.ends_with("] \"GET /a?\\\"b\\\" HTTP/1.1\" 200 12 \"-\" \"curl/8\"\n"),
            "{line}"
        );
        let mut w = Vec::new();
        let data = b"one\ntwo\n".repeat(20000);
        write_lines(&mut w, &data).unwrap();
        assert_eq!(w, data);
    }
}
