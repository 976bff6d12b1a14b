//! PostgreSQL of the local stack: `initdb` into the state directory on first run, reused
//! after; password authentication; fast shutdown (SIGINT) to stop.
//!
//! PostgreSQL refuses to run as root. Under root it runs as an unprivileged user (`postgres`
//! by default, which Debian's package creates) that owns `<state>/postgres`; that user must
//! be able to enter the state directory, which is why root's default state directory is
//! `/var/lib/chatcluster` and not under `/root`.

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use nix::sys::signal::Signal;

use super::child::{ChildSpec, Readiness, Role, RunAs, StopRequest};
use super::programs::PostgresBin;
use super::secrets::Secret;

/// The superuser `initdb` creates; the gateways and workers connect as it.
pub const USER: &str = "chatcluster";
/// The database they use.
pub const DATABASE: &str = "postgres";
/// The line PostgreSQL logs when it has shut down cleanly.
pub const CLEAN_SHUTDOWN: &str = "database system is shut down";

/// Why PostgreSQL could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum PostgresError {
    /// The user to run as does not exist.
    #[error(
        "PostgreSQL refuses to run as root, and the user `{0}` to run it as does not exist; \
         install postgresql (it creates `postgres`), pass --postgres-user, or run chatctl as a normal user"
    )]
    NoUser(String),
    /// That user cannot reach the data directory.
    #[error(
        "PostgreSQL runs as `{user}`, who cannot enter {dir} (a parent directory is private, such as /root); \
         choose a --state-dir that user can reach, such as /var/lib/chatcluster (root's default)"
    )]
    Unreachable {
        /// The user.
        user: String,
        /// The directory.
        dir: String,
    },
    /// The data directory holds something that is not a PostgreSQL cluster.
    #[error(
        "{0} is not empty but holds no PostgreSQL cluster (no PG_VERSION); move it away or choose another --state-dir"
    )]
    NotACluster(String),
    /// `initdb` failed.
    #[error("initdb failed ({status}); see {log}:\n{tail}")]
    Initdb {
        /// Its exit status.
        status: String,
        /// Its log.
        log: String,
        /// The end of that log.
        tail: String,
    },
    /// A file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PostgresError {
    let what = what.into();
    move |source| PostgresError::Io { what, source }
}

