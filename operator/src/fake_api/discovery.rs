//! What the API server says about itself, as kubectl asks: `/version`,
//! legacy discovery (`/api`, `/apis`, one document per group version), and
//! the OpenAPI v3 documents kubectl reads before `apply` to learn that the
//! server validates fields itself. Custom resources appear as soon as their
//! CustomResourceDefinition is stored, with its printer columns.

use std::collections::BTreeMap;

use serde_json::{Value, json};

/// The version the server reports (kubectl warns about unparseable ones).
pub const GIT_VERSION: &str = "v1.33.0-tether-embedded";

/// Where CustomResourceDefinitions are stored.
pub const CRD_COLLECTION: &str = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions";

/// A printer column of `kubectl get` (a CRD's `additionalPrinterColumns`).
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub name: String,
    pub kind: String,
    pub json_path: String,
    pub priority: i64,
}

/// One kind of object the server serves.
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    pub group: String,
    pub version: String,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    /// Only `create` for review-like resources; every verb otherwise.
    pub create_only: bool,
    pub status_subresource: bool,
    /// Columns beyond the name; empty means the default `AGE`.
    pub columns: Vec<Column>,
}

impl Resource {
    /// `/api/v1` or `/apis/{group}/{version}`.
    pub fn group_version_path(&self) -> String {
        match self.group.as_str() {
            "" => format!("/api/{}", self.version),
            group => format!("/apis/{group}/{}", self.version),
        }
    }

    /// The collection path as the store keys it.
    pub fn collection(&self) -> String {
        format!("{}/{}", self.group_version_path(), self.plural)
    }

    /// `v1`, `apps/v1`: an object's `apiVersion`.
    pub fn api_version(&self) -> String {
        match self.group.as_str() {
            "" => self.version.clone(),
            group => format!("{group}/{}", self.version),
        }
    }

    fn verbs(&self) -> Value {
        if self.create_only {
            json!(["create"])
        } else {
            json!([
                "create",
                "delete",
                "deletecollection",
                "get",
                "list",
                "patch",
                "update",
                "watch"
            ])
        }
    }
}

/// group, version, plural, kind, namespaced, short names.
type Builtin = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    bool,
    &'static [&'static str],
);

