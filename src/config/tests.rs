use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(Path::new("/etc/g/server.yaml"), text)
}

#[test]
fn sizes() {
    assert_eq!(parse_size("1024"), Ok(1024));
    assert_eq!(parse_size("10MB"), Ok(10 << 20));
    assert_eq!(parse_size("2 KB"), Ok(2048));
    assert!(parse_size("ten").is_err());
    assert!(parse_size("3PB").is_err());
}

#[test]
fn durations() {
    assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
    assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
    assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
    assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
    assert!(parse_duration("30").is_err());
    assert!(parse_duration("s").is_err());
    assert!(parse_duration("3 days").is_err());
}

#[test]
fn minimal_config_gets_defaults_and_resolves_paths() {
    let c = parse(
        "pid_file: run/g.pid\nlisteners:\n  - name: web\n    addr: 127.0.0.1:0\n    tls: { cert: ../c.crt, key: c.key }\n",
    )
    .unwrap();
    assert_eq!(c.shutdown_timeout, Duration::from_secs(30));
    assert_eq!(c.startup_timeout, Duration::from_secs(10));
    assert_eq!(c.max_connections, 10_000);
    assert_eq!(c.pid_file.unwrap(), Path::new("/etc/g/run/g.pid"));
    let tls = c.listeners[0].tls.as_ref().unwrap();
    assert_eq!(tls.cert.path, Path::new("/etc/g/../c.crt"));
    assert_eq!(tls.alpn, vec!["h2", "http/1.1"]);
}

#[test]
fn errors_name_line_and_column() {
    let e = parse("listeners:\n  - name: web\n    addr: 127.0.0.1:80\n    bogus: 1\n").unwrap_err();
    assert_eq!(e.pos.map(|p| p.line), Some(4), "{e}");
    assert!(e.to_string().starts_with("/etc/g/server.yaml:4:"), "{e}");
    assert!(e.message.contains("bogus"), "{e}");

    let e = parse("shutdown_timeout: 10x\nlisteners:\n  - {name: a, addr: '127.0.0.1:1'}\n")
        .unwrap_err();
    assert_eq!(e.to_string(), "/etc/g/server.yaml:1:19: shutdown_timeout: duration \"10x\" has unknown unit \"x\" (use ms, s, m, h or d)");

    let e = parse(
        "listeners:\n  - {name: a, addr: '127.0.0.1:1'}\n  - {name: a, addr: '127.0.0.1:2'}\n",
    )
    .unwrap_err();
    assert!(e.to_string().starts_with("/etc/g/server.yaml:3:"), "{e}");
    assert!(e.message.contains("duplicate listener name"), "{e}");
}

#[test]
fn routes_need_exactly_one_action() {
    let e =
        parse("listeners:\n  - name: a\n    addr: 127.0.0.1:1\n    routes:\n      - path: /x\n")
            .unwrap_err();
    assert!(e.message.contains("has no action"), "{e}");
    assert_eq!(e.pos.map(|p| p.line), Some(5));
    let e = parse(
        "listeners:\n  - name: a\n    addr: 127.0.0.1:1\n    routes:\n      - path: /x\n        status: {}\n        respond: {}\n",
    )
    .unwrap_err();
    assert!(e.message.contains("more than one action"), "{e}");
}

#[test]
fn max_headers_has_a_default_and_bounds() {
    let l = "listeners:\n  - name: web\n    addr: 127.0.0.1:0\n";
    assert_eq!(parse(l).unwrap().max_headers, 500);
    let c = parse(&format!("limits: {{ max_headers: 1000 }}\n{l}")).unwrap();
    assert_eq!(c.max_headers, 1000);
    let e = parse(&format!("limits:\n  max_headers: 0\n{l}")).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("/etc/g/server.yaml:2:16: limits.max_headers"),
        "{e}"
    );
    assert!(parse(&format!("limits: {{ headers: 5 }}\n{l}")).is_err());
}

#[test]
fn rate_limit_is_parsed_on_a_route() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.yaml");
    std::fs::write(
        &path,
        "listeners:\n  - name: web\n    addr: 127.0.0.1:0\n    routes:\n      - path: /api\n        respond: { body: x }\n        rate_limit: { requests: 2, per: 1h, burst: 3 }\n",
    )
    .unwrap();
    let c = Config::load(&path).unwrap();
    let r = c.listeners[0].routes[0]
        .options
        .rate_limit
        .as_ref()
        .unwrap();
    assert_eq!((r.requests, r.burst), (2, 3));
}

