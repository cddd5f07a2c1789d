//! End-to-end tests of `ztm ca`: the real process on loopback, driven with curl, openssl and
//! raw HTTP requests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use ztm_testkit::prelude::*;

#[test]
fn seed_curl_lines_work_verbatim() {
    let dir = TempDir::new("ca-seed");
    let ca = ztm!().start_ca(dir.path());
    let port = ca.addr.rsplit(':').next().unwrap();
    let base = format!("http://localhost:{port}");
    // The seed README's lines, with our port.
    for line in [
        format!("curl {base}/api/certificates/ca | tee ca.crt"),
        format!("curl {base}/api/certificates/root -X POST | tee root.key"),
        format!("curl {base}/api/certificates/root | tee root.crt"),
    ] {
        let (code, _, err) = sh(dir.path(), &line);
        assert_eq!(code, 0, "{line}: {err}");
    }
    let (code, out, err) = sh(dir.path(), "openssl verify -CAfile ca.crt root.crt");
    assert_eq!(code, 0, "verify: {out} {err}");
    assert!(out.contains("root.crt: OK"), "{out}");
    let (_, subject, _) = sh(dir.path(), "openssl x509 -in root.crt -noout -subject");
    assert!(
        subject.contains("CN") && subject.trim_end().ends_with("root"),
        "{subject}"
    );
    let (_, ca_subject, _) = sh(dir.path(), "openssl x509 -in ca.crt -noout -subject");
    assert!(ca_subject.trim_end().ends_with("ca"), "{ca_subject}");
    let (_, cert_pub, _) = sh(dir.path(), "openssl x509 -in root.crt -noout -pubkey");
    let (_, key_pub, _) = sh(dir.path(), "openssl pkey -in root.key -pubout");
    assert!(cert_pub.contains("BEGIN PUBLIC KEY"));
    assert_eq!(cert_pub, key_pub, "the key must match the certificate");
    let (_, text, _) = sh(dir.path(), "openssl x509 -in root.crt -noout -text");
    assert!(
        text.contains("prime256v1") || text.contains("P-256"),
        "{text}"
    );
    assert!(text.contains("TLS Web Client Authentication"), "{text}");
    // The key is never handed out again.
    let again = get(&ca.addr, "/api/certificates/root");
    assert!(!again.text().contains("PRIVATE KEY"));

    let (code, _, _) = sh(
        dir.path(),
        &format!("curl -sf {base}/api/certificates/root -X DELETE"),
    );
    assert_eq!(code, 0);
    assert_eq!(get(&ca.addr, "/api/certificates/root").status, 404);
    // The revocation is in the feed, and the listing no longer has it.
    let feed = get(&ca.addr, "/api/revocations?since=0").json();
    let revs = feed["revocations"].as_array().unwrap();
    assert_eq!(revs.len(), 1);
    assert_eq!(revs[0]["name"], "root");
    assert_eq!(
        get(&ca.addr, "/api/certificates").json(),
        serde_json::json!([])
    );
}

#[test]
fn duplicate_and_concurrent_creation() {
    let dir = TempDir::new("ca-dup");
    let ca = ztm!().start_ca(dir.path());
    assert_eq!(post(&ca.addr, "/api/certificates/alice", "").status, 200);
    let before = get(&ca.addr, "/api/certificates/alice").text();
    let second = post(&ca.addr, "/api/certificates/alice", "");
    assert_eq!(second.status, 409);
    assert!(second.json()["message"]
        .as_str()
        .unwrap()
        .contains("exists"));
    assert_eq!(get(&ca.addr, "/api/certificates/alice").text(), before);

    let handles: Vec<_> = (0..20)
        .map(|_| {
            let addr = ca.addr.clone();
            std::thread::spawn(move || post(&addr, "/api/certificates/bob", "").status)
        })
        .collect();
    let statuses: Vec<u16> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        1,
        "{statuses:?}"
    );
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 409),
        "{statuses:?}"
    );
    let list = get(&ca.addr, "/api/certificates").json();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alice", "bob"]);
}

fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// The database holds the CA's private key: a new one is created owner-only, and one left
/// readable by others (as earlier versions created it) is made owner-only at start.
#[test]
fn the_database_is_readable_by_its_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("ca-mode");
    let db = dir.join("ca.db");
    let mut ca = ztm!().start_ca(dir.path());
    assert_eq!(post(&ca.addr, "/api/certificates/carol", "").status, 200);
    assert_eq!(mode(&db), 0o600);
    assert_eq!(ca.proc.stop(), Some(0));
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    let ca2 = ztm!().start_ca(dir.path());
    assert_eq!(mode(&db), 0o600);
    for journal in ["ca.db-wal", "ca.db-shm"] {
        let path = dir.join(journal);
        if path.exists() {
            assert_eq!(mode(&path) & 0o077, 0, "{journal}");
        }
    }
    assert_eq!(get(&ca2.addr, "/api/certificates/carol").status, 200);
}

