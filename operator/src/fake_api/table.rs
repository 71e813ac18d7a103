//! Server-side printing: `kubectl get` asks for a `meta.k8s.io/v1` Table
//! and prints its cells, so the columns (a CRD's printer columns, or NAME
//! and AGE) are computed here, as kube-apiserver does.

use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};

use super::discovery::Column;

/// Whether a request's `Accept` header asks for a Table.
pub fn wanted(accept: &str) -> bool {
    accept.split(',').any(|media| media.contains("as=Table"))
}

/// `objects` as a Table with the resource's columns.
pub fn of(objects: &[Value], columns: &[Column], resource_version: &str, now: Timestamp) -> Value {
    let age = Column {
        name: "Age".into(),
        kind: "date".into(),
        json_path: ".metadata.creationTimestamp".into(),
        priority: 0,
    };
    let columns: Vec<&Column> = match columns {
        [] => vec![&age],
        given => given.iter().collect(),
    };
    let mut definitions = vec![json!({"name": "Name", "type": "string", "format": "name",
        "description": "the object's name", "priority": 0})];
    definitions.extend(columns.iter().map(|c| {
        json!({"name": c.name, "type": c.kind, "format": "", "description": "", "priority": c.priority})
    }));
    let rows: Vec<Value> = objects
        .iter()
        .map(|object| {
            let mut cells = vec![object["metadata"]["name"].clone()];
            cells.extend(columns.iter().map(|c| cell(object, c, now)));
            json!({"cells": cells, "object": {"kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1", "metadata": object["metadata"]}})
        })
        .collect();
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version},
        "columnDefinitions": definitions, "rows": rows})
}

fn cell(object: &Value, column: &Column, now: Timestamp) -> Value {
    let Some(value) = json_path(object, &column.json_path).into_iter().next() else {
        return Value::Null;
    };
    match (column.kind.as_str(), value.as_str()) {
        ("date", Some(text)) => text
            .parse::<Timestamp>()
            .map_or_else(|_| value.clone(), |at| json!(human_duration(now, at))),
        _ => value.clone(),
    }
}

/// The values a printer column's JSONPath selects: `.a.b`, `.a[0]` and
/// the filter `.a[?(@.key=="value")]`, which is what CRDs use.
pub fn json_path<'a>(object: &'a Value, path: &str) -> Vec<&'a Value> {
    let mut current = vec![object];
    let mut rest = path.trim_start_matches('{').trim_end_matches('}');
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix('.') {
            let end = after.find(['.', '[']).unwrap_or(after.len());
            let field = &after[..end];
            current = current.iter().filter_map(|v| v.get(field)).collect();
            rest = &after[end..];
        } else if let Some(after) = rest.strip_prefix('[') {
            let Some(end) = after.find(']') else {
                return Vec::new();
            };
            let selector = &after[..end];
            current = match selector.parse::<usize>() {
                Ok(index) => current
                    .iter()
                    .filter_map(|v| v.as_array()?.get(index))
                    .collect(),
                Err(_) => match filter_equality(selector) {
                    Some((key, wanted)) => current
                        .iter()
                        .filter_map(|v| v.as_array())
                        .flatten()
                        .filter(|v| v.get(key).and_then(Value::as_str) == Some(wanted))
                        .collect(),
                    None => return Vec::new(),
                },
            };
            rest = &after[end + 1..];
        } else {
            return Vec::new();
        }
    }
    current
}

/// `?(@.key=="value")` → (key, value).
fn filter_equality(selector: &str) -> Option<(&str, &str)> {
    let inner = selector.strip_prefix("?(@.")?.strip_suffix(')')?;
    let (key, value) = inner.split_once("==")?;
    Some((key.trim(), value.trim().trim_matches(['"', '\''])))
}

/// How kubectl shows an age: `45s`, `3m12s`, `47m`, `5h3m`, `20h`, `3d4h`, `30d`.
pub fn human_duration(now: Timestamp, then: Timestamp) -> String {
    let seconds = now.as_second().saturating_sub(then.as_second()).max(0);
    let (minutes, hours, days) = (seconds / 60, seconds / 3600, seconds / 86400);
    match () {
        _ if seconds < 120 => format!("{seconds}s"),
        _ if minutes < 10 => format!("{minutes}m{}s", seconds % 60),
        _ if hours < 3 => format!("{minutes}m"),
        _ if hours < 8 => format!("{hours}h{}m", minutes % 60),
        _ if hours < 48 => format!("{hours}h"),
        _ if days < 8 && hours % 24 != 0 => format!("{days}d{}h", hours % 24),
        _ => format!("{days}d"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_paths_as_printer_columns_write_them() {
        let object = json!({"status": {"connection": {"connected": true},
            "conditions": [{"type": "Synced", "status": "False"}, {"type": "Ready", "status": "True"}]}});
        assert_eq!(
            json_path(&object, ".status.connection.connected"),
            vec![&json!(true)]
        );
        assert_eq!(
            json_path(&object, r#".status.conditions[?(@.type=="Ready")].status"#),
            vec![&json!("True")]
        );
        assert_eq!(
            json_path(&object, ".status.conditions[0].type"),
            vec![&json!("Synced")]
        );
        assert!(json_path(&object, ".status.missing.field").is_empty());
        assert!(json_path(&object, ".status.conditions[?(oops)]").is_empty());
    }

    #[test]
    fn ages_read_like_kubectl() {
        let now: Timestamp = "2026-12-03T12:00:00Z".parse().expect("time");
        let ago =
            |s: i64| human_duration(now, Timestamp::from_second(now.as_second() - s).expect("t"));
        assert_eq!(ago(45), "45s");
        assert_eq!(ago(192), "3m12s");
        assert_eq!(ago(47 * 60), "47m");
        assert_eq!(ago(5 * 3600 + 180), "5h3m");
        assert_eq!(ago(20 * 3600), "20h");
        assert_eq!(ago(3 * 86400 + 4 * 3600), "3d4h");
        assert_eq!(ago(30 * 86400), "30d");
        assert_eq!(ago(-5), "0s");
    }

    #[test]
    fn tables_carry_the_columns_and_the_metadata() {
        let now: Timestamp = "2026-12-03T12:00:00Z".parse().expect("time");
        let objects = [json!({"metadata": {"name": "a", "namespace": "n",
            "creationTimestamp": "2026-12-03T11:59:00Z"}, "status": {"clusterId": "a"}})];
        let columns = [Column {
            name: "ID".into(),
            kind: "string".into(),
            json_path: ".status.clusterId".into(),
            priority: 0,
        }];
        let table = of(&objects, &columns, "7", now);
        assert_eq!(table["columnDefinitions"][1]["name"], "ID");
        assert_eq!(table["rows"][0]["cells"], json!(["a", "a"]));
        assert_eq!(table["rows"][0]["object"]["metadata"]["namespace"], "n");
        let default = of(&objects, &[], "7", now);
        assert_eq!(default["rows"][0]["cells"], json!(["a", "60s"]));
        assert!(wanted(
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
        ));
        assert!(!wanted("application/json"));
    }
}
