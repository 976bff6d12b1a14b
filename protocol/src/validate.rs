//! Name and size rules of PROTOCOL.md, with errors that say what to fix.

use crate::frame::ErrorCode;

/// Longest channel name, in bytes.
pub const MAX_CHANNEL_LEN: usize = 64;
/// Longest user name, in bytes.
pub const MAX_USER_LEN: usize = 32;
/// Default limit on a message text, in bytes of UTF-8.
pub const DEFAULT_MAX_TEXT_BYTES: usize = 4096;
/// Default limit on one WebSocket frame, in bytes.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 64 * 1024;
/// Largest page `history` returns.
pub const MAX_HISTORY_LIMIT: u32 = 100;

/// A value that breaks one of the protocol's rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    /// Channel name outside `^[A-Za-z0-9_.:-]{1,64}$`.
    #[error("invalid channel name {0:?}: use 1 to 64 characters from A-Z a-z 0-9 _ . : -")]
    Channel(String),
    /// User name outside `^[A-Za-z0-9_.-]{1,32}$`.
    #[error("invalid user name {0:?}: use 1 to 32 characters from A-Z a-z 0-9 _ . -")]
    User(String),
    /// A message without text.
    #[error("text must not be empty")]
    EmptyText,
    /// A message text over the limit.
    #[error("text is {len} bytes, more than the limit of {max} bytes")]
    TextTooLong {
        /// Size of the rejected text.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// A `history` limit outside 1..=100.
    #[error("limit must be between 1 and {MAX_HISTORY_LIMIT}, got {0}")]
    HistoryLimit(u32),
}

impl ValidationError {
    /// The error code a client receives for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::TextTooLong { .. } => ErrorCode::TooLarge,
            _ => ErrorCode::BadRequest,
        }
    }
}

/// Shortens a rejected value before it is echoed in an error message.
fn echo(value: &str) -> String {
    value.chars().take(MAX_CHANNEL_LEN + 1).collect()
}

fn is_name(value: &str, max: usize, extra: &[u8]) -> bool {
    !value.is_empty()
        && value.len() <= max
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || extra.contains(&b))
}

/// Checks a channel name against `^[A-Za-z0-9_.:-]{1,64}$`.
pub fn channel_name(value: &str) -> Result<(), ValidationError> {
    if is_name(value, MAX_CHANNEL_LEN, b"_.:-") {
        Ok(())
    } else {
        Err(ValidationError::Channel(echo(value)))
    }
}

/// Checks a user name against `^[A-Za-z0-9_.-]{1,32}$`.
pub fn user_name(value: &str) -> Result<(), ValidationError> {
    if is_name(value, MAX_USER_LEN, b"_.-") {
        Ok(())
    } else {
        Err(ValidationError::User(echo(value)))
    }
}

/// Checks that a message text is present and at most `max` bytes.
pub fn text(value: &str, max: usize) -> Result<(), ValidationError> {
    if value.is_empty() {
        Err(ValidationError::EmptyText)
    } else if value.len() > max {
        Err(ValidationError::TextTooLong {
            len: value.len(),
            max,
        })
    } else {
        Ok(())
    }
}

/// Resolves a `history` page size: absent means the maximum.
pub fn history_limit(limit: Option<u32>) -> Result<u32, ValidationError> {
    match limit {
        None => Ok(MAX_HISTORY_LIMIT),
        Some(n) if (1..=MAX_HISTORY_LIMIT).contains(&n) => Ok(n),
        Some(n) => Err(ValidationError::HistoryLimit(n)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names() {
        for ok in ["geral", "a", "room:1.2_x-y", &"c".repeat(64)] {
            assert_eq!(channel_name(ok), Ok(()), "{ok}");
        }
        for bad in ["", "a b", "é", "a/b", "a*", &"c".repeat(65)] {
            assert!(channel_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn user_names() {
        assert!(user_name("alice.b-c_1").is_ok());
        assert!(user_name("a:b").is_err(), "colon is for channels only");
        assert!(user_name(&"u".repeat(33)).is_err());
        assert!(user_name("").is_err());
    }

    #[test]
    fn texts() {
        assert_eq!(text("", 10), Err(ValidationError::EmptyText));
        assert_eq!(text("Olá", 4), Ok(()));
        let err = text("Olá!", 4).unwrap_err();
        assert_eq!(err, ValidationError::TextTooLong { len: 5, max: 4 });
        assert_eq!(err.code(), ErrorCode::TooLarge);
    }

    #[test]
    fn history_limits() {
        assert_eq!(history_limit(None), Ok(100));
        assert_eq!(history_limit(Some(1)), Ok(1));
        assert!(history_limit(Some(0)).is_err());
        assert!(history_limit(Some(101)).is_err());
    }

    #[test]
    fn long_bad_names_are_shortened_in_errors() {
        let err = channel_name(&"x ".repeat(1000)).unwrap_err();
        assert!(err.to_string().len() < 200);
    }
}
