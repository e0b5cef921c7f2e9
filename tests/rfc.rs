//! The HTTP RFCs at their edges (SPEC section 5; RFC 9110, 9112, 9113):
//! the request's host, conditional and range requests for files, and logs a
//! client cannot flood. Requests are written by hand where a client library
//! would tidy them up, over plain TCP and TLS, HTTP/1.1 and HTTP/2.

mod util;

use util::client::{self, Target};
use util::h2raw::{self, RawH2};
use util::raw::raw;
use util::TestServer;

/// The same routes on a plain and a TLS listener.
fn config() -> String {
    let routes = r#"    routes:
      - path: /files/
        static: { root: public }
      - path: /old
        redirect: { to: "https://{host}:8443{uri}" }
      - path: /
        respond: { body: "host={host}\n" }
"#;
    format!(
        "listeners:\n  - name: web\n    addr: 127.0.0.1:0\n{routes}  - name: web-tls\n    addr: 127.0.0.1:0\n    tls: {{ cert: localhost.crt, key: localhost.key }}\n{routes}"
    )
}

async fn start(env: &[(&str, &str)]) -> TestServer {
    let mut b = TestServer::builder()
        .config_text(config())
        .before(|dir, _| {
            std::fs::create_dir(dir.join("public")).unwrap();
            std::fs::write(
                dir.join("public/a.txt"),
                "0123456789abcdefghijklmnopqrstuvwxyz",
            )
            .unwrap();
        });
    for (k, v) in env {
        b = b.env(k, v);
    }
    b.start().await
}

/// Issue 13.1: one valid Host, or 400 and the connection closed; a bad host
/// never reaches a template or a redirect.
#[tokio::test]
async fn a_request_needs_one_valid_host() {
    let srv = start(&[]).await;
    for listener in ["web", "web-tls"] {
        for (what, head) in [
            ("no Host", "GET / HTTP/1.1\r\n\r\n".to_string()),
            (
                "two Hosts",
                "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".into(),
            ),
            ("a space", "GET / HTTP/1.1\r\nHost: a b\r\n\r\n".into()),
            ("a slash", "GET / HTTP/1.1\r\nHost: a/b\r\n\r\n".into()),
            (
                "a path and query",
                "GET /old/p HTTP/1.1\r\nHost: evil.example/phish?x=\r\n\r\n".into(),
            ),
            ("userinfo", "GET / HTTP/1.1\r\nHost: user@a\r\n\r\n".into()),
            (
                "a bad absolute-form authority",
                "GET http://a@b/ HTTP/1.1\r\nHost: a\r\n\r\n".into(),
            ),
        ] {
            let r = raw(&srv, listener, &head).await;
            assert_eq!(r.status, 400, "{listener}, {what}: {r:?}");
            assert!(r.closed, "{listener}, {what}: the connection is closed");
            assert!(r.header("location").is_none());
        }
        let r = raw(
            &srv,
            listener,
            "GET / HTTP/1.1\r\nHost: example.com:99\r\n\r\n",
        )
        .await;
        assert_eq!(
            (r.status, &r.body[..]),
            (200, &b"host=example.com:99\n"[..])
        );
        assert!(!r.closed, "a good request keeps the connection");
        // HTTP/1.0 needs no Host.
        let r = raw(&srv, listener, "GET / HTTP/1.0\r\n\r\n").await;
        assert_eq!(r.status, 200);
    }
}

/// Issue 13.2: the authority of an absolute-form target wins over Host.
#[tokio::test]
async fn an_absolute_form_target_names_the_host() {
    let srv = start(&[]).await;
    for listener in ["web", "web-tls"] {
        let r = raw(
            &srv,
            listener,
            "GET http://a.example/old/p?q=1 HTTP/1.1\r\nHost: b.example\r\n\r\n",
        )
        .await;
        assert_eq!(r.status, 308);
        assert_eq!(
            r.header("location"),
            Some("https://a.example:8443/old/p?q=1")
        );
        let r = raw(
            &srv,
            listener,
            "GET http://a.example/ HTTP/1.1\r\nHost: b.example\r\n\r\n",
        )
        .await;
        assert_eq!(r.body, b"host=a.example\n");
    }
}

