//! The `proxy` route, against a real upstream started by the test.

mod util;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use util::client::{self, Target};
use util::config::{Config, Listener};
use util::load::{Kind, Load};
use util::TestServer;

type UpBody = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

fn full(s: impl Into<Bytes>) -> UpBody {
    Full::new(s.into()).map_err(|never| match never {}).boxed()
}

/// Close codes the upstream's WebSockets received, by the `tag` query of
/// the request that opened them.
static CLOSES: std::sync::Mutex<Vec<(String, u16)>> = std::sync::Mutex::new(Vec::new());

/// Waits until the upstream's WebSocket `tag` got a close frame; its code.
async fn upstream_close(tag: &str) -> u16 {
    let code = || {
        let closes = CLOSES.lock().unwrap();
        closes.iter().find(|(t, _)| t == tag).map(|(_, c)| *c)
    };
    util::until(
        &format!("a close frame reached the upstream for {tag}"),
        || code().is_some(),
    )
    .await;
    code().unwrap_or_default()
}

/// The RFC 6455 example key and its accept value.
use util::ws::{ACCEPT as WS_ACCEPT, KEY as WS_KEY};

/// The upstream: echoes, reports headers, answers slowly, speaks WebSocket.
async fn upstream(mut req: Request<Incoming>) -> Result<Response<UpBody>, Infallible> {
    let path = req.uri().path().to_string();
    Ok(match path.as_str() {
        "/api/headers" | "/headers" => {
            let mut lines: Vec<String> = req
                .headers()
                .iter()
                .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap_or("?")))
                .collect();
            lines.sort();
            Response::builder()
                .header("connection", "x-upstream-private")
                .header("x-upstream-private", "1")
                .header("keep-alive", "timeout=5")
                .header("x-upstream", "yes")
                .body(full(lines.join("\n") + "\n"))
                .unwrap()
        }
        "/api/echo" => Response::new(req.into_body().boxed()),
        "/api/collect" => {
            let n = req.into_body().collect().await.map(|b| b.to_bytes().len());
            match n {
                Ok(n) => Response::new(full(format!("got {n}\n"))),
                Err(_) => Response::builder()
                    .status(500)
                    .body(full("broken body\n"))
                    .unwrap(),
            }
        }
        "/api/slow" => {
            tokio::time::sleep(Duration::from_secs(2)).await;
            Response::new(full("slow\n"))
        }
        "/api/ws" => {
            assert_eq!(req.headers()["sec-websocket-key"], WS_KEY);
            let tag = req.uri().query().unwrap_or("").to_string();
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let mut io = TokioIo::new(on.await.unwrap());
                // Echo text frames: unmask what the client sends. A close
                // frame is recorded, and the connection closed.
                loop {
                    let mut head = [0u8; 2];
                    if io.read_exact(&mut head).await.is_err() {
                        return;
                    }
                    assert_ne!(head[1] & 0x80, 0, "client frames are masked");
                    let len = (head[1] & 0x7f) as usize;
                    let mut mask = [0u8; 4];
                    io.read_exact(&mut mask).await.unwrap();
                    let mut data = vec![0u8; len];
                    io.read_exact(&mut data).await.unwrap();
                    for (i, b) in data.iter_mut().enumerate() {
                        *b ^= mask[i % 4];
                    }
                    if head[0] & 0x0f == 8 {
                        let code = u16::from_be_bytes([data[0], data[1]]);
                        CLOSES.lock().unwrap().push((tag, code));
                        return;
                    }
                    let mut out = vec![0x81, len as u8];
                    out.extend_from_slice(&data);
                    if io.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
            Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("upgrade", "websocket")
                .header("connection", "upgrade")
                .header("sec-websocket-accept", WS_ACCEPT)
                .body(full(""))
                .unwrap()
        }
        _ => Response::new(full(format!("upstream {path}\n"))),
    })
}

async fn start_upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(
                        TokioIo::new(stream),
                        hyper::service::service_fn(upstream),
                    )
                    .await;
            });
        }
    });
    addr
}

/// `web` proxies `/api` (1 s timeout), `/plain` (prefix stripped) and
/// `/down` (nothing listens) and answers `/status` and `/admin` itself;
/// `web-tls` proxies `/api`. `api` adds settings to `web`'s `/api` route.
fn proxy_config(upstream: SocketAddr, api: serde_json::Value) -> Config {
    let up = format!("http://{upstream}");
    let mut api_route = json!({ "upstream": up, "timeout": "1s" });
    if let (Some(route), serde_json::Value::Object(extra)) = (api_route.as_object_mut(), api) {
        route.extend(extra);
    }
    Config::new()
        .listener(
            Listener::plain("web")
                .route("/api", "proxy", api_route)
                .route(
                    "/plain",
                    "proxy",
                    json!({ "upstream": up, "strip_prefix": true }),
                )
                .route(
                    "/down",
                    "proxy",
                    json!({ "upstream": "http://127.0.0.1:1", "connect_timeout": "1s" }),
                )
                .route("/status", "status", json!({}))
                .route(
                    "/admin",
                    "respond",
                    json!({ "body": "admin, not proxied\n" }),
                ),
        )
        .listener(
            Listener::tls("web-tls", "localhost.crt", "localhost.key").route(
                "/api",
                "proxy",
                json!({ "upstream": up }),
            ),
        )
}

