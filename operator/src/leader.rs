//! Leader election through a `coordination.k8s.io/v1` Lease, so two replicas never reconcile
//! at once.
//!
//! The holder renews the Lease every fifth of its duration. A follower decides expiry by its
//! own clock, as client-go does: it remembers when it last saw the Lease's record change and
//! takes the Lease over only after a whole lease duration without a change, so clock skew
//! between nodes does not matter. Writes use the Lease's `resourceVersion`, so of two
//! instances racing for an expired Lease exactly one wins. Every API call is bounded by a
//! timeout, and a leader that has not renewed within the renew deadline (two thirds of the
//! duration) stops leading before any follower could take over. A leader that shuts down
//! releases the Lease only after its in-flight reconciles have finished.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::error::{Error, Result};

/// Where and as whom to hold the Lease.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    /// Lease name.
    pub name: String,
    /// This instance's identity.
    pub identity: String,
    /// How long a Lease stays valid without renewal.
    pub duration: Duration,
}

impl LeaseSettings {
    /// Time between rounds, and the bound of one API call.
    pub fn retry_period(&self) -> Duration {
        self.duration / 5
    }

    /// A leader that has not renewed for this long stops leading.
    pub fn renew_deadline(&self) -> Duration {
        self.duration * 2 / 3
    }
}

/// What to do with the Lease as found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// It is ours: renew it.
    Renew,
    /// It is free or expired: take it.
    Acquire,
    /// Someone else holds it.
    HeldBy(String),
}

/// A foreign Lease record as this instance last saw it, and when by its own clock.
#[derive(Clone, Debug, PartialEq)]
pub struct Sighting {
    holder: String,
    renew_time: Option<MicroTime>,
    seen_at: Instant,
}

/// Decides what to do with a Lease found with `spec` at local time `now`; `last` remembers
/// when the record last changed.
pub fn claim(
    spec: Option<&LeaseSpec>,
    identity: &str,
    last: &mut Option<Sighting>,
    now: Instant,
) -> Claim {
    let Some(spec) = spec else {
        return Claim::Acquire;
    };
    let holder = spec.holder_identity.as_deref().unwrap_or_default();
    if holder.is_empty() {
        return Claim::Acquire;
    }
    if holder == identity {
        return Claim::Renew;
    }
    let changed = last
        .as_ref()
        .is_none_or(|seen| seen.holder != holder || seen.renew_time != spec.renew_time);
    if changed {
        *last = Some(Sighting {
            holder: holder.to_owned(),
            renew_time: spec.renew_time.clone(),
            seen_at: now,
        });
        return Claim::HeldBy(holder.to_owned());
    }
    let duration =
        Duration::from_secs(u64::try_from(spec.lease_duration_seconds.unwrap_or(0)).unwrap_or(0));
    let unchanged_for = last
        .as_ref()
        .map_or(Duration::ZERO, |seen| now.duration_since(seen.seen_at));
    if unchanged_for > duration {
        Claim::Acquire
    } else {
        Claim::HeldBy(holder.to_owned())
    }
}

/// Keeps trying to lead until `done` completes; `leading` tells the rest of the process.
///
/// `done` should complete once the work that needs leadership has stopped, so the Lease is
/// released only after in-flight reconciles finished. Returns an error when leadership, once
/// held, is lost: the caller must stop reconciling.
pub async fn hold(
    api: Api<Lease>,
    settings: LeaseSettings,
    leading: watch::Sender<bool>,
    done: impl Future<Output = ()>,
) -> Result<()> {
    tokio::pin!(done);
    let mut last_renewal: Option<Instant> = None;
    let mut sighting = None;
    loop {
        let round_deadline = match last_renewal {
            Some(at) => at + settings.renew_deadline(),
            None => Instant::now() + 2 * settings.retry_period(),
        };
        let round =
            tokio::time::timeout_at(round_deadline, try_lead(&api, &settings, &mut sighting));
        let result = round.await.unwrap_or_else(|_| {
            Err(Error::Lease {
                reason: "the Lease round timed out",
                source: None,
            })
        });
        match result {
            Ok(true) => {
                if last_renewal.is_none() {
                    info!(identity = %settings.identity, "became leader");
                }
                last_renewal = Some(Instant::now());
                leading.send_replace(true);
            }
            Ok(false) if last_renewal.is_some() => {
                leading.send_replace(false);
                return Err(Error::Lease {
                    reason: "another instance took over the Lease",
                    source: None,
                });
            }
            Ok(false) => {}
            Err(error) => {
                warn!(%error, "leader election round failed");
                if last_renewal.is_some_and(|at| at.elapsed() >= settings.renew_deadline()) {
                    leading.send_replace(false);
                    return Err(error);
                }
            }
        }
        tokio::select! {
            () = &mut done => break,
            () = tokio::time::sleep(settings.retry_period()) => {}
        }
    }
    if last_renewal.is_some() {
        leading.send_replace(false);
        let bound = settings.retry_period();
        if tokio::time::timeout(bound, release(&api, &settings))
            .await
            .is_err()
        {
            warn!("releasing the leader Lease timed out");
        }
    }
    Ok(())
}

