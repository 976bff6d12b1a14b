//! Who a connection is and which channels it may use.
//!
//! `AUTH_MODE=none`: the client names itself with `login`. `AUTH_MODE=jwt`: an
//! HS256 token (header `Authorization: Bearer` or query `?token=`) is checked
//! before the upgrade and on every HTTP read; `sub` is the user and the
//! optional `channels` claim lists glob patterns (`*` any run, `?` one
//! character) the user may create, subscribe, publish, and read presence and
//! history of. `exp` and `nbf` are checked with `JWT_LEEWAY` of tolerance; an
//! open session ends when its token expires unless the client sent a newer
//! token with `refresh` ([`Authenticator::refresh`]). The API key, when set,
//! is accepted wherever a token is (it grants every channel).

use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::config::AuthMode;
use crate::secret::Secret;
use chatcluster_protocol::validate;

/// Most patterns a token's `channels` claim may hold.
pub const MAX_CHANNEL_PATTERNS: usize = 64;
/// Longest pattern of the `channels` claim, in bytes.
pub const MAX_PATTERN_BYTES: usize = 128;
/// Largest `JWT_LEEWAY`.
pub const MAX_LEEWAY: Duration = Duration::from_secs(3600);

/// A connection's verified identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user name.
    pub user: String,
    /// Channel glob patterns the user may use; `None` means every channel.
    pub channels: Option<Vec<String>>,
    /// The token's `exp` (seconds since the Unix epoch), if it has one.
    pub expires: Option<u64>,
}

impl Identity {
    /// An identity with access to every channel and no expiry.
    pub fn unrestricted(user: String) -> Self {
        Self {
            user,
            channels: None,
            expires: None,
        }
    }

    /// Whether the identity may use `channel` (create, subscribe, publish, read).
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
    /// The token does not verify (signature, expiry, not-before, format).
    #[error("invalid token: {0}")]
    Invalid(String),
    /// The token's `sub` is not a valid user name.
    #[error("invalid token: {0}")]
    BadSubject(String),
    /// The token's `channels` claim is over its limits.
    #[error("invalid token: {0}")]
    BadChannels(String),
    /// A `refresh` token names another user.
    #[error("the new token is for user {new:?}, this connection is {current:?}")]
    OtherUser {
        /// The connection's user.
        current: String,
        /// The new token's user.
        new: String,
    },
    /// `refresh` on a gateway without JWT auth.
    #[error("refresh needs AUTH_MODE=jwt; this gateway does not use tokens")]
    NotJwt,
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    channels: Option<Vec<String>>,
    #[serde(default)]
    exp: Option<u64>,
}

/// Verifies tokens according to the configured mode.
#[derive(Clone)]
pub struct Authenticator {
    mode: AuthMode,
    key: Option<DecodingKey>,
    api_key: Option<Secret>,
    validation: Validation,
    leeway: Duration,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the keys.
        f.debug_struct("Authenticator")
            .field("mode", &self.mode)
            .field("leeway", &self.leeway)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// An authenticator for `mode`; `secret` is required in JWT mode. `exp`
    /// and `nbf` are checked with `leeway` (at most [`MAX_LEEWAY`]).
    pub fn new(mode: AuthMode, secret: Option<&str>, leeway: Duration) -> Self {
        let leeway = leeway.min(MAX_LEEWAY);
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["sub"]);
        validation.validate_aud = false;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = leeway.as_secs();
        Self {
            mode,
            key: secret.map(|s| DecodingKey::from_secret(s.as_bytes())),
            api_key: None,
            validation,
            leeway,
        }
    }

    /// Also accepts `api_key` (when set and not empty) as a bearer credential
    /// of the HTTP API.
    pub fn with_api_key(mut self, api_key: Option<Secret>) -> Self {
        self.api_key = api_key.filter(|k| !k.is_empty());
        self
    }

    /// The mode.
    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// The tolerance on `exp` and `nbf`.
    pub fn leeway(&self) -> Duration {
        self.leeway
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
        identity(data.claims).map(Some)
    }

    /// Checks a `refresh` token for a session of `current`: it must verify
    /// and name the same user.
    pub fn refresh(&self, current: &Identity, token: &str) -> Result<Identity, AuthError> {
        let identity = self.authenticate(Some(token))?.ok_or(AuthError::NotJwt)?;
        if identity.user != current.user {
            return Err(AuthError::OtherUser {
                current: current.user.clone(),
                new: identity.user,
            });
        }
        Ok(identity)
    }

    /// Checks the credential of an HTTP read (`GET /api/...`): in `none` mode
    /// anyone may read (as anyone may open a WebSocket); in JWT mode a valid
    /// token (its `channels` claim applies) or the API key (every channel).
    /// `Ok(None)` means unrestricted.
    pub fn authorize_read(&self, bearer: Option<&str>) -> Result<Option<Identity>, AuthError> {
        if self.mode == AuthMode::None {
            return Ok(None);
        }
        if let (Some(presented), Some(key)) = (bearer, &self.api_key)
            && constant_time_eq(presented.as_bytes(), key.as_bytes())
        {
            return Ok(None);
        }
        self.authenticate(bearer)
    }

    /// Whether `presented` is the API key (never when none is configured).
    pub fn is_api_key(&self, presented: Option<&str>) -> bool {
        match (presented, &self.api_key) {
            (Some(presented), Some(key)) => constant_time_eq(presented.as_bytes(), key.as_bytes()),
            _ => false,
        }
    }

    /// Whether an API key is configured.
    pub fn has_api_key(&self) -> bool {
        self.api_key.is_some()
    }
}

