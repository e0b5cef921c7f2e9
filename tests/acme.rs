//! Automatic certificates against pebble, Let's Encrypt's ACME test server
//! (`tests/util/pebble.rs`; `.ci/run` installs it from Debian), and certbot
//! with a deploy hook, for users who keep certbot.

mod util;

use serde_json::json;
use util::client::{self, Target};
use util::config::{Config, Listener};
use util::load::{Kind, Load};
use util::pebble::Pebble;
use util::{free_port, Certs, TestServer};

/// A config with a plain `web` listener (with `/status`) and a TLS `site`
/// whose certificate comes from `pebble` for `names`.
fn acme_config(pebble: &Pebble, challenge: &str, web: u16, site: u16, names: &[&str]) -> Config {
    Config::new()
        .set(
            "acme",
            json!({
                "directory": pebble.directory(),
                "storage": "acme",
                "ca_roots": pebble.ca_roots(),
                "challenge": challenge,
            }),
        )
        .listener(
            Listener::plain("web")
                .set("addr", format!("127.0.0.1:{web}"))
                .route("/status", "status", json!({}))
                .route("/", "respond", json!({ "body": "web {pid}\n" })),
        )
        .listener(
            Listener::plain("site")
                .set("addr", format!("127.0.0.1:{site}"))
                .set("tls", json!({ "acme": names }))
                .route("/", "respond", json!({ "body": "site {pid}\n" })),
        )
}

/// What `/status` on the `web` listener says.
async fn status(srv: &TestServer) -> serde_json::Value {
    let r = client::get(&Target::plain(srv.addr("web")), "/status")
        .await
        .unwrap();
    serde_json::from_str(&r.body).unwrap()
}

/// Starts the server and waits for the restart that serves the obtained
/// certificate (generation 1 serves the placeholder).
async fn start_and_obtain(config: Config) -> TestServer {
    // Every file the server creates is recorded with its mode (issue 25.3).
    let lib = util::preload::record_created();
    let mut srv = TestServer::builder()
        .config(config)
        .env("LD_PRELOAD", lib.to_str().unwrap())
        .env("CREATED_LOG", "created.log")
        .start()
        .await;
    let first = srv.pid();
    srv.restart_from(first).await;
    srv
}

async fn obtains_with(challenge: &str) {
    let (web, site_port) = (free_port(), free_port());
    let pebble = Pebble::start(web, site_port).await;
    let srv = start_and_obtain(acme_config(&pebble, challenge, web, site_port, &["a.test"])).await;
    srv.wait_log("certificate obtained").await;
    // The served chain verifies against pebble's root, for the name.
    let roots = pebble.issuing_roots_pem().await;
    let r = client::get(&Target::named(srv.addr("site"), &roots, "a.test"), "/")
        .await
        .unwrap();
    assert_eq!(r.body, format!("site {}\n", srv.pid()));
    // Stored owner-only.
    use std::os::unix::fs::PermissionsExt;
    let key = srv.dir.path().join("acme/certs/a.test/key.pem");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{}", key.display());
    // No challenge left behind.
    for kind in ["http-01", "tls-alpn-01"] {
        let dir = srv.dir.path().join("acme/challenges").join(kind);
        assert_eq!(std::fs::read_dir(dir).unwrap().count(), 0, "{kind}");
    }
    // Issue 25.3: every secret (account, keys, challenge answers, and
    // their temporary files) was created owner-only, never widened later.
    let created = std::fs::read_to_string(srv.dir.path().join("created.log")).unwrap();
    let secrets: Vec<&str> = created
        .lines()
        .filter(|l| l.contains("/acme/") && !l.ends_with("/lock") && !l.contains("status.json"))
        .collect();
    assert!(
        secrets.iter().any(|l| l.contains("/certs/a.test/key"))
            && secrets.iter().any(|l| l.contains("account.json")),
        "{created}"
    );
    for line in &secrets {
        let mode = u32::from_str_radix(line.split(' ').next().unwrap(), 8).unwrap();
        assert_eq!(mode & 0o077, 0, "created open to others: {line}");
    }
    let s = status(&srv).await;
    assert_eq!(s["acme"][0]["names"], json!(["a.test"]), "{s}");
    assert!(s["acme"][0]["not_after"].is_string(), "{s}");
    assert!(s["acme"][0]["last_error"].is_null(), "{s}");
}

