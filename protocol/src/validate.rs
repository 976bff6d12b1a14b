//! Name, size and number rules of the protocol, with errors that say what to fix.
//!
//! Names (users and channels) are Unicode: letters and digits of any script
//! plus a few ASCII separators, in Unicode Normalization Form C, limited in
//! UTF-8 bytes. Names are normalised once where they enter ([`nfc`], used by
//! the request decoder, the HTTP API and the JWT check), so "José" typed with a
//! combining accent and "José" typed precomposed are the same user. Control
//! characters, spaces, format characters (zero-width joiners, bidi overrides)
//! and look-alike separators such as `∶` (ratio), `․` (one dot leader) or the
//! full-width `：` are not letters or digits and are refused. A name over its
//! byte limit is an error, never cut.

use std::borrow::Cow;

use unicode_normalization::char::is_combining_mark;
use unicode_normalization::{IsNormalized, UnicodeNormalization, is_nfc_quick};

use crate::frame::ErrorCode;

/// Longest channel name, in bytes of UTF-8.
pub const MAX_CHANNEL_LEN: usize = 64;
/// Longest user name, in bytes of UTF-8.
pub const MAX_USER_LEN: usize = 32;
/// Default limit on a message text, in bytes of UTF-8.
pub const DEFAULT_MAX_TEXT_BYTES: usize = 4096;
/// Default limit on one WebSocket frame, in bytes.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 64 * 1024;
/// Largest page `history` returns.
pub const MAX_HISTORY_LIMIT: u32 = 100;
/// Largest integer accepted in any numeric field (clock, offsets, integer
/// ids): 2^53−1, which every JSON client (JavaScript included) holds exactly.
pub const MAX_SAFE_INTEGER: u64 = crate::clock::MAX_CLOCK;
/// Longest string request `id`, in bytes.
pub const MAX_ID_BYTES: usize = 64;
/// Longest `since.epoch`, in bytes (epochs the gateway makes are 12).
pub const MAX_EPOCH_BYTES: usize = 64;
/// Longest token accepted by `refresh`, in bytes.
pub const MAX_TOKEN_BYTES: usize = 8192;

/// Which kind of name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    /// A channel name: letters, digits, `_ . : -`, at most 64 bytes.
    Channel,
    /// A user name: letters, digits, `_ . -`, at most 32 bytes.
    User,
}

impl NameKind {
    /// `channel` or `user`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Channel => "channel",
            Self::User => "user",
        }
    }

    /// The byte limit.
    pub fn max_len(self) -> usize {
        match self {
            Self::Channel => MAX_CHANNEL_LEN,
            Self::User => MAX_USER_LEN,
        }
    }

    /// ASCII punctuation allowed besides letters and digits.
    fn separators(self) -> &'static [char] {
        match self {
            Self::Channel => &['_', '.', ':', '-'],
            Self::User => &['_', '.', '-'],
        }
    }

    fn rule(self) -> &'static str {
        match self {
            Self::Channel => "letters, digits and _ . : -",
            Self::User => "letters, digits and _ . -",
        }
    }
}

impl std::fmt::Display for NameKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A value that breaks one of the protocol's rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    /// An empty name.
    #[error("{0} name must not be empty")]
    EmptyName(NameKind),
    /// A name over its byte limit (never shortened silently).
    #[error("{kind} name is {len} bytes of UTF-8, more than the limit of {max}")]
    NameTooLong {
        /// Channel or user.
        kind: NameKind,
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A character that is not allowed in a name.
    #[error("invalid {kind} name {name:?}: {character:?} (U+{code:04X}) is not allowed; use {rule}", code = u32::from(*character), rule = kind.rule())]
    NameCharacter {
        /// Channel or user.
        kind: NameKind,
        /// The name (shortened for the message).
        name: String,
        /// The first character refused.
        character: char,
    },
    /// A name not in Unicode Normalization Form C.
    #[error("invalid {kind} name {name:?}: not in Unicode NFC form")]
    NotNormalized {
        /// Channel or user.
        kind: NameKind,
        /// The name (shortened for the message).
        name: String,
    },
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
    /// A page size outside 1..=max.
    #[error("limit must be between 1 and {max}, got {got}")]
    Limit {
        /// The value sent.
        got: u32,
        /// The largest allowed.
        max: u32,
    },
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

/// The NFC form of `value`, without copying when it is already normalised
/// (the common case: a quick check answers for ASCII and most text).
pub fn nfc(value: &str) -> Cow<'_, str> {
    if is_nfc_quick(value.chars()) == IsNormalized::Yes {
        Cow::Borrowed(value)
    } else {
        Cow::Owned(value.nfc().collect())
    }
}

/// `value` in NFC, reusing the string when it already is.
pub fn nfc_owned(value: String) -> String {
    match nfc(&value) {
        Cow::Borrowed(_) => value,
        Cow::Owned(normalized) => normalized,
    }
}

