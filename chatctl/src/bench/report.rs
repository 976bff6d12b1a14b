//! The human summary of a benchmark (the `--json` report is the same data, serialized).

use std::fmt::Write as _;

use super::SetupInfo;
use super::histogram::Summary;
use super::procs::Usage;
use super::scenarios::Outcome;

/// `1234567` → `1,234,567`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `p50 1.20  p90 …  max …` in milliseconds.
pub fn latency_line(s: &Summary) -> String {
    format!(
        "p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}  (mean {:.2}, {} samples)",
        s.p50_ms,
        s.p90_ms,
        s.p99_ms,
        s.p999_ms,
        s.max_ms,
        s.mean_ms,
        thousands(s.count)
    )
}

/// One row per process: CPU seconds, CPU share and memory.
pub fn processes(usages: &[Usage]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "  {:<26} {:>8} {:>8} {:>7}  {:>12}",
        "process", "pid", "cpu s", "cpu %", "rss (peak) MiB"
    );
    for u in usages {
        let _ = writeln!(
            out,
            "  {:<26} {:>8} {:>8.2} {:>6.0}%  {:>6.1} ({:.1})",
            u.name, u.pid, u.cpu_seconds, u.cpu_percent, u.rss_mib, u.peak_rss_mib
        );
    }
    out
}

/// The limits line.
pub fn limits(setup: &SetupInfo) -> String {
    let mut text = format!(
        "open files: load generator {} (hard {})",
        setup.file_limit.soft, setup.file_limit.hard
    );
    if let Some(max) = setup.haproxy_max_conn {
        let _ = write!(text, "; HAProxy maxconn {max}");
    }
    for (name, limit) in &setup.server_file_limits {
        if name.starts_with("gateway") || name == "haproxy" {
            let _ = write!(text, "; {name} {limit}");
        }
    }
    text
}

/// The summary of a channel-load benchmark.
pub fn load(o: &Outcome) -> String {
    let r = &o.result;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n{}: {} channel(s) × {} subscriber(s), {} msg/s per channel, {} publisher(s), {:.0} s, {} B {}",
        o.bench,
        o.channels,
        o.subscribers_per_channel,
        o.rate_per_channel,
        o.publishers,
        o.duration_seconds,
        o.size,
        o.encoding
    );
    let _ = writeln!(out, "  stack        {} — {}", o.setup.stack, o.path);
    if !o.setup.gateway_args.is_empty() {
        let _ = writeln!(out, "  gateway args {}", o.setup.gateway_args.join(" "));
    }
    if let Some(fsync) = o.setup.redis_fsync {
        let _ = writeln!(out, "  redis        appendfsync {}", fsync.as_str());
    }
    let _ = writeln!(
        out,
        "  connected    {} subscribers in {:.1} s",
        thousands(r.subscribers as u64),
        r.connect_seconds
    );
    let errors = if r.published.errors.is_empty() {
        "none".to_owned()
    } else {
        format!("{:?}", r.published.errors)
    };
    let _ = writeln!(
        out,
        "  published    {} sent, {} acked ({:.0}/s), errors {errors}",
        thousands(r.published.sent),
        thousands(r.published.acked),
        r.published.per_second
    );
    let _ = writeln!(
        out,
        "  publish ack  {}",
        latency_line(&r.published.ack_latency)
    );
    let _ = writeln!(
        out,
        "  deliveries   {} of {} expected ({:.0}/s); lost {}, duplicated {}, out of order {}",
        thousands(r.delivered),
        thousands(r.expected),
        r.deliveries_per_second,
        thousands(r.lost),
        thousands(r.duplicated),
        thousands(r.out_of_order)
    );
    let _ = writeln!(out, "  latency ms   {}", latency_line(&r.latency));
    let _ = writeln!(
        out,
        "  drain        last delivery {:.3} s after the last publish",
        r.drain_seconds
    );
    if !r.closed.is_empty() {
        let _ = writeln!(out, "  closed       {:?}", r.closed);
    }
    out.push_str(&processes(&r.processes));
    if let Some(eff) = o.deliveries_per_server_cpu_second {
        let _ = writeln!(
            out,
            "  efficiency   {} deliveries per CPU-second of gateways + HAProxy",
            thousands(eff as u64)
        );
    }
    let _ = writeln!(out, "  limits       {}", limits(&o.setup));
    if o.stack_stopped_cleanly == Some(false) {
        let _ = writeln!(out, "  !! the benchmark's stack did not stop cleanly");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(20_000_000), "20,000,000");
    }
}
