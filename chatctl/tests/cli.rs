//! The client and benchmark subcommands, run as a user would, against real stacks.

mod common;

use std::io::Write as _;
use std::process::Stdio;

use common::{Up, run, text};

#[test]
fn bad_input_names_the_flag_and_no_stack_is_reported() {
    let out = run(&["up", "--redis-fsync", "never"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("--redis-fsync"), "{}", text(&out));

    let dir = tempfile::tempdir().expect("dir");
    let state = dir.path().to_str().expect("utf-8");
    let out = run(&["status", "--state-dir", state]);
    assert_eq!(out.status.code(), Some(3));
    assert!(text(&out).contains("no stack is running"), "{}", text(&out));
    let out = run(&["down", "--state-dir", state]);
    assert!(
        out.status.success() && text(&out).contains("no stack is running"),
        "{}",
        text(&out)
    );

    let closed = chatcluster_testkit::free_port();
    let url = format!("ws://127.0.0.1:{closed}/ws");
    let out = run(&["publish", "--url", &url, "--user", "a", "-c", "geral", "hi"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("cannot connect"), "{}", text(&out));
    let out = run(&[
        "publish", "--url", "http://x", "--user", "a", "-c", "geral", "hi",
    ]);
    assert!(text(&out).contains("ws://host:port/ws"), "{}", text(&out));
}

#[test]
fn publish_subscribe_chat_bots_token_status() {
    let up = Up::start(&["--gateways", "2", "--auth", "jwt"]);
    let state = up.state_dir().to_str().expect("utf-8").to_owned();

    // A subscriber streaming JSON lines; the stack is in JWT mode, so chatctl mints tokens
    // from the stack's secret for --user.
    let mut subscriber = common::chatctl()
        .args([
            "subscribe",
            "--state-dir",
            &state,
            "--user",
            "sub",
            "-c",
            "geral",
            "--json",
            "--count",
            "6",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("subscribe");
    // Wait until it is subscribed (it says so on stderr) before publishing.
    let stderr = subscriber.stderr.take().expect("stderr");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
    let said = lines.next().expect("a line").expect("utf-8");
    assert!(said.starts_with("subscribed to #geral"), "{said}");

    let out = up.run(&["publish", "--user", "alice", "-c", "geral", "um", "dois"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("#geral offset 2"),
        "{}",
        text(&out)
    );
    let mut stdin_publish = common::chatctl()
        .args([
            "publish",
            "--state-dir",
            &state,
            "--user",
            "alice",
            "-c",
            "geral",
            "--json",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("publish from stdin");
    stdin_publish
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"tres\nquatro\n")
        .expect("write");
    let out = stdin_publish.wait_with_output().expect("publish");
    let replies: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json reply"))
        .collect();
    assert_eq!(
        replies
            .iter()
            .map(|r| r["offset"].as_u64())
            .collect::<Vec<_>>(),
        [Some(3), Some(4)]
    );

    // The chat client, driven through a pipe: the numbered menu and plain text.
    let mut chat = common::chatctl()
        .args(["chat", "--state-dir", &state, "--user", "carol"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("chat");
    chat.stdin
        .take()
        .expect("stdin")
        .write_all(b"1\n2 tech\n3\n4 geral\nola do chat\n6 alice oi\n/who\n/dms\n/dm alice\n7\n")
        .expect("write");
    let out = chat.wait_with_output().expect("chat");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", text(&out));
    for needle in [
        "users: alice, carol, sub",
        "#tech created",
        "channels: geral, tech",
        "joined #geral (newest offset 4",
        "#geral <carol> ola do chat",
        "you → @alice: oi",
        "in #geral: carol, sub",
        "@alice: [",
    ] {
        assert!(said.contains(needle), "{needle:?} not in:\n{said}");
    }

    // alice was offline when carol wrote: her conversation with carol has it.
    let mut alice = common::chatctl()
        .args(["chat", "--state-dir", &state, "--user", "alice"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("chat");
    alice
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"/dm carol 5\n7\n")
        .expect("write");
    let out = alice.wait_with_output().expect("chat");
    assert!(out.status.success(), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("@carol → you: oi"), "not in:\n{said}");

    // Bots publish to existing channels for a while.
    let out = up.run(&[
        "bots",
        "--count",
        "2",
        "--rate",
        "20",
        "--pause",
        "100ms",
        "--duration",
        "2s",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(summary.contains("0 errors, 0 bots failed"), "{summary}");

    // The subscriber saw the first six messages of #geral, in order, each once.
    let out = subscriber.wait_with_output().expect("subscriber");
    assert!(out.status.success());
    let offsets: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json push"))
        .filter(|v| v["type"] == "message")
        .map(|v| v["offset"].as_u64().expect("offset"))
        .collect();
    assert_eq!(offsets, [1, 2, 3, 4, 5, 6]);

    // Tokens: minted from the stack's secret, naming their user.
    let out = up.run(&["token", "--user", "dave", "--ttl", "1h"]);
    assert!(out.status.success(), "{}", text(&out));
    let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(chatctl::token::subject(&token).as_deref(), Some("dave"));

    // status: a table, every child ready.
    let out = up.run(&["status"]);
    assert!(out.status.success(), "{}", text(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    for name in [
        "redis",
        "postgres",
        "worker-0",
        "gateway-0",
        "gateway-1",
        "haproxy",
    ] {
        assert!(table.contains(name), "{name} missing:\n{table}");
    }
    assert!(!table.contains(" NO "), "{table}");
}

fn bench_json(args: &[&str]) -> serde_json::Value {
    let out = run(args);
    assert!(out.status.success(), "{args:?}: {}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {}", text(&out)))
}

#[test]
fn benchmarks_count_every_delivery() {
    let fanout = bench_json(&[
        "bench",
        "fanout",
        "--subscribers",
        "40",
        "--rate",
        "100",
        "--duration",
        "2s",
        "--json",
        "--quiet",
    ]);
    let result = &fanout["result"];
    assert_eq!(result["published"]["acked"], 200);
    assert_eq!(result["expected"], 8000);
    assert_eq!(result["delivered"], 8000);
    for field in ["lost", "duplicated", "out_of_order"] {
        assert_eq!(result[field], 0, "{field}");
    }
    assert!(result["latency"]["p99_ms"].as_f64().expect("p99") > 0.0);
    let names: Vec<&str> = result["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .map(|p| p["name"].as_str().expect("name"))
        .collect();
    for name in [
        "gateway-0",
        "gateway-1",
        "haproxy",
        "redis",
        "chatctl (load generator)",
    ] {
        assert!(names.contains(&name), "{name} not measured: {names:?}");
    }
    assert_eq!(fanout["stack_stopped_cleanly"], true);

    let rooms = bench_json(&[
        "bench",
        "rooms",
        "--channels",
        "10",
        "--members",
        "3",
        "--rate",
        "5",
        "--duration",
        "2s",
        "--encoding",
        "msgpack",
        "--direct",
        "--json",
        "--quiet",
    ]);
    assert_eq!(rooms["result"]["expected"], 10 * 3 * 10);
    assert_eq!(rooms["result"]["delivered"], 10 * 3 * 10);

    let latency = bench_json(&[
        "bench",
        "latency",
        "--rate",
        "50",
        "--duration",
        "1s",
        "--json",
        "--quiet",
    ]);
    assert_eq!(latency["result"]["delivered"], 50);
    assert!(
        latency["path"]
            .as_str()
            .expect("path")
            .contains("gateway-1")
    );

    let connections = bench_json(&[
        "bench",
        "connections",
        "--connections",
        "60",
        "--channels",
        "6",
        "--hold",
        "200ms",
        "--json",
        "--quiet",
    ]);
    assert_eq!(connections["opened"], 60);
    assert!(
        connections["gateway_bytes_per_connection"]
            .as_f64()
            .is_some()
    );

    let persist = bench_json(&[
        "bench",
        "persist",
        "--messages",
        "300",
        "--rate",
        "200",
        "--duration",
        "1s",
        "--json",
        "--quiet",
    ]);
    assert_eq!(persist["rows"], persist["published"]);
    assert_eq!(persist["distinct"], persist["rows"]);
    assert!(persist["overall_per_second"].as_f64().expect("throughput") > 0.0);
}