async fn start(config: Config) -> TestServer {
    TestServer::builder().config(config).start().await
}

#[tokio::test]
async fn headers_are_forwarded_and_hop_by_hop_ones_removed() {
    let up = start_upstream().await;
    let srv = start(proxy_config(up, json!({}))).await;
    let web = srv.addr("web");
    let mut c = client::connect(&Target::plain(web)).await.unwrap();
    let req = Request::get("/api/headers")
        .header("host", "example.test:8080")
        .header("connection", "keep-alive, x-private")
        .header("x-private", "secret")
        .header("x-forwarded-for", "10.1.2.3")
        .header("te", "trailers, deflate")
        .body(http_body_util::Empty::new())
        .unwrap();
    let r = c.request(req).await.unwrap();
    assert_eq!(r.status, 200);
    let seen = r.body;
    assert!(seen.contains("host: example.test:8080\n"), "{seen}");
    assert!(
        seen.contains("x-forwarded-for: 10.1.2.3, 127.0.0.1\n"),
        "{seen}"
    );
    assert!(seen.contains("x-forwarded-proto: http\n"), "{seen}");
    assert!(
        seen.contains("x-forwarded-host: example.test:8080\n"),
        "{seen}"
    );
    assert!(
        seen.contains("forwarded: for=127.0.0.1;proto=http;host=\"example.test:8080\"\n"),
        "{seen}"
    );
    // TE is hop-by-hop: gracesrv sends its own, `trailers` only (it passes
    // trailers on, as gRPC needs).
    assert!(
        !seen.contains("x-private") && seen.contains("te: trailers\n") && !seen.contains("deflate"),
        "{seen}"
    );
    // And on the way back.
    assert_eq!(r.headers["x-upstream"], "yes");
    assert!(r.headers.get("x-upstream-private").is_none());
    assert!(r.headers.get("keep-alive").is_none());

    // Over TLS and HTTP/2: proto https, Host from :authority.
    let tls = client::get(&Target::tls(srv.addr("web-tls"), srv.tls()), "/api/headers")
        .await
        .unwrap();
    assert_eq!(tls.version, http::Version::HTTP_2);
    assert!(
        tls.body.contains("x-forwarded-proto: https\n"),
        "{}",
        tls.body
    );
    assert!(
        tls.body
            .contains(&format!("host: {}\n", srv.addr("web-tls"))),
        "{}",
        tls.body
    );

    // strip_prefix
    let r = client::get(&Target::plain(web), "/plain/x?y=1")
        .await
        .unwrap();
    assert_eq!(r.body, "upstream /x\n");
    let r = client::get(&Target::plain(web), "/api/x").await.unwrap();
    assert_eq!(r.body, "upstream /api/x\n");
}

#[tokio::test]
async fn upstream_down_or_slow_gives_502_or_504_and_counts() {
    let up = start_upstream().await;
    let srv = start(proxy_config(up, json!({}))).await;
    let web = Target::plain(srv.addr("web"));
    let r = client::get(&web, "/down/x").await.unwrap();
    assert_eq!((r.status.as_u16(), r.body.as_str()), (502, "bad gateway\n"));
    let r = client::get(&web, "/api/slow").await.unwrap();
    assert_eq!(
        (r.status.as_u16(), r.body.as_str()),
        (504, "gateway timeout\n")
    );
    srv.wait_log("upstream timed out").await;
    let s: serde_json::Value =
        serde_json::from_str(&client::get(&web, "/status").await.unwrap().body).unwrap();
    assert_eq!(s["proxied_total"], 2);
    assert_eq!(s["upstream_errors_total"], 2);
    // The server is fine.
    assert_eq!(
        client::get(&web, "/api/ok").await.unwrap().body,
        "upstream /api/ok\n"
    );
}

/// An HTTP/1.1 connection sending bodies of type `B` (streamed or whole).
async fn h1<B>(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<B>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

/// A request body of `left` bytes, made as it is sent.
struct Generated {
    left: usize,
}

impl hyper::body::Body for Generated {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(64 * 1024);
        self.left -= n;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'x'; n])))))
    }
}

