//! The deployment files agree with each other: every path the example configuration makes
//! KeyVault write is writable under the systemd unit's sandbox (`ProtectSystem=strict`
//! leaves only `ReadWritePaths`, `StateDirectory` and `LogsDirectory` writable), and the
//! unit's open-file limit leaves room for the configured connections.

use std::path::{Path, PathBuf};

use keyvault::config::{Config, StorageConfig};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The values of `key=` lines of the unit (whitespace-separated lists joined).
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.trim().strip_prefix(&format!("{key}=")))
        .flat_map(|v| v.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .collect()
}

#[test]
fn the_example_configuration_writes_only_where_the_unit_allows() {
    let unit = std::fs::read_to_string(repo().join("deploy/keyvault.service")).unwrap();
    let config = Config::load(&repo().join("deploy/keyvault.example.toml")).unwrap();
    let mut writable: Vec<PathBuf> = unit_values(&unit, "ReadWritePaths").into_iter().map(PathBuf::from).collect();
    writable.extend(unit_values(&unit, "StateDirectory").iter().map(|d| Path::new("/var/lib").join(d)));
    writable.extend(unit_values(&unit, "LogsDirectory").iter().map(|d| Path::new("/var/log").join(d)));
    assert!(unit.contains("ProtectSystem=strict"), "the unit makes everything else read-only");

    let mut written = vec![config.audit.path.parent().unwrap().to_path_buf()];
    if let StorageConfig::Sled { path } = &config.storage {
        written.push(path.clone());
    }
    for w in &written {
        assert!(
            writable.iter().any(|d| w.starts_with(d)),
            "{} is written by the example configuration but not writable under the unit ({writable:?})",
            w.display()
        );
    }

    let nofile: usize = unit_values(&unit, "LimitNOFILE").first().expect("the unit sets LimitNOFILE").parse().unwrap();
    assert!(
        nofile >= config.listener.max_connections + 256,
        "LimitNOFILE={nofile} leaves no room for {} connections",
        config.listener.max_connections
    );
}
