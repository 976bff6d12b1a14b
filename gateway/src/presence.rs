//! Presence upkeep: refreshes the presence entries of local subscribers and
//! sweeps entries that expired (members of a gateway that died), announcing
//! the users who left.

use std::sync::Arc;

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use chatcluster_protocol::frame::PresenceChange;

use crate::state::Gateway;

/// Requests in flight at once during a refresh.
const CONCURRENCY: usize = 64;

/// Runs until `stop` is cancelled, every third of the presence TTL.
pub async fn run(gateway: Arc<Gateway>, stop: CancellationToken) {
    let period = gateway.config.presence_ttl / 3;
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => upkeep(&gateway).await,
        }
    }
}

async fn upkeep(gateway: &Arc<Gateway>) {
    let channels = gateway.delivery.presence_members().await;
    let entries: Vec<(&str, Arc<str>, Arc<str>)> = channels
        .iter()
        .flat_map(|(channel, members)| {
            members
                .iter()
                .map(|(m, u)| (&**channel, m.clone(), u.clone()))
        })
        .collect();
    futures_util::stream::iter(entries)
        .for_each_concurrent(CONCURRENCY, |(channel, member, user)| {
            refresh(gateway, channel, member, user)
        })
        .await;
    for (channel, _) in &channels {
        match gateway.store.presence_sweep(channel).await {
            Ok(left) => {
                for user in left {
                    gateway
                        .announce(channel, &user, PresenceChange::Leave)
                        .await;
                }
            }
            Err(error) => {
                gateway.metrics.redis_errors_total.inc();
                tracing::debug!(%channel, %error, "presence sweep failed");
            }
        }
    }
}

async fn refresh(gateway: &Gateway, channel: &str, member: Arc<str>, user: Arc<str>) {
    match gateway.store.presence_join(channel, &member, &user).await {
        // Swept while this gateway was unreachable: announce the return.
        Ok(true) => gateway.announce(channel, &user, PresenceChange::Join).await,
        Ok(false) => {}
        Err(error) => {
            gateway.metrics.redis_errors_total.inc();
            tracing::debug!(%channel, %error, "presence refresh failed");
        }
    }
}
