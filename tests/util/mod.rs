//! Test helpers: a `TestServer` that runs the real binary in a temp dir, and
//! a small HTTP client (HTTP/1.1 and HTTP/2, plain and TLS).
//!
//! Readiness is never guessed with sleeps: every generation of the server
//! sends `MAINPID=<pid>` + `READY=1` + `STATUS=` (the serving pid and the
//! bound addresses) to a `NOTIFY_SOCKET` the test owns; that is where a
//! test learns pids and addresses. Failures are seen in the server's log
//! lines, which the helper collects.
#![allow(dead_code)]

pub mod client;
pub mod config;
pub mod fleet;
pub mod h2raw;
pub mod h3;
pub mod load;
pub mod nginx;
pub mod pebble;
pub mod preload;
pub mod raw;
pub mod upstream;
pub mod venv;
pub mod ws;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UnixDatagram;
use tokio::sync::Notify;

pub const BIN: &str = env!("CARGO_BIN_EXE_gracesrv");

/// The binary under test: this build, or `GRACESRV_TEST_BIN` (another build,
/// to see a test fail on the code before a fix).
pub fn bin() -> std::ffi::OsString {
    std::env::var_os("GRACESRV_TEST_BIN")
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| BIN.into())
}
/// Upper bound for anything a test waits for; a healthy run takes a fraction.
pub const WAIT: Duration = Duration::from_secs(30);

/// Certificates for a test: a CA, and leaves signed by it.
pub struct Certs {
    pub ca_pem: String,
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Certs {
    pub fn new() -> Certs {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "gracesrv test CA");
        let key = rcgen::KeyPair::generate().unwrap();
        let ca = rcgen::CertifiedIssuer::self_signed(params, key).unwrap();
        Certs {
            ca_pem: ca.pem(),
            ca,
        }
    }

    /// Writes `<stem>.crt` and `<stem>.key` into `dir`: a leaf for `names`
    /// (DNS names or IPs) with the given serial.
    pub fn leaf(&self, dir: &Path, stem: &str, names: &[&str], serial: u64) {
        self.leaf_with(dir, stem, names, serial, |_| {});
    }

    /// Like `leaf`, with the parameters adjusted by `edit` (validity, ...).
    pub fn leaf_with(
        &self,
        dir: &Path,
        stem: &str,
        names: &[&str],
        serial: u64,
        edit: impl FnOnce(&mut rcgen::CertificateParams),
    ) {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        params.serial_number = Some(rcgen::SerialNumber::from(serial));
        edit(&mut params);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        std::fs::write(dir.join(format!("{stem}.crt")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{stem}.key")), key.serialize_pem()).unwrap();
    }
}

/// Collected log lines of every generation (they share stderr).
#[derive(Default)]
struct Logs {
    lines: Mutex<Vec<String>>,
    changed: Notify,
    /// Every writer closed stderr: no line will follow.
    ended: std::sync::atomic::AtomicBool,
}

pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub certs: Certs,
    first: Child,
    notify: UnixDatagram,
    logs: Arc<Logs>,
    /// Pids that reported ready, oldest first.
    pub ready_pids: Vec<u32>,
    /// The latest `STATUS=` the server sent.
    status: Option<Status>,
}

/// A `STATUS=serving generation G (pid P) on NAME=ADDR ...` notification.
#[derive(Clone, Debug)]
pub struct Status {
    pub generation: u64,
    /// The serving process (a supervisor's worker, under `--supervise`).
    pub pid: u32,
    pub addrs: HashMap<String, SocketAddr>,
}

impl Status {
    fn parse(msg: &str) -> Option<Status> {
        let line = msg.lines().find_map(|l| l.strip_prefix("STATUS="))?;
        let rest = line.strip_prefix("serving generation ")?;
        let (generation, rest) = rest.split_once(" (pid ")?;
        let (pid, rest) = rest.split_once(") on")?;
        let addrs = rest
            .split_whitespace()
            .map(|kv| {
                let (k, v) = kv.split_once('=').expect("NAME=ADDR");
                (k.to_string(), v.parse().expect("an address"))
            })
            .collect();
        Some(Status {
            generation: generation.parse().ok()?,
            pid: pid.parse().ok()?,
            addrs,
        })
    }
}

/// How to start a test server: a typed config, the environment, the mode.
pub struct Builder {
    config: config::Config,
    env: Vec<(String, String)>,
    supervise: bool,
    copy: bool,
    command: Option<Command>,
    before: Vec<Before>,
    /// The config as text, instead of `config` (tests of the text itself).
    text: Option<String>,
}

/// What a test does to the server's directory before it starts.
type Before = Box<dyn FnOnce(&Path, &Certs)>;

impl Builder {
    pub fn config(mut self, config: config::Config) -> Builder {
        self.config = config;
        self
    }

