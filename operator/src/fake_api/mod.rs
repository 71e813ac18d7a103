//! A small stateful Kubernetes API server, in memory, on 127.0.0.1, so the
//! real `Controller`, `finalizer()` and event `Recorder` run end to end in
//! tests and benchmarks without a cluster, and `make demo` runs the real
//! kubectl, operator, server and agent against it.
//!
//! It serves any resource path (`/api/v1/...`, `/apis/{group}/{version}/...`)
//! generically: GET, LIST with label selectors, streaming WATCH from a
//! resourceVersion, POST, PUT with resourceVersion conflicts (409), PATCH
//! (JSON, merge, strategic-as-merge, apply-as-merge), DELETE with
//! finalizers (deletionTimestamp) and owner-reference cascade, and a status
//! subresource for custom resources. For kubectl it also answers discovery
//! and OpenAPI ([`discovery`]), prints Tables ([`table`]), tells a caller
//! who it is (SelfSubjectReview), and lists `events.k8s.io` Events as core
//! ones, as kube-apiserver does. Optionally it serves HTTPS and accepts
//! only known bearer tokens. It is not a validating server: it stores what
//! it is sent.

pub mod discovery;
pub mod table;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::{Value, json};
use tether::http::{Body, BoxError, full};
use tether::tls::{ReloadingServerConfig, ServerTlsFiles, TlsError};
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// Where an object lives.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    /// `/api/v1/secrets`, `/apis/tether.dev/v1alpha1/proxiedclusters`.
    collection: String,
    namespace: String,
    name: String,
}

#[derive(Debug, Clone)]
struct Change {
    resource_version: u64,
    kind: &'static str,
    key: Key,
    object: Value,
}

/// One request as received, for assertions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub method: Method,
    pub path: String,
    /// Who the bearer token authenticated; `None` without authentication
    /// or for a refused token.
    pub user: Option<String>,
}

/// How the server is reached and who may call it.
#[derive(Debug, Default)]
pub struct Options {
    /// HTTPS with this certificate; plain HTTP without.
    pub tls: Option<ServerTlsFiles>,
    /// Bearer tokens and the user each one authenticates. Empty: every
    /// caller is served (tests); otherwise other callers get 401.
    pub users: Vec<(String, String)>,
}

#[derive(Default)]
struct State {
    objects: BTreeMap<Key, Value>,
    resource_version: u64,
    uid: u64,
    log: Vec<Change>,
    calls: Vec<Call>,
    /// Status codes to answer the next writes to matching paths with
    /// (fault injection): (path fragment, code).
    fail_writes: Vec<(String, u16)>,
}

pub struct FakeApi {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

/// What one request needs besides itself.
struct Shared {
    state: Mutex<State>,
    changes: broadcast::Sender<Change>,
    stop: CancellationToken,
    users: Vec<(String, String)>,
}

/// A parsed request path.
#[derive(Debug)]
struct Route {
    collection: String,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

fn parse_route(path: &str) -> Option<Route> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (base, rest) = match segments.as_slice() {
        ["api", version, rest @ ..] => (format!("/api/{version}"), rest),
        ["apis", group, version, rest @ ..] => (format!("/apis/{group}/{version}"), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, plural, tail @ ..] => {
            (Some((*ns).to_owned()), [&[*plural][..], tail].concat())
        }
        other => (None, other.to_vec()),
    };
    let (plural, name, sub) = match rest.as_slice() {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some((*name).to_owned()), None),
        [plural, name, sub] => (*plural, Some((*name).to_owned()), Some(*sub)),
        _ => return None,
    };
    Some(Route {
        collection: format!("{base}/{plural}"),
        namespace,
        name,
        status: sub == Some("status"),
    })
}

fn query_param(query: &str, name: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| {
            v.replace("%3D", "=")
                .replace("%2C", ",")
                .replace("%2F", "/")
        })
}

/// Field selectors (`a.b=c`, `a.b==c`, `a.b!=c`, comma-joined) on any
/// field; a missing field reads as the empty string, as kube-apiserver's
/// `spec.nodeName=` does.
fn matches_fields(object: &Value, selector: &str) -> bool {
    let field = |path: &str| {
        let value = path.split('.').fold(object, |v, key| &v[key]);
        match value {
            Value::String(s) => s.clone(),
            Value::Null => String::new(),
            other => other.to_string(),
        }
    };
    selector.split(',').filter(|s| !s.is_empty()).all(|term| {
        if let Some((path, value)) = term.split_once("!=") {
            field(path) != value
        } else if let Some((path, value)) = term.split_once('=') {
            field(path) == value.trim_start_matches('=')
        } else {
            true
        }
    })
}

