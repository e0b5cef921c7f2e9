//! A fleet: three gracesrv hosts, each in its own network namespace with
//! its own address (`util::fleet`), sharing ACME state and ticket keys
//! through one Redis, behind HAProxy with health checks, with pebble as the
//! CA (its validations go to HAProxy, which gives them to any host).

mod util;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use util::client::{self, Target};
use util::config::{Config, Listener};
use util::fleet::{copy_binary, Haproxy, Net, Redis};
use util::pebble::Pebble;
use util::{free_port, Certs, TestServer};

/// Where each host serves: TLS (the ACME name) and plain HTTP.
const SITE: u16 = 8443;
const WEB: u16 = 8080;

/// HAProxy in front of `hosts`: TLS passed through on `tls` (where pebble
/// validates tls-alpn-01), HTTP on `web`, each with health checks.
fn haproxy(hosts: &[std::net::Ipv4Addr], tls: SocketAddr, web: SocketAddr) -> Haproxy {
    let servers = |port: u16, extra: &str| {
        hosts
            .iter()
            .enumerate()
            .map(|(i, h)| {
                format!("  server h{i} {h}:{port} check inter 300ms fall 2 rise 1{extra}\n")
            })
            .collect::<String>()
    };
    let body = format!(
        "frontend tls\n  mode tcp\n  bind {tls}\n  default_backend sites\n\
         backend sites\n  mode tcp\n  balance roundrobin\n  option redispatch\n  retries 3\n{}\
         frontend web\n  mode http\n  bind {web}\n  default_backend webs\n\
         backend webs\n  mode http\n  balance roundrobin\n  option redispatch\n  retries 3\n  option httpchk GET /\n{}",
        servers(SITE, ""),
        servers(WEB, ""),
    );
    Haproxy::start(&body, web)
}

/// One host's config: `site` (TLS, `tls`) and `web` (plain) on its own
/// address, answering which host and process served.
fn host_config(addr: std::net::Ipv4Addr, i: usize, tls: serde_json::Value) -> Config {
    Config::new()
        .set("pid_file", "gracesrv.pid")
        .listener(
            Listener::plain("site")
                .set("addr", format!("{addr}:{SITE}"))
                .set("tls", tls)
                .route(
                    "/",
                    "respond",
                    json!({ "body": format!("host {i} {{pid}}\n") }),
                ),
        )
        .listener(
            Listener::plain("web")
                .set("addr", format!("{addr}:{WEB}"))
                .route("/status", "status", json!({}))
                .route(
                    "/",
                    "respond",
                    json!({ "body": format!("host {i} {{pid}}\n") }),
                ),
        )
}

/// Starts host `i` of `net` (a copy of the binary in `bin`) without
/// waiting for it.
fn spawn_host(
    net: &Net,
    i: usize,
    bin: &Path,
    config: Config,
    before: impl FnOnce(&Path, &Certs) + 'static,
) -> TestServer {
    let exe = copy_binary(&bin.join(format!("h{i}")));
    TestServer::builder()
        .config(config)
        .command(net.command(i, &exe))
        // Not a line per request: the loads here are large.
        .env("GRACESRV_LOG", "gracesrv=info")
        .before(before)
        .spawn()
}

