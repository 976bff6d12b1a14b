//! Leader election through a `coordination.k8s.io/v1` Lease, so two replicas never reconcile
//! at once.
//!
//! The holder renews the Lease every third of its duration; another instance takes it over
//! only once it has expired. Writes use the Lease's `resourceVersion`, so of two instances
//! racing for an expired Lease exactly one wins. A leader that cannot renew in time stops
//! leading (the binary then exits and restarts as a follower); a leader that shuts down
//! releases the Lease so a follower takes over at once.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;
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

/// Decides what to do with a Lease found with `spec` at `now`.
pub fn claim(spec: Option<&LeaseSpec>, identity: &str, now: Timestamp) -> Claim {
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
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(0)));
    let expired = spec
        .renew_time
        .as_ref()
        .is_none_or(|renewed| renewed.0 + duration < now);
    if expired {
        Claim::Acquire
    } else {
        Claim::HeldBy(holder.to_owned())
    }
}

/// Keeps trying to lead until `shutdown`; `leading` tells the rest of the process.
///
/// Returns an error when leadership, once held, is lost: the caller must stop reconciling.
pub async fn hold(
    api: Api<Lease>,
    settings: LeaseSettings,
    leading: watch::Sender<bool>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    tokio::pin!(shutdown);
    let renew_every = settings.duration / 3;
    let mut last_renewal: Option<tokio::time::Instant> = None;
    loop {
        match try_lead(&api, &settings).await {
            Ok(true) => {
                if last_renewal.is_none() {
                    info!(identity = %settings.identity, "became leader");
                }
                last_renewal = Some(tokio::time::Instant::now());
                leading.send_replace(true);
            }
            Ok(false) => {
                if last_renewal.is_some() {
                    leading.send_replace(false);
                    return Err(Error::Lease(
                        "another instance took over the Lease".to_owned(),
                    ));
                }
            }
            Err(error) => {
                warn!(%error, "leader election round failed");
                if last_renewal.is_some_and(|at| at.elapsed() >= settings.duration) {
                    leading.send_replace(false);
                    return Err(Error::Lease(format!(
                        "could not renew the Lease in time: {error}"
                    )));
                }
            }
        }
        tokio::select! {
            () = &mut shutdown => break,
            () = tokio::time::sleep(renew_every) => {}
        }
    }
    if last_renewal.is_some() {
        release(&api, &settings).await;
        leading.send_replace(false);
    }
    Ok(())
}

/// One round: acquire or renew. `Ok(true)` means we lead now.
async fn try_lead(api: &Api<Lease>, settings: &LeaseSettings) -> Result<bool> {
    let now = Timestamp::now();
    let existing = api.get_opt(&settings.name).await.map_err(lease_error)?;
    let decision = claim(
        existing.as_ref().and_then(|l| l.spec.as_ref()),
        &settings.identity,
        now,
    );
    let Some(mut lease) = existing else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(settings.name.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(held_spec(settings, now, None)),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(error) => Err(lease_error(error)),
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
    match api
        .replace(&settings.name, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(error) => Err(lease_error(error)),
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

fn lease_error(error: kube::Error) -> Error {
    Error::Lease(error.to_string())
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
        assert_eq!(claim(None, "a", at(100)), Claim::Acquire);
        assert_eq!(
            claim(Some(&spec(None, 99, 15)), "a", at(100)),
            Claim::Acquire
        );
        assert_eq!(
            claim(Some(&spec(Some(""), 99, 15)), "a", at(100)),
            Claim::Acquire
        );
    }

    #[test]
    fn own_lease_is_renewed() {
        assert_eq!(
            claim(Some(&spec(Some("a"), 0, 15)), "a", at(100)),
            Claim::Renew
        );
    }

    #[test]
    fn foreign_lease_is_respected_until_it_expires() {
        let held = spec(Some("b"), 100, 15);
        assert_eq!(
            claim(Some(&held), "a", at(110)),
            Claim::HeldBy("b".to_owned())
        );
        assert_eq!(
            claim(Some(&held), "a", at(115)),
            Claim::HeldBy("b".to_owned())
        );
        assert_eq!(claim(Some(&held), "a", at(116)), Claim::Acquire);
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
            let result = try_lead(&Api::namespaced(client, "ops"), &settings()).await;
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
            let expired = Timestamp::now() - SignedDuration::from_secs(60);
            let (result, calls) = round(Some(lease("b", expired, 1)), StatusCode::OK).await;
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
            let expired = Timestamp::now() - SignedDuration::from_secs(60);
            let (result, _) = round(Some(lease("b", expired, 1)), StatusCode::CONFLICT).await;
            assert!(!result.unwrap());
        }
    }
}
