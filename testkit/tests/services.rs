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
}
