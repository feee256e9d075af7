//! `mesh service install`: the systemd unit (`packaging/mesh.service`, embedded in the binary)
//! with this machine's binary, store and target folders filled in, and a config stub.
//!
//! The unit runs `mesh node` as a dedicated user with its store under `/var/lib/mesh`, restarts
//! it on failure, and hardens it (`NoNewPrivileges`, `ProtectSystem=strict` with
//! `ReadWritePaths` for the store and the targets). Nothing is started: the command says what
//! to run next.

use std::{
    fs, io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

/// The unit as shipped.
pub const UNIT: &str = include_str!("../../packaging/mesh.service");

/// What to install, and where.
#[derive(Clone, Debug)]
pub struct ServiceOptions {
    /// Where the unit goes (`/etc/systemd/system`).
    pub unit_dir: PathBuf,
    /// The config file the service reads (`/etc/mesh/config.toml`).
    pub config: PathBuf,
    /// The `mesh` binary the service runs.
    pub bin: PathBuf,
    /// The store (`/var/lib/mesh`).
    pub home: PathBuf,
    /// The user (and group) it runs as.
    pub user: String,
    /// Folders the node may write fetched models into.
    pub targets: Vec<PathBuf>,
    /// The mesh key to put in a new config stub.
    pub mesh_key: Option<String>,
}

/// What `install` wrote, and what to run next.
#[derive(Clone, Debug)]
pub struct Installed {
    /// The unit file.
    pub unit: PathBuf,
    /// The config file.
    pub config: PathBuf,
    /// Whether the config was written (an existing one is kept).
    pub config_written: bool,
    /// Commands to run next, in order.
    pub next: Vec<String>,
}

/// Why installing failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    /// A path the unit would name can't be written in a unit file.
    #[error(
        "{0}: paths in the unit must be absolute and free of whitespace, quotes and backslashes"
    )]
    BadPath(PathBuf),
    /// Writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

fn unit_path(p: &Path) -> Result<String, ServiceError> {
    let s = p.to_string_lossy();
    let bad = s.chars().any(|c| c.is_whitespace() || "\"'\\%".contains(c));
    if !p.is_absolute() || bad {
        return Err(ServiceError::BadPath(p.to_path_buf()));
    }
    Ok(s.into_owned())
}

/// The unit for `o`.
pub fn render_unit(o: &ServiceOptions) -> Result<String, ServiceError> {
    let home = unit_path(&o.home)?;
    let mut writable = vec![home.clone()];
    for t in &o.targets {
        writable.push(unit_path(t)?);
    }
    let bin = unit_path(&o.bin)?;
    let config = unit_path(&o.config)?;
    // systemd creates (and chowns) the store only when it is under /var/lib.
    let state_dir = o
        .home
        .strip_prefix("/var/lib")
        .ok()
        .map(|d| d.to_string_lossy().into_owned());
    let mut out = String::new();
    for line in UNIT.lines() {
        let line = match line.split_once('=') {
            Some(("User", _)) => format!("User={}", o.user),
            Some(("Group", _)) => format!("Group={}", o.user),
            Some(("Environment", v)) if v.starts_with("MESH_HOME=") => {
                format!("Environment=MESH_HOME={home}")
            }
            Some(("Environment", v)) if v.starts_with("MESH_CONFIG=") => {
                format!("Environment=MESH_CONFIG={config}")
            }
            Some(("Environment", v)) if v.starts_with("HF_HOME=") => {
                format!("Environment=HF_HOME={home}/huggingface")
            }
            Some(("ExecStart", _)) => format!("ExecStart={bin} node"),
            Some(("ReadWritePaths", _)) => format!("ReadWritePaths={}", writable.join(" ")),
            Some(("StateDirectory", _)) => match &state_dir {
                Some(dir) if !dir.is_empty() => format!("StateDirectory={dir}"),
                _ => continue,
            },
            Some(("StateDirectoryMode", _)) if state_dir.is_none() => continue,
            _ => line.to_string(),
        };
        out.push_str(&line);
        out.push('\n');
    }
    Ok(out)
}

