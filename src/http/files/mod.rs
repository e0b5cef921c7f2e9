//! The `static` route: files under a root, never outside it, with the
//! validators and conditional requests of RFC 9110 sections 8.8 and 13.
//!
//! tower-http's ServeFile reads the file (content type, streaming, a single
//! range) but sends no ETag and ignores `If-Range`, so a resumed download
//! of a changed file would be spliced from two versions. The conditions
//! are therefore evaluated here, in the order section 13.2.2 gives, and
//! ServeFile only sees a plain GET, or a GET of one range that still
//! applies. A request for several ranges gets the whole file (200), which
//! RFC 9110 section 14.2 allows; multipart/byteranges is not served.
//!
//! With `compress`, a file with a precompressed sibling in the chosen
//! encoding (`page.html.br`, `.zst`, `.gz`) at least as new as it is served
//! from the sibling, as the file in that encoding (see `compress`).

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use tower::ServiceExt;

use crate::config::Encoding;
use crate::wire::body::{full, text, Body};

mod cache;

fn empty(status: StatusCode) -> Response<Body> {
    let mut res = Response::new(full(Bytes::new()));
    *res.status_mut() = status;
    res
}

/// The file under `root` that `rel` (the path after the route prefix, still
/// percent-encoded) names, decoded and canonical, or `None` if it would
/// leave `root`: `..`, encoded slashes, NUL bytes, and symlinks that
/// resolve outside are all refused. Blocking: call it off the serving
/// threads.
pub(crate) fn resolve_static(root: &Path, rel: &str) -> Option<PathBuf> {
    let mut path = root.to_path_buf();
    path.extend(segments(rel)?);
    let canonical = std::fs::canonicalize(&path).ok()?;
    canonical.starts_with(root).then_some(canonical)
}

/// The names along `rel` (still percent-encoded), decoded, without empty
/// ones and `.`; `None` if one would leave its directory (`..`, an encoded
/// slash or backslash, NUL) or is not UTF-8.
fn segments(rel: &str) -> Option<Vec<String>> {
    let mut names = Vec::new();
    for seg in rel.split('/') {
        // A malformed escape stays as it is (the router has already
        // answered 400 to any request that holds one).
        let decoded: Vec<u8> = percent_encoding::percent_decode_str(seg).collect();
        if decoded.contains(&b'/') || decoded.contains(&b'\\') || decoded.contains(&0) {
            return None;
        }
        let seg = String::from_utf8(decoded).ok()?;
        if seg.is_empty() || seg == "." {
            continue;
        }
        match Path::new(&seg).components().next() {
            Some(Component::Normal(_)) => names.push(seg),
            _ => return None,
        }
    }
    Some(names)
}

/// The path under the route a request names (still percent-encoded), and
/// the encoding `compress` chose for it (none for a range, which is of the
/// file itself).
fn target<'r>(req: &'r Request<()>, prefix: &str) -> (&'r str, Option<Encoding>) {
    let rel = req.uri().path()[prefix.len()..].trim_start_matches('/');
    let encoding = req
        .extensions()
        .get::<crate::http::compress::Chosen>()
        .and_then(|c| c.encoding())
        .filter(|_| !req.headers().contains_key(header::RANGE));
    (rel, encoding)
}

/// The type a file is served as, from its name.
fn mime_of(file: &Path) -> &'static str {
    mime_guess::from_path(file)
        .first_raw()
        .unwrap_or("application/octet-stream")
}

/// A `static` route: its root (canonical), the index file of directories,
/// a single-page app's `fallback`, whether directories are listed and
/// whether small files are kept in memory (see `cache`).
pub(crate) struct Root {
    pub(crate) root: PathBuf,
    pub(crate) index: String,
    pub(crate) fallback: Option<String>,
    pub(crate) browse: bool,
    pub(crate) file_cache: bool,
    /// Names the route in the file cache.
    id: u64,
}

