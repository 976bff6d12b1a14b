//! Exactly-once persistence against real redis-server and postgres processes.
//!
//! Every test publishes through the gateway's Lua scripts, lets workers run
//! through a failure, and counts rows against what was published: any lost or
//! doubled message fails it.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use chatcluster_protocol::entry::{PersistEntry, StoredMessage};
use chatcluster_protocol::keys;
use chatcluster_worker::WriteMode;
use common::*;
use uuid::Uuid;

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persists_messages_directs_users_and_channels_once() {
    let stack = Stack::start().await;
    let mut redis = stack.redis().await;
    let worker = InProcess::start(stack.config("w1")).await;
    wait_ready(worker.addr).await;
    assert_eq!(
        http_get(worker.addr, "/health").await,
        (200, "ok".to_owned())
    );

    register(&mut redis, "chan", "geral").await;
    register(&mut redis, "chan", "empty").await;
    register(&mut redis, "user", "alice").await;
    register(&mut redis, "user", "alice").await; // registered once by the script
    init_channel(&mut redis, "geral", 0).await;
    let mut ids = publish(&mut redis, "geral", 250).await;
    init_channel(&mut redis, "other", 0).await;
    ids.extend(publish(&mut redis, "other", 50).await);
    let (dm, inbox) = direct(&mut redis, "alice", "bob", "oi").await;
    let (note, _) = direct(&mut redis, "alice", "alice", "note to self").await;
    assert_eq!(inbox, [1, 1], "first message of both inboxes");
    assert_eq!(ids[249].offset, 250, "the script returns dense offsets");

    let pool = stack.pool().await;
    assert_exactly(&pool, &ids, T).await;
    wait_for(T, "users, channels, DM", || async {
        count(&pool, "users").await == 1
            && count(&pool, "channels").await == 2
            && count(&pool, "direct_messages").await == 2
            && count(&pool, "inbox").await == 3
    })
    .await;
    wait_drained(&mut redis, T).await;

    // Offsets are dense per channel and text survives COPY/UNNEST escaping.
    let (min, max): (i64, i64) = sqlx::query_as(
        "SELECT min(channel_offset), max(channel_offset) FROM messages WHERE channel = 'geral'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((min, max), (1, 250));
    let body: String = sqlx::query_scalar(
        "SELECT body FROM messages WHERE channel = 'geral' AND channel_offset = 8",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(body, "message 7 with\ttab, newline\n and backslash \\ é");
    let to: String = sqlx::query_scalar("SELECT to_user FROM direct_messages WHERE msg_id = $1")
        .bind(dm)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(to, "bob");
    // The message is in both inboxes, once, and is each one's conversation.
    let inboxes: Vec<(String, i64, String)> = sqlx::query_as(
        "SELECT user_name, inbox_offset, partner FROM inbox ORDER BY user_name, inbox_offset",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        inboxes,
        [
            ("alice".to_owned(), 1, "bob".to_owned()),
            ("alice".to_owned(), 2, "alice".to_owned()),
            ("bob".to_owned(), 1, "alice".to_owned()),
        ]
    );
    let conversations: Vec<(String, String, i64, Uuid)> = sqlx::query_as(
        "SELECT user_name, partner, last_offset, msg_id FROM conversations ORDER BY user_name, partner",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        conversations,
        [
            ("alice".to_owned(), "alice".to_owned(), 2, note),
            ("alice".to_owned(), "bob".to_owned(), 1, dm),
            ("bob".to_owned(), "alice".to_owned(), 1, dm),
        ]
    );
    // The gateway's history query and offset floor.
    let page: Vec<(i64, Uuid)> = sqlx::query_as(
        "SELECT channel_offset, msg_id FROM messages WHERE channel = $1 AND channel_offset < $2 ORDER BY channel_offset DESC LIMIT $3",
    )
    .bind("geral")
    .bind(101_i64)
    .bind(10_i64)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        page.iter().map(|r| r.0).collect::<Vec<_>>(),
        (91..=100).rev().collect::<Vec<_>>()
    );
    let floor: i64 = sqlx::query_scalar(
        "SELECT COALESCE(MAX(channel_offset), 0) FROM messages WHERE channel = $1",
    )
    .bind("geral")
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(floor, 250);
    let stats: Vec<(String, i64)> =
        sqlx::query_as("SELECT channel, message_count FROM room_stats ORDER BY channel")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        stats,
        [
            ("empty".to_owned(), 0),
            ("geral".to_owned(), 250),
            ("other".to_owned(), 50)
        ]
    );

    assert_eq!(
        metric(worker.addr, "chatcluster_worker_rows_written_total").await,
        308.0,
        "300 messages, 2 direct messages in 3 inbox rows, 1 user, 2 channels"
    );
    assert!(metric(worker.addr, "chatcluster_worker_batches_total").await >= 3.0);
    wait_for(T, "lag gauge 0", || async {
        metric(worker.addr, "chatcluster_worker_stream_lag").await == 0.0
    })
    .await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_delivered_twice_make_one_row() {
    delivered_twice(WriteMode::Unnest).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_delivered_twice_make_one_row_with_copy() {
    delivered_twice(WriteMode::Copy).await;
}

/// Every entry is delivered three times (once, then twice more after it was
/// committed and acknowledged): the rows are written once.
async fn delivered_twice(mode: WriteMode) {
    let stack = Stack::start().await;
    let mut redis = stack.redis().await;
    init_channel(&mut redis, "geral", 0).await;
    let ids = publish(&mut redis, "geral", 400).await;
    register(&mut redis, "user", "alice").await;
    // Keep a copy of every entry, as a consumer that committed but crashed before XACK would leave it.
    let mut copies = Vec::new();
    for shard in 0..SHARDS {
        let entries: redis::streams::StreamRangeReply =
            redis::AsyncCommands::xrange_all(&mut redis, keys::persist_key(shard))
                .await
                .unwrap();
        for entry in entries.ids {
            let fields: Vec<(String, Vec<u8>)> = entry
                .map
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        redis::from_redis_value_ref::<Vec<u8>>(v).unwrap(),
                    )
                })
                .collect();
            copies.push((shard, fields));
        }
    }
    assert_eq!(copies.len(), 401);

    let pool = stack.pool().await;
    chatcluster_worker::store::MIGRATOR
        .run(&pool)
        .await
        .unwrap();
    install_insert_log(&pool).await;
    let mut config = stack.config("w1");
    config.write_mode = mode;
    let worker = InProcess::start(config).await;
    assert_exactly(&pool, &ids, T).await;
    wait_drained(&mut redis, T).await;

    // Deliver everything again, twice, including within one batch.
    for _ in 0..2 {
        for (shard, fields) in &copies {
            let fields: Vec<(&str, Vec<u8>)> = fields
                .iter()
                .map(|(k, v)| (k.as_str(), v.clone()))
                .collect();
            xadd(&mut redis, *shard, &fields).await;
        }
    }
    wait_drained(&mut redis, T).await;
    wait_for(T, "every copy acknowledged", || async {
        metric(worker.addr, "chatcluster_worker_entries_acked_total").await == 3.0 * 401.0
    })
    .await;
    assert_exactly(&pool, &ids, T).await;
    assert_eq!(count(&pool, "users").await, 1);
    assert_eq!(
        metric(worker.addr, "chatcluster_worker_rows_written_total").await,
        401.0,
        "redelivered rows are not inserted"
    );
    // The insert log sees every copy, skipped ones included (what makes it
    // able to catch double processing in the two-worker test).
    let attempts = insert_attempts(&pool).await;
    assert_eq!(attempts.len(), ids.len());
    assert!(attempts.values().all(|n| *n == 3), "{attempts:?}");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_share_the_shards_without_double_work() {
    let stack = Stack::start().await;
    let mut config = stack.config("a");
    config.batch_size = 50;
    let a = InProcess::start(config.clone()).await;
    config.worker_id = "b".into();
    let b = InProcess::start(config).await;
    wait_ready(a.addr).await;
    wait_ready(b.addr).await;
    let pool = stack.pool().await;
    install_insert_log(&pool).await;

    let mut redis = stack.redis().await;
    let mut ids = Vec::new();
    for round in 0..10 {
        for c in 0..8 {
            let channel = format!("room-{c}");
            if round == 0 {
                init_channel(&mut redis, &channel, 0).await;
            }
            ids.extend(publish(&mut redis, &channel, 50).await);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_exactly(&pool, &ids, T).await;
    wait_drained(&mut redis, T).await;
    // Every committed insert attempt is logged, including ones PostgreSQL
    // skipped as already present: a message both workers processed shows twice.
    let attempts = insert_attempts(&pool).await;
    let twice: Vec<_> = attempts.iter().filter(|(_, n)| **n != 1).take(5).collect();
    assert!(
        twice.is_empty(),
        "messages written more than once: {twice:?}"
    );
    assert_eq!(attempts.len(), ids.len());
    let (rows_a, rows_b) = (
        metric(a.addr, "chatcluster_worker_rows_written_total").await,
        metric(b.addr, "chatcluster_worker_rows_written_total").await,
    );
    assert!(
        rows_a > 0.0 && rows_b > 0.0,
        "both workers took part: {rows_a} + {rows_b}"
    );
    assert_eq!(
        metric(a.addr, "chatcluster_worker_claimed_total").await
            + metric(b.addr, "chatcluster_worker_claimed_total").await,
        0.0
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_entries_are_dead_lettered_between_good_ones() {
    let stack = Stack::start().await;
    let mut redis = stack.redis().await;
    init_channel(&mut redis, "geral", 0).await;
    let shard = keys::shard_of("geral", SHARDS);
    let mut ids = publish(&mut redis, "geral", 5).await;
    // Undecodable payload, unknown kind, NUL in the text, and a channel name no index can hold.
    xadd(
        &mut redis,
        shard,
        &[
            ("k", b"msg".to_vec()),
            ("o", b"77".to_vec()),
            ("d", b"\xc1garbage".to_vec()),
        ],
    )
    .await;
    xadd(&mut redis, shard, &[("k", b"nope".to_vec())]).await;
    let message = |channel: String, text: &str| PersistEntry::Message {
        offset: 9_000,
        message: StoredMessage {
            channel,
            msg_id: Uuid::new_v4(),
            user: "mallory".into(),
            text: text.into(),
            ts: 1_795_000_000_000,
            clock: 1,
        },
    };
    xadd(
        &mut redis,
        shard,
        &fields_of(&message("geral".into(), "nul \0 byte")),
    )
    .await;
    let huge: String = {
        use rand::Rng;
        let mut rng = rand::rng();
        (0..12_000)
            .map(|_| rng.sample(rand::distr::Alphanumeric) as char)
            .collect()
    };
    xadd(
        &mut redis,
        shard,
        &fields_of(&message(huge, "too big to index")),
    )
    .await;
    ids.extend(publish(&mut redis, "geral", 5).await);

    let worker = InProcess::start(stack.config("w1")).await;
    let pool = stack.pool().await;
    assert_exactly(&pool, &ids, T).await;
    wait_drained(&mut redis, T).await;

    let dead: redis::streams::StreamRangeReply =
        redis::AsyncCommands::xrange_all(&mut redis, keys::dead_letter_key(shard))
            .await
            .unwrap();
    let reasons: Vec<String> = dead
        .ids
        .iter()
        .map(|e| e.get::<String>("reason").unwrap())
        .collect();
    assert_eq!(reasons.len(), 4, "{reasons:?}");
    assert!(reasons[0].contains("undecodable payload"), "{reasons:?}");
    assert!(reasons[1].contains("unknown entry kind"), "{reasons:?}");
    assert!(reasons[2].contains("NUL"), "{reasons:?}");
    assert!(reasons[3].contains("rejected by PostgreSQL"), "{reasons:?}");
    assert!(
        dead.ids
            .iter()
            .all(|e| e.contains_key("id") && e.contains_key("k")),
        "original id and fields kept"
    );
    assert_eq!(dead.ids[0].get::<Vec<u8>>("d").unwrap(), b"\xc1garbage");
    assert_eq!(
        metric(worker.addr, "chatcluster_worker_dead_lettered_total").await,
        4.0
    );
    let causes: Vec<String> = dead
        .ids
        .iter()
        .map(|e| e.get::<String>("cause").unwrap())
        .collect();
    assert_eq!(causes, ["poison", "poison", "poison", "rejected"]);
    // The shard keeps flowing after the poison.
    let more = publish(&mut redis, "geral", 3).await;
    ids.extend(more);
    assert_exactly(&pool, &ids, T).await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_and_restarted_during_a_load() {
    let Stack {
        redis: redis_server,
        mut pg,
    } = Stack::start().await;
    let stack_redis_url = redis_server.url();
    let pg_url = pg.url();
    let mut config = chatcluster_worker::Config::new(stack_redis_url.clone(), pg_url.clone(), "w1");
    config.batch_timeout = Duration::from_millis(100);
    config.stream_shards = SHARDS;
    config.claim_idle = Duration::from_secs(1);
    let worker = InProcess::start(config).await;
    wait_ready(worker.addr).await;

    let publisher = tokio::spawn(async move {
        let mut redis = redis::Client::open(stack_redis_url)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let mut ids = Vec::new();
        for c in 0..4 {
            init_channel(&mut redis, &format!("load-{c}"), 0).await;
        }
        for round in 0..60 {
            ids.extend(publish(&mut redis, &format!("load-{}", round % 4), 50).await);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        ids
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    pg = blocking(move || {
        pg.stop();
        pg
    })
    .await;
    wait_for(T, "/ready 503 while PostgreSQL is down", || async {
        http_get(worker.addr, "/ready").await.0 == 503
    })
    .await;
    let (_, body) = http_get(worker.addr, "/ready").await;
    assert!(body.contains("\"postgres\":false"), "{body}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    pg = blocking(move || {
        pg.restart();
        pg
    })
    .await;
    let ids = publisher.await.unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&pg_url)
        .await
        .unwrap();
    assert_exactly(&pool, &ids, T).await;
    wait_ready(worker.addr).await;
    assert!(metric(worker.addr, "chatcluster_worker_errors_total").await >= 1.0);
    worker.stop().await;
    drop((pg, redis_server));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_is_survived() {
    let Stack {
        redis: mut redis_server,
        pg,
    } = Stack::start().await;
    let url = redis_server.url();
    let mut config = chatcluster_worker::Config::new(url.clone(), pg.url(), "w1");
    config.batch_timeout = Duration::from_millis(100);
    config.stream_shards = SHARDS;
    let worker = InProcess::start(config).await;
    wait_ready(worker.addr).await;
    let connect = || async {
        redis::Client::open(url.clone())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    };
    let mut redis = connect().await;
    init_channel(&mut redis, "geral", 0).await;
    let mut ids = publish(&mut redis, "geral", 200).await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&pg.url())
        .await
        .unwrap();
    assert_exactly(&pool, &ids, T).await;

    redis_server = blocking(move || {
        redis_server.kill();
        redis_server
    })
    .await;
    wait_for(T, "/ready 503 while Redis is down", || async {
        http_get(worker.addr, "/ready").await.0 == 503
    })
    .await;
    redis_server = blocking(move || {
        redis_server.restart();
        redis_server
    })
    .await;
    wait_ready(worker.addr).await;
    // The gateway starts a new epoch from PostgreSQL's highest offset.
    let mut redis = connect().await;
    let floor: i64 = sqlx::query_scalar(
        "SELECT COALESCE(MAX(channel_offset), 0) FROM messages WHERE channel = 'geral'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    init_channel(&mut redis, "geral", floor).await;
    ids.extend(publish(&mut redis, "geral", 200).await);
    assert_exactly(&pool, &ids, T).await;
    worker.stop().await;
    drop(redis_server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_batch_then_another_worker_takes_over() {
    let (stack, pool, mut ids, pending) = killed_mid_batch().await;
    let mut redis = stack.redis().await;
    let b = Binary::spawn(
        &stack,
        "b",
        &[
            ("BATCH_SIZE", "500"),
            ("BATCH_TIMEOUT", "100ms"),
            ("CLAIM_IDLE", "500ms"),
        ],
    );
    ids.extend(publish(&mut redis, "random", 100).await);
    assert_exactly(&pool, &ids, T).await;
    wait_drained(&mut redis, T).await;
    assert!(metric(b.addr, "chatcluster_worker_claimed_total").await >= pending as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_batch_then_the_same_worker_id_finishes_its_own_entries() {
    let (stack, pool, ids, _) = killed_mid_batch().await;
    let mut redis = stack.redis().await;
    // Claiming is effectively off: only re-reading its own pending list can finish the job.
    let again = Binary::spawn(
        &stack,
        "a",
        &[
            ("BATCH_SIZE", "500"),
            ("BATCH_TIMEOUT", "100ms"),
            ("CLAIM_IDLE", "1h"),
        ],
    );
    assert_exactly(&pool, &ids, T).await;
    wait_drained(&mut redis, T).await;
    assert_eq!(
        metric(again.addr, "chatcluster_worker_claimed_total").await,
        0.0
    );
}

/// Runs worker `a` (the real binary), lets it commit 300 messages, then locks
/// `messages` so its next transactions hang, publishes 2000 more, and SIGKILLs
/// it while it holds at least 1000 of them read and uncommitted.
/// Returns the stack, a pool, every published id and the entries left pending.
async fn killed_mid_batch() -> (Stack, sqlx::PgPool, Vec<Published>, u64) {
    let stack = Stack::start().await;
    let mut redis = stack.redis().await;
    let mut a = Binary::spawn(
        &stack,
        "a",
        &[
            ("BATCH_SIZE", "500"),
            ("BATCH_TIMEOUT", "100ms"),
            ("CLAIM_IDLE", "60s"),
        ],
    );
    wait_ready(a.addr).await;
    init_channel(&mut redis, "geral", 0).await;
    init_channel(&mut redis, "random", 0).await;
    let mut ids = publish(&mut redis, "geral", 300).await;
    let pool = stack.pool().await;
    assert_exactly(&pool, &ids, T).await;

    let mut lock = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    ids.extend(publish(&mut redis, "geral", 1000).await);
    ids.extend(publish(&mut redis, "random", 1000).await);
    wait_for(T, "worker a to hold entries", || {
        let mut redis = redis.clone();
        async move { backlog(&mut redis).await.1 >= 1000 }
    })
    .await;
    a.process.kill(); // SIGKILL
    lock.rollback().await.unwrap();
    assert_eq!(
        message_rows(&pool).await,
        300,
        "nothing committed after the lock"
    );
    let pending = backlog(&mut redis).await.1;
    assert!(
        pending >= 1000,
        "the dead worker left its entries pending: {pending}"
    );
    (stack, pool, ids, pending)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_and_acks_the_current_batch() {
    let stack = Stack::start().await;
    let mut redis = stack.redis().await;
    // A batch that would wait a minute to fill.
    let worker = Binary::spawn(
        &stack,
        "t",
        &[("BATCH_SIZE", "1000"), ("BATCH_TIMEOUT", "60s")],
    );
    wait_ready(worker.addr).await;
    init_channel(&mut redis, "geral", 0).await;
    let ids = publish(&mut redis, "geral", 10).await;
    wait_for(T, "the batch read", || {
        let mut redis = redis.clone();
        async move { backlog(&mut redis).await.1 == 10 }
    })
    .await;
    let pool = stack.pool().await;
    assert_eq!(message_rows(&pool).await, 0);

    let mut worker = worker;
    worker.process.signal("TERM");
    let status = blocking(move || {
        let status = worker.process.wait_exit(Duration::from_secs(15));
        (status, worker.process.output())
    })
    .await;
    let (Some(status), output) = status else {
        panic!("worker did not exit after SIGTERM");
    };
    assert!(status.success(), "exit status {status}\n{output}");
    assert_exactly(&pool, &ids, Duration::from_secs(1)).await;
    assert_eq!(
        backlog(&mut redis).await,
        (0, 0),
        "acknowledged and deleted before exiting"
    );
}

#[test]
fn help_lists_every_variable_with_its_default() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chatcluster-worker"))
        .arg("--help")
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for expected in [
        "env: REDIS_URL",
        "default: redis://127.0.0.1:6379",
        "env: DATABASE_URL",
        "env: WORKER_ID",
        "env: BATCH_SIZE",
        "default: 100",
        "env: BATCH_TIMEOUT",
        "default: 5s",
        "env: CLAIM_IDLE",
        "default: 30s",
        "env: STREAM_SHARDS",
        "default: 4",
        "env: ADMIN_ADDR",
        "default: 0.0.0.0:9091",
        "env: RUST_LOG",
        "default: info",
        "env: WRITE_MODE",
        "env: DRAIN_TIMEOUT",
        "env: MAX_DELIVERIES",
        "default: 5",
        "env: DEAD_LETTER_MAXLEN",
        "default: 10000",
        "dead-letters",
    ] {
        assert!(
            help.contains(expected),
            "--help lacks {expected:?}:\n{help}"
        );
    }
    let missing = std::process::Command::new(env!("CARGO_BIN_EXE_chatcluster-worker"))
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("DATABASE_URL"));
    for tool in [
        &["dead-letters", "list", "--help"][..],
        &["dead-letters", "replay", "--help"],
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_chatcluster-worker"))
            .args(tool)
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        for expected in ["env: REDIS_URL", "env: STREAM_SHARDS", "--shard", "--cause"] {
            assert!(
                help.contains(expected),
                "{tool:?} lacks {expected:?}:\n{help}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_removes_only_consumers_without_pending_entries() {
    let redis_server = blocking(chatcluster_testkit::RedisServer::start).await;
    let mut redis = redis::Client::open(redis_server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let conn =
        chatcluster_worker::streams::connect(&redis_server.url(), Duration::from_secs(5)).unwrap();
    let mut streams = chatcluster_worker::streams::Streams::new(conn.clone(), 1, "live");
    streams.ensure_groups().await.unwrap();
    let user = [
        ("k", b"user".to_vec()),
        ("n", b"a".to_vec()),
        ("t", b"1".to_vec()),
    ];
    xadd(&mut redis, 0, &user).await;
    xadd(&mut redis, 0, &user).await;
    // "holder" keeps its entry pending; "ghost" acknowledged its one.
    let read = |name: &'static str| {
        let conn = conn.clone();
        async move {
            let mut s = chatcluster_worker::streams::Streams::new(conn, 1, name);
            s.read(&[">".to_owned()], 1, None).await.unwrap()
        }
    };
    assert_eq!(read("holder").await.len(), 1);
    let ghost = read("ghost").await;
    let acked: u64 =
        redis::AsyncCommands::xack(&mut redis, keys::persist_key(0), "persist", &[&ghost[0].id])
            .await
            .unwrap();
    assert_eq!(acked, 1);
    let removed = streams.prune_consumers(0, Duration::ZERO).await.unwrap();
    assert_eq!(
        removed,
        ["ghost"],
        "a consumer with pending entries is never removed"
    );
    let consumers: redis::streams::StreamInfoConsumersReply =
        redis::AsyncCommands::xinfo_consumers(&mut redis, keys::persist_key(0), "persist")
            .await
            .unwrap();
    let names: Vec<_> = consumers
        .consumers
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(names, ["holder"]);
}
