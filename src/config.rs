//! Configuration: one TOML file read by both daemons.
//!
//! Every key has a default, so an empty file (or none at the default path) is
//! a valid configuration. Unknown keys and bad values are errors: a typo in
//! `/etc/chat-ha/chat-ha.toml` must stop the daemon at start, naming the file,
//! the line and the key, rather than be silently ignored.

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Where the daemons look for their configuration when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/chat-ha/chat-ha.toml";

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
}

/// The whole configuration of both daemons.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub log: LogConfig,
    pub redis: RedisConfig,
    pub history: HistoryConfig,
    pub frontend: FrontendConfig,
    pub backend: BackendConfig,
}

/// `[log]`: how much the daemons say.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// The least severe level logged; `RUST_LOG` overrides it.
    pub level: LogLevel,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: LogLevel::Info,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

/// `[redis]`: where messages are stored and how long to wait for it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// A `redis://` (or `unix://`) URL.
    pub url: RedisUrl,
    /// Every key the project writes starts with this prefix and a colon, so
    /// several clusters can share one Redis.
    pub key_prefix: String,
    /// How long one command may take before the request fails with 503.
    pub command_timeout_ms: NonZeroU32,
    /// First and longest pause between reconnection attempts.
    pub reconnect_min_ms: NonZeroU32,
    pub reconnect_max_ms: NonZeroU32,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: RedisUrl("redis://127.0.0.1:6379/0".into()),
            key_prefix: "chat".into(),
            command_timeout_ms: NonZeroU32::new(1500).unwrap(),
            reconnect_min_ms: NonZeroU32::new(100).unwrap(),
            reconnect_max_ms: NonZeroU32::new(5000).unwrap(),
        }
    }
}

impl RedisConfig {
    pub fn command_timeout(&self) -> Duration {
        millis(self.command_timeout_ms)
    }
    pub fn reconnect_min(&self) -> Duration {
        millis(self.reconnect_min_ms)
    }
    pub fn reconnect_max(&self) -> Duration {
        millis(self.reconnect_max_ms)
    }
}

/// A Redis URL that was checked when the configuration was read.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct RedisUrl(String);

impl RedisUrl {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for RedisUrl {
    type Error = String;
    fn try_from(url: String) -> Result<Self, String> {
        redis::Client::open(url.as_str())
            .map(|_| RedisUrl(url.clone()))
            .map_err(|e| format!("invalid Redis URL {url:?}: {e}"))
    }
}

impl std::str::FromStr for RedisUrl {
    type Err = String;
    fn from_str(url: &str) -> Result<Self, String> {
        RedisUrl::try_from(url.to_owned())
    }
}

/// `[history]`: how much Redis keeps.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// Messages kept per room (Redis trims approximately, so a few more may stay).
    pub max_per_room: NonZeroUsize,
    /// Messages kept in the stream every frontend follows: how far back a
    /// frontend can resume after losing Redis.
    pub feed_length: NonZeroUsize,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        Self {
            max_per_room: NonZeroUsize::new(1000).unwrap(),
            feed_length: NonZeroUsize::new(100_000).unwrap(),
        }
    }
}

/// `[frontend]`: the Socket.IO daemon.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FrontendConfig {
    /// Address bound when systemd passes no socket and `--listen` is not given.
    pub listen: SocketAddr,
    /// The directory the chat page is served from.
    pub www_dir: PathBuf,
    /// How many rooms one socket may be in at once.
    pub max_rooms_per_socket: NonZeroUsize,
    /// Events one socket may send per second, and at once.
    pub events_per_second: NonZeroU32,
    pub events_burst: NonZeroU32,
    /// Runtime threads; 1 runs a single-threaded runtime (one instance per CPU).
    pub threads: NonZeroUsize,
    /// On SIGTERM, how long the status endpoint reports `draining` (so the
    /// load balancer stops sending new clients) before clients are told to go.
    pub drain_delay_ms: u32,
    /// Time allowed, after the drain, for a graceful stop before remaining
    /// connections are dropped.
    pub shutdown_timeout_ms: NonZeroU32,
}

impl Default for FrontendConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9100)),
            www_dir: PathBuf::from("/usr/share/chat-ha/www"),
            max_rooms_per_socket: NonZeroUsize::new(16).unwrap(),
            events_per_second: NonZeroU32::new(10).unwrap(),
            events_burst: NonZeroU32::new(20).unwrap(),
            threads: NonZeroUsize::MIN,
            drain_delay_ms: 1500,
            shutdown_timeout_ms: NonZeroU32::new(5_000).unwrap(),
        }
    }
}

