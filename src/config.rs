//! Configuration: one TOML file read by both daemons.
//!
//! Every key has a default, so an empty file (or none at the default path) is
//! a valid configuration. Unknown keys and bad values are errors: a typo in
//! `/etc/chat-ha/chat-ha.toml` must stop the daemon at start, naming the file,
//! the line and the key, rather than be silently ignored.

use std::net::{IpAddr, SocketAddr};
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Where the daemons look for their configuration when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/chat-ha/chat-ha.toml";

/// The least `frontend.max_queued_bytes`: twice the largest message as sent
/// (4,000 characters, each escaped in JSON as up to 6 bytes, and the event
/// around them), so that a queue half full still takes any message.
pub const MIN_QUEUED_BYTES: usize = 64 * 1024;

/// `frontend.ping_interval_ms` and `frontend.ping_timeout_ms` by default:
/// the Engine.IO defaults (socketioxide's, and Node's socket.io 2.x's
/// interval), which every client's own timers are made for.
pub const DEFAULT_PING_INTERVAL_MS: u32 = 25_000;
pub const DEFAULT_PING_TIMEOUT_MS: u32 = 20_000;
/// The bounds of `frontend.ping_interval_ms`. Below a second, every idle
/// client would cost the servers a packet and a wake-up several times a
/// second. A long-polling request is held open until the next heartbeat, and
/// the packaged HAProxy gives a request 60 s (`timeout server`, `timeout
/// client`): above 50 s, idle long-polling clients would be cut off by it.
pub const PING_INTERVAL_MS_BOUNDS: std::ops::RangeInclusive<u32> = 1_000..=50_000;
/// The bounds of `frontend.ping_timeout_ms`: a client gets at least a second
/// to answer, and one that vanished is let go within a minute past its
/// heartbeat (its socket, queue and rooms are held until then).
pub const PING_TIMEOUT_MS_BOUNDS: std::ops::RangeInclusive<u32> = 1_000..=60_000;
/// The bounds of `frontend.write_window_us`: 0 (off) to 100 ms. Longer, and
/// a conversation would notice the wait.
pub const WRITE_WINDOW_US_MAX: u32 = 100_000;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The parser's message quotes the offending line: the credentials of
    /// any URL in it are masked.
    #[error("{path}: {}", mask_credentials(&source.to_string()))]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{path}: {key} {problem}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        problem: String,
    },
}

/// `text` with the user and password of every `scheme://user:pass@host`
/// replaced by `***`.
fn mask_credentials(text: &str) -> String {
    let mut masked = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        masked.push_str(head);
        let authority_end = tail
            .find(|c: char| c == '/' || c == '"' || c.is_whitespace())
            .unwrap_or(tail.len());
        match tail[..authority_end].rfind('@') {
            Some(user_end) => {
                masked.push_str("***");
                rest = &tail[user_end..];
            }
            None => rest = tail,
        }
    }
    masked.push_str(rest);
    masked
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
    pub access: AccessConfig,
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

/// `[redis]`: where messages are stored, how to log in, and how long to
/// wait for it.
///
/// Read from the keys as written ([`RedisKeys`]) and checked as a whole:
/// exactly one of `url` and `sentinels` says where Redis is ([`RedisMode`]),
/// and the keys of Sentinel mode are refused without `sentinels`.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RedisKeys")]
pub struct RedisConfig {
    /// One Redis, or the Sentinels that know which Redis is the primary.
    pub mode: RedisMode,
    /// The Redis ACL user the daemons log in as, when they have a password.
    pub username: String,
    /// File holding the password, when systemd passes no `redis-password`
    /// credential. Unset, and no credential: no password is sent.
    pub password_file: Option<PathBuf>,
    /// CA certificate (PEM) a `rediss://` server's certificate is checked
    /// against; unset: the system's trusted CAs.
    pub tls_ca_file: Option<PathBuf>,
    /// Every key the project writes starts with this prefix and a colon, so
    /// several clusters can share one Redis.
    pub key_prefix: String,
    /// How many partitions rooms are spread over (by a digest of their
    /// name): every key and channel of a room carries its partition's hash
    /// tag, so in a Redis Cluster a room lives in one slot, and a frontend
    /// resubscribes its rooms one partition at a time. Fixed for the life
    /// of a deployment: changing it moves every room to other keys.
    pub partitions: NonZeroU32,
    /// How long one command may take before the request fails with 503.
    pub command_timeout_ms: NonZeroU32,
    /// First and longest pause between reconnection attempts.
    pub reconnect_min_ms: NonZeroU32,
    pub reconnect_max_ms: NonZeroU32,
}

/// Where Redis is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisMode {
    /// One Redis at this URL (`redis.url`): the default.
    Single(RedisUrl),
    /// A primary and its replicas, watched by Sentinels (`redis.sentinels`):
    /// the daemons ask the Sentinels which one is the primary and follow it
    /// across failovers.
    Sentinel(SentinelConfig),
    /// A Redis Cluster (`redis.cluster`): its topology is found through
    /// these seed nodes, and each room lives on the shard of its slot.
    Cluster(ClusterConfig),
}

