//! Writes that are stored once however often they are sent.
//!
//! Every `publish` and `message` carries an idempotency key. When its outcome is unknown (the
//! gateway answered `unknown_outcome`, the connection dropped or the reply never came) or
//! nothing was stored for a passing reason (`unavailable`, `rate_limited`), the write is sent
//! again with the same key, with backoff and a bounded number of attempts: the gateway
//! returns the first result for a key it has seen, so a retry never stores twice.

use std::future::Future;
use std::time::Duration;

use chatcluster_protocol::frame::ErrorCode;
use rand::Rng as _;

use super::ClientError;

/// A fresh idempotency key: a UUID v4, 36 printable ASCII characters.
pub fn new_key() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// How a write is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (at least 1).
    pub attempts: u32,
    /// Delay before the first retry; it doubles for each one after.
    pub first_delay: Duration,
    /// The longest delay between two attempts.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    /// 8 attempts, 250 ms doubling to 4 s: about 10 s of retries, long enough for a session
    /// to reconnect to another gateway.
    fn default() -> Self {
        Self {
            attempts: 8,
            first_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(4),
        }
    }
}

impl RetryPolicy {
    /// The delay before retry `retry` (0 for the first), jittered to 50–100 %.
    pub fn delay(&self, retry: u32) -> Duration {
        let base = self
            .first_delay
            .saturating_mul(1 << retry.min(16))
            .min(self.max_delay);
        base.mul_f64(rand::rng().random_range(0.5..=1.0))
    }
}

/// Whether a write that failed with `error` should be sent again with the same key: its
/// outcome is unknown, or nothing was stored for a reason that passes.
pub fn retryable(error: &ClientError) -> bool {
    match error {
        ClientError::Server { code, .. } => [
            ErrorCode::UnknownOutcome,
            ErrorCode::Unavailable,
            ErrorCode::RateLimited,
        ]
        .iter()
        .any(|c| c.as_str() == code),
        ClientError::Disconnected(_) | ClientError::Timeout(_) => true,
        ClientError::BadTarget(_)
        | ClientError::Connect { .. }
        | ClientError::Decode(_)
        | ClientError::Closed => false,
    }
}

/// Runs `attempt` (one send of the same keyed write) until it succeeds, fails in a way a
/// retry cannot fix, or `policy.attempts` are used up; returns the last result.
pub async fn with_retry<T, F, Fut>(policy: RetryPolicy, mut attempt: F) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ClientError>>,
{
    let mut retry = 0;
    loop {
        match attempt().await {
            Err(error) if retryable(&error) && retry + 1 < policy.attempts => {
                tracing::debug!(%error, retry, "write failed; retrying with the same key");
                tokio::time::sleep(policy.delay(retry)).await;
                retry += 1;
            }
            result => return result,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    fn server(code: ErrorCode) -> ClientError {
        ClientError::Server {
            code: code.to_string(),
            message: "test".into(),
        }
    }

    #[test]
    fn keys_are_fresh_printable_ascii_within_the_limit() {
        let (a, b) = (new_key(), new_key());
        assert_ne!(a, b);
        assert!((1..=128).contains(&a.len()));
        assert!(a.bytes().all(|c| c.is_ascii_graphic()), "{a}");
    }

    #[test]
    fn only_unknown_or_passing_failures_are_retried() {
        assert!(retryable(&server(ErrorCode::UnknownOutcome)));
        assert!(retryable(&server(ErrorCode::Unavailable)));
        assert!(retryable(&server(ErrorCode::RateLimited)));
        assert!(retryable(&ClientError::Disconnected("lost".into())));
        assert!(retryable(&ClientError::Timeout("publish".into())));
        assert!(!retryable(&server(ErrorCode::BadRequest)));
        assert!(!retryable(&server(ErrorCode::TooLarge)));
        assert!(!retryable(&server(ErrorCode::NotFound)));
        assert!(!retryable(&server(ErrorCode::Forbidden)));
        assert!(!retryable(&ClientError::Closed));
    }

    #[test]
    fn delays_double_up_to_the_cap() {
        let policy = RetryPolicy::default();
        for retry in 0..40 {
            let delay = policy.delay(retry);
            let base = Duration::from_millis(250)
                .saturating_mul(1 << retry.min(16))
                .min(policy.max_delay);
            assert!(delay <= base && delay >= base / 2, "{retry}: {delay:?}");
        }
    }

    /// The default policy's shape with millisecond delays, so the tests run quickly.
    const QUICK: RetryPolicy = RetryPolicy {
        attempts: 8,
        first_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(4),
    };

    /// A fake gateway: answers each attempt from a script and records the key it was sent.
    async fn run_script(
        script: Vec<Result<u64, ClientError>>,
        policy: RetryPolicy,
    ) -> (Result<u64, ClientError>, Vec<String>) {
        let key = new_key();
        let sent = Mutex::new(Vec::new());
        let script = Mutex::new(script.into_iter());
        let result = with_retry(policy, || {
            sent.lock().expect("lock").push(key.clone());
            let next = script
                .lock()
                .expect("lock")
                .next()
                .expect("script too short");
            async move { next }
        })
        .await;
        (result, sent.into_inner().expect("lock"))
    }

    #[tokio::test]
    async fn unknown_outcomes_are_retried_with_the_same_key_until_ok() {
        let script = vec![
            Err(server(ErrorCode::UnknownOutcome)),
            Err(ClientError::Disconnected("gateway died".into())),
            Err(server(ErrorCode::Unavailable)),
            Ok(42),
        ];
        let (result, keys) = run_script(script, QUICK).await;
        assert_eq!(result, Ok(42));
        assert_eq!(keys.len(), 4);
        assert!(keys.iter().all(|k| *k == keys[0]), "{keys:?}");
    }

    #[tokio::test]
    async fn a_refusal_is_not_retried() {
        let script = vec![Err(server(ErrorCode::TooLarge))];
        let (result, keys) = run_script(script, QUICK).await;
        assert_eq!(result, Err(server(ErrorCode::TooLarge)));
        assert_eq!(keys.len(), 1);
    }

    #[tokio::test]
    async fn attempts_are_bounded_and_the_last_error_returned() {
        let policy = RetryPolicy {
            attempts: 3,
            first_delay: Duration::from_millis(20),
            max_delay: Duration::from_millis(40),
        };
        let script = (0..3)
            .map(|_| Err(server(ErrorCode::UnknownOutcome)))
            .collect();
        let started = tokio::time::Instant::now();
        let (result, keys) = run_script(script, policy).await;
        assert_eq!(result, Err(server(ErrorCode::UnknownOutcome)));
        assert_eq!(keys.len(), 3);
        // two waits with backoff: 10–20 ms, then 20–40 ms
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(30), "{waited:?}");
    }
}