impl Root {
    pub(crate) fn new(
        root: PathBuf,
        index: String,
        fallback: Option<String>,
        browse: bool,
        file_cache: bool,
    ) -> Root {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        Root {
            root,
            index,
            fallback,
            browse,
            file_cache,
            id: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        }
    }
}

/// What a request names under a root, found off the serving thread.
enum Found {
    /// Nothing (or something outside the root).
    Missing,
    /// A directory asked for without its trailing slash.
    Directory,
    /// A file to serve (a directory's index included), decoded and canonical.
    File(PathBuf, Validators),
    /// A directory without its index, listed (`browse`): its entries' names
    /// (directories with a trailing `/`), sorted.
    Listing(Vec<String>),
}

/// Looks `rel` up under `route`'s root: every filesystem call a static
/// request makes before the file is opened, together, so that they run in
/// one blocking task (a slow `stat` on a network filesystem must not stall
/// the serving thread's other connections).
fn find(
    route: &Root,
    rel: &str,
    slash: bool,
    encoding: Option<Encoding>,
) -> (Found, Option<PathBuf>) {
    let found = find_any(route, rel, slash);
    // A precompressed sibling (`file.br`, `.zst`, `.gz`) of the encoding
    // chosen, if it is a file at least as new as the file.
    let sibling = match (&found, encoding) {
        (Found::File(file, _), Some(e)) => {
            let mut name = file.clone().into_os_string();
            name.push(match e {
                Encoding::Br => ".br",
                Encoding::Zstd => ".zst",
                Encoding::Gzip => ".gz",
            });
            let sibling = PathBuf::from(name);
            let newer =
                |a: &std::fs::Metadata, b: &std::fs::Metadata| match (a.modified(), b.modified()) {
                    (Ok(a), Ok(b)) => a >= b,
                    _ => false,
                };
            match (std::fs::metadata(&sibling), std::fs::metadata(file)) {
                (Ok(s), Ok(f)) if s.is_file() && newer(&s, &f) => Some(sibling),
                _ => None,
            }
        }
        _ => None,
    };
    (found, sibling)
}

fn find_any(route: &Root, rel: &str, slash: bool) -> Found {
    match find_file(route, rel, slash) {
        // A single-page app: a missing path that does not look like a file
        // (no extension in its last segment) is the app's page.
        Found::Missing if route.fallback.is_some() && !looks_like_a_file(rel) && !climbs(rel) => {
            match route
                .fallback
                .as_deref()
                .and_then(|f| resolve_static(&route.root, f))
            {
                Some(page) => match std::fs::metadata(&page).ok().filter(|m| m.is_file()) {
                    Some(meta) => {
                        Validators::of(&meta).map_or(Found::Missing, |v| Found::File(page, v))
                    }
                    None => Found::Missing,
                },
                None => Found::Missing,
            }
        }
        found => found,
    }
}

/// Files up to this size asked for whole are read at once.
const SMALL: u64 = 256 * 1024;

/// The content of `path` if it is a file of at most [`SMALL`] bytes, and
/// its validators when it was opened.
fn read_small(path: &Path) -> Option<(Bytes, Option<Validators>)> {
    use std::io::Read;
    let f = std::fs::File::open(path).ok()?;
    let meta = f.metadata().ok().filter(|m| m.is_file())?;
    if meta.len() > SMALL {
        return None;
    }
    let mut buf = Vec::with_capacity(meta.len() as usize);
    f.take(SMALL + 1).read_to_end(&mut buf).ok()?;
    (buf.len() as u64 <= SMALL).then(|| (Bytes::from(buf), Validators::of(&meta)))
}

/// Does `rel` try to leave its directory (`..`, `.`, or their escapes)? Such
/// a path gets its 404, never the app's page.
fn climbs(rel: &str) -> bool {
    let lower = rel.to_ascii_lowercase();
    lower.contains("%2e") || lower.contains('\\') || rel.split('/').any(|s| s == ".." || s == ".")
}

