//! Scenario tests in the style of controller-rs: `reconcile` against a
//! `tower_test` mock API, asserting the exact calls each branch makes
//! (method, path, body) and nothing more.

use std::time::{Duration, SystemTime};

use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::store::Writer;
use serde_json::{Value, json};
use std::sync::Arc;
use tether::pki::CertificateAuthority;
use tether_operator::argocd::ClientTls;
use tether_operator::crd::ProxiedCluster;
use tether_operator::pki::GlobalPki;
use tether_operator::reconcile::{Context, reconcile};
use tether_operator::settings::Settings;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

const PC_PATH: &str = "/apis/tether.dev/v1alpha1/namespaces/tenants/proxiedclusters/acme";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/tenants/events";
const TENANT_SECRETS: &str = "/api/v1/namespaces/tenants/secrets";
const SERVER_SECRETS: &str = "/api/v1/namespaces/tether-system/secrets";
const ARGOCD_SECRETS: &str = "/api/v1/namespaces/argocd/secrets";

fn context() -> (Arc<Context>, Handle) {
    tether::install_crypto_provider();
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let mut settings = Settings::defaults();
    settings.public_url = Some("wss://tether.example.com:8443".into());
    let ca = CertificateAuthority::generate("scenario CA", Duration::from_secs(3600)).expect("CA");
    let pki = GlobalPki {
        server_ca_pem: ca.cert_pem().to_owned(),
        argocd: ClientTls {
            ca_pem: ca.cert_pem().into(),
            cert_pem: "CERT".into(),
            key_pem: "KEY".into(),
        },
        ca,
        renew_at: SystemTime::now() + Duration::from_secs(3600),
    };
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "tether-operator".into(),
            instance: None,
        },
    );
    let store = Writer::<ProxiedCluster>::default().as_reader();
    (
        Arc::new(Context::new(client, settings, pki, recorder, store)),
        handle,
    )
}

fn proxied(spec: Value, metadata: Value) -> Arc<ProxiedCluster> {
    let mut meta = json!({"name": "acme", "namespace": "tenants", "uid": "uid-acme", "generation": 3,
        "resourceVersion": "10", "creationTimestamp": "2026-01-01T00:00:00Z"});
    if let (Some(meta), Some(extra)) = (meta.as_object_mut(), metadata.as_object()) {
        meta.extend(extra.clone());
    }
    Arc::new(
        serde_json::from_value(
            json!({"apiVersion": "tether.dev/v1alpha1", "kind": "ProxiedCluster",
            "metadata": meta, "spec": spec}),
        )
        .expect("ProxiedCluster"),
    )
}

/// Answers the next request after checking its method and path; returns its body.
async fn expect(
    handle: &mut Handle,
    method: Method,
    path: &str,
    status: StatusCode,
    answer: Value,
) -> Value {
    let (request, respond) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .unwrap_or_else(|_| panic!("no request; expected {method} {path}"))
        .expect("service alive");
    assert_eq!(
        (request.method(), request.uri().path()),
        (&method, path),
        "unexpected call"
    );
    let body = request.into_body().collect_bytes().await.expect("body");
    let sent = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body).expect("JSON body")
    };
    respond.send_response(
        Response::builder()
            .status(status)
            .body(Body::from(answer.to_string().into_bytes()))
            .expect("response"),
    );
    sent
}

/// The reconciler records a Kubernetes event; returns it.
async fn expect_event(handle: &mut Handle) -> Value {
    expect(
        handle,
        Method::POST,
        EVENTS,
        StatusCode::CREATED,
        json!({"metadata": {"name": "e"}}),
    )
    .await
}

/// The reconciler looks `name` up in `collection`, finds nothing and
/// creates it; returns what it created.
async fn expect_creation(handle: &mut Handle, collection: &str, name: &str) -> Value {
    expect(
        handle,
        Method::GET,
        &format!("{collection}/{name}"),
        StatusCode::NOT_FOUND,
        not_found(),
    )
    .await;
    expect(
        handle,
        Method::POST,
        collection,
        StatusCode::CREATED,
        json!({"metadata": {"name": name}}),
    )
    .await
}

fn not_found() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"})
}

async fn no_more_calls(handle: &mut Handle) {
    let extra = tokio::time::timeout(Duration::from_millis(200), handle.next_request()).await;
    if let Ok(Some((request, _))) = extra {
        panic!(
            "unexpected extra call: {} {}",
            request.method(),
            request.uri().path()
        );
    }
}

