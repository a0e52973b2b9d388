//! How both daemons reach Redis: the URL, the login, and TLS.
//!
//! The password never comes from the configuration file, which everyone on
//! the host may read, nor from the command line, which `ps` shows. Under
//! systemd the units pass `/etc/chat-ha/redis-password` as a credential
//! (`LoadCredential=redis-password:...`), readable by the service only;
//! elsewhere `redis.password_file` names the file. An empty file means no
//! password: the daemons then do not log in at all. With a password they log
//! in as `redis.username`, a Redis ACL user limited to chat-ha's keys,
//! channels and commands.
//!
//! A `rediss://` URL connects over TLS, checking the server's certificate
//! against the host's trusted CAs, or against `redis.tls_ca_file`.
//!
//! In Sentinel mode the same login and TLS settings reach whichever server
//! the Sentinels name as the primary ([`client_at`]); it is reached over TLS
//! when the Sentinels are (`rediss://`). The Sentinels themselves take no
//! user, and their own password (their `requirepass`), if any
//! ([`sentinel_client`]): from the `sentinel-password` credential
//! (`/etc/chat-ha/sentinel-password`) under systemd, else from
//! `redis.sentinel_password_file`.

use std::path::{Path, PathBuf};

use redis::{IntoConnectionInfo, ProtocolVersion};

use crate::config::{ClusterConfig, RedisConfig, RedisMode, RedisUrl};

/// The credential name the systemd units load the password under.
pub const PASSWORD_CREDENTIAL: &str = "redis-password";

/// The credential name the systemd units load the Sentinels' password under.
pub const SENTINEL_PASSWORD_CREDENTIAL: &str = "sentinel-password";

/// Why a Redis client could not be set up; nothing here names the password.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{path}: cannot read the Redis password: {source}")]
    Password {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: cannot read the CA certificate for Redis: {source}")]
    CaFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("redis.tls_ca_file is set, but Redis is not reached over TLS (rediss://)")]
    CaWithoutTls,
    #[error("{path}: cannot read the Sentinels' password: {source}")]
    SentinelPassword {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("redis.url is not set: in Sentinel mode, the primary is found through redis.sentinels")]
    NotSingle,
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// A client for the configured Redis (`redis.url`), speaking `protocol`,
/// logged in when a password is configured. Connects lazily: nothing is
/// sent until it is used.
pub fn client(
    config: &RedisConfig,
    protocol: ProtocolVersion,
) -> Result<redis::Client, ConnectError> {
    let RedisMode::Single(url) = &config.mode else {
        return Err(ConnectError::NotSingle);
    };
    let info = url.as_str().into_connection_info()?;
    logged_in(config, info, protocol)
}

/// Cluster mode: where the shard subscriptions find the cluster (its seeds),
/// and how they reach any node its topology names, logged in as
/// [`client`]'s are, in RESP3 (the messages arrive as pushes).
pub fn cluster_nodes(
    config: &RedisConfig,
    cluster: &ClusterConfig,
) -> Result<super::shards::Nodes, ConnectError> {
    let (seeds, client_for) = cluster_clients(config, cluster, ProtocolVersion::RESP3)?;
    Ok(super::shards::Nodes::Cluster { seeds, client_for })
}

/// Cluster mode: where commands find the cluster, through [`cluster_clients`]
/// in RESP2. Commands time out after `redis.command_timeout_ms`, those of
/// writers after `write_timeout`.
pub fn cluster_router(
    config: &RedisConfig,
    cluster: &ClusterConfig,
    write_timeout: std::time::Duration,
) -> Result<super::router::Router, ConnectError> {
    let (seeds, client_for) = cluster_clients(config, cluster, ProtocolVersion::RESP2)?;
    Ok(super::router::Router::new(
        seeds,
        client_for,
        config.command_timeout(),
        write_timeout,
    ))
}

/// Clients for a cluster's seeds, and the way to make one for any node the
/// topology names, logged in as [`client`]'s are, in `protocol`.
fn cluster_clients(
    config: &RedisConfig,
    cluster: &ClusterConfig,
    protocol: ProtocolVersion,
) -> Result<(Vec<redis::Client>, super::shards::ClientFor), ConnectError> {
    let tls = cluster.seeds.iter().any(|url| url.is_tls());
    let seeds = cluster
        .seeds
        .iter()
        .map(|url| {
            let info = url.as_str().into_connection_info()?;
            logged_in(config, info, protocol)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let config = config.clone();
    let client_for: super::shards::ClientFor = std::sync::Arc::new(move |host: &str, port: u16| {
        client_at(&config, host, port, tls, protocol).map_err(|e| {
            redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "cannot reach a cluster node",
                e.to_string(),
            ))
        })
    });
    Ok((seeds, client_for))
}

