//! The systemd units in dist/systemd: `systemd-analyze verify` accepts each without a warning
//! (with the path of the binary under test in place of /usr/local/bin/ztm), and every flag they
//! give `ztm` is one its role takes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use ztm_testkit::prelude::*;

const INSTALLED: &str = "/usr/local/bin/ztm";

/// The flags (`--name`) in a unit's `ExecStart=` and default `Environment=` lines.
fn flags(unit: &str) -> Vec<String> {
    unit.lines()
        .filter(|l| l.starts_with("ExecStart=") || l.starts_with("Environment="))
        .flat_map(|l| l.split_whitespace())
        .map(|w| w.trim_start_matches("Environment=\"ZTM_").trim_matches('"'))
        .filter_map(|w| w.find("--").map(|at| w[at..].to_string()))
        .collect()
}

#[test]
fn systemd_units_verify_and_use_real_flags() {
    let dist = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../dist/systemd");
    let dir = TempDir::new("units");
    let ztm = ztm!();
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(&dist).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.ends_with(".service") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains(&format!("ExecStart={INSTALLED} ")),
            "{name}: {text}"
        );
        let copy = dir.join(&name);
        std::fs::write(&copy, text.replace(INSTALLED, ztm.bin_str())).unwrap();
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&copy)
            .output()
            .expect("systemd-analyze (Debian's systemd package) runs");
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && said.trim().is_empty(),
            "{name}:\n{said}"
        );

        // The role is the word after the binary; its help lists every flag the unit gives.
        let role = text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("ExecStart={INSTALLED} ")))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap()
            .to_string();
        let help = Command::new(ztm.bin())
            .args([role.as_str(), "--help"])
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&help.stdout).into_owned();
        let given = flags(&text);
        assert!(!given.is_empty(), "{name}: no flags found");
        for flag in given {
            assert!(
                help.contains(&format!("{flag} ")),
                "{name}: `ztm {role}` has no {flag}:\n{help}"
            );
        }
        seen.push(name);
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            "ztm-agent.service",
            "ztm-agent@.service",
            "ztm-ca.service",
            "ztm-hub.service"
        ]
    );
}

#[test]
fn flags_are_read_from_exec_and_environment_lines() {
    let unit = "[Service]\nEnvironment=\"ZTM_HUB_ARGS=--listen 0.0.0.0:8888 --ca x\"\n\
                ExecStart=/usr/local/bin/ztm hub --max-endpoints 5 $ZTM_HUB_ARGS\nRestart=no\n";
    assert_eq!(flags(unit), ["--listen", "--ca", "--max-endpoints"]);
}
