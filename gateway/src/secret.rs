//! Configuration values that must never reach a log line: secrets, and URLs
//! that may carry a password. Their `Debug` shows no secret; the value itself
//! is read with `as_str()` (or through `Deref`) only where it is used.

use std::ops::Deref;

/// A secret string (JWT secret, API key): `Debug` prints `[redacted]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

/// A URL that may hold a password (`redis://:pw@host`,
/// `postgres://user:pw@host/db?password=pw`): `Debug` and `Display` show it
/// with the password and secret-looking query values replaced by `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

/// What both wrappers share: built from a string (clap parses them with
/// `FromStr`), read through `as_str` or `Deref`.
macro_rules! string_wrapper {
    ($name:ident) => {
        impl $name {
            /// The value itself, secret included.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl From<String> for $name {
            fn from(value: String) -> Self {
                Self(value)
            }
        }

        impl std::str::FromStr for $name {
            type Err = std::convert::Infallible;

            fn from_str(value: &str) -> Result<Self, Self::Err> {
                Ok(Self(value.to_owned()))
            }
        }

        impl Deref for $name {
            type Target = str;

            fn deref(&self) -> &str {
                &self.0
            }
        }
    };
}

string_wrapper!(Secret);
string_wrapper!(SecretUrl);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl SecretUrl {
    /// The URL with its secrets replaced by `***`.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }
}

impl std::fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl std::fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// Query parameters whose values are hidden (matched case-insensitively by substring).
const SECRET_PARAMS: [&str; 4] = ["pass", "secret", "token", "key"];

/// `url` with the password of its user info and the values of secret-looking
/// query parameters replaced by `***`. Text that is not a URL is hidden whole.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "***".to_owned();
    };
    let (before_query, query) = match rest.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (rest, None),
    };
    let authority_end = before_query.find('/').unwrap_or(before_query.len());
    let (authority, path) = before_query.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{user}:***@{host}"),
            None => format!("{userinfo}@{host}"),
        },
        None => authority.to_owned(),
    };
    let mut out = format!("{scheme}://{authority}{path}");
    if let Some(query) = query {
        let params: Vec<String> = query
            .split('&')
            .map(|param| match param.split_once('=') {
                Some((name, _))
                    if SECRET_PARAMS
                        .iter()
                        .any(|s| name.to_ascii_lowercase().contains(s)) =>
                {
                    format!("{name}=***")
                }
                _ => param.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&params.join("&"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_urls_are_hidden() {
        assert_eq!(
            redact_url("redis://:hunter2@redis:6379/0"),
            "redis://:***@redis:6379/0"
        );
        assert_eq!(
            redact_url("postgres://chat:hunter2@db/chat?sslmode=require&password=hunter2"),
            "postgres://chat:***@db/chat?sslmode=require&password=***"
        );
        assert_eq!(
            redact_url("rediss://user:p@ss:w0rd@host"),
            "rediss://user:***@host"
        );
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(redact_url("not a url hunter2"), "***");
    }

    #[test]
    fn debug_hides_secrets() {
        let secret = Secret::from("hunter2".to_owned());
        assert_eq!(format!("{secret:?}"), "[redacted]");
        assert_eq!(secret.as_str(), "hunter2");
        let url = SecretUrl::from("redis://:hunter2@h".to_owned());
        assert!(!format!("{url:?}").contains("hunter2"));
        assert!(!format!("{url}").contains("hunter2"));
        assert_eq!(&*url, "redis://:hunter2@h");
    }
}
