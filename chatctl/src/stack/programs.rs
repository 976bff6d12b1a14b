//! Finding the programs the stack runs, checked before anything starts.
//!
//! Debian keeps `haproxy` in `/usr/sbin` (not on a normal user's `PATH`) and PostgreSQL's
//! server programs in `/usr/lib/postgresql/<version>/bin` (never on `PATH`), so both places
//! are searched explicitly. A missing program is an error that names the package.

use std::path::{Path, PathBuf};

/// A program that could not be found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{program}` not found (looked in {searched}); {remedy}")]
pub struct MissingProgram {
    /// The program.
    pub program: String,
    /// Where it was looked for.
    pub searched: String,
    /// What to do.
    pub remedy: String,
}

fn apt_remedy(package: &str) -> String {
    format!(
        "install it: `sudo apt-get install -y {package}` (Debian/Ubuntu), or run scripts/up, which installs what is missing"
    )
}

/// Directories of `PATH`.
fn path_dirs() -> Vec<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default()
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Finds `name` on `PATH` or in `extra` directories.
pub fn find(name: &str, extra: &[&str], package: &str) -> Result<PathBuf, MissingProgram> {
    let mut dirs = path_dirs();
    dirs.extend(extra.iter().map(PathBuf::from));
    dirs.iter()
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
        .ok_or_else(|| MissingProgram {
            program: name.to_owned(),
            searched: format!("PATH, {}", extra.join(", ")),
            remedy: apt_remedy(package),
        })
}

/// `redis-server`.
pub fn redis_server() -> Result<PathBuf, MissingProgram> {
    find(
        "redis-server",
        &["/usr/bin", "/usr/local/bin"],
        "redis-server",
    )
}

/// `haproxy`.
pub fn haproxy() -> Result<PathBuf, MissingProgram> {
    find("haproxy", &["/usr/sbin", "/usr/local/sbin"], "haproxy")
}

/// The directory holding one PostgreSQL version's `postgres`, `initdb` and `pg_isready`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresBin {
    /// The directory.
    pub dir: PathBuf,
    /// Major version, when known from the path (`/usr/lib/postgresql/15/bin`).
    pub major: Option<u32>,
}

impl PostgresBin {
    /// A program of this installation.
    pub fn program(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn complete(dir: &Path) -> bool {
        ["postgres", "initdb", "pg_isready"]
            .iter()
            .all(|p| is_executable(&dir.join(p)))
    }
}

/// Finds PostgreSQL's server programs: `explicit` if given; else Debian's
/// `/usr/lib/postgresql/<N>/bin`, preferring major version `want` (the version of an existing
/// data directory) and otherwise the newest; else the directory of `postgres` on `PATH`.
pub fn postgres(explicit: Option<&Path>, want: Option<u32>) -> Result<PostgresBin, MissingProgram> {
    let missing = |searched: String, remedy: String| MissingProgram {
        program: "postgres, initdb, pg_isready".to_owned(),
        searched,
        remedy,
    };
    if let Some(dir) = explicit {
        return if PostgresBin::complete(dir) {
            Ok(PostgresBin {
                dir: dir.to_owned(),
                major: None,
            })
        } else {
            Err(missing(
                dir.display().to_string(),
                "check --postgres-bin-dir".to_owned(),
            ))
        };
    }
    let mut debian: Vec<PostgresBin> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let major = entry.file_name().to_str()?.parse().ok()?;
            let dir = entry.path().join("bin");
            PostgresBin::complete(&dir).then_some(PostgresBin {
                dir,
                major: Some(major),
            })
        })
        .collect();
    debian.sort_by_key(|b| std::cmp::Reverse(b.major));
    if let Some(want) = want {
        if let Some(bin) = debian.iter().find(|b| b.major == Some(want)) {
            return Ok(bin.clone());
        }
        if !debian.is_empty() {
            return Err(missing(
                "/usr/lib/postgresql".to_owned(),
                format!(
                    "the data directory was created by PostgreSQL {want}: install postgresql-{want}, \
                     or use another --state-dir"
                ),
            ));
        }
    }
    if let Some(bin) = debian.into_iter().next() {
        return Ok(bin);
    }
    if let Ok(postgres) = find("postgres", &[], "postgresql") {
        let real = std::fs::canonicalize(&postgres).unwrap_or(postgres);
        if let Some(dir) = real.parent().filter(|d| PostgresBin::complete(d)) {
            return Ok(PostgresBin {
                dir: dir.to_owned(),
                major: None,
            });
        }
    }
    Err(missing(
        "/usr/lib/postgresql/*/bin, PATH".to_owned(),
        apt_remedy("postgresql"),
    ))
}

/// Finds one of chatcluster's own binaries: in `bin_dir` if given, else beside the running
/// `chatctl`, else on `PATH`.
pub fn chatcluster(name: &str, bin_dir: Option<&Path>) -> Result<PathBuf, MissingProgram> {
    let remedy = "build it: `cargo build --release -p chatcluster-gateway -p chatcluster-worker` \
                  (scripts/up does), or point --bin-dir at the directory holding it"
        .to_owned();
    if let Some(dir) = bin_dir {
        let path = dir.join(name);
        return if is_executable(&path) {
            Ok(path)
        } else {
            Err(MissingProgram {
                program: name.to_owned(),
                searched: dir.display().to_string(),
                remedy,
            })
        };
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join(name)));
    // Integration tests run from target/<profile>/deps: look one level up as well.
    let above = std::env::current_exe().ok().and_then(|exe| {
        let dir = exe.parent()?;
        (dir.file_name()? == "deps").then(|| dir.parent().map(|d| d.join(name)))?
    });
    beside
        .into_iter()
        .chain(above)
        .find(|p| is_executable(p))
        .map(Ok)
        .unwrap_or_else(|| {
            find(name, &[], "").map_err(|_| MissingProgram {
                program: name.to_owned(),
                searched: "beside chatctl, PATH".to_owned(),
                remedy,
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_program_names_the_package() {
        let err = find("chatctl-no-such-program", &["/nonexistent"], "some-package")
            .expect_err("missing");
        let text = err.to_string();
        assert!(text.contains("apt-get install -y some-package"), "{text}");
        assert!(text.contains("/nonexistent"), "{text}");
    }

    #[test]
    fn explicit_postgres_dir_must_hold_the_programs() {
        let dir = tempfile::tempdir().expect("temp dir");
        let err = postgres(Some(dir.path()), None).expect_err("empty dir");
        assert!(err.to_string().contains("--postgres-bin-dir"), "{err}");
    }
}
