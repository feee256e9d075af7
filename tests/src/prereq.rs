//! What a test needs from the machine (root, `ip` and `tc`, Python packages), checked without
//! silent skips: when `CI` is set, a missing prerequisite fails the test; elsewhere the test
//! prints `SKIPPED <test>: <why>` straight to the terminal (past the test harness's output
//! capture) and returns early, and `scripts/test` counts it as skipped, not passed.

use std::{io::Write, process::Command};

/// Whether this run is CI (`CI` set to anything but empty, `0` or `false`).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// Whether `test` may run: `ok` says whether its prerequisite is there, `why` what it needs.
/// In CI a missing prerequisite panics, failing the test.
pub fn require(test: &str, ok: bool, why: &str) -> bool {
    if ok {
        return true;
    }
    assert!(
        !in_ci(),
        "{test}: {why}, and CI is set: prerequisites must be installed"
    );
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
    false
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Root, for mounts.
pub fn root(test: &str) -> bool {
    require(test, is_root(), "needs root")
}

/// Root with `ip` and `tc`, for network namespaces.
pub fn netns(test: &str) -> bool {
    require(
        test,
        crate::netlab::available(),
        "needs root, ip and tc for network namespaces",
    )
}

/// `python3` that can import every module in `modules`.
pub fn python(test: &str, modules: &[&str]) -> bool {
    let script = modules
        .iter()
        .map(|m| format!("import {m}"))
        .collect::<Vec<_>>()
        .join("; ");
    let ok = Command::new("python3")
        .args(["-c", &script])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    require(
        test,
        ok,
        &format!(
            "needs python3 with {} (scripts/test installs them)",
            modules.join(", ")
        ),
    )
}
