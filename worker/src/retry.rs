//! The one retry loop: an operation on a failing backend is retried with
//! backoff until it succeeds or the caller gives up.
//!
//! Every failure is counted (`errors_total{backend}`), logged with the delay
//! before the next try, and turns the backend's readiness off; a success turns
//! it on again. Callers decide what a failure is: an operation that must not
//! be retried (data PostgreSQL will never accept) returns its outcome in `Ok`.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::admin::Health;
use crate::backoff::Backoff;
use crate::metrics::Metrics;

/// The backends the worker depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The persistence streams.
    Redis,
    /// The tables.
    Postgres,
}

impl Backend {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Redis => "redis",
            Self::Postgres => "postgres",
        }
    }
}

/// The caller gave up (shutdown, or the drain time is over) before the operation succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Abandoned;

/// How to retry operations on one backend.
#[derive(Clone, Copy)]
pub struct Retry<'a> {
    /// The backend the operation talks to.
    pub backend: Backend,
    /// Counters of failures.
    pub metrics: &'a Metrics,
    /// Readiness.
    pub health: &'a Health,
    /// Giving up: checked between attempts, and during an attempt when `interrupt` is set.
    pub cancel: &'a CancellationToken,
    /// Whether an attempt in progress is dropped when `cancel` fires. Leave it
    /// off for operations whose half-done state matters (a read whose entries
    /// would be delivered and then forgotten).
    pub interrupt: bool,
}

impl Retry<'_> {
    /// Runs `op` until it returns `Ok`, waiting 100 ms doubling to 5 s after
    /// each failure; `Err(Abandoned)` once `cancel` fires. `what` names the
    /// operation in the logs.
    pub async fn until_ok<T, E, F, Fut>(&self, what: &str, mut op: F) -> Result<T, Abandoned>
    where
        E: Display,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let mut backoff = Backoff::default();
        loop {
            let attempt = if self.interrupt {
                tokio::select! {
                    result = op() => result,
                    () = self.cancel.cancelled() => return Err(Abandoned),
                }
            } else {
                op().await
            };
            match attempt {
                Ok(value) => {
                    self.succeeded();
                    return Ok(value);
                }
                Err(error) => {
                    let delay = self.failed(what, &error, &mut backoff);
                    self.pause(delay).await?;
                }
            }
        }
    }

    /// Records that the backend answered.
    pub fn succeeded(&self) {
        self.health.set(self.backend, true);
        self.metrics.answered(self.backend.label());
    }

    /// Records a failed attempt and returns how long to [`Retry::pause`]
    /// before the next (for loops that do other work between attempts, like
    /// the reader's).
    pub fn failed(&self, what: &str, error: &dyn Display, backoff: &mut Backoff) -> Duration {
        let label = self.backend.label();
        self.health.set(self.backend, false);
        self.metrics.failed(label);
        let delay = backoff.next_delay();
        tracing::warn!(%error, retry_in = ?delay, backend = label, "{what} failed");
        delay
    }

    /// Sleeps `delay`; `Err(Abandoned)` when `cancel` fires first.
    pub async fn pause(&self, delay: Duration) -> Result<(), Abandoned> {
        tokio::select! {
            () = tokio::time::sleep(delay) => Ok(()),
            () = self.cancel.cancelled() => Err(Abandoned),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Fixture {
        metrics: Metrics,
        health: Health,
        cancel: CancellationToken,
    }

    impl Fixture {
        fn retry(&self, backend: Backend, interrupt: bool) -> Retry<'_> {
            Retry {
                backend,
                metrics: &self.metrics,
                health: &self.health,
                cancel: &self.cancel,
                interrupt,
            }
        }
    }

    #[tokio::test]
    async fn retries_until_success_counting_failures_and_tracking_readiness() {
        let fixture = Fixture::default();
        let mut calls = 0;
        let value = fixture
            .retry(Backend::Redis, false)
            .until_ok("test", || {
                calls += 1;
                std::future::ready(if calls < 3 { Err("down") } else { Ok(calls) })
            })
            .await;
        assert_eq!(value, Ok(3));
        let label = crate::metrics::BackendLabel { backend: "redis" };
        assert_eq!(fixture.metrics.errors.get_or_create(&label).get(), 2);
        assert!(fixture.health.readiness().redis);
    }

    #[tokio::test]
    async fn gives_up_when_cancelled() {
        let fixture = Fixture::default();
        fixture.cancel.cancel();
        let never = fixture
            .retry(Backend::Postgres, true)
            .until_ok("test", std::future::pending::<Result<(), &str>>)
            .await;
        assert_eq!(never, Err(Abandoned), "an attempt in progress is dropped");
        let failing = fixture
            .retry(Backend::Postgres, false)
            .until_ok("test", || std::future::ready(Err::<(), _>("down")))
            .await;
        assert_eq!(failing, Err(Abandoned), "no retry after a failure");
        assert!(!fixture.health.readiness().postgres);
    }
}
