//! Let's Encrypt's ACME test server, pebble (Debian package `pebble`), on
//! loopback, for the ACME tests. Two processes:
//!
//! - `pebble-challtestsrv`, only as a DNS server: every A query is answered
//!   with 127.0.0.1, and AAAA queries with no address (given one, pebble
//!   validates on `[::1]` first), so any name (`a.test`) is this host;
//! - `pebble`, resolving names with that DNS server, and validating http-01
//!   on `http_port` and tls-alpn-01 on `tls_port` (of 127.0.0.1).
//!
//! Pebble runs with `PEBBLE_VA_NOSLEEP=1` (no random 0-15 s sleep before a
//! validation), `PEBBLE_WFE_NONCEREJECT=0` (it rejects 5% of good nonces by
//! default) and `PEBBLE_AUTHZREUSE=0` (it reuses a valid authorization half
//! of the time by default: with 0 every order is validated again); it never
//! runs with `PEBBLE_VA_ALWAYS_VALID`. `start_with` overrides any of these.
//!
//! Pebble keeps no state: a restarted pebble has a new issuing root, and the
//! accounts of the previous run are gone (`accountDoesNotExist`).
//!
//! Neither program signals readiness other than by log lines printed before
//! it listens, so the helper polls: a DNS query until challtestsrv answers
//! it, a TCP connect until pebble's listeners accept.

use std::fs::File;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::net::TcpStream;

use super::{client, free_port, Certs, WAIT};

pub struct Pebble {
    /// Config, certificates and the logs of both programs.
    dir: tempfile::TempDir,
    /// The CA of pebble's own HTTPS listeners (ACME and management).
    ca_pem: String,
    /// `ca_pem` in a file.
    ca_file: PathBuf,
    challtestsrv: Child,
    /// None while stopped.
    pebble: Option<Child>,
    dns_port: u16,
    acme: SocketAddr,
    management: SocketAddr,
    /// Environment for pebble, after the defaults.
    env: Vec<(String, String)>,
}

impl Pebble {
    /// Starts challtestsrv (DNS: every name is 127.0.0.1) and pebble; `http_port`
    /// and `tls_port` are where pebble connects to validate http-01 and
    /// tls-alpn-01.
    pub async fn start(http_port: u16, tls_port: u16) -> Pebble {
        Self::start_with(http_port, tls_port, serde_json::json!({}), &[]).await
    }

    /// Like `start`, with `config` (a JSON object) merged into pebble's config,
    /// e.g. `{"certificateValidityPeriod": 3600}` (seconds; the default is 5
    /// years), and `env` added to pebble's environment, e.g.
    /// `("PEBBLE_WFE_NONCEREJECT", "50")`.
    pub async fn start_with(
        http_port: u16,
        tls_port: u16,
        config: serde_json::Value,
        env: &[(&str, &str)],
    ) -> Pebble {
        Self::start_inner(
            http_port,
            tls_port,
            config,
            env,
            false,
            Ipv4Addr::LOCALHOST,
            Ipv4Addr::LOCALHOST,
        )
        .await
    }

    /// Like `start`, with pebble's listeners on `listen` (reachable from
    /// other network namespaces) and every name resolving to `target` (a
    /// load balancer in front of several hosts).
    pub async fn start_on(
        listen: Ipv4Addr,
        target: Ipv4Addr,
        http_port: u16,
        tls_port: u16,
        config: serde_json::Value,
    ) -> Pebble {
        Self::start_inner(http_port, tls_port, config, &[], false, listen, target).await
    }

    /// Like `start`, but pebble's HTTPS listeners present a self-signed CA
    /// certificate (CA:TRUE) as their own, and `ca_roots` is that
    /// certificate: what a user gets by pointing `acme.ca_roots` at a CA
    /// that the ACME server also serves with. webpki refuses it
    /// (`CaUsedAsEndEntity`).
    pub async fn start_serving_a_ca_certificate(http_port: u16, tls_port: u16) -> Pebble {
        Self::start_inner(
            http_port,
            tls_port,
            serde_json::json!({}),
            &[],
            true,
            Ipv4Addr::LOCALHOST,
            Ipv4Addr::LOCALHOST,
        )
        .await
    }

