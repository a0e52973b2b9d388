//! The backend's side of Redis: append a message, read a room's history.
//!
//! With one Redis, every command goes over one connection that redis-rs
//! remakes when it is lost. In Sentinel mode the connection belongs to one
//! generation of the primary ([`Primary`]) and is replaced when the primary
//! changes; appends then take a connection of their own, on which the
//! replicas' acknowledgement is awaited ([`ReplicaAcks`]).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::acks::{AckError, ReplicaAcks};
use super::primary::Primary;
use super::router::Router;
use super::script;
use super::{Entries, Keys, PostKey, RedisHealth, take_field};
use crate::config::{Config, RedisMode};
use crate::message::{ChatMessage, PostMessage, Room, StreamId};

/// Appends a message to its room's stream and publishes it, in one step.
///
/// The room's stream (KEYS[1]) keeps `history.max_per_room` messages
/// (trimmed approximately, `~`, which lets Redis drop whole nodes) and
/// expires when nobody posted to the room for `history.room_ttl_days`.
///
/// Then the script publishes the message on the room's shard channel
/// (`SPUBLISH`, named as the stream), for the frontends that serve the room
/// (see [`super::Feed`]): `<previous id> <id> <text>`. The previous id lets
/// a frontend tell that it missed nothing in between. With replica
/// acknowledgements this push comes before the `WAIT`: frontends hold the
/// message until the backend publishes that replicas hold it (see
/// [`ReplicaAcks`]).
///
/// Every key the script touches carries the room's partition tag, so in a
/// Redis Cluster they are in one slot and the script runs on one node.
///
/// With an idempotency key (KEYS[2]), a post already stored under that key
/// is not stored again: the script answers the first post's id, or
/// `conflict` when the key came with another room or text. The key records
/// the id and a digest of room and text, for [`IDEMPOTENCY_WINDOW`].
///
/// With replica acknowledgements, ARGV[6] is the newest id this backend has
/// stored (its floor). A primary promoted after a failover may lack the old
/// primary's last entries, and its clock may be behind: `XADD *` would then
/// give ids below ones already acknowledged and delivered. With a floor
/// above the stream's last entry, the id is taken above the floor instead.
/// A repeat rewrites its record (same value, same expiry): the write is what
/// the `WAIT` after it counts, so a repeat is acknowledged only once its
/// first post is on the replicas too.
const APPEND_SCRIPT: &str = r"
local digest
if KEYS[2] then
  digest = redis.sha1hex(ARGV[1] .. '\0' .. ARGV[2])
  local seen = redis.call('GET', KEYS[2])
  if seen then
    if string.sub(seen, -40) == digest then
      if ARGV[6] then
        redis.call('SET', KEYS[2], seen, 'KEEPTTL')
      end
      return {string.sub(seen, 1, -42), 'repeat'}
    end
    return {'', 'conflict'}
  end
end
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local previous = last[1] and last[1][1] or '0-0'
local next_id = '*'
if ARGV[6] then
  local fms, fseq = string.match(ARGV[6], '^(%d+)-(%d+)$')
  local pms, pseq = string.match(previous, '^(%d+)-(%d+)$')
  fms, fseq, pms, pseq = tonumber(fms), tonumber(fseq), tonumber(pms), tonumber(pseq)
  if fms > pms or (fms == pms and fseq > pseq) then
    local now = redis.call('TIME')
    if tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) <= fms then
      next_id = string.format('%d-%d', fms, fseq + 1)
    end
  end
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], next_id, 'm', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[5])
if KEYS[2] then
  redis.call('SET', KEYS[2], id .. ' ' .. digest, 'EX', ARGV[4])
end
redis.call('SPUBLISH', KEYS[1], previous .. ' ' .. id .. ' ' .. ARGV[2])
return {id, 'new'}
";