fn peak_rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_body_streams_both_ways_without_being_buffered() {
    const SIZE: usize = 128 * 1024 * 1024;
    let up = start_upstream().await;
    let srv = start(proxy_config(up, json!({ "timeout": "60s" }))).await;
    let before = peak_rss_kb(srv.pid());
    let mut send = h1(srv.addr("web")).await;
    let req = Request::post("/api/echo")
        .header("host", "x")
        .body(Generated { left: SIZE })
        .unwrap();
    let res = send.send_request(req).await.unwrap();
    assert_eq!(res.status(), 200);
    let mut body = res.into_body();
    let mut got = 0usize;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            got += data.len();
        }
    }
    assert_eq!(got, SIZE);
    let grew_mb = (peak_rss_kb(srv.pid()).saturating_sub(before)) / 1024;
    assert!(
        grew_mb < 32,
        "peak RSS grew by {grew_mb} MB for a {} MB body",
        SIZE >> 20
    );
}

/// Opens a WebSocket through the proxy; returns the stream after the 101.
async fn websocket(addr: SocketAddr) -> tokio::net::TcpStream {
    websocket_tagged(addr, "").await
}

/// Opens a WebSocket through the proxy, tagged for [`upstream_close`].
async fn websocket_tagged(addr: SocketAddr, tag: &str) -> tokio::net::TcpStream {
    util::ws::open(addr, &format!("/api/ws?{tag}")).await
}

use util::ws::{closed as ws_closed, echo as ws_echo};