/// Equality-based label selectors: `a=b,c==d,e!=f,g`.
fn matches_labels(object: &Value, selector: &str) -> bool {
    let labels = &object["metadata"]["labels"];
    selector.split(',').filter(|s| !s.is_empty()).all(|term| {
        if let Some((k, v)) = term.split_once("!=") {
            labels[k].as_str() != Some(v)
        } else if let Some((k, v)) = term.split_once('=') {
            labels[k].as_str() == Some(v.trim_start_matches('='))
        } else {
            !labels[term].is_null()
        }
    })
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    tether::http::kube_status(code, reason, message)
}

fn respond(code: StatusCode, value: &Value) -> Response<Body> {
    let mut response = Response::new(full(value.to_string()));
    *response.status_mut() = code;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// Core Events, and `events.k8s.io` ones: one kind of object, two APIs.
const CORE_EVENTS: &str = "/api/v1/events";
const NEW_EVENTS: &str = "/apis/events.k8s.io/v1/events";

/// An `events.k8s.io/v1` Event as the core API shows it (what `kubectl
/// events` and `kubectl describe` read).
fn core_event(event: &Value) -> Value {
    let when = event["eventTime"].clone();
    let last = event["series"]["lastObservedTime"].clone();
    json!({
        "kind": "Event", "apiVersion": "v1", "metadata": event["metadata"],
        "involvedObject": event["regarding"], "reason": event["reason"],
        "message": event["note"], "type": event["type"],
        "source": {"component": event["reportingController"]},
        "reportingComponent": event["reportingController"],
        "reportingInstance": event["reportingInstance"],
        "firstTimestamp": when, "eventTime": when,
        "lastTimestamp": if last.is_null() { when.clone() } else { last },
        "count": event["series"]["count"].as_i64().unwrap_or(1),
    })
}

/// Custom resources here have a status subresource: writes to the main
/// resource keep the old status, writes to /status change only status.
fn has_status_subresource(collection: &str) -> bool {
    collection.starts_with("/apis/tether.dev/")
}

impl State {
    /// The stored CustomResourceDefinitions: a range of the ordered store
    /// (keys sort by collection first), not a scan of every object, since
    /// every request asks.
    fn crds(&self) -> impl Iterator<Item = &Value> {
        let first = Key {
            collection: discovery::CRD_COLLECTION.to_owned(),
            namespace: String::new(),
            name: String::new(),
        };
        self.objects
            .range(first..)
            .take_while(|(k, _)| k.collection == discovery::CRD_COLLECTION)
            .map(|(_, crd)| crd)
    }

    fn commit(
        &mut self,
        kind: &'static str,
        key: Key,
        mut object: Value,
        changes: &broadcast::Sender<Change>,
    ) -> Value {
        self.resource_version += 1;
        object["metadata"]["resourceVersion"] = json!(self.resource_version.to_string());
        let change = Change {
            resource_version: self.resource_version,
            kind,
            key: key.clone(),
            object: object.clone(),
        };
        if kind == "DELETED" {
            self.objects.remove(&key);
        } else {
            self.objects.insert(key, object.clone());
        }
        self.log.push(change.clone());
        let _ = changes.send(change);
        object
    }

    /// Deletes, or marks for deletion while finalizers remain; cascades to
    /// objects owned by the deleted one (as the garbage collector would).
    fn delete(&mut self, key: Key, changes: &broadcast::Sender<Change>) -> Option<Value> {
        let mut object = self.objects.get(&key)?.clone();
        let finalizers = object["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if finalizers {
            if object["metadata"]["deletionTimestamp"].is_null() {
                object["metadata"]["deletionTimestamp"] = json!(now());
                return Some(self.commit("MODIFIED", key, object, changes));
            }
            return Some(object);
        }
        let uid = object["metadata"]["uid"].clone();
        let deleted = self.commit("DELETED", key, object, changes);
        let owned: Vec<Key> = self
            .objects
            .iter()
            .filter(|(_, o)| {
                o["metadata"]["ownerReferences"]
                    .as_array()
                    .is_some_and(|refs| refs.iter().any(|r| r["uid"] == uid))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for child in owned {
            self.delete(child, changes);
        }
        Some(deleted)
    }
}

impl FakeApi {
    /// Plain HTTP on a free loopback port, every caller served.
    pub async fn start() -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        Self::start_with(listener, Options::default())
            .await
            .map_err(std::io::Error::other)
    }

    /// Serves on `listener` as `options` say.
    pub async fn start_with(listener: TcpListener, options: Options) -> Result<Self, TlsError> {
        let addr = listener.local_addr().map_err(|source| TlsError::Read {
            path: "listener".into(),
            source,
        })?;
        let stop = CancellationToken::new();
        let tls = match options.tls {
            Some(files) => Some(ReloadingServerConfig::load(
                files,
                &[b"h2", b"http/1.1"],
                Duration::from_secs(3600),
                stop.clone(),
            )?),
            None => None,
        };
        let (changes, _) = broadcast::channel(65536);
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changes,
            stop,
            users: options.users,
        });
        let api = Self {
            addr,
            shared: shared.clone(),
        };
        let serving = shared.clone();
        let make = move |_conn| {
            let shared = serving.clone();
            hyper::service::service_fn(move |request| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, request).await) }
            })
        };
        tokio::spawn(tether::listen::serve(
            listener,
            tls,
            make,
            shared.stop.clone(),
            Duration::from_millis(100),
        ));
        Ok(api)
    }

    /// A kube client for this server.
    pub fn client(&self) -> kube::Client {
        let uri: http::Uri = format!("http://{}", self.addr).parse().unwrap_or_default();
        let config = kube::Config::new(uri);
        kube::Client::try_from(config)
            .unwrap_or_else(|err| panic!("client for the fake API: {err}"))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every request so far.
    pub fn calls(&self) -> Vec<Call> {
        self.state().calls.clone()
    }

    /// Requests that changed something (not GET), excluding Events and Leases.
    pub fn writes(&self) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| {
                c.method != Method::GET
                    && !c.path.contains("/events")
                    && !c.path.contains("/leases")
            })
            .collect()
    }

    pub fn clear_calls(&self) {
        self.state().calls.clear();
    }

    /// The next writes to paths containing `fragment` answer with these
    /// status codes, in order.
    pub fn fail_next_writes(&self, fragment: &str, codes: &[u16]) {
        let mut state = self.state();
        state
            .fail_writes
            .extend(codes.iter().map(|code| (fragment.to_owned(), *code)));
    }

    /// An object by API path (`/api/v1/namespaces/ns/secrets/name`).
    pub fn get(&self, path: &str) -> Option<Value> {
        let route = parse_route(path)?;
        let key = Key {
            collection: route.collection,
            namespace: route.namespace.unwrap_or_default(),
            name: route.name?,
        };
        self.state().objects.get(&key).cloned()
    }

    /// Objects of a collection (`/api/v1/secrets`), optionally in a namespace.
    pub fn list(&self, collection: &str, namespace: Option<&str>) -> Vec<Value> {
        self.state()
            .objects
            .iter()
            .filter(|(k, _)| {
                k.collection == collection && namespace.is_none_or(|ns| k.namespace == ns)
            })
            .map(|(_, v)| v.clone())
            .collect()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.shared.stop.cancel();
    }
}

