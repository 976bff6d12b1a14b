//! Worker autoscaling from the persistence-stream lag.
//!
//! The workers drain the Redis streams `cc:{s<N>}:persist` through the consumer group
//! `persist`; `XINFO GROUPS` reports per shard how many entries the group has not read yet
//! (`lag`, Redis 7; the stream length where there is no group yet, since the workers delete
//! what they acknowledge). The operator runs `ceil(lag / targetLagPerReplica)` workers within
//! `[minReplicas, maxReplicas]`. Scale-up is immediate; scale-down follows the largest
//! recommendation of the stabilization window, as a HorizontalPodAutoscaler does, so a short
//! dip in the lag does not stop workers that are about to be needed again.
//!
//! A worker migrates the PostgreSQL schema before it creates the consumer groups, and the
//! gateways cannot publish before the schema exists (they reserve offset blocks in its
//! `offset_blocks` table). So until the `persist` group is on every shard, at least one worker
//! runs, whatever `minReplicas` says: a `minReplicas: 0` cluster is never left without a schema.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use chatcluster_protocol::keys::{PERSIST_GROUP, persist_keys};
use futures_util::future::BoxFuture;
use redis::AsyncCommands;
use redis::streams::StreamInfoGroupsReply;

use crate::error::{Error, Result};

/// How long one lag read may take before it counts as failed.
const READ_TIMEOUT: Duration = Duration::from_secs(3);

/// What the operator reads from a cluster's Redis each round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backlog {
    /// Persistence-stream entries the workers have not read yet, over every shard.
    pub lag: i64,
    /// The workers' consumer group is on every shard: a worker has migrated the schema and
    /// created the groups, so the gateways can publish.
    pub prepared: bool,
}

/// The fewest workers to run: `min`, but at least one until the workers have `prepared` the
/// database and Redis (never more than `max`).
pub fn worker_floor(min: i32, max: i32, prepared: bool) -> i32 {
    if prepared {
        min
    } else {
        min.max(1).min(max.max(min))
    }
}

/// Workers wanted for `lag` unread entries.
pub fn replicas_for_lag(lag: i64, target_per_replica: i64, min: i32, max: i32) -> i32 {
    let target = target_per_replica.max(1);
    let wanted = if lag <= 0 {
        0
    } else {
        lag.saturating_add(target - 1) / target
    };
    let wanted = i32::try_from(wanted).unwrap_or(i32::MAX);
    wanted.clamp(min, max.max(min))
}

/// Recent recommendations of one cluster, for scale-down stabilization.
#[derive(Debug)]
pub struct Stabilizer {
    started: Instant,
    history: VecDeque<(Instant, i32)>,
}

impl Stabilizer {
    /// A stabilizer that has seen nothing since `now`.
    pub fn new(now: Instant) -> Self {
        Self {
            started: now,
            history: VecDeque::new(),
        }
    }

    /// Records `recommended` and returns the replicas to run, given the `current` count.
    ///
    /// Up: at once. Down: to the highest recommendation within `window`, and not before the
    /// stabilizer has watched for a whole window (a restarted operator does not know the past).
    pub fn stabilize(
        &mut self,
        now: Instant,
        current: i32,
        recommended: i32,
        window: Duration,
    ) -> i32 {
        self.history.push_back((now, recommended));
        while self
            .history
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > window)
        {
            self.history.pop_front();
        }
        if recommended >= current {
            return recommended;
        }
        if now.duration_since(self.started) < window {
            return current;
        }
        let highest = self
            .history
            .iter()
            .map(|(_, r)| *r)
            .max()
            .unwrap_or(recommended);
        highest.min(current)
    }
}

/// Where the operator reads the lag from; Redis in production, a fixed value in tests.
pub trait LagSource: Send + Sync {
    /// Total lag of the `persist` group over `shards` shards of the Redis at `url`
    /// (`redis://` or `rediss://`), trusting the PEM CA `ca` when given, and whether the group
    /// is on every shard.
    fn total_lag<'a>(
        &'a self,
        url: &'a str,
        ca: Option<&'a str>,
        shards: i32,
    ) -> BoxFuture<'a, Result<Backlog>>;
}

/// Reads the lag with `XINFO GROUPS` over a fresh connection per read.
#[derive(Clone, Copy, Debug, Default)]
pub struct RedisLag;

