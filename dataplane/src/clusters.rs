//! The clusters tether-server accepts: who may connect, with which token,
//! and which address its agent may dial.

use std::time::SystemTime;

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
    #[error(
        "cluster {id:?}: previousTokenSha256 needs previousTokenExpires (RFC 3339), and the reverse"
    )]
    PreviousToken { id: String },
    #[error("cluster {id:?}: pendingToken does not match tokenSha256")]
    PendingToken { id: String },
    #[error("cluster {id:?}: {field} is not an RFC 3339 time")]
    BadTime { id: String, field: &'static str },
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
    /// A rotated-out token, still accepted until `previousTokenExpires`.
    #[serde(default)]
    previous_token_sha256: Option<String>,
    #[serde(default)]
    previous_token_expires: Option<String>,
    /// The new token, while it is being delivered to the agent over the
    /// tunnel (the operator removes it once the agent uses it).
    #[serde(default)]
    pending_token: Option<String>,
    /// A requested certificate rotation the agent has not done yet.
    #[serde(default)]
    certificate_rotation: Option<String>,
    /// Client certificates that start before this are refused (they
    /// predate a completed rotation).
    #[serde(default)]
    certificates_not_before: Option<String>,
}

#[derive(Clone, PartialEq, Eq)]
pub struct Cluster {
    pub id: String,
    token_sha256: [u8; 32],
    /// A rotated-out token and until when it is still accepted.
    previous_token: Option<([u8; 32], SystemTime)>,
    /// Secret: the new token, to deliver to an agent still on the previous one.
    pending_token: Option<String>,
    /// The only `host:port` this cluster's agent is asked to dial.
    pub target_addr: String,
    /// The ProxiedCluster (namespace, name) whose status tracks this cluster.
    pub resource: Option<(String, String)>,
    /// A certificate rotation the agent is asked to make.
    pub certificate_rotation: Option<String>,
    /// Client certificates starting before this are refused.
    pub certificates_not_before: Option<SystemTime>,
}

/// Which of a cluster's tokens an agent presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenUse {
    Current,
    /// The rotated-out one, accepted until the instant given.
    Previous(SystemTime),
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("id", &self.id)
            .field("target_addr", &self.target_addr)
            .field("resource", &self.resource)
            .field("certificate_rotation", &self.certificate_rotation)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    pub fn token_sha256(&self) -> [u8; 32] {
        self.token_sha256
    }

    /// Whether a session authenticated with `token_sha256` may go on at `now`.
    pub fn token_matches(&self, token_sha256: &[u8; 32], now: SystemTime) -> bool {
        self.token_use(token_sha256, now).is_some()
    }

    /// Which token `token_sha256` is, if any is accepted at `now`. Both are
    /// compared in constant time.
    pub fn token_use(&self, token_sha256: &[u8; 32], now: SystemTime) -> Option<TokenUse> {
        let current: bool = self.token_sha256.ct_eq(token_sha256).into();
        let previous = self.previous_token.and_then(|(hash, until)| {
            let matches: bool = hash.ct_eq(token_sha256).into();
            (matches && now < until).then_some(TokenUse::Previous(until))
        });
        if current {
            Some(TokenUse::Current)
        } else {
            previous
        }
    }

    /// The token to hand to an agent that authenticated with the previous
    /// one. Secret: never log it.
    pub fn pending_token(&self) -> Option<&str> {
        self.pending_token.as_deref()
    }
}

fn parse_time(
    value: Option<String>,
    id: &str,
    field: &'static str,
) -> Result<Option<SystemTime>, ConfigError> {
    value
        .map(|v| {
            v.parse::<k8s_openapi::jiff::Timestamp>()
                .map(SystemTime::from)
                .map_err(|_| ConfigError::BadTime {
                    id: id.to_owned(),
                    field,
                })
        })
        .transpose()
}