/// Cluster mode: where to find the cluster, and how safe a 201 must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// `redis://HOST:PORT` (or `rediss://`) of some of its nodes.
    pub seeds: Vec<RedisUrl>,
    /// Replicas of the room's shard that must hold a message before the
    /// backend answers 201; 0 acknowledges once the shard's primary has it.
    pub min_replicas_acked: u32,
    /// How long the backend waits for those replicas before answering 503.
    pub replica_ack_timeout_ms: NonZeroU32,
}

impl ClusterConfig {
    pub fn replica_ack_timeout(&self) -> Duration {
        millis(self.replica_ack_timeout_ms)
    }
}

/// Sentinel mode: who to ask, about what, and how safe a 201 must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentinelConfig {
    /// `redis://HOST:PORT` (or `rediss://`) of each Sentinel, tried in turn.
    pub sentinels: Vec<RedisUrl>,
    /// The name the Sentinels monitor the primary under (`sentinel monitor NAME ...`).
    pub master: String,
    /// File holding the Sentinels' own password (their `requirepass`);
    /// unset: the Sentinels are asked without logging in.
    pub password_file: Option<PathBuf>,
    /// Replicas that must hold a message before the backend answers 201
    /// (Redis's `WAIT`); 0 acknowledges once the primary has it.
    pub min_replicas_acked: u32,
    /// How long the backend waits for those replicas before answering 503.
    pub replica_ack_timeout_ms: NonZeroU32,
}

impl SentinelConfig {
    pub fn replica_ack_timeout(&self) -> Duration {
        millis(self.replica_ack_timeout_ms)
    }
}

/// `[redis]` as written in the file: every key optional, checked into a
/// [`RedisConfig`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RedisKeys {
    url: Option<RedisUrl>,
    sentinels: Option<Vec<RedisUrl>>,
    cluster: Option<Vec<RedisUrl>>,
    sentinel_master: Option<String>,
    sentinel_password_file: Option<PathBuf>,
    min_replicas_acked: Option<u32>,
    replica_ack_timeout_ms: Option<NonZeroU32>,
    username: String,
    password_file: Option<PathBuf>,
    tls_ca_file: Option<PathBuf>,
    key_prefix: String,
    partitions: NonZeroU32,
    command_timeout_ms: NonZeroU32,
    reconnect_min_ms: NonZeroU32,
    reconnect_max_ms: NonZeroU32,
}

impl Default for RedisKeys {
    fn default() -> Self {
        let defaults = RedisConfig::default();
        RedisKeys {
            url: None,
            sentinels: None,
            cluster: None,
            sentinel_master: None,
            sentinel_password_file: None,
            min_replicas_acked: None,
            replica_ack_timeout_ms: None,
            username: defaults.username,
            password_file: defaults.password_file,
            tls_ca_file: defaults.tls_ca_file,
            key_prefix: defaults.key_prefix,
            partitions: defaults.partitions,
            command_timeout_ms: defaults.command_timeout_ms,
            reconnect_min_ms: defaults.reconnect_min_ms,
            reconnect_max_ms: defaults.reconnect_max_ms,
        }
    }
}

/// Replicas a message must reach before 201, unless `redis.min_replicas_acked` says otherwise.
pub const DEFAULT_MIN_REPLICAS_ACKED: u32 = 1;
/// How long to wait for them, unless `redis.replica_ack_timeout_ms` says otherwise.
pub const DEFAULT_REPLICA_ACK_TIMEOUT_MS: u32 = 1000;

