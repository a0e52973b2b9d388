//! The frontend's side of Redis: follow the feed of every appended message.
//!
//! Redis pushes each message to every frontend the moment it is stored: the
//! append script publishes it on the feed's channel together with the id of
//! the feed entry before it. A frontend hands a pushed message on only if
//! that previous id is the last one it delivered; otherwise it has missed
//! something (it was away, or an entry was appended without a push) and it
//! reads the feed stream from its cursor instead, which is where the truth
//! is. It also reads the stream after each (re)connection, and every
//! [`POLL`], which both checks that Redis still answers and finds any entry
//! that no later push revealed.
//!
//! Pushes spare Redis the work `XREAD BLOCK` costs it for each frontend and
//! each read (a command to read, a client to block and unblock), and the
//! frontend a request per read.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ProtocolVersion, PushInfo, PushKind};
use tokio::sync::mpsc;

use super::{Entries, Keys, RedisHealth, Subscriber, take_field};
use crate::config::Config;
use crate::message::{ChatMessage, StreamId};

/// How often the feed stream is read even when pushes arrive as they should.
/// Short enough that a silently dead connection is noticed within a few
/// seconds.
const POLL: Duration = Duration::from_secs(2);
/// Most entries taken per read of the stream, and most pushed messages handed
/// on together: bounds the work done between two awaits.
const BATCH: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error(transparent)]
    Setup(#[from] super::ConnectError),
    #[error("the connection to Redis closed")]
    Disconnected,
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
    /// Messages read from the stream rather than pushed.
    caught_up: Counter,
}

impl Feed {
    pub fn new(config: &Config, health: Arc<RedisHealth>) -> Result<Self, FeedError> {
        let redis = &config.redis;
        Ok(Feed {
            // Pushes share the connection with commands only in RESP3.
            client: super::connect::client(redis, ProtocolVersion::RESP3)?,
            keys: Keys::new(&redis.key_prefix),
            timeout: redis.command_timeout(),
            reconnect_min: redis.reconnect_min(),
            reconnect_max: redis.reconnect_max(),
            health,
            cursor: None,
            caught_up: Counter::default(),
        })
    }

    /// Counts in `counter` the messages read from the stream rather than
    /// pushed: those appended while the frontend was away, and any whose push
    /// did not arrive (from a backend of a version that did not push).
    pub fn counting_caught_up(mut self, counter: Counter) -> Self {
        self.caught_up = counter;
        self
    }

    /// Hands every message appended from now on to `subscriber`, in feed order,
    /// once each, for ever. Losing Redis pauses delivery; on reconnection it
    /// goes on from the last message delivered.
    pub async fn run(mut self, subscriber: Arc<impl Subscriber>) {
        let mut pause = self.reconnect_min;
        loop {
            let Err(error) = self.follow(&*subscriber, &mut pause).await;
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

    /// Connects, subscribes and delivers until the connection fails.
    async fn follow(
        &mut self,
        subscriber: &impl Subscriber,
        pause: &mut Duration,
    ) -> Result<Infallible, FeedError> {
        let (sender, mut pushes) = mpsc::unbounded_channel();
        let mut conn = self.connect(sender).await?;
        // Subscribed before the stream is read: whatever is appended after
        // that read is pushed.
        conn.subscribe(self.keys.feed()).await?;
        let start = match self.cursor {
            Some(cursor) => cursor,
            None => self.last_id(&mut conn).await?,
        };
        subscriber.following(start).await;
        if self.health.set_up(true) {
            tracing::info!("following the Redis feed from {start}");
        }
        *pause = self.reconnect_min;
        let mut reader = Reader {
            conn,
            keys: &self.keys,
            caught_up: &self.caught_up,
            cursor: self.cursor.insert(start),
            batch: Vec::new(),
        };
        // The first tick is immediate: it reads what was appended while away.
        let mut poll = tokio::time::interval(POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                push = pushes.recv() => {
                    let mut push = push.ok_or(FeedError::Disconnected)?;
                    // Everything pushed meanwhile goes out together.
                    loop {
                        reader.take(push, subscriber).await?;
                        if reader.batch.len() >= BATCH {
                            break;
                        }
                        match pushes.try_recv() {
                            Ok(next) => push = next,
                            Err(_) => break,
                        }
                    }
                }
                _ = poll.tick() => reader.catch_up(subscriber).await?,
            }
            reader.hand_over(subscriber).await;
        }
    }

    async fn connect(
        &self,
        pushes: mpsc::UnboundedSender<PushInfo>,
    ) -> Result<MultiplexedConnection, FeedError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_push_sender(pushes);
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
        let newest: Entries = cmd.query_async(conn).await?;
        match newest.first() {
            Some((id, _)) => StreamId::parse(id).ok_or_else(|| FeedError::Malformed(id.clone())),
            None => Ok(StreamId::ZERO),
        }
    }
}