/// The built-in kinds tether, its bundle and the demo's workload use.
fn builtin() -> Vec<Resource> {
    let table: &[Builtin] = &[
        ("", "v1", "namespaces", "Namespace", false, &["ns"]),
        ("", "v1", "secrets", "Secret", true, &[]),
        ("", "v1", "configmaps", "ConfigMap", true, &["cm"]),
        ("", "v1", "serviceaccounts", "ServiceAccount", true, &["sa"]),
        ("", "v1", "services", "Service", true, &["svc"]),
        ("", "v1", "pods", "Pod", true, &["po"]),
        ("", "v1", "events", "Event", true, &["ev"]),
        ("apps", "v1", "deployments", "Deployment", true, &["deploy"]),
        ("coordination.k8s.io", "v1", "leases", "Lease", true, &[]),
        (
            "certificates.k8s.io",
            "v1",
            "certificatesigningrequests",
            "CertificateSigningRequest",
            false,
            &["csr"],
        ),
        ("events.k8s.io", "v1", "events", "Event", true, &["ev"]),
        (
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            false,
            &["crd", "crds"],
        ),
        (
            "rbac.authorization.k8s.io",
            "v1",
            "roles",
            "Role",
            true,
            &[],
        ),
        (
            "rbac.authorization.k8s.io",
            "v1",
            "rolebindings",
            "RoleBinding",
            true,
            &[],
        ),
        (
            "rbac.authorization.k8s.io",
            "v1",
            "clusterroles",
            "ClusterRole",
            false,
            &[],
        ),
        (
            "rbac.authorization.k8s.io",
            "v1",
            "clusterrolebindings",
            "ClusterRoleBinding",
            false,
            &[],
        ),
        (
            "networking.k8s.io",
            "v1",
            "networkpolicies",
            "NetworkPolicy",
            true,
            &["netpol"],
        ),
        (
            "authentication.k8s.io",
            "v1",
            "selfsubjectreviews",
            "SelfSubjectReview",
            false,
            &[],
        ),
    ];
    table
        .iter()
        .map(
            |&(group, version, plural, kind, namespaced, short_names)| Resource {
                group: group.to_owned(),
                version: version.to_owned(),
                plural: plural.to_owned(),
                singular: kind.to_ascii_lowercase(),
                kind: kind.to_owned(),
                namespaced,
                short_names: short_names.iter().map(|s| (*s).to_owned()).collect(),
                categories: Vec::new(),
                create_only: plural == "selfsubjectreviews",
                status_subresource: matches!(plural, "deployments" | "certificatesigningrequests"),
                columns: Vec::new(),
            },
        )
        .collect()
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The served versions of a stored CustomResourceDefinition.
pub fn from_crd(crd: &Value) -> Vec<Resource> {
    let spec = &crd["spec"];
    let names = &spec["names"];
    let (Some(group), Some(plural), Some(kind)) = (
        spec["group"].as_str(),
        names["plural"].as_str(),
        names["kind"].as_str(),
    ) else {
        return Vec::new();
    };
    let versions = spec["versions"].as_array().cloned().unwrap_or_default();
    versions
        .iter()
        .filter(|v| v["served"].as_bool().unwrap_or(true))
        .filter_map(|version| {
            let columns = version["additionalPrinterColumns"]
                .as_array()
                .map(|columns| {
                    columns
                        .iter()
                        .filter_map(|c| {
                            Some(Column {
                                name: c["name"].as_str()?.to_owned(),
                                kind: c["type"].as_str().unwrap_or("string").to_owned(),
                                json_path: c["jsonPath"].as_str()?.to_owned(),
                                priority: c["priority"].as_i64().unwrap_or(0),
                            })
                        })
                        .collect()
                })
                .unwrap_or_default();
            Some(Resource {
                group: group.to_owned(),
                version: version["name"].as_str()?.to_owned(),
                plural: plural.to_owned(),
                singular: names["singular"]
                    .as_str()
                    .map_or_else(|| kind.to_ascii_lowercase(), str::to_owned),
                kind: kind.to_owned(),
                namespaced: spec["scope"] != "Cluster",
                short_names: strings(&names["shortNames"]),
                categories: strings(&names["categories"]),
                create_only: false,
                status_subresource: version["subresources"]["status"].is_object(),
                columns,
            })
        })
        .collect()
}

/// Every resource served: the built-ins, then those of the stored CRDs.
pub fn resources<'a>(crds: impl Iterator<Item = &'a Value>) -> Vec<Resource> {
    let mut all = builtin();
    all.extend(crds.flat_map(from_crd));
    all
}