/// The major version of an existing cluster (`PG_VERSION`), if there is one.
pub fn data_version(data: &Path) -> Option<u32> {
    std::fs::read_to_string(data.join("PG_VERSION"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Under root: the user PostgreSQL runs as. Otherwise `None` (it runs as chatctl's user).
pub fn run_as(user: &str) -> Result<Option<RunAs>, PostgresError> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    let found = nix::unistd::User::from_name(user)
        .ok()
        .flatten()
        .ok_or_else(|| PostgresError::NoUser(user.to_owned()))?;
    Ok(Some(RunAs {
        uid: found.uid.as_raw(),
        gid: found.gid.as_raw(),
    }))
}

/// Makes `<state>/postgres` and, when running as another user, hands it to that user and
/// checks that they can enter it.
pub async fn prepare_dir(
    dir: &Path,
    run_as: Option<RunAs>,
    user: &str,
) -> Result<(), PostgresError> {
    std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
    super::secrets::set_mode(dir, 0o700).map_err(io(format!("chmod {}", dir.display())))?;
    let Some(run_as) = run_as else {
        return Ok(());
    };
    std::os::unix::fs::chown(dir, Some(run_as.uid), Some(run_as.gid))
        .map_err(io(format!("chown {} to {user}", dir.display())))?;
    let reachable = tokio::process::Command::new("/bin/sh")
        .args(["-c", "cd \"$1\" && test -w .", "sh"])
        .arg(dir)
        .uid(run_as.uid)
        .gid(run_as.gid)
        .stdin(std::process::Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success());
    if reachable {
        Ok(())
    } else {
        Err(PostgresError::Unreachable {
            user: user.to_owned(),
            dir: dir.display().to_string(),
        })
    }
}

/// Runs `initdb` into `data` unless it already holds a cluster. Returns whether it did.
pub async fn initdb(
    bin: &PostgresBin,
    data: &Path,
    run_as: Option<RunAs>,
    password: &Secret,
    log: &Path,
) -> Result<bool, PostgresError> {
    if data_version(data).is_some() {
        return Ok(false);
    }
    if std::fs::read_dir(data).is_ok_and(|mut d| d.next().is_some()) {
        return Err(PostgresError::NotACluster(data.display().to_string()));
    }
    let parent = data.parent().unwrap_or(data);
    let pwfile = parent.join("initdb-password");
    super::secrets::write_private(&pwfile, format!("{}\n", password.expose()).as_bytes())
        .map_err(io("write the initdb password file"))?;
    if let Some(run_as) = run_as {
        std::os::unix::fs::chown(&pwfile, Some(run_as.uid), Some(run_as.gid))
            .map_err(io("chown the initdb password file"))?;
    }
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(io(format!("open {}", log.display())))?;
    let err = out.try_clone().map_err(io("open the initdb log"))?;
    let mut command = tokio::process::Command::new(bin.program("initdb"));
    command
        .arg("-D")
        .arg(data)
        .args([
            "-U",
            USER,
            "--auth=scram-sha-256",
            "-E",
            "UTF8",
            "--locale=C",
        ])
        .arg(format!("--pwfile={}", pwfile.display()))
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err);
    if let Some(run_as) = run_as {
        command.uid(run_as.uid).gid(run_as.gid);
    }
    let status = command.status().await;
    let _ = std::fs::remove_file(&pwfile);
    let status = status.map_err(io(format!("run {}", bin.program("initdb").display())))?;
    if status.success() {
        return Ok(true);
    }
    // Leave no half-made cluster behind: the next run starts over.
    let _ = std::fs::remove_dir_all(data);
    Err(PostgresError::Initdb {
        status: super::child::describe(status),
        log: log.display().to_string(),
        tail: super::child::log_tail(log, 15),
    })
}

/// The child spec of the postmaster. `connections` sizes `max_connections`.
pub fn spec(
    bin: &PostgresBin,
    data: &Path,
    port: u16,
    run_as: Option<RunAs>,
    connections: u32,
) -> ChildSpec {
    let setting = |s: String| [OsString::from("-c"), OsString::from(s)];
    let mut args = vec![OsString::from("-D"), data.as_os_str().to_owned()];
    args.push("-p".into());
    args.push(port.to_string().into());
    args.extend(setting("listen_addresses=127.0.0.1".into()));
    // No Unix socket: nothing here uses it, and it would need a directory the user can write.
    args.extend(setting("unix_socket_directories=".into()));
    args.extend(setting(format!("max_connections={connections}")));
    ChildSpec {
        name: "postgres".to_owned(),
        role: Role::Postgres,
        program: bin.program("postgres"),
        args,
        env: Vec::new(),
        run_as,
        ready: Readiness::Postgres {
            pg_isready: bin.program("pg_isready"),
            port,
        },
        start_timeout: Duration::from_secs(60),
        // SIGINT is PostgreSQL's fast shutdown: roll back open transactions, checkpoint, exit.
        stop: StopRequest::Signal(Signal::SIGINT),
        stop_timeout: Duration::from_secs(60),
    }
}

/// `postgres://chatcluster:<password>@127.0.0.1:<port>/postgres`.
pub fn url(port: u16, password: &Secret) -> String {
    format!(
        "postgres://{USER}:{}@127.0.0.1:{port}/{DATABASE}",
        password.expose()
    )
}

/// Whether the end of PostgreSQL's log (after the last fast-shutdown request) shows a normal
/// shutdown.
pub fn log_shows_clean_shutdown(log: &Path) -> bool {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let last_request = text.rfind("received fast shutdown request").unwrap_or(0);
    text[last_request..].contains(CLEAN_SHUTDOWN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_shutdown_is_read_from_the_log() {
        let dir = tempfile::tempdir().expect("dir");
        let log = dir.path().join("postgres.log");
        std::fs::write(
            &log,
            "LOG:  received fast shutdown request\nLOG:  database system is shut down\n\
             LOG:  database system is ready to accept connections\nLOG:  received fast shutdown request\n",
        )
        .expect("write");
        assert!(
            !log_shows_clean_shutdown(&log),
            "the last shutdown did not finish"
        );
        std::fs::write(
            &log,
            "LOG:  received fast shutdown request\nLOG:  database system is shut down\n",
        )
        .expect("write");
        assert!(log_shows_clean_shutdown(&log));
    }

    #[test]
    fn an_unknown_user_is_a_clear_error_under_root() {
        if nix::unistd::geteuid().is_root() {
            let err = run_as("chatctl-no-such-user").expect_err("unknown");
            assert!(err.to_string().contains("--postgres-user"), "{err}");
        } else {
            assert_eq!(run_as("anything").expect("not root"), None);
        }
    }
}