    /// Adds a listener to the config.
    pub fn listener(mut self, l: config::Listener) -> Builder {
        self.config = self.config.listener(l);
        self
    }

    /// Sets a top-level config key.
    pub fn set(mut self, key: &str, value: impl Into<serde_json::Value>) -> Builder {
        self.config = self.config.set(key, value);
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Builder {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Runs with `--supervise`.
    pub fn supervise(mut self) -> Builder {
        self.supervise = true;
        self
    }

    /// Runs a copy of the binary in the temp dir (a test may replace it).
    pub fn copy_binary(mut self) -> Builder {
        self.copy = true;
        self
    }

    /// The config as `text` (YAML as a person writes it), instead of a
    /// typed config.
    pub fn config_text(mut self, text: impl Into<String>) -> Builder {
        self.text = Some(text.into());
        self
    }

    /// Runs `f` on the server's directory and certificates before the
    /// server starts: files the config names (a site's root, a
    /// certificate made by `certs`, something in the way).
    pub fn before(mut self, f: impl FnOnce(&Path, &Certs) + 'static) -> Builder {
        self.before.push(Box::new(f));
        self
    }

    /// Runs `cmd` (an example, or something that execs the binary) with
    /// `-c config` instead of the binary.
    pub fn command(mut self, cmd: Command) -> Builder {
        self.command = Some(cmd);
        self
    }

    /// The config's text.
    pub fn config_yaml(&self) -> String {
        self.config.yaml()
    }

    /// Starts the server without waiting for it.
    pub fn spawn(self) -> TestServer {
        let text = self.text.unwrap_or_else(|| self.config.yaml());
        let (dir, certs, path) = TestServer::prepare(&text);
        for f in self.before {
            f(dir.path(), &certs);
        }
        let mut cmd = if let Some(cmd) = self.command {
            cmd
        } else if self.copy {
            let exe = dir.path().join("gracesrv");
            std::fs::copy(BIN, &exe).unwrap();
            Command::new(exe)
        } else {
            Command::new(bin())
        };
        if self.supervise {
            cmd.arg("--supervise");
        }
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        TestServer::spawn_cmd(dir, certs, path, &env, cmd)
    }

    /// Starts the server and waits until it is ready.
    pub async fn start(self) -> TestServer {
        let mut srv = self.spawn();
        srv.wait_ready().await;
        srv
    }
}

/// A config with one plain and one TLS listener on kernel-picked ports, as
/// text (for tests of the text itself: positions, broken YAML).
/// The binary of `examples/NAME.rs`, built now: `cargo test` builds the
/// examples, `cargo test --test X` does not.
pub fn example(name: &str) -> PathBuf {
    let exe = Path::new(BIN).parent().unwrap().join("examples").join(name);
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let built = Command::new(cargo)
        .args(["build", "--quiet", "--example", name])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .unwrap();
    assert!(built.success() && exe.exists(), "{}", exe.display());
    exe
}

/// A TCP port on 127.0.0.1 that was free a moment ago, for a program that
/// cannot be given port 0 (nginx, pebble, a config written before the start).
/// Never the same port twice in one test process: the kernel's next pick is
/// often a port just freed, and two such picks made one after the other
/// (pebble's management port and its DNS server's) once collided.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..1000 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind 127.0.0.1:0")
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
    panic!("no free port not given out before");
}

pub fn basic_config(extra_routes: &str) -> String {
    format!(
        r#"shutdown_timeout: 10s
listeners:
  - name: web
    addr: 127.0.0.1:0
    routes:
      - path: /delay
        respond: {{ body: "slow {{pid}}\n", delay: 2s }}
      - path: /status
        status: {{}}
{extra_routes}      - path: /
        respond: {{ body: "pid {{pid}} gen {{generation}} {{listener}}\n" }}
  - name: web-tls
    addr: 127.0.0.1:0
    tls: {{ cert: localhost.crt, key: localhost.key }}
    routes:
      - path: /delay
        respond: {{ body: "slow {{pid}}\n", delay: 2s }}
      - path: /
        respond: {{ body: "pid {{pid}} gen {{generation}} {{listener}}\n" }}
"#
    )
}

impl TestServer {
    /// A server on `config::Config::basic()`, unless told otherwise.
    pub fn builder() -> Builder {
        Builder {
            config: config::Config::basic(),
            env: Vec::new(),
            supervise: false,
            copy: false,
            command: None,
            before: Vec::new(),
            text: None,
        }
    }