impl TryFrom<RedisKeys> for RedisConfig {
    type Error = String;
    /// The mode the keys describe; an error names the key at fault.
    fn try_from(keys: RedisKeys) -> Result<Self, String> {
        let given: Vec<&str> = [
            ("redis.url", keys.url.is_some()),
            ("redis.sentinels", keys.sentinels.is_some()),
            ("redis.cluster", keys.cluster.is_some()),
        ]
        .into_iter()
        .filter_map(|(key, given)| given.then_some(key))
        .collect();
        if given.len() > 1 {
            let set = match given.as_slice() {
                [a, b] => format!("{a} and {b} are both set"),
                _ => "redis.url, redis.sentinels and redis.cluster are all set".to_owned(),
            };
            return Err(format!(
                "{set}: give exactly one (one Redis, the Sentinels of a replicated one, \
                 or a cluster)"
            ));
        }
        let sentinel_only = [
            ("redis.sentinel_master", keys.sentinel_master.is_some()),
            (
                "redis.sentinel_password_file",
                keys.sentinel_password_file.is_some(),
            ),
        ];
        let replicated_only = [
            (
                "redis.min_replicas_acked",
                keys.min_replicas_acked.is_some(),
            ),
            (
                "redis.replica_ack_timeout_ms",
                keys.replica_ack_timeout_ms.is_some(),
            ),
        ];
        let misplaced = |keys: &[(&'static str, bool)]| {
            keys.iter().find(|(_, given)| *given).map(|(key, _)| *key)
        };
        let mode = if let Some(sentinels) = keys.sentinels {
            RedisMode::Sentinel(sentinel_mode(
                sentinels,
                keys.sentinel_master,
                keys.sentinel_password_file,
                keys.min_replicas_acked,
                keys.replica_ack_timeout_ms,
            )?)
        } else if let Some(key) = misplaced(&sentinel_only) {
            return Err(format!(
                "{key} is only valid with redis.sentinels (Sentinel mode)"
            ));
        } else if let Some(seeds) = keys.cluster {
            RedisMode::Cluster(cluster_mode(
                seeds,
                keys.min_replicas_acked,
                keys.replica_ack_timeout_ms,
            )?)
        } else if let Some(key) = misplaced(&replicated_only) {
            return Err(format!(
                "{key} is only valid with redis.sentinels or redis.cluster (replicated modes)"
            ));
        } else {
            RedisMode::Single(keys.url.unwrap_or_else(RedisUrl::default_single))
        };
        Ok(RedisConfig {
            mode,
            username: keys.username,
            password_file: keys.password_file,
            tls_ca_file: keys.tls_ca_file,
            key_prefix: keys.key_prefix,
            partitions: keys.partitions,
            command_timeout_ms: keys.command_timeout_ms,
            reconnect_min_ms: keys.reconnect_min_ms,
            reconnect_max_ms: keys.reconnect_max_ms,
        })
    }
}

/// Checks the keys of cluster mode.
fn cluster_mode(
    seeds: Vec<RedisUrl>,
    min_replicas_acked: Option<u32>,
    replica_ack_timeout_ms: Option<NonZeroU32>,
) -> Result<ClusterConfig, String> {
    if seeds.is_empty() {
        return Err("redis.cluster is empty: list at least one of its nodes, \
             e.g. [\"redis://10.0.0.11:6379\"]"
            .into());
    }
    if let Some(unix) = seeds.iter().position(|url| url.is_unix()) {
        return Err(format!(
            "redis.cluster[{unix}] is a unix socket: cluster nodes are reached over TCP \
             (redis:// or rediss://), as the cluster names them by host and port"
        ));
    }
    if seeds.iter().any(|url| url.is_tls()) != seeds.iter().all(|url| url.is_tls()) {
        return Err(
            "redis.cluster mixes redis:// and rediss://: a cluster is reached \
             over TLS or not at all"
                .into(),
        );
    }
    Ok(ClusterConfig {
        seeds,
        min_replicas_acked: min_replicas_acked.unwrap_or(DEFAULT_MIN_REPLICAS_ACKED),
        replica_ack_timeout_ms: replica_ack_timeout_ms
            .unwrap_or(NonZeroU32::new(DEFAULT_REPLICA_ACK_TIMEOUT_MS).unwrap()),
    })
}

/// Checks the keys of Sentinel mode.
fn sentinel_mode(
    sentinels: Vec<RedisUrl>,
    master: Option<String>,
    password_file: Option<PathBuf>,
    min_replicas_acked: Option<u32>,
    replica_ack_timeout_ms: Option<NonZeroU32>,
) -> Result<SentinelConfig, String> {
    if sentinels.is_empty() {
        return Err("redis.sentinels is empty: list at least one Sentinel, \
             e.g. [\"redis://10.0.0.7:26379\"]"
            .into());
    }
    if let Some(unix) = sentinels.iter().position(|url| url.is_unix()) {
        return Err(format!(
            "redis.sentinels[{unix}] is a unix socket: Sentinels are reached over TCP \
             (redis:// or rediss://), as they name the primary by host and port"
        ));
    }
    let master = match master {
        None => {
            return Err("redis.sentinel_master is missing: with redis.sentinels, \
             name the primary as the Sentinels monitor it"
                .into());
        }
        Some(name) if name.is_empty() || name.contains(char::is_whitespace) => {
            return Err(format!(
                "redis.sentinel_master {name:?} is not a Sentinel master name"
            ));
        }
        Some(name) => name,
    };
    Ok(SentinelConfig {
        sentinels,
        master,
        password_file,
        min_replicas_acked: min_replicas_acked.unwrap_or(DEFAULT_MIN_REPLICAS_ACKED),
        replica_ack_timeout_ms: replica_ack_timeout_ms
            .unwrap_or(NonZeroU32::new(DEFAULT_REPLICA_ACK_TIMEOUT_MS).unwrap()),
    })
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            mode: RedisMode::Single(RedisUrl::default_single()),
            username: "chat-ha".into(),
            password_file: None,
            tls_ca_file: None,
            key_prefix: "chat".into(),
            partitions: NonZeroU32::new(256).unwrap(),
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

    /// `redis.url` when no mode is given: a Redis on this host.
    fn default_single() -> Self {
        RedisUrl("redis://127.0.0.1:6379/0".into())
    }

    /// Whether it names a unix socket rather than a host and port.
    pub fn is_unix(&self) -> bool {
        self.0.starts_with("unix:") || self.0.starts_with("redis+unix:")
    }

    /// Whether it is reached over TLS.
    pub fn is_tls(&self) -> bool {
        self.0.starts_with("rediss:")
    }
}

impl TryFrom<String> for RedisUrl {
    type Error = String;
    /// Accepts a URL redis-rs can connect to, without a password: the
    /// configuration file is readable by everyone on the host, so the
    /// password lives in a credential file of its own (`redis.password_file`).
    /// Errors never repeat the URL, which may hold one.
    fn try_from(url: String) -> Result<Self, String> {
        use redis::IntoConnectionInfo;
        let info = url
            .as_str()
            .into_connection_info()
            .map_err(|e| format!("invalid Redis URL: {e}"))?;
        if info.redis_settings().password().is_some() {
            return Err("the Redis URL must not hold a password: put it in \
                 /etc/chat-ha/redis-password (or the file redis.password_file names)"
                .into());
        }
        Ok(RedisUrl(url))
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
    /// No longer used: the bounds of the stream every frontend followed,
    /// before frontends followed their rooms one by one. Accepted, with a
    /// warning at start ([`Config::obsolete_keys`]), so that a file written
    /// for an older version still loads.
    pub feed_length: Option<NonZeroUsize>,
    pub feed_bytes: Option<NonZeroUsize>,
    /// A room nobody posted to for this many days is forgotten, history and
    /// all; every post starts the count again.
    pub room_ttl_days: NonZeroU32,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        Self {
            max_per_room: NonZeroUsize::new(1000).unwrap(),
            feed_length: None,
            feed_bytes: None,
            room_ttl_days: NonZeroU32::new(30).unwrap(),
        }
    }
}

impl HistoryConfig {
    pub fn room_ttl(&self) -> Duration {
        Duration::from_secs(u64::from(self.room_ttl_days.get()) * 24 * 3600)
    }
}

/// `[frontend]`: the Socket.IO daemon.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FrontendConfig {
    /// Where instance 0 listens; instance N listens on the port N above it.
    /// Under systemd the socket units are made from it (chat-ha-generator).
    pub listen: SocketAddr,
    /// Where instance 0 serves `/metrics`; instance N on the port N above.
    pub metrics_listen: SocketAddr,
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
    /// Most bytes waiting in one socket's send queue; a socket that would
    /// have more is let go (it reconnects and resumes).
    pub max_queued_bytes: NonZeroUsize,
    /// A socket whose send queue has not emptied for this long is let go.
    pub backlog_timeout_ms: NonZeroU32,
    /// History messages one client address may be replayed (resuming
    /// joins): per second on average, and at once.
    pub replay_per_second: NonZeroU32,
    pub replay_burst: NonZeroU32,
    /// The Engine.IO heartbeat's period. Engine.IO 4: the server pings each
    /// client this often. Engine.IO 3 (socket.io 2.x): the handshake tells
    /// the client to ping this often, and the server answers.
    pub ping_interval_ms: u32,
    /// How long past the period a client may stay silent: an Engine.IO 4
    /// client that has not answered a ping within this long, or an
    /// Engine.IO 3 client that has not pinged within interval + timeout, is
    /// disconnected (a client that vanished without closing its connection
    /// is noticed by then).
    pub ping_timeout_ms: u32,
    /// Nagle's rule for deliveries, in microseconds (0: off). The first
    /// messages after a quiet spell go to the sockets at once; those that
    /// arrive within this long of a delivery wait until it has passed and
    /// go out together, with one write per socket instead of one each. The
    /// window ends early once 512 messages, or a quarter of
    /// `max_queued_bytes` of text, wait.
    pub write_window_us: u32,
}