/// Does the last segment of `rel` have an extension (`app.js`, `a.b/c.css`)?
fn looks_like_a_file(rel: &str) -> bool {
    rel.trim_end_matches('/')
        .rsplit('/')
        .next()
        .is_some_and(|last| last.contains('.'))
}

fn find_file(route: &Root, rel: &str, slash: bool) -> Found {
    let Some(mut file) = resolve_static(&route.root, rel) else {
        return Found::Missing;
    };
    let Ok(mut meta) = std::fs::metadata(&file) else {
        return Found::Missing;
    };
    if meta.is_dir() {
        if !slash {
            return Found::Directory;
        }
        let dir = file.clone();
        let index =
            resolve_static(&route.root, &format!("{rel}/{}", route.index)).and_then(|index| {
                std::fs::metadata(&index)
                    .ok()
                    .filter(|m| m.is_file())
                    .map(|m| (index, m))
            });
        match index {
            Some((index, m)) => (file, meta) = (index, m),
            None if route.browse => return list(&route.root, &dir),
            None => return Found::Missing,
        }
    }
    match Validators::of(&meta) {
        Some(v) => Found::File(file, v),
        None => Found::Missing,
    }
}

/// The entries of `dir` that stay under `root` (a symlink that leaves it
/// is not shown), sorted by name.
fn list(root: &Path, dir: &Path) -> Found {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Found::Missing;
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let real = std::fs::canonicalize(e.path()).ok()?;
            if !real.starts_with(root) {
                return None;
            }
            Some(match real.is_dir() {
                true => format!("{name}/"),
                false => name,
            })
        })
        .collect();
    names.sort();
    Found::Listing(names)
}

/// A directory listing: every name escaped, as text and in its link.
fn listing(path: &str, names: &[String]) -> Response<Body> {
    use std::fmt::Write;
    let title = escape(path);
    let mut html = format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Index of {title}</title></head>\n<body><h1>Index of {title}</h1>\n<ul>\n"
    );
    if path != "/" {
        html.push_str("<li><a href=\"../\">../</a></li>\n");
    }
    for name in names {
        let href = percent_encoding::utf8_percent_encode(name, LINK).to_string();
        let _ = writeln!(
            html,
            "<li><a href=\"{}\">{}</a></li>",
            escape(&href),
            escape(name)
        );
    }
    html.push_str("</ul>\n</body></html>\n");
    let mut res = Response::new(crate::wire::body::full(html));
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    res
}

/// What a name's link escapes (all but unreserved characters and `/`).
const LINK: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/');

/// HTML-escapes `s` for text and attribute values.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The answer to a GET or HEAD of a small file this thread holds in memory
/// (see `cache`), at once; `None` if there is none, for [`serve`]. The
/// request's conditional headers are taken on an answer.
pub(crate) fn from_memory(
    req: &mut Request<()>,
    prefix: &str,
    route: &Root,
) -> Option<Response<Body>> {
    let whole = !req.headers().contains_key(header::RANGE);
    if !route.file_cache || !whole || !(req.method() == Method::GET || req.method() == Method::HEAD)
    {
        return None;
    }
    let (rel, encoding) = target(req, prefix);
    let hit = cache::get(route.id, rel, encoding)?;
    let method = req.method().clone();
    Some(small(&method, req.headers_mut(), &hit, encoding))
}

