//! HS256 tokens for gateways in `AUTH_MODE=jwt`: minted by `chatctl token` from a local
//! stack's secret, and read (without checking, for display) by the clients.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{EncodingKey, Header};
use serde::{Deserialize, Serialize};

/// The claims the gateway reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user.
    pub sub: String,
    /// Expiry, seconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    /// Channel patterns the user may use (`*` and `?` globs); all when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<Vec<String>>,
}

/// A token that cannot be made or read.
#[derive(Debug, thiserror::Error)]
#[error("token: {0}")]
pub struct TokenError(String);

/// Signs a token for `user`, valid for `ttl`, limited to `channels` if given.
pub fn mint(
    secret: &str,
    user: &str,
    ttl: Duration,
    channels: Option<Vec<String>>,
) -> Result<String, TokenError> {
    chatcluster_protocol::validate::user_name(user).map_err(|e| TokenError(e.to_string()))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let claims = Claims {
        sub: user.to_owned(),
        exp: Some((now + ttl).as_secs()),
        channels,
    };
    jsonwebtoken::encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|e| TokenError(e.to_string()))
}

/// The user a token names, read without verifying it (the gateway verifies).
pub fn subject(token: &str) -> Option<String> {
    jsonwebtoken::dangerous::insecure_decode_claims::<Claims>(token)
        .ok()
        .map(|c| c.sub)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_name_their_user() {
        let token = mint(
            "secret",
            "alice",
            Duration::from_secs(60),
            Some(vec!["geral".into()]),
        )
        .expect("mint");
        assert_eq!(subject(&token).as_deref(), Some("alice"));
        assert!(mint("secret", "not a name", Duration::from_secs(60), None).is_err());
        assert_eq!(subject("garbage"), None);
    }
}