/// The certificate (DER) `addr` serves for a.test, once it is one pebble
/// issued (verified against its roots) other than `not`; waits up to
/// `limit`.
async fn pebble_served(
    addr: SocketAddr,
    roots: &str,
    limit: Duration,
    not: Option<&[u8]>,
) -> Vec<u8> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(mut c) = client::connect(&Target::named(addr, roots, "a.test")).await {
            if c.get("/").await.is_ok_and(|r| r.status == 200) {
                let cert = c.peer_cert.clone().unwrap_or_default();
                if Some(&cert[..]) != not {
                    return cert;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "{addr} does not serve a new pebble certificate within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Everything of one ACME fleet test.
struct AcmeFleet {
    // Dropped in this order: hosts, then what they use, then the network.
    hosts: Vec<Option<TestServer>>,
    haproxy: Haproxy,
    /// HAProxy's HTTP port (to every host's `web`).
    haproxy_web: u16,
    pebble: Pebble,
    redis: Redis,
    _bins: tempfile::TempDir,
    net: Net,
}

impl AcmeFleet {
    /// Three hosts asking for a.test at once, sharing `redis`, with a
    /// key file sealing what is stored; `lock_ttl` for the order lock.
    async fn start(pebble_config: serde_json::Value, renew_before: &str) -> AcmeFleet {
        AcmeFleet::start_with("tls-alpn-01", &["a.test"], pebble_config, renew_before).await
    }

    /// The same, proving control with `challenge`.
    async fn start_with(
        challenge: &str,
        names: &[&str],
        pebble_config: serde_json::Value,
        renew_before: &str,
    ) -> AcmeFleet {
        let net = Net::new(3);
        let redis = Redis::start(net.gateway);
        let (tls, web) = (
            SocketAddr::from((net.gateway, free_port())),
            SocketAddr::from((net.gateway, free_port())),
        );
        let pebble = Pebble::start_on(
            net.gateway,
            net.gateway,
            web.port(),
            tls.port(),
            pebble_config,
        )
        .await;
        let haproxy = haproxy(&net.hosts, tls, web);
        let bins = tempfile::tempdir().unwrap();
        let key = [7u8; 48];
        let mut hosts = Vec::new();
        for (i, addr) in net.hosts.iter().enumerate() {
            let config = host_config(*addr, i, json!({ "acme": names }))
                .set("access_log", json!({ "path": "access.log" }))
                .set(
                    "acme",
                    json!({
                        "directory": pebble.directory(),
                        "storage": redis.url(),
                        "storage_key_file": "store.key",
                        "ca_roots": pebble.ca_roots(),
                        "challenge": challenge,
                        "lock_ttl": "10s",
                        "renew_before": renew_before,
                    }),
                );
            hosts.push(Some(spawn_host(
                &net,
                i,
                bins.path(),
                config,
                move |dir, _| {
                    std::fs::write(dir.join("store.key"), key).unwrap();
                },
            )));
        }
        for h in hosts.iter_mut().flatten() {
            h.wait_ready().await;
        }
        AcmeFleet {
            hosts,
            haproxy,
            haproxy_web: web.port(),
            pebble,
            redis,
            _bins: bins,
            net,
        }
    }

    fn site(&self, i: usize) -> SocketAddr {
        SocketAddr::from((self.net.hosts[i], SITE))
    }

    /// Who holds the order lock (the pid in its token), if anyone.
    fn lock_holder(&self) -> Option<u32> {
        let v = self.redis.cli(&["GET", "gracesrv:acme:lock"]);
        let holder = v.split(' ').next()?;
        holder.rsplit(':').next()?.parse().ok()
    }

    fn stored_cert(&self) -> String {
        self.redis.cli(&["GET", "gracesrv:acme:cert:a.test"])
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hosts_starting_at_once_order_one_certificate_and_all_serve_it() {
    let started = Instant::now();
    let f = AcmeFleet::start(json!({}), "30d").await;
    let roots = f.pebble.issuing_roots_pem().await;
    let mut served = Vec::new();
    for i in 0..3 {
        served.push(pebble_served(f.site(i), &roots, Duration::from_secs(60), None).await);
    }
    assert!(
        served.iter().all(|s| *s == served[0]),
        "one certificate for all three"
    );
    eprintln!(
        "all three hosts serve the certificate {:?} after they started",
        started.elapsed()
    );
    assert_eq!(f.pebble.orders(), 1, "exactly one order reached pebble");
    // Stored sealed (storage_key_file): no PEM in the clear.
    let stored = f.stored_cert();
    assert!(!stored.is_empty() && !stored.contains("BEGIN"), "{stored}");
    // No challenge answer left behind, the lock released.
    assert_eq!(
        f.redis
            .cli(&["--scan", "--pattern", "gracesrv:acme:challenge:*"]),
        ""
    );
    assert_eq!(f.lock_holder(), None);
    // Each host's copy, owner-only.
    use std::os::unix::fs::PermissionsExt;
    for h in f.hosts.iter().flatten() {
        let key = h.dir.path().join("acme/certs/a.test/key.pem");
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", key.display());
    }
    // HAProxy's health checks saw every host up.
    f.haproxy.wait_all_up("sites").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_http_01_whichever_host_the_validation_reaches_answers_it() {
    // Three names: three validations, which HAProxy spreads over the hosts.
    let names = ["a.test", "b.test", "c.test"];
    let f = AcmeFleet::start_with("http-01", &names, json!({}), "30d").await;
    let roots = f.pebble.issuing_roots_pem().await;
    for i in 0..3 {
        pebble_served(f.site(i), &roots, Duration::from_secs(60), None).await;
    }
    assert_eq!(f.pebble.orders(), 1);
    // The hosts that answered a validation (their access logs): more than
    // the one that ordered, all with the answer.
    let mut answered = 0;
    for h in f.hosts.iter().flatten() {
        let log = std::fs::read_to_string(h.dir.path().join("access.log")).unwrap_or_default();
        let challenges: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("/.well-known/acme-challenge/"))
            .collect();
        assert!(
            challenges.iter().all(|l| l.contains("\"status\":200")),
            "{challenges:?}"
        );
        answered += usize::from(!challenges.is_empty());
        let dir = h.dir.path().join("acme/challenges/http-01");
        assert_eq!(std::fs::read_dir(dir).unwrap().count(), 0, "none left");
    }
    assert!(answered >= 2, "validations reached {answered} host(s)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_killed_mid_order_leaves_the_lock_to_another_within_its_ttl() {
    let mut f = AcmeFleet::start(json!({}), "30d").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let holder = loop {
        if let Some(pid) = f.lock_holder() {
            break pid;
        }
        assert!(Instant::now() < deadline, "no host took the lock");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let victim = f
        .hosts
        .iter()
        .position(|h| h.as_ref().is_some_and(|h| h.pid() == holder))
        .expect("the holder is one of the hosts");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(holder as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let killed = Instant::now();
    assert_eq!(f.stored_cert(), "", "killed before it finished the order");
    f.hosts[victim] = None;
    // The lock lapses within its TTL (10 s) of the last renewal; another
    // host, looking every 2 s, takes it.
    let deadline = killed + Duration::from_secs(30);
    loop {
        match f.lock_holder() {
            Some(pid) if pid != holder => break,
            // Taken, and the order done already.
            _ if !f.stored_cert().is_empty() => break,
            _ => {}
        }
        assert!(Instant::now() < deadline, "nobody took the lock over");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let taken = killed.elapsed();
    eprintln!("another host took the lock {taken:?} after the holder was killed");
    assert!(
        taken <= Duration::from_millis(10_000 + 2_500),
        "the lock was taken over {taken:?} after its holder died (lock_ttl 10s)"
    );
    // Another host takes the lock once its TTL (10 s) has run out, orders
    // and stores the certificate.
    let deadline = killed + Duration::from_secs(30);
    while f.stored_cert().is_empty() {
        assert!(
            Instant::now() < deadline,
            "nobody finished the order:\n{}",
            f.pebble.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = killed.elapsed();
    eprintln!("the order was finished by another host {took:?} after the holder was killed");
    assert!(
        took < Duration::from_secs(10 + 2 + 8),
        "the order was finished {took:?} after the holder died (lock_ttl 10s)"
    );
    let roots = f.pebble.issuing_roots_pem().await;
    for i in (0..3).filter(|i| *i != victim) {
        pebble_served(f.site(i), &roots, Duration::from_secs(60), None).await;
    }
}

/// How many ticket keys `redis` holds.
fn ticket_keys(redis: &Redis) -> usize {
    redis
        .cli(&["--scan", "--pattern", "gracesrv:tickets:*"])
        .lines()
        .count()
}

/// Copies `site.crt` and `site.key` from `from` into a host's directory:
/// one certificate for every host.
fn same_site_cert(from: &Path, dir: &Path) {
    for f in ["site.crt", "site.key"] {
        std::fs::copy(from.join(f), dir.join(f)).unwrap();
    }
}

/// `/status` of host `srv` (its `web` listener).
async fn status(srv: &TestServer) -> serde_json::Value {
    let r = client::get(&Target::plain(srv.addr("web")), "/status")
        .await
        .unwrap();
    serde_json::from_str(&r.body).unwrap()
}

/// Waits until host `srv` seals new tickets with the fleet's key.
async fn wait_shared_tickets(srv: &TestServer) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = status(srv).await;
        if s["tls_tickets"]["issuing_with"] == "shared" {
            return;
        }
        assert!(Instant::now() < deadline, "no fleet ticket key: {s}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Connects with `t` (whose client config keeps its sessions), makes a
/// request, and says whether the session was resumed.
async fn resumed(t: &Target) -> bool {
    let mut c = client::connect(t).await.unwrap();
    assert_eq!(c.get("/").await.unwrap().status, 200);
    c.resumed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_from_one_host_resumes_on_the_others_through_restarts() {
    let net = Net::new(3);
    let mut redis = Redis::start(net.gateway);
    let bins = tempfile::tempdir().unwrap();
    // One certificate for the site, on every host.
    let shared = tempfile::tempdir().unwrap();
    let certs = Certs::new();
    certs.leaf(shared.path(), "site", &["localhost"], 1);
    let mut hosts = Vec::new();
    for (i, addr) in net.hosts.iter().enumerate() {
        let config = host_config(*addr, i, json!({ "cert": "site.crt", "key": "site.key" })).set(
            "tls_tickets",
            json!({ "storage": redis.url(), "storage_key_file": "store.key" }),
        );
        let from = shared.path().to_path_buf();
        hosts.push(spawn_host(&net, i, bins.path(), config, move |dir, _| {
            same_site_cert(&from, dir);
            std::fs::write(dir.join("store.key"), [3u8; 32]).unwrap();
        }));
    }
    for h in &mut hosts {
        h.wait_ready().await;
    }
    for h in &hosts {
        wait_shared_tickets(h).await;
    }
    // Sealed in the store.
    let keys = redis.cli(&["--scan", "--pattern", "gracesrv:tickets:*"]);
    assert_eq!(
        keys.lines().count(),
        3,
        "previous, current, next period: {keys}"
    );
    let one = redis.cli(&["GET", keys.lines().next().unwrap()]);
    assert!(
        !one.is_empty() && !one.chars().all(|c| c.is_ascii_hexdigit()),
        "sealed: {one}"
    );

    let config = client::tls_config(&certs.ca_pem, &[b"http/1.1".to_vec()]);
    let target = |i: usize| Target::tls(SocketAddr::from((net.hosts[i], SITE)), config.clone());
    assert!(
        !resumed(&target(0)).await,
        "the first connection is a full handshake"
    );
    assert!(
        resumed(&target(1)).await,
        "a session from host 0 resumes on host 1"
    );
    assert!(resumed(&target(2)).await, "and on host 2");
    // openssl, a TLS stack not built on rustls.
    let session = shared.path().join("session.pem");
    let first = util::s_client(
        SocketAddr::from((net.hosts[2], SITE)),
        &["-sess_out", session.to_str().unwrap()],
    );
    assert!(first.contains("host 2"), "{first}");
    for i in [0, 1] {
        let again = util::s_client(
            SocketAddr::from((net.hosts[i], SITE)),
            &["-sess_in", session.to_str().unwrap()],
        );
        assert!(
            again.contains("Reused, TLSv1.3") && again.contains(&format!("host {i}")),
            "host {i}:\n{again}"
        );
    }
    // Through restarts of every host, one after another.
    for h in &mut hosts {
        h.restart().await;
        wait_shared_tickets(h).await;
    }
    for i in 0..3 {
        assert!(resumed(&target(i)).await, "host {i} after the restarts");
    }
    // With the store gone, a restarted host keeps the keys it was handed.
    redis.stop();
    hosts[1].restart().await;
    assert_eq!(
        status(&hosts[1]).await["tls_tickets"]["issuing_with"],
        "shared"
    );
    assert!(
        resumed(&target(1)).await,
        "host 1 restarted with the store down"
    );
    assert!(resumed(&target(0)).await);
}

/// Runs `gracesrv reload -c CONFIG` on host `i` (its control socket is
/// in the host's network namespace); its exit code and output.
async fn reload(net: &Net, i: usize, config: &Path) -> (i32, String) {
    let out = tokio::process::Command::from(net.command(i, Path::new(util::BIN)))
        .arg("reload")
        .arg("-c")
        .arg(config)
        .output()
        .await
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

/// wrk's output: requests made, and any failure it reports.
fn wrk_result(out: &str) -> u64 {
    let requests: u64 = out
        .lines()
        .find_map(|l| l.trim().split_once(" requests in "))
        .and_then(|(n, _)| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        !out.contains("Non-2xx") && !out.contains("Socket errors"),
        "requests failed:\n{out}"
    );
    requests
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_and_binary_upgrade_behind_haproxy_loses_nothing() {
    let net = Net::new(3);
    let bins = tempfile::tempdir().unwrap();
    let (tls, web) = (
        SocketAddr::from((net.gateway, free_port())),
        SocketAddr::from((net.gateway, free_port())),
    );
    let haproxy = haproxy(&net.hosts, tls, web);
    let mut hosts = Vec::new();
    for (i, addr) in net.hosts.iter().enumerate() {
        let config = host_config(*addr, i, json!({ "cert": "site.crt", "key": "site.key" }));
        hosts.push(spawn_host(&net, i, bins.path(), config, |dir, certs| {
            certs.leaf(dir, "site", &["localhost"], 1);
        }));
    }
    for h in &mut hosts {
        h.wait_ready().await;
    }
    haproxy.wait_all_up("webs").await;
    let seen = haproxy.log().len();
    let started = Instant::now();
    let wrk = tokio::process::Command::new("wrk")
        .args(["-t2", "-c16", "-d30s"])
        .arg(format!("http://{web}/"))
        .output();
    let wrk = tokio::spawn(wrk);
    // `gracesrv reload` on each host in turn, then a new binary on each.
    for round in ["reload", "binary upgrade"] {
        for (i, h) in hosts.iter_mut().enumerate() {
            let before = h.pid();
            if round == "binary upgrade" {
                let exe = bins.path().join(format!("h{i}/gracesrv"));
                let tmp = exe.with_extension("new");
                std::fs::copy(util::BIN, &tmp).unwrap();
                std::fs::rename(&tmp, &exe).unwrap();
            }
            let (code, out) = reload(&net, i, &h.config).await;
            assert_eq!(code, 0, "{round} of host {i}: {out}");
            let after = h.wait_ready().await;
            assert_ne!(before, after, "{round} of host {i}");
            util::wait_gone(before).await;
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(28),
        "the restarts took longer than the load"
    );
    let out = wrk.await.unwrap().unwrap();
    let requests = wrk_result(&String::from_utf8_lossy(&out.stdout));
    assert!(requests > 2000, "{requests} requests");
    eprintln!("wrk through HAProxy: {requests} requests over 6 restarts, none failed");
    // No health check failed during the restarts.
    let log = haproxy.log();
    assert!(!log[seen..].contains("is DOWN"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_minutes_without_redis_under_load_lose_nothing_and_the_renewal_follows() {
    // Certificates of an hour, renewed with 58 minutes left: the renewal
    // falls due while Redis is away, and waits for it (the lock is there).
    let mut f = AcmeFleet::start(json!({ "certificateValidityPeriod": 3600 }), "58m").await;
    let roots = f.pebble.issuing_roots_pem().await;
    let mut first = Vec::new();
    for i in 0..3 {
        first.push(pebble_served(f.site(i), &roots, Duration::from_secs(60), None).await);
    }
    f.haproxy.wait_all_up("webs").await;
    let web = SocketAddr::from((f.net.gateway, f.haproxy_web));
    let wrk = tokio::process::Command::new("wrk")
        .args(["-t2", "-c8", "-d600s"])
        .arg(format!("http://{web}/"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let seen: Vec<usize> = f.hosts.iter().flatten().map(|h| h.log_count()).collect();
    f.redis.stop();
    // The outage is what is tested: two minutes of it.
    tokio::time::sleep(Duration::from_secs(120)).await;
    for h in f.hosts.iter().flatten() {
        let s = status(h).await;
        assert_eq!(s["acme_store"]["reachable"], false, "{s}");
        assert!(
            s["acme_store"]["unreachable_for_s"].as_u64() > Some(100),
            "{s}"
        );
    }
    for (i, cert) in first.iter().enumerate() {
        let served = pebble_served(f.site(i), &roots, Duration::from_secs(5), None).await;
        assert_eq!(
            &served, cert,
            "host {i} serves its certificate through the outage"
        );
    }
    f.redis.resume();
    let back = Instant::now();
    for (i, cert) in first.iter().enumerate() {
        pebble_served(f.site(i), &roots, Duration::from_secs(90), Some(cert)).await;
    }
    eprintln!(
        "every host serves the renewed certificate {:?} after Redis came back",
        back.elapsed()
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(wrk.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = wrk.wait_with_output().await.unwrap();
    let requests = wrk_result(&String::from_utf8_lossy(&out.stdout));
    assert!(requests > 10_000, "{requests} requests");
    eprintln!("wrk through HAProxy: {requests} requests, none failed");
    for h in f.hosts.iter().flatten() {
        // The generation serving the renewal has asked the store by now, or
        // will in a moment.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = status(h).await;
            assert_eq!(s["acme_store"]["url"], f.redis.url(), "{s}");
            if s["acme_store"]["reachable"] == true {
                break;
            }
            assert!(Instant::now() < deadline, "{s}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // One line a minute at most while Redis was away, and one when back.
    for (h, seen) in f.hosts.iter().flatten().zip(seen) {
        let logs = h.logs();
        let lines: Vec<&str> = logs.lines().skip(seen).collect();
        let away = lines.iter().filter(|l| l.contains("unreachable")).count();
        assert!(
            (1..=3).contains(&away),
            "{away} lines:\n{}",
            lines.join("\n")
        );
        eprintln!("a host logged {away} lines while Redis was away");
        assert!(
            lines.iter().any(|l| l.contains("reachable again")),
            "{}",
            lines.join("\n")
        );
    }
    // The store caught up: the renewed certificate is in it, sealed.
    let stored = f.stored_cert();
    assert!(!stored.is_empty() && !stored.contains("BEGIN"));
    assert_eq!(f.pebble.orders(), 2, "the first order and the renewal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_sentinel_the_keys_survive_a_failover() {
    let net = Net::new(2);
    let mut master = Redis::start(net.gateway);
    let (ip, port) = (master.addr.ip().to_string(), master.addr.port().to_string());
    let replica = Redis::start_with(net.gateway, &["--replicaof", &ip, &port]);
    let sentinel = Redis::sentinel(net.gateway, "main", master.addr);
    let url = format!("redis+sentinel://{}/main/0", sentinel.addr);
    let bins = tempfile::tempdir().unwrap();
    let shared = tempfile::tempdir().unwrap();
    let certs = Certs::new();
    certs.leaf(shared.path(), "site", &["localhost"], 1);
    let start = |i: usize| {
        let config = host_config(
            net.hosts[i],
            i,
            json!({ "cert": "site.crt", "key": "site.key" }),
        )
        .set("tls_tickets", json!({ "storage": url }));
        let from = shared.path().to_path_buf();
        spawn_host(&net, i, bins.path(), config, move |dir, _| {
            same_site_cert(&from, dir)
        })
    };
    let mut first = start(0);
    first.wait_ready().await;
    wait_shared_tickets(&first).await;
    assert_eq!(
        ticket_keys(&master),
        3,
        "the keys are in the master the Sentinel named"
    );
    let config = client::tls_config(&certs.ca_pem, &[b"http/1.1".to_vec()]);
    let target = |i: usize| Target::tls(SocketAddr::from((net.hosts[i], SITE)), config.clone());
    assert!(!resumed(&target(0)).await);
    // The replica has them (replication), and the master goes.
    util::until("the replica has the keys", || ticket_keys(&replica) == 3).await;
    master.stop();
    util::until("the Sentinel names the replica master", || {
        sentinel
            .cli(&["SENTINEL", "get-master-addr-by-name", "main"])
            .ends_with(&replica.addr.port().to_string())
    })
    .await;
    // A host starting now finds the keys through the Sentinel, on the new
    // master: a session from host 0 resumes on it.
    let mut second = start(1);
    second.wait_ready().await;
    wait_shared_tickets(&second).await;
    assert!(
        resumed(&target(1)).await,
        "resumed on a host that found the keys after the failover"
    );
    drop((first, second));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_rediss_the_store_is_verified_with_storage_ca() {
    let net = Net::new(2);
    let tls = tempfile::tempdir().unwrap();
    let certs = Certs::new();
    certs.leaf(tls.path(), "redis", &[&net.gateway.to_string()], 1);
    std::fs::write(tls.path().join("ca.pem"), &certs.ca_pem).unwrap();
    let redis = Redis::start_tls(net.gateway, tls.path());
    let url = format!("rediss://{}/0", redis.addr);
    let bins = tempfile::tempdir().unwrap();
    let start = |i: usize, with_ca: bool| {
        let mut tickets = json!({ "storage": url });
        if with_ca {
            tickets["storage_ca"] = json!("redis-ca.pem");
        }
        let config = host_config(
            net.hosts[i],
            i,
            json!({ "cert": "site.crt", "key": "site.key" }),
        )
        .set("tls_tickets", tickets);
        let ca = tls.path().join("ca.pem");
        spawn_host(&net, i, bins.path(), config, move |dir, certs| {
            certs.leaf(dir, "site", &["localhost"], 1);
            std::fs::copy(&ca, dir.join("redis-ca.pem")).unwrap();
        })
    };
    let mut trusted = start(0, true);
    trusted.wait_ready().await;
    // `check` says where the keys come from.
    let check = std::process::Command::new(util::BIN)
        .args(["check", "-c"])
        .arg(&trusted.config)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&check.stdout);
    assert!(
        said.contains(&format!("tls_tickets      shared through {url}")),
        "{said}"
    );
    wait_shared_tickets(&trusted).await;
    assert_eq!(ticket_keys(&redis), 3);
    // Without storage_ca the server's certificate is not trusted: the host
    // serves on with keys of its own and says why, once.
    let mut untrusted = start(1, false);
    untrusted.wait_ready().await;
    let line = untrusted.wait_log("the store is unreachable").await;
    assert!(
        line.contains("certificate") || line.contains("Certificate"),
        "{line}"
    );
    assert_eq!(
        status(&untrusted).await["tls_tickets"]["issuing_with"],
        "derived"
    );
}
