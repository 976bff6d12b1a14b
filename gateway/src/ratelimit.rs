//! Token buckets: how fast one connection may publish, and its weighted op budget.

use std::time::{Duration, Instant};

/// A token bucket: `rate` tokens per second, at most `burst` stored.
///
/// Besides taking tokens when there are enough ([`TokenBucket::try_take`]),
/// work done regardless can be charged ([`TokenBucket::charge`]): the bucket
/// then goes into debt (down to `-burst`), and [`TokenBucket::debt_wait`] says
/// how long until it is out of it, so a caller can stop reading from a client
/// that keeps sending.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: f64, burst: f64) -> Self {
        Self::new_at(rate, burst, Instant::now())
    }

    fn new_at(rate: f64, burst: f64, now: Instant) -> Self {
        Self {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
    }

    /// Takes `cost` tokens if there are that many.
    pub fn try_take(&mut self, cost: f64) -> bool {
        self.try_take_at(cost, Instant::now())
    }

    fn try_take_at(&mut self, cost: f64, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= cost {
            self.tokens -= cost;
            true
        } else {
            false
        }
    }

    /// How long until `cost` tokens are there (zero when they are now).
    pub fn wait_for(&mut self, cost: f64) -> Duration {
        self.wait_for_at(cost, Instant::now())
    }

    fn wait_for_at(&mut self, cost: f64, now: Instant) -> Duration {
        self.refill(now);
        if self.tokens >= cost {
            Duration::ZERO
        } else {
            Duration::try_from_secs_f64((cost - self.tokens) / self.rate).unwrap_or(Duration::MAX)
        }
    }

    /// Charges `cost` tokens whether or not they are there (down to `-burst`).
    pub fn charge(&mut self, cost: f64) {
        self.charge_at(cost, Instant::now());
    }

    fn charge_at(&mut self, cost: f64, now: Instant) {
        self.refill(now);
        self.tokens = (self.tokens - cost).max(-self.burst);
    }

    /// How long until the bucket is out of debt (zero when it is not in debt).
    pub fn debt_wait(&mut self) -> Duration {
        self.debt_wait_at(Instant::now())
    }

    fn debt_wait_at(&mut self, now: Instant) -> Duration {
        self.wait_for_at(0.0, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_burst_then_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new_at(10.0, 3.0, start);
        assert!((0..3).all(|_| bucket.try_take_at(1.0, start)));
        assert!(!bucket.try_take_at(1.0, start), "burst exhausted");
        assert!(
            bucket.try_take_at(1.0, start + Duration::from_millis(100)),
            "refilled one"
        );
        assert!(!bucket.try_take_at(1.0, start + Duration::from_millis(100)));
        // A long pause refills only up to the burst.
        let later = start + Duration::from_secs(60);
        assert_eq!(
            (0..10).filter(|_| bucket.try_take_at(1.0, later)).count(),
            3
        );
    }

    #[test]
    fn weighted_costs_and_debt() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new_at(100.0, 50.0, start);
        assert!(bucket.try_take_at(40.0, start));
        assert!(!bucket.try_take_at(20.0, start), "only 10 left");
        assert!(bucket.try_take_at(10.0, start));
        assert_eq!(bucket.debt_wait_at(start), Duration::ZERO);
        // Refusals charged while empty put the bucket in debt...
        for _ in 0..30 {
            bucket.charge_at(1.0, start);
        }
        assert_eq!(bucket.debt_wait_at(start), Duration::from_millis(300));
        // ...bounded by the burst.
        for _ in 0..1000 {
            bucket.charge_at(1.0, start);
        }
        assert_eq!(bucket.debt_wait_at(start), Duration::from_millis(500));
        let later = start + Duration::from_millis(500);
        assert_eq!(bucket.debt_wait_at(later), Duration::ZERO);
        assert!(
            !bucket.try_take_at(1.0, later),
            "out of debt, not yet refilled"
        );
    }
}
