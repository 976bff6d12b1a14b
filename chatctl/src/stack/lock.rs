//! One `chatctl up` per state directory: an exclusive `flock` on `<state>/chatctl.lock`.
//!
//! The lock is taken before anything else in the directory is touched, so a second `up`
//! is refused without disturbing the first. The kernel drops it when the holder exits,
//! however it exits, so a crashed supervisor never leaves a stale lock behind.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// The held lock; released on drop.
#[derive(Debug)]
pub struct StateLock {
    file: File,
    path: PathBuf,
}

/// Whether the lock could be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it.
    #[error("{} is locked by another chatctl", .0.display())]
    Held(PathBuf),
    /// The file could not be opened or locked.
    #[error("cannot lock {}: {source}", path.display())]
    Io {
        /// The lock file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn open(path: &Path) -> Result<File, LockError> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .map_err(|source| LockError::Io {
            path: path.to_owned(),
            source,
        })
}

impl StateLock {
    /// Takes the lock without waiting, and writes this process's pid into the file.
    pub fn acquire(path: &Path) -> Result<Self, LockError> {
        let file = open(path)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Err(LockError::Held(path.to_owned())),
            Err(TryLockError::Error(source)) => {
                return Err(LockError::Io {
                    path: path.to_owned(),
                    source,
                });
            }
        }
        let mut lock = Self {
            file,
            path: path.to_owned(),
        };
        lock.write_pid().map_err(|source| LockError::Io {
            path: path.to_owned(),
            source,
        })?;
        Ok(lock)
    }

    fn write_pid(&mut self) -> std::io::Result<()> {
        self.file.set_len(0)?;
        writeln!(self.file, "{}", std::process::id())
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Whether some process holds the lock at `path` now (a missing file means no).
pub fn is_held(path: &Path) -> bool {
    let Ok(file) = File::open(path) else {
        return false;
    };
    // A shared lock conflicts only with the exclusive one `up` holds.
    matches!(file.try_lock_shared(), Err(TryLockError::WouldBlock))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_acquire_is_refused_until_the_first_drops() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("chatctl.lock");
        assert!(!is_held(&path));
        let first = StateLock::acquire(&path).expect("first");
        assert!(is_held(&path));
        assert!(matches!(StateLock::acquire(&path), Err(LockError::Held(_))));
        let pid = std::fs::read_to_string(first.path()).expect("read");
        assert_eq!(pid.trim(), std::process::id().to_string());
        drop(first);
        assert!(!is_held(&path));
        StateLock::acquire(&path).expect("free again");
    }
}
