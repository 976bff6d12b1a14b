//! Direct messages as users expect: kept in each user's inbox, listed as
//! conversations, paged per conversation, and pushed when the user comes back.
//!
//! A direct message enters two inboxes, the recipient's and the sender's
//! (one for a note to oneself), each at that user's next inbox offset. Each
//! inbox is a sequenced stream like a channel ([`chatcluster_protocol::stream`]): the
//! recipient's connections receive it live or, when none is connected, on
//! their next login (recovered like a channel, by offset), and the sender's
//! other connections see what it sent. The two appends are two atomic steps
//! (the inboxes may live on different Redis Cluster slots); both carry the
//! idempotency key, so a retry after a failure between them completes the
//! second without writing the first again.
//!
//! Reads merge the inbox's Redis history (the recent window) with the
//! `inbox` and `conversations` tables the worker writes ([`crate::pages`]).

use std::collections::HashMap;

use chatcluster_protocol::entry::StoredDirect;
use chatcluster_protocol::frame::{
    Conversation, DirectMessage, DirectReply, ErrorCode, ServerFrame,
};
use chatcluster_protocol::keys;
use chatcluster_protocol::stream::StreamId;

use crate::history::HistoryError;
use crate::pages;
use crate::state::{Gateway, OpError};
use crate::store::{Append, Appended, Page};

/// The other user of a direct message, seen from `user`'s inbox.
fn partner<'a>(message: &'a DirectMessage, user: &str) -> &'a str {
    if message.from == user {
        &message.to
    } else {
        &message.from
    }
}

/// Sends a direct message from `from` to `to`; with an idempotency `key`, a
/// retry within the window returns the first result and stores nothing twice.
pub async fn send(
    gateway: &Gateway,
    from: &str,
    to: &str,
    text: String,
    clock: u64,
    key: Option<&str>,
) -> Result<DirectReply, OpError> {
    if !gateway.user_exists(to).await? {
        return Err(OpError::new(ErrorCode::NotFound, format!("no user {to:?}")));
    }
    let mut direct = StoredDirect {
        msg_id: uuid::Uuid::new_v4(),
        from: from.to_owned(),
        to: to.to_owned(),
        text,
        ts: chrono::Utc::now().timestamp_millis(),
        clock,
    };
    let received = enter(gateway, to, &direct, key).await?;
    if !received.replayed {
        gateway.metrics.messages_in_total.inc();
    }
    if from == to {
        return Ok(DirectReply {
            msg_id: received.msg_id,
            offset: received.offset,
        });
    }
    // The sender's copy is the same message, also when the first step was a replay.
    direct.msg_id = received.msg_id;
    let sent = enter(gateway, from, &direct, key).await?;
    Ok(DirectReply {
        msg_id: received.msg_id,
        offset: sent.offset,
    })
}

/// Appends `direct` to `owner`'s inbox, with its idempotency record there.
async fn enter(
    gateway: &Gateway,
    owner: &str,
    direct: &StoredDirect,
    key: Option<&str>,
) -> Result<Appended, OpError> {
    let shards = gateway.config.stream_shards;
    let inbox = StreamId::inbox(owner);
    gateway
        .append(&Append {
            stream: &inbox,
            payload: direct.encode(),
            msg_id: direct.msg_id,
            record: key.map(|key| keys::direct_record_key(owner, &direct.from, key, shards)),
        })
        .await
}

/// Everything Redis keeps of `user`'s inbox below `before`, newest first.
async fn recent(gateway: &Gateway, user: &str, before: Option<u64>) -> Result<Page, OpError> {
    let inbox = StreamId::inbox(user);
    Ok(gateway
        .store
        .read_page(&inbox, before, gateway.config.history_size)
        .await?)
}

/// The direct messages of a Redis inbox page, newest first.
fn directs(entries: Vec<ServerFrame>) -> Vec<DirectMessage> {
    entries
        .into_iter()
        .filter_map(|frame| match frame {
            ServerFrame::Direct(direct) => Some(direct),
            _ => None,
        })
        .collect()
}

fn offset(message: &DirectMessage) -> u64 {
    message.offset.unwrap_or(0)
}

/// Up to `limit` of `user`'s conversations whose newest message is below inbox
/// offset `before`, the newest first.
pub async fn conversations(
    gateway: &Gateway,
    user: &str,
    before: Option<u64>,
    limit: u32,
) -> Result<Vec<Conversation>, OpError> {
    let recent = recent(gateway, user, None).await?;
    let mut newest: HashMap<String, DirectMessage> = HashMap::new();
    for message in directs(recent.entries) {
        newest
            .entry(partner(&message, user).to_owned())
            .or_insert(message);
    }
    let stored = match gateway.history.conversations(user, before, limit).await {
        Ok(stored) => stored,
        Err(HistoryError::NotConfigured) => Vec::new(),
        Err(error) => return Err(error.into()),
    };
    for conversation in stored {
        let known = newest.get(&conversation.with);
        if known.is_none_or(|known| offset(known) < offset(&conversation.last)) {
            newest.insert(conversation.with, conversation.last);
        }
    }
    let mut list: Vec<Conversation> = newest
        .into_iter()
        .filter(|(_, last)| before.is_none_or(|before| offset(last) < before))
        .map(|(with, last)| Conversation { with, last })
        .collect();
    list.sort_by_key(|c| std::cmp::Reverse(offset(&c.last)));
    list.truncate(limit as usize);
    Ok(list)
}

/// Up to `limit` messages of `user`'s conversation with `with` below inbox
/// offset `before`, newest last, complete up to now.
pub async fn history(
    gateway: &Gateway,
    user: &str,
    with: &str,
    before: Option<u64>,
    limit: u32,
) -> Result<Vec<DirectMessage>, OpError> {
    let recent = recent(gateway, user, before).await?;
    let limit_n = limit as usize;
    let split = pages::split(
        directs(recent.entries),
        offset,
        recent.base,
        before,
        limit_n,
        |message| partner(message, user) == with,
    );
    if split.complete {
        return Ok(pages::complete(split, Vec::new(), offset, limit_n));
    }
    let stored = match gateway
        .history
        .inbox_page(user, with, split.below, limit)
        .await
    {
        Ok(stored) => stored,
        Err(HistoryError::NotConfigured) => Vec::new(),
        Err(error) => return Err(error.into()),
    };
    Ok(pages::complete(split, stored, offset, limit_n))
}
