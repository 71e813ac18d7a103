//! The clusters tether-server accepts: who may connect, with which token,
//! and which address its agent may dial.

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};

pub const DEFAULT_TARGET: &str = "kubernetes.default.svc:443";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// Carries only the position, never the input: the file holds tokens.
    #[error("clusters config is not valid JSON ({category} error at line {line}, column {column})")]
    Json {
        category: String,
        line: usize,
        column: usize,
    },
    #[error(
        "cluster #{index}: id {id:?} is not a DNS label (1-63 of a-z, 0-9, '-', not starting or ending with '-')"
    )]
    BadId { index: usize, id: String },
    #[error("cluster {id:?} is listed twice")]
    DuplicateId { id: String },
    #[error("cluster {id:?} needs exactly one of \"token\" and \"tokenSha256\"")]
    TokenChoice { id: String },
    #[error("cluster {id:?} has an empty token")]
    EmptyToken { id: String },
    #[error("cluster {id:?}: tokenSha256 must be 64 hex digits")]
    BadTokenHash { id: String },
    #[error("clusters {first:?} and {second:?} share a token")]
    DuplicateToken { first: String, second: String },
    #[error("cluster {id:?}: targetAddr {addr:?} is not host:port")]
    BadTarget { id: String, addr: String },
    #[error("cluster {id:?}: resource {resource:?} is not namespace/name")]
    BadResource { id: String, resource: String },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Entry {
    id: String,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    token_sha256: Option<String>,
    #[serde(default)]
    target_addr: Option<String>,
    /// `namespace/name` of the ProxiedCluster, where tether-server reports
    /// the connection status (set by the operator).
    #[serde(default)]
    resource: Option<String>,
}

#[derive(Clone, PartialEq, Eq)]
pub struct Cluster {
    pub id: String,
    token_sha256: [u8; 32],
    /// The only `host:port` this cluster's agent is asked to dial.
    pub target_addr: String,
    /// The ProxiedCluster (namespace, name) whose status tracks this cluster.
    pub resource: Option<(String, String)>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("id", &self.id)
            .field("target_addr", &self.target_addr)
            .field("resource", &self.resource)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    pub fn token_sha256(&self) -> [u8; 32] {
        self.token_sha256
    }

    pub fn token_matches(&self, token_sha256: &[u8; 32]) -> bool {
        self.token_sha256.ct_eq(token_sha256).into()
    }
}

/// A validated set of clusters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Clusters {
    clusters: Vec<Cluster>,
}

pub fn token_sha256(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Kubernetes' DNS-1123 label rule.
pub fn is_dns_label(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 63
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !id.starts_with('-')
        && !id.ends_with('-')
}

/// `host:port` with a non-zero port.
pub fn is_host_port(addr: &str) -> bool {
    match addr.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0),
        None => false,
    }
}

impl Clusters {
    /// Parses and validates `[{"id", "token" | "tokenSha256", "targetAddr"}]`.
    pub fn parse(json: &str) -> Result<Self, ConfigError> {
        let entries: Vec<Entry> = serde_json::from_str(json).map_err(|err| ConfigError::Json {
            category: format!("{:?}", err.classify()).to_lowercase(),
            line: err.line(),
            column: err.column(),
        })?;
        let mut clusters: Vec<Cluster> = Vec::with_capacity(entries.len());
        for (index, entry) in entries.into_iter().enumerate() {
            let id = entry.id;
            if !is_dns_label(&id) {
                return Err(ConfigError::BadId { index, id });
            }
            if clusters.iter().any(|c| c.id == id) {
                return Err(ConfigError::DuplicateId { id });
            }
            let token_sha256 = match (entry.token, entry.token_sha256) {
                (Some(token), None) if token.is_empty() => {
                    return Err(ConfigError::EmptyToken { id });
                }
                (Some(token), None) => token_sha256(&token),
                (None, Some(hash)) => {
                    let mut bytes = [0u8; 32];
                    hex::decode_to_slice(hash.trim(), &mut bytes)
                        .map_err(|_| ConfigError::BadTokenHash { id: id.clone() })?;
                    bytes
                }
                _ => return Err(ConfigError::TokenChoice { id }),
            };
            if let Some(other) = clusters.iter().find(|c| c.token_sha256 == token_sha256) {
                return Err(ConfigError::DuplicateToken {
                    first: other.id.clone(),
                    second: id,
                });
            }
            let target_addr = entry
                .target_addr
                .unwrap_or_else(|| DEFAULT_TARGET.to_owned());
            if !is_host_port(&target_addr) {
                return Err(ConfigError::BadTarget {
                    id,
                    addr: target_addr,
                });
            }
            let resource = match entry.resource {
                None => None,
                Some(resource) => match resource.split_once('/') {
                    Some((ns, name))
                        if is_dns_label(ns) && !name.is_empty() && !name.contains('/') =>
                    {
                        Some((ns.to_owned(), name.to_owned()))
                    }
                    _ => return Err(ConfigError::BadResource { id, resource }),
                },
            };
            clusters.push(Cluster {
                id,
                token_sha256,
                target_addr,
                resource,
            });
        }
        Ok(Self { clusters })
    }