#[test]
fn restart_keeps_the_ca() {
    let dir = TempDir::new("ca-restart");
    let mut ca = ztm!().start_ca(dir.path());
    let first = get(&ca.addr, "/api/certificates/ca").text();
    assert!(first.starts_with("-----BEGIN CERTIFICATE-----"));
    assert_eq!(post(&ca.addr, "/api/certificates/carol", "").status, 200);
    assert_eq!(ca.proc.stop(), Some(0), "clean exit on SIGTERM");
    let ca2 = ztm!().start_ca(dir.path());
    assert_eq!(get(&ca2.addr, "/api/certificates/ca").text(), first);
    assert_eq!(get(&ca2.addr, "/api/certificates/carol").status, 200);
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let dir = TempDir::new("ca-bad");
    let ca = ztm!().start_ca(dir.path());
    let long = "a".repeat(300);
    let cases: Vec<(&str, String, u16)> = vec![
        ("POST", "/api/certificates/ca".into(), 403),
        ("POST", "/api/certificates/hub".into(), 403),
        ("POST", "/api/certificates/hub/x".into(), 403),
        ("POST", "/api/certificates/hub%2Fx".into(), 403),
        ("DELETE", "/api/certificates/ca".into(), 403),
        ("POST", "/api/certificates/".into(), 400),
        ("POST", "/api/certificates/..".into(), 400),
        ("POST", "/api/certificates/%2e%2e".into(), 400),
        ("POST", format!("/api/certificates/{long}"), 400),
        ("POST", "/api/certificates/a%07b".into(), 400),
        ("POST", "/api/certificates/a%0Ab".into(), 400),
        ("POST", "/api/certificates/a%zz".into(), 400),
        ("POST", "/api/certificates/a%ff".into(), 400),
        ("POST", "/api/certificates/a%2".into(), 400),
        ("PUT", "/api/certificates/root".into(), 405),
        ("PATCH", "/api/certificates/root".into(), 405),
        ("GET", "/api/sign/hub/h1".into(), 405),
        ("GET", "/api/revocations?since=abc".into(), 400),
        ("DELETE", "/api/certificates/nobody".into(), 404),
        ("GET", "/api/nothing".into(), 404),
    ];
    for (method, path, want) in &cases {
        let r = http(&ca.addr, method, path, &[], b"").unwrap();
        assert_eq!(r.status, *want, "{method} {path}: {}", r.text());
        let body = r.json();
        assert_eq!(body["status"], *want, "{method} {path}");
        assert!(!body["message"].as_str().unwrap().is_empty());
    }
    for body in [
        "",
        "hello",
        "-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----\n",
    ] {
        let r = post(&ca.addr, "/api/sign/hub/h1", body);
        assert_eq!(r.status, 400, "{body:?}: {}", r.text());
    }
    let r = post(&ca.addr, "/api/sign/hub/h1?names=bad%20name", "x");
    assert_eq!(r.status, 400);
    let big = vec![b'a'; 1 << 20];
    let r = http(&ca.addr, "POST", "/api/sign/hub/h1", &[], &big).unwrap();
    assert_eq!(r.status, 413);
    // Nothing was created by any of it.
    assert_eq!(
        get(&ca.addr, "/api/certificates").json(),
        serde_json::json!([])
    );
    assert_eq!(
        get(&ca.addr, "/api/revocations").json()["revocations"],
        serde_json::json!([])
    );
}