fn parse_hash(hash: &str, id: &str) -> Result<[u8; 32], ConfigError> {
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(hash.trim(), &mut bytes)
        .map_err(|_| ConfigError::BadTokenHash { id: id.to_owned() })?;
    Ok(bytes)
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
            let hash = match (entry.token, entry.token_sha256) {
                (Some(token), None) if token.is_empty() => {
                    return Err(ConfigError::EmptyToken { id });
                }
                (Some(token), None) => token_sha256(&token),
                (None, Some(hash)) => parse_hash(&hash, &id)?,
                _ => return Err(ConfigError::TokenChoice { id }),
            };
            if let Some(other) = clusters.iter().find(|c| c.token_sha256 == hash) {
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
            let previous_token = match (
                entry.previous_token_sha256,
                parse_time(entry.previous_token_expires, &id, "previousTokenExpires")?,
            ) {
                (Some(hash), Some(until)) => Some((parse_hash(&hash, &id)?, until)),
                (None, None) => None,
                _ => return Err(ConfigError::PreviousToken { id }),
            };
            if entry
                .pending_token
                .as_deref()
                .is_some_and(|token| token_sha256(token) != hash)
            {
                return Err(ConfigError::PendingToken { id });
            }
            let certificates_not_before =
                parse_time(entry.certificates_not_before, &id, "certificatesNotBefore")?;
            clusters.push(Cluster {
                id,
                token_sha256: hash,
                previous_token,
                pending_token: entry.pending_token,
                target_addr,
                resource,
                certificate_rotation: entry.certificate_rotation.filter(|r| !r.is_empty()),
                certificates_not_before,
            });
        }
        Ok(Self { clusters })
    }

    /// The cluster whose token has the SHA-256 `presented`. Every
    /// configured hash is compared in constant time, with no early exit, so
    /// timing tells nothing about which (or whether a) cluster matched.
    pub fn authenticate(
        &self,
        presented: &[u8; 32],
        now: SystemTime,
    ) -> Option<(&Cluster, TokenUse)> {
        let mut found: u32 = 0; // index + 1; 0 = none
        for (index, cluster) in self.clusters.iter().enumerate() {
            let candidate = index as u32 + 1;
            let accepted =
                subtle::Choice::from(u8::from(cluster.token_use(presented, now).is_some()));
            found.conditional_assign(&candidate, accepted);
        }
        let cluster = found
            .checked_sub(1)
            .and_then(|index| self.clusters.get(index as usize))?;
        Some((cluster, cluster.token_use(presented, now)?))
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
        let now = SystemTime::now();
        assert_eq!(
            clusters
                .authenticate(&token_sha256("alpha-token"), now)
                .map(|(c, u)| (c.id.as_str(), u)),
            Some(("alpha", TokenUse::Current))
        );
        assert_eq!(
            clusters
                .authenticate(&token_sha256("beta-token"), now)
                .map(|(c, _)| c.id.as_str()),
            Some("beta")
        );
        assert!(clusters.authenticate(&token_sha256("wrong"), now).is_none());
        assert!(clusters.authenticate(&token_sha256(""), now).is_none());
    }

    #[test]
    fn a_rotated_token_is_accepted_until_its_overlap_ends() {
        let old = hex::encode(token_sha256("old-token"));
        let json = format!(
            r#"[{{"id":"a","token":"new-token","previousTokenSha256":"{old}",
                "previousTokenExpires":"2030-01-01T00:10:00Z","pendingToken":"new-token",
                "certificateRotation":"r1","certificatesNotBefore":"2030-01-01T00:00:00Z"}}]"#
        );
        let clusters = Clusters::parse(&json).expect("valid");
        let before: SystemTime = "2030-01-01T00:09:59Z"
            .parse::<k8s_openapi::jiff::Timestamp>()
            .expect("time")
            .into();
        let after = before + std::time::Duration::from_secs(2);
        let until: SystemTime = before + std::time::Duration::from_secs(1);
        assert_eq!(
            clusters
                .authenticate(&token_sha256("old-token"), before)
                .map(|(_, u)| u),
            Some(TokenUse::Previous(until))
        );
        assert!(
            clusters
                .authenticate(&token_sha256("old-token"), after)
                .is_none(),
            "refused after the overlap"
        );
        assert_eq!(
            clusters
                .authenticate(&token_sha256("new-token"), after)
                .map(|(_, u)| u),
            Some(TokenUse::Current)
        );
        let cluster = clusters.get("a").expect("a");
        assert_eq!(cluster.pending_token(), Some("new-token"));
        assert_eq!(cluster.certificate_rotation.as_deref(), Some("r1"));
        assert!(cluster.certificates_not_before.is_some());
        assert!(
            !format!("{clusters:?}").contains("new-token"),
            "Debug hides the pending token"
        );
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
            (
                r#"[{"id":"a","token":"t","previousTokenSha256":"00"}]"#,
                ConfigError::PreviousToken { id: "a".into() },
            ),
            (
                r#"[{"id":"a","token":"t","pendingToken":"u"}]"#,
                ConfigError::PendingToken { id: "a".into() },
            ),
            (
                r#"[{"id":"a","token":"t","certificatesNotBefore":"yesterday"}]"#,
                ConfigError::BadTime {
                    id: "a".into(),
                    field: "certificatesNotBefore",
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
