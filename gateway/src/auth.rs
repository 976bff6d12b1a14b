//! Who a connection is and which channels it may use.
//!
//! `AUTH_MODE=none`: the client names itself with `login`. `AUTH_MODE=jwt`: an
//! HS256 token (header `Authorization: Bearer` or query `?token=`) is checked
//! before the upgrade; `sub` is the user and the optional `channels` claim lists
//! glob patterns (`*` any run, `?` one character) the user may subscribe and
//! publish to.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::config::AuthMode;
use chatcluster_protocol::validate;

/// A connection's verified identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user name.
    pub user: String,
    /// Channel glob patterns the user may use; `None` means every channel.
    pub channels: Option<Vec<String>>,
}

impl Identity {
    /// An identity with access to every channel.
    pub fn unrestricted(user: String) -> Self {
        Self {
            user,
            channels: None,
        }
    }

    /// Whether the identity may subscribe and publish to `channel`.
    pub fn may_use(&self, channel: &str) -> bool {
        self.channels
            .as_ref()
            .is_none_or(|patterns| patterns.iter().any(|p| glob_match(p, channel)))
    }
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// No token was presented in JWT mode.
    #[error("missing token: send Authorization: Bearer <jwt> or ?token=<jwt>")]
    Missing,
    /// The token does not verify (signature, expiry, format).
    #[error("invalid token: {0}")]
    Invalid(String),
    /// The token's `sub` is not a valid user name.
    #[error("invalid token: {0}")]
    BadSubject(String),
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    channels: Option<Vec<String>>,
}

/// Verifies tokens according to the configured mode.
#[derive(Clone)]
pub struct Authenticator {
    mode: AuthMode,
    key: Option<DecodingKey>,
    validation: Validation,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("Authenticator")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// An authenticator for `mode`; `secret` is required in JWT mode.
    pub fn new(mode: AuthMode, secret: Option<&str>) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["sub"]);
        validation.validate_aud = false;
        validation.leeway = 5;
        Self {
            mode,
            key: secret.map(|s| DecodingKey::from_secret(s.as_bytes())),
            validation,
        }
    }

    /// The mode.
    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// Checks the token of an upgrade request. `Ok(None)` in `none` mode (the
    /// client logs in later); the identity in JWT mode.
    pub fn authenticate(&self, token: Option<&str>) -> Result<Option<Identity>, AuthError> {
        let (AuthMode::Jwt, Some(key)) = (self.mode, &self.key) else {
            return Ok(None);
        };
        let token = token.filter(|t| !t.is_empty()).ok_or(AuthError::Missing)?;
        let data = jsonwebtoken::decode::<Claims>(token, key, &self.validation)
            .map_err(|e| AuthError::Invalid(e.to_string()))?;
        validate::user_name(&data.claims.sub).map_err(|e| AuthError::BadSubject(e.to_string()))?;
        Ok(Some(Identity {
            user: data.claims.sub,
            channels: data.claims.channels,
        }))
    }
}

/// The bearer token of an `Authorization` header value.
pub fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Matches `name` against a glob `pattern` with `*` (any run) and `?` (one character).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    let mut backtrack: Option<(usize, usize)> = None;
    while ni < n.len() {
        match p.get(pi) {
            Some(b'*') => {
                backtrack = Some((pi, ni));
                pi += 1;
            }
            Some(&c) if c == b'?' || c == n[ni] => {
                pi += 1;
                ni += 1;
            }
            _ => match backtrack {
                Some((star, matched)) => {
                    pi = star + 1;
                    ni = matched + 1;
                    backtrack = Some((star, matched + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};

    fn token(claims: serde_json::Value, secret: &str) -> String {
        jsonwebtoken::encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn globs() {
        assert!(glob_match("*", "anything"));
        assert!(glob_match("room.*", "room.1"));
        assert!(!glob_match("room.*", "lobby"));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "ac"));
        assert!(glob_match("*.ops.*", "eu.ops.alerts"));
        assert!(glob_match("geral", "geral"));
        assert!(!glob_match("geral", "geral2"));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("a*b*c", "aXXbYY"));
    }

    #[test]
    fn jwt_mode_checks_tokens() {
        let auth = Authenticator::new(AuthMode::Jwt, Some("s3cret"));
        let exp = chrono::Utc::now().timestamp() + 60;
        let good = token(
            serde_json::json!({"sub": "alice", "exp": exp, "channels": ["room.*"]}),
            "s3cret",
        );
        let identity = auth.authenticate(Some(&good)).unwrap().unwrap();
        assert_eq!(identity.user, "alice");
        assert!(identity.may_use("room.1"));
        assert!(!identity.may_use("lobby"));

        assert_eq!(auth.authenticate(None), Err(AuthError::Missing));
        let forged = token(serde_json::json!({"sub": "alice", "exp": exp}), "other");
        assert!(matches!(
            auth.authenticate(Some(&forged)),
            Err(AuthError::Invalid(_))
        ));
        let expired = token(
            serde_json::json!({"sub": "alice", "exp": exp - 3600}),
            "s3cret",
        );
        assert!(matches!(
            auth.authenticate(Some(&expired)),
            Err(AuthError::Invalid(_))
        ));
        let bad_sub = token(serde_json::json!({"sub": "a b", "exp": exp}), "s3cret");
        assert!(matches!(
            auth.authenticate(Some(&bad_sub)),
            Err(AuthError::BadSubject(_))
        ));
        let unlimited = token(serde_json::json!({"sub": "bob"}), "s3cret");
        assert!(
            auth.authenticate(Some(&unlimited))
                .unwrap()
                .unwrap()
                .may_use("x")
        );
    }

    #[test]
    fn none_mode_needs_no_token() {
        let auth = Authenticator::new(AuthMode::None, None);
        assert_eq!(auth.authenticate(None), Ok(None));
    }

    #[test]
    fn bearer_header() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer"), None);
    }
}
