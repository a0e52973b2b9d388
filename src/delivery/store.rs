//! The backend's side of Redis: append a message, read a room's history.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{Entries, Keys, RedisHealth, take_field};
use crate::config::Config;
use crate::message::{ChatMessage, IdempotencyKey, PostMessage, Room, StreamId};

/// Appends to the feed and the room's stream in one step, under one id, so a
/// message is either in both or in neither. Trimming is approximate (`~`),
/// which lets Redis drop whole nodes instead of single entries.
///
/// Then it publishes the message on the channel named as the feed, for the
/// frontends (see [`super::Feed`]): `<previous feed id> <id> <room> <text>`.
/// The previous id lets a frontend tell that it missed nothing in between.
///
/// With an idempotency key (KEYS[3]), a post already stored under that key
/// is not stored again: the script answers the first post's id, or
/// `conflict` when the key came with another room or text. The key records
/// the id and a digest of room and text, for [`IDEMPOTENCY_WINDOW`].
const APPEND_SCRIPT: &str = r"
local digest
if KEYS[3] then
  digest = redis.sha1hex(ARGV[1] .. '\0' .. ARGV[2])
  local seen = redis.call('GET', KEYS[3])
  if seen then
    if string.sub(seen, -40) == digest then
      return {string.sub(seen, 1, -42), 'repeat'}
    end
    return {'', 'conflict'}
  end
end
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local previous = last[1] and last[1][1] or '0-0'
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'r', ARGV[1], 'm', ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], id, 'm', ARGV[2])
if KEYS[3] then
  redis.call('SET', KEYS[3], id .. ' ' .. digest, 'EX', ARGV[5])
end
redis.call('PUBLISH', KEYS[1], previous .. ' ' .. id .. ' ' .. ARGV[1] .. ' ' .. ARGV[2])
return {id, 'new'}
";

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
    conn: ConnectionManager,
    keys: Keys,
    script: redis::Script,
    timeout: Duration,
    max_per_room: usize,
    feed_length: usize,
    health: Arc<RedisHealth>,
}

impl Store {
    /// Creates the handle without connecting: the backend starts, and answers
    /// 503, while Redis is down; the connection is made on first use and
    /// remade in the background after it is lost.
    pub fn new(config: &Config, health: Arc<RedisHealth>) -> Result<Self, StoreError> {
        let redis = &config.redis;
        let client = super::connect::client(redis, redis::ProtocolVersion::RESP2)?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(redis.command_timeout()))
            .set_response_timeout(Some(redis.command_timeout()))
            .set_min_delay(redis.reconnect_min())
            .set_max_delay(redis.reconnect_max())
            .set_number_of_retries(2);
        Ok(Store(Arc::new(Inner {
            conn: ConnectionManager::new_lazy_with_config(client, manager_config)?,
            keys: Keys::new(&redis.key_prefix),
            script: redis::Script::new(APPEND_SCRIPT),
            timeout: redis.command_timeout(),
            max_per_room: config.history.max_per_room.get(),
            feed_length: config.history.feed_length.get(),
            health,
        })))
    }

    /// Stores `message` in its room's history and in the feed every frontend
    /// follows, unless `key` shows it was stored already. When this returns
    /// `Ok`, the message will be delivered (once).
    pub async fn append(
        &self,
        message: &PostMessage,
        key: Option<&IdempotencyKey>,
    ) -> Result<Appended, StoreError> {
        let mut conn = self.0.conn.clone();
        let mut invocation = self.0.script.prepare_invoke();
        invocation
            .key(self.0.keys.feed())
            .key(self.0.keys.room(&message.room));
        if let Some(key) = key {
            invocation.key(self.0.keys.post(key));
        }
        invocation
            .arg(message.room.as_str())
            .arg(&message.text)
            .arg(self.0.feed_length)
            .arg(self.0.max_per_room)
            .arg(IDEMPOTENCY_WINDOW.as_secs());
        let (id, outcome): (String, String) =
            self.bounded(invocation.invoke_async(&mut conn)).await?;
        if outcome == "conflict" {
            return Err(StoreError::KeyConflict);
        }
        let stored = ChatMessage::new(id.clone(), message.room.to_string(), message.text.clone());
        Ok(Appended {
            message: stored.ok_or(StoreError::Malformed(id))?,
            repeated: outcome == "repeat",
        })
    }

    /// The last `limit` messages of `room`, oldest first.
    pub async fn history(&self, room: &Room, limit: usize) -> Result<Vec<ChatMessage>, StoreError> {
        let mut cmd = redis::cmd("XREVRANGE");
        cmd.arg(self.0.keys.room(room))
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(limit);
        let mut messages = self.read_range(room, cmd).await?;
        messages.reverse();
        Ok(messages)
    }

    /// The messages of `room` with ids after `after` up to and including
    /// `until`, oldest first: what a client that saw `after` has missed.
    pub async fn range(
        &self,
        room: &Room,
        after: StreamId,
        until: StreamId,
    ) -> Result<Vec<ChatMessage>, StoreError> {
        let mut cmd = redis::cmd("XRANGE");
        cmd.arg(self.0.keys.room(room))
            .arg(format!("({after}"))
            .arg(until.to_string());
        self.read_range(room, cmd).await
    }

    async fn read_range(
        &self,
        room: &Room,
        cmd: redis::Cmd,
    ) -> Result<Vec<ChatMessage>, StoreError> {
        let mut conn = self.0.conn.clone();
        let entries: Entries = self.bounded(cmd.query_async(&mut conn)).await?;
        entries
            .into_iter()
            .map(|(id, mut fields)| {
                take_field(&mut fields, b"m")
                    .and_then(|text| ChatMessage::new(id.clone(), room.to_string(), text))
                    .ok_or(StoreError::Malformed(id))
            })
            .collect()
    }

    /// Asks Redis whether it is there; records and returns the answer.
    pub async fn ping(&self) -> bool {
        let mut conn = self.0.conn.clone();
        self.bounded(redis::cmd("PING").query_async::<String>(&mut conn))
            .await
            .is_ok()
    }

    /// Redis's state as this store last saw it.
    pub fn health_handle(&self) -> Arc<RedisHealth> {
        self.0.health.clone()
    }

    /// Runs one Redis call with the configured time limit and records
    /// whether Redis answered, so status reflects what requests see.
    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        let result = match tokio::time::timeout(self.0.timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(StoreError::Redis(e)),
            Err(_) => Err(StoreError::Timeout(self.0.timeout)),
        };
        let reachable = !matches!(&result, Err(StoreError::Timeout(_)))
            && !matches!(&result, Err(StoreError::Redis(e)) if is_connection_error(e));
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
        result
    }
}

fn is_connection_error(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout()
}