/// Reads a page of a room's history for a resuming socket: at most ARGV[3]
/// entries after ARGV[1] up to ARGV[2], with no more than ARGV[4] bytes of
/// text between them, but at least one entry. It writes nothing, so it also
/// runs on a Redis that is full.
const PAGE_SCRIPT: &str = r"#!lua flags=no-writes
local entries = redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], ARGV[2], 'COUNT', ARGV[3])
local page, bytes = {}, 0
for _, entry in ipairs(entries) do
  local size = 0
  for i = 2, #entry[2], 2 do size = size + #entry[2][i] end
  if #page > 0 and bytes + size > tonumber(ARGV[4]) then break end
  bytes = bytes + size
  page[#page + 1] = entry
end
return page
";

/// Messages read from Redis at once for a history answer.
const HISTORY_PAGE: usize = 50;

/// How long an idempotency key is remembered.
pub const IDEMPOTENCY_WINDOW: std::time::Duration = std::time::Duration::from_secs(600);

/// Why Redis could not do what was asked; nothing was stored (or, after a
/// timeout, possibly stored but never acknowledged).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error(transparent)]
    Setup(#[from] super::ConnectError),
    #[error("Redis returned a malformed entry {0:?}")]
    Malformed(String),
    #[error("this Idempotency-Key was already used for another message")]
    KeyConflict,
    /// Redis reached its `maxmemory` and, never evicting, refuses writes.
    #[error("Redis is full (maxmemory): nothing was stored")]
    Full,
    /// Sentinel mode: no server is the primary right now (a failover is
    /// under way, or no Sentinel answers).
    #[error("no Redis primary: the Sentinels name none that answers as one")]
    NoPrimary,
    /// Sentinel mode: the message is on the primary, but not on as many
    /// replicas as `redis.min_replicas_acked` asks within the time allowed;
    /// a failover could lose it, so it is not acknowledged.
    #[error(transparent)]
    NotReplicated(#[from] AckError),
}

impl StoreError {
    /// Reads Redis's refusal to write beyond `maxmemory` as [`StoreError::Full`].
    fn from_redis(e: redis::RedisError) -> Self {
        if e.code() == Some("OOM") {
            StoreError::Full
        } else {
            StoreError::Redis(e)
        }
    }
}

/// What [`Store::append`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    pub message: ChatMessage,
    /// The idempotency key had been used for this very message: it was
    /// stored then, not now.
    pub repeated: bool,
}

/// Handle to Redis for appending messages and reading history. Cheap to
/// clone: a request handler clones it several times (axum's state is cloned
/// per extractor and per middleware), so it is one reference count.
#[derive(Clone)]
pub struct Store(Arc<Inner>);

struct Inner {
    link: Link,
    /// Sentinel mode with `redis.min_replicas_acked` > 0.
    acks: Option<ReplicaAcks>,
    /// Sentinel mode: the newest id stored through this handle (see
    /// `APPEND_SCRIPT`).
    floor: Option<Mutex<StreamId>>,
    keys: Keys,
    script: redis::Script,
    page_script: redis::Script,
    timeout: Duration,
    max_per_room: usize,
    room_ttl: Duration,
    health: Arc<RedisHealth>,
}

impl Store {
    /// Creates the handle without connecting: the backend starts, and answers
    /// 503, while Redis is down; the connection is made on first use and
    /// remade in the background after it is lost. It records whether Redis
    /// answers in a health of its own ([`Store::health_handle`]). In Sentinel
    /// mode it follows the primary itself (see [`Store::with_primary`]), with
    /// tasks of its own, so it then needs a Tokio runtime.
    pub fn new(config: &Config) -> Result<Self, StoreError> {
        Self::with_primary(config, Primary::new(&config.redis))
    }

    /// The same, following `primary`, which may be shared with a
    /// [`super::Feed`].
    pub fn with_primary(config: &Config, primary: Primary) -> Result<Self, StoreError> {
        let redis = &config.redis;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(redis.command_timeout()))
            .set_response_timeout(Some(redis.command_timeout()))
            .set_min_delay(redis.reconnect_min())
            .set_max_delay(redis.reconnect_max())
            .set_number_of_retries(2);
        let (link, acks, floor) = match &redis.mode {
            RedisMode::Single(_) => {
                let client = super::connect::client(redis, redis::ProtocolVersion::RESP2)?;
                let manager = ConnectionManager::new_lazy_with_config(client, manager_config)?;
                (Link::Fixed(manager), None, None)
            }
            RedisMode::Cluster(cluster) => {
                // WAIT holds the answer back for up to its timeout.
                let writing = redis.command_timeout() + cluster.replica_ack_timeout();
                let link = Link::Cluster(Box::new(ClusterLink {
                    router: super::connect::cluster_router(redis, cluster, writing)?,
                    min_replicas_acked: cluster.min_replicas_acked,
                    ack_timeout: cluster.replica_ack_timeout(),
                }));
                let floor = (cluster.min_replicas_acked > 0).then(|| Mutex::new(StreamId::ZERO));
                (link, None, floor)
            }
            RedisMode::Sentinel(sentinel) => {
                let acks = (sentinel.min_replicas_acked > 0).then(|| {
                    ReplicaAcks::new(primary.clone(), redis, sentinel, config.history.room_ttl())
                });
                let link = Link::Following {
                    primary,
                    manager_config,
                    current: Mutex::new(None),
                };
                (link, acks, Some(Mutex::new(StreamId::ZERO)))
            }
        };
        Ok(Store(Arc::new(Inner {
            link,
            acks,
            floor,
            keys: Keys::new(redis),
            script: redis::Script::new(APPEND_SCRIPT),
            page_script: redis::Script::new(PAGE_SCRIPT),
            timeout: redis.command_timeout(),
            max_per_room: config.history.max_per_room.get(),
            room_ttl: config.history.room_ttl(),
            health: RedisHealth::new(),
        })))
    }

    /// The primary this store writes to.
    pub fn primary(&self) -> Option<&Primary> {
        match &self.0.link {
            Link::Fixed(_) | Link::Cluster(_) => None,
            Link::Following { primary, .. } => Some(primary),
        }
    }

    /// Stores `message` in its room's history and publishes it to the
    /// frontends that serve the room, unless `key` shows it was stored
    /// already. When this returns
    /// `Ok`, the message will be delivered (once).
    pub async fn append(
        &self,
        message: &PostMessage,
        key: Option<&PostKey>,
    ) -> Result<Appended, StoreError> {
        let room = &message.room;
        let mut invocation = script::evalsha(&self.0.script, 1 + usize::from(key.is_some()));
        invocation.arg(self.0.keys.room(room));
        if let Some(key) = key {
            invocation.arg(self.0.keys.post(room, key));
        }
        invocation
            .arg(room.as_str())
            .arg(&message.text)
            .arg(self.0.max_per_room)
            .arg(IDEMPOTENCY_WINDOW.as_secs())
            .arg(self.0.room_ttl.as_secs());
        if let Some(floor) = &self.0.floor {
            invocation.arg(lock(floor).to_string());
        }
        let (id, outcome): (String, String) = match (&self.0.acks, &self.0.link) {
            (None, Link::Cluster(cluster)) if cluster.min_replicas_acked > 0 => {
                self.append_replicated(cluster, room, &invocation).await?
            }
            (None, _) => {
                let mut conn = self.connection().await?;
                self.bounded(script::run(&self.0.script, &invocation, &mut conn))
                    .await?
            }
            (Some(acks), _) => {
                let mut writer = acks.writer().await?;
                // An append may queue behind the writer's WAIT (see
                // `ReplicaAcks`): it may take that long more.
                let limit = self.0.timeout + acks.timeout();
                let reply = self
                    .bounded_by(
                        limit,
                        script::run(&self.0.script, &invocation, &mut writer.conn),
                    )
                    .await;
                if reply.is_err() {
                    acks.drop_writer(writer.id).await;
                }
                let reply: (String, String) = reply?;
                if reply.1 != "conflict" {
                    let id = StreamId::parse(&reply.0)
                        .ok_or_else(|| StoreError::Malformed(reply.0.clone()))?;
                    acks.confirm(writer.id, room, id).await?;
                }
                reply
            }
        };
        if outcome == "conflict" {
            return Err(StoreError::KeyConflict);
        }
        let id = StreamId::parse(&id).ok_or(StoreError::Malformed(id))?;
        if let Some(floor) = &self.0.floor {
            let mut floor = lock(floor);
            *floor = (*floor).max(id);
        }
        Ok(Appended {
            message: ChatMessage::new(id, message.room.clone(), message.text.clone()),
            repeated: outcome == "repeat",
        })
    }

    /// Cluster mode with replica acknowledgements: runs the append and then
    /// `WAIT` as one pipeline, which the router sends on a connection to the
    /// primary of the append's slot (the pipeline's only key; it follows
    /// the slot across failovers as it does for any command), so that
    /// `WAIT` counts the append (it counts the writes of the connection it
    /// is sent on); and then tells the frontends that replicas hold the
    /// room up to the new id. Each append waits for its own `WAIT`, on one
    /// of the writer connections, which carry appends only.
    async fn append_replicated(
        &self,
        cluster: &ClusterLink,
        room: &Room,
        invocation: &redis::Cmd,
    ) -> Result<(String, String), StoreError> {
        let mut writer = cluster.router.writer();
        let timeout_ms = u64::try_from(cluster.ack_timeout.as_millis()).unwrap_or(u64::MAX);
        let mut pipeline = redis::pipe();
        pipeline
            .add_command(invocation.clone())
            .cmd("WAIT")
            .arg(cluster.min_replicas_acked)
            .arg(timeout_ms);
        let limit = self.0.timeout + cluster.ack_timeout;
        let (reply, acked): ((String, String), u64) = self
            .bounded_by(limit, script::run(&self.0.script, &pipeline, &mut writer))
            .await?;
        if reply.1 == "conflict" {
            return Ok(reply);
        }
        if acked < u64::from(cluster.min_replicas_acked) {
            return Err(StoreError::NotReplicated(AckError::TooFew {
                acked,
                needed: cluster.min_replicas_acked,
                timeout: cluster.ack_timeout,
            }));
        }
        let id = StreamId::parse(&reply.0).ok_or_else(|| StoreError::Malformed(reply.0.clone()))?;
        let acked = super::acks::acked_invocation(&self.0.keys, room, id, self.0.room_ttl);
        tokio::spawn(async move {
            // Costs only delay when lost: frontends read the key as they
            // sweep, and the next post's publishes a newer id.
            let _ = script::run::<i64, _>(&super::acks::ACKED, &acked, &mut writer).await;
        });
        Ok(reply)
    }

    /// The last `limit` messages of `room` older than `before` (all, if
    /// `None`), oldest first: as many as fit in `max_bytes` of text, and at
    /// least one. Read newest first in pages of `HISTORY_PAGE`, so that
    /// Redis never builds, nor this process holds, much more than that.
    pub async fn history(
        &self,
        room: &Room,
        limit: usize,
        before: Option<StreamId>,
        max_bytes: usize,
    ) -> Result<Vec<ChatMessage>, StoreError> {
        let key = self.0.keys.room(room);
        let mut messages: Vec<ChatMessage> = Vec::new();
        let mut bytes = 0;
        let mut end = before.map_or_else(|| "+".to_owned(), |id| format!("({id}"));
        'pages: while messages.len() < limit {
            let count = (limit - messages.len()).min(HISTORY_PAGE);
            let mut cmd = redis::cmd("XREVRANGE");
            cmd.arg(&key).arg(&end).arg("-").arg("COUNT").arg(count);
            let page = self.read_range(room, cmd).await?;
            let last_page = page.len() < count;
            for message in page {
                bytes += message.message.len();
                if bytes > max_bytes && !messages.is_empty() {
                    break 'pages;
                }
                end = format!("({}", message.id);
                messages.push(message);
            }
            if last_page {
                break;
            }
        }
        messages.reverse();
        Ok(messages)
    }

    /// Messages of `room` with ids after `after` up to and including
    /// `until`, oldest first: the next page of what a client that saw
    /// `after` has missed. At most `count` messages, and no more than
    /// `max_bytes` of text unless the first message alone weighs more: the
    /// page is cut inside Redis (`PAGE_SCRIPT`), so that neither Redis's
    /// reply nor this process ever holds more than that.
    pub async fn page(
        &self,
        room: &Room,
        after: StreamId,
        until: StreamId,
        count: usize,
        max_bytes: usize,
    ) -> Result<Vec<ChatMessage>, StoreError> {
        let mut conn = self.connection().await?;
        let mut invocation = self.0.page_script.prepare_invoke();
        invocation
            .key(self.0.keys.room(room))
            .arg(after.to_string())
            .arg(until.to_string())
            .arg(count)
            .arg(max_bytes);
        let entries: Entries = self.bounded(invocation.invoke_async(&mut conn)).await?;
        Self::messages(room, entries)
    }

    async fn read_range(
        &self,
        room: &Room,
        cmd: redis::Cmd,
    ) -> Result<Vec<ChatMessage>, StoreError> {
        let mut conn = self.connection().await?;
        let entries: Entries = self.bounded(cmd.query_async(&mut conn)).await?;
        Self::messages(room, entries)
    }

    /// The messages of `room` in `entries`; a malformed entry is an error.
    fn messages(room: &Room, entries: Entries) -> Result<Vec<ChatMessage>, StoreError> {
        entries
            .into_iter()
            .map(|(id, mut fields)| {
                let stored = StreamId::parse(&id);
                stored
                    .zip(take_field(&mut fields, b"m"))
                    .map(|(stored, text)| ChatMessage::new(stored, room.clone(), text))
                    .ok_or(StoreError::Malformed(id))
            })
            .collect()
    }

    /// Asks Redis whether it is there; records and returns the answer.
    /// Without a primary now, the answer is no at once: status reports the
    /// moment, it does not wait for the next primary.
    pub async fn ping(&self) -> bool {
        let Ok(mut conn) = self.connection_within(Duration::ZERO).await else {
            return false;
        };
        self.bounded(redis::cmd("PING").query_async::<String>(&mut conn))
            .await
            .is_ok()
    }

    /// Redis's state as this store last saw it.
    pub fn health_handle(&self) -> Arc<RedisHealth> {
        self.0.health.clone()
    }

    /// A connection to Redis: the one Redis, the primary (waiting up to
    /// the command timeout for one while there is none), or the cluster.
    async fn connection(&self) -> Result<Conn, StoreError> {
        self.connection_within(self.0.timeout).await
    }

    /// [`Store::connection`], waiting at most `limit` for a primary.
    async fn connection_within(&self, limit: Duration) -> Result<Conn, StoreError> {
        match &self.0.link {
            Link::Fixed(manager) => Ok(Conn::Manager(manager.clone())),
            Link::Cluster(cluster) => Ok(Conn::Cluster(cluster.router.clone())),
            Link::Following {
                primary,
                manager_config,
                current,
            } => {
                let Some(resolved) = primary.current_within(limit).await else {
                    self.record_reachable::<()>(&Err(StoreError::NoPrimary));
                    return Err(StoreError::NoPrimary);
                };
                let mut current = lock(current);
                match &*current {
                    Some((generation, manager)) if *generation == resolved.generation => {
                        Ok(Conn::Manager(manager.clone()))
                    }
                    _ => {
                        let client = primary.client(&resolved, redis::ProtocolVersion::RESP2)?;
                        let manager = ConnectionManager::new_lazy_with_config(
                            client,
                            manager_config.clone(),
                        )?;
                        *current = Some((resolved.generation, manager.clone()));
                        Ok(Conn::Manager(manager))
                    }
                }
            }
        }
    }

    /// Runs one Redis call with the configured time limit and records
    /// whether Redis answered, so status reflects what requests see.
    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        self.bounded_by(self.0.timeout, call).await
    }

    /// [`Store::bounded`] with the time limit `limit`.
    async fn bounded_by<T>(
        &self,
        limit: Duration,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        let result = match tokio::time::timeout(limit, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(StoreError::from_redis(e)),
            Err(_) => Err(StoreError::Timeout(limit)),
        };
        if let (Err(e), Some(primary)) = (&result, self.primary())
            && primary_suspect(e)
        {
            primary.suspect();
        }
        self.record_reachable(&result);
        result
    }

    /// Records whether `result` shows Redis reachable.
    fn record_reachable<T>(&self, result: &Result<T, StoreError>) {
        let reachable = !matches!(result, Err(StoreError::Timeout(_) | StoreError::NoPrimary))
            && !matches!(result, Err(StoreError::Redis(e)) if is_connection_error(e));
        if self.0.health.set_up(reachable) {
            if reachable {
                tracing::info!("Redis is reachable again");
            } else {
                tracing::warn!(
                    "Redis is unreachable: {}",
                    result
                        .as_ref()
                        .err()
                        .map(|e| e.to_string())
                        .unwrap_or_default()
                );
            }
        }
    }
}

