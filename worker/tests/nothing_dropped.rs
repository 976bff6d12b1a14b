//! Nothing is dropped silently: what the worker cannot write ends in a
//! dead-letter stream with a cause, a metric and a log line, a crash loop is
//! capped, a lost read reply is retried at once, a panic ends the process
//! with an error, and an operator can list and replay dead letters.
//!
//! Real redis-server and postgres processes; faults are driven by hooks (a
//! writer that panics on a chosen message) and a proxy that loses one reply.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chatcluster_protocol::entry::{PersistEntry, StoredMessage};
use chatcluster_protocol::keys;
use chatcluster_testkit::proxy::{FaultProxy, LoseReply};
use chatcluster_worker::Error;
use common::*;
use uuid::Uuid;

const T: Duration = Duration::from_secs(30);

/// A message entry as the publish script writes it, at `offset` of `channel`.
fn message_entry(channel: &str, offset: u64, text: &str) -> (Uuid, Vec<(&'static str, Vec<u8>)>) {
    let msg_id = Uuid::new_v4();
    let entry = PersistEntry::Message {
        offset,
        message: StoredMessage {
            channel: channel.to_owned(),
            msg_id,
            user: "mallory".into(),
            text: text.into(),
            ts: chrono::Utc::now().timestamp_millis(),
            clock: 1,
        },
    };
    (msg_id, entry.fields())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_offset_is_dead_lettered_with_a_metric_and_a_log_line() {
    let stack = Stack::start().await;
    let mut redis = stack.redis().await;
    init_channel(&mut redis, "geral", 0).await;
    let shard = keys::shard_of("geral", SHARDS);
    let mut published = publish(&mut redis, "geral", 5).await;
    // One writer, so batches commit in stream order and the first message at 6 wins.
    let worker = Binary::spawn(
        &stack,
        "w1",
        &[("BATCH_TIMEOUT", "100ms"), ("WRITERS", "1")],
    );
    let pool = stack.pool().await;
    assert_exactly(&pool, &published, T).await;

    // Offset 3 again with another message (offsets reused after Redis lost
    // state); offset 6 twice in one batch (the first one wins); and message 2
    // delivered again, which is not a clash.
    let (clash_3, fields) = message_entry("geral", 3, "reused offset");
    xadd(&mut redis, shard, &fields).await;
    let (first_6, fields) = message_entry("geral", 6, "first at 6");
    xadd(&mut redis, shard, &fields).await;
    let (second_6, fields) = message_entry("geral", 6, "second at 6");
    xadd(&mut redis, shard, &fields).await;
    let again = PersistEntry::Message {
        offset: 2,
        message: StoredMessage {
            channel: "geral".into(),
            msg_id: published[1].msg_id,
            user: "user1".into(),
            text: "message 1".into(),
            ts: 1,
            clock: 1,
        },
    };
    xadd(&mut redis, shard, &again.fields()).await;
    wait_drained(&mut redis, T).await;

    published.push(Published {
        channel: "geral".into(),
        offset: 6,
        msg_id: first_6,
    });
    assert_exactly(&pool, &published, T).await;
    let dead = dead_letters(&mut redis, shard).await;
    assert_eq!(dead.len(), 2, "{dead:?}");
    for (letter, (clashing, stored)) in dead
        .iter()
        .zip([(clash_3, published[2].msg_id), (second_6, first_6)])
    {
        assert_eq!(field(letter, "cause"), "offset_clash");
        let reason = field(letter, "reason");
        assert!(
            reason.contains("offset clash")
                && reason.contains(&stored.to_string())
                && reason.contains(&clashing.to_string()),
            "{reason}"
        );
    }
    assert_eq!(
        series(
            worker.addr,
            "chatcluster_worker_dead_lettered_total{cause=\"offset_clash\"}"
        )
        .await,
        2.0
    );
    let log = worker.process.output();
    assert!(
        log.lines().any(|l| l.contains("ERROR")
            && l.contains("offset clash")
            && l.contains(&clash_3.to_string())),
        "no log line for the clash:\n{log}"
    );
}

/// A worker in this process whose writer panics on `poison`, counting panics.
fn panicking_on(
    stack: &Stack,
    poison: Uuid,
    panics: &Arc<AtomicUsize>,
) -> chatcluster_worker::Config {
    let mut config = stack.config("w1");
    config.batch_size = 10;
    config.claim_idle = Duration::from_secs(3600);
    config.max_deliveries = 3;
    let panics = panics.clone();
    config.hooks.before_write = Some(Arc::new(move |rows| {
        if rows.messages.iter().any(|m| m.msg_id == poison) {
            panics.fetch_add(1, Ordering::SeqCst);
            panic!("test fault: message {poison} crashes the writer");
        }
    }));
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_that_crashes_the_worker_is_dead_lettered_after_max_deliveries() {
    let stack = Stack::start().await;
    let mut redis = stack.redis().await;
    init_channel(&mut redis, "geral", 0).await;
    let published = publish(&mut redis, "geral", 30).await;
    let poison = published[4].msg_id;
    let panics = Arc::new(AtomicUsize::new(0));

    // Each life of worker w1 takes back what the last one left pending, and
    // crashes on the poison until its third delivery has been tried.
    for life in 1..=3 {
        let worker = InProcess::start(panicking_on(&stack, poison, &panics)).await;
        let ended = worker.ended(T).await;
        assert!(
            matches!(ended, Err(Error::TaskPanicked { task: "writer" })),
            "life {life}: {ended:?}"
        );
        assert_eq!(panics.load(Ordering::SeqCst), life);
    }
    let worker = InProcess::start(panicking_on(&stack, poison, &panics)).await;
    let survivors: Vec<Published> = published
        .iter()
        .filter(|p| p.msg_id != poison)
        .cloned()
        .collect();
    let pool = stack.pool().await;
    assert_exactly(&pool, &survivors, T).await;
    wait_drained(&mut redis, T).await;
    assert_eq!(
        panics.load(Ordering::SeqCst),
        3,
        "tried exactly MAX_DELIVERIES times"
    );
    let dead = dead_letters(&mut redis, keys::shard_of("geral", SHARDS)).await;
    assert_eq!(
        dead.len(),
        1,
        "only the poison, none of its batch mates: {dead:?}"
    );
    assert_eq!(field(&dead[0], "cause"), "max_deliveries");
    assert!(field(&dead[0], "reason").contains("delivered 4 times"));
    assert_eq!(
        metric(worker.addr, "chatcluster_worker_dead_lettered_total").await,
        1.0
    );
    assert!(metric(worker.addr, "chatcluster_worker_recovered_total").await >= 1.0);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_writer_makes_the_process_exit_non_zero_and_loses_nothing() {
    let stack = Stack::start().await;
    let mut redis = stack.redis().await;
    init_channel(&mut redis, "geral", 0).await;
    let published = publish(&mut redis, "geral", 20).await;
    let poison = published[7].msg_id.to_string();
    let mut crashing = Binary::spawn(
        &stack,
        "w1",
        &[
            ("CHATCLUSTER_WORKER_PANIC_ON", poison.as_str()),
            ("BATCH_TIMEOUT", "1s"),
            ("CLAIM_IDLE", "1h"),
        ],
    );
    let (status, output) = blocking(move || {
        let status = crashing.process.wait_exit(T);
        (status, crashing.process.output())
    })
    .await;
    let status = status.expect("the worker kept running after a writer panicked");
    assert_eq!(status.code(), Some(1), "{output}");
    assert!(
        output.contains("test fault"),
        "the panic is printed:\n{output}"
    );
    assert!(
        output.contains("the writer task panicked"),
        "the error is logged:\n{output}"
    );
    let pool = stack.pool().await;
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM messages WHERE msg_id = $1")
        .bind(published[7].msg_id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(stored, 0);
    assert!(backlog(&mut redis).await.1 >= 1, "its entries stay pending");

    // The fixed worker (same WORKER_ID) finishes them.
    let _fixed = Binary::spawn(
        &stack,
        "w1",
        &[("BATCH_TIMEOUT", "100ms"), ("CLAIM_IDLE", "1h")],
    );
    assert_exactly(&pool, &published, T).await;
    wait_drained(&mut redis, T).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_of_a_lost_read_reply_are_retried_at_once() {
    let stack = Stack::start().await;
    let proxy = FaultProxy::start(
        stack.redis.socket(),
        LoseReply {
            command: "XREADGROUP".into(),
            min_len: 64,
        },
    );
    let mut config = stack.config("w1");
    config.redis_url = proxy.redis_url();
    // Nobody would claim the lost entries within the test's lifetime.
    config.claim_idle = Duration::from_secs(3600);
    let worker = InProcess::start(config).await;
    wait_ready(worker.addr).await;
    let mut redis = stack.redis().await;
    init_channel(&mut redis, "geral", 0).await;
    let published = publish(&mut redis, "geral", 50).await;

    let pool = stack.pool().await;
    assert_exactly(&pool, &published, Duration::from_secs(15)).await;
    wait_drained(&mut redis, T).await;
    assert_eq!(proxy.fired(), 1, "a reply with entries was lost");
    assert!(metric(worker.addr, "chatcluster_worker_recovered_total").await >= 1.0);
    assert_eq!(
        metric(worker.addr, "chatcluster_worker_claimed_total").await,
        0.0
    );
    assert!(metric(worker.addr, "chatcluster_worker_errors_total").await >= 1.0);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_streams_keep_only_the_newest() {
    let stack = Stack::start().await;
    let mut redis = stack.redis().await;
    for n in 0..5u8 {
        xadd(
            &mut redis,
            1,
            &[("k", b"nope".to_vec()), ("n", vec![b'0' + n])],
        )
        .await;
    }
    let mut config = stack.config("w1");
    config.dead_letter_maxlen = 3;
    let worker = InProcess::start(config).await;
    wait_drained(&mut redis, T).await;
    let dead = dead_letters(&mut redis, 1).await;
    let kept: Vec<String> = dead.iter().map(|d| field(d, "n")).collect();
    assert_eq!(kept, ["2", "3", "4"], "the oldest are dropped first");
    wait_for(T, "gauge and counter", || async {
        series(worker.addr, "chatcluster_worker_dead_letters{shard=\"1\"}").await == 3.0
            && series(
                worker.addr,
                "chatcluster_worker_dead_lettered_total{cause=\"poison\"}",
            )
            .await
                == 5.0
    })
    .await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_and_replayed_once_their_cause_is_fixed() {
    let stack = Stack::start().await;
    let worker = InProcess::start(stack.config("w1")).await;
    wait_ready(worker.addr).await;
    let pool = stack.pool().await;
    // A rule that rejects some messages (SQLSTATE 23514, a data error).
    sqlx::query("ALTER TABLE messages ADD CONSTRAINT no_spam CHECK (body NOT LIKE 'spam%')")
        .execute(&pool)
        .await
        .unwrap();
    let mut redis = stack.redis().await;
    init_channel(&mut redis, "geral", 0).await;
    let texts: Vec<String> = ["hello", "spam 1", "world", "spam 2"]
        .iter()
        .map(|t| (*t).to_owned())
        .collect();
    let published = publish_texts(&mut redis, "geral", &texts).await;
    let shard = keys::shard_of("geral", SHARDS);
    xadd(&mut redis, 0, &[("k", b"nope".to_vec())]).await;
    wait_drained(&mut redis, T).await;
    assert_eq!(message_rows(&pool).await, 2);

    let url = stack.redis.url();
    let (status, table, stderr) = tool(&url, &["dead-letters", "list"]).await;
    assert!(status.success(), "{stderr}");
    assert_eq!(table.lines().count(), 3, "{table}");
    assert!(stderr.contains("3 dead letter(s)"), "{stderr}");
    let poison = table
        .lines()
        .find(|l| l.contains("\tpoison\t"))
        .and_then(|l| l.split('\t').next())
        .unwrap()
        .to_owned();
    assert!(poison.starts_with("0/"), "{poison}");
    let (status, json, _) = tool(
        &url,
        &["dead-letters", "list", "--cause", "rejected", "--json"],
    )
    .await;
    assert!(status.success());
    let rejected: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rejected.len(), 2, "{json}");
    for (letter, expected) in rejected.iter().zip([&published[1], &published[3]]) {
        assert_eq!(letter["cause"], "rejected");
        assert_eq!(letter["shard"], shard);
        let summary = letter["summary"].as_str().unwrap();
        assert!(
            summary.contains(&expected.msg_id.to_string())
                && summary.contains(&format!("geral#{}", expected.offset)),
            "{summary}"
        );
        assert!(
            letter["reason"].as_str().unwrap().contains("no_spam"),
            "{letter}"
        );
    }

    // Replayed before the cause is fixed, a letter comes back.
    let first = rejected[0]["id"].as_str().unwrap().to_owned();
    let (status, out, stderr) = tool(&url, &["dead-letters", "replay", "--id", &first]).await;
    assert!(
        status.success() && out.contains("replayed 1"),
        "{out}{stderr}"
    );
    wait_drained(&mut redis, T).await;
    let (_, json, _) = tool(
        &url,
        &["dead-letters", "list", "--cause", "rejected", "--json"],
    )
    .await;
    assert_eq!(json.lines().count(), 2, "back as a new letter:\n{json}");
    assert!(!json.contains(&first), "under a new id:\n{json}");

    // Fixed: both rejected letters replay into the table, the poison stays.
    sqlx::query("ALTER TABLE messages DROP CONSTRAINT no_spam")
        .execute(&pool)
        .await
        .unwrap();
    let (status, out, stderr) = tool(
        &url,
        &["dead-letters", "replay", "--all", "--cause", "rejected"],
    )
    .await;
    assert!(
        status.success() && out.contains("replayed 2 dead letter(s)"),
        "{out}{stderr}"
    );
    assert_exactly(&pool, &published, T).await;
    let (_, table, _) = tool(&url, &["dead-letters", "list"]).await;
    assert_eq!(table.lines().collect::<Vec<_>>().len(), 1, "{table}");
    assert!(table.starts_with(&poison));

    // Mistakes are named.
    let (status, _, stderr) = tool(&url, &["dead-letters", "replay", "--id", "0/1-1"]).await;
    assert!(
        !status.success() && stderr.contains("no dead letter 0/1-1"),
        "{stderr}"
    );
    let (status, _, stderr) = tool(&url, &["dead-letters", "replay", "--id", "nonsense"]).await;
    assert!(
        !status.success() && stderr.contains("<shard>/<id>"),
        "{stderr}"
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_messages_delivered_again_are_stored_once_and_a_reused_inbox_offset_is_dead_lettered()
 {
    let stack = Stack::start().await;
    let mut redis = stack.redis().await;
    let worker = InProcess::start(stack.config("w1")).await;
    wait_ready(worker.addr).await;
    let (first, first_at) = direct(&mut redis, "alice", "bob", "oi").await;
    let (second, second_at) = direct(&mut redis, "alice", "bob", "tudo bem?").await;
    assert_eq!((first_at, second_at), (vec![1, 1], vec![2, 2]));
    let pool = stack.pool().await;
    wait_drained(&mut redis, T).await;

    // Bob's copy of the first message again (a redelivery: not a clash), and
    // another message at bob's inbox offset 2 (an offset used twice: a clash).
    let in_bobs = |msg_id, offset, text: &str| PersistEntry::Direct {
        inbox: Some(chatcluster_protocol::entry::InboxSlot {
            owner: "bob".into(),
            offset,
        }),
        direct: chatcluster_protocol::entry::StoredDirect {
            msg_id,
            from: "alice".into(),
            to: "bob".into(),
            text: text.into(),
            ts: 1,
            clock: 1,
        },
    };
    let shard = keys::shard_of("bob", SHARDS);
    xadd(&mut redis, shard, &in_bobs(first, 1, "oi").fields()).await;
    let clashing = Uuid::new_v4();
    xadd(
        &mut redis,
        shard,
        &in_bobs(clashing, 2, "impostor").fields(),
    )
    .await;
    wait_drained(&mut redis, T).await;

    assert_eq!(count(&pool, "direct_messages").await, 2);
    let inbox: Vec<(String, i64, Uuid)> =
        sqlx::query_as("SELECT user_name, inbox_offset, msg_id FROM inbox ORDER BY 1, 2")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        inbox,
        [
            ("alice".to_owned(), 1, first),
            ("alice".to_owned(), 2, second),
            ("bob".to_owned(), 1, first),
            ("bob".to_owned(), 2, second),
        ]
    );
    let newest: Vec<(String, i64, Uuid)> =
        sqlx::query_as("SELECT user_name, last_offset, msg_id FROM conversations ORDER BY 1")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        newest,
        [
            ("alice".to_owned(), 2, second),
            ("bob".to_owned(), 2, second)
        ],
        "the redelivered older message does not move a conversation back"
    );
    let dead = dead_letters(&mut redis, shard).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(field(&dead[0], "cause"), "offset_clash");
    let reason = field(&dead[0], "reason");
    assert!(
        reason.contains("inbox:bob#2")
            && reason.contains(&second.to_string())
            && reason.contains(&clashing.to_string()),
        "{reason}"
    );
}
