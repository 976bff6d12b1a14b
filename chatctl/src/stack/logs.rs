//! Per-run log directories: `<state>/logs/<YYYYmmdd-HHMMSS>/<child>.log`, with
//! `<state>/logs/latest` pointing at the newest and only the newest [`KEEP_RUNS`] kept.

use std::path::{Path, PathBuf};

/// Runs whose logs are kept.
pub const KEEP_RUNS: usize = 20;

/// Makes a fresh directory for this run's logs and points `latest` at it.
pub fn new_run_dir(logs: &Path) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(logs)?;
    let stamp = chrono::Local::now().format("%Y%m%d-%H%M%S").to_string();
    let mut dir = logs.join(&stamp);
    let mut n = 1;
    while dir.exists() {
        n += 1;
        dir = logs.join(format!("{stamp}-{n}"));
    }
    std::fs::create_dir(&dir)?;
    let latest = logs.join("latest");
    let _ = std::fs::remove_file(&latest);
    if let Some(name) = dir.file_name() {
        std::os::unix::fs::symlink(name, &latest)?;
    }
    prune(logs, KEEP_RUNS);
    Ok(dir)
}

/// Removes all but the newest `keep` run directories.
fn prune(logs: &Path, keep: usize) {
    let mut runs: Vec<PathBuf> = std::fs::read_dir(logs)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    // Names are timestamps: lexical order is time order.
    runs.sort();
    let excess = runs.len().saturating_sub(keep);
    for old in &runs[..excess] {
        let _ = std::fs::remove_dir_all(old);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_run_gets_its_own_directory_and_old_ones_go() {
        let dir = tempfile::tempdir().expect("dir");
        let first = new_run_dir(dir.path()).expect("first");
        let second = new_run_dir(dir.path()).expect("second");
        assert_ne!(first, second);
        let latest = std::fs::read_link(dir.path().join("latest")).expect("latest");
        assert_eq!(Some(latest.as_os_str()), second.file_name());
        for i in 0..5 {
            std::fs::create_dir(dir.path().join(format!("19990101-00000{i}"))).expect("old");
        }
        prune(dir.path(), 3);
        assert!(second.exists() && first.exists());
        assert!(!dir.path().join("19990101-000002").exists());
        assert!(dir.path().join("19990101-000004").exists());
    }
}