    async fn start_inner(
        http_port: u16,
        tls_port: u16,
        config: serde_json::Value,
        env: &[(&str, &str)],
        ca_as_server: bool,
        listen: Ipv4Addr,
        target: Ipv4Addr,
    ) -> Pebble {
        let listen_ip = listen.to_string();
        let extra = match config {
            serde_json::Value::Object(extra) => extra,
            other => panic!("pebble config must be a JSON object, not {other}"),
        };
        let dir = tempfile::tempdir().expect("temp dir for pebble");
        // Pebble's HTTPS listeners need a certificate; the package ships none.
        let ca_file = dir.path().join("ca.pem");
        let ca_pem = if ca_as_server {
            let mut params = rcgen::CertificateParams::new(vec![
                "localhost".to_string(),
                "127.0.0.1".to_string(),
            ])
            .expect("CA certificate parameters");
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let key = rcgen::KeyPair::generate().expect("CA key");
            let cert = params
                .self_signed(&key)
                .expect("self-signed CA certificate");
            std::fs::write(dir.path().join("pebble.crt"), cert.pem()).expect("write pebble.crt");
            std::fs::write(dir.path().join("pebble.key"), key.serialize_pem())
                .expect("write pebble.key");
            cert.pem()
        } else {
            let certs = Certs::new();
            certs.leaf(
                dir.path(),
                "pebble",
                &["localhost", "127.0.0.1", &listen_ip],
                1,
            );
            certs.ca_pem
        };
        std::fs::write(&ca_file, &ca_pem).expect("write ca.pem");

        let acme = SocketAddr::from((listen, free_port()));
        let management = SocketAddr::from((listen, free_port()));
        let dns_port = free_dns_port();
        let mut pebble_config = serde_json::json!({
            "listenAddress": acme.to_string(),
            "managementListenAddress": management.to_string(),
            "certificate": "pebble.crt",
            "privateKey": "pebble.key",
            "httpPort": http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        });
        pebble_config
            .as_object_mut()
            .expect("an object")
            .extend(extra);
        let text = serde_json::to_string_pretty(&serde_json::json!({ "pebble": pebble_config }))
            .expect("pebble config as JSON");
        std::fs::write(dir.path().join("pebble.json"), text).expect("write pebble.json");

        let challtestsrv = spawn(
            dir.path(),
            "challtestsrv.log",
            Command::new("pebble-challtestsrv")
                .arg("-dns01")
                .arg(format!("127.0.0.1:{dns_port}"))
                .args(["-defaultIPv4", &target.to_string(), "-defaultIPv6", ""])
                // Its challenge servers are not used: disabled.
                .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
                // An empty -management would listen on port 80 of every address.
                .args(["-management", "127.0.0.1:0"]),
        );
        let mut p = Pebble {
            dir,
            ca_pem,
            ca_file,
            challtestsrv,
            pebble: None,
            dns_port,
            acme,
            management,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        wait_until(
            "pebble-challtestsrv",
            &mut p.challtestsrv,
            p.dir.path(),
            move || async move { resolve_a(dns_port, "a.test").await == Some(target) },
        )
        .await;
        p.start_pebble().await;
        p
    }

    async fn start_pebble(&mut self) {
        let mut cmd = Command::new("pebble");
        cmd.args(["-config", "pebble.json", "-strict=false", "-dnsserver"])
            .arg(format!("127.0.0.1:{}", self.dns_port))
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .env_remove("PEBBLE_VA_ALWAYS_VALID");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        // Owned by `self` before the wait, so a failed wait still kills it.
        let child = self
            .pebble
            .insert(spawn(self.dir.path(), "pebble.log", &mut cmd));
        let (acme, management) = (self.acme, self.management);
        wait_until("pebble", child, self.dir.path(), move || async move {
            TcpStream::connect(acme).await.is_ok() && TcpStream::connect(management).await.is_ok()
        })
        .await;
    }

    /// The ACME directory URL: `https://127.0.0.1:PORT/dir`.
    pub fn directory(&self) -> String {
        format!("https://{}/dir", self.acme)
    }

    /// A PEM file that verifies pebble's HTTPS listeners (for 127.0.0.1 and
    /// localhost); not the CA of the certificates pebble issues.
    pub fn ca_roots(&self) -> &Path {
        &self.ca_file
    }

    /// The contents of `ca_roots`.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The address of the management API (HTTPS, same CA as the directory).
    pub fn management_addr(&self) -> SocketAddr {
        self.management
    }

    /// The root that signs the certificates pebble issues (via an
    /// intermediate), as PEM. Pebble makes a new one at every start.
    pub async fn issuing_roots_pem(&self) -> String {
        self.management_get("/roots/0").await
    }

    /// The intermediate pebble issues certificates from, as PEM.
    pub async fn intermediate_pem(&self) -> String {
        self.management_get("/intermediates/0").await
    }

    /// The body of a 200 response of the management API to `GET path`.
    pub async fn management_get(&self, path: &str) -> String {
        let tls = client::tls_config(&self.ca_pem, &[b"http/1.1".to_vec()]);
        let target = client::Target::tls(self.management, tls);
        match client::get(&target, path).await {
            Ok(resp) if resp.status == http::StatusCode::OK => resp.body,
            other => panic!(
                "pebble management GET {path}: {other:?}; logs:\n{}",
                self.logs()
            ),
        }
    }

    /// Kills pebble (challtestsrv stays); the directory stops answering.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.pebble.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts pebble again (after `stop`, or in place of the running one) on
    /// the same ports, with no state from before.
    pub async fn restart(&mut self) {
        self.stop();
        self.start_pebble().await;
    }

    /// How many orders pebble has taken (its `Added order` log lines).
    pub fn orders(&self) -> usize {
        self.logs().matches("Added order").count()
    }

    /// Both programs' output so far (pebble's across restarts).
    pub fn logs(&self) -> String {
        logs(self.dir.path())
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        self.stop();
        let _ = self.challtestsrv.kill();
        let _ = self.challtestsrv.wait();
    }
}

fn logs(dir: &Path) -> String {
    ["challtestsrv.log", "pebble.log"]
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(dir.join(f)).unwrap_or_default();
            format!("---- {f} ----\n{text}")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs `cmd` in `dir` with stdout and stderr appended to `dir/log`.
fn spawn(dir: &Path, log: &str, cmd: &mut Command) -> Child {
    let out = File::options()
        .create(true)
        .append(true)
        .open(dir.join(log))
        .expect("open log file");
    let err = out.try_clone().expect("dup log file");
    cmd.current_dir(dir)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "spawn {:?} (from the Debian package pebble): {e}",
                cmd.get_program()
            )
        })
}

