//! Several hosts on one machine, and what a fleet runs beside them: each
//! host in its own network namespace (`ip netns`, a veth on a bridge, an
//! address of its own), Redis (`redis-server`, Debian) and HAProxy (Debian)
//! in the root namespace on the bridge's address.
//!
//! Without network namespaces (not root, no `ip`), the hosts get loopback
//! addresses of their own instead (127.0.1.x), and the helper says so.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::WAIT;

static NETS: AtomicU32 = AtomicU32::new(0);

/// The hosts of one test.
pub struct Net {
    /// Where the root namespace is reached from the hosts (Redis, pebble,
    /// HAProxy listen there).
    pub gateway: Ipv4Addr,
    pub hosts: Vec<Ipv4Addr>,
    /// The namespaces, and the bridge; empty on loopback.
    namespaces: Vec<String>,
    bridge: Option<String>,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

impl Net {
    /// `n` hosts, each in its own namespace on one bridge.
    pub fn new(n: usize) -> Net {
        let id = NETS.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}{id}", std::process::id() % 10000);
        let subnet = (std::process::id() % 200 + 20, id % 250 + 1);
        let mut net = Net {
            gateway: Ipv4Addr::new(10, subnet.0 as u8, subnet.1 as u8, 1),
            hosts: Vec::new(),
            namespaces: Vec::new(),
            bridge: None,
        };
        match net.build(n, &tag) {
            Ok(()) => net,
            Err(e) => {
                eprintln!(
                    "network namespaces unavailable ({e}): the {n} hosts run on loopback addresses 127.0.1.x"
                );
                drop(net);
                Net {
                    gateway: Ipv4Addr::LOCALHOST,
                    hosts: (0..n)
                        .map(|i| Ipv4Addr::new(127, 0, 1, 10 + i as u8))
                        .collect(),
                    namespaces: Vec::new(),
                    bridge: None,
                }
            }
        }
    }

    fn build(&mut self, n: usize, tag: &str) -> Result<(), String> {
        let bridge = format!("gsb{tag}");
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        self.bridge = Some(bridge.clone());
        ip(&[
            "addr",
            "add",
            &format!("{}/24", self.gateway),
            "dev",
            &bridge,
        ])?;
        ip(&["link", "set", &bridge, "up"])?;
        let [a, b, c, _] = self.gateway.octets();
        for i in 0..n {
            let ns = format!("gsn{tag}h{i}");
            ip(&["netns", "add", &ns])?;
            self.namespaces.push(ns.clone());
            let outside = format!("gsv{tag}h{i}");
            ip(&[
                "link", "add", &outside, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            ip(&["link", "set", &outside, "master", &bridge])?;
            ip(&["link", "set", &outside, "up"])?;
            let addr = Ipv4Addr::new(a, b, c, 10 + i as u8);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            self.hosts.push(addr);
        }
        Ok(())
    }

    /// `program` to run on host `i` (inside its namespace).
    pub fn command(&self, i: usize, program: &Path) -> Command {
        match self.namespaces.get(i) {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns]).arg(program);
                cmd
            }
            None => Command::new(program),
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = ip(&["netns", "del", ns]);
        }
        if let Some(b) = &self.bridge {
            let _ = ip(&["link", "del", b]);
        }
    }
}

/// Polls `addr` until it accepts a connection (the programs here signal
/// readiness by no other means), failing if `child` exits.
fn wait_listening(what: &str, child: &mut Child, addr: SocketAddr, log: &Path) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{what} exited ({status}): {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what} not listening on {addr}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A Redis server (`redis-server`), without persistence.
pub struct Redis {
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// More arguments (`--replicaof`, `--sentinel`).
    args: Vec<String>,
    /// Served over TLS only, with this CA (`redis-cli --tls --cacert`).
    tls_ca: Option<PathBuf>,
}

impl Redis {
    pub fn start(ip: Ipv4Addr) -> Redis {
        Redis::start_with(ip, &[])
    }

    /// With more arguments, e.g. `["--replicaof", "IP", "PORT"]`.
    pub fn start_with(ip: Ipv4Addr, args: &[&str]) -> Redis {
        let mut r = Redis {
            addr: SocketAddr::from((ip, super::free_port())),
            dir: tempfile::tempdir().unwrap(),
            child: None,
            args: args.iter().map(|a| a.to_string()).collect(),
            tls_ca: None,
        };
        r.resume();
        r
    }

    /// Over TLS only: `dir` holds `redis.crt`, `redis.key` and `ca.pem`.
    pub fn start_tls(ip: Ipv4Addr, dir: &Path) -> Redis {
        let mut r = Redis {
            addr: SocketAddr::from((ip, super::free_port())),
            dir: tempfile::tempdir().unwrap(),
            child: None,
            args: Vec::new(),
            tls_ca: Some(dir.join("ca.pem")),
        };
        let file = |f: &str| dir.join(f).display().to_string();
        r.args = vec![
            "--tls-port".into(),
            r.addr.port().to_string(),
            "--port".into(),
            "0".into(),
            "--tls-cert-file".into(),
            file("redis.crt"),
            "--tls-key-file".into(),
            file("redis.key"),
            "--tls-ca-cert-file".into(),
            file("ca.pem"),
            "--tls-auth-clients".into(),
            "no".into(),
        ];
        r.resume();
        r
    }