#[tokio::test]
async fn a_new_object_first_gets_the_finalizer_and_nothing_else() {
    let (ctx, mut handle) = context();
    let pc = proxied(json!({}), json!({}));
    let answer = serde_json::to_value(&*pc).expect("json");
    let (result, sent) = tokio::join!(
        reconcile(pc, ctx),
        expect(&mut handle, Method::PATCH, PC_PATH, StatusCode::OK, answer)
    );
    assert_eq!(
        sent,
        json!([{"op": "test", "path": "/metadata/finalizers", "value": null},
               {"op": "add", "path": "/metadata/finalizers", "value": ["tether.dev/cleanup"]}])
    );
    assert_eq!(result.expect("reconciled"), Action::await_change());
    no_more_calls(&mut handle).await;
}

#[tokio::test]
async fn an_invalid_spec_writes_only_a_false_condition_and_an_event() {
    let (ctx, mut handle) = context();
    let pc = proxied(
        json!({"publicUrl": "https://not-a-websocket"}),
        json!({"finalizers": ["tether.dev/cleanup"]}),
    );
    let answer = serde_json::to_value(&*pc).expect("json");
    let calls = async {
        let status = expect(
            &mut handle,
            Method::PATCH,
            &format!("{PC_PATH}/status"),
            StatusCode::OK,
            answer,
        )
        .await;
        let event = expect_event(&mut handle).await;
        (status, event)
    };
    let (result, (status, event)) = tokio::join!(reconcile(pc, ctx), calls);
    assert_eq!(result.expect("reconciled"), Action::await_change());
    let ready = &status["status"]["conditions"][0];
    assert_eq!(
        (
            ready["type"].as_str(),
            ready["status"].as_str(),
            ready["reason"].as_str()
        ),
        (Some("Ready"), Some("False"), Some("InvalidSpec"))
    );
    assert!(
        ready["message"]
            .as_str()
            .expect("message")
            .contains("not ws(s)://")
    );
    assert_eq!(ready["observedGeneration"], 3);
    assert_eq!(status["status"]["observedGeneration"], 3);
    assert!(
        status["status"]["bundle"].is_null(),
        "no bundle for an invalid spec"
    );
    assert_eq!(event["reason"], "InvalidSpec");
    assert_eq!(event["type"], "Warning");
    no_more_calls(&mut handle).await;
}

#[tokio::test]
async fn deletion_removes_the_argocd_secret_and_the_server_entry_then_the_finalizer() {
    let (ctx, mut handle) = context();
    let pc = proxied(
        json!({}),
        json!({"finalizers": ["tether.dev/cleanup"], "deletionTimestamp": "2026-11-24T00:00:00Z"}),
    );
    let argocd_secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "tether-acme", "namespace": "argocd",
        "labels": {"tether.dev/owner-namespace": "tenants", "tether.dev/owner-name": "acme"}}});
    let clusters = json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "tether-clusters", "namespace": "tether-system", "resourceVersion": "7"},
        "data": {"clusters.json": base64_json(&json!([
            {"id": "acme", "tokenSha256": "aa", "targetAddr": "kubernetes.default.svc:443"},
            {"id": "other", "tokenSha256": "bb", "targetAddr": "kubernetes.default.svc:443"}]))}});
    let answer = serde_json::to_value(&*pc).expect("json");
    let calls = async {
        expect(
            &mut handle,
            Method::GET,
            &format!("{ARGOCD_SECRETS}/tether-acme"),
            StatusCode::OK,
            argocd_secret.clone(),
        )
        .await;
        expect(
            &mut handle,
            Method::DELETE,
            &format!("{ARGOCD_SECRETS}/tether-acme"),
            StatusCode::OK,
            argocd_secret,
        )
        .await;
        expect(
            &mut handle,
            Method::GET,
            &format!("{SERVER_SECRETS}/tether-clusters"),
            StatusCode::OK,
            clusters.clone(),
        )
        .await;
        let replaced = expect(
            &mut handle,
            Method::PUT,
            &format!("{SERVER_SECRETS}/tether-clusters"),
            StatusCode::OK,
            clusters,
        )
        .await;
        expect_event(&mut handle).await;
        let unfinalized = expect(&mut handle, Method::PATCH, PC_PATH, StatusCode::OK, answer).await;
        (replaced, unfinalized)
    };
    let (result, (replaced, unfinalized)) = tokio::join!(reconcile(pc, ctx), calls);
    assert_eq!(result.expect("reconciled"), Action::await_change());
    assert_eq!(
        replaced["metadata"]["resourceVersion"], "7",
        "optimistic concurrency on the shared Secret"
    );
    let entries = decode_json(&replaced["data"]["clusters.json"]);
    assert_eq!(
        entries,
        json!([{"id": "other", "tokenSha256": "bb", "targetAddr": "kubernetes.default.svc:443"}])
    );
    assert_eq!(
        unfinalized[1],
        json!({"op": "remove", "path": "/metadata/finalizers/0"})
    );
    no_more_calls(&mut handle).await;
}