/// The identity of verified claims: `sub` normalised to NFC and checked,
/// the `channels` claim within its limits.
fn identity(claims: Claims) -> Result<Identity, AuthError> {
    let user = validate::nfc_owned(claims.sub);
    validate::user_name(&user).map_err(|e| AuthError::BadSubject(e.to_string()))?;
    if let Some(patterns) = &claims.channels {
        if patterns.len() > MAX_CHANNEL_PATTERNS {
            return Err(AuthError::BadChannels(format!(
                "the channels claim has {} patterns, more than {MAX_CHANNEL_PATTERNS}",
                patterns.len()
            )));
        }
        if let Some(long) = patterns.iter().find(|p| p.len() > MAX_PATTERN_BYTES) {
            return Err(AuthError::BadChannels(format!(
                "a channels pattern is {} bytes, more than {MAX_PATTERN_BYTES}",
                long.len()
            )));
        }
    }
    Ok(Identity {
        user,
        channels: claims
            .channels
            .map(|patterns| patterns.into_iter().map(validate::nfc_owned).collect()),
        expires: claims.exp,
    })
}

/// Compares secrets without leaking where they differ through timing.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The bearer token of an `Authorization` header value.
pub fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Matches `name` against a glob `pattern` with `*` (any run) and `?` (one
/// character, of any script). Linear backtracking: at most
/// `pattern × name` steps, whatever the input.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0, 0);
    let mut backtrack: Option<(usize, usize)> = None;
    while ni < n.len() {
        match p.get(pi) {
            Some('*') => {
                backtrack = Some((pi, ni));
                pi += 1;
            }
            Some(&c) if c == '?' || c == n[ni] => {
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
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};

    const LEEWAY: Duration = Duration::from_secs(5);

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
        assert!(
            glob_match("caf?", "café"),
            "? is one character, not one byte"
        );
        assert!(glob_match("会*", "会議室"));
    }

    #[test]
    fn jwt_mode_checks_tokens() {
        let auth = Authenticator::new(AuthMode::Jwt, Some("s3cret"), LEEWAY);
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
        let auth = Authenticator::new(AuthMode::None, None, LEEWAY);
        assert_eq!(auth.authenticate(None), Ok(None));
        assert_eq!(
            auth.authorize_read(None),
            Ok(None),
            "reads are open like the socket"
        );
    }

    #[test]
    fn nbf_and_exp_are_checked_with_the_leeway() {
        let auth = Authenticator::new(AuthMode::Jwt, Some("s"), LEEWAY);
        let now = chrono::Utc::now().timestamp();
        let check = |claims| auth.authenticate(Some(&token(claims, "s")));
        let not_yet = check(serde_json::json!({"sub": "a", "nbf": now + 60}));
        assert!(
            matches!(&not_yet, Err(AuthError::Invalid(m)) if m.contains("Immature")),
            "{not_yet:?}"
        );
        // Within the leeway either side.
        assert!(check(serde_json::json!({"sub": "a", "nbf": now + 3})).is_ok());
        assert!(check(serde_json::json!({"sub": "a", "exp": now - 3})).is_ok());
        assert!(check(serde_json::json!({"sub": "a", "exp": now - 10})).is_err());
        let strict = Authenticator::new(AuthMode::Jwt, Some("s"), Duration::ZERO);
        assert!(
            strict
                .authenticate(Some(&token(
                    serde_json::json!({"sub": "a", "nbf": now + 3}),
                    "s"
                )))
                .is_err()
        );
        let identity = check(serde_json::json!({"sub": "a", "exp": now + 60}))
            .unwrap()
            .unwrap();
        assert_eq!(identity.expires, Some((now + 60) as u64));
        // Malformed times are refused, not ignored.
        assert!(check(serde_json::json!({"sub": "a", "nbf": "tomorrow"})).is_err());
        assert!(check(serde_json::json!({"sub": "a", "exp": -1})).is_err());
    }

    #[test]
    fn unicode_subjects_are_normalised() {
        let auth = Authenticator::new(AuthMode::Jwt, Some("s"), LEEWAY);
        let decomposed = token(serde_json::json!({"sub": "Jose\u{301}"}), "s");
        let identity = auth.authenticate(Some(&decomposed)).unwrap().unwrap();
        assert_eq!(identity.user, "José");
    }

    #[test]
    fn channels_claim_is_bounded() {
        let auth = Authenticator::new(AuthMode::Jwt, Some("s"), LEEWAY);
        let many: Vec<String> = (0..=MAX_CHANNEL_PATTERNS)
            .map(|i| format!("c{i}"))
            .collect();
        let refused = auth.authenticate(Some(&token(
            serde_json::json!({"sub": "a", "channels": many}),
            "s",
        )));
        assert!(matches!(refused, Err(AuthError::BadChannels(_))));
        let long = "x".repeat(MAX_PATTERN_BYTES + 1);
        let refused = auth.authenticate(Some(&token(
            serde_json::json!({"sub": "a", "channels": [long]}),
            "s",
        )));
        assert!(matches!(refused, Err(AuthError::BadChannels(_))));
    }

    #[test]
    fn refresh_keeps_the_user() {
        let auth = Authenticator::new(AuthMode::Jwt, Some("s"), LEEWAY);
        let now = chrono::Utc::now().timestamp();
        let current = Identity::unrestricted("alice".into());
        let renewed = auth
            .refresh(
                &current,
                &token(serde_json::json!({"sub": "alice", "exp": now + 600}), "s"),
            )
            .unwrap();
        assert_eq!(renewed.expires, Some((now + 600) as u64));
        assert!(matches!(
            auth.refresh(&current, &token(serde_json::json!({"sub": "bob"}), "s")),
            Err(AuthError::OtherUser { .. })
        ));
        assert!(matches!(
            auth.refresh(&current, &token(serde_json::json!({"sub": "alice"}), "x")),
            Err(AuthError::Invalid(_))
        ));
        let none = Authenticator::new(AuthMode::None, None, LEEWAY);
        assert_eq!(none.refresh(&current, "t"), Err(AuthError::NotJwt));
    }

    #[test]
    fn http_reads_take_a_token_or_the_api_key() {
        let auth = Authenticator::new(AuthMode::Jwt, Some("s"), LEEWAY)
            .with_api_key(Some(Secret::from("k3y".to_owned())));
        assert_eq!(auth.authorize_read(Some("k3y")), Ok(None));
        assert_eq!(auth.authorize_read(None), Err(AuthError::Missing));
        assert!(auth.authorize_read(Some("k3z")).is_err());
        let limited = token(serde_json::json!({"sub": "a", "channels": ["x.*"]}), "s");
        let identity = auth.authorize_read(Some(&limited)).unwrap().unwrap();
        assert!(identity.may_use("x.1") && !identity.may_use("y"));
        assert!(auth.is_api_key(Some("k3y")) && !auth.is_api_key(Some("k3")));
        let without = Authenticator::new(AuthMode::Jwt, Some("s"), LEEWAY).with_api_key(None);
        assert!(!without.is_api_key(Some("")) && !without.has_api_key());
    }

    #[test]
    fn constant_time_comparison() {
        assert!(constant_time_eq(b"key", b"key"));
        assert!(!constant_time_eq(b"key", b"kez"));
        assert!(!constant_time_eq(b"key", b"key2"));
    }

    #[test]
    fn bearer_header() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer"), None);
    }
}
