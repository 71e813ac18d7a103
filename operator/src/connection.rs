//! The agent's connection as the operator sums it up from the sessions the
//! tether-server replicas report (`status.agentSessions`, one entry per
//! replica, each written only by its replica): connected while at least one
//! replica holds a live session, `2/3` replicas, and expiry for replicas
//! that died without saying so.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::crd::{AgentSession, ConnectionStatus};

/// Servers refresh `lastSeen` every 30 s; three missed refreshes and the
/// session is taken for gone.
pub const SESSION_FRESH: Duration = Duration::from_secs(90);
/// Entries not refreshed for this long are removed (replicas replaced in a
/// rolling update leave their names behind).
pub const SESSION_FORGOTTEN: Duration = Duration::from_secs(600);

/// What the sessions say, at `now`.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// `None` when no replica ever reported a session.
    pub connection: Option<ConnectionStatus>,
    /// Entries to remove.
    pub forget: Vec<String>,
    /// When a live session goes stale unless refreshed: look again then.
    pub recheck_in: Option<Duration>,
}

fn age(time: Option<&Time>, now: SystemTime) -> Duration {
    time.map(|t| SystemTime::from(t.0))
        .and_then(|t| now.duration_since(t).ok())
        .unwrap_or(Duration::ZERO)
        .max(Duration::ZERO)
}

pub fn is_fresh(session: &AgentSession, now: SystemTime) -> bool {
    session.last_seen.is_some() && age(session.last_seen.as_ref(), now) < SESSION_FRESH
}

pub fn summarize(sessions: &BTreeMap<String, AgentSession>, now: SystemTime) -> Summary {
    if sessions.is_empty() {
        return Summary {
            connection: None,
            forget: Vec::new(),
            recheck_in: None,
        };
    }
    let fresh: Vec<(&String, &AgentSession)> =
        sessions.iter().filter(|(_, s)| is_fresh(s, now)).collect();
    // The replica set as the most recently written entry saw it: a replica
    // that died unannounced leaves it within seconds, before its own entry
    // expires.
    let replica_set: &[String] = fresh
        .iter()
        .max_by_key(|(_, s)| s.last_seen.as_ref().map(|t| t.0))
        .map_or(&[], |(_, s)| s.live_replicas.as_slice());
    let live: Vec<&AgentSession> = fresh
        .iter()
        .filter(|(_, s)| s.connected)
        .map(|(_, s)| *s)
        .collect();
    let held = fresh
        .iter()
        .filter(|(name, s)| s.connected && (replica_set.is_empty() || replica_set.contains(name)))
        .count();
    let total = replica_set.len().max(held);
    let newest = live.iter().max_by_key(|s| s.since.as_ref().map(|t| t.0));
    let connection = ConnectionStatus {
        connected: !live.is_empty(),
        replicas: Some(format!("{held}/{total}")),
        since: live
            .iter()
            .filter_map(|s| s.since.clone())
            .min_by_key(|t| t.0),
        agent_version: newest.and_then(|s| s.agent_version.clone()),
        certificate_not_after: newest.and_then(|s| s.certificate_not_after.clone()),
        last_seen: sessions
            .values()
            .filter_map(|s| s.last_seen.clone())
            .max_by_key(|t| t.0),
    };
    let forget = sessions
        .iter()
        .filter(|(_, s)| age(s.last_seen.as_ref(), now) >= SESSION_FORGOTTEN)
        .map(|(name, _)| name.clone())
        .collect();
    let recheck_in = live
        .iter()
        .map(|s| SESSION_FRESH.saturating_sub(age(s.last_seen.as_ref(), now)))
        .min()
        .map(|d| d.max(Duration::from_secs(1)));
    Summary {
        connection: Some(connection),
        forget,
        recheck_in,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(now: SystemTime, ago: u64) -> Option<Time> {
        Timestamp::try_from(now - Duration::from_secs(ago))
            .ok()
            .map(Time)
    }

    fn session(now: SystemTime, connected: bool, seen_ago: u64, live: &[&str]) -> AgentSession {
        AgentSession {
            connected,
            since: at(now, seen_ago + 100),
            agent_version: Some(format!("v{seen_ago}")),
            remote_address: Some("10.0.0.9:4000".into()),
            last_seen: at(now, seen_ago),
            live_replicas: live.iter().map(|r| (*r).to_owned()).collect(),
            // Newer sessions present newer certificates.
            certificate_not_after: at(now + Duration::from_secs(86400), seen_ago),
            token_sha256_prefix: None,
        }
    }

    #[test]
    fn no_report_means_never_connected() {
        let summary = summarize(&BTreeMap::new(), SystemTime::now());
        assert_eq!(summary.connection, None);
    }

    #[test]
    fn connected_while_any_replica_holds_a_fresh_session() {
        let now = SystemTime::now();
        let all = ["a", "b", "c"];
        let sessions = BTreeMap::from([
            ("a".to_owned(), session(now, true, 5, &all)),
            ("b".to_owned(), session(now, true, 20, &all)),
            ("c".to_owned(), session(now, false, 2, &all)),
        ]);
        let summary = summarize(&sessions, now);
        let connection = summary.connection.expect("reported");
        assert!(connection.connected);
        assert_eq!(connection.replicas.as_deref(), Some("2/3"));
        assert_eq!(
            connection.agent_version.as_deref(),
            Some("v5"),
            "the newest session's agent"
        );
        assert_eq!(
            connection.certificate_not_after,
            at(now + Duration::from_secs(86400), 5),
            "and the certificate it presented"
        );
        assert_eq!(connection.since, at(now, 120), "the oldest live session");
        assert_eq!(connection.last_seen, at(now, 2));
        assert_eq!(summary.recheck_in, Some(Duration::from_secs(70)));
        assert!(summary.forget.is_empty());
    }

    #[test]
    fn a_killed_replica_leaves_the_count_before_its_entry_expires() {
        let now = SystemTime::now();
        let sessions = BTreeMap::from([
            // Killed 10 s ago: its entry is still fresh, but the others
            // have since written that it left.
            (
                "killed".to_owned(),
                session(now, true, 10, &["killed", "a", "b"]),
            ),
            ("a".to_owned(), session(now, true, 1, &["a", "b", "new"])),
            ("b".to_owned(), session(now, true, 2, &["a", "b", "new"])),
        ]);
        let connection = summarize(&sessions, now).connection.expect("reported");
        assert_eq!(connection.replicas.as_deref(), Some("2/3"));
    }

    #[test]
    fn a_replica_that_died_silently_expires_and_is_forgotten() {
        let now = SystemTime::now();
        let sessions = BTreeMap::from([
            ("gone".to_owned(), session(now, true, 95, &["gone"])),
            (
                "long-gone".to_owned(),
                session(now, true, 700, &["long-gone"]),
            ),
        ]);
        let summary = summarize(&sessions, now);
        let connection = summary.connection.expect("reported");
        assert!(!connection.connected, "stale sessions do not count");
        assert_eq!(connection.replicas.as_deref(), Some("0/0"));
        assert_eq!(summary.forget, ["long-gone"]);
        assert_eq!(summary.recheck_in, None);
    }
}
