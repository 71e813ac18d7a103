//! Structured logs for the binaries. `--log-level` takes a level or a full
//! `RUST_LOG`-style filter; `LOG_FORMAT=json` switches to JSON lines.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Crates whose trace output carries payloads (WebSocket frames hold
/// tunnel bytes, request bodies and credentials messages): capped at debug
/// unless the filter names them itself.
const PAYLOAD_LOGGERS: [&str; 3] = ["tungstenite", "tokio_tungstenite", "h2"];

pub fn init(level: &str) {
    init_with(filter(level));
}

/// The filter for `level`, with payload-logging crates capped.
fn filter(level: &str) -> EnvFilter {
    let mut filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    // Only a filter that lets trace through needs capping.
    if filter
        .max_level_hint()
        .is_some_and(|max| max <= tracing_subscriber::filter::LevelFilter::DEBUG)
    {
        return filter;
    }
    for target in PAYLOAD_LOGGERS {
        let named = level
            .split(',')
            .any(|directive| directive.trim().split(['=', ':', '[']).next() == Some(target));
        if !named && let Ok(cap) = format!("{target}=debug").parse() {
            filter = filter.add_directive(cap);
        }
    }
    filter
}

fn init_with(filter: EnvFilter) {
    let json = std::env::var("LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal, not for files and log collectors.
        .with_ansi(std::io::stderr().is_terminal());
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_never_reaches_payload_loggers_unless_asked_for() {
        let directives = |level: &str| -> Vec<String> {
            filter(level)
                .to_string()
                .split(',')
                .map(str::to_owned)
                .collect()
        };
        let capped = directives("trace");
        for target in PAYLOAD_LOGGERS {
            assert!(capped.contains(&format!("{target}=debug")), "{capped:?}");
        }
        assert_eq!(directives("info"), ["info"], "nothing raised below trace");
        let asked = directives("trace,tungstenite=trace");
        assert!(asked.contains(&"tungstenite=trace".to_owned()), "{asked:?}");
        assert!(
            !asked.contains(&"tungstenite=debug".to_owned()),
            "{asked:?}"
        );
    }
}