/// Checks a name of `kind`: 1 to `kind.max_len()` bytes, letters and digits
/// of any script plus the kind's ASCII separators, in NFC.
pub fn name(kind: NameKind, value: &str) -> Result<(), ValidationError> {
    if value.is_empty() {
        return Err(ValidationError::EmptyName(kind));
    }
    if value.len() > kind.max_len() {
        return Err(ValidationError::NameTooLong {
            kind,
            len: value.len(),
            max: kind.max_len(),
        });
    }
    if matches!(nfc(value), Cow::Owned(_)) {
        return Err(ValidationError::NotNormalized {
            kind,
            name: echo(value),
        });
    }
    let allowed = |(i, c): &(usize, char)| {
        c.is_alphanumeric()
            || kind.separators().contains(c)
            // Combining marks (accents, vowel signs, viramas) after a base character.
            || (*i > 0 && is_combining_mark(*c))
    };
    if let Some((_, character)) = value.char_indices().find(|ic| !allowed(ic)) {
        return Err(ValidationError::NameCharacter {
            kind,
            name: echo(value),
            character,
        });
    }
    Ok(())
}

/// Checks a channel name (see [`name`]).
pub fn channel_name(value: &str) -> Result<(), ValidationError> {
    name(NameKind::Channel, value)
}

/// Checks a user name (see [`name`]).
pub fn user_name(value: &str) -> Result<(), ValidationError> {
    name(NameKind::User, value)
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

/// Resolves a page size: absent means `max`; otherwise it must be in 1..=max.
pub fn page_limit(limit: Option<u32>, max: u32) -> Result<u32, ValidationError> {
    match limit {
        None => Ok(max),
        Some(n) if (1..=max).contains(&n) => Ok(n),
        Some(got) => Err(ValidationError::Limit { got, max }),
    }
}

/// Resolves a `history` page size: absent means the maximum (100).
pub fn history_limit(limit: Option<u32>) -> Result<u32, ValidationError> {
    page_limit(limit, MAX_HISTORY_LIMIT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names() {
        for ok in [
            "geral",
            "a",
            "room:1.2_x-y",
            &"c".repeat(64),
            "café",
            "праздник",
            "会議室",
            "١٢٣",
            "हिन्दी",
        ] {
            assert_eq!(channel_name(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "a b",
            "a/b",
            "a*",
            &"c".repeat(65),
            "a\u{0}b",
            "a\tb",
            "\u{301}a",
        ] {
            assert!(channel_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unicode_user_names_are_accepted_in_nfc() {
        assert_eq!(user_name("José"), Ok(()));
        assert_eq!(user_name("Ωmega_2"), Ok(()));
        let decomposed = "Jose\u{301}";
        assert!(matches!(
            user_name(decomposed),
            Err(ValidationError::NotNormalized { .. })
        ));
        assert_eq!(nfc(decomposed), "José");
        assert_eq!(nfc_owned(decomposed.to_owned()), "José");
        assert!(matches!(nfc("José"), Cow::Borrowed(_)));
        assert_eq!(user_name(&nfc(decomposed)), Ok(()));
    }

    #[test]
    fn controls_spaces_and_look_alike_separators_are_refused() {
        for bad in [
            "a\u{7f}b",   // DEL
            "a\u{200b}b", // zero-width space
            "a\u{200d}b", // zero-width joiner
            "a\u{202e}b", // right-to-left override
            "a\u{a0}b",   // no-break space
            "a\u{2236}b", // ratio, looks like ':'
            "a\u{ff1a}b", // full-width colon
            "a\u{2024}b", // one dot leader, looks like '.'
            "a\u{2010}b", // hyphen, looks like '-'
            "a\u{2215}b", // division slash, looks like '/'
            "a\u{ff0f}b", // full-width solidus
            "a\u{2044}b", // fraction slash
            "a\u{fe55}b", // small colon
        ] {
            let error = channel_name(bad).unwrap_err();
            assert!(
                matches!(error, ValidationError::NameCharacter { .. }),
                "{bad:?}: {error}"
            );
        }
        let error = user_name("a\u{2236}b").unwrap_err();
        assert!(error.to_string().contains("U+2236"), "{error}");
    }

    #[test]
    fn byte_limits_count_utf8_and_never_cut() {
        // 16 characters of 3 bytes: 48 bytes, over the user limit of 32.
        let long = "会".repeat(16);
        assert_eq!(
            user_name(&long),
            Err(ValidationError::NameTooLong {
                kind: NameKind::User,
                len: 48,
                max: 32
            })
        );
        assert_eq!(channel_name(&long), Ok(()));
        assert!(channel_name(&"é".repeat(33)).is_err(), "66 bytes");
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
        assert_eq!(page_limit(Some(500), 1000), Ok(500));
        assert!(page_limit(Some(u32::MAX), 1000).is_err());
    }

    #[test]
    fn long_bad_names_are_shortened_in_errors() {
        let err = channel_name(&"x ".repeat(30)).unwrap_err();
        assert!(err.to_string().len() < 200);
        let err = channel_name(&"x".repeat(10_000)).unwrap_err();
        assert!(err.to_string().len() < 200);
    }
}