/// Waits until `ready()` holds; fails early if `child` exits, and after `WAIT`.
async fn wait_until<F: Future<Output = bool>>(
    what: &str,
    child: &mut Child,
    dir: &Path,
    mut ready: impl FnMut() -> F,
) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if ready().await {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited ({status}); logs:\n{}", logs(dir));
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} not ready within {WAIT:?}; logs:\n{}",
            logs(dir)
        );
        // No readiness signal but a log line printed before it listens: poll.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A port on 127.0.0.1 free for both UDP and TCP: the DNS server listens on
/// both (given port 0 it would pick a different port for each). Like
/// `free_port`, never one given out before in this process.
fn free_dns_port() -> u16 {
    for _ in 0..100 {
        let port = free_port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no port free for both UDP and TCP");
}

/// The address in the first answer of the DNS server on 127.0.0.1:`port` to
/// an A query for `name`; None for no (timely) answer or no A record.
async fn resolve_a(port: u16, name: &str) -> Option<Ipv4Addr> {
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.ok()?;
    sock.connect(("127.0.0.1", port)).await.ok()?;
    // Header: id, flags (recursion desired), 1 question, 0 other records.
    let mut query = vec![0x67, 0x73, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        query.push(label.len() as u8);
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]); // root label, type A, class IN
    sock.send(&query).await.ok()?;
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_millis(200), sock.recv(&mut buf))
        .await
        .ok()?
        .ok()?;
    let msg = &buf[..n];
    let answers = u16::from_be_bytes([*msg.get(6)?, *msg.get(7)?]);
    if !msg.starts_with(&query[..2]) || answers == 0 {
        return None;
    }
    // Skip the question (name, type, class), then the answer's name; then
    // type (2), class (2), TTL (4), length (2) and the address.
    let at = skip_name(msg, 12)? + 4;
    let at = skip_name(msg, at)?;
    let rr = msg.get(at..at + 14)?;
    (rr[..2] == [0, 1] && rr[8..10] == [0, 4])
        .then_some(Ipv4Addr::new(rr[10], rr[11], rr[12], rr[13]))
}

/// The offset after the DNS name at `at` (labels, ending in a root label or
/// a compression pointer).
fn skip_name(msg: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let len = *msg.get(at)? as usize;
        if len == 0 {
            return Some(at + 1);
        }
        if (len & 0xC0) == 0xC0 {
            return Some(at + 2);
        }
        at += 1 + len;
    }
}