/// The user a request's bearer token authenticates, when tokens are
/// checked at all: `Err` for a missing or unknown token.
fn authenticate(
    users: &[(String, String)],
    request: &Request<Incoming>,
) -> Result<Option<String>, ()> {
    if users.is_empty() {
        return Ok(None);
    }
    let presented = tether::http::bearer_token(request.headers()).ok_or(())?;
    users
        .iter()
        .find(|(token, _)| token == presented)
        .map(|(_, user)| Some(user.clone()))
        .ok_or(())
}

async fn handle(shared: &Shared, request: Request<Incoming>) -> Response<Body> {
    let (state, changes, stop) = (&shared.state, &shared.changes, &shared.stop);
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or("").to_owned();
    let header = |name: http::header::HeaderName| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let content_type = header(http::header::CONTENT_TYPE);
    let as_table = table::wanted(&header(http::header::ACCEPT));
    let authenticated = authenticate(&shared.users, &request);
    let body = match request.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => return status(StatusCode::BAD_REQUEST, "BadRequest", "unreadable body"),
    };
    let lock = || state.lock().unwrap_or_else(|p| p.into_inner());
    lock().calls.push(Call {
        method: method.clone(),
        path: path.clone(),
        user: authenticated.clone().ok().flatten(),
    });
    let Ok(user) = authenticated else {
        return status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
    };
    let resources = {
        let st = lock();
        discovery::resources(st.crds())
    };
    if method == Method::GET
        && let Some(document) = discovery::document(&path, &resources)
    {
        return respond(StatusCode::OK, &document);
    }
    let Some(route) = parse_route(&path) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        );
    };
    if route.collection == "/apis/authentication.k8s.io/v1/selfsubjectreviews"
        && method == Method::POST
    {
        let username = user.unwrap_or_else(|| "system:anonymous".to_owned());
        return respond(
            StatusCode::CREATED,
            &json!({"kind": "SelfSubjectReview", "apiVersion": "authentication.k8s.io/v1",
                "metadata": {"creationTimestamp": now()},
                "status": {"userInfo": {"username": username, "groups": ["system:authenticated"]}}}),
        );
    }
    if method != Method::GET {
        let injected = {
            let mut st = lock();
            let position = st
                .fail_writes
                .iter()
                .position(|(fragment, _)| path.contains(fragment.as_str()));
            position.map(|i| st.fail_writes.remove(i).1)
        };
        if let Some(code) = injected {
            let code = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return status(code, "Injected", "fault injected by the test");
        }
    }
    let served = resources
        .iter()
        .find(|r| r.collection() == route.collection);
    let columns = served.map(|r| r.columns.clone()).unwrap_or_default();
    // Typed clients (client-go's) decode `EventList`, not a bare `List`.
    let (list_kind, list_api_version) = served.map_or(("List".to_owned(), "v1".to_owned()), |r| {
        (format!("{}List", r.kind), r.api_version())
    });
    let print = |objects: &[Value], resource_version: u64| {
        table::of(
            objects,
            &columns,
            &resource_version.to_string(),
            k8s_openapi::jiff::Timestamp::now(),
        )
    };
    let namespace = route.namespace.clone().unwrap_or_default();
    match (method.clone(), &route.name) {
        (Method::GET, None)
            if query_param(&query, "watch").is_some_and(|w| w == "true" || w == "1") =>
        {
            watch(state, changes, stop, &route, &query)
        }
        (Method::GET, None) => {
            let selector = query_param(&query, "labelSelector").unwrap_or_default();
            let fields = query_param(&query, "fieldSelector").unwrap_or_default();
            let st = lock();
            let in_scope = |k: &Key, o: &Value| {
                route.namespace.as_ref().is_none_or(|ns| &k.namespace == ns)
                    && matches_labels(o, &selector)
                    && matches_fields(o, &fields)
            };
            let items: Vec<Value> = st
                .objects
                .iter()
                .filter_map(|(k, o)| {
                    let shown = match k.collection.as_str() {
                        c if c == route.collection => o.clone(),
                        NEW_EVENTS if route.collection == CORE_EVENTS => core_event(o),
                        _ => return None,
                    };
                    in_scope(k, &shown).then_some(shown)
                })
                .collect();
            if as_table {
                return respond(StatusCode::OK, &print(&items, st.resource_version));
            }
            respond(
                StatusCode::OK,
                &json!({"kind": list_kind, "apiVersion": list_api_version,
                "metadata": {"resourceVersion": st.resource_version.to_string()}, "items": items}),
            )
        }
        (Method::GET, Some(name)) => {
            let key = Key {
                collection: route.collection.clone(),
                namespace,
                name: name.clone(),
            };
            let st = lock();
            match st.objects.get(&key) {
                Some(object) if as_table => respond(
                    StatusCode::OK,
                    &print(std::slice::from_ref(object), st.resource_version),
                ),
                Some(object) => respond(StatusCode::OK, object),
                None => status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("{name} not found"),
                ),
            }
        }
        (Method::POST, None) => {
            let Ok(mut object) = serde_json::from_slice::<Value>(&body) else {
                return status(StatusCode::BAD_REQUEST, "BadRequest", "body is not JSON");
            };
            let Some(name) = object["metadata"]["name"].as_str().map(str::to_owned) else {
                return status(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid",
                    "metadata.name is required",
                );
            };
            let key = Key {
                collection: route.collection.clone(),
                namespace: namespace.clone(),
                name: name.clone(),
            };
            let mut st = lock();
            if st.objects.contains_key(&key) {
                return status(
                    StatusCode::CONFLICT,
                    "AlreadyExists",
                    &format!("{name} already exists"),
                );
            }
            st.uid += 1;
            let metadata = &mut object["metadata"];
            metadata["uid"] = json!(format!("00000000-0000-0000-0000-{:012}", st.uid));
            metadata["creationTimestamp"] = json!(now());
            metadata["generation"] = json!(1);
            if route.namespace.is_some() {
                metadata["namespace"] = json!(namespace);
            }
            if route.collection == discovery::CRD_COLLECTION {
                // Served at once: there is no controller to establish it.
                object["status"] = json!({"acceptedNames": object["spec"]["names"], "conditions": [
                    {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts"},
                    {"type": "Established", "status": "True", "reason": "InitialNamesAccepted"}]});
            }
            let created = st.commit("ADDED", key, object, changes);
            respond(StatusCode::CREATED, &created)
        }
        (Method::PUT | Method::PATCH, Some(name)) => {
            let key = Key {
                collection: route.collection.clone(),
                namespace,
                name: name.clone(),
            };
            let mut st = lock();
            let Some(current) = st.objects.get(&key).cloned() else {
                return status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("{name} not found"),
                );
            };
            let Ok(sent) = serde_json::from_slice::<Value>(&body) else {
                return status(StatusCode::BAD_REQUEST, "BadRequest", "body is not JSON");
            };
            let mut updated = current.clone();
            if method == Method::PUT {
                updated = sent.clone();
            } else if content_type.starts_with("application/json-patch+json") {
                let Ok(mut patch) = serde_json::from_value::<json_patch::Patch>(sent.clone())
                else {
                    return status(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        "malformed JSON patch",
                    );
                };
                // As Kubernetes' JSON patch does, a missing path tests equal
                // to null (kube's finalizer relies on it).
                patch.0.retain(|op| match op {
                    json_patch::PatchOperation::Test(test) => {
                        !(test.value.is_null() && updated.pointer(test.path.as_str()).is_none())
                    }
                    _ => true,
                });
                if let Err(err) = json_patch::patch(&mut updated, &patch) {
                    return status(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "Invalid",
                        &err.to_string(),
                    );
                }
            } else {
                json_patch::merge(&mut updated, &sent);
            }
            let sent_version = sent["metadata"]["resourceVersion"].as_str();
            if sent_version
                .is_some_and(|v| Some(v) != current["metadata"]["resourceVersion"].as_str())
            {
                return status(
                    StatusCode::CONFLICT,
                    "Conflict",
                    "the object has been modified; please apply your changes to the latest version and try again",
                );
            }
            // The server owns identity and bookkeeping fields.
            for field in [
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "namespace",
                "name",
            ] {
                let kept = current["metadata"].get(field).cloned();
                if let Some(metadata) = updated["metadata"].as_object_mut() {
                    match kept {
                        Some(value) => metadata.insert(field.to_owned(), value),
                        None => metadata.remove(field),
                    };
                }
            }
            if has_status_subresource(&route.collection) {
                if route.status {
                    let new_status = updated["status"].clone();
                    updated = current.clone();
                    updated["status"] = new_status;
                } else {
                    updated["status"] = current["status"].clone();
                }
            }
            let generation = current["metadata"]["generation"].as_i64().unwrap_or(1);
            let spec_changed = updated["spec"] != current["spec"];
            updated["metadata"]["generation"] = json!(generation + i64::from(spec_changed));
            if updated == current {
                return respond(StatusCode::OK, &current);
            }
            let deleting = !updated["metadata"]["deletionTimestamp"].is_null();
            let unfinalized = updated["metadata"]["finalizers"]
                .as_array()
                .is_none_or(|f| f.is_empty());
            let committed = st.commit("MODIFIED", key.clone(), updated, changes);
            if deleting && unfinalized {
                st.delete(key, changes);
            }
            respond(StatusCode::OK, &committed)
        }
        (Method::DELETE, Some(name)) => {
            let key = Key {
                collection: route.collection.clone(),
                namespace,
                name: name.clone(),
            };
            match lock().delete(key, changes) {
                Some(object) => respond(StatusCode::OK, &object),
                None => status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("{name} not found"),
                ),
            }
        }
        _ => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "not supported by the fake API",
        ),
    }
}