/// A client for the Redis server at `host`:`port` (a primary the Sentinels
/// named), over TLS when `tls`, logged in as [`client`]'s are.
pub fn client_at(
    config: &RedisConfig,
    host: &str,
    port: u16,
    tls: bool,
    protocol: ProtocolVersion,
) -> Result<redis::Client, ConnectError> {
    let addr = match tls {
        false => redis::ConnectionAddr::Tcp(host.to_owned(), port),
        true => redis::ConnectionAddr::TcpTls {
            host: host.to_owned(),
            port,
            insecure: false,
            tls_params: None,
        },
    };
    let info = addr.into_connection_info()?;
    logged_in(config, info, protocol)
}

/// A client for the Sentinel at `url`, with the Sentinels' password from
/// the `sentinel-password` credential, else from `password_file` (no user:
/// Sentinels are set up with `requirepass`).
pub fn sentinel_client(
    config: &RedisConfig,
    url: &RedisUrl,
    password_file: Option<&Path>,
    protocol: ProtocolVersion,
) -> Result<redis::Client, ConnectError> {
    let mut info = url.as_str().into_connection_info()?;
    let mut settings = info.redis_settings().clone().set_protocol(protocol);
    if let Some(path) = credential_or(SENTINEL_PASSWORD_CREDENTIAL, password_file) {
        let password = read_password(&path)
            .map_err(|source| ConnectError::SentinelPassword { path, source })?;
        if let Some(password) = password {
            settings = settings.set_password(password);
        }
    }
    info = info.set_redis_settings(settings);
    with_tls(config, info)
}

/// `info` with the configured login and `protocol`.
fn logged_in(
    config: &RedisConfig,
    mut info: redis::ConnectionInfo,
    protocol: ProtocolVersion,
) -> Result<redis::Client, ConnectError> {
    let mut settings = info.redis_settings().clone().set_protocol(protocol);
    if let Some(password) = password(config)? {
        if !config.username.is_empty() {
            settings = settings.set_username(&config.username);
        }
        settings = settings.set_password(password);
    }
    info = info.set_redis_settings(settings);
    with_tls(config, info)
}

/// A client for `info`, checking a TLS server against `redis.tls_ca_file`
/// when it is set.
fn with_tls(
    config: &RedisConfig,
    info: redis::ConnectionInfo,
) -> Result<redis::Client, ConnectError> {
    match &config.tls_ca_file {
        None => Ok(redis::Client::open(info)?),
        Some(_) if !is_tls(info.addr()) => Err(ConnectError::CaWithoutTls),
        Some(path) => {
            let root_cert = std::fs::read(path).map_err(|source| ConnectError::CaFile {
                path: path.clone(),
                source,
            })?;
            let certificates = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(root_cert),
            };
            Ok(redis::Client::build_with_tls(info, certificates)?)
        }
    }
}

fn is_tls(addr: &redis::ConnectionAddr) -> bool {
    matches!(addr, redis::ConnectionAddr::TcpTls { .. })
}

/// The password: from the systemd credential when there is one, else from
/// `redis.password_file` when set; `None` when neither gives a non-empty one.
fn password(config: &RedisConfig) -> Result<Option<String>, ConnectError> {
    let Some(path) = credential_or(PASSWORD_CREDENTIAL, config.password_file.as_deref()) else {
        return Ok(None);
    };
    read_password(&path).map_err(|source| ConnectError::Password { path, source })
}

/// The file of the systemd credential `name` when systemd passed one, else
/// `file`.
fn credential_or(name: &str, file: Option<&Path>) -> Option<PathBuf> {
    std::env::var_os("CREDENTIALS_DIRECTORY")
        .map(|dir| Path::new(&dir).join(name))
        .filter(|path| path.exists())
        .or_else(|| file.map(Path::to_owned))
}

/// The password in the file at `path`, `None` when it is empty.
fn read_password(path: &Path) -> std::io::Result<Option<String>> {
    let text = std::fs::read_to_string(path)?;
    // One line; a trailing newline (as `echo` writes it) is not part of it.
    let password = text.trim_end_matches(['\n', '\r']);
    Ok((!password.is_empty()).then(|| password.to_owned()))
}