#[test]
fn a_fleet_store_is_a_redis_url_with_its_files_and_a_local_cache() {
    let listeners =
        "listeners:\n  - name: web\n    addr: 127.0.0.1:0\n    tls: { acme: [a.test] }\n";
    let c = parse(&format!(
        "acme:\n  directory: https://ca.test/dir\n  storage: redis://u:secret@10.0.0.5:6379/2\n  storage_key_file: store.key\n  cache: /var/lib/g\n  lock_ttl: 20s\ntls_tickets: {{ storage: 'rediss://10.0.0.5:6380/0', storage_ca: ca.pem }}\n{listeners}"
    ))
    .unwrap();
    let acme = c.acme.as_ref().unwrap();
    let shared = acme.shared.as_ref().unwrap();
    assert_eq!(
        shared.shown, "redis://u:***@10.0.0.5:6379/2",
        "no password in logs"
    );
    assert_eq!(
        shared.key_file.as_ref().unwrap().path,
        Path::new("/etc/g/store.key")
    );
    assert_eq!(
        acme.storage,
        Path::new("/var/lib/g"),
        "the cache is the local storage"
    );
    assert_eq!(acme.lock_ttl, Duration::from_secs(20));
    assert_eq!(
        c.listeners[0].tls.as_ref().unwrap().cert.path,
        Path::new("/var/lib/g/certs/a.test/cert.pem")
    );
    let Some(TicketsConfig::Store(t)) = &c.tls_tickets else {
        panic!("{:?}", c.tls_tickets)
    };
    assert_eq!(t.ca.as_ref().unwrap().path, Path::new("/etc/g/ca.pem"));
    assert_eq!(c.store_files().len(), 2);
    let c = parse(
        "tls_tickets: { storage: 'redis+sentinel://:pw@s1:26379,s2:26380/main/3' }\nlisteners:\n  - { name: web, addr: '127.0.0.1:0' }\n",
    );
    let Ok(Config {
        tls_tickets: Some(TicketsConfig::Store(t)),
        ..
    }) = c
    else {
        panic!("{c:?}")
    };
    let s = t.sentinel.unwrap();
    assert_eq!(s.sentinels, ["redis://s1:26379", "redis://s2:26380"]);
    assert_eq!((s.service.as_str(), s.db), ("main", 3));
    assert_eq!((s.user, s.password.as_deref()), (None, Some("pw")));
    assert_eq!(t.shown, "redis+sentinel://:***@s1:26379,s2:26380/main/3");

    for (text, line, says) in [
        (
            "acme:\n  directory: https://ca.test/dir\n  cache: x\n",
            3,
            "acme.cache: only with a shared store",
        ),
        (
            "acme:\n  directory: https://ca.test/dir\n  storage: redis://h:notaport/0\n",
            3,
            "acme.storage: redis://h:notaport/0",
        ),
        (
            "acme:\n  directory: https://ca.test/dir\n  storage: redis://h/0\n  lock_ttl: 1s\n",
            4,
            "acme.lock_ttl: at least 3s",
        ),
        (
            "tls_tickets: { key_file: k, storage: 'redis://h/0' }\n",
            1,
            "key_file or storage, not both",
        ),
        (
            "tls_tickets: { storage: /var/x }\n",
            1,
            "is not a redis://, rediss:// or redis+sentinel:// URL",
        ),
        (
            "tls_tickets: { storage: 'redis+sentinel://h:1,h:x/m' }\n",
            1,
            "\"h:x\" is not a Sentinel's HOST:PORT",
        ),
        (
            "tls_tickets: { storage: 'redis+sentinel://h:1' }\n",
            1,
            "names no service",
        ),
        (
            "tls_tickets: { storage: 'redis+sentinel://h:1/m', storage_ca: c.pem }\n",
            1,
            "Sentinels over TLS are not supported",
        ),
        ("tls_tickets: {}\n", 1, "needs key_file or storage"),
        (
            "tls_tickets: { key_file: k, storage_ca: c }\n",
            1,
            "tls_tickets.storage_ca: only with a shared store",
        ),
    ] {
        let e = parse(&format!(
            "{text}listeners:\n  - {{ name: web, addr: '127.0.0.1:0' }}\n"
        ))
        .unwrap_err();
        assert_eq!(e.pos.map(|p| p.line), Some(line), "{e}");
        assert!(e.message.contains(says), "{e}");
    }
}