/// A `static` route's answer: GET/HEAD of the file `req` names under
/// `root`, with the validators and conditions of RFC 9110 (see
/// [`conditions`]); tower-http's ServeFile reads the file (content type,
/// a single range) on tokio's blocking threads.
pub(crate) async fn serve(req: Request<()>, prefix: Arc<str>, route: Arc<Root>) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut res = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        res.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return res;
    }
    let path = req.uri().path();
    let slash = path.ends_with('/');
    // The encoding is for a precompressed sibling.
    let (rel, encoding) = target(&req, &prefix);
    // A small file asked for whole (not in this thread's memory: the router
    // tried `from_memory` first) is read in the same blocking task as its
    // lookup: one hop off the serving thread instead of ServeFile's several
    // (open, metadata, each read). It is kept in memory if it can be.
    let whole = !req.headers().contains_key(header::RANGE);
    let watcher = (whole && route.file_cache).then(cache::watcher).flatten();
    let lookup = route.clone();
    let key = rel.to_owned();
    let watching = watcher.clone();
    let (found, sibling, content, rel) = tokio::task::spawn_blocking(move || {
        // What the answer depends on is watched before it is looked at.
        let mut cacheable = watching
            .as_deref()
            .is_some_and(|w| cache::watch_path(w, &lookup.root, &key));
        let (found, sibling) = find(&lookup, &key, slash, encoding);
        let content = match (&found, whole) {
            (Found::File(file, found), true) => {
                cacheable = cacheable
                    && watching
                        .as_deref()
                        .is_some_and(|w| cache::watch_file(w, file, sibling.as_ref()));
                read_small(sibling.as_deref().unwrap_or(file)).map(|(content, read)| {
                    // Cached only if what was read is the version found
                    // (for a sibling, the file's validators count).
                    let same = sibling.is_some() || read.as_ref() == Some(found);
                    (content, cacheable && same)
                })
            }
            _ => None,
        };
        (found, sibling, content, key)
    })
    .await
    .unwrap_or((Found::Missing, None, None, String::new()));
    let (file, validators) = match found {
        Found::Missing => return text(StatusCode::NOT_FOUND, "not found\n"),
        Found::Directory => {
            let mut location = format!("{path}/");
            if let Some(q) = req.uri().query() {
                location.push('?');
                location.push_str(q);
            }
            let mut res = empty(StatusCode::MOVED_PERMANENTLY);
            if let Ok(v) = HeaderValue::from_str(&location) {
                res.headers_mut().insert(header::LOCATION, v);
            }
            return res;
        }
        Found::File(file, validators) => (file, validators),
        Found::Listing(names) => {
            let mut res = listing(path, &names);
            if req.method() == Method::HEAD {
                *res.body_mut() = crate::wire::body::full(bytes::Bytes::new());
            }
            return res;
        }
    };
    if let Some((content, cacheable)) = content {
        // A sibling's ETag is the variant's, made once.
        let sibling = sibling.map(|_| {
            encoding.and_then(|e| crate::http::compress::variant_etag(&validators.etag, e))
        });
        let found = cache::Cached {
            content,
            mime: HeaderValue::from_static(mime_of(&file)),
            validators,
            sibling,
        };
        let (mut parts, _) = req.into_parts();
        let res = small(&parts.method, &mut parts.headers, &found, encoding);
        if let (true, Some(watcher)) = (cacheable, &watcher) {
            cache::put(watcher, route.id, &rel, encoding, found);
        }
        return res;
    }
    let (mut parts, body) = req.into_parts();
    match conditions(&parts.method, &mut parts.headers, &validators) {
        Verdict::Serve => {}
        Verdict::NotModified => {
            return not_modified(&validators, HeaderValue::from_static(mime_of(&file)))
        }
        Verdict::PreconditionFailed => {
            return text(StatusCode::PRECONDITION_FAILED, "precondition failed\n")
        }
    }
    // The file found, by its decoded canonical name: ServeFile opens it
    // whatever the request's (encoded) path says. A precompressed sibling
    // is served as the file in its encoding: the file's type, the variant's
    // validator, and no compressing again.
    let serve = match (&sibling, encoding) {
        (Some(sibling), Some(e)) => {
            let mime = mime_guess::from_path(&file).first_or_octet_stream();
            let res = tower_http::services::ServeFile::new_with_mime(sibling, &mime)
                .oneshot(Request::from_parts(parts, body))
                .await;
            return match res {
                Ok(res) if res.status().is_success() => {
                    let mut res = validators.apply(res.map(Body::new));
                    crate::http::compress::precompressed(&mut res, e, None);
                    res
                }
                Ok(res) => res.map(Body::new),
                Err(never) => match never {},
            };
        }
        _ => tower_http::services::ServeFile::new(file),
    };
    match serve.oneshot(Request::from_parts(parts, body)).await {
        Ok(res) if res.status().is_success() => validators.apply(res.map(Body::new)),
        Ok(res) => res.map(Body::new),
        Err(never) => match never {},
    }
}