/// Issue 13.1 over HTTP/2: a Host that differs from `:authority` is a
/// malformed request (RFC 9113 section 8.3.1).
#[tokio::test]
async fn http2_host_and_authority_must_agree() {
    let srv = start(&[]).await;
    let mut h2 = RawH2::connect(srv.addr("web"), h2raw::MAX_WINDOW).await;
    h2.request_with(1, "GET", "/", "a.example", &[(38, "b.example")], true)
        .await;
    h2.request_with(3, "GET", "/", "a.example", &[(38, "a.example")], true)
        .await;
    h2.request_with(5, "GET", "/", "a b", &[], true).await;
    let mut statuses = std::collections::BTreeMap::new();
    while statuses.len() < 3 {
        let f = tokio::time::timeout(util::WAIT, h2.next())
            .await
            .expect("a frame in time")
            .unwrap()
            .expect("open");
        match f.kind {
            h2raw::HEADERS => {
                statuses.insert(f.stream, RawH2::status(&f.payload).map(Ok));
            }
            // A malformed request is a stream error (RFC 9113 section 8.1.1).
            h2raw::RST_STREAM => {
                statuses.insert(f.stream, Some(Err(f.payload[3])));
            }
            _ => {}
        }
    }
    assert_eq!(statuses[&1], Some(Ok(400)));
    assert_eq!(statuses[&3], Some(Ok(200)));
    // An authority that is not one: 400, or PROTOCOL_ERROR (1) from h2.
    assert!(
        matches!(statuses[&5], Some(Ok(400)) | Some(Err(1))),
        "{:?}",
        statuses[&5]
    );
}