    /// A Sentinel on `ip` watching `master` as `service` (quorum 1, down
    /// after 1 s).
    pub fn sentinel(ip: Ipv4Addr, service: &str, master: SocketAddr) -> Redis {
        let dir = tempfile::tempdir().unwrap();
        let addr = SocketAddr::from((ip, super::free_port()));
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {}\nbind {}\nprotected-mode no\nsentinel monitor {service} {} {} 1\n\
                 sentinel down-after-milliseconds {service} 1000\nsentinel failover-timeout {service} 5000\n",
                addr.port(),
                addr.ip(),
                master.ip(),
                master.port()
            ),
        )
        .unwrap();
        let mut r = Redis {
            addr,
            dir,
            child: None,
            args: vec![conf.display().to_string(), "--sentinel".into()],
            tls_ca: None,
        };
        r.resume();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://{}/0", self.addr)
    }

    /// Stops the server (its data goes with it: a store that was lost).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same address.
    pub fn resume(&mut self) {
        let log = self.dir.path().join("redis.log");
        let sentinel = self.args.iter().any(|a| a == "--sentinel");
        let mut cmd = Command::new("redis-server");
        if sentinel {
            // Its config file (which it rewrites), then --sentinel.
            cmd.args(&self.args);
        } else {
            cmd.args(["--bind", &self.addr.ip().to_string()])
                .args(["--port", &self.addr.port().to_string()])
                .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
                .args(&self.args)
                .arg("--dir")
                .arg(self.dir.path());
        }
        let mut child = cmd
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (Debian package redis-server; .ci/run installs it)");
        wait_listening("redis-server", &mut child, self.addr, &log);
        self.child = Some(child);
    }

    /// `redis-cli` with `args`: what it printed.
    pub fn cli(&self, args: &[&str]) -> String {
        let mut cmd = Command::new("redis-cli");
        if let Some(ca) = &self.tls_ca {
            cmd.arg("--tls").arg("--cacert").arg(ca);
        }
        let out = cmd
            .args(["-h", &self.addr.ip().to_string()])
            .args(["-p", &self.addr.port().to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).trim_end().to_string()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// HAProxy with the given config body (after a `global`/`defaults` head).
pub struct Haproxy {
    dir: tempfile::TempDir,
    child: Child,
    /// Its stats page (`/stats;csv`).
    pub stats: SocketAddr,
}

impl Haproxy {
    /// Starts HAProxy with `body` (frontends and backends) and waits until
    /// `listen` accepts.
    pub fn start(body: &str, listen: SocketAddr) -> Haproxy {
        let dir = tempfile::tempdir().unwrap();
        let stats = SocketAddr::from((Ipv4Addr::LOCALHOST, super::free_port()));
        let config = format!(
            "global\n  maxconn 4096\n\
             defaults\n  timeout connect 2s\n  timeout client 30s\n  timeout server 30s\n  timeout check 2s\n\
             frontend stats\n  mode http\n  bind {stats}\n  stats enable\n  stats uri /stats\n\
             {body}\n"
        );
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, config).unwrap();
        let log = dir.path().join("haproxy.log");
        let out = std::fs::File::create(&log).unwrap();
        let mut child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("haproxy (Debian package haproxy; .ci/run installs it)");
        wait_listening("haproxy", &mut child, listen, &log);
        Haproxy { dir, child, stats }
    }

    /// The status (`UP`, `DOWN`...) of each server of `backend`, by name,
    /// from its stats page.
    pub fn servers(&self, backend: &str) -> Vec<(String, String)> {
        let out = Command::new("curl")
            .args(["-sf", &format!("http://{}/stats;csv", self.stats)])
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                (f.len() > 17 && f[0] == backend && f[1] != "BACKEND")
                    .then(|| (f[1].to_string(), f[17].to_string()))
            })
            .collect()
    }

    /// Waits until every server of `backend` is `UP`.
    pub async fn wait_all_up(&self, backend: &str) {
        super::until(&format!("every server of {backend} UP"), || {
            let s = self.servers(backend);
            !s.is_empty() && s.iter().all(|(_, st)| st == "UP")
        })
        .await;
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("haproxy.log")).unwrap_or_default()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A copy of the gracesrv binary in `dir` (a test may replace it: a binary
/// upgrade).
pub fn copy_binary(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let exe = dir.join("gracesrv");
    std::fs::copy(super::bin(), &exe).unwrap();
    exe
}