    /// The cluster `token` belongs to. Every configured hash is compared in
    /// constant time, with no early exit, so timing tells nothing about
    /// which (or whether a) cluster matched.
    pub fn authenticate(&self, token: &str) -> Option<&Cluster> {
        let presented = token_sha256(token);
        let mut found: u32 = 0; // index + 1; 0 = none
        for (index, cluster) in self.clusters.iter().enumerate() {
            let candidate = index as u32 + 1;
            found.conditional_assign(&candidate, cluster.token_sha256.ct_eq(&presented));
        }
        found
            .checked_sub(1)
            .and_then(|index| self.clusters.get(index as usize))
    }

    pub fn get(&self, id: &str) -> Option<&Cluster> {
        self.clusters.iter().find(|c| c.id == id)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Cluster> {
        self.clusters.iter()
    }

    pub fn len(&self) -> usize {
        self.clusters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.clusters.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tokens_hashes_and_default_target() {
        let hash = hex::encode(token_sha256("beta-token"));
        let json = format!(
            r#"[{{"id":"alpha","token":"alpha-token","targetAddr":"10.0.0.1:6443"}},
                {{"id":"beta","tokenSha256":"{hash}","resource":"tenants/beta"}}]"#
        );
        let clusters = Clusters::parse(&json).expect("valid");
        assert_eq!(clusters.len(), 2);
        assert_eq!(
            clusters.get("alpha").expect("alpha").target_addr,
            "10.0.0.1:6443"
        );
        assert_eq!(
            clusters.get("beta").expect("beta").target_addr,
            DEFAULT_TARGET
        );
        assert_eq!(
            clusters.authenticate("alpha-token").map(|c| c.id.as_str()),
            Some("alpha")
        );
        assert_eq!(
            clusters.authenticate("beta-token").map(|c| c.id.as_str()),
            Some("beta")
        );
        assert!(clusters.authenticate("wrong").is_none());
        assert!(clusters.authenticate("").is_none());
    }

    #[test]
    fn rejects_bad_configs_with_clear_errors() {
        let cases = [
            (
                r#"[{"id":"a","token":""}]"#,
                ConfigError::EmptyToken { id: "a".into() },
            ),
            (
                r#"[{"id":"a","token":"t"},{"id":"b","token":"t"}]"#,
                ConfigError::DuplicateToken {
                    first: "a".into(),
                    second: "b".into(),
                },
            ),
            (
                r#"[{"id":"a","token":"t"},{"id":"a","token":"u"}]"#,
                ConfigError::DuplicateId { id: "a".into() },
            ),
            (
                r#"[{"id":"a"}]"#,
                ConfigError::TokenChoice { id: "a".into() },
            ),
            (
                r#"[{"id":"a","token":"t","tokenSha256":"00"}]"#,
                ConfigError::TokenChoice { id: "a".into() },
            ),
            (
                r#"[{"id":"a","tokenSha256":"xyz"}]"#,
                ConfigError::BadTokenHash { id: "a".into() },
            ),
            (
                r#"[{"id":"Not_DNS","token":"t"}]"#,
                ConfigError::BadId {
                    index: 0,
                    id: "Not_DNS".into(),
                },
            ),
            (
                r#"[{"id":"a","token":"t","targetAddr":"nohost"}]"#,
                ConfigError::BadTarget {
                    id: "a".into(),
                    addr: "nohost".into(),
                },
            ),
        ];
        for (json, expected) in cases {
            assert_eq!(Clusters::parse(json), Err(expected), "{json}");
        }
    }

    #[test]
    fn json_errors_never_echo_the_input() {
        let err = Clusters::parse(r#"[{"id":"a","token":12345678}]"#).unwrap_err();
        let message = err.to_string();
        assert!(!message.contains("12345678"), "{message}");
        assert!(message.contains("line 1"), "{message}");
    }

    #[test]
    fn debug_output_hides_the_token_hash() {
        let clusters = Clusters::parse(r#"[{"id":"a","token":"secret-token"}]"#).expect("valid");
        let debug = format!("{clusters:?}");
        assert!(!debug.contains(&hex::encode(token_sha256("secret-token"))));
        assert!(!debug.contains("secret-token"));
    }

    #[test]
    fn dns_labels() {
        for ok in ["a", "prod-eu-1", &"a".repeat(63)] {
            assert!(is_dns_label(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a.b", "a_b", &"a".repeat(64), "../x"] {
            assert!(!is_dns_label(bad), "{bad}");
        }
    }
}