/// `[backend]`: the REST daemon.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackendConfig {
    /// Address bound when systemd passes no socket and `--listen` is not given.
    pub listen: SocketAddr,
    /// Largest request body accepted; larger ones get 413.
    pub max_body_bytes: NonZeroUsize,
    /// File of tokens allowed to use `POST /back/publish`, when systemd passes
    /// no `publish-tokens` credential. Unset: publishing is off.
    pub publish_tokens_file: Option<PathBuf>,
    /// Runtime threads; 1 runs a single-threaded runtime (one instance per CPU).
    pub threads: NonZeroUsize,
    /// Time allowed for a graceful stop before remaining connections are dropped.
    pub shutdown_timeout_ms: NonZeroU32,
}

impl Default for BackendConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9200)),
            max_body_bytes: NonZeroUsize::new(16 * 1024).unwrap(),
            publish_tokens_file: None,
            threads: NonZeroUsize::MIN,
            shutdown_timeout_ms: NonZeroU32::new(10_000).unwrap(),
        }
    }
}

impl FrontendConfig {
    pub fn shutdown_timeout(&self) -> Duration {
        millis(self.shutdown_timeout_ms)
    }
    pub fn drain_delay(&self) -> Duration {
        Duration::from_millis(u64::from(self.drain_delay_ms))
    }
}

impl BackendConfig {
    pub fn shutdown_timeout(&self) -> Duration {
        millis(self.shutdown_timeout_ms)
    }
}

fn millis(ms: NonZeroU32) -> Duration {
    Duration::from_millis(u64::from(ms.get()))
}

impl Config {
    /// Parses a configuration from TOML text; `path` only names it in errors.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    /// Reads the file at `path`. A missing file at the default path means
    /// "all defaults"; a missing file that was asked for by name is an error.
    pub fn load(path: &Path, explicitly_given: bool) -> Result<Self, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::from_toml(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicitly_given => {
                Ok(Self::default())
            }
            Err(source) => Err(ConfigError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        Config::from_toml(text, Path::new("/etc/chat-ha/test.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn empty_file_gives_defaults() {
        let config = parse("").unwrap();
        assert_eq!(config.history.max_per_room.get(), 1000);
        assert_eq!(config.frontend.max_rooms_per_socket.get(), 16);
        assert_eq!(config.backend.max_body_bytes.get(), 16 * 1024);
        assert_eq!(config.redis.url.as_str(), "redis://127.0.0.1:6379/0");
    }

    #[test]
    fn shipped_file_parses_to_the_defaults() {
        let text = include_str!("../etc/chat-ha/chat-ha.toml");
        let shipped = parse(text).unwrap();
        let default = Config::default();
        assert_eq!(format!("{shipped:?}"), format!("{default:?}"));
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let err = parse("[redis]\nurl = \"redis://10.0.0.1/\"\ntimeout = 3\n").unwrap_err();
        assert!(err.contains("/etc/chat-ha/test.toml"), "{err}");
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("unknown field `timeout`"), "{err}");
    }

    #[test]
    fn unknown_section_is_rejected() {
        let err = parse("[fronted]\nlisten = \"127.0.0.1:1\"\n").unwrap_err();
        assert!(err.contains("unknown field `fronted`"), "{err}");
    }

    #[test]
    fn bad_values_are_rejected_with_their_line() {
        let err = parse("[frontend]\n\nlisten = \"nowhere\"\n").unwrap_err();
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("listen"), "{err}");

        let err = parse("[history]\nmax_per_room = 0\n").unwrap_err();
        assert!(err.contains("line 2"), "{err}");
        assert!(err.contains("nonzero"), "{err}");

        let err = parse("[redis]\nurl = \"http://example\"\n").unwrap_err();
        assert!(err.contains("invalid Redis URL"), "{err}");

        let err = parse("[log]\nlevel = \"loud\"\n").unwrap_err();
        assert!(err.contains("unknown variant `loud`"), "{err}");
    }

    #[test]
    fn missing_default_file_means_defaults_but_missing_named_file_is_an_error() {
        let missing = Path::new("/nonexistent/chat-ha.toml");
        assert!(Config::load(missing, false).is_ok());
        let err = Config::load(missing, true).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/chat-ha.toml"), "{err}");
    }
}