/// The answer with a small file read whole (from memory or just read):
/// the request's conditions, then the content, its type and validators,
/// and for a precompressed sibling its encoding.
fn small(
    method: &Method,
    headers: &mut HeaderMap,
    file: &cache::Cached,
    encoding: Option<Encoding>,
) -> Response<Body> {
    let v = &file.validators;
    match conditions(method, headers, v) {
        Verdict::Serve => {}
        Verdict::NotModified => return not_modified(v, file.mime.clone()),
        Verdict::PreconditionFailed => {
            return text(StatusCode::PRECONDITION_FAILED, "precondition failed\n")
        }
    }
    let len = file.content.len();
    let mut res = Response::new(match method == Method::HEAD {
        true => Body::empty(),
        false => full(file.content.clone()),
    });
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, file.mime.clone());
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    let mut res = v.apply(res);
    if let (Some(tag), Some(e)) = (&file.sibling, encoding) {
        crate::http::compress::precompressed(&mut res, e, tag.clone());
    }
    res
}

/// 304 for a file of type `mime`: its validators, and the type for
/// `compress`, which must add the `Vary` the 200 would have (RFC 9110
/// section 15.4.5) though a 304 has no `Content-Type`.
fn not_modified(v: &Validators, mime: HeaderValue) -> Response<Body> {
    let mut res = v.apply(empty(StatusCode::NOT_MODIFIED));
    res.extensions_mut()
        .insert(crate::http::compress::Representation(mime));
    res
}

/// What identifies the version of a file served: a strong ETag (from its
/// modification time, to the nanosecond, and its length, as nginx's) and
/// its Last-Modified date, with both headers ready.
#[derive(PartialEq, Eq)]
struct Validators {
    etag: String,
    /// Seconds since the epoch, what an HTTP date can say.
    modified: u64,
    headers: Option<(HeaderValue, HeaderValue)>,
}

impl Validators {
    fn new(etag: String, modified: u64) -> Validators {
        let date = httpdate::fmt_http_date(UNIX_EPOCH + std::time::Duration::from_secs(modified));
        let headers = HeaderValue::from_str(&etag)
            .ok()
            .zip(HeaderValue::from_str(&date).ok());
        Validators {
            etag,
            modified,
            headers,
        }
    }

    fn of(meta: &std::fs::Metadata) -> Option<Validators> {
        let since = meta.modified().ok()?.duration_since(UNIX_EPOCH).ok()?;
        Some(Validators::new(
            format!(
                "\"{:x}.{:x}-{:x}\"",
                since.as_secs(),
                since.subsec_nanos(),
                meta.len()
            ),
            since.as_secs(),
        ))
    }

