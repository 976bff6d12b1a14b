//! Generated credentials of the local stack: Redis and PostgreSQL passwords and the JWT
//! secret, made once per state directory and kept in `<state>/secrets/` with mode 0600.
//!
//! They reach the children through environment variables, never command lines (which any
//! local user can read in `ps`), and are never printed.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use rand::RngCore as _;

/// A secret string whose `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The value, for the places that need it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Self(value.to_owned())
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// The stack's credentials.
#[derive(Debug, Clone)]
pub struct Secrets {
    /// Redis `requirepass`.
    pub redis_password: Secret,
    /// Password of the PostgreSQL superuser `chatcluster`.
    pub postgres_password: Secret,
    /// HS256 secret of `--auth jwt`.
    pub jwt_secret: Secret,
}

/// 32 random bytes as hex: safe in URLs, config files and shell words.
fn generate() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads `dir/name`, creating it with a new random value (mode 0600) when missing.
fn load_or_create(dir: &Path, name: &str) -> std::io::Result<Secret> {
    let path = dir.join(name);
    match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => return Ok(Secret(text.trim().to_owned())),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let value = generate();
    write_private(&path, format!("{value}\n").as_bytes())?;
    Ok(Secret(value))
}

/// Writes `contents` to `path`, readable and writable by its owner only (mode 0600).
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents)
}

impl Secrets {
    /// Loads the secrets of a state directory's `secrets/`, making missing ones.
    pub fn load_or_create(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        set_mode(dir, 0o700)?;
        Ok(Self {
            redis_password: load_or_create(dir, "redis-password")?,
            postgres_password: load_or_create(dir, "postgres-password")?,
            jwt_secret: load_or_create(dir, "jwt-secret")?,
        })
    }

    /// Reads only the JWT secret of an existing state directory (for `chatctl token`).
    pub fn jwt_secret(dir: &Path) -> std::io::Result<Secret> {
        let text = std::fs::read_to_string(dir.join("jwt-secret"))?;
        Ok(Secret(text.trim().to_owned()))
    }
}

/// Sets the permission bits of `path`.
pub fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn made_once_private_and_reused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let secrets = dir.path().join("secrets");
        let first = Secrets::load_or_create(&secrets).expect("create");
        let again = Secrets::load_or_create(&secrets).expect("load");
        assert_eq!(first.redis_password, again.redis_password);
        assert_ne!(first.redis_password, first.postgres_password);
        assert_eq!(first.jwt_secret.expose().len(), 64);
        let mode = std::fs::metadata(secrets.join("jwt-secret"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(format!("{:?}", first.jwt_secret), "Secret(..)");
        assert_eq!(
            Secrets::jwt_secret(&secrets).expect("jwt"),
            first.jwt_secret
        );
    }
}