/// A request for `path` with `headers`, over HTTP/2 (TLS) with hyper.
async fn h2_get(srv: &TestServer, path: &str, headers: &[(&str, &str)]) -> client::Resp {
    let mut conn = client::connect(&Target::tls(srv.addr("web-tls"), srv.tls()).h2())
        .await
        .unwrap();
    let mut req = http::Request::get(path);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = conn
        .request(req.body(http_body_util::Empty::new()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.version, http::Version::HTTP_2);
    resp
}

/// Issues 13.4 to 13.7: validators and conditions for files, in RFC 9110
/// order, on both listeners and over HTTP/2.
#[tokio::test]
async fn files_answer_conditional_and_range_requests() {
    let srv = start(&[]).await;
    let first = raw(&srv, "web", "GET /files/a.txt HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert_eq!(first.status, 200);
    let etag = first.header("etag").expect("an ETag").to_string();
    assert!(
        etag.starts_with('"') && etag.ends_with('"'),
        "strong: {etag}"
    );
    let modified = first.header("last-modified").unwrap().to_string();
    let old_date = "Mon, 01 Jan 2001 00:00:00 GMT";
    let get = |extra: String| format!("GET /files/a.txt HTTP/1.1\r\nHost: a\r\n{extra}\r\n");
    for listener in ["web", "web-tls"] {
        let r = raw(&srv, listener, &get(format!("If-None-Match: {etag}\r\n"))).await;
        assert_eq!(r.status, 304, "{listener}");
        assert_eq!(r.header("etag"), Some(etag.as_str()));
        let r = raw(&srv, listener, &get("If-None-Match: *\r\n".into())).await;
        assert_eq!(r.status, 304);
        let r = raw(
            &srv,
            listener,
            &get(format!("If-None-Match: W/{etag}, \"x\"\r\n")),
        )
        .await;
        assert_eq!(r.status, 304, "weak comparison for If-None-Match");
        // A mismatching tag wins over a matching date.
        let r = raw(
            &srv,
            listener,
            &get(format!(
                "If-None-Match: \"other\"\r\nIf-Modified-Since: {modified}\r\n"
            )),
        )
        .await;
        assert_eq!(r.status, 200);
        let r = raw(
            &srv,
            listener,
            &get(format!("If-Modified-Since: {modified}\r\n")),
        )
        .await;
        assert_eq!(r.status, 304);
        let r = raw(&srv, listener, &get("If-Match: \"other\"\r\n".into())).await;
        assert_eq!(r.status, 412);
        // One range: 206. A stale If-Range (a tag, a date): the whole file.
        let r = raw(&srv, listener, &get("Range: bytes=0-4\r\n".into())).await;
        assert_eq!((r.status, &r.body[..]), (206, &b"01234"[..]));
        assert_eq!(r.header("content-range"), Some("bytes 0-4/36"));
        let r = raw(
            &srv,
            listener,
            &get(format!("Range: bytes=0-4\r\nIf-Range: {etag}\r\n")),
        )
        .await;
        assert_eq!(r.status, 206);
        for stale in [
            "\"old\"".to_string(),
            old_date.to_string(),
            format!("W/{etag}"),
        ] {
            let r = raw(
                &srv,
                listener,
                &get(format!("Range: bytes=0-4\r\nIf-Range: {stale}\r\n")),
            )
            .await;
            assert_eq!((r.status, r.body.len()), (200, 36), "If-Range: {stale}");
        }
        let r = raw(
            &srv,
            listener,
            &get(format!("Range: bytes=0-4\r\nIf-Range: {modified}\r\n")),
        )
        .await;
        assert_eq!(r.status, 206, "the exact date holds");
        // Several ranges: the whole file, never 416.
        let r = raw(&srv, listener, &get("Range: bytes=0-9,20-29\r\n".into())).await;
        assert_eq!((r.status, r.body.len()), (200, 36));
        // Unsatisfiable: 416.
        let r = raw(&srv, listener, &get("Range: bytes=100-200\r\n".into())).await;
        assert_eq!(r.status, 416);
        // Issue 25.10: units compare case-insensitively; a range in a unit
        // the server does not know is ignored (RFC 9110 section 14.2).
        let r = raw(&srv, listener, &get("Range: Bytes=0-1\r\n".into())).await;
        assert_eq!((r.status, &r.body[..]), (206, &b"01"[..]));
        for unknown in ["items=0-1", "none"] {
            let r = raw(&srv, listener, &get(format!("Range: {unknown}\r\n"))).await;
            assert_eq!((r.status, r.body.len()), (200, 36), "Range: {unknown}");
        }
    }
    // HTTP/2.
    let r = h2_get(&srv, "/files/a.txt", &[("if-none-match", &etag)]).await;
    assert_eq!(r.status, 304);
    let r = h2_get(
        &srv,
        "/files/a.txt",
        &[("if-none-match", "\"x\""), ("if-modified-since", &modified)],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["etag"], etag.as_str());
    let r = h2_get(
        &srv,
        "/files/a.txt",
        &[("range", "bytes=0-4"), ("if-range", "\"old\"")],
    )
    .await;
    assert_eq!((r.status.as_u16(), r.body.len()), (200, 36));
    let r = h2_get(&srv, "/files/a.txt", &[("range", "bytes=0-9,20-29")]).await;
    assert_eq!((r.status.as_u16(), r.body.len()), (200, 36));
    let r = h2_get(&srv, "/files/a.txt", &[("range", "bytes=2-3")]).await;
    assert_eq!((r.status.as_u16(), r.body.as_str()), (206, "23"));
    // A file that changes gets a new validator.
    std::fs::write(srv.dir.path().join("public/a.txt"), "changed").unwrap();
    let r = raw(&srv, "web", &get(format!("If-None-Match: {etag}\r\n"))).await;
    assert_eq!(r.status, 200);
    assert_ne!(r.header("etag"), Some(etag.as_str()));
}

/// Issue 25.9: an HTTP/1.1 request may carry hundreds of header fields
/// (hyper's default of 100 answered a 917-byte request with 431), up to
/// `limits.max_headers` (500 by default); the 64 KiB head limit stays.
#[tokio::test]
async fn requests_with_hundreds_of_header_fields_are_served() {
    let srv = start(&[]).await;
    let fields = |n: usize| (0..n).map(|i| format!("x-{i}: v\r\n")).collect::<String>();
    for listener in ["web", "web-tls"] {
        for (n, status) in [(150, 200), (450, 200), (600, 431)] {
            let head = format!("GET / HTTP/1.1\r\nHost: a\r\n{}\r\n", fields(n));
            let r = raw(&srv, listener, &head).await;
            assert_eq!(r.status, status, "{listener}: {n} fields");
        }
        let big = format!("x-big: {}\r\n", "a".repeat(70 * 1024));
        let r = raw(
            &srv,
            listener,
            &format!("GET / HTTP/1.1\r\nHost: a\r\n{big}\r\n"),
        )
        .await;
        assert_eq!(r.status, 431, "{listener}: a head over 64 KiB");
    }
    // Within one keep-alive connection, pipelined: a request with few
    // fields, one with 300, one with few again. All three answered, and the
    // connection stays open.
    let three = format!(
        "GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n{}\r\nGET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        fields(300)
    );
    let mut s = tokio::net::TcpStream::connect(srv.addr("web"))
        .await
        .unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(three.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(util::WAIT, s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let out = String::from_utf8_lossy(&out);
    assert_eq!(out.matches("HTTP/1.1 200").count(), 3, "{out}");
    // Over TLS, one request after another on one connection.
    let tls = Target::tls(srv.addr("web-tls"), srv.tls_h1());
    let mut conn = client::connect(&tls).await.unwrap();
    for n in [3, 250, 3, 120] {
        let mut req = http::Request::get("/").header("host", "localhost");
        for i in 0..n {
            req = req.header(format!("x-{i}"), "v");
        }
        let r = conn
            .request(req.body(http_body_util::Empty::new()).unwrap())
            .await;
        assert_eq!(r.unwrap().status, 200, "{n} fields");
    }
    // And curl, with 200 headers of its own.
    let mut curl = std::process::Command::new("curl");
    curl.args(["-sS", "-o", "/dev/null", "-w", "%{http_code}"]);
    for i in 0..200 {
        curl.arg("-H").arg(format!("x-{i}: v"));
    }
    let out = curl
        .arg(format!("http://{}/", srv.addr("web")))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
}

/// Issue 25.10, RFC 9112 sections 2.3 and 6.1: a later HTTP/1 minor
/// version is served as HTTP/1.1, another major version gets 505, and a
/// transfer coding other than chunked alone gets 501 (hyper answered all
/// three with 400); pipelined requests around them are framed right.
#[tokio::test]
async fn http_versions_and_transfer_codings_get_their_status() {
    let srv = start(&[]).await;
    for listener in ["web", "web-tls"] {
        let r = raw(&srv, listener, "GET / HTTP/1.2\r\nHost: a\r\n\r\n").await;
        assert_eq!(r.status, 200, "{listener}: {r:?}");
        assert!(r.head.starts_with("HTTP/1.1 200"), "{}", r.head);
        assert!(!r.closed, "the connection serves on");
        let r = raw(&srv, listener, "GET / HTTP/2.0\r\nHost: a\r\n\r\n").await;
        assert_eq!(r.status, 505, "{listener}: {r:?}");
        assert!(r.closed);
        let r = raw(&srv, listener, "GET / HTTP/3.1\r\nHost: a\r\n\r\n").await;
        assert_eq!(r.status, 505, "{listener}: {r:?}");
        for coding in ["identity", "gzip, chunked", "gzip"] {
            let r = raw(
                &srv,
                listener,
                &format!("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: {coding}\r\n\r\n3\r\nabc\r\n0\r\n\r\n"),
            )
            .await;
            assert_eq!(r.status, 501, "{listener} {coding}: {r:?}");
            assert!(r.closed);
        }
        // `TE: identity` is not a transfer coding of the request: served.
        let r = raw(
            &srv,
            listener,
            "GET / HTTP/1.1\r\nHost: a\r\nTE: identity\r\n\r\n",
        )
        .await;
        assert_eq!(r.status, 200, "{listener}: {r:?}");
    }
    // Pipelined on one connection: a chunked body holding a request line,
    // a counted one, HTTP/1.2, then HTTP/2.0: four answers, the last 505.
    let pipelined = concat!(
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
        "12\r\nGET / HTTP/2.0\r\n\r\n\r\n0\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 16\r\n\r\nGET / HTTP/2.0\r\n",
        "GET / HTTP/1.2\r\nHost: a\r\n\r\n",
        "GET / HTTP/2.0\r\nHost: a\r\n\r\n",
    );
    let mut s = tokio::net::TcpStream::connect(srv.addr("web"))
        .await
        .unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(pipelined.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(util::WAIT, s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let out = String::from_utf8_lossy(&out);
    let statuses: Vec<&str> = out
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &out[i + 9..i + 12])
        .collect();
    assert_eq!(statuses, ["200", "200", "200", "505"], "{out}");
    // curl says HTTP/1.1 and chunked itself.
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            "abc",
        ])
        .arg(format!("http://{}/", srv.addr("web")))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
}

/// Issue 13.11: what any client can provoke is not logged at the default
/// level: TLS hellos with an IP address for SNI (testssl.sh sends them),
/// and HTTP/2 PING acks the server never asked for (h2spec does).
#[tokio::test]
async fn clients_cannot_flood_the_log() {
    // An empty GRACESRV_LOG: the config's level (info) and the defaults.
    let srv = start(&[("GRACESRV_LOG", "")]).await;
    // The start-up lines, the last of which follows READY=1, are all in.
    srv.wait_log(": ready").await;
    let before = srv.log_count();
    let port = srv.addr("web-tls").port();
    for _ in 0..20 {
        let out = tokio::process::Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &format!("127.0.0.1:{port}"),
                "-servername",
                "10.1.2.3",
            ])
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .expect("openssl runs (.ci/run installs it)");
        assert!(String::from_utf8_lossy(&out.stdout).contains("CONNECTED"));
    }
    let mut h2 = RawH2::connect(srv.addr("web"), h2raw::MAX_WINDOW).await;
    for _ in 0..50 {
        h2.send(h2raw::PING, 0x1, 0, &[1; 8]).await.unwrap();
    }
    // The connection still answers, so every PING was read.
    h2.request(1, "GET", "/", true).await;
    loop {
        let f = h2.next().await.unwrap().expect("open");
        if f.kind == h2raw::HEADERS {
            break;
        }
    }
    let log = srv.logs();
    assert_eq!(srv.log_count(), before, "nothing logged:\n{log}");
}
