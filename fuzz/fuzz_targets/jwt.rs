//! JWT handling: arbitrary tokens, and arbitrary claims correctly signed (so
//! the claim checks run): `sub`, `exp`, `nbf`, the `channels` claim and its
//! glob patterns, `refresh`, and the HTTP credential check.

#![no_main]

use std::time::Duration;

use base64::Engine as _;
use chatcluster_gateway::auth::{self, AuthError, Authenticator, MAX_CHANNEL_PATTERNS};
use chatcluster_gateway::config::AuthMode;
use chatcluster_gateway::secret::Secret;
use chatcluster_protocol::validate;
use jsonwebtoken::{Algorithm, EncodingKey};
use libfuzzer_sys::fuzz_target;

const SECRET: &str = "fuzz-secret";

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let authenticator = Authenticator::new(AuthMode::Jwt, Some(SECRET), Duration::from_secs(5))
        .with_api_key(Some(Secret::from("api-key".to_owned())));
    let token = if selector & 1 == 0 {
        String::from_utf8_lossy(rest).into_owned()
    } else {
        // The claims are the fuzz input; the token is signed with the secret.
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let message = format!(
            "{}.{}",
            b64.encode(br#"{"alg":"HS256","typ":"JWT"}"#),
            b64.encode(rest)
        );
        let signature = jsonwebtoken::crypto::sign(
            message.as_bytes(),
            &EncodingKey::from_secret(SECRET.as_bytes()),
            Algorithm::HS256,
        )
        .expect("HS256 signs anything");
        format!("{message}.{signature}")
    };
    if !token.trim().is_empty() {
        assert_eq!(auth::bearer(&format!("Bearer {token}")), Some(token.trim()));
    }
    let _ = authenticator.authorize_read(Some(&token));
    if let Ok(Some(identity)) = authenticator.authenticate(Some(&token)) {
        assert!(validate::user_name(&identity.user).is_ok());
        if let Some(patterns) = &identity.channels {
            assert!(patterns.len() <= MAX_CHANNEL_PATTERNS);
            for pattern in patterns {
                for name in ["geral", "room.1", "café", "", pattern.as_str()] {
                    let _ = identity.may_use(name);
                }
                if !pattern.contains(['*', '?']) {
                    assert!(auth::glob_match(pattern, pattern));
                }
            }
        }
        match authenticator.refresh(&identity, &token) {
            Ok(renewed) => assert_eq!(renewed, identity),
            // The token may have expired between the two checks.
            Err(AuthError::Invalid(_)) => {}
            Err(other) => panic!("refresh with the same token failed: {other}"),
        }
    }
    // Patterns and names straight from the input.
    let text = String::from_utf8_lossy(rest);
    if let Some((pattern, name)) = text.split_once('\n') {
        let _ = auth::glob_match(pattern, name);
        assert!(auth::glob_match("*", name));
    }
});
