//! The harness itself: each service starts, answers, restarts and stops.

use chatcluster_testkit::{Haproxy, Postgres, RedisServer};

#[test]
fn redis_starts_restarts_and_loses_data_on_kill() {
    let mut redis = RedisServer::start();
    assert!(redis.command(&["SET", "k", "v"]).starts_with("+OK"));
    assert!(redis.command(&["GET", "k"]).contains("v"));
    redis.restart();
    assert!(
        redis.command(&["GET", "k"]).starts_with("$-1"),
        "no persistence: data is gone"
    );
}

#[test]
fn postgres_starts_stops_and_restarts() {
    let mut pg = Postgres::start();
    assert!(pg.url().starts_with("postgres://postgres@127.0.0.1:"));
    pg.stop();
    assert!(!chatcluster_testkit::port_open(pg.port()));
    pg.restart();
    assert!(chatcluster_testkit::port_open(pg.port()));
}

#[test]
fn haproxy_config_is_valid_and_serves_stats() {
    let dir = tempfile::tempdir().unwrap();
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
    assert!(http_get(haproxy.stats_port(), "/healthz").starts_with("HTTP/1.1 200"));
    assert!(
        chatcluster_testkit::wait_until(std::time::Duration::from_secs(5), || {
            http_get(haproxy.stats_port(), "/ready").starts_with("HTTP/1.1 503")
        }),
        "/ready must fail while no gateway server is up"
    );
}

fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
}