    /// A temp dir with a CA and a `localhost` leaf (serial 1), and `config`
    /// written to `server.yaml`; nothing started yet.
    pub fn prepare(config: &str) -> (tempfile::TempDir, Certs, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let certs = Certs::new();
        certs.leaf(dir.path(), "localhost", &["localhost", "127.0.0.1"], 1);
        let path = dir.path().join("server.yaml");
        std::fs::write(&path, config).unwrap();
        (dir, certs, path)
    }

    /// Starts the server on `config` and waits until it is ready.
    pub async fn start(config: &str) -> TestServer {
        let (dir, certs, path) = Self::prepare(config);
        Self::start_in(dir, certs, path, &[]).await
    }

    pub async fn start_in(
        dir: tempfile::TempDir,
        certs: Certs,
        config: PathBuf,
        env: &[(&str, &str)],
    ) -> TestServer {
        let mut srv = Self::spawn(dir, certs, config, env);
        srv.wait_ready().await;
        srv
    }

    /// Spawns the binary without waiting for it. `GRACESRV_TEST_BIN` names
    /// another build to run instead (to see a test fail on the code before
    /// a fix).
    pub fn spawn(
        dir: tempfile::TempDir,
        certs: Certs,
        config: PathBuf,
        env: &[(&str, &str)],
    ) -> TestServer {
        Self::spawn_cmd(dir, certs, config, env, Command::new(bin()))
    }

    /// Copies the binary into the temp dir and runs that copy, so a test can
    /// replace it on disk.
    pub fn spawn_copy(
        dir: tempfile::TempDir,
        certs: Certs,
        config: PathBuf,
        env: &[(&str, &str)],
    ) -> TestServer {
        let exe = dir.path().join("gracesrv");
        std::fs::copy(BIN, &exe).unwrap();
        Self::spawn_cmd(dir, certs, config, env, Command::new(exe))
    }

