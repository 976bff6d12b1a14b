//! The harness itself: each service starts, answers, restarts and stops, and
//! the fault proxy loses exactly the reply it was told to.

use std::io::{Read, Write};
use std::time::Duration;

use chatcluster_testkit::http::http_status_blocking;
use chatcluster_testkit::proxy::{FaultProxy, LoseReply};
use chatcluster_testkit::{Fsync, Haproxy, Persistence, Postgres, RedisServer};

#[test]
fn redis_starts_restarts_and_loses_data_on_kill() {
    let mut redis = RedisServer::start();
    assert!(redis.url().starts_with("unix://"));
    assert!(redis.command(&["SET", "k", "v"]).starts_with("+OK"));
    assert!(redis.command(&["GET", "k"]).contains("v"));
    redis.restart();
    assert!(
        redis.command(&["GET", "k"]).starts_with("$-1"),
        "no persistence: data is gone"
    );
}

#[test]
fn redis_with_an_aof_comes_back_after_a_kill_and_an_old_aof_rewinds_it() {
    let mut redis = RedisServer::start_with(Persistence::Aof(Fsync::Always));
    assert!(redis.command(&["SET", "k", "1"]).starts_with("+OK"));
    let old = redis.snapshot();
    assert!(redis.command(&["SET", "k", "2"]).starts_with("+OK"));
    let pid = redis.pid();
    redis.kill();
    redis.restart();
    assert_ne!(redis.pid(), pid, "a new process");
    assert!(
        redis.command(&["GET", "k"]).contains("\r\n2\r\n"),
        "fsynced: kept"
    );
    redis.kill();
    redis.restore(&old);
    redis.restart();
    assert!(
        redis.command(&["GET", "k"]).contains("\r\n1\r\n"),
        "rewound"
    );
}

#[test]
fn parallel_servers_never_share_an_address() {
    let servers: Vec<RedisServer> = (0..4).map(|_| RedisServer::start()).collect();
    for (i, server) in servers.iter().enumerate() {
        server.command(&["SET", "who", &i.to_string()]);
    }
    for (i, server) in servers.iter().enumerate() {
        assert!(
            server
                .command(&["GET", "who"])
                .contains(&format!("\r\n{i}\r\n"))
        );
    }
}

#[test]
fn postgres_starts_stops_and_restarts() {
    let mut pg = Postgres::start();
    let socket = pg.socket_dir().join(".s.PGSQL.5432");
    assert!(pg.url().contains("?host=/"), "{}", pg.url());
    assert!(socket.exists());
    pg.stop();
    assert!(!socket.exists());
    pg.restart();
    assert!(socket.exists());
}

#[test]
fn haproxy_config_is_valid_and_serves_stats() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sockets = [
        dir.path().join("gateway-0.sock"),
        dir.path().join("gateway-1.sock"),
    ];
    let haproxy = Haproxy::start(&sockets);
    assert!(chatcluster_testkit::port_open(haproxy.stats_port()));
    let cfg = chatcluster_testkit::haproxy::config(1, 2, &sockets);
    assert!(cfg.contains("unix@"));
    assert!(cfg.contains("option httpchk GET /health"));
    // No gateway listens on either socket: alive, but not ready.
    assert_eq!(
        http_status_blocking(haproxy.stats_port(), "/healthz"),
        Some(200)
    );
    assert!(
        chatcluster_testkit::wait_until(Duration::from_secs(5), || {
            http_status_blocking(haproxy.stats_port(), "/ready") == Some(503)
        }),
        "/ready must fail while no gateway server is up"
    );
}

#[test]
fn the_proxy_loses_one_long_reply_to_the_named_command() {
    let redis = RedisServer::start();
    redis.command(&["SET", "k", "a value long enough to be lost"]);
    let proxy = FaultProxy::start(
        redis.socket(),
        LoseReply {
            command: "GET".into(),
            min_len: 10,
        },
    );
    let ask = |words: &str| {
        let mut stream = std::os::unix::net::UnixStream::connect(proxy.socket()).expect("connect");
        stream.write_all(words.as_bytes()).expect("write");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut reply = String::new();
        let _ = stream.read_to_string(&mut reply);
        reply
    };
    // Short replies and other commands pass; the first long GET reply is lost, later ones pass.
    assert!(ask("PING\r\nQUIT\r\n").starts_with("+PONG"));
    assert_eq!(ask("GET k\r\n"), "", "reply lost, connection closed");
    assert_eq!(proxy.fired(), 1);
    assert!(ask("GET k\r\nQUIT\r\n").contains("a value long enough"));
    assert_eq!(proxy.fired(), 1);
}
