//! `chatctl bots`: the bots of the original system. Each logs in as `bot_XXXXX`, picks a
//! random channel, sends ten messages from its list, waits two seconds, and repeats.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::Rng as _;
use rand::seq::IndexedRandom as _;
use tokio::sync::watch;

use crate::client::{ClientError, Identity, Session, SessionConfig, Target};
use chatcluster_protocol::Encoding;

/// What the bots say (the original list).
pub const MESSAGES: [&str; 10] = [
    "Olá, sou um bot!",
    "Mensagem automática",
    "Testando o sistema",
    "Bot em ação",
    "Mensagem de teste",
    "Sistema funcionando",
    "Publicação automática",
    "Bot ativo",
    "Teste de carga",
    "Mensagem gerada automaticamente",
];

/// The channel bots create when there is none.
pub const DEFAULT_CHANNEL: &str = "geral";

/// How the bots behave.
#[derive(Debug, Clone)]
pub struct BotsConfig {
    /// Where they connect.
    pub target: Target,
    /// Their encoding.
    pub encoding: Encoding,
    /// How many.
    pub count: usize,
    /// Messages per second of one bot while it sends its ten.
    pub rate: f64,
    /// Pause after each ten.
    pub pause: Duration,
}

/// Counters shared by all bots, read while they run.
#[derive(Debug, Default)]
pub struct BotStats {
    /// Bots logged in now.
    pub online: AtomicU64,
    /// Messages published.
    pub sent: AtomicU64,
    /// Requests that failed.
    pub errors: AtomicU64,
}

/// A bot name: `bot_` and five digits.
pub fn bot_name() -> String {
    format!("bot_{:05}", rand::rng().random_range(0..100_000))
}

async fn one_bot(
    config: BotsConfig,
    identity: Identity,
    stats: Arc<BotStats>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), ClientError> {
    let session = Session::start(SessionConfig::new(
        config.target.clone(),
        config.encoding,
        identity,
    ))
    .await?;
    stats.online.fetch_add(1, Ordering::Relaxed);
    let handle = session.handle;
    let mut events = session.events;
    // Pushes are not shown; read them so the session never waits on a full queue.
    tokio::spawn(async move { while events.recv().await.is_some() {} });
    let gap = Duration::from_secs_f64(1.0 / config.rate.max(0.001));
    let result = async {
        while !*stop.borrow() {
            let mut channels = handle.channels().await?;
            if channels.is_empty() {
                handle.create_channel(DEFAULT_CHANNEL).await?;
                channels.push(DEFAULT_CHANNEL.to_owned());
            }
            let channel = channels
                .choose(&mut rand::rng())
                .cloned()
                .unwrap_or_default();
            for text in MESSAGES {
                match handle.publish(&channel, text).await {
                    Ok(_) => stats.sent.fetch_add(1, Ordering::Relaxed),
                    Err(_) => stats.errors.fetch_add(1, Ordering::Relaxed),
                };
                if tokio::time::timeout(gap, stop.changed()).await.is_ok() {
                    return Ok(());
                }
            }
            if tokio::time::timeout(config.pause, stop.changed())
                .await
                .is_ok()
            {
                return Ok(());
            }
        }
        Ok(())
    }
    .await;
    stats.online.fetch_sub(1, Ordering::Relaxed);
    result
}

/// The running bots; each ends with its error, if any.
pub type Bots = tokio::task::JoinSet<Result<(), ClientError>>;

/// Starts `config.count` bots; they run until `stop` turns true. `identity` names each bot
/// (a login name, or a token for it).
pub fn start(
    config: &BotsConfig,
    identity: impl Fn(String) -> Result<Identity, ClientError>,
    stop: watch::Receiver<bool>,
) -> Result<(Arc<BotStats>, Bots), ClientError> {
    let stats = Arc::new(BotStats::default());
    let mut bots = tokio::task::JoinSet::new();
    for _ in 0..config.count {
        let identity = identity(bot_name())?;
        bots.spawn(one_bot(
            config.clone(),
            identity,
            stats.clone(),
            stop.clone(),
        ));
    }
    Ok((stats, bots))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bot_names_are_valid_user_names() {
        for _ in 0..100 {
            let name = bot_name();
            assert_eq!(name.len(), 9, "{name}");
            assert!(chatcluster_protocol::validate::user_name(&name).is_ok());
        }
    }
}