/// A config stub: every key, commented out but the addresses (and the key, if given).
pub fn config_stub(mesh_key: Option<&str>) -> String {
    let key = match mesh_key {
        Some(k) => format!("mesh_key = {}\n", toml_string(k)),
        None => "# mesh_key = \"our-lab-secret\"   # the same on every node of the mesh\n".into(),
    };
    format!(
        "# mesh node configuration (README.md). Flags and environment variables win over it.\n\
         {key}\
         listen = \"0.0.0.0:7341\"          # QUIC (UDP) and mDNS; open 7341/udp and 7341/tcp\n\
         api = \"127.0.0.1:7342\"           # local API and the fleet page (http://127.0.0.1:7342/)\n\
         # peers = [\"10.1.0.5:7341\"]      # peers on other subnets\n\
         # max_upload = \"50MB\"            # bytes per second to peers\n\
         # max_download = \"100MB\"         # bytes per second in, whole node\n\
         # max_hf_download = \"20MB\"       # bytes per second from HuggingFace (the uplink)\n\
         # hf_hours = \"18:00-07:00\"       # HuggingFace only in these hours (local time)\n\
         # max_store = \"200GB\"            # evict least recently used unpinned models\n"
    )
}

fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Writes the unit and, if none exists, the config stub.
pub fn install(o: &ServiceOptions) -> Result<Installed, ServiceError> {
    let unit_text = render_unit(o)?;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ServiceError::Io { path, source }
    };
    fs::create_dir_all(&o.unit_dir).map_err(io(&o.unit_dir))?;
    let unit = o.unit_dir.join("mesh.service");
    fs::write(&unit, unit_text).map_err(io(&unit))?;
    fs::set_permissions(&unit, fs::Permissions::from_mode(0o644)).map_err(io(&unit))?;
    let config_written = !o.config.exists();
    if config_written {
        if let Some(dir) = o.config.parent() {
            fs::create_dir_all(dir).map_err(io(dir))?;
        }
        fs::write(&o.config, config_stub(o.mesh_key.as_deref())).map_err(io(&o.config))?;
        // The service's group reads it; the mesh key is in it.
        fs::set_permissions(&o.config, fs::Permissions::from_mode(0o640)).map_err(io(&o.config))?;
    }
    let user = &o.user;
    let mut next = vec![format!(
        "useradd --system --user-group --home-dir {} --shell /usr/sbin/nologin {user}",
        o.home.display()
    )];
    next.push(format!("chgrp {user} {}", o.config.display()));
    for t in &o.targets {
        next.push(format!("mkdir -p {0} && chown {user}: {0}", t.display()));
    }
    if !o.home.starts_with("/var/lib") {
        next.push(format!(
            "mkdir -p {0} && chown {user}: {0}",
            o.home.display()
        ));
    }
    next.push("systemctl daemon-reload".into());
    next.push("systemctl enable --now mesh".into());
    next.push("journalctl -u mesh -f".into());
    Ok(Installed {
        unit,
        config: o.config.clone(),
        config_written,
        next,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> ServiceOptions {
        ServiceOptions {
            unit_dir: "/etc/systemd/system".into(),
            config: "/etc/mesh/config.toml".into(),
            bin: "/opt/mesh/bin/mesh".into(),
            home: "/var/lib/mesh".into(),
            user: "mesh".into(),
            targets: vec!["/srv/models".into(), "/home/lab/ComfyUI/models".into()],
            mesh_key: None,
        }
    }

    #[test]
    fn the_unit_names_the_binary_store_and_targets() {
        let unit = render_unit(&options()).unwrap();
        assert!(unit.contains("\nExecStart=/opt/mesh/bin/mesh node\n"));
        assert!(
            unit.contains("\nReadWritePaths=/var/lib/mesh /srv/models /home/lab/ComfyUI/models\n")
        );
        for line in [
            "User=mesh",
            "Restart=on-failure",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "StateDirectory=mesh",
            "Environment=MESH_HOME=/var/lib/mesh",
        ] {
            assert!(unit.lines().any(|l| l == line), "{line} missing");
        }
        let elsewhere = ServiceOptions {
            home: "/data/mesh".into(),
            ..options()
        };
        let unit = render_unit(&elsewhere).unwrap();
        assert!(!unit.contains("StateDirectory"));
        let bad = ServiceOptions {
            targets: vec!["/srv/my models".into()],
            ..options()
        };
        assert!(matches!(render_unit(&bad), Err(ServiceError::BadPath(_))));
    }

    #[test]
    fn the_config_stub_parses() {
        for key in [None, Some("lab \"secret\"")] {
            let stub = config_stub(key);
            let parsed: crate::config::ConfigFile = toml::from_str(&stub).unwrap();
            assert_eq!(parsed.mesh_key.as_deref(), key);
            assert_eq!(parsed.api.unwrap().port(), 7342);
        }
    }
}
