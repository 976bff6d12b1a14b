//! Secrets a reconcile reads: the ones the spec refers to (external URLs, CAs, JWT and API
//! keys) must exist; the generated ones (PostgreSQL password, JWT secret) keep their values.
//!
//! The managed PostgreSQL's credentials live as long as its data: once the data volume claim
//! exists, the credentials Secret is also owned by that claim, so deleting the ChatCluster
//! with `pvcRetention: Retain` keeps both, and a ChatCluster created again with the same name
//! finds the password its database was initialised with.

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::Api;
use kube::{Resource, ResourceExt};
use rand::distr::{Alphanumeric, SampleString};

use super::Context;
use crate::crd::{AuthMode, ChatCluster, SecretKeyRef};
use crate::error::{Error, Result};

/// Length of generated passwords and secrets (alphanumeric, URL-safe).
const GENERATED_SECRET_LEN: usize = 32;

/// Every Secret key the spec names.
pub(crate) fn referenced_secrets(cluster: &ChatCluster) -> impl Iterator<Item = &SecretKeyRef> {
    let spec = &cluster.spec;
    let jwt = match spec.auth.mode {
        AuthMode::Jwt => spec.auth.jwt_secret_ref.as_ref(),
        AuthMode::None => None,
    };
    let redis = spec.redis.external.as_ref();
    let postgres = spec.postgres.external.as_ref();
    [
        redis.map(|e| &e.url_secret_ref),
        redis.and_then(|e| e.ca_secret_ref.as_ref()),
        postgres.map(|e| &e.url_secret_ref),
        postgres.and_then(|e| e.ca_secret_ref.as_ref()),
        jwt,
        spec.auth.api_key_secret_ref.as_ref(),
    ]
    .into_iter()
    .flatten()
}

/// A Secret by name, `None` when it does not exist.
pub(crate) async fn get_secret(
    ctx: &Context,
    namespace: &str,
    name: &str,
) -> Result<Option<Secret>> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    Ok(api.get_opt(name).await?)
}

/// The value of a referenced Secret key; a missing Secret or key is [`Error::MissingSecret`].
pub(crate) async fn secret_value(
    ctx: &Context,
    namespace: &str,
    reference: &SecretKeyRef,
) -> Result<String> {
    let missing = || Error::MissingSecret {
        name: reference.name.clone(),
        key: reference.key.clone(),
    };
    let secret = get_secret(ctx, namespace, &reference.name)
        .await?
        .ok_or_else(missing)?;
    let bytes = secret
        .data
        .and_then(|mut data| data.remove(&reference.key))
        .ok_or_else(missing)?;
    String::from_utf8(bytes.0).map_err(|_| missing())
}

/// The value under `key` of a generated Secret, or a fresh random one when there is none yet.
pub(crate) fn existing_or_random(secret: Option<&Secret>, key: &str) -> String {
    secret
        .and_then(|s| s.data.as_ref()?.get(key))
        .and_then(|ByteString(bytes)| String::from_utf8(bytes.clone()).ok())
        .unwrap_or_else(|| Alphanumeric.sample_string(&mut rand::rng(), GENERATED_SECRET_LEN))
}

/// Makes `secret` also owned by the data volume `claim` (not as controller), so the garbage
/// collector keeps it while the claim exists.
pub(crate) fn bind_to_claim(secret: &mut Secret, claim: &PersistentVolumeClaim) {
    let Some(uid) = claim.uid() else {
        return;
    };
    let owner = OwnerReference {
        api_version: PersistentVolumeClaim::api_version(&()).into_owned(),
        kind: PersistentVolumeClaim::kind(&()).into_owned(),
        name: claim.name_any(),
        uid,
        controller: None,
        block_owner_deletion: None,
    };
    secret
        .metadata
        .owner_references
        .get_or_insert_with(Vec::new)
        .push(owner);
}