/// Following the feed over one connection.
struct Reader<'a> {
    conn: MultiplexedConnection,
    keys: &'a Keys,
    caught_up: &'a Counter,
    /// Id of the last entry taken into `batch` (or handed out): the feed's
    /// cursor, which outlives the connection.
    cursor: &'a mut StreamId,
    /// Messages taken but not yet handed to the subscriber.
    batch: Vec<ChatMessage>,
}

impl Reader<'_> {
    /// Takes one push: the next message, one already read from the stream,
    /// or news that something was missed, and then reads the stream.
    async fn take(
        &mut self,
        push: PushInfo,
        subscriber: &impl Subscriber,
    ) -> Result<(), FeedError> {
        match push.kind {
            PushKind::Message => {}
            PushKind::Disconnection => return Err(FeedError::Disconnected),
            // Confirmations of the subscription.
            _ => return Ok(()),
        }
        match Pushed::parse(push) {
            Some(pushed) if pushed.id <= *self.cursor => Ok(()),
            Some(pushed) if pushed.previous == *self.cursor => {
                self.advance(pushed.id, Some(pushed.message));
                Ok(())
            }
            // A gap, or something published on the channel by someone else.
            _ => self.catch_up(subscriber).await,
        }
    }

    /// Reads the stream after the cursor up to its end.
    async fn catch_up(&mut self, subscriber: &impl Subscriber) -> Result<(), FeedError> {
        loop {
            let entries = self.read_after().await?;
            let complete = entries.len() < BATCH;
            for (id, message) in entries {
                if message.is_some() {
                    self.caught_up.inc();
                } else {
                    tracing::error!("skipping malformed feed entry {id}");
                }
                self.advance(id, message);
            }
            if complete {
                return Ok(());
            }
            self.hand_over(subscriber).await;
        }
    }

    fn advance(&mut self, id: StreamId, message: Option<ChatMessage>) {
        *self.cursor = id;
        self.batch.extend(message);
    }

    async fn hand_over(&mut self, subscriber: &impl Subscriber) {
        if !self.batch.is_empty() {
            subscriber.deliver(std::mem::take(&mut self.batch)).await;
        }
    }

    /// Up to [`BATCH`] entries after the cursor. Each comes with its id, and
    /// with its message unless the entry is malformed (written by something
    /// else than [`super::Store`]): the cursor moves past it anyway.
    async fn read_after(&mut self) -> Result<Vec<(StreamId, Option<ChatMessage>)>, FeedError> {
        let mut cmd = redis::cmd("XRANGE");
        cmd.arg(self.keys.feed())
            .arg(format!("({}", self.cursor))
            .arg("+")
            .arg("COUNT")
            .arg(BATCH);
        let entries: Entries = cmd.query_async(&mut self.conn).await?;
        entries
            .into_iter()
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

/// A message as the append script publishes it:
/// `<previous entry's id> <id> <room> <text>`.
struct Pushed {
    previous: StreamId,
    id: StreamId,
    message: ChatMessage,
}

impl Pushed {
    fn parse(push: PushInfo) -> Option<Self> {
        // The data of a message push: the channel, then the payload.
        let redis::Value::BulkString(payload) = push.data.into_iter().nth(1)? else {
            return None;
        };
        let payload = String::from_utf8(payload).ok()?;
        let mut parts = payload.splitn(4, ' ');
        let previous = StreamId::parse(parts.next()?)?;
        let id_text = parts.next()?;
        let id = StreamId::parse(id_text)?;
        let room = parts.next()?;
        let text = parts.next()?;
        Some(Pushed {
            previous,
            id,
            message: ChatMessage {
                id: id_text.to_owned(),
                room: room.to_owned(),
                message: text.to_owned(),
                ts: id.ms,
            },
        })
    }
}

/// Spreads reconnection attempts of many frontends over time (75%–100% of
/// `pause`), so a restarted Redis is not met by all of them at once.
fn jitter(pause: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    pause.mul_f64(0.75 + f64::from(nanos % 1000) / 4000.0)
}
