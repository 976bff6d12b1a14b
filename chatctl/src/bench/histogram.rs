//! Latency histograms (HDR, 3 significant digits, 1 µs to 60 s) shared by thousands of
//! tasks: each task buffers values and adds them under one of several locks, so recording
//! costs a push into a local buffer, not a lock per message.

use std::sync::Mutex;

use hdrhistogram::Histogram;
use serde::Serialize;

const SHARDS: usize = 16;
const BUFFER: usize = 256;
const MAX_US: u64 = 60_000_000;

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, 3).expect("constant bounds hdrhistogram accepts")
}

/// A histogram of microsecond values, recorded through [`Recorder`]s.
#[derive(Debug)]
pub struct Latencies {
    shards: Vec<Mutex<Histogram<u64>>>,
}

impl Default for Latencies {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(histogram())).collect(),
        }
    }
}

/// Percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Values recorded.
    pub count: u64,
    /// Mean.
    pub mean_ms: f64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

impl Latencies {
    /// A recorder for one task; `key` spreads tasks over the locks.
    pub fn recorder(&self, key: usize) -> Recorder<'_> {
        Recorder {
            target: &self.shards[key % SHARDS],
            buffer: Vec::with_capacity(BUFFER),
        }
    }

    /// All shards merged.
    pub fn merged(&self) -> Histogram<u64> {
        let mut all = histogram();
        for shard in &self.shards {
            if let Ok(h) = shard.lock() {
                let _ = all.add(&*h);
            }
        }
        all
    }

    /// Percentiles of everything recorded so far.
    pub fn summary(&self) -> Summary {
        summarize(&self.merged())
    }
}

/// Percentiles of a histogram of microseconds, in milliseconds.
pub fn summarize(h: &Histogram<u64>) -> Summary {
    let ms = |us: u64| us as f64 / 1000.0;
    if h.is_empty() {
        return Summary::default();
    }
    Summary {
        count: h.len(),
        mean_ms: h.mean() / 1000.0,
        p50_ms: ms(h.value_at_quantile(0.50)),
        p90_ms: ms(h.value_at_quantile(0.90)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        p999_ms: ms(h.value_at_quantile(0.999)),
        max_ms: ms(h.max()),
    }
}

/// Buffers one task's values; flushes when full and on drop.
#[derive(Debug)]
pub struct Recorder<'a> {
    target: &'a Mutex<Histogram<u64>>,
    buffer: Vec<u64>,
}

impl Recorder<'_> {
    /// Records one value in microseconds (clamped to 1 µs..60 s).
    pub fn record(&mut self, us: u64) {
        self.buffer.push(us.clamp(1, MAX_US));
        if self.buffer.len() == BUFFER {
            self.flush();
        }
    }

    /// Adds the buffered values to the shared histogram.
    pub fn flush(&mut self) {
        if self.buffer.is_empty() {
            return;
        }
        if let Ok(mut h) = self.target.lock() {
            for &v in &self.buffer {
                let _ = h.record(v);
            }
        }
        self.buffer.clear();
    }
}

impl Drop for Recorder<'_> {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorders_feed_one_summary() {
        let latencies = Latencies::default();
        for task in 0..40 {
            let mut r = latencies.recorder(task);
            for v in 1..=1000u64 {
                r.record(v * 10);
            }
        }
        let s = latencies.summary();
        assert_eq!(s.count, 40_000);
        assert!((s.p50_ms - 5.0).abs() < 0.01, "{s:?}");
        assert!((s.p99_ms - 9.9).abs() < 0.01, "{s:?}");
        assert!((s.max_ms - 10.0).abs() < 0.01, "{s:?}");
    }

    #[test]
    fn empty_is_zero() {
        assert_eq!(Latencies::default().summary(), Summary::default());
    }
}
