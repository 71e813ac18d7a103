//! tether-operator's metrics, as controller-rs shapes them: reconciles by
//! result and how long they took, failures by a bounded kind, what the
//! ProxiedClusters say (conditions, connection, certificate expiry, read
//! from the controller's cache at each scrape), leadership and the watch's
//! health. Labels are bounded by the number of ProxiedClusters, never by
//! request data.

use std::time::Instant;

use kube::ResourceExt;
use kube::runtime::reflector::Store;
use prometheus::{
    HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use crate::crd::ProxiedCluster;
use crate::reconcile::Error;

pub struct OperatorMetrics {
    registry: Registry,
    reconciliations: IntCounterVec,
    duration: HistogramVec,
    failures: IntCounterVec,
    controller_errors: IntCounterVec,
    pub leader: IntGauge,
    clusters: IntGaugeVec,
    connected: IntGaugeVec,
    certificate_expiry: IntGaugeVec,
}

/// Per-cluster labels: the object, and the id tunnel URLs use. Not
/// `namespace`: Prometheus gives every target that label (the operator
/// pod's namespace), and a scraped one would be renamed.
const CLUSTER_LABELS: &[&str] = &["proxiedcluster_namespace", "proxiedcluster", "cluster"];

impl OperatorMetrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let reconciliations = IntCounterVec::new(
            Opts::new(
                "tether_operator_reconciliations_total",
                "ProxiedCluster reconciles, by result: ok or error.",
            ),
            &["result"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "tether_operator_reconcile_duration_seconds",
                "How long a ProxiedCluster reconcile took, by result.",
            )
            .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            &["result"],
        )?;
        let failures = IntCounterVec::new(
            Opts::new(
                "tether_operator_reconcile_errors_total",
                "Failed reconciles, by kind: kube, pki, bundle, finalizer, missing_key, signing.",
            ),
            &["kind"],
        )?;
        let controller_errors = IntCounterVec::new(
            Opts::new(
                "tether_operator_controller_errors_total",
                "Errors of the controller itself, by kind: watch (the ProxiedCluster or Secret watch failed and restarts), object_not_found, runner.",
            ),
            &["kind"],
        )?;
        let leader = IntGauge::new(
            "tether_operator_leader",
            "1 while this replica holds the lease and reconciles, 0 on standby.",
        )?;
        let clusters = IntGaugeVec::new(
            Opts::new(
                "tether_operator_proxied_clusters",
                "ProxiedClusters by condition type and status (True, False, Unknown).",
            ),
            &["condition", "status"],
        )?;
        let connected = IntGaugeVec::new(
            Opts::new(
                "tether_operator_agent_connected",
                "1 when a cluster's agent holds a session with some tether-server replica (the operator's summary of every replica's report), 0 otherwise.",
            ),
            CLUSTER_LABELS,
        )?;
        let certificate_expiry = IntGaugeVec::new(
            Opts::new(
                "tether_operator_agent_certificate_expiry_timestamp_seconds",
                "When the agent certificate in use expires (Unix time): the one the agent presented last, or the bundle's until it connects.",
            ),
            CLUSTER_LABELS,
        )?;
        registry.register(Box::new(reconciliations.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(failures.clone()))?;
        registry.register(Box::new(controller_errors.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        registry.register(Box::new(clusters.clone()))?;
        registry.register(Box::new(connected.clone()))?;
        registry.register(Box::new(certificate_expiry.clone()))?;
        Ok(Self {
            registry,
            reconciliations,
            duration,
            failures,
            controller_errors,
            leader,
            clusters,
            connected,
            certificate_expiry,
        })
    }

    /// Counts one reconcile that began at `started`.
    pub fn reconciled<T>(&self, started: Instant, outcome: &Result<T, Error>) {
        let result = match outcome {
            Ok(_) => "ok",
            Err(err) => {
                self.failures.with_label_values(&[err.metric_label()]).inc();
                "error"
            }
        };
        self.reconciliations.with_label_values(&[result]).inc();
        self.duration
            .with_label_values(&[result])
            .observe(started.elapsed().as_secs_f64());
    }

    /// Counts an error of the controller that is not a reconcile's.
    pub fn controller_error(&self, kind: &'static str) {
        self.controller_errors.with_label_values(&[kind]).inc();
    }

    /// The text exposition, with the per-cluster gauges read from `store`.
    pub fn render(&self, store: &Store<ProxiedCluster>) -> String {
        self.clusters.reset();
        self.connected.reset();
        self.certificate_expiry.reset();
        for pc in store.state() {
            let namespace = pc.namespace().unwrap_or_default();
            let name = pc.name_any();
            let labels = [namespace.as_str(), name.as_str(), &pc.cluster_id()];
            let Some(status) = &pc.status else {
                continue;
            };
            for condition in &status.conditions {
                self.clusters
                    .with_label_values(&[condition.type_.as_str(), condition.status.as_str()])
                    .inc();
            }
            let connected = status.connection.as_ref().is_some_and(|c| c.connected);
            self.connected
                .with_label_values(&labels)
                .set(i64::from(connected));
            if let Some(expiry) = status
                .certificates
                .as_ref()
                .and_then(|c| c.agent_not_after.as_ref())
            {
                self.certificate_expiry
                    .with_label_values(&labels)
                    .set(expiry.0.as_second());
            }
        }
        tether::metrics_port::text_format(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconciles_and_failures_are_counted_by_bounded_labels() {
        let metrics = OperatorMetrics::new().expect("metrics");
        metrics.reconciled(Instant::now(), &Ok::<(), Error>(()));
        metrics.reconciled::<()>(Instant::now(), &Err(Error::MissingObjectKey("namespace")));
        metrics.controller_error("watch");
        let mut writer = kube::runtime::reflector::store::Writer::<ProxiedCluster>::default();
        let pc: ProxiedCluster = serde_json::from_value(serde_json::json!({
            "apiVersion": "tether.dev/v1alpha1", "kind": "ProxiedCluster",
            "metadata": {"name": "acme", "namespace": "tenants"},
            "spec": {"clusterId": "acme-prod", "targetAddress": "10.0.0.1:443"},
            "status": {"conditions": [{"type": "Ready", "status": "False", "reason": "X",
                    "message": "", "lastTransitionTime": "2026-12-03T00:00:00Z"}],
                "connection": {"connected": true},
                "certificates": {"agentNotAfter": "2027-01-01T00:00:00Z"}}
        }))
        .expect("pc");
        writer.apply_watcher_event(&kube::runtime::watcher::Event::Apply(pc));
        let text = metrics.render(&writer.as_reader());
        for line in [
            "tether_operator_reconciliations_total{result=\"ok\"} 1",
            "tether_operator_reconciliations_total{result=\"error\"} 1",
            "tether_operator_reconcile_errors_total{kind=\"missing_key\"} 1",
            "tether_operator_controller_errors_total{kind=\"watch\"} 1",
            "tether_operator_reconcile_duration_seconds_count{result=\"ok\"} 1",
            "tether_operator_leader 0",
            r#"tether_operator_proxied_clusters{condition="Ready",status="False"} 1"#,
            r#"tether_operator_agent_connected{cluster="acme-prod",proxiedcluster="acme",proxiedcluster_namespace="tenants"} 1"#,
            r#"tether_operator_agent_certificate_expiry_timestamp_seconds{cluster="acme-prod",proxiedcluster="acme",proxiedcluster_namespace="tenants"} 1798761600"#,
        ] {
            assert!(text.contains(line), "{line} missing in:\n{text}");
        }
    }
}