impl Default for FrontendConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9100)),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 9300)),
            www_dir: PathBuf::from("/usr/share/chat-ha/www"),
            max_rooms_per_socket: NonZeroUsize::new(16).unwrap(),
            events_per_second: NonZeroU32::new(10).unwrap(),
            events_burst: NonZeroU32::new(20).unwrap(),
            threads: NonZeroUsize::MIN,
            drain_delay_ms: 1500,
            shutdown_timeout_ms: NonZeroU32::new(5_000).unwrap(),
            max_queued_bytes: NonZeroUsize::new(256 * 1024).unwrap(),
            backlog_timeout_ms: NonZeroU32::new(5_000).unwrap(),
            replay_per_second: NonZeroU32::new(200).unwrap(),
            replay_burst: NonZeroU32::new(2_000).unwrap(),
            ping_interval_ms: DEFAULT_PING_INTERVAL_MS,
            ping_timeout_ms: DEFAULT_PING_TIMEOUT_MS,
            write_window_us: 0,
        }
    }
}

/// `[backend]`: the REST daemon.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackendConfig {
    /// Where instance 0 listens; instance N listens on the port N above it.
    /// Under systemd the socket units are made from it (chat-ha-generator).
    pub listen: SocketAddr,
    /// Where instance 0 serves `/metrics`; instance N on the port N above.
    pub metrics_listen: SocketAddr,
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
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 9400)),
            max_body_bytes: NonZeroUsize::new(16 * 1024).unwrap(),
            publish_tokens_file: None,
            threads: NonZeroUsize::MIN,
            shutdown_timeout_ms: NonZeroU32::new(10_000).unwrap(),
        }
    }
}

