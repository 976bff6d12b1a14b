//! Paged listings of users and channels, for the `users` and `channels` ops
//! and `GET /api/channels`, and the upkeep of the sorted indexes they read.
//!
//! A page is at most `MAX_LIST_PAGE` names in name order; its cursor is the
//! last name scanned, and the next page starts after it, so pages never
//! repeat or skip a name that existed throughout. A token's `channels` claim
//! filters channel pages: a page may then hold fewer names than asked (even
//! none) while its cursor still moves on.

use chatcluster_protocol::validate;

use crate::auth::Identity;
use crate::state::{Gateway, OpError};
use crate::store::{NamePage, Registry};

/// Names per page when the client does not say.
pub const DEFAULT_PAGE: u32 = 100;

impl Gateway {
    /// One page of `registry` after `cursor`; channel pages only hold
    /// channels `reader` may use (every channel when `None`).
    pub async fn list_page(
        &self,
        registry: Registry,
        cursor: Option<&str>,
        limit: Option<u32>,
        reader: Option<&Identity>,
    ) -> Result<NamePage, OpError> {
        let max = self.config.max_list_page;
        let limit = validate::page_limit(Some(limit.unwrap_or(DEFAULT_PAGE.min(max))), max)?;
        let (mut names, cursor) = self.store.list_page(registry, cursor, limit).await?;
        if let (Registry::Channels, Some(reader)) = (registry, reader) {
            names.retain(|channel| reader.may_use(channel));
        }
        Ok((names, cursor))
    }

    /// Brings the sorted indexes up to date with the registry sets (names
    /// registered by an older gateway); run when Redis becomes reachable.
    pub async fn index_registries(&self) {
        for registry in [Registry::Users, Registry::Channels] {
            match self.store.index_registry(registry).await {
                Ok(0) => {}
                Ok(steps) => tracing::info!(?registry, steps, "registry index rebuilt"),
                Err(error) => tracing::warn!(?registry, %error, "registry index not rebuilt"),
            }
        }
    }
}
