//! Certificate rotation, `watch: true`, and `gracesrv reload`.

mod util;

use std::path::Path;
use std::process::Command;

use serde_json::json;
use util::client::{self, Target};
use util::config::{Config, Listener};
use util::{SmallDisk, TestServer, BIN};

/// The serial number of a DER certificate, in hex.
fn serial(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    cert.tbs_certificate
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The serial of the certificate a new TLS connection gets.
async fn serial_of_new_connection(srv: &TestServer) -> String {
    let c = client::connect(&Target::tls(srv.addr("web-tls"), srv.tls_h1()))
        .await
        .unwrap();
    serial(c.peer_cert.as_deref().unwrap())
}

fn watch_config() -> Config {
    Config::basic().set("watch", true)
}

#[tokio::test]
async fn hup_rotates_the_certificate_for_new_handshakes_only() {
    let mut srv = TestServer::builder().start().await;
    let old = srv.pid();
    let mut before = client::connect(&Target::tls(srv.addr("web-tls"), srv.tls_h1()))
        .await
        .unwrap();
    assert_eq!(serial(before.peer_cert.as_deref().unwrap()), "01");
    assert_eq!(before.get("/").await.unwrap().pid(), old);

    srv.certs
        .leaf(srv.dir.path(), "localhost", &["localhost", "127.0.0.1"], 2);
    let new = srv.restart().await;
    assert_eq!(serial_of_new_connection(&srv).await, "02");
    let mut after = client::connect(&Target::tls(srv.addr("web-tls"), srv.tls_h1()))
        .await
        .unwrap();
    assert_eq!(after.get("/").await.unwrap().pid(), new);
    // The connection opened before the restart finishes on the old
    // generation, with the old certificate.
    let r = before.get("/").await.unwrap();
    assert_eq!(
        (r.pid(), r.headers["connection"].to_str().unwrap()),
        (old, "close")
    );
}

#[tokio::test]
async fn watch_restarts_when_a_certificate_changes() {
    let mut srv = TestServer::builder().config(watch_config()).start().await;
    srv.wait_log("watching the config, certificates and keys")
        .await;
    srv.certs
        .leaf(srv.dir.path(), "localhost", &["localhost", "127.0.0.1"], 3);
    let line = srv.wait_log("trigger=Watch").await;
    assert!(line.contains("restarting"), "{line}");
    srv.restart_from(srv.pid()).await;
    assert_eq!(serial_of_new_connection(&srv).await, "03");
}

#[tokio::test]
async fn watch_follows_a_kubernetes_style_symlink_swap() {
    // certs/tls.crt -> ..data/tls.crt, ..data -> ..v1: the layout of a mounted Secret.
    let config = watch_config().edit("web-tls", |l| l.tls_files("certs/tls.crt", "certs/tls.key"));
    let mut srv = TestServer::builder()
        .config(config)
        .before(|dir, certs| {
            let d = dir.join("certs");
            std::fs::create_dir_all(d.join("..v1")).unwrap();
            certs.leaf(&d.join("..v1"), "tls", &["localhost", "127.0.0.1"], 4);
            std::os::unix::fs::symlink("..v1", d.join("..data")).unwrap();
            std::os::unix::fs::symlink("..data/tls.crt", d.join("tls.crt")).unwrap();
            std::os::unix::fs::symlink("..data/tls.key", d.join("tls.key")).unwrap();
        })
        .start()
        .await;
    let d = srv.dir.path().join("certs");
    srv.wait_log("watching the config").await;
    assert_eq!(serial_of_new_connection(&srv).await, "04");

    // What the kubelet does: a new version dir, a new symlink, one rename.
    std::fs::create_dir_all(d.join("..v2")).unwrap();
    srv.certs
        .leaf(&d.join("..v2"), "tls", &["localhost", "127.0.0.1"], 5);
    std::os::unix::fs::symlink("..v2", d.join("..data_tmp")).unwrap();
    std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
    srv.wait_log("trigger=Watch").await;
    srv.restart_from(srv.pid()).await;
    assert_eq!(serial_of_new_connection(&srv).await, "05");
}

#[tokio::test]
async fn a_half_written_pair_keeps_the_old_generation_until_the_key_arrives() {
    let mut srv = TestServer::builder().config(watch_config()).start().await;
    srv.wait_log("watching the config").await;
    let old = srv.pid();
    let d = srv.dir.path().to_path_buf();
    // The new pair, written elsewhere; the certificate lands first.
    let staging = tempfile::tempdir().unwrap();
    srv.certs
        .leaf(staging.path(), "localhost", &["localhost", "127.0.0.1"], 6);
    std::fs::copy(
        staging.path().join("localhost.crt"),
        d.join("localhost.crt"),
    )
    .unwrap();
    let line = srv.wait_log("restart failed").await;
    assert!(line.contains("does not match the certificate"), "{line}");
    assert_eq!(srv.answering_pid().await, old);
    assert_eq!(serial_of_new_connection(&srv).await, "01");
    // The key follows: the next event retries, and succeeds.
    std::fs::copy(
        staging.path().join("localhost.key"),
        d.join("localhost.key"),
    )
    .unwrap();
    let new = srv.restart_from(old).await;
    assert_ne!(new, old);
    assert_eq!(serial_of_new_connection(&srv).await, "06");
}

#[tokio::test]
async fn unchanged_content_gives_no_restart() {
    let srv = TestServer::builder().config(watch_config()).start().await;
    srv.wait_log("watching the config").await;
    let crt = srv.dir.path().join("localhost.crt");
    let same = std::fs::read(&crt).unwrap();
    std::fs::write(&crt, &same).unwrap();
    srv.wait_log("content did not: no restart").await;
    assert!(!srv.logs().contains("restarting"), "{}", srv.logs());
}

#[tokio::test]
async fn an_expired_certificate_is_served_with_a_warning() {
    let srv = TestServer::builder()
        .config(Config::basic())
        .before(|dir, certs| {
            certs.leaf_with(dir, "localhost", &["localhost", "127.0.0.1"], 7, |p| {
                p.not_before = rcgen::date_time_ymd(2020, 1, 1);
                p.not_after = rcgen::date_time_ymd(2021, 1, 1);
            })
        })
        .start()
        .await;
    let line = srv.wait_log("certificate has expired").await;
    assert!(line.contains("not_after=2021-01-01T00:00:00Z"), "{line}");
    assert_eq!(srv.answering_pid().await, srv.pid());
}

/// Runs `gracesrv reload -c CONFIG` to its end; its exit code, stdout, stderr.
async fn reload(config: &Path) -> (i32, String, String) {
    let out = tokio::process::Command::new(BIN)
        .arg("reload")
        .arg("-c")
        .arg(config)
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[tokio::test]
async fn reload_reports_success_and_failure() {
    let config = Config::basic().set("pid_file", "run/g.pid");
    let mut srv = TestServer::builder().config(config.clone()).start().await;
    let old = srv.pid();
    let (code, out, err) = reload(&srv.config).await;
    assert_eq!(code, 0, "{err}");
    let new = srv.wait_ready().await;
    assert!(
        out.contains(&format!(
            "reloaded: pid {new} (generation 2) replaces pid {old}"
        )),
        "{out}"
    );

    srv.write_config("listeners: [\n");
    let (code, out, err) = reload(&srv.config).await;
    // The broken config cannot even be read by reload itself: it names the error.
    assert_eq!(code, 1, "{out}");
    assert!(err.contains("server.yaml:"), "{err}");

    // A config that reload can read but the server refuses (a missing cert).
    srv.write(
        &config
            .clone()
            .edit("web-tls", |l| l.tls_files("gone.crt", "localhost.key")),
    );
    let (code, out, err) = reload(&srv.config).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        err.contains("restart failed:") && err.contains("no such file gone.crt"),
        "{err}"
    );
    assert_eq!(srv.answering_pid().await, new);
}

/// Issue 25.6: `reload`s, or anything else on the control socket, that
/// never read delay no other `reload`: 80 silent subscribers (more than the
/// 64 kept), then two reloads in a row; every silent one is hung up on.
#[tokio::test]
async fn subscribers_that_never_read_delay_no_reload() {
    use std::os::linux::net::SocketAddrExt;
    let config = Config::basic().set("pid_file", "run/g.pid");
    let mut srv = TestServer::builder().config(config).start().await;
    let old = srv.pid();
    let addr =
        std::os::unix::net::SocketAddr::from_abstract_name(format!("gracesrv.{old}")).unwrap();
    let silent: Vec<std::os::unix::net::UnixStream> = (0..80)
        .map(|_| std::os::unix::net::UnixStream::connect_addr(&addr).unwrap())
        .collect();
    for _ in 0..2 {
        let started = std::time::Instant::now();
        let (code, out, err) = reload(&srv.config).await;
        assert_eq!(code, 0, "{out}{err}");
        srv.wait_ready().await;
        assert!(
            started.elapsed() < std::time::Duration::from_secs(3),
            "took {:?}",
            started.elapsed()
        );
    }
    for s in silent {
        use std::io::Read;
        s.set_read_timeout(Some(util::WAIT)).unwrap();
        let mut got = Vec::new();
        (&s).read_to_end(&mut got)
            .expect("hung up on, not left open");
    }
}

/// Issue 14.1: the watcher acts once per change of content, never on the
/// reads of its own fingerprinting, of validation or of a new process, nor
/// on a log written next to the config. A touch gives one line and no
/// restart; a bad edit gives exactly one failed attempt (a new process
/// that cannot bind); a good edit then gives exactly one restart.
#[tokio::test]
async fn watch_acts_once_per_change_and_never_on_reads() {
    let mut srv = TestServer::builder().config(watch_config()).start().await;
    srv.wait_log("watching the config").await;
    let first = srv.pid();

    let now = std::time::SystemTime::now();
    std::fs::File::options()
        .append(true)
        .open(&srv.config)
        .unwrap()
        .set_modified(now)
        .unwrap();
    srv.wait_log("content did not: no restart").await;
    // Nothing signals that nothing more happens: give a loop four of the
    // watcher's 300 ms debounce periods to show itself.
    let quiet = std::time::Duration::from_millis(1200);
    tokio::time::sleep(quiet).await;

    // A log next to the config, written all along.
    let log = srv.dir.path().join("app.log");
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        let mut f = std::fs::File::create(log).unwrap();
        for i in 0..40 {
            writeln!(f, "line {i}").unwrap();
            f.flush().unwrap();
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
    });

    // A bad edit: a new listener on a port someone else holds.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let extra = Listener::plain("extra").set("addr", taken.local_addr().unwrap().to_string());
    let bad = watch_config().listener_before("web", extra).yaml();
    srv.write_config(&bad);
    srv.wait_log("restart failed").await;
    tokio::time::sleep(quiet).await;

    // A good edit: a restart, once.
    let edited = json!({ "body": "pid {pid} generation {generation} {listener}\n" });
    srv.write(&watch_config().edit("web", |l| l.route("/", "respond", edited)));
    let new = srv.restart_from(first).await;
    writer.join().unwrap();
    let logs = srv.logs();
    let tag = format!("pid={first} ");
    let of_first = |needle: &str| {
        logs.lines()
            .filter(|l| l.contains(&tag) && l.contains(needle))
            .count()
    };
    assert_eq!(of_first("restart failed"), 1, "{logs}");
    assert_eq!(of_first("restarting trigger=Watch"), 2, "{logs}");
    assert_eq!(of_first("content did not"), 1, "{logs}");
    let r = client::get(&Target::plain(srv.addr("web")), "/")
        .await
        .unwrap();
    assert_eq!(r.body, format!("pid {new} generation 2 web\n"));
}