/// The answer to a discovery or OpenAPI path, `None` for other paths.
pub fn document(path: &str, resources: &[Resource]) -> Option<Value> {
    let path = path.trim_end_matches('/');
    match path {
        "/version" => Some(json!({
            "major": "1", "minor": "33", "gitVersion": GIT_VERSION,
            "gitCommit": "", "gitTreeState": "clean", "buildDate": "",
            "goVersion": "", "compiler": "rustc", "platform": "linux/amd64",
        })),
        "/api" => Some(json!({"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}]})),
        "/apis" => Some(group_list(resources)),
        "/openapi/v3" => Some(openapi_index(resources)),
        _ => {
            if let Some(group_version) = path.strip_prefix("/openapi/v3") {
                return Some(openapi_document(group_version, resources))
                    .filter(|doc| doc["paths"].as_object().is_some_and(|p| !p.is_empty()));
            }
            let served: Vec<&Resource> = resources
                .iter()
                .filter(|r| r.group_version_path() == path)
                .collect();
            (!served.is_empty()).then(|| resource_list(&served))
        }
    }
}

fn group_list(resources: &[Resource]) -> Value {
    // Group → versions in the order first seen.
    let mut groups: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for resource in resources.iter().filter(|r| !r.group.is_empty()) {
        let versions = groups.entry(&resource.group).or_default();
        if !versions.contains(&resource.version.as_str()) {
            versions.push(&resource.version);
        }
    }
    let groups: Vec<Value> = groups
        .into_iter()
        .map(|(group, versions)| {
            let versions: Vec<Value> = versions
                .iter()
                .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
                .collect();
            json!({"name": group, "preferredVersion": versions[0], "versions": versions})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn resource_list(served: &[&Resource]) -> Value {
    let mut listed = Vec::new();
    for resource in served {
        let mut entry = json!({
            "name": resource.plural, "singularName": resource.singular,
            "namespaced": resource.namespaced, "kind": resource.kind,
            "verbs": resource.verbs(),
        });
        if !resource.short_names.is_empty() {
            entry["shortNames"] = json!(resource.short_names);
        }
        if !resource.categories.is_empty() {
            entry["categories"] = json!(resource.categories);
        }
        listed.push(entry);
        if resource.status_subresource {
            listed.push(json!({
                "name": format!("{}/status", resource.plural), "singularName": "",
                "namespaced": resource.namespaced, "kind": resource.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
    }
    json!({"kind": "APIResourceList", "apiVersion": "v1",
        "groupVersion": served[0].api_version(), "resources": listed})
}

fn openapi_index(resources: &[Resource]) -> Value {
    let mut paths = serde_json::Map::new();
    for resource in resources {
        let relative = resource.group_version_path();
        paths.insert(
            relative.trim_start_matches('/').to_owned(),
            json!({"serverRelativeURL": format!("/openapi/v3{relative}")}),
        );
    }
    json!({"paths": paths})
}

/// Just enough of a group version's OpenAPI document for kubectl to see
/// that PATCH takes `fieldValidation`, so it leaves validation to the
/// server instead of downloading schemas; this server validates nothing.
fn openapi_document(group_version_path: &str, resources: &[Resource]) -> Value {
    let mut paths = serde_json::Map::new();
    for resource in resources
        .iter()
        .filter(|r| r.group_version_path() == group_version_path)
    {
        let base = group_version_path;
        let item = match resource.namespaced {
            true => format!(
                "{base}/namespaces/{{namespace}}/{}/{{name}}",
                resource.plural
            ),
            false => format!("{base}/{}/{{name}}", resource.plural),
        };
        paths.insert(
            item,
            json!({"patch": {
                "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}],
                "responses": {},
                "x-kubernetes-group-version-kind": {
                    "group": resource.group, "version": resource.version, "kind": resource.kind,
                },
            }}),
        );
    }
    json!({"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": GIT_VERSION},
        "paths": paths, "components": {"schemas": {}}})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crd() -> Value {
        json!({"spec": {"group": "tether.dev", "scope": "Namespaced",
            "names": {"plural": "proxiedclusters", "singular": "proxiedcluster",
                "kind": "ProxiedCluster", "shortNames": ["pcl"]},
            "versions": [{"name": "v1alpha1", "served": true, "subresources": {"status": {}},
                "additionalPrinterColumns": [{"name": "ID", "type": "string", "jsonPath": ".status.clusterId"}]}]}})
    }

    #[test]
    fn custom_resources_join_discovery_when_their_crd_is_stored() {
        let without = resources(std::iter::empty());
        assert!(document("/apis/tether.dev/v1alpha1", &without).is_none());
        let crd = crd();
        let with = resources(std::iter::once(&crd));
        let list = document("/apis/tether.dev/v1alpha1", &with).expect("served");
        assert_eq!(list["groupVersion"], "tether.dev/v1alpha1");
        assert_eq!(list["resources"][0]["shortNames"][0], "pcl");
        assert_eq!(list["resources"][1]["name"], "proxiedclusters/status");
        let groups = document("/apis", &with).expect("groups");
        assert!(
            groups["groups"]
                .as_array()
                .expect("groups")
                .iter()
                .any(|g| g["name"] == "tether.dev")
        );
        let proxied = with
            .iter()
            .find(|r| r.kind == "ProxiedCluster")
            .expect("PC");
        assert_eq!(proxied.columns[0].json_path, ".status.clusterId");
        assert_eq!(
            proxied.collection(),
            "/apis/tether.dev/v1alpha1/proxiedclusters"
        );
    }

    #[test]
    fn openapi_claims_server_side_field_validation_per_kind() {
        let all = resources(std::iter::empty());
        let index = document("/openapi/v3", &all).expect("index");
        assert_eq!(
            index["paths"]["apis/apps/v1"]["serverRelativeURL"],
            "/openapi/v3/apis/apps/v1"
        );
        let apps = document("/openapi/v3/apis/apps/v1", &all).expect("apps");
        let patch =
            &apps["paths"]["/apis/apps/v1/namespaces/{namespace}/deployments/{name}"]["patch"];
        assert_eq!(patch["parameters"][0]["name"], "fieldValidation");
        assert_eq!(
            patch["x-kubernetes-group-version-kind"]["kind"],
            "Deployment"
        );
        assert!(document("/openapi/v3/apis/nothing/v1", &all).is_none());
        let core = document("/api/v1", &all).expect("core");
        assert_eq!(core["groupVersion"], "v1");
    }
}