    /// Runs `cmd` (the binary, or something that execs it) with `-c config`.
    pub fn spawn_cmd(
        dir: tempfile::TempDir,
        certs: Certs,
        config: PathBuf,
        env: &[(&str, &str)],
        mut cmd: Command,
    ) -> TestServer {
        let notify_path = dir.path().join("notify.sock");
        let notify = UnixDatagram::bind(&notify_path).unwrap();
        cmd.arg("-c")
            .arg(&config)
            .current_dir(dir.path())
            .env("NOTIFY_SOCKET", &notify_path)
            .env("GRACESRV_LOG", "gracesrv=debug")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDS")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        // Its own process group, so cleanup reaches every generation.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut first = spawn_when_not_busy(&mut cmd);
        let logs = Arc::new(Logs::default());
        let stderr = first.stderr.take().unwrap();
        let l = logs.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                l.lines.lock().unwrap().push(line);
                l.changed.notify_waiters();
            }
            l.ended.store(true, std::sync::atomic::Ordering::Release);
            l.changed.notify_waiters();
        });
        TestServer {
            dir,
            config,
            certs,
            first,
            notify,
            logs,
            ready_pids: Vec::new(),
            status: None,
        }
    }

    /// The next message on the NOTIFY_SOCKET, as sent.
    pub async fn next_notify(&mut self) -> String {
        let mut buf = vec![0u8; 4096];
        let msg = match tokio::time::timeout(WAIT, self.notify.recv(&mut buf)).await {
            Ok(r) => String::from_utf8_lossy(&buf[..r.unwrap()]).to_string(),
            Err(_) => panic!("no notify message within {WAIT:?}; logs:\n{}", self.logs()),
        };
        if let Some(s) = Status::parse(&msg) {
            self.status = Some(s);
        }
        msg
    }

    /// HUP to a supervisor; waits for RELOADING=1 then READY=1, and for the
    /// old worker to stop accepting. Returns the new worker.
    pub async fn supervised_restart(&mut self) -> u32 {
        let old = self.serving_pid();
        let seen = self.log_count();
        self.hup();
        let reloading = self.next_notify().await;
        assert!(
            reloading.contains("RELOADING=1") && reloading.contains("MONOTONIC_USEC="),
            "{reloading}"
        );
        let ready = self.next_notify().await;
        assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");
        let new = self.serving_pid();
        assert_ne!(new, old);
        self.wait_stopped_accepting(old, seen).await;
        new
    }

    /// Waits for the next generation to report `READY=1`; returns its pid.
    pub async fn wait_ready(&mut self) -> u32 {
        let mut buf = vec![0u8; 4096];
        loop {
            let n = match tokio::time::timeout(WAIT, self.notify.recv(&mut buf)).await {
                Ok(r) => r.unwrap(),
                Err(_) => panic!("no READY within {WAIT:?}; logs:\n{}", self.logs()),
            };
            let msg = String::from_utf8_lossy(&buf[..n]).to_string();
            if let Some(s) = Status::parse(&msg) {
                self.status = Some(s);
            }
            if !msg.lines().any(|l| l == "READY=1") {
                continue;
            }
            let pid = msg
                .lines()
                .find_map(|l| l.strip_prefix("MAINPID="))
                .and_then(|p| p.parse().ok())
                .expect("READY without MAINPID");
            assert!(self.status.is_some(), "READY without STATUS: {msg}");
            self.ready_pids.push(pid);
            return pid;
        }
    }

    /// The pid of the generation that last reported ready.
    pub fn pid(&self) -> u32 {
        *self.ready_pids.last().expect("no generation is ready")
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), sig).unwrap();
    }

    /// Leaves a `/delay` request in flight on the serving generation and
    /// restarts; returns the old pid and the request, still running.
    pub async fn restart_with_request_in_flight(
        &mut self,
    ) -> (u32, tokio::task::JoinHandle<Result<client::Resp, String>>) {
        let web = client::Target::plain(self.addr("web"));
        let old = self.pid();
        let seen = self.log_count();
        let slow = tokio::spawn(async move { client::get(&web, "/delay").await });
        let tag = format!("pid={old} ");
        self.wait_log_after(seen, |l| l.contains(&tag) && l.contains("path=\"/delay\""))
            .await;
        self.restart().await;
        (old, slow)
    }

    /// HUP, and wait for the restart to fail; returns the `restart failed` line.
    pub async fn failed_restart(&self) -> String {
        let seen = self.log_count();
        self.hup();
        self.wait_log_after(seen, |l| l.contains("restart failed"))
            .await
    }

    /// The pid that answers `GET /` on the `web` listener now.
    pub async fn answering_pid(&self) -> u32 {
        client::get(&client::Target::plain(self.addr("web")), "/")
            .await
            .unwrap()
            .pid()
    }

    /// Signals the first process, whether or not it reported ready.
    pub fn signal_first(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.first.id() as i32), sig).unwrap();
    }

    pub fn hup(&self) {
        self.signal(nix::sys::signal::Signal::SIGHUP);
    }

    /// HUP, then wait for the new generation to be ready and the old one
    /// to have stopped accepting (until then both accept from the shared
    /// queue); returns the new pid.
    pub async fn restart(&mut self) -> u32 {
        let old = self.pid();
        // Only a line from this restart counts: `old` may have stopped
        // accepting before, in a restart that was rolled back.
        let seen = self.log_count();
        self.hup();
        self.restart_seen(old, seen).await
    }

    /// Waits for the restart of `old` that is under way: the new generation
    /// ready, `old` no longer accepting.
    pub async fn restart_from(&mut self, old: u32) -> u32 {
        self.restart_seen(old, 0).await
    }

    /// [`TestServer::restart_from`], counting only log lines after the
    /// first `seen`.
    async fn restart_seen(&mut self, old: u32, seen: usize) -> u32 {
        let new = self.wait_ready().await;
        assert_ne!(new, old);
        self.wait_stopped_accepting(old, seen).await;
        new
    }

    /// Waits until process `old` says it stopped accepting, in a log line
    /// after the first `seen`.
    async fn wait_stopped_accepting(&self, old: u32, seen: usize) {
        let tag = format!("pid={old} ");
        self.wait_log_after(seen, |l| {
            l.contains(&tag) && l.contains("stopped accepting")
        })
        .await;
    }

    /// All log lines so far.
    pub fn logs(&self) -> String {
        self.logs.lines.lock().unwrap().join("\n")
    }

    /// Waits until some log line satisfies `pred`, counting only lines after
    /// the first `skip`; returns the line.
    pub async fn wait_log_after(&self, skip: usize, pred: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let notified = self.logs.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(l) = self
                .logs
                .lines
                .lock()
                .unwrap()
                .iter()
                .skip(skip)
                .find(|l| pred(l))
            {
                return l.clone();
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!("no such log line within {WAIT:?}; logs:\n{}", self.logs());
            }
        }
    }

    pub async fn wait_log(&self, needle: &str) -> String {
        self.wait_log_after(0, |l| l.contains(needle)).await
    }

    pub fn log_count(&self) -> usize {
        self.logs.lines.lock().unwrap().len()
    }

    /// The latest `STATUS=` notification.
    pub fn status(&self) -> &Status {
        self.status.as_ref().expect("no STATUS yet")
    }

    /// The process serving now, as the latest `STATUS=` says: the
    /// generation that reported ready, or a supervisor's worker.
    pub fn serving_pid(&self) -> u32 {
        self.status().pid
    }

    /// The address a listener bound, as the latest `STATUS=` says.
    pub fn addr(&self, listener: &str) -> SocketAddr {
        *self
            .status()
            .addrs
            .get(listener)
            .unwrap_or_else(|| panic!("no listener {listener} in {:?}", self.status()))
    }

    pub fn addrs(&self) -> HashMap<String, SocketAddr> {
        self.status().addrs.clone()
    }

    /// Rewrites the config file from a typed config.
    pub fn write(&self, config: &config::Config) {
        self.write_config(&config.yaml());
    }

    /// Rewrites the config file.
    pub fn write_config(&self, text: &str) {
        std::fs::write(&self.config, text).unwrap();
    }

    /// A TLS client config that trusts this server's CA.
    pub fn tls(&self) -> Arc<rustls::ClientConfig> {
        client::tls_config(&self.certs.ca_pem, &[b"h2".to_vec(), b"http/1.1".to_vec()])
    }

    pub fn tls_h1(&self) -> Arc<rustls::ClientConfig> {
        client::tls_config(&self.certs.ca_pem, &[b"http/1.1".to_vec()])
    }

    /// Waits for the first process (generation 1) to exit; returns its status.
    /// Waits until the first process exits. If no process of the server is
    /// left, also until its log is read to the end, so a test that reads
    /// the log next sees every line (the reader thread may lag the exit).
    pub async fn wait_first_exit(&mut self) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if let Some(status) = self.first.try_wait().unwrap() {
                let group = nix::unistd::Pid::from_raw(self.first.id() as i32);
                if nix::sys::signal::killpg(group, None).is_err() {
                    self.wait_log_end().await;
                }
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "process did not exit; logs:\n{}",
                self.logs()
            );
            // Polling a child's exit status has no readiness signal to wait on.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until stderr is closed by every process and read to the end.
    async fn wait_log_end(&self) {
        let ended = async {
            loop {
                let changed = self.logs.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if self.logs.ended.load(std::sync::atomic::Ordering::Acquire) {
                    return;
                }
                changed.await;
            }
        };
        tokio::time::timeout(WAIT, ended)
            .await
            .expect("the log ends once every process is gone");
    }

    pub fn first_pid(&self) -> u32 {
        self.first.id()
    }
}