/// Runs one Lease API call within the retry period.
async fn bounded<T>(
    settings: &LeaseSettings,
    call: impl Future<Output = kube::Result<T>>,
) -> kube::Result<T> {
    match tokio::time::timeout(settings.retry_period(), call).await {
        Ok(result) => result,
        Err(_) => Err(kube::Error::Service(
            "the Lease call timed out".to_owned().into(),
        )),
    }
}

/// One round: acquire or renew. `Ok(true)` means we lead now.
async fn try_lead(
    api: &Api<Lease>,
    settings: &LeaseSettings,
    sighting: &mut Option<Sighting>,
) -> Result<bool> {
    let existing = bounded(settings, api.get_opt(&settings.name))
        .await
        .map_err(lease_error("reading the Lease failed"))?;
    let now = Timestamp::now();
    let decision = claim(
        existing.as_ref().and_then(|l| l.spec.as_ref()),
        &settings.identity,
        sighting,
        Instant::now(),
    );
    let Some(mut lease) = existing else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(settings.name.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(held_spec(settings, now, None)),
        };
        return match bounded(settings, api.create(&PostParams::default(), &lease)).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(error) => Err(lease_error("creating the Lease failed")(error)),
        };
    };
    let spec = match decision {
        Claim::HeldBy(_) => return Ok(false),
        Claim::Renew => LeaseSpec {
            renew_time: Some(MicroTime(now)),
            lease_duration_seconds: Some(duration_seconds(settings)),
            ..lease.spec.clone().unwrap_or_default()
        },
        Claim::Acquire => held_spec(settings, now, lease.spec.as_ref()),
    };
    lease.spec = Some(spec);
    let params = PostParams::default();
    match bounded(settings, api.replace(&settings.name, &params, &lease)).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(error) => Err(lease_error("writing the Lease failed")(error)),
    }
}

fn held_spec(settings: &LeaseSettings, now: Timestamp, previous: Option<&LeaseSpec>) -> LeaseSpec {
    let transitions = previous.and_then(|p| p.lease_transitions).unwrap_or(0);
    LeaseSpec {
        holder_identity: Some(settings.identity.clone()),
        lease_duration_seconds: Some(duration_seconds(settings)),
        acquire_time: Some(MicroTime(now)),
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(if previous.is_some() {
            transitions + 1
        } else {
            0
        }),
        ..LeaseSpec::default()
    }
}

fn duration_seconds(settings: &LeaseSettings) -> i32 {
    i32::try_from(settings.duration.as_secs()).unwrap_or(i32::MAX)
}

/// Gives the Lease up so a follower need not wait for it to expire.
async fn release(api: &Api<Lease>, settings: &LeaseSettings) {
    let Ok(Some(mut lease)) = api.get_opt(&settings.name).await else {
        return;
    };
    let Some(spec) = lease.spec.as_mut() else {
        return;
    };
    if spec.holder_identity.as_deref() != Some(settings.identity.as_str()) {
        return;
    }
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    match api
        .replace(&settings.name, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => info!("released the leader Lease"),
        Err(error) => warn!(%error, "releasing the leader Lease failed"),
    }
}