/// A connection of the store: to one server, or to the cluster.
#[derive(Clone)]
enum Conn {
    Manager(ConnectionManager),
    Cluster(Router),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Manager(conn) => conn.req_packed_command(cmd),
            Conn::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Manager(conn) => conn.req_packed_commands(cmd, offset, count),
            Conn::Cluster(conn) => conn.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Manager(conn) => conn.get_db(),
            Conn::Cluster(conn) => conn.get_db(),
        }
    }
}

/// Cluster mode: the [`Router`], which makes each node's connections on
/// first use (and again after a failure). Appends that wait for replicas go
/// over the writers' connections, which their `WAIT`s hold: a few per node,
/// taken in turn, so that that many `WAIT`s can be out at once on each
/// node.
struct ClusterLink {
    router: Router,
    min_replicas_acked: u32,
    ack_timeout: Duration,
}

/// How the store reaches Redis.
enum Link {
    /// Cluster mode: the cluster, through the [`Router`].
    Cluster(Box<ClusterLink>),
    /// One Redis (`redis.url`): one connection, remade by redis-rs.
    Fixed(ConnectionManager),
    /// Sentinel mode: a connection to the primary of one generation.
    Following {
        primary: Primary,
        manager_config: ConnectionManagerConfig,
        current: Mutex<Option<(u64, ConnectionManager)>>,
    },
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Whether `e` suggests the server is no longer the primary: it is gone,
/// or it says it is a replica (`READONLY`) or loading a dataset
/// (`LOADING`, as a replica does when it resynchronises).
fn primary_suspect(e: &StoreError) -> bool {
    match e {
        StoreError::Timeout(_) => true,
        StoreError::Redis(e) => {
            is_connection_error(e) || matches!(e.code(), Some("READONLY" | "LOADING"))
        }
        _ => false,
    }
}

fn is_connection_error(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout()
}
