//! `lifeguard check-config` on the real binary: the example file, and every problem of a
//! bad file reported at once (file, line, field), exit 64.

mod common;

use std::process::Command;

use common::*;

fn check_config(args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lifeguard"));
    cmd.arg("check-config").args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("LIFEGUARD_") {
            cmd.env_remove(k);
        }
    }
    cmd.output().expect("lifeguard runs")
}

#[test]
fn the_example_file_is_accepted_and_documents_every_key() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/lifeguard.example.toml");
    let out = check_config(&["--config", example]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every key check-config prints is written in the example (set or commented out).
    let text = std::fs::read_to_string(example).unwrap();
    for line in stdout.lines() {
        let key = line.split(" = ").next().unwrap();
        assert!(
            text.lines().any(|l| {
                let l = l.trim_start_matches(['#', ' ']);
                l.starts_with(&format!("{key} = "))
            }),
            "the example does not document {key}"
        );
    }
    assert!(
        stdout.contains("upstream = ws://127.0.0.1:3001"),
        "{stdout}"
    );
    // The commented-out examples are valid values too: uncomment them all and check.
    let keys: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.split(" = ").next())
        .collect();
    let uncommented: Vec<String> = text
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest) if keys.iter().any(|k| rest.starts_with(&format!("{k} = "))) => {
                rest.to_string()
            }
            _ => l.to_string(),
        })
        .collect();
    let dir = TempDir::new("example");
    let all = dir.path("all.toml");
    std::fs::write(&all, uncommented.join("\n")).unwrap();
    let out = check_config(&["--config", all.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("client_heartbeat = 10s"), "{stdout}");
    assert!(
        stdout.contains("access_token = (unset)"),
        "empty token = unset: {stdout}"
    );
}

#[test]
fn every_problem_is_one_line_with_file_line_and_field() {
    let dir = TempDir::new("check-config");
    let file = dir.path("bad.toml");
    std::fs::write(
        &file,
        "upstream = \"http://napcat:3001\"\nfall = 0\nprobe_interval = \"soon\"\ncolour = \"blue\"\n",
    )
    .unwrap();
    let out = check_config(&["--config", file.to_str().unwrap(), "--rise", "0"]);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 5, "one line per problem:\n{err}");
    let has = |a: &str, b: &str| {
        lines
            .iter()
            .any(|l| l.contains("bad.toml") && l.contains(a) && l.contains(b))
    };
    assert!(has("line 1", "ws://"), "{err}");
    assert!(has("line 2", "fall"), "{err}");
    assert!(has("line 3", "probe_interval"), "{err}");
    assert!(has("line 4", "colour"), "{err}");
    assert!(lines.iter().any(|l| l.contains("--rise")), "{err}");
    assert!(out.stdout.is_empty());
}

#[test]
fn a_syntax_error_is_the_one_problem() {
    let dir = TempDir::new("check-config-syntax");
    let file = dir.path("broken.toml");
    std::fs::write(&file, "upstream = \"ws://h:1\"\nfall = [\n").unwrap();
    let out = check_config(&["--config", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("broken.toml") && err.contains("line"), "{err}");
}