    /// Adds the validators to a response (200, 206 or 304).
    fn apply(&self, mut res: Response<Body>) -> Response<Body> {
        if let Some((etag, modified)) = &self.headers {
            let h = res.headers_mut();
            h.insert(header::ETAG, etag.clone());
            h.insert(header::LAST_MODIFIED, modified.clone());
        }
        res
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Serve,
    NotModified,
    PreconditionFailed,
}

/// Evaluates the conditions of a GET or HEAD (RFC 9110 section 13.2.2), and
/// takes their headers out of `headers`: what is left for ServeFile is a
/// plain request, with a `Range` only where one range still applies.
fn conditions(method: &Method, headers: &mut HeaderMap, v: &Validators) -> Verdict {
    let take = |h: &mut HeaderMap, name| -> Option<String> {
        let value = h
            .get_all(&name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join(", ");
        let present = h.remove(&name).is_some();
        present.then_some(value)
    };
    let if_match = take(headers, header::IF_MATCH);
    let if_unmodified = take(headers, header::IF_UNMODIFIED_SINCE);
    let if_none_match = take(headers, header::IF_NONE_MATCH);
    let if_modified = take(headers, header::IF_MODIFIED_SINCE);
    let if_range = take(headers, header::IF_RANGE);
    // 1, 2: the client's version must be the current one.
    if let Some(tags) = if_match {
        if !tags_match(&tags, &v.etag, true) {
            return Verdict::PreconditionFailed;
        }
    } else if let Some(date) = if_unmodified.as_deref().and_then(http_date) {
        if v.modified > date {
            return Verdict::PreconditionFailed;
        }
    }
    // 3, 4: the client's copy is current. If-Modified-Since counts only
    // without If-None-Match.
    if let Some(tags) = if_none_match {
        if tags_match(&tags, &v.etag, false) {
            return Verdict::NotModified;
        }
    } else if let Some(date) = if_modified.as_deref().and_then(http_date) {
        if v.modified <= date {
            return Verdict::NotModified;
        }
    }
    // 5: a range of the current version only, one range at most, in bytes
    // (units compare case-insensitively; a range in a unit the server does
    // not know is ignored: RFC 9110 section 14.2).
    let range = headers
        .remove(header::RANGE)
        .filter(|_| *method == Method::GET)
        .filter(|_| if_range.is_none_or(|r| range_condition_holds(&r, v)))
        .and_then(|r| bytes_range(r.to_str().ok()?));
    if let Some(range) = range {
        headers.insert(header::RANGE, range);
    }
    Verdict::Serve
}

/// A `Range` value in bytes with one range, as `bytes=...` (the spelling
/// ServeFile reads); `None` for another unit or several ranges.
fn bytes_range(range: &str) -> Option<HeaderValue> {
    let (unit, ranges) = range.split_once('=')?;
    if !unit.trim().eq_ignore_ascii_case("bytes") || ranges.contains(',') {
        return None;
    }
    HeaderValue::from_str(&format!("bytes={}", ranges.trim())).ok()
}

/// `If-Range`: an entity tag (strong comparison) or the exact
/// Last-Modified date.
fn range_condition_holds(cond: &str, v: &Validators) -> bool {
    let cond = cond.trim();
    if cond.starts_with('"') || cond.starts_with("W/") {
        return tags_match(cond, &v.etag, true);
    }
    http_date(cond) == Some(v.modified)
}

/// Does the list of entity tags (or `*`) match `etag`? Strong comparison:
/// weak tags never match; weak comparison: `W/` is ignored.
fn tags_match(list: &str, etag: &str, strong: bool) -> bool {
    if list.trim() == "*" {
        return true;
    }
    let mut rest = list;
    loop {
        rest = rest.trim_start_matches(|c: char| c == ',' || c.is_ascii_whitespace());
        if rest.is_empty() {
            return false;
        }
        let weak = rest.starts_with("W/");
        if weak {
            rest = &rest[2..];
        }
        let Some(body) = rest.strip_prefix('"') else {
            return false;
        };
        let Some(end) = body.find('"') else {
            return false;
        };
        let tag = &rest[..end + 2];
        if tag == etag && !(strong && weak) {
            return true;
        }
        rest = &body[end + 1..];
    }
}

/// An HTTP date (any of the three forms), as seconds since the epoch.
fn http_date(s: &str) -> Option<u64> {
    let t: SystemTime = httpdate::parse_http_date(s.trim()).ok()?;
    t.duration_since(UNIX_EPOCH).ok().map(|d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_paths_stay_under_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::create_dir(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/a.txt"), "a").unwrap();
        std::os::unix::fs::symlink("/etc", root.join("out")).unwrap();
        assert_eq!(
            resolve_static(&root, "sub/a.txt"),
            Some(root.join("sub/a.txt"))
        );
        assert_eq!(resolve_static(&root, "sub%2fa.txt"), None);
        assert_eq!(resolve_static(&root, "../etc/passwd"), None);
        assert_eq!(resolve_static(&root, "%2e%2e/etc/passwd"), None);
        assert_eq!(resolve_static(&root, "sub/a.txt%00"), None);
        assert_eq!(resolve_static(&root, "out/passwd"), None);
        assert_eq!(resolve_static(&root, "%zz"), None);
    }

    #[test]
    fn what_a_single_page_app_falls_back_for() {
        for (rel, file) in [
            ("users/42", false),
            ("app.js", true),
            ("a.b/c", false),
            ("x/y.css", true),
            ("settings/", false),
        ] {
            assert_eq!(looks_like_a_file(rel), file, "{rel}");
        }
        for (rel, climbs_) in [
            ("../etc", true),
            ("a/./b", true),
            ("%2E%2e/x", true),
            ("a\\b", true),
            ("a/b", false),
        ] {
            assert_eq!(climbs(rel), climbs_, "{rel}");
        }
    }

    #[test]
    fn entity_tags_compare() {
        let e = "\"5f.0-2a\"";
        assert!(tags_match(e, e, true));
        assert!(tags_match("\"x\", \"5f.0-2a\"", e, true));
        assert!(tags_match("W/\"5f.0-2a\"", e, false));
        assert!(
            !tags_match("W/\"5f.0-2a\"", e, true),
            "weak never matches strongly"
        );
        assert!(tags_match(" * ", e, true));
        assert!(!tags_match("\"x,y\"", e, false));
        assert!(!tags_match("garbage", e, false));
    }

    #[test]
    fn conditions_in_rfc_order() {
        let v = Validators::new("\"a\"".into(), 1_000_000);
        let date =
            |secs: u64| httpdate::fmt_http_date(UNIX_EPOCH + std::time::Duration::from_secs(secs));
        let check = |pairs: &[(&str, String)]| {
            let mut h = HeaderMap::new();
            for (k, val) in pairs {
                h.append(
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    val.parse().unwrap(),
                );
            }
            let verdict = conditions(&Method::GET, &mut h, &v);
            (verdict, h.contains_key(header::RANGE))
        };
        use Verdict::*;
        assert_eq!(check(&[("if-none-match", "\"a\"".into())]).0, NotModified);
        assert_eq!(check(&[("if-none-match", "*".into())]).0, NotModified);
        // A mismatching tag and a matching date: the tag decides.
        assert_eq!(
            check(&[
                ("if-none-match", "\"b\"".into()),
                ("if-modified-since", date(1_000_000))
            ])
            .0,
            Serve
        );
        assert_eq!(
            check(&[("if-modified-since", date(1_000_000))]).0,
            NotModified
        );
        assert_eq!(check(&[("if-modified-since", date(999_999))]).0, Serve);
        assert_eq!(check(&[("if-match", "\"b\"".into())]).0, PreconditionFailed);
        assert_eq!(
            check(&[("if-unmodified-since", date(999_999))]).0,
            PreconditionFailed
        );
        // Ranges: one applies; a stale If-Range, or several ranges, give all.
        assert_eq!(check(&[("range", "bytes=0-9".into())]), (Serve, true));
        assert_eq!(
            check(&[("range", "bytes=0-9".into()), ("if-range", "\"a\"".into())]),
            (Serve, true)
        );
        assert_eq!(
            check(&[
                ("range", "bytes=0-9".into()),
                ("if-range", "\"old\"".into())
            ]),
            (Serve, false)
        );
        assert_eq!(
            check(&[("range", "bytes=0-9".into()), ("if-range", date(999_999))]),
            (Serve, false)
        );
        assert_eq!(
            check(&[("range", "bytes=0-9".into()), ("if-range", date(1_000_000))]),
            (Serve, true)
        );
        assert_eq!(
            check(&[("range", "bytes=0-9,20-29".into())]),
            (Serve, false)
        );
        assert_eq!(check(&[("range", "Bytes=0-1".into())]), (Serve, true));
        assert_eq!(check(&[("range", "items=0-1".into())]), (Serve, false));
        assert_eq!(check(&[("range", "none".into())]), (Serve, false));
    }
}