#[tokio::test]
async fn deletion_leaves_an_argocd_secret_it_does_not_own() {
    let (ctx, mut handle) = context();
    let pc = proxied(
        json!({}),
        json!({"finalizers": ["tether.dev/cleanup"], "deletionTimestamp": "2026-11-24T00:00:00Z"}),
    );
    let foreign = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "tether-acme", "namespace": "argocd",
        "labels": {"tether.dev/owner-namespace": "someone-else", "tether.dev/owner-name": "acme"}}});
    let answer = serde_json::to_value(&*pc).expect("json");
    let calls = async {
        expect(
            &mut handle,
            Method::GET,
            &format!("{ARGOCD_SECRETS}/tether-acme"),
            StatusCode::OK,
            foreign,
        )
        .await;
        expect_creation(&mut handle, SERVER_SECRETS, "tether-clusters").await;
        expect_event(&mut handle).await;
        expect(&mut handle, Method::PATCH, PC_PATH, StatusCode::OK, answer).await;
    };
    let (result, ()) = tokio::join!(reconcile(pc, ctx), calls);
    assert_eq!(result.expect("reconciled"), Action::await_change());
    no_more_calls(&mut handle).await;
}

#[tokio::test]
async fn first_apply_issues_token_certificate_config_registration_and_bundle() {
    let (ctx, mut handle) = context();
    let pc = proxied(json!({}), json!({"finalizers": ["tether.dev/cleanup"]}));
    let as_stored = serde_json::to_value(&*pc).expect("json");
    let calls = async {
        let token = expect_creation(&mut handle, TENANT_SECRETS, "acme-tether-token").await;
        expect_event(&mut handle).await;
        let cert = expect_creation(&mut handle, TENANT_SECRETS, "acme-tether-agent-tls").await;
        expect_event(&mut handle).await;
        let config = expect_creation(&mut handle, SERVER_SECRETS, "tether-clusters").await;
        let argocd = expect_creation(&mut handle, ARGOCD_SECRETS, "tether-acme").await;
        expect_event(&mut handle).await;
        let bundle = expect_creation(&mut handle, TENANT_SECRETS, "acme-tether-bundle").await;
        expect_event(&mut handle).await;
        let status = expect(
            &mut handle,
            Method::PATCH,
            &format!("{PC_PATH}/status"),
            StatusCode::OK,
            as_stored,
        )
        .await;
        (token, cert, config, argocd, bundle, status)
    };
    let (result, (token, cert, config, argocd, bundle, status)) =
        tokio::join!(reconcile(pc, ctx), calls);
    let action = result.expect("reconciled");
    assert_ne!(
        action,
        Action::await_change(),
        "requeued for certificate renewal"
    );

    assert_eq!(token["metadata"]["name"], "acme-tether-token");
    assert_eq!(token["metadata"]["ownerReferences"][0]["uid"], "uid-acme");
    let token_text = decode(&token["data"]["token"]);
    assert_eq!(token_text.len(), 64);
    assert_eq!(cert["type"], "kubernetes.io/tls");
    assert_eq!(
        cert["metadata"]["ownerReferences"][0]["kind"],
        "ProxiedCluster"
    );
    let entries = decode_json(&config["data"]["clusters.json"]);
    assert_eq!(entries[0]["id"], "acme");
    assert_eq!(entries[0]["tokenSha256"].as_str().map(str::len), Some(64));
    assert_eq!(
        argocd["metadata"]["labels"]["argocd.argoproj.io/secret-type"],
        "cluster"
    );
    assert!(
        argocd["metadata"]["ownerReferences"].is_null(),
        "no owner reference across namespaces"
    );
    assert!(decode(&bundle["data"]["bundle.yaml"]).contains("kind: Deployment"));
    let conditions: Vec<(String, String)> = status["status"]["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .map(|c| {
            (
                c["type"].as_str().unwrap_or("").to_owned(),
                c["status"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        conditions,
        [
            ("TokenIssued".into(), "True".into()),
            ("CertificatesIssued".into(), "True".into()),
            ("ArgoCDRegistered".into(), "True".into()),
            ("BundleReady".into(), "True".into()),
            ("Ready".into(), "True".into()),
            ("AgentConnected".into(), "False".into()),
            ("AgentCredentialsExpired".into(), "False".into()),
        ]
    );
    assert_eq!(
        status["status"]["connection"],
        Value::Null,
        "no replica reported a session: no connection summary"
    );
    assert_eq!(
        status["status"]["agentSessions"],
        serde_json::json!({}),
        "the operator writes no replica's session entry"
    );
    no_more_calls(&mut handle).await;
}

fn decode(value: &Value) -> String {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(value.as_str().expect("base64 string"))
        .expect("base64");
    String::from_utf8(bytes).expect("utf-8")
}

fn decode_json(value: &Value) -> Value {
    serde_json::from_str(&decode(value)).expect("JSON")
}

fn base64_json(value: &Value) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(value.to_string())
}
