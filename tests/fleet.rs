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
        .before(before)
        .spawn()
}

/// A TLS target for `name` on `addr`, trusting `roots_pem` only.
fn site(addr: SocketAddr, roots_pem: &str, name: &str) -> Target {
    Target {
        addr,
        tls: Some((
            client::tls_config(roots_pem, &[b"http/1.1".to_vec()]),
            name.into(),
        )),
        h2: false,
    }
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
        if let Ok(mut c) = client::connect(&site(addr, roots, "a.test")).await {
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
    pebble: Pebble,
    redis: Redis,
    _bins: tempfile::TempDir,
    net: Net,
}

impl AcmeFleet {
    /// Three hosts asking for a.test at once, sharing `redis`, with a
    /// key file sealing what is stored; `lock_ttl` for the order lock.
    async fn start(pebble_config: serde_json::Value, renew_before: &str) -> AcmeFleet {
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
            let config = host_config(*addr, i, json!({ "acme": ["a.test"] })).set(
                "acme",
                json!({
                    "directory": pebble.directory(),
                    "storage": redis.url(),
                    "storage_key_file": "store.key",
                    "ca_roots": pebble.ca_roots(),
                    "challenge": "tls-alpn-01",
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
    assert!(
        took < Duration::from_secs(10 + 2 + 8),
        "the order was finished {took:?} after the holder died (lock_ttl 10s)"
    );
    let roots = f.pebble.issuing_roots_pem().await;
    for i in (0..3).filter(|i| *i != victim) {
        pebble_served(f.site(i), &roots, Duration::from_secs(60), None).await;
    }
}