/// Makes `cmd` start with `fd` at fd 3, as systemd passes a socket. (dup2
/// onto itself would leave close-on-exec set, so fd 3 is handled apart.)
pub fn pass_as_fd3(cmd: &mut Command, fd: std::os::fd::RawFd) {
    // SAFETY: dup2 and fcntl are async-signal-safe; this runs in the child
    // between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, move || {
            let ok = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0) >= 0
            } else {
                libc::dup2(fd, 3) >= 0
            };
            if ok {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

/// What systemd-socket-activate does: a command that starts the server with
/// `fd` at fd 3, `LISTEN_FDNAMES=names` and `LISTEN_PID` set to the server's
/// own pid (the shell execs the server, keeping its pid). `spawn_cmd` adds
/// `-c CONFIG`.
pub fn socket_activated(fd: std::os::fd::RawFd, names: &str, extra_env: &str) -> Command {
    let mut cmd = Command::new("/bin/sh");
    pass_as_fd3(&mut cmd, fd);
    cmd.arg("-c")
        .arg(format!(
            "LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES={names} {extra_env} exec {BIN} \"$@\""
        ))
        .arg("sh");
    cmd
}

/// The value of `key=value` in a text log line.
pub fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let key = format!(" {key}=");
    let at = line
        .find(&key)
        .unwrap_or_else(|| panic!("no {key} in {line}"));
    line[at + key.len()..]
        .split_whitespace()
        .next()
        .unwrap_or("")
}

