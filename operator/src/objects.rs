//! Writing objects only when they differ, so a reconcile with nothing to do
//! makes no writes.

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{DeleteParams, PostParams};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Created,
    Updated,
    Unchanged,
}

impl Applied {
    pub fn changed(self) -> bool {
        self != Applied::Unchanged
    }
}

/// Whether `current` already is `desired` in everything the operator sets.
fn same(current: &Secret, desired: &Secret) -> bool {
    let labels_ok = desired.metadata.labels.as_ref().is_none_or(|want| {
        current
            .metadata
            .labels
            .as_ref()
            .is_some_and(|have| want.iter().all(|(k, v)| have.get(k) == Some(v)))
    });
    let annotations_ok = desired.metadata.annotations.as_ref().is_none_or(|want| {
        current
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|have| want.iter().all(|(k, v)| have.get(k) == Some(v)))
    });
    labels_ok
        && annotations_ok
        && current.data == desired.data
        && current.type_ == desired.type_
        && current.metadata.owner_references == desired.metadata.owner_references
}

/// Creates `desired`, or replaces the existing Secret (optimistically, on its
/// resourceVersion) when it differs. `current` is what a GET returned.
pub async fn ensure_secret(
    api: &Api<Secret>,
    current: Option<Secret>,
    mut desired: Secret,
) -> Result<Applied, kube::Error> {
    let name = desired.metadata.name.clone().unwrap_or_default();
    match current {
        None => {
            api.create(&PostParams::default(), &desired).await?;
            Ok(Applied::Created)
        }
        Some(current) if same(&current, &desired) => Ok(Applied::Unchanged),
        Some(current) => {
            desired.metadata.resource_version = current.metadata.resource_version;
            api.replace(&name, &PostParams::default(), &desired).await?;
            Ok(Applied::Updated)
        }
    }
}

/// Deletes a Secret if it exists. Returns whether it did.
pub async fn delete_secret(api: &Api<Secret>, name: &str) -> Result<bool, kube::Error> {
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
        Err(err) => Err(err),
    }
}

/// A Secret's value as UTF-8.
pub fn secret_text(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()?
        .get(key)
        .and_then(|v| String::from_utf8(v.0.clone()).ok())
}