#[tokio::test]
async fn a_websocket_stays_open_across_a_restart_until_shutdown_timeout() {
    let up = start_upstream().await;
    let mut srv = start(proxy_config(up, json!({})).set("shutdown_timeout", "1s")).await;
    let old = srv.pid();
    let mut ws = websocket_tagged(srv.addr("web"), "timeout").await;
    assert_eq!(ws_echo(&mut ws, "hello").await.unwrap(), "hello");
    srv.restart().await;
    // Still open, still served by the old generation's tunnel.
    assert_eq!(
        ws_echo(&mut ws, "after the restart").await.unwrap(),
        "after the restart"
    );
    // Cut at shutdown_timeout, and logged.
    let tag = format!("pid={old} ");
    let line = srv
        .wait_log_after(0, |l| l.contains(&tag) && l.contains("shutdown_timeout"))
        .await;
    assert!(line.contains("upgraded=1"), "{line}");
    // Both ends hear "going away" (1001), not a bare close (1006).
    assert_eq!(ws_closed(&mut ws).await, 1001);
    assert_eq!(upstream_close("timeout").await, 1001);
    util::wait_gone(old).await;
    // A new WebSocket goes to the new generation.
    let mut ws = websocket(srv.addr("web")).await;
    assert_eq!(ws_echo(&mut ws, "new").await.unwrap(), "new");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxied_requests_survive_restarts_under_load() {
    let up = start_upstream().await;
    let mut srv = TestServer::builder()
        .config(proxy_config(up, json!({})))
        .env("GRACESRV_LOG", "gracesrv=info")
        .start()
        .await;
    let web = Target::plain(srv.addr("web"));
    let tls = Target::tls(srv.addr("web-tls"), srv.tls());
    let mut load = Load::new();
    load.spawn(Kind::KeepAlive, web.clone(), "/api/x", 3);
    load.spawn(Kind::NewConnection, web.clone(), "/api/x", 2);
    load.spawn(Kind::H2 { streams: 4 }, tls.clone(), "/api/x", 1);
    let stats = load.stats.clone();
    stats.wait_for_more(100).await;
    for _ in 0..10 {
        srv.restart().await;
        stats.wait_for_more(50).await;
    }
    let stats = load.stop().await;
    let errors = stats.errors.lock().unwrap().clone();
    assert_eq!(stats.failed(), 0, "{errors:#?}");
    assert!(stats.ok() > 500);
}

#[tokio::test]
async fn a_body_over_max_body_gets_413() {
    let up = start_upstream().await;
    let srv = start(proxy_config(up, json!({ "max_body": "1KB" }))).await;
    let web = srv.addr("web");
    // Declared too large: refused before the upstream is asked.
    let mut send = h1(web).await;
    let req = Request::post("/api/echo")
        .header("host", "x")
        .body(Full::new(Bytes::from(vec![b'x'; 4096])))
        .unwrap();
    assert_eq!(send.send_request(req).await.unwrap().status(), 413);
    // Streamed without a length: no more than max_body reaches the
    // upstream (here echoed back), whatever the upstream answered meanwhile.
    let mut send = h1(web).await;
    let req = Request::post("/api/echo")
        .header("host", "x")
        .body(Generated { left: 64 * 1024 })
        .unwrap();
    match send.send_request(req).await {
        Ok(res) if res.status() == StatusCode::PAYLOAD_TOO_LARGE => {}
        Ok(res) => {
            let mut body = res.into_body();
            let mut got = 0;
            while let Some(Ok(frame)) = body.frame().await {
                got += frame.into_data().map(|d| d.len()).unwrap_or(0);
            }
            assert!(got <= 1024, "{got} bytes got through a 1 KB limit");
        }
        Err(_) => {}
    }
    // Within the limit: forwarded.
    let r = client::get(&Target::plain(web), "/api/small")
        .await
        .unwrap();
    assert_eq!(r.body, "upstream /api/small\n");
}

/// Issue 12.7: a generation stopped because more than `max_draining` drain
/// at once ends its WebSockets as a server going away does: close 1001 to
/// the client and to the upstream, not a bare close (1006). The younger
/// generation's WebSocket lives on.
#[tokio::test]
async fn websockets_cut_by_max_draining_hear_going_away() {
    let up = start_upstream().await;
    let config = proxy_config(up, json!({}))
        .set("max_draining", 1)
        .set("shutdown_timeout", "60s");
    let mut srv = start(config).await;
    let first = srv.pid();
    let mut ws1 = websocket_tagged(srv.addr("web"), "cap-1").await;
    assert_eq!(ws_echo(&mut ws1, "one").await.unwrap(), "one");
    let second = srv.restart().await;
    let mut ws2 = websocket_tagged(srv.addr("web"), "cap-2").await;
    assert_eq!(ws_echo(&mut ws2, "two").await.unwrap(), "two");
    // A third generation: two would drain, one may.
    srv.restart().await;
    assert_eq!(ws_closed(&mut ws1).await, 1001);
    assert_eq!(upstream_close("cap-1").await, 1001);
    util::wait_gone(first).await;
    assert_eq!(ws_echo(&mut ws2, "still").await.unwrap(), "still");
    assert!(util::alive(second));
}

/// Issue 13.8: routes match the normalised path, and the proxy forwards it:
/// `..` (plain or encoded) cannot carry a request past its route; an
/// encoded slash or NUL is refused.
#[tokio::test]
async fn proxied_paths_are_normalised_before_routing() {
    let up = start_upstream().await;
    let srv = start(proxy_config(up, json!({}))).await;
    for (path, status, body) in [
        ("/api/../admin", 200, "admin, not proxied\n"),
        ("/api/%2e%2e/admin", 200, "admin, not proxied\n"),
        ("/api/%2E%2E/admin", 200, "admin, not proxied\n"),
        ("/api/./x/../y?q=1", 200, "upstream /api/y\n"),
        ("/api/%7euser", 200, "upstream /api/~user\n"),
        ("/api/a%2fb", 400, "bad request\n"),
        ("/api/a%00", 400, "bad request\n"),
        ("/api/../../etc/passwd", 400, "bad request\n"),
    ] {
        let r = util::raw::raw(
            &srv,
            "web",
            &format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n"),
        )
        .await;
        assert_eq!(
            (r.status, String::from_utf8_lossy(&r.body).as_ref()),
            (status, body),
            "{path}"
        );
    }
}

/// Issue 13.9: an `Upgrade: h2c` request is forwarded as a plain request
/// (its upgrade headers removed), never tunnelled past routing.
#[tokio::test]
async fn only_websockets_are_tunnelled() {
    let up = start_upstream().await;
    let srv = start(proxy_config(up, json!({}))).await;
    let r = util::raw::raw(
        &srv,
        "web",
        "GET /api/headers HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let seen = String::from_utf8_lossy(&r.body).to_lowercase();
    assert!(!seen.contains("upgrade"), "{seen}");
    assert!(!seen.contains("http2-settings"), "{seen}");
    assert!(!r.closed, "an ordinary exchange: the connection stays");
}

/// Issue 13.10: a request body the client breaks (bad chunked framing) is
/// the client's fault: 400, counted apart from upstream errors.
#[tokio::test]
async fn a_broken_request_body_is_a_bad_request() {
    let up = start_upstream().await;
    let srv = start(proxy_config(up, json!({}))).await;
    let r = util::raw::raw(
        &srv,
        "web",
        "POST /api/collect HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 400, "{r:?}");
    let status = client::get(&Target::plain(srv.addr("web")), "/status")
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&status.body).unwrap();
    assert_eq!(v["client_errors_total"], 1, "{v}");
    assert_eq!(v["upstream_errors_total"], 0, "{v}");
    assert!(!srv.logs().contains("upstream error"), "{}", srv.logs());
}