#[tokio::test]
async fn a_certificate_is_obtained_with_tls_alpn_01() {
    obtains_with("tls-alpn-01").await;
}

#[tokio::test]
async fn a_certificate_is_obtained_with_http_01() {
    obtains_with("http-01").await;
}

/// Writes a certificate for `name` signed by `certs`' CA, valid for one more
/// day, where ACME keeps it: one that `renew_before: 30d` renews at once.
fn expiring(certs: &Certs, dir: &std::path::Path, name: &str) {
    let store = dir.join("acme/certs").join(name);
    std::fs::create_dir_all(&store).unwrap();
    certs.leaf_with(&store, "old", &[name], 77, |p| {
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::days(1);
        p.not_after = now + time::Duration::days(1);
    });
    std::fs::rename(store.join("old.crt"), store.join("cert.pem")).unwrap();
    std::fs::rename(store.join("old.key"), store.join("key.pem")).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_under_load_loses_no_request() {
    let (web, site_port) = (free_port(), free_port());
    let pebble = Pebble::start(web, site_port).await;
    let config = acme_config(&pebble, "tls-alpn-01", web, site_port, &["r.test"]);
    let mut srv = TestServer::builder()
        .config(config)
        .env("GRACESRV_LOG", "gracesrv=info")
        .before(|dir, certs| expiring(certs, dir, "r.test"))
        .spawn();
    let first = srv.wait_ready().await;
    // Clients trust the old certificate's CA and pebble's.
    let roots = format!("{}{}", srv.certs.ca_pem, pebble.issuing_roots_pem().await);
    let target = Target::named(srv.addr("site"), &roots, "r.test");
    let mut load = Load::new();
    load.spawn(Kind::KeepAlive, target.clone(), "/", 2);
    load.spawn(Kind::NewConnection, target.clone(), "/", 2);
    let stats = load.stats.clone();
    stats.wait_for_more(20).await;
    // The orderer renews the expiring certificate and restarts.
    let second = srv.restart_from(first).await;
    stats.wait_for_more(50).await;
    let stats = load.stop().await;
    let errors = stats.errors.lock().unwrap().clone();
    assert_eq!(stats.failed(), 0, "{errors:#?}");
    let pids = stats.pids.lock().unwrap().clone();
    assert!(pids.contains(&first) && pids.contains(&second), "{pids:?}");
    // New connections get pebble's certificate.
    let pebble_only = Target::named(
        srv.addr("site"),
        &pebble.issuing_roots_pem().await,
        "r.test",
    );
    assert_eq!(client::get(&pebble_only, "/").await.unwrap().status, 200);
}

/// Issue 25.5: between a renewal and the restart that serves it (here a
/// restart that fails: the config broke meanwhile), `status` tells the
/// certificate served from the one stored.
#[tokio::test]
async fn status_tells_the_served_certificate_from_the_stored_one() {
    let (web, site_port) = (free_port(), free_port());
    let pebble = Pebble::start(web, site_port).await;
    let config = acme_config(&pebble, "tls-alpn-01", web, site_port, &["t.test"]);
    let mut srv = TestServer::builder()
        .config(config)
        .before(|dir, certs| expiring(certs, dir, "t.test"))
        .spawn();
    srv.wait_ready().await;
    // Before the order is through (it takes several round trips to pebble).
    srv.write_config("listeners: [\n");
    srv.wait_log("certificate obtained").await;
    // The orderer asks for the restart that would serve it, which fails.
    srv.wait_log("restart failed").await;
    let s = status(&srv).await;
    let acme = &s["acme"][0];
    // RFC 3339 dates in UTC: the day is the first ten characters.
    let day = |k: &str| acme[k].as_str().unwrap_or_else(|| panic!("{k} in {s}"))[..10].to_string();
    let in_two_days = (time::OffsetDateTime::now_utc() + time::Duration::days(2))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()[..10]
        .to_string();
    let served = day("served_not_after");
    assert!(served < in_two_days, "the expiring one is served: {s}");
    assert_eq!(acme["not_after"], acme["served_not_after"], "{s}");
    assert!(
        day("stored_not_after") > in_two_days,
        "the renewed one is stored: {s}"
    );
    // The served one is still what clients get.
    let r = client::get(
        &Target::named(srv.addr("site"), &srv.certs.ca_pem, "t.test"),
        "/",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn without_the_acme_server_the_old_certificate_serves_on() {
    let (web, site_port) = (free_port(), free_port());
    let mut pebble = Pebble::start(web, site_port).await;
    let config = acme_config(&pebble, "tls-alpn-01", web, site_port, &["down.test"]);
    pebble.stop();
    let mut srv = TestServer::builder()
        .config(config)
        .before(|dir, certs| expiring(certs, dir, "down.test"))
        .spawn();
    srv.wait_ready().await;
    let line = srv.wait_log("cannot obtain the certificate").await;
    assert!(line.contains("trying again in 60s"), "{line}");
    let r = client::get(
        &Target::named(srv.addr("site"), &srv.certs.ca_pem, "down.test"),
        "/",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "the old certificate serves on");
    let s = status(&srv).await;
    let acme = &s["acme"][0];
    assert!(
        acme["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{s}"
    );
    assert!(acme["next_attempt"].is_string(), "{s}");
    assert!(acme["not_after"].is_string(), "{s}");
}

/// Issue 31: an ACME failure names its root cause, in the log and in
/// `status`. `ca_roots` is a CA certificate that pebble also serves as its
/// own: webpki refuses a CA certificate as an end-entity one, and the log
/// once said only `new account: client error (Connect)`.
#[tokio::test]
async fn an_acme_failure_names_its_root_cause() {
    let (web, site_port) = (free_port(), free_port());
    let pebble = Pebble::start_serving_a_ca_certificate(web, site_port).await;
    let config = acme_config(&pebble, "tls-alpn-01", web, site_port, &["cause.test"]);
    let mut srv = TestServer::builder()
        .config(config)
        .before(|dir, certs| expiring(certs, dir, "cause.test"))
        .spawn();
    srv.wait_ready().await;
    let line = srv.wait_log("cannot obtain the certificate").await;
    // Every link of the chain: our step, the HTTP client, the TLS cause.
    for part in ["new account", "client error (Connect)", "CaUsedAsEndEntity"] {
        assert!(line.contains(part), "{part:?} missing from: {line}");
    }
    let s = status(&srv).await;
    let last = s["acme"][0]["last_error"].as_str().unwrap_or_default();
    assert!(last.contains("CaUsedAsEndEntity"), "{s}");
}

/// Two processes sharing `storage` (two machines on one volume): one orders,
/// the other waits for the lock, then serves what the first stored.
#[tokio::test]
async fn two_servers_sharing_storage_order_once() {
    let (web, site_port) = (free_port(), free_port());
    let pebble = Pebble::start(web, site_port).await;
    let shared = tempfile::tempdir().unwrap();
    let storage = shared.path().join("acme");
    let config = |web: u16, site: u16| {
        let mut c = acme_config(&pebble, "tls-alpn-01", web, site, &["s.test"]);
        c = c.set(
            "acme",
            json!({
                "directory": pebble.directory(),
                "storage": storage,
                "ca_roots": pebble.ca_roots(),
            }),
        );
        c
    };
    // Only `a` listens where pebble validates; `b` orders just as well,
    // since `a` answers from the shared storage.
    let a = TestServer::builder().config(config(web, site_port)).spawn();
    let b = TestServer::builder()
        .config(config(free_port(), free_port()))
        .spawn();
    let (mut a, mut b) = (a, b);
    let (a1, b1) = (a.wait_ready().await, b.wait_ready().await);
    a.restart_from(a1).await;
    b.restart_from(b1).await;
    let orders = a.logs().matches("ordering a certificate").count()
        + b.logs().matches("ordering a certificate").count();
    assert_eq!(orders, 1, "a:\n{}\nb:\n{}", a.logs(), b.logs());
    let roots = pebble.issuing_roots_pem().await;
    for srv in [&a, &b] {
        let r = client::get(&Target::named(srv.addr("site"), &roots, "s.test"), "/")
            .await
            .unwrap();
        assert_eq!(r.status, 200);
    }
}

/// certbot with `--deploy-hook "gracesrv reload -c ..."`: the renewed
/// certificate is served after the hook, and the hook succeeds.
#[tokio::test]
async fn certbot_renews_and_its_deploy_hook_reloads() {
    let (http, site_port) = (free_port(), free_port());
    let pebble = Pebble::start(http, site_port).await;
    let work = tempfile::tempdir().unwrap();
    let ca = pebble.ca_roots().to_path_buf();
    let certbot = |args: Vec<String>| {
        let (work, ca) = (work.path().to_path_buf(), ca.clone());
        tokio::task::spawn_blocking(move || {
            std::process::Command::new("certbot")
                .args(&args)
                .arg("--config-dir")
                .arg(work.join("config"))
                .arg("--work-dir")
                .arg(work.join("work"))
                .arg("--logs-dir")
                .arg(work.join("logs"))
                .env("REQUESTS_CA_BUNDLE", &ca)
                .output()
                .expect("certbot runs (.ci/run installs it)")
        })
    };
    let s = |v: &[&str]| v.iter().map(|a| a.to_string()).collect::<Vec<String>>();
    let mut args = s(&[
        "certonly",
        "--non-interactive",
        "--standalone",
        "--preferred-challenges",
        "http",
        "--http-01-address",
        "127.0.0.1",
        "--agree-tos",
        "--register-unsafely-without-email",
        "-d",
        "cb.test",
    ]);
    args.extend(["--http-01-port".into(), http.to_string()]);
    args.extend(["--server".into(), pebble.directory()]);
    let out = certbot(args).await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let live = work.path().join("config/live/cb.test");
    let config = Config::new().set("pid_file", "run/g.pid").listener(
        Listener::tls(
            "site",
            &live.join("fullchain.pem").display().to_string(),
            &live.join("privkey.pem").display().to_string(),
        )
        .set("addr", format!("127.0.0.1:{site_port}"))
        .route("/", "respond", json!({ "body": "site {pid}\n" })),
    );
    let mut srv = TestServer::builder().config(config).start().await;
    let roots = pebble.issuing_roots_pem().await;
    let target = Target::named(srv.addr("site"), &roots, "cb.test");
    let serial = || async {
        let c = client::connect(&target).await.unwrap();
        let (_, cert) =
            x509_parser::parse_x509_certificate(c.peer_cert.as_deref().unwrap()).unwrap();
        cert.tbs_certificate.raw_serial().to_vec()
    };
    let before = serial().await;
    let old = srv.pid();
    let hook = format!("{} reload -c {}", util::BIN, srv.config.display());
    let out = certbot(s(&[
        "renew",
        "--non-interactive",
        "--no-random-sleep-on-renew",
        "--force-renewal",
        "--cert-name",
        "cb.test",
        "--deploy-hook",
        &hook,
    ]))
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        !stderr.contains("ran with error"),
        "the hook succeeded: {stderr}"
    );
    // The hook's reload waited for the new generation: it serves already.
    let new = srv.wait_ready().await;
    assert_ne!(new, old);
    assert_ne!(serial().await, before, "the renewed certificate is served");
}