/// A streaming watch: past changes after `resourceVersion`, then live ones,
/// as newline-delimited JSON events, until `timeoutSeconds`.
fn watch(
    state: &Mutex<State>,
    changes: &broadcast::Sender<Change>,
    stop: &CancellationToken,
    route: &Route,
    query: &str,
) -> Response<Body> {
    let since: u64 = query_param(query, "resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let selector = query_param(query, "labelSelector").unwrap_or_default();
    let fields = query_param(query, "fieldSelector").unwrap_or_default();
    let timeout = query_param(query, "timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_secs(290), Duration::from_secs);
    // Subscribe before reading the backlog so nothing falls in between.
    let mut live = changes.subscribe();
    let backlog: Vec<Change> = state
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .log
        .iter()
        .filter(|c| c.resource_version > since)
        .cloned()
        .collect();
    let collection = route.collection.clone();
    let namespace = route.namespace.clone();
    let relevant = move |c: &Change| {
        c.key.collection == collection
            && namespace.as_ref().is_none_or(|ns| &c.key.namespace == ns)
            && matches_labels(&c.object, &selector)
            && matches_fields(&c.object, &fields)
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(64);
    let stop = stop.clone();
    tokio::spawn(async move {
        let encode = |c: &Change| {
            Frame::data(Bytes::from(format!(
                "{}\n",
                json!({"type": c.kind, "object": c.object})
            )))
        };
        let mut last = since;
        for change in backlog.iter().filter(|c| relevant(c)) {
            last = change.resource_version;
            if tx.send(Ok(encode(change))).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        loop {
            let change = tokio::select! {
                _ = stop.cancelled() => return,
                _ = &mut deadline => return,
                change = live.recv() => match change {
                    Ok(change) => change,
                    Err(broadcast::error::RecvError::Lagged(_)) => return,
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            };
            if change.resource_version <= last || !relevant(&change) {
                continue;
            }
            last = change.resource_version;
            if tx.send(Ok(encode(&change))).await.is_err() {
                return;
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let r = parse_route("/api/v1/namespaces/ns/secrets/s").expect("route");
        assert_eq!(
            (
                r.collection.as_str(),
                r.namespace.as_deref(),
                r.name.as_deref()
            ),
            ("/api/v1/secrets", Some("ns"), Some("s"))
        );
        let r = parse_route("/apis/tether.dev/v1alpha1/proxiedclusters").expect("route");
        assert_eq!(
            (r.collection.as_str(), r.namespace, r.name),
            ("/apis/tether.dev/v1alpha1/proxiedclusters", None, None)
        );
        let r = parse_route("/apis/tether.dev/v1alpha1/namespaces/a/proxiedclusters/b/status")
            .expect("route");
        assert!(r.status);
        let r = parse_route("/api/v1/namespaces/default").expect("route");
        assert_eq!(
            (r.collection.as_str(), r.name.as_deref()),
            ("/api/v1/namespaces", Some("default"))
        );
    }

    #[test]
    fn field_selectors() {
        let object = json!({"metadata": {"name": "a", "namespace": "n"},
            "involvedObject": {"kind": "ProxiedCluster", "name": "a"}});
        assert!(matches_fields(&object, "metadata.name=a"));
        assert!(matches_fields(
            &object,
            "metadata.name=a,metadata.namespace=n"
        ));
        assert!(!matches_fields(&object, "metadata.name=b"));
        assert!(matches_fields(
            &object,
            "involvedObject.kind=ProxiedCluster,involvedObject.name==a"
        ));
        assert!(matches_fields(&object, "spec.nodeName="));
        assert!(!matches_fields(&object, "metadata.name!=a"));
    }

    #[test]
    fn label_selectors() {
        let object = json!({"metadata": {"labels": {"a": "1", "b": "2"}}});
        assert!(matches_labels(&object, "a=1"));
        assert!(matches_labels(&object, "a==1,b=2"));
        assert!(matches_labels(&object, "a"));
        assert!(!matches_labels(&object, "a=2"));
        assert!(!matches_labels(&object, "c"));
        assert!(matches_labels(&object, "c!=x"));
    }
}