/// Is `pid` still running (and not a zombie)?
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|s| s.split_whitespace().next());
            state != Some("Z")
        }
        Err(_) => false,
    }
}

/// Waits until `cond` holds, looking every 10 ms, for at most [`WAIT`]:
/// for what gives no notification to wait on (a file another process
/// writes, a process that is not our child). Panics at the deadline,
/// saying `what` was awaited.
pub async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until `pid` is gone (exited; a zombie counts as gone).
pub async fn wait_gone(pid: u32) {
    let deadline = std::time::Instant::now() + WAIT;
    while alive(pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "process {pid} still running"
        );
        // A process that is not our child gives no exit notification to wait on.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The open fds of `pid`, but for inotify instances: a serving thread
/// makes one for its file cache the first time it serves a static file,
/// and keeps it.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|l| l.as_os_str() != "anon_inode:inotify")
                })
                .count()
        })
        .unwrap_or(0)
}

/// `pid`'s open fds once the count holds still for 300 ms (a connection
/// the test just closed may still be lingering on the server's side).
pub async fn settled_fd_count(pid: u32) -> usize {
    let deadline = std::time::Instant::now() + WAIT;
    let mut last = fd_count(pid);
    let mut since = std::time::Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = fd_count(pid);
        if now != last {
            (last, since) = (now, std::time::Instant::now());
        } else if since.elapsed() >= Duration::from_millis(300) {
            return now;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "fds of {pid} never settled"
        );
    }
}

/// Children of `pid` that are zombies.
pub fn zombie_children(pid: u32) -> usize {
    let mut n = 0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some(after) = stat.rsplit_once(')').map(|(_, a)| a.to_string()) else {
            continue;
        };
        let mut it = after.split_whitespace();
        let state = it.next();
        let ppid: Option<u32> = it.next().and_then(|p| p.parse().ok());
        if state == Some("Z") && ppid == Some(pid) {
            n += 1;
        }
    }
    n
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let lines = self.logs.lines.lock().unwrap_or_else(|e| e.into_inner());
            eprintln!("---- gracesrv logs ----\n{}", lines.join("\n"));
        }
        // Every generation is in the first one's process group.
        let pgid = nix::unistd::Pid::from_raw(self.first.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.first.wait();
    }
}

/// A small tmpfs mounted at `path` (the tests run as root, as CI does),
/// unmounted when dropped: a disk that can be filled and freed.
pub struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    pub fn mount(path: &Path) -> SmallDisk {
        std::fs::create_dir_all(path).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
            .arg(path)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "mounting a tmpfs needs root (CI runs as root)");
        SmallDisk(path.to_path_buf())
    }

    pub fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.0.join("fill")).unwrap();
        while f.write_all(&[0u8; 4096]).is_ok() {}
        let _ = f.flush();
    }

    pub fn free(&self) {
        std::fs::remove_file(self.0.join("fill")).unwrap();
    }

    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// `promtool check metrics` (Prometheus, from Debian) on `text`: passes, or
/// panics with what it said.
pub fn promtool(text: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool runs (.ci/run installs prometheus)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `openssl s_client` to `addr` for `localhost` over TLS 1.3, sending one
/// HTTP/1.0 request; what it printed. `extra`: `-CAfile`, `-sess_out`...
pub fn s_client(addr: SocketAddr, extra: &[&str]) -> String {
    use std::io::Write;
    let mut child = Command::new("openssl")
        .args(["s_client", "-connect", &addr.to_string()])
        .args(["-servername", "localhost", "-tls1_3", "-ign_eof"])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl runs (.ci/run installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Spawns `cmd`, again while its binary is busy (ETXTBSY): a copy this
/// test process just wrote stays open for writing in any child another
/// test thread forked before the copy was closed, until that child execs
/// (rust-lang/rust#114554). It lasts no longer than a fork and an exec.
fn spawn_when_not_busy(cmd: &mut Command) -> Child {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match cmd.spawn() {
            Err(e)
                if e.kind() == std::io::ErrorKind::ExecutableFileBusy
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10))
            }
            res => return res.expect("spawn gracesrv"),
        }
    }
}
