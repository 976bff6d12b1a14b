//! `chatctl up` as a user runs it: the whole local stack, supervised.
//!
//! One stack, in order: the page is served; a message goes HAProxy → gateway → Redis →
//! worker → PostgreSQL and comes back through `history`; a second `up` on the same state
//! directory is refused and changes nothing; both gateways killed with SIGKILL are restarted
//! and a subscribed client recovers every message exactly once; `down` stops everything in
//! order, PostgreSQL logs a normal shutdown, and no process is left.

mod common;

use std::time::{Duration, Instant};

use chatcluster_protocol::Encoding;
use chatctl::client::{Event, Identity, Session, SessionConfig, Target};
use chatctl::procstat;
use chatctl::stack::probe;
use common::{Up, text};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

async fn session(url: &str, user: &str) -> Session {
    let config = SessionConfig::new(
        Target::parse(url).expect("url"),
        Encoding::Json,
        Identity::User(user.to_owned()),
    );
    Session::start(config).await.expect("session")
}

/// Channel messages from `events` until `texts` have all arrived (or 30 s), in arrival order.
async fn collect(session: &mut Session, wanted: usize) -> (Vec<String>, Vec<Event>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut texts = Vec::new();
    let mut others = Vec::new();
    while texts.len() < wanted {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, session.events.recv()).await {
            Ok(Some(Event::Message(m))) => texts.push(m.text),
            Ok(Some(other)) => others.push(other),
            _ => break,
        }
    }
    (texts, others)
}

#[test]
fn local_stack_serves_supervises_refuses_a_second_up_and_stops_cleanly() {
    let rt = runtime();
    let mut up = Up::start(&["--gateways", "2", "--workers", "1"]);
    let info = up.info();
    let port = info.port.expect("port");
    let ws_url = info.ws_url.clone().expect("ws url");

    // The page, through HAProxy, and HAProxy's readiness.
    rt.block_on(async {
        assert_eq!(
            probe::http_status(port, "/", Duration::from_secs(5)).await,
            Some(200)
        );
        let stats = info.stats_port.expect("stats port");
        assert!(probe::http_ok(stats, chatcluster_haproxy::READINESS_PATH).await);
        assert_eq!(
            probe::http_status(stats, "/metrics", Duration::from_secs(5)).await,
            Some(200)
        );
    });

    // HAProxy → gateway → Redis → worker → PostgreSQL → history.
    let mut alice = rt.block_on(session(&ws_url, "alice"));
    rt.block_on(async {
        alice
            .handle
            .subscribe("e2e", None)
            .await
            .expect("subscribe");
        let sent = alice
            .handle
            .publish("e2e", "to the archive")
            .await
            .expect("publish");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let history = alice
                .handle
                .history("e2e", None, Some(10))
                .await
                .expect("history");
            if history
                .iter()
                .any(|m| m.msg_id == sent.msg_id && m.offset == sent.offset)
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the message never reached history: {history:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (texts, _) = collect(&mut alice, 1).await;
        assert_eq!(texts, ["to the archive"]);
    });

    // A second `up` is refused and touches nothing.
    let before = up.info();
    let second = up.run(&["up"]);
    assert!(!second.status.success());
    let said = text(&second);
    assert!(
        said.contains("already running") && said.contains("nothing was changed"),
        "{said}"
    );
    assert_eq!(up.info(), before, "the state file changed");
    for child in before.children.iter().filter(|c| c.socket.is_some()) {
        assert!(
            child.socket.as_ref().expect("socket").exists(),
            "{} socket removed",
            child.name
        );
    }
    rt.block_on(async {
        assert_eq!(
            probe::http_status(port, "/", Duration::from_secs(5)).await,
            Some(200)
        );
    });

    // Both gateways die; the stack restarts them; alice's session recovers what she missed.
    for name in ["gateway-0", "gateway-1"] {
        let pid = up.child(name).pid.expect("pid");
        chatctl::stack::child::signal(pid, nix::sys::signal::Signal::SIGKILL);
    }
    let restarted = chatcluster_testkit::wait_until(Duration::from_secs(30), || {
        ["gateway-0", "gateway-1"].iter().all(|name| {
            let child = up.child(name);
            child.restarts == 1
                && child.pid.is_some()
                && rt.block_on(probe::http_ok(child.port.expect("admin port"), "/ready"))
        })
    });
    assert!(
        restarted,
        "gateways not restarted: {:?}\n{}",
        up.info().children,
        up.output()
    );
    assert_eq!(
        up.child("gateway-0").last_exit.as_deref(),
        Some("killed by SIGKILL")
    );
    rt.block_on(async {
        let bob = session(&ws_url, "bob").await;
        for i in 0..5 {
            bob.handle
                .publish("e2e", &format!("after {i}"))
                .await
                .expect("publish");
        }
        let (texts, mut events) = collect(&mut alice, 5).await;
        assert_eq!(
            texts,
            ["after 0", "after 1", "after 2", "after 3", "after 4"],
            "{events:?}"
        );
        // The reconnection summary follows the messages it recovered.
        while let Ok(Some(event)) =
            tokio::time::timeout(Duration::from_millis(500), alice.events.recv()).await
        {
            events.push(event);
        }
        assert!(
            events
                .iter()
                .any(|e| matches!(e, Event::Disconnected { .. })),
            "{events:?}"
        );
        assert!(
            events
                .iter()
                .any(|e| matches!(e, Event::Reconnected { .. })),
            "{events:?}"
        );
    });
    let status = up.run(&["status", "--json"]);
    assert!(status.status.success(), "{}", text(&status));
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status json");
    assert_eq!(status["running"], true);
    assert_eq!(status["children"].as_array().map(Vec::len), Some(6));

    // An ordered, clean stop; nothing left behind.
    drop(alice);
    let before = up.info();
    let (down, status) = up.down();
    let said = text(&down);
    assert!(down.status.success(), "{said}");
    assert!(
        status.success(),
        "chatctl up exited with {status}:\n{}",
        up.output()
    );
    assert!(said.contains("database system is shut down"), "{said}");
    let postgres_log =
        std::fs::read_to_string(before.log_dir.join("postgres.log")).expect("postgres log");
    assert!(
        postgres_log.contains("received fast shutdown request"),
        "{postgres_log}"
    );
    assert!(
        postgres_log
            .trim_end()
            .ends_with("database system is shut down"),
        "{postgres_log}"
    );
    for child in &before.children {
        let (pid, started) = (
            child.pid.expect("pid"),
            child.start_time.expect("start time"),
        );
        assert!(
            !procstat::is_same_process(pid, started),
            "{} (pid {pid}) still runs",
            child.name
        );
        if let Some(socket) = &child.socket {
            assert!(!socket.exists(), "{} left its socket", child.name);
        }
    }
    let after = up.info();
    assert_eq!(after.phase, chatctl::stack::Phase::Stopped);
    assert!(after.shutdown.as_ref().expect("report").clean());
    // The order: HAProxy and gateways, then the worker, then Redis and PostgreSQL.
    let order: Vec<String> = after
        .shutdown
        .map(|r| r.children.into_iter().map(|c| c.name).collect())
        .unwrap_or_default();
    let position = |name: &str| order.iter().position(|n| n == name).expect(name);
    assert!(
        position("gateway-0") < position("worker-0") && position("haproxy") < position("worker-0")
    );
    assert!(
        position("worker-0") < position("redis") && position("worker-0") < position("postgres")
    );
}
