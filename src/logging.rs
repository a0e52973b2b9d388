//! Logging: to the journal through syslog under systemd, to stderr otherwise.
//!
//! Under systemd, lines go through `syslog(3)` (facility `daemon`) so the
//! journal records each with its priority (`journalctl -p warning` works)
//! and the daemon's name as its identifier (`journalctl -t chat-frontend`).
//! Levels map to priorities without loss: error → err, warn → warning,
//! info → notice, debug → info, trace → debug. In a terminal, lines are
//! human-readable on stderr. `RUST_LOG` overrides the configured level.

use std::ffi::CString;

use tracing_subscriber::EnvFilter;

use crate::config::LogLevel;

/// True when systemd started this process with its output going to the journal.
pub fn under_systemd() -> bool {
    std::env::var_os("JOURNAL_STREAM").is_some() || std::env::var_os("INVOCATION_ID").is_some()
}

/// Installs the global logger. `identity` names the daemon in the journal.
pub fn init(identity: &str, level: LogLevel) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(default_directives(level)));
    let syslog = under_systemd().then(|| open_syslog(identity)).flatten();
    let result = match syslog {
        Some(syslog) => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(syslog)
            .without_time() // the journal stamps every line itself
            .with_level(false) // and shows the priority
            .with_ansi(false)
            .try_init(),
        None => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .try_init(),
    };
    // Only fails if a logger is already installed (tests start several daemons).
    let _ = result;
}

/// The configured level for this project's code; libraries stay at `warn`
/// unless `RUST_LOG` asks for more, since their debug output is a flood.
fn default_directives(level: LogLevel) -> String {
    let level = level.as_str();
    format!("warn,chat_ha={level},chat_frontend={level},chat_backend={level}")
}

fn open_syslog(identity: &str) -> Option<syslog_tracing::Syslog> {
    let identity = CString::new(identity).ok()?;
    let options = Default::default();
    syslog_tracing::Syslog::new(identity, options, syslog_tracing::Facility::Daemon)
}
