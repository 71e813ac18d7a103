//! tether-operator: reconciles `ProxiedCluster` resources into agent
//! tokens, certificates, ArgoCD cluster Secrets, the server's clusters
//! configuration and agent install bundles.

pub mod argocd;
pub mod bundle;
pub mod cli;
pub mod connection;
pub mod crd;
pub mod fake_api;
#[doc(hidden)]
pub mod harness;
pub mod leader;
pub mod metrics;
pub mod objects;
pub mod pki;
pub mod reconcile;
pub mod settings;
pub mod signer;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::StreamExt;
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{Controller, watcher};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crd::ProxiedCluster;
use reconcile::Context;
use settings::Settings;

/// Runs the controller until `stop` (or until leadership is lost, which is
/// an error: the process exits and its replacement campaigns again).
/// Probes: `/healthz` while the process runs; `/readyz` once it reconciles
/// or stands by as a non-leader replica.
async fn serve_health(
    addr: std::net::SocketAddr,
    ready: Arc<AtomicBool>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let make = move |_conn| {
        let ready = ready.clone();
        hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
            let response = match request.uri().path() {
                "/healthz" => tether::http::text(http::StatusCode::OK, "ok"),
                "/readyz" if ready.load(Ordering::Relaxed) => {
                    tether::http::text(http::StatusCode::OK, "ok")
                }
                "/readyz" => tether::http::text(http::StatusCode::SERVICE_UNAVAILABLE, "starting"),
                _ => tether::http::text(http::StatusCode::NOT_FOUND, "not found"),
            };
            std::future::ready(Ok::<_, std::convert::Infallible>(response))
        })
    };
    let grace = std::time::Duration::from_secs(1);
    tokio::spawn(tether::listen::serve(listener, None, make, stop, grace));
    Ok(())
}

pub async fn run(
    client: Client,
    settings: Settings,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let ready = Arc::new(AtomicBool::new(false));
    serve_health(settings.health_addr, ready.clone(), stop.clone()).await?;
    let metrics = Arc::new(metrics::OperatorMetrics::new()?);
    let proxied = Api::<ProxiedCluster>::all(client.clone());
    let owned = Api::<Secret>::all(client.clone());
    let controller = Controller::new(proxied, watcher::Config::default()).owns(
        owned,
        watcher::Config::default().labels("app.kubernetes.io/managed-by=tether-operator"),
    );
    // Served from the start: a standby replica reports leader 0.
    let (rendered, store) = (metrics.clone(), controller.store());
    tether::metrics_port::serve(
        &settings.metrics,
        Arc::new(move || rendered.render(&store)),
        Some(client.clone()),
        stop.clone(),
    )
    .await?;
    let identity = settings
        .identity
        .clone()
        .unwrap_or_else(|| format!("tether-operator-{}", std::process::id()));
    let elector = settings.leader_election.then(|| {
        leader::LeaderElector::new(
            Api::<Lease>::namespaced(client.clone(), &settings.namespace),
            &settings.lease_name,
            &identity,
            settings.lease_duration,
        )
    });
    if let Some(elector) = &elector {
        // A standby replica is healthy and ready: it takes over on failover.
        ready.store(true, Ordering::Relaxed);
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = elector.acquire() => {}
        }
    }
    metrics.leader.set(1);
    let pki = pki::ensure_global(&client, &settings).await?;
    ready.store(true, Ordering::Relaxed);
    let reporter = Reporter {
        controller: "tether-operator".into(),
        instance: Some(identity),
    };
    let recorder = Recorder::new(client.clone(), reporter);
    let ctx = Arc::new(Context::new(
        client,
        settings,
        pki,
        recorder,
        controller.store(),
    ));
    tokio::spawn(reconcile::refresh_pki(ctx.clone(), stop.clone()));
    let graceful = stop.clone();
    // Agent certificate renewals: only requests for tether's signer.
    let requests = Api::<CertificateSigningRequest>::all(ctx.client.clone());
    let signer = Controller::new(
        requests,
        watcher::Config::default().fields(&format!(
            "spec.signerName={}",
            tether::server::signing::SIGNER_NAME
        )),
    )
    .graceful_shutdown_on({
        let stop = stop.clone();
        async move { stop.cancelled().await }
    })
    .run(signer::reconcile, signer::error_policy, ctx.clone())
    .for_each(|result| async move {
        if let Err(err) = result {
            warn!(error = %err, "certificate signing error");
        }
    });
    let timed = metrics.clone();
    let timed_reconcile = move |pc, ctx| {
        let metrics = timed.clone();
        async move {
            let started = std::time::Instant::now();
            let outcome = reconcile::reconcile(pc, ctx).await;
            metrics.reconciled(started, &outcome);
            outcome
        }
    };
    let controller = controller
        .graceful_shutdown_on(async move { graceful.cancelled().await })
        .run(timed_reconcile, reconcile::error_policy, ctx)
        .for_each(|result| {
            let metrics = metrics.clone();
            async move {
                use kube::runtime::controller::Error as ControllerError;
                match result {
                    Ok((object, _)) => {
                        info!(object = %object.name, namespace = ?object.namespace, "reconciled")
                    }
                    // Counted by the timing wrapper.
                    Err(ControllerError::ReconcilerFailed(err, _)) => {
                        warn!(error = %err, "reconcile error")
                    }
                    Err(err) => {
                        metrics.controller_error(match &err {
                            ControllerError::QueueError(_) => "watch",
                            ControllerError::ObjectNotFound(_) => "object_not_found",
                            _ => "runner",
                        });
                        warn!(error = %err, "controller error")
                    }
                }
            }
        });
    let controller = async move {
        tokio::join!(controller, signer);
    };
    match &elector {
        Some(elector) => tokio::select! {
            _ = controller => Ok(()),
            lost = elector.hold() => Err(lost.into()),
        },
        None => {
            controller.await;
            Ok(())
        }
    }
}