/// Issue 14.2: with `pid_file` on a full disk, `reload` still reports the
/// new pid (learned from the process, not from a file), says the pid file
/// is behind, and leaves no temporary file; once space is free the new
/// generation writes its pid file, and `reload` works as before.
#[tokio::test]
async fn reload_tells_the_truth_on_a_full_disk() {
    let (dir, certs, path) =
        TestServer::prepare(&Config::basic().set("pid_file", "run/g.pid").yaml());
    let disk = SmallDisk::mount(&dir.path().join("run"));
    let mut srv = TestServer::start_in(dir, certs, path, &[]).await;
    let first = srv.pid();
    disk.fill();
    let (code, out, err) = reload(&srv.config).await;
    assert_eq!(code, 0, "{out}{err}");
    let second = srv.wait_ready().await;
    assert!(
        out.contains(&format!(
            "reloaded: pid {second} (generation 2) replaces pid {first}"
        )),
        "{out}"
    );
    assert!(out.contains("still names pid"), "{out}");
    // A retry may be writing at this moment; a leaked file would stay.
    let deadline = std::time::Instant::now() + util::WAIT;
    while disk.names() != ["fill", "g.pid"] {
        assert!(
            std::time::Instant::now() < deadline,
            "temporary files left: {:?}",
            disk.names()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    srv.wait_log("the disk holding it is full").await;

    disk.free();
    let pid_file = srv.dir.path().join("run/g.pid");
    let deadline = std::time::Instant::now() + util::WAIT;
    while std::fs::read_to_string(&pid_file).unwrap() != format!("{second}\n") {
        assert!(
            std::time::Instant::now() < deadline,
            "the pid file is written again"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let (code, out, err) = reload(&srv.config).await;
    assert_eq!(code, 0, "{out}{err}");
    let third = srv.wait_ready().await;
    assert!(out.contains(&format!("reloaded: pid {third}")), "{out}");
    assert!(!out.contains("warning"), "{out}");
}

/// Issue 14.3: `reload` signals only a gracesrv serving its own config. A
/// pid file naming another process, or a gracesrv with another config, is
/// stale: exit 1, and nothing is signalled.
#[tokio::test]
async fn reload_never_signals_a_stranger() {
    let srv = TestServer::builder()
        .set("pid_file", "run/g.pid")
        .start()
        .await;
    let pid_file = srv.dir.path().join("run/g.pid");

    // A stranger's pid.
    let mut stranger = Command::new("sleep").arg("30").spawn().unwrap();
    std::fs::write(&pid_file, format!("{}\n", stranger.id())).unwrap();
    let (code, _, err) = reload(&srv.config).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("stale pid file") && err.contains("not a running gracesrv"),
        "{err}"
    );
    assert!(
        stranger.try_wait().unwrap().is_none(),
        "sleep was not signalled"
    );
    stranger.kill().unwrap();
    let _ = stranger.wait();

    // A gracesrv, but serving another config: a copy of this one elsewhere.
    std::fs::write(&pid_file, format!("{}\n", srv.pid())).unwrap();
    let other = tempfile::tempdir().unwrap();
    let other_config = other.path().join("other.yaml");
    std::fs::write(
        &other_config,
        Config::basic()
            .set("pid_file", pid_file.display().to_string())
            .yaml(),
    )
    .unwrap();
    std::fs::copy(
        srv.dir.path().join("localhost.crt"),
        other.path().join("localhost.crt"),
    )
    .unwrap();
    std::fs::copy(
        srv.dir.path().join("localhost.key"),
        other.path().join("localhost.key"),
    )
    .unwrap();
    let (code, _, err) = reload(&other_config).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("stale pid file") && err.contains("serves"),
        "{err}"
    );
    assert!(!srv.logs().contains("restarting"), "{}", srv.logs());
}
