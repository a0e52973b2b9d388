//! The frontend's side of Redis: follow the feed of every appended message.

use std::sync::Arc;
use std::time::Duration;

use redis::AsyncConnectionConfig;
use redis::aio::MultiplexedConnection;
use redis::streams::StreamReadOptions;

use super::{Entries, Keys, RedisHealth, Subscriber, take_field};
use crate::config::Config;
use crate::message::{ChatMessage, StreamId};

/// How long one `XREAD` waits for new entries before asking again. Short
/// enough that a silently dead connection is noticed within a few seconds.
const BLOCK: Duration = Duration::from_secs(2);
/// Most entries taken per `XREAD`: bounds the work done between two awaits.
const BATCH: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("malformed feed entry {0:?}")]
    Malformed(String),
}

/// Follows `{prefix}:feed` from a cursor that survives reconnections.
pub struct Feed {
    client: redis::Client,
    keys: Keys,
    timeout: Duration,
    reconnect_min: Duration,
    reconnect_max: Duration,
    health: Arc<RedisHealth>,
    /// Id of the last entry handed out; `None` until Redis was first reached.
    cursor: Option<StreamId>,
}

impl Feed {
    pub fn new(config: &Config, health: Arc<RedisHealth>) -> Result<Self, FeedError> {
        let redis = &config.redis;
        Ok(Feed {
            client: redis::Client::open(redis.url.as_str())?,
            keys: Keys::new(&redis.key_prefix),
            timeout: redis.command_timeout(),
            reconnect_min: redis.reconnect_min(),
            reconnect_max: redis.reconnect_max(),
            health,
            cursor: None,
        })
    }

    /// Hands every message appended from now on to `subscriber`, in feed order,
    /// once each, for ever. Losing Redis pauses delivery; on reconnection it
    /// goes on from the last message delivered.
    pub async fn run(mut self, subscriber: Arc<impl Subscriber>) {
        let mut pause = self.reconnect_min;
        loop {
            let error = self.follow(&*subscriber, &mut pause).await;
            if self.health.set_up(false) {
                tracing::warn!(
                    "lost Redis, delivery paused at {:?}: {error}",
                    self.cursor.map(|c| c.to_string())
                );
            } else {
                tracing::debug!("Redis still unreachable: {error}");
            }
            tokio::time::sleep(jitter(pause)).await;
            pause = (pause * 2).min(self.reconnect_max);
        }
    }

    /// Connects and delivers until the connection fails.
    async fn follow(&mut self, subscriber: &impl Subscriber, pause: &mut Duration) -> FeedError {
        let mut conn = match self.connect().await {
            Ok(conn) => conn,
            Err(e) => return e,
        };
        let start = match self.cursor {
            Some(cursor) => Ok(cursor),
            None => self.last_id(&mut conn).await,
        };
        let mut cursor = match start {
            Ok(cursor) => cursor,
            Err(e) => return e,
        };
        self.cursor = Some(cursor);
        subscriber.following(cursor).await;
        if self.health.set_up(true) {
            tracing::info!("following the Redis feed from {cursor}");
        }
        *pause = self.reconnect_min;
        loop {
            let entries = match self.read_after(&mut conn, cursor).await {
                Ok(entries) => entries,
                Err(e) => return e,
            };
            let mut messages = Vec::with_capacity(entries.len());
            for (id, message) in entries {
                cursor = id;
                match message {
                    Some(message) => messages.push(message),
                    None => tracing::error!("skipping malformed feed entry {id}"),
                }
            }
            self.cursor = Some(cursor);
            if !messages.is_empty() {
                subscriber.deliver(messages).await;
            }
        }
    }

    async fn connect(&self) -> Result<MultiplexedConnection, FeedError> {
        // XREAD blocks on the server for BLOCK; the reply may take that long.
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(BLOCK + self.timeout));
        Ok(self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?)
    }

    /// The id of the newest entry in the feed, so delivery starts after it.
    async fn last_id(&self, conn: &mut MultiplexedConnection) -> Result<StreamId, FeedError> {
        let mut cmd = redis::cmd("XREVRANGE");
        cmd.arg(self.keys.feed())
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1);
        let call = cmd.query_async::<Entries>(conn);
        let newest = tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| FeedError::Timeout(self.timeout))??;
        match newest.first() {
            Some((id, _)) => StreamId::parse(id).ok_or_else(|| FeedError::Malformed(id.clone())),
            None => Ok(StreamId::ZERO),
        }
    }

    /// Waits up to [`BLOCK`] for entries after `cursor`. Each comes with its
    /// id, and with its message unless the entry is malformed (written by
    /// something else than [`super::Store`]): the cursor moves past it anyway.
    async fn read_after(
        &self,
        conn: &mut MultiplexedConnection,
        cursor: StreamId,
    ) -> Result<Vec<(StreamId, Option<ChatMessage>)>, FeedError> {
        let options = StreamReadOptions::default()
            .block(BLOCK.as_millis() as usize)
            .count(BATCH);
        let reply: Option<XreadReply> = redis::AsyncCommands::xread_options(
            conn,
            &[self.keys.feed()],
            &[cursor.to_string()],
            &options,
        )
        .await?;
        let entries = reply
            .into_iter()
            .flatten()
            .flat_map(|(_key, entries)| entries);
        entries
            .map(|(id, mut fields)| {
                let parsed =
                    StreamId::parse(&id).ok_or_else(|| FeedError::Malformed(id.clone()))?;
                let room = take_field(&mut fields, b"r");
                let text = take_field(&mut fields, b"m");
                let message = room
                    .zip(text)
                    .and_then(|(room, text)| ChatMessage::new(id, room, text));
                Ok((parsed, message))
            })
            .collect()
    }
}

/// An `XREAD` reply: each stream's key and entries.
type XreadReply = Vec<(String, Entries)>;

/// Spreads reconnection attempts of many frontends over time (75%–100% of
/// `pause`), so a restarted Redis is not met by all of them at once.
fn jitter(pause: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    pause.mul_f64(0.75 + f64::from(nanos % 1000) / 4000.0)
}