/// `[access]`: who may connect to the instances at all.
///
/// The instances sit behind the load balancers, which check hosts, origins
/// and rates: a client that reached an instance directly would skip all of
/// that. So only the listed networks may connect (under systemd the kernel
/// drops everything else, `IPAddressDeny=`; the daemons check again).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessConfig {
    /// Who may connect to the instances' ports: the load balancers (and
    /// their health checks).
    pub allow: Vec<Network>,
    /// Who may read `/metrics`: the monitoring.
    pub metrics_allow: Vec<Network>,
}

impl Default for AccessConfig {
    fn default() -> Self {
        let loopback = vec![
            Network::from(IpAddr::from([127, 0, 0, 1])).widen(8),
            Network::from(IpAddr::from(std::net::Ipv6Addr::LOCALHOST)),
        ];
        Self {
            allow: loopback.clone(),
            metrics_allow: loopback,
        }
    }
}

/// An address or a network (`10.0.0.5`, `10.0.0.0/24`, `::1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Network(ipnet::IpNet);

impl Network {
    pub fn contains(&self, address: IpAddr) -> bool {
        self.0.contains(&address.to_canonical())
    }

    /// The network of `prefix` bits around this address.
    fn widen(self, prefix: u8) -> Self {
        Network(
            ipnet::IpNet::new(self.0.addr(), prefix)
                .expect("a valid prefix")
                .trunc(),
        )
    }
}

impl From<IpAddr> for Network {
    fn from(address: IpAddr) -> Self {
        Network(ipnet::IpNet::from(address))
    }
}

impl TryFrom<String> for Network {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        if let Ok(address) = text.parse::<IpAddr>() {
            return Ok(Network::from(address));
        }
        text.parse::<ipnet::IpNet>()
            .map(|net| Network(net.trunc()))
            .map_err(|_| format!("{text:?} is not an address or network such as 10.0.0.0/24"))
    }
}

impl std::fmt::Display for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Whether `address` is in one of `networks`.
pub fn allowed(networks: &[Network], address: IpAddr) -> bool {
    networks.iter().any(|n| n.contains(address))
}

/// `address` with its port raised by `instance`: where instance N of a
/// daemon configured with `address` listens.
pub fn instance_address(address: SocketAddr, instance: u32) -> SocketAddr {
    let offset = u16::try_from(instance).unwrap_or(u16::MAX);
    let mut shifted = address;
    if address.port() != 0 {
        shifted.set_port(address.port().saturating_add(offset));
    }
    shifted
}