impl LagSource for RedisLag {
    fn total_lag<'a>(
        &'a self,
        url: &'a str,
        ca: Option<&'a str>,
        shards: i32,
    ) -> BoxFuture<'a, Result<Backlog>> {
        Box::pin(async move {
            match tokio::time::timeout(READ_TIMEOUT, read_lag(url, ca, shards)).await {
                Ok(result) => result.map_err(Error::Redis),
                Err(_) => Err(Error::Redis(redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "timed out reading the persistence lag",
                )))),
            }
        })
    }
}

/// A client for `url`; with a CA, TLS (`rediss://`) trusts that CA.
fn client(url: &str, ca: Option<&str>) -> redis::RedisResult<redis::Client> {
    match ca {
        None => redis::Client::open(url),
        Some(ca) => redis::Client::build_with_tls(
            url,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(ca.as_bytes().to_vec()),
            },
        ),
    }
}

async fn read_lag(url: &str, ca: Option<&str>, shards: i32) -> redis::RedisResult<Backlog> {
    let client = client(url, ca)?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    let mut total = 0_i64;
    let mut prepared = true;
    for key in persist_keys(u32::try_from(shards).unwrap_or(0)) {
        let reply: redis::RedisResult<StreamInfoGroupsReply> = connection.xinfo_groups(&key).await;
        let groups = match reply {
            Ok(reply) => reply.groups,
            // The stream appears with the first message; no stream means nothing to read.
            Err(error)
                if error.kind()
                    == redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError) =>
            {
                prepared = false;
                continue;
            }
            Err(error) => return Err(error),
        };
        let group = groups.iter().find(|g| g.name == PERSIST_GROUP);
        prepared &= group.is_some();
        let lag = match group.and_then(|g| g.lag) {
            Some(lag) => lag,
            // No group yet (no worker has started) or a lag Redis cannot tell: the workers
            // delete what they acknowledge, so the stream's length is the backlog.
            None => connection.xlen(&key).await?,
        };
        total = total.saturating_add(i64::try_from(lag).unwrap_or(i64::MAX));
    }
    Ok(Backlog {
        lag: total,
        prepared,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chatcluster_protocol::keys::persist_key;

    const WINDOW: Duration = Duration::from_secs(300);

    #[test]
    fn replicas_follow_lag_within_bounds() {
        assert_eq!(replicas_for_lag(0, 5000, 1, 8), 1);
        assert_eq!(replicas_for_lag(1, 5000, 1, 8), 1);
        assert_eq!(replicas_for_lag(5000, 5000, 1, 8), 1);
        assert_eq!(replicas_for_lag(5001, 5000, 1, 8), 2);
        assert_eq!(replicas_for_lag(1_000_000, 5000, 1, 8), 8);
        assert_eq!(replicas_for_lag(0, 5000, 0, 8), 0);
        assert_eq!(replicas_for_lag(i64::MAX, 1, 1, 8), 8);
    }

    #[test]
    fn one_worker_runs_until_the_workers_prepared_the_database() {
        assert_eq!(worker_floor(0, 8, false), 1, "someone must migrate");
        assert_eq!(worker_floor(0, 8, true), 0);
        assert_eq!(worker_floor(3, 8, false), 3);
        assert_eq!(worker_floor(3, 8, true), 3);
        assert_eq!(worker_floor(0, 0, false), 0, "never above max");
    }

    #[test]
    fn scale_up_is_immediate() {
        let start = Instant::now();
        let mut stabilizer = Stabilizer::new(start);
        assert_eq!(stabilizer.stabilize(start, 1, 6, WINDOW), 6);
    }

    #[test]
    fn scale_down_waits_for_a_full_window_after_start() {
        let start = Instant::now();
        let mut stabilizer = Stabilizer::new(start);
        assert_eq!(stabilizer.stabilize(start, 5, 1, WINDOW), 5);
        let later = start + WINDOW - Duration::from_secs(1);
        assert_eq!(stabilizer.stabilize(later, 5, 1, WINDOW), 5);
        assert_eq!(
            stabilizer.stabilize(start + WINDOW + Duration::from_secs(1), 5, 1, WINDOW),
            1
        );
    }

    #[test]
    fn scale_down_goes_to_the_highest_recent_recommendation() {
        let start = Instant::now();
        let mut stabilizer = Stabilizer::new(start);
        let at = |s: u64| start + Duration::from_secs(s);
        assert_eq!(stabilizer.stabilize(at(0), 1, 6, WINDOW), 6);
        assert_eq!(stabilizer.stabilize(at(100), 6, 4, WINDOW), 6);
        assert_eq!(
            stabilizer.stabilize(at(350), 6, 2, WINDOW),
            4,
            "6 left the window, 4 did not"
        );
        assert_eq!(stabilizer.stabilize(at(500), 4, 2, WINDOW), 2);
    }

    /// Against a real `redis-server` (from the testkit), shaped as the workers leave it.
    #[tokio::test]
    async fn reads_the_backlog_of_every_shard_from_redis() {
        let server = chatcluster_testkit::RedisServer::start();
        let client = redis::Client::open(server.url()).unwrap();
        let mut redis = client.get_multiplexed_async_connection().await.unwrap();
        let add = |key: String, count: usize| {
            let mut pipe = redis::pipe();
            for _ in 0..count {
                pipe.cmd("XADD")
                    .arg(key.clone())
                    .arg("*")
                    .arg("d")
                    .arg("x")
                    .ignore();
            }
            pipe
        };
        // Shard 0: three entries no worker has read.
        let _: () = redis
            .xgroup_create_mkstream(persist_key(0), PERSIST_GROUP, "$")
            .await
            .unwrap();
        let _: () = add(persist_key(0), 3)
            .query_async(&mut redis)
            .await
            .unwrap();
        // Shard 1: five entries, two of them read, acknowledged and deleted as a worker does.
        let _: () = redis
            .xgroup_create_mkstream(persist_key(1), PERSIST_GROUP, "$")
            .await
            .unwrap();
        let _: () = add(persist_key(1), 5)
            .query_async(&mut redis)
            .await
            .unwrap();
        let read: redis::streams::StreamReadReply = redis
            .xread_options(
                &[persist_key(1)],
                &[">"],
                &redis::streams::StreamReadOptions::default()
                    .group(PERSIST_GROUP, "w")
                    .count(2),
            )
            .await
            .unwrap();
        let ids: Vec<String> = read.keys[0].ids.iter().map(|e| e.id.clone()).collect();
        let _: () = redis
            .xack(persist_key(1), PERSIST_GROUP, &ids)
            .await
            .unwrap();
        let _: () = redis.xdel(persist_key(1), &ids).await.unwrap();
        // Shard 2: no stream. Shard 3: entries but no group yet (no worker started).
        let _: () = add(persist_key(3), 4)
            .query_async(&mut redis)
            .await
            .unwrap();

        assert_eq!(
            RedisLag.total_lag(&server.url(), None, 4).await.unwrap(),
            Backlog {
                lag: 3 + 3 + 4,
                prepared: false
            },
            "shards 2 and 3 have no group: no worker has prepared them"
        );
        assert_eq!(
            RedisLag.total_lag(&server.url(), None, 2).await.unwrap(),
            Backlog {
                lag: 3 + 3,
                prepared: true
            },
            "only shards 0 and 1, both with the group"
        );
    }

    #[tokio::test]
    async fn unreachable_redis_is_an_error() {
        let port = chatcluster_testkit::free_port();
        let error = RedisLag
            .total_lag(&format!("redis://127.0.0.1:{port}"), None, 4)
            .await
            .unwrap_err();
        assert_eq!(error.metric_label(), "redis");
    }

    #[tokio::test]
    async fn reads_the_lag_over_tls_trusting_the_spec_ca() {
        let server = chatcluster_testkit::TlsRedis::start();
        let (url, ca) = (server.url(), server.ca_pem());
        let mut lag = Err(Error::InvalidSpec("not read yet".to_owned()));
        for _ in 0..50 {
            lag = RedisLag.total_lag(&url, Some(&ca), 4).await;
            if lag.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            lag.unwrap(),
            Backlog {
                lag: 0,
                prepared: false
            },
            "no stream yet: nothing to read, no worker has started"
        );
        let untrusted = RedisLag.total_lag(&url, None, 4).await;
        assert!(
            untrusted.is_err(),
            "a certificate of an unknown CA is refused"
        );
    }
}
