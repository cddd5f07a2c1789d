//! Logs for machines: `ZTM_LOG_FORMAT=json` gives one JSON object a line, with the level, the
//! message and the event's fields; a format the binary does not know is refused at start.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;
use ztm_testkit::prelude::*;

#[test]
fn json_logs_are_one_object_a_line() {
    let dir = TempDir::new("json-logs");
    let db = dir.join("ca.db");
    let mut child = ztm!()
        .command(dir.path())
        .args(["ca", "--listen", "127.0.0.1:0", "--database"])
        .arg(&db)
        .env("ZTM_LOG_FORMAT", "json")
        .env("ZTM_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(20)) {
        let listening = line.contains("listening");
        lines.push(line);
        if listening {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        lines.last().is_some_and(|l| l.contains("listening")),
        "the CA never said it listens: {lines:?}"
    );
    for line in &lines {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["timestamp"].is_string(), "{line}");
        assert!(
            ["INFO", "WARN", "ERROR"].contains(&v["level"].as_str().unwrap_or("")),
            "{line}"
        );
        assert!(v["message"].is_string(), "{line}");
    }
}

#[test]
fn an_unknown_log_format_is_refused() {
    let dir = TempDir::new("bad-log-format");
    let out = ztm!()
        .command(dir.path())
        .args(["ca", "--listen", "127.0.0.1:0"])
        .env("ZTM_LOG_FORMAT", "xml")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("give text or json"), "{err}");
    assert!(!dir.join("ztm-ca.db").exists(), "nothing was started");
}
