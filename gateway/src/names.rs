//! Names this gateway knows to be registered in Redis, so registering a user
//! or channel costs one round trip per gateway, not one per request. Forgotten
//! after a pub/sub reconnect: Redis may have restarted empty.

use std::collections::HashSet;
use std::sync::Mutex;

/// Names remembered per set before it is cleared (bounds memory).
const LIMIT: usize = 100_000;

/// One set of remembered names.
#[derive(Debug, Default)]
pub struct NameSet(Mutex<HashSet<String>>);

impl NameSet {
    /// Whether `name` is remembered.
    pub fn contains(&self, name: &str) -> bool {
        self.0.lock().map(|set| set.contains(name)).unwrap_or(false)
    }

    /// Remembers `name`.
    pub fn insert(&self, name: &str) {
        if let Ok(mut set) = self.0.lock() {
            if set.len() >= LIMIT {
                set.clear();
            }
            set.insert(name.to_owned());
        }
    }

    fn clear(&self) {
        if let Ok(mut set) = self.0.lock() {
            set.clear();
        }
    }
}

/// Registered channel and user names.
#[derive(Debug, Default)]
pub struct KnownNames {
    /// Channels in `cc:channels`.
    pub channels: NameSet,
    /// Users in `cc:users`.
    pub users: NameSet,
}

impl KnownNames {
    /// Forgets every name.
    pub fn forget_all(&self) {
        self.channels.clear();
        self.users.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_and_forgets() {
        let names = KnownNames::default();
        names.users.insert("alice");
        names.channels.insert("geral");
        assert!(names.users.contains("alice"));
        assert!(!names.users.contains("geral"));
        names.forget_all();
        assert!(!names.users.contains("alice"));
        assert!(!names.channels.contains("geral"));
    }
}