impl FrontendConfig {
    pub fn shutdown_timeout(&self) -> Duration {
        millis(self.shutdown_timeout_ms)
    }
    pub fn backlog_timeout(&self) -> Duration {
        millis(self.backlog_timeout_ms)
    }
    pub fn drain_delay(&self) -> Duration {
        Duration::from_millis(u64::from(self.drain_delay_ms))
    }
    pub fn ping_interval(&self) -> Duration {
        Duration::from_millis(u64::from(self.ping_interval_ms))
    }
    pub fn ping_timeout(&self) -> Duration {
        Duration::from_millis(u64::from(self.ping_timeout_ms))
    }
    /// The write window; `None` when off.
    pub fn write_window(&self) -> Option<Duration> {
        (self.write_window_us > 0).then(|| Duration::from_micros(u64::from(self.write_window_us)))
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

/// `ms` when within `bounds`, else the key and why.
fn check_millis(
    key: &'static str,
    ms: u32,
    bounds: std::ops::RangeInclusive<u32>,
) -> Result<(), (&'static str, String)> {
    if bounds.contains(&ms) {
        return Ok(());
    }
    Err((
        key,
        format!(
            "is {ms}; it must be from {} to {} (milliseconds)",
            bounds.start(),
            bounds.end()
        ),
    ))
}

impl Config {
    /// Parses a configuration from TOML text; `path` only names it in errors.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
        config
            .check()
            .map_err(|(key, problem)| ConfigError::Invalid {
                path: path.to_owned(),
                key,
                problem,
            })?;
        Ok(config)
    }

    /// What a value's type alone cannot say: the key at fault and why.
    fn check(&self) -> Result<(), (&'static str, String)> {
        let queued = self.frontend.max_queued_bytes.get();
        if queued < MIN_QUEUED_BYTES {
            return Err((
                "frontend.max_queued_bytes",
                format!(
                    "is {queued}; it must be at least {MIN_QUEUED_BYTES}, \
                     twice what the largest message may weigh"
                ),
            ));
        }
        let frontend = &self.frontend;
        check_millis(
            "frontend.ping_interval_ms",
            frontend.ping_interval_ms,
            PING_INTERVAL_MS_BOUNDS,
        )?;
        check_millis(
            "frontend.ping_timeout_ms",
            frontend.ping_timeout_ms,
            PING_TIMEOUT_MS_BOUNDS,
        )?;
        if frontend.write_window_us > WRITE_WINDOW_US_MAX {
            return Err((
                "frontend.write_window_us",
                format!(
                    "is {}; it must be from 0 (off) to {WRITE_WINDOW_US_MAX} (microseconds)",
                    frontend.write_window_us
                ),
            ));
        }
        Ok(())
    }

    /// Reads the file at `path`. A missing file at the default path means
    /// "all defaults"; a missing file that was asked for by name is an error.
    /// The keys set in the file that this version no longer uses.
    pub fn obsolete_keys(&self) -> Vec<&'static str> {
        let history = &self.history;
        [
            ("history.feed_length", history.feed_length.is_some()),
            ("history.feed_bytes", history.feed_bytes.is_some()),
        ]
        .into_iter()
        .filter_map(|(key, set)| set.then_some(key))
        .collect()
    }

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
        assert_eq!(
            config.redis.mode,
            RedisMode::Single(RedisUrl("redis://127.0.0.1:6379/0".into()))
        );
    }

    #[test]
    fn keys_an_older_version_used_still_load_and_are_named() {
        let config = parse("[history]\nfeed_length = 100000\nfeed_bytes = 67108864\n").unwrap();
        assert_eq!(
            config.obsolete_keys(),
            ["history.feed_length", "history.feed_bytes"]
        );
        assert!(parse("").unwrap().obsolete_keys().is_empty());
    }

    #[test]
    fn partitions_are_at_least_one() {
        assert_eq!(parse("").unwrap().redis.partitions.get(), 256);
        assert_eq!(
            parse("[redis]\npartitions = 16\n")
                .unwrap()
                .redis
                .partitions
                .get(),
            16
        );
        let refused = parse("[redis]\npartitions = 0\n").unwrap_err();
        assert!(refused.contains("partitions"), "{refused}");
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
    fn a_password_in_the_redis_url_is_refused_without_being_repeated() {
        let err = parse("[redis]\nurl = \"redis://chat-ha:s3cret-pass@10.0.0.1/\"\n").unwrap_err();
        assert!(err.contains("must not hold a password"), "{err}");
        assert!(!err.contains("s3cret-pass"), "{err}");
        let err = parse("[redis]\nurl = \"nonsense://s3cret-pass@x\"\n").unwrap_err();
        assert!(err.contains("invalid Redis URL"), "{err}");
        assert!(!err.contains("s3cret-pass"), "{err}");
        let tls = parse("[redis]\nurl = \"rediss://redis.example:6380/0\"\n").unwrap();
        assert_eq!(
            tls.redis.mode,
            RedisMode::Single(RedisUrl("rediss://redis.example:6380/0".into()))
        );
    }

    #[test]
    fn a_send_queue_too_small_for_a_message_is_refused() {
        let err = parse("[frontend]\nmax_queued_bytes = 1000\n").unwrap_err();
        assert!(err.contains("frontend.max_queued_bytes is 1000"), "{err}");
        assert!(parse("[frontend]\nmax_queued_bytes = 65536\n").is_ok());
    }

    #[test]
    fn the_heartbeat_defaults_to_engine_io_s_and_takes_values_within_bounds() {
        let config = parse("").unwrap();
        assert_eq!(config.frontend.ping_interval(), Duration::from_secs(25));
        assert_eq!(config.frontend.ping_timeout(), Duration::from_secs(20));

        let tuned =
            parse("[frontend]\nping_interval_ms = 1000\nping_timeout_ms = 60000\n").unwrap();
        assert_eq!(tuned.frontend.ping_interval(), Duration::from_secs(1));
        assert_eq!(tuned.frontend.ping_timeout(), Duration::from_secs(60));
        let tuned =
            parse("[frontend]\nping_interval_ms = 50000\nping_timeout_ms = 1000\n").unwrap();
        assert_eq!(tuned.frontend.ping_interval(), Duration::from_secs(50));
        assert_eq!(tuned.frontend.ping_timeout(), Duration::from_secs(1));
    }

    #[test]
    fn the_write_window_is_off_unless_set_and_at_most_100_ms() {
        assert_eq!(parse("").unwrap().frontend.write_window(), None);
        let set = parse("[frontend]\nwrite_window_us = 20000\n").unwrap();
        assert_eq!(set.frontend.write_window(), Some(Duration::from_millis(20)));
        assert!(parse("[frontend]\nwrite_window_us = 100000\n").is_ok());
        let err = parse("[frontend]\nwrite_window_us = 100001\n").unwrap_err();
        assert!(
            err.contains("frontend.write_window_us is 100001; it must be from 0 (off) to 100000"),
            "{err}"
        );
    }

    #[test]
    fn a_heartbeat_out_of_bounds_is_refused_naming_its_key() {
        for (key, value, bounds) in [
            ("ping_interval_ms", "999", "1000 to 50000"),
            ("ping_interval_ms", "50001", "1000 to 50000"),
            ("ping_interval_ms", "0", "1000 to 50000"),
            ("ping_timeout_ms", "999", "1000 to 60000"),
            ("ping_timeout_ms", "60001", "1000 to 60000"),
        ] {
            let err = parse(&format!("[frontend]\n{key} = {value}\n")).unwrap_err();
            let expected = format!("frontend.{key} is {value}; it must be from {bounds}");
            assert!(err.contains(&expected), "{err}");
        }
        let err = parse("[frontend]\nping_interval_ms = -1\n").unwrap_err();
        assert!(
            err.contains("line 2") && err.contains("ping_interval_ms"),
            "{err}"
        );
        let err = parse("[frontend]\nping_interval_ms = \"25s\"\n").unwrap_err();
        assert!(
            err.contains("line 2") && err.contains("ping_interval_ms"),
            "{err}"
        );
        let err = parse("[frontend]\nping_intervall_ms = 1000\n").unwrap_err();
        assert!(err.contains("unknown field `ping_intervall_ms`"), "{err}");
    }

    #[test]
    fn credentials_in_urls_are_masked() {
        assert_eq!(
            mask_credentials("url = \"redis://u:p@h:1/0\" and rediss://:p@x/ and redis://h/"),
            "url = \"redis://***@h:1/0\" and rediss://***@x/ and redis://h/"
        );
    }

    #[test]
    fn access_lists_take_addresses_and_networks() {
        let config =
            parse("[access]\nallow = [\"10.0.0.5\", \"192.168.1.7/24\", \"fd00::/8\"]\n").unwrap();
        let allow = &config.access.allow;
        assert!(allowed(allow, "10.0.0.5".parse().unwrap()));
        assert!(!allowed(allow, "10.0.0.6".parse().unwrap()));
        assert!(allowed(allow, "192.168.1.200".parse().unwrap()));
        assert!(allowed(allow, "fd12::1".parse().unwrap()));
        assert!(!allowed(allow, "127.0.0.1".parse().unwrap()));
        // The default: loopback only, also as an IPv4-mapped IPv6 peer.
        let default = Config::default().access.allow;
        assert!(allowed(&default, "127.0.0.9".parse().unwrap()));
        assert!(allowed(&default, "::1".parse().unwrap()));
        assert!(allowed(&default, "::ffff:127.0.0.1".parse().unwrap()));
        assert!(!allowed(&default, "10.0.0.1".parse().unwrap()));

        let err = parse("[access]\nallow = [\"10.0.0.0/33\"]\n").unwrap_err();
        assert!(
            err.contains("line 2") && err.contains("not an address or network"),
            "{err}"
        );
    }

    #[test]
    fn instance_n_listens_n_ports_above_instance_0() {
        let base: SocketAddr = "10.0.0.5:9100".parse().unwrap();
        assert_eq!(instance_address(base, 0), base);
        assert_eq!(instance_address(base, 7).to_string(), "10.0.0.5:9107");
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        assert_eq!(
            instance_address(any, 7),
            any,
            "port 0 stays: the kernel picks one"
        );
    }

    const SENTINELS: &str =
        "[redis]\nsentinels = [\"redis://10.0.0.7:26379\", \"rediss://10.0.0.8:26379\"]\n";

    #[test]
    fn sentinel_mode_takes_the_sentinels_and_the_master_name() {
        let config = parse(&format!("{SENTINELS}sentinel_master = \"chat-ha\"\n")).unwrap();
        let RedisMode::Sentinel(sentinel) = config.redis.mode else {
            panic!("not Sentinel mode: {:?}", config.redis.mode);
        };
        assert_eq!(sentinel.sentinels.len(), 2);
        assert_eq!(sentinel.sentinels[1].as_str(), "rediss://10.0.0.8:26379");
        assert_eq!(sentinel.master, "chat-ha");
        assert_eq!(sentinel.min_replicas_acked, 1);
        assert_eq!(sentinel.replica_ack_timeout(), Duration::from_millis(1000));
        assert_eq!(sentinel.password_file, None);

        let tuned = parse(&format!(
            "{SENTINELS}sentinel_master = \"m\"\nmin_replicas_acked = 0\n\
             replica_ack_timeout_ms = 250\nsentinel_password_file = \"/etc/s\"\n"
        ))
        .unwrap();
        let RedisMode::Sentinel(tuned) = tuned.redis.mode else {
            panic!("not Sentinel mode");
        };
        assert_eq!(tuned.min_replicas_acked, 0);
        assert_eq!(tuned.replica_ack_timeout_ms.get(), 250);
        assert_eq!(tuned.password_file, Some(PathBuf::from("/etc/s")));
    }

    #[test]
    fn cluster_mode_takes_its_seed_nodes() {
        let config = parse(
            "[redis]\ncluster = [\"redis://10.0.0.11:6379\", \"redis://10.0.0.12:6379\"]\n\
             min_replicas_acked = 1\nreplica_ack_timeout_ms = 500\n",
        )
        .unwrap();
        let RedisMode::Cluster(cluster) = config.redis.mode else {
            panic!("not cluster mode: {:?}", config.redis.mode);
        };
        assert_eq!(cluster.seeds.len(), 2);
        assert_eq!(cluster.min_replicas_acked, 1);
        assert_eq!(cluster.replica_ack_timeout(), Duration::from_millis(500));

        for (text, error) in [
            ("cluster = []", "redis.cluster is empty"),
            ("cluster = [\"unix:///run/redis.sock\"]", "is a unix socket"),
            (
                "cluster = [\"redis://a:1\", \"rediss://b:1\"]",
                "mixes redis:// and rediss://",
            ),
            (
                "cluster = [\"redis://a:1\"]\nurl = \"redis://b:1\"",
                "redis.url and redis.cluster are both set",
            ),
            (
                "cluster = [\"redis://a:1\"]\nsentinel_master = \"m\"",
                "redis.sentinel_master is only valid with redis.sentinels",
            ),
            (
                "min_replicas_acked = 1",
                "only valid with redis.sentinels or redis.cluster",
            ),
        ] {
            let refused = parse(&format!("[redis]\n{text}\n")).unwrap_err();
            assert!(refused.contains(error), "{text}: {refused}");
        }
    }

    #[test]
    fn redis_modes_are_exclusive_and_each_key_is_named_when_misplaced() {
        let both = parse(&format!(
            "{SENTINELS}sentinel_master = \"m\"\nurl = \"redis://10.0.0.1/\"\n"
        ))
        .unwrap_err();
        assert!(
            both.contains("redis.url and redis.sentinels are both set"),
            "{both}"
        );
        assert!(both.contains("line 1"), "{both}");

        let no_master = parse(SENTINELS).unwrap_err();
        assert!(
            no_master.contains("redis.sentinel_master is missing"),
            "{no_master}"
        );

        for key in [
            "sentinel_master = \"m\"",
            "sentinel_password_file = \"/etc/s\"",
            "min_replicas_acked = 2",
            "replica_ack_timeout_ms = 10",
        ] {
            let err = parse(&format!("[redis]\nurl = \"redis://10.0.0.1/\"\n{key}\n")).unwrap_err();
            let name = key.split(' ').next().unwrap();
            assert!(
                err.contains(&format!("redis.{name} is only valid with redis.sentinels")),
                "{err}"
            );
            // Without url too: the default mode is one Redis.
            let err = parse(&format!("[redis]\n{key}\n")).unwrap_err();
            assert!(err.contains(&format!("redis.{name}")), "{err}");
        }

        let empty = parse("[redis]\nsentinels = []\nsentinel_master = \"m\"\n").unwrap_err();
        assert!(empty.contains("redis.sentinels is empty"), "{empty}");
        let unix =
            parse("[redis]\nsentinels = [\"unix:///run/s.sock\"]\nsentinel_master = \"m\"\n")
                .unwrap_err();
        assert!(
            unix.contains("redis.sentinels[0] is a unix socket"),
            "{unix}"
        );
        let bad_name = parse(&format!("{SENTINELS}sentinel_master = \"a b\"\n")).unwrap_err();
        assert!(bad_name.contains("redis.sentinel_master"), "{bad_name}");
        let secret = parse(
            "[redis]\nsentinels = [\"redis://:s3cret@10.0.0.7:26379\"]\nsentinel_master = \"m\"\n",
        )
        .unwrap_err();
        assert!(secret.contains("must not hold a password"), "{secret}");
        assert!(!secret.contains("s3cret"), "{secret}");
    }

    #[test]
    fn missing_default_file_means_defaults_but_missing_named_file_is_an_error() {
        let missing = Path::new("/nonexistent/chat-ha.toml");
        assert!(Config::load(missing, false).is_ok());
        let err = Config::load(missing, true).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/chat-ha.toml"), "{err}");
    }
}
