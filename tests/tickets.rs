//! TLS session tickets: a client resumes its session across a restart, and
//! across machines that share `tls_tickets.key_file`.

mod util;

use util::client::{self, Target};
use util::config::Config;
use util::TestServer;

/// Connects, makes a request (which reads the tickets the server sends after
/// a TLS 1.3 handshake), and says whether the session was resumed.
async fn resumed(t: &Target) -> bool {
    let mut c = client::connect(t).await.unwrap();
    assert_eq!(c.get("/").await.unwrap().status, 200);
    c.resumed
}

#[tokio::test]
async fn a_session_resumes_across_a_restart() {
    let mut srv = TestServer::builder().start().await;
    // One client config: its session store keeps the tickets.
    let t = Target::tls(srv.addr("web-tls"), srv.tls_h1());
    assert!(
        !resumed(&t).await,
        "the first connection is a full handshake"
    );
    assert!(resumed(&t).await, "resumed before the restart");
    srv.restart().await;
    assert!(resumed(&t).await, "resumed after the restart");
    srv.restart().await;
    assert!(resumed(&t).await, "resumed after a second restart");
}

/// The same with openssl's client, a TLS stack not built on rustls.
#[tokio::test]
async fn openssl_resumes_across_a_restart() {
    let mut srv = TestServer::builder().start().await;
    let ca = srv.dir.path().join("ca.pem");
    std::fs::write(&ca, &srv.certs.ca_pem).unwrap();
    let sess = srv.dir.path().join("session.pem");
    let addr = srv.addr("web-tls");
    let (sess_s, ca) = (
        sess.to_str().unwrap().to_string(),
        ca.to_str().unwrap().to_string(),
    );
    let first = tokio::task::spawn_blocking({
        let (s, ca) = (sess_s.clone(), ca.clone());
        move || util::s_client(addr, &["-CAfile", &ca, "-sess_out", &s])
    })
    .await
    .unwrap();
    assert!(first.contains("New, TLSv1.3"), "{first}");
    assert!(first.contains("HTTP/1.0 200"), "{first}");
    srv.restart().await;
    let again = tokio::task::spawn_blocking(move || {
        util::s_client(addr, &["-CAfile", &ca, "-sess_in", &sess_s])
    })
    .await
    .unwrap();
    assert!(again.contains("Reused, TLSv1.3"), "{again}");
    assert!(again.contains("HTTP/1.0 200"), "{again}");
}

/// Two servers (two machines behind one load balancer) with the same key
/// file resume each other's sessions. Each has its own CA here, so a client
/// that trusts only the first can talk to the second only by resuming: a
/// full handshake with the second fails certificate verification.
#[tokio::test]
async fn servers_sharing_a_key_file_resume_each_others_sessions() {
    let key: Vec<u8> = (0..80u8)
        .map(|i| i.wrapping_mul(37).wrapping_add(11))
        .collect();
    let start = |key: Option<Vec<u8>>| async move {
        let mut b = TestServer::builder();
        if key.is_some() {
            b = b.config(Config::basic().set(
                "tls_tickets",
                serde_json::json!({ "key_file": "ticket.key" }),
            ));
        }
        if let Some(k) = key {
            b = b.before(move |dir, _| std::fs::write(dir.join("ticket.key"), k).unwrap());
        }
        b.start().await
    };
    let a = start(Some(key.clone())).await;
    let b = start(Some(key)).await;
    let other = start(None).await;
    let tls = a.tls_h1();
    assert!(!resumed(&Target::tls(a.addr("web-tls"), tls.clone())).await);
    assert!(
        resumed(&Target::tls(b.addr("web-tls"), tls.clone())).await,
        "B accepts A's ticket"
    );
    // Without the shared file the ticket is refused: a full handshake, with
    // a certificate this client does not trust.
    let refused = client::connect(&Target::tls(other.addr("web-tls"), tls)).await;
    assert!(
        refused.is_err(),
        "a server without the key resumed the session"
    );
}

#[tokio::test]
async fn a_short_key_file_is_a_config_error() {
    let config = Config::basic().set(
        "tls_tickets",
        serde_json::json!({ "key_file": "ticket.key" }),
    );
    let (dir, _certs, path) = TestServer::prepare(&config.yaml());
    std::fs::write(dir.path().join("ticket.key"), b"too short").unwrap();
    let out = std::process::Command::new(util::BIN)
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tls_tickets.key_file: ticket.key holds 9 bytes"),
        "{err}"
    );
}

/// Under `--supervise`, each new worker is handed the same secret.
#[tokio::test]
async fn a_session_resumes_across_a_supervised_restart() {
    let mut srv = TestServer::builder().supervise().start().await;
    let t = Target::tls(srv.addr("web-tls"), srv.tls_h1());
    assert!(!resumed(&t).await);
    let worker = srv.serving_pid();
    srv.hup();
    assert!(srv.next_notify().await.contains("RELOADING=1"));
    assert!(srv.next_notify().await.contains("READY=1"));
    assert_ne!(srv.serving_pid(), worker);
    // The old worker may still accept for a moment: ask until the new one answers.
    let deadline = std::time::Instant::now() + util::WAIT;
    loop {
        let mut c = client::connect(&t).await.unwrap();
        let r = c.get("/").await.unwrap();
        assert!(c.resumed, "every handshake resumes, old worker or new");
        if r.pid() == srv.serving_pid() {
            break;
        }
        assert!(std::time::Instant::now() < deadline);
    }
}
