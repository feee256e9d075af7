//! Issue H, running as a service: `mesh service install` writes a unit that
//! `systemd-analyze verify` accepts (scripts/test installs systemd), and a config stub the
//! node reads.

use std::process::Command;

use mesh_tests::{prereq, util::*};

fn has_systemd_analyze() -> bool {
    Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn service_install_writes_a_unit_systemd_accepts_and_a_config_the_node_reads() {
    let test = "service_install_writes_a_unit_systemd_accepts_and_a_config_the_node_reads";
    if !prereq::require(
        test,
        has_systemd_analyze(),
        "needs systemd-analyze (Debian's systemd)",
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let units = tmp.path().join("units");
    let config = tmp.path().join("etc/config.toml");
    let models = tmp.path().join("models");
    let home = tmp.path().join("home");
    let out = mesh_cmd(&home, Some("lab-key"), None)
        .args(["service", "install", "--unit-dir"])
        .arg(&units)
        .arg("--service-config")
        .arg(&config)
        .arg("--target")
        .arg(&models)
        .output()
        .unwrap();
    print_output("mesh service install", &out);
    assert!(out.status.success());
    let said = String::from_utf8_lossy(&out.stdout);
    for step in [
        "useradd --system",
        "systemctl daemon-reload",
        "systemctl enable --now mesh",
    ] {
        assert!(said.contains(step), "{said}");
    }
    let unit_path = units.join("mesh.service");
    let unit = std::fs::read_to_string(&unit_path).unwrap();
    let bin = std::fs::canonicalize(mesh_bin()).unwrap();
    assert!(
        unit.contains(&format!("ExecStart={} node", bin.display())),
        "{unit}"
    );
    assert!(unit.contains(&format!(
        "ReadWritePaths=/var/lib/mesh {}",
        models.display()
    )));

    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit_path)
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
        .unwrap();
    print_output("systemd-analyze verify mesh.service", &verify);
    assert!(verify.status.success());
    let complaints: Vec<String> = String::from_utf8_lossy(&verify.stderr)
        .lines()
        .filter(|l| l.contains("mesh.service"))
        .map(str::to_string)
        .collect();
    assert!(complaints.is_empty(), "{complaints:?}");

    // The stub carries the key and parses: a node started on it runs.
    let stub = std::fs::read_to_string(&config).unwrap();
    assert!(stub.contains("mesh_key = \"lab-key\""));
    let node = NodeProc::start(
        &home,
        None,
        "127.0.0.1",
        &["--config", config.to_str().unwrap()],
    )
    .unwrap();
    assert!(http_get(node.api, "/health").is_ok());
    assert!(
        !node.log().contains("OPEN mode"),
        "the key came from the stub"
    );
}