#[test]
fn signs_hub_public_keys() {
    let dir = TempDir::new("ca-hub");
    let ca = ztm!().start_ca(dir.path());
    let (code, _, err) = sh(
        dir.path(),
        "openssl ecparam -name prime256v1 -genkey -noout -out hub.key && openssl pkey -in hub.key -pubout -out hub.pub",
    );
    assert_eq!(code, 0, "{err}");
    let public = std::fs::read_to_string(dir.join("hub.pub")).unwrap();
    let r = post(
        &ca.addr,
        "/api/sign/hub/h1?names=localhost,127.0.0.1",
        &public,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    std::fs::write(dir.join("hub.crt"), r.body).unwrap();
    std::fs::write(
        dir.join("ca.crt"),
        get(&ca.addr, "/api/certificates/ca").body,
    )
    .unwrap();
    let (code, out, err) = sh(dir.path(), "openssl verify -CAfile ca.crt hub.crt");
    assert_eq!(code, 0, "{out}{err}");
    let (_, text, _) = sh(dir.path(), "openssl x509 -in hub.crt -noout -text");
    assert!(
        text.contains("CN = hub/h1") || text.contains("CN=hub/h1"),
        "{text}"
    );
    assert!(
        text.contains("DNS:localhost") && text.contains("IP Address:127.0.0.1"),
        "{text}"
    );
    assert!(text.contains("TLS Web Server Authentication"), "{text}");
}

#[test]
fn admin_token_guards_everything_but_the_ca_certificate() {
    let dir = TempDir::new("ca-token");
    let ca = ztm!().start_ca_env(dir.path(), &[], &[("ZTM_CA_TOKEN", "s3cret")]);
    let addr = ca.addr.clone();
    assert_eq!(get(&addr, "/api/certificates/ca").status, 200);
    assert_eq!(post(&addr, "/api/certificates/alice", "").status, 401);
    assert_eq!(get(&addr, "/api/certificates").status, 401);
    assert_eq!(get(&addr, "/api/revocations").status, 401);
    let wrong = http(
        &addr,
        "POST",
        "/api/certificates/alice",
        &[("Authorization", "Bearer nope")],
        b"",
    )
    .unwrap();
    assert_eq!(wrong.status, 401);
    let ok = http(
        &addr,
        "POST",
        "/api/certificates/alice",
        &[("Authorization", "Bearer s3cret")],
        b"",
    )
    .unwrap();
    assert_eq!(ok.status, 200);
    assert!(ok.text().contains("PRIVATE KEY"));
}

/// A CA without a token answers anyone who can reach it, so like the agent it answers only
/// requests addressed to localhost (a web page that rebinds its DNS name to 127.0.0.1 must not
/// get keys) and refuses state-changing requests from pages of another origin.
#[test]
fn without_a_token_only_local_callers_and_same_origin_pages() {
    let dir = TempDir::new("ca-guard");
    let ca = ztm!().start_ca(dir.path());
    let port = ca.addr.rsplit(':').next().unwrap().to_string();
    let evil_host = format!("evil.example:{port}");
    for (method, path) in [
        ("GET", "/api/certificates"),
        ("POST", "/api/certificates/alice"),
        ("POST", "/api/sign/hub/h1"),
    ] {
        let r = http(&ca.addr, method, path, &[("Host", &evil_host)], b"").unwrap();
        assert_eq!(r.status, 403, "{method} {path} rebound: {}", r.text());
        assert!(r.text().contains("localhost"), "{}", r.text());
    }
    for header in [
        ("Origin", "https://evil.example"),
        ("Sec-Fetch-Site", "cross-site"),
    ] {
        for (method, path) in [
            ("POST", "/api/certificates/alice"),
            ("DELETE", "/api/certificates/root"),
        ] {
            let r = http(&ca.addr, method, path, &[header], b"").unwrap();
            assert_eq!(
                r.status,
                403,
                "{method} {path} with {header:?}: {}",
                r.text()
            );
        }
    }
    // Nothing was created or revoked.
    assert_eq!(get(&ca.addr, "/api/certificates/alice").status, 404);
    assert_eq!(
        get(&ca.addr, "/api/revocations").json()["revocations"],
        serde_json::json!([])
    );
    // Local callers and same-origin pages are served.
    let local = format!("localhost:{port}");
    let r = http(
        &ca.addr,
        "GET",
        "/api/certificates/ca",
        &[("Host", &local)],
        b"",
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let same_origin = format!("http://localhost:{port}");
    let r = http(
        &ca.addr,
        "POST",
        "/api/certificates/alice",
        &[("Host", &local), ("Origin", &same_origin)],
        b"",
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("PRIVATE KEY"));
}

fn run_to_exit(dir: &std::path::Path, args: &[&str]) -> (Option<i32>, String) {
    let mut p = ztm!().spawn("ca-fail", dir, args);
    let code = p.wait_exit(Duration::from_secs(20));
    let log = p.log();
    let _ = std::fs::remove_file(&p.log_path);
    (code, log)
}

#[test]
fn startup_errors_are_one_line_and_non_zero() {
    let dir = TempDir::new("ca-fail");
    // Each of these fails before it listens.
    let port = "127.0.0.1:0".to_string();
    let missing = dir.join("no/such/dir/ca.db");
    let garbage = dir.join("garbage.db");
    std::fs::write(&garbage, vec![0x42u8; 8192]).unwrap();
    let dir_as_db = dir.join("a-directory");
    std::fs::create_dir(&dir_as_db).unwrap();
    for (db, expect) in [
        (missing.to_str().unwrap(), "cannot open database"),
        (garbage.to_str().unwrap(), "not a database"),
        (dir_as_db.to_str().unwrap(), "cannot open database"),
    ] {
        let (code, log) = run_to_exit(dir.path(), &["ca", "--listen", &port, "--database", db]);
        assert!(matches!(code, Some(c) if c != 0), "{db}: {code:?} {log}");
        let errors: Vec<&str> = log.lines().filter(|l| l.contains("error")).collect();
        assert_eq!(errors.len(), 1, "{log}");
        assert!(errors[0].contains(expect), "{log}");
    }
    // The garbage file is left as it was.
    assert_eq!(std::fs::read(&garbage).unwrap(), vec![0x42u8; 8192]);

    let ca = ztm!().start_ca(dir.path());
    let other_db = dir.join("other.db");
    let (code, log) = run_to_exit(
        dir.path(),
        &[
            "ca",
            "--listen",
            &ca.addr,
            "--database",
            other_db.to_str().unwrap(),
        ],
    );
    assert!(matches!(code, Some(c) if c != 0), "{log}");
    assert!(log.contains("already in use"), "{log}");
    assert_eq!(
        log.lines().filter(|l| l.contains("error")).count(),
        1,
        "{log}"
    );

    let (code, log) = run_to_exit(dir.path(), &["ca", "--listen", "0.0.0.0:1"]);
    assert!(matches!(code, Some(c) if c != 0), "{log}");
    assert!(log.contains("admin token"), "{log}");
    let (code, log) = run_to_exit(dir.path(), &["ca", "--bogus-flag"]);
    assert_eq!(code, Some(2), "{log}");
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line for a bad flag: {log}");
    assert!(
        lines[0].contains("unexpected argument '--bogus-flag'")
            && lines[0].contains("ztm ca --help"),
        "{log}"
    );

    // With stderr on a full disk (/dev/full: every write fails with ENOSPC) the error cannot
    // be said, and the exit code still says it failed as any error does: 1, not a panic's 101.
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let missing = missing.to_str().unwrap();
    for role in ["ca", "agent"] {
        let status = ztm!()
            .command(dir.path())
            .args([role, "--listen", "127.0.0.1:0", "--database", missing])
            .stdout(full.try_clone().unwrap())
            .stderr(full.try_clone().unwrap())
            .status()
            .unwrap();
        assert_eq!(
            status.code(),
            Some(1),
            "ztm {role} with stderr on a full disk"
        );
    }
}

/// With --tls the CA serves HTTPS with a certificate it signs itself: CN ca/server (no user's
/// and no hub's name), server authentication only, for the --name host names. Plain HTTP gets
/// no answer there, and the start-up line gives the CA certificate's fingerprint.
#[test]
fn tls_with_a_certificate_of_its_own() {
    let dir = TempDir::new("ca-tls");
    let ca = ztm!().start_ca_with(
        dir.path(),
        &[
            "--tls",
            "--name",
            "ca.test",
            "--name",
            "127.0.0.1",
            "--token",
            "t0ken",
        ],
    );
    let port = ca.addr.rsplit(':').next().unwrap().to_string();
    let (code, _, err) = sh(
        dir.path(),
        &format!("curl -sfk https://{}/api/certificates/ca > ca.crt", ca.addr),
    );
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = sh(
        dir.path(),
        &format!(
            "curl -sf --cacert ca.crt --resolve ca.test:{port}:127.0.0.1 \
             https://ca.test:{port}/api/certificates/ca"
        ),
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, std::fs::read_to_string(dir.join("ca.crt")).unwrap());
    // localhost is not one of its names here.
    let (code, _, _) = sh(
        dir.path(),
        &format!("curl -sf --cacert ca.crt https://localhost:{port}/api/certificates/ca"),
    );
    assert_ne!(code, 0);
    let (code, text, err) = sh(
        dir.path(),
        &format!(
            "openssl s_client -connect {} -servername ca.test </dev/null 2>/dev/null \
             | openssl x509 -noout -text",
            ca.addr
        ),
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        text.contains("Subject: CN = ca/server") || text.contains("Subject: CN=ca/server"),
        "{text}"
    );
    assert!(
        text.contains("Issuer: CN = ca") || text.contains("Issuer: CN=ca"),
        "{text}"
    );
    assert!(text.contains("TLS Web Server Authentication"), "{text}");
    assert!(!text.contains("Client Authentication"), "{text}");
    assert!(
        text.contains("DNS:ca.test") && text.contains("IP Address:127.0.0.1"),
        "{text}"
    );
    assert!(
        !matches!(http(&ca.addr, "GET", "/api/certificates/ca", &[], b""), Ok(r) if r.status == 200)
    );
    let (_, fingerprint, _) = sh(
        dir.path(),
        "openssl x509 -in ca.crt -noout -fingerprint -sha256 | cut -d= -f2 | tr -d ':\\n' \
         | tr A-F a-f",
    );
    assert_eq!(fingerprint.len(), 64, "{fingerprint}");
    let log = ca.proc.log();
    assert!(log.contains(&format!("https://{}", ca.addr)), "{log}");
    assert!(log.contains(&fingerprint), "{log}");
}