fn lease_error(reason: &'static str) -> impl Fn(kube::Error) -> Error {
    move |error| Error::Lease {
        reason,
        source: Some(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: Option<&str>, renewed_at: i64, duration: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_owned),
            lease_duration_seconds: Some(duration),
            renew_time: Some(MicroTime(Timestamp::from_second(renewed_at).unwrap())),
            ..LeaseSpec::default()
        }
    }

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).unwrap()
    }

    #[test]
    fn missing_or_free_lease_is_acquired() {
        let now = Instant::now();
        assert_eq!(claim(None, "a", &mut None, now), Claim::Acquire);
        assert_eq!(
            claim(Some(&spec(None, 99, 15)), "a", &mut None, now),
            Claim::Acquire
        );
        assert_eq!(
            claim(Some(&spec(Some(""), 99, 15)), "a", &mut None, now),
            Claim::Acquire
        );
    }

    #[test]
    fn own_lease_is_renewed() {
        let held = spec(Some("a"), 0, 15);
        assert_eq!(
            claim(Some(&held), "a", &mut None, Instant::now()),
            Claim::Renew
        );
    }

    #[test]
    fn foreign_lease_expires_by_the_followers_own_clock() {
        // The leader's renewTime is years in the past (its clock is off): irrelevant, only
        // how long the record stayed unchanged as seen here counts.
        let start = Instant::now();
        let mut last = None;
        let held = spec(Some("b"), 0, 15);
        let held_by_b = Claim::HeldBy("b".to_owned());
        assert_eq!(claim(Some(&held), "a", &mut last, start), held_by_b);
        let at = |s: u64| start + Duration::from_secs(s);
        assert_eq!(claim(Some(&held), "a", &mut last, at(15)), held_by_b);
        let renewed = spec(Some("b"), 1, 15);
        assert_eq!(
            claim(Some(&renewed), "a", &mut last, at(14)),
            held_by_b,
            "a renewal restarts the count"
        );
        assert_eq!(claim(Some(&renewed), "a", &mut last, at(29)), held_by_b);
        assert_eq!(
            claim(Some(&renewed), "a", &mut last, at(30)),
            Claim::Acquire
        );
    }

    #[test]
    fn deadlines_leave_room_before_a_takeover() {
        let settings = LeaseSettings {
            name: "l".to_owned(),
            identity: "a".to_owned(),
            duration: Duration::from_secs(15),
        };
        assert_eq!(settings.retry_period(), Duration::from_secs(3));
        assert_eq!(settings.renew_deadline(), Duration::from_secs(10));
        assert!(settings.renew_deadline() < settings.duration);
    }

    #[test]
    fn taking_over_counts_a_transition() {
        let settings = LeaseSettings {
            name: "l".to_owned(),
            identity: "a".to_owned(),
            duration: Duration::from_secs(15),
        };
        let previous = LeaseSpec {
            lease_transitions: Some(4),
            ..spec(Some("b"), 0, 15)
        };
        let taken = held_spec(&settings, at(50), Some(&previous));
        assert_eq!(taken.holder_identity.as_deref(), Some("a"));
        assert_eq!(taken.lease_transitions, Some(5));
        assert_eq!(taken.lease_duration_seconds, Some(15));
        assert_eq!(
            held_spec(&settings, at(50), None).lease_transitions,
            Some(0)
        );
    }

    mod api {
        use super::*;
        use crate::fake_api::{self, Call};
        use http::StatusCode;
        use serde_json::{Value, json};

        const PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/ops/leases/op";

        fn settings() -> LeaseSettings {
            LeaseSettings {
                name: "op".to_owned(),
                identity: "a".to_owned(),
                duration: Duration::from_secs(15),
            }
        }

        fn lease(holder: &str, renewed: Timestamp, transitions: i32) -> Value {
            json!({
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": "op", "namespace": "ops", "resourceVersion": "7"},
                "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                         "renewTime": MicroTime(renewed), "leaseTransitions": transitions},
            })
        }

        /// Runs one round against a fake that returns `existing` for the GET and `write` for
        /// the create or replace.
        async fn round(existing: Option<Value>, write: StatusCode) -> (Result<bool>, Vec<Call>) {
            let (client, calls) =
                fake_api::client(move |call| match (call.method.as_str(), &existing) {
                    ("GET", Some(lease)) => (StatusCode::OK, lease.clone()),
                    ("GET", None) => (
                        StatusCode::NOT_FOUND,
                        fake_api::failure(404, "NotFound", "no lease"),
                    ),
                    _ if write == StatusCode::CONFLICT => (
                        write,
                        fake_api::failure(409, "Conflict", "the object has been modified"),
                    ),
                    _ => (write, call.body.clone()),
                });
            let api = Api::namespaced(client, "ops");
            let result = try_lead(&api, &settings(), &mut None).await;
            (result, fake_api::take(&calls))
        }

        #[tokio::test]
        async fn creates_a_missing_lease_and_leads() {
            let (result, calls) = round(None, StatusCode::CREATED).await;
            assert!(result.unwrap());
            assert_eq!(calls.len(), 2);
            assert_eq!(calls[1].method, "POST");
            assert_eq!(calls[1].body["spec"]["holderIdentity"], "a");
            assert_eq!(calls[1].body["spec"]["leaseDurationSeconds"], 15);
        }

        #[tokio::test]
        async fn follows_a_live_foreign_lease_without_writing() {
            let (result, calls) =
                round(Some(lease("b", Timestamp::now(), 1)), StatusCode::OK).await;
            assert!(!result.unwrap());
            assert_eq!(calls.len(), 1, "only the GET: {calls:?}");
        }

        #[tokio::test]
        async fn takes_over_an_expired_lease_with_optimistic_locking() {
            let expired = Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(60);
            let (client, calls) = fake_api::client(move |call| match call.method.as_str() {
                "GET" => (StatusCode::OK, lease("b", expired, 1)),
                _ => (StatusCode::OK, call.body.clone()),
            });
            let api = Api::namespaced(client, "ops");
            // First sight of b's record: follow. Unchanged for a whole duration: take over.
            let mut sighting = None;
            assert!(!try_lead(&api, &settings(), &mut sighting).await.unwrap());
            if let Some(seen) = sighting.as_mut() {
                seen.seen_at -= Duration::from_secs(16);
            }
            let result = try_lead(&api, &settings(), &mut sighting).await;
            let calls: Vec<Call> = fake_api::take(&calls).into_iter().skip(1).collect();
            assert!(result.unwrap());
            let replace = &calls[1];
            assert_eq!(
                (replace.method.as_str(), replace.path.split('?').next()),
                ("PUT", Some(PATH))
            );
            assert_eq!(replace.body["metadata"]["resourceVersion"], "7");
            assert_eq!(replace.body["spec"]["holderIdentity"], "a");
            assert_eq!(replace.body["spec"]["leaseTransitions"], 2);
        }

        #[tokio::test]
        async fn renews_its_own_lease() {
            let (result, calls) =
                round(Some(lease("a", Timestamp::now(), 3)), StatusCode::OK).await;
            assert!(result.unwrap());
            assert_eq!(calls[1].body["spec"]["holderIdentity"], "a");
            assert_eq!(
                calls[1].body["spec"]["leaseTransitions"], 3,
                "a renewal is no transition"
            );
        }

        #[tokio::test]
        async fn losing_the_race_is_following() {
            let (result, _) = round(None, StatusCode::CONFLICT).await;
            assert!(!result.unwrap());
        }

        #[tokio::test]
        async fn an_api_server_that_never_answers_is_a_bounded_failure() {
            let (service, _handle) = tower_test::mock::pair::<
                http::Request<kube::client::Body>,
                http::Response<kube::client::Body>,
            >();
            let api = Api::namespaced(kube::Client::new(service, "ops"), "ops");
            let settings = LeaseSettings {
                duration: Duration::from_millis(500),
                ..settings()
            };
            let started = Instant::now();
            let error = try_lead(&api, &settings, &mut None).await.unwrap_err();
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "bounded by the retry period"
            );
            assert_eq!(error.metric_label(), "lease");
            assert!(
                std::error::Error::source(&error).is_some(),
                "the cause is kept"
            );
        }
    }
}
