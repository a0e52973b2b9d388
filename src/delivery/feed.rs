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
//! Whatever was taken from Redis together is handed over together, so that
//! each socket gets it with one write. With `frontend.write_window_us`, what
//! the feed takes within that long after a delivery is held back and goes
//! out together when the window ends (Nagle's rule, for deliveries). The
//! first message after a quiet spell goes out at once, and a full batch
//! ([`BATCH`] messages, or a quarter of `frontend.max_queued_bytes` of
//! text) goes out at once too: what the window joins always fits in a
//! socket's send queue with room to spare.
//!
//! Pushes spare Redis the work `XREAD BLOCK` costs it for each frontend and
//! each read (a command to read, a client to block and unblock), and the
//! frontend a request per read.
//!
//! # A push is a hint; the stream is the truth
//!
//! Whoever may publish on the channel could push a message with an id of
//! its choosing. Taken as truth, an id far ahead would move the cursor past
//! every real message to come, and the frontend would skip them all. So:
//!
//! - a pushed id more than [`MAX_AHEAD`] ahead of this host's clock is not
//!   taken; the stream is read instead;
//! - every read of the stream starts *at* the cursor, and so checks that
//!   the stream holds it. A cursor the stream does not hold, while it holds
//!   older entries (so the cursor was not trimmed away), was never a real
//!   entry: the feed goes back to the last position the stream confirmed,
//!   and hands out what it has after it, less what was handed out already;
//! - a push naming an id at or behind the cursor that was never handed out
//!   means the cursor ran past a real message: the stream is read at once.
//!
//! # Across a failover (Sentinel mode)
//!
//! The feed follows the primary of [`Primary`]: when it changes, the
//! connection to the old one is dropped (nothing more is read from a demoted
//! primary) and the feed reconnects to the new one, where it reads on from
//! its cursor as after any reconnection. Every acknowledged message is on
//! the new primary (the backend waited for a replica), so none is skipped.
//! The new primary may lack the cursor itself: the old primary's last
//! entries, never acknowledged, were lost with it. The feed then logs a
//! warning and goes on after the cursor; the backend takes the ids of new
//! appends above the ids it stored before (see the store's append script),
//! so they are not hidden behind the cursor by a new primary's slower clock.
//!
//! # Only what replicas hold reaches sockets (Sentinel mode)
//!
//! With `redis.min_replicas_acked` > 0, the append script publishes a
//! message before the backend's `WAIT` has seen replicas take it. Handed to
//! sockets at once, a message whose primary then died unreplicated would be
//! shown, answered 503, retried with the same `Idempotency-Key` on the new
//! primary (which has neither the message nor the record of its key), and
//! stored and shown again under a new id: the same text twice. So the feed
//! *holds* what it takes from Redis (pushes and reads alike, in feed order,
//! [`Held`]) and *releases* it to the subscriber only once it is replicated:
//! at or below the newest id the backends found on enough replicas, which
//! they record in `{prefix}:feed:replicated` and publish on the channel of
//! that name after each `WAIT` (see the module `acks`). The feed reads that
//! key too at each (re)connection and every [`POLL`], so a lost push only
//! delays a release. Messages reach sockets after the replicas'
//! acknowledgement, not after the primary's.
//!
//! - The subscriber's cursor, which resuming clients are replayed up to,
//!   only ever moves over released entries: a resume never hands out an
//!   entry a failover could still take back.
//! - A message whose `WAIT` failed (503) stays held until a later `WAIT`
//!   covers it: replicated after all, it is real, released once, and a
//!   retry with the same key gets its id. Or until a failover drops it.
//! - After a failover, what the new primary holds when the feed connects to
//!   it survived the failover: it is taken as replicated. What was held
//!   from the old primary is dropped, and read again from the new one from
//!   the last released entry: the new primary's stream decides.
//! - The hold is bounded ([`MAX_HELD`] entries, [`MAX_HELD_BYTES`] of
//!   text). When it is full the feed stops taking entries; once releases
//!   make room it reads on from the stream, where the rest is.
//! - A replicated id is a hint like a pushed message: one further ahead of
//!   this host's clock than [`MAX_AHEAD`] is ignored, and it can only
//!   release entries the feed took from Redis (read, or pushed and trusted
//!   as they are without a hold), never move the cursor. Whoever may
//!   publish on the channel (or set the key) can at worst release entries
//!   early, before replicas hold them, for as long as the forged id is
//!   ahead of the real ones: a failover in that time may show a message
//!   twice, as it did before entries were held.
//!
//! One Redis, or `redis.min_replicas_acked` = 0: nothing is held.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ProtocolVersion, PushInfo, PushKind};
use tokio::sync::mpsc;

use super::primary::Primary;
use super::{Entries, Keys, RedisHealth, Subscriber, take_field};
use crate::config::{Config, RedisMode};
use crate::message::{ChatMessage, Room, StreamId};

/// How often the feed stream is read even when pushes arrive as they should.
/// Short enough that a silently dead connection is noticed within a few
/// seconds.
const POLL: Duration = Duration::from_secs(2);
/// Most entries taken per read of the stream, and most pushed messages handed
/// on together: bounds the work done between two awaits.
const BATCH: usize = 512;
/// How far ahead of this host's clock a pushed id may be and still be taken
/// (Redis's clock makes the ids; hosts' clocks agree far better than this).
const MAX_AHEAD: Duration = Duration::from_secs(60);

/// Most entries held until replicated, and most bytes of their text: past
/// either, the feed stops taking entries until releases make room.
const MAX_HELD: usize = 20_000;
const MAX_HELD_BYTES: usize = 16 << 20;

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
    #[error("no Redis primary: the Sentinels name none that answers as one")]
    NoPrimary,
    #[error("the Redis primary changed")]
    PrimaryChanged,
}

/// Follows `{prefix}:feed` from a cursor that survives reconnections.
pub struct Feed {
    primary: Primary,
    keys: Keys,
    timeout: Duration,
    reconnect_min: Duration,
    reconnect_max: Duration,
    health: Arc<RedisHealth>,
    /// Where the feed is; `None` until Redis was first reached.
    position: Option<Position>,
    /// Messages read from the stream rather than pushed.
    caught_up: Counter,
    /// Sentinel mode with replica acknowledgements: what waits for them.
    held: Option<Held>,
    /// `frontend.write_window_us`: how long after a delivery the next waits.
    write_window: Option<Duration>,
    /// The bytes of text that make a batch full (and end a write window): a
    /// quarter of `frontend.max_queued_bytes`, so that a batch fits in a
    /// socket's send queue with room to spare.
    full_bytes: usize,
}

/// Entries taken from the feed that replicas are not known to hold yet.
#[derive(Debug)]
struct Held {
    /// The last entry released to the subscriber.
    released: StreamId,
    /// The newest id replicas are known to hold.
    replicated: StreamId,
    /// Taken after `released`, in feed order, up to the feed's cursor.
    entries: VecDeque<ChatMessage>,
    bytes: usize,
    /// The address of the primary they were taken from.
    primary: Option<String>,
    /// Whether the hold was found full since it last released something.
    full: bool,
}

impl Held {
    fn new() -> Self {
        Held {
            released: StreamId::ZERO,
            replicated: StreamId::ZERO,
            entries: VecDeque::new(),
            bytes: 0,
            primary: None,
            full: false,
        }
    }

    /// Whether one more entry may be taken.
    fn has_room(&self, taking: &[ChatMessage]) -> bool {
        let bytes: usize = taking.iter().map(|m| m.message.len()).sum();
        self.entries.len() + taking.len() < MAX_HELD && self.bytes + bytes < MAX_HELD_BYTES
    }

    /// Learns that replicas hold every entry up to `id`; ignored when `id`
    /// is implausibly far ahead (a forged push).
    fn replicated_up_to(&mut self, id: StreamId) {
        if plausible(id) {
            self.replicated = self.replicated.max(id);
        }
    }

    fn hold(&mut self, messages: Vec<ChatMessage>) {
        self.bytes += messages.iter().map(|m| m.message.len()).sum::<usize>();
        self.entries.extend(messages);
    }

    /// Whether the oldest held entry is replicated.
    fn has_releasable(&self) -> bool {
        self.entries
            .front()
            .is_some_and(|m| m.id <= self.replicated)
    }

    /// The held entries that are replicated, at most [`BATCH`], oldest first.
    fn release(&mut self) -> Vec<ChatMessage> {
        let count = self
            .entries
            .iter()
            .take(BATCH)
            .take_while(|m| m.id <= self.replicated)
            .count();
        let released: Vec<ChatMessage> = self.entries.drain(..count).collect();
        if let Some(last) = released.last() {
            self.released = last.id;
        }
        self.bytes -= released.iter().map(|m| m.message.len()).sum::<usize>();
        released
    }

    /// Drops the held entries after `id` (the stream does not confirm them).
    fn drop_after(&mut self, id: StreamId) -> Vec<StreamId> {
        let keep = self.entries.partition_point(|m| m.id <= id);
        let dropped: Vec<ChatMessage> = self.entries.drain(keep..).collect();
        self.bytes -= dropped.iter().map(|m| m.message.len()).sum::<usize>();
        dropped.iter().map(|m| m.id).collect()
    }

    /// Moves on to the primary at `address`, whose stream ends at `last`.
    /// On another primary than before, the entries held are dropped: they
    /// are read again from this one, after the last released entry, and
    /// what it holds now survived the failover, so it counts as
    /// replicated. Returns whether the primary changed. (The same primary
    /// answering again keeps what is held: the stream there still decides,
    /// as after any reconnection.)
    fn follow(&mut self, address: &str, last: StreamId) -> bool {
        if self.primary.as_deref() == Some(address) {
            return false;
        }
        let first = self.primary.is_none();
        self.primary = Some(address.to_owned());
        self.entries.clear();
        self.bytes = 0;
        if first {
            self.released = last;
        }
        self.replicated = last.max(self.released);
        !first
    }
}

/// Where a feed is, and how much of that the stream has confirmed.
#[derive(Debug)]
struct Position {
    /// Id of the last entry handed out: the feed's cursor.
    cursor: StreamId,
    /// The newest id known to be in the stream, with everything before it
    /// handed out.
    confirmed: StreamId,
    /// Ids handed out after `confirmed`, in order: from pushes, which the
    /// stream has yet to confirm.
    unconfirmed: Vec<StreamId>,
}

impl Position {
    fn at(id: StreamId) -> Self {
        Position {
            cursor: id,
            confirmed: id,
            unconfirmed: Vec::new(),
        }
    }

    /// Whether the entry `id`, at or behind the cursor, was handed out.
    fn handed_out(&self, id: StreamId) -> bool {
        id <= self.confirmed || self.unconfirmed.binary_search(&id).is_ok()
    }

    /// Moves on to a pushed entry.
    fn push(&mut self, id: StreamId) {
        self.cursor = id;
        self.unconfirmed.push(id);
    }

    /// Moves on to an entry read from the stream, from a cursor that the
    /// same read showed the stream holds: everything up to it is confirmed.
    fn read(&mut self, id: StreamId) {
        self.cursor = id;
        self.confirmed = id;
        let through = self.unconfirmed.partition_point(|pushed| *pushed <= id);
        self.unconfirmed.drain(..through);
    }
}

impl Feed {
    /// A feed of the Redis `config` names; in Sentinel mode it follows the
    /// primary itself (so this needs a Tokio runtime).
    pub fn new(config: &Config, health: Arc<RedisHealth>) -> Result<Self, FeedError> {
        Self::with_primary(config, health, Primary::new(&config.redis))
    }

    /// A feed of `primary`'s Redis, which may be shared with a [`super::Store`].
    pub fn with_primary(
        config: &Config,
        health: Arc<RedisHealth>,
        primary: Primary,
    ) -> Result<Self, FeedError> {
        let redis = &config.redis;
        if let Some(resolved) = primary.current() {
            // Checks the settings (password file, TLS) now, at start.
            primary.client(&resolved, ProtocolVersion::RESP3)?;
        }
        Ok(Feed {
            primary,
            keys: Keys::new(&redis.key_prefix),
            timeout: redis.command_timeout(),
            reconnect_min: redis.reconnect_min(),
            reconnect_max: redis.reconnect_max(),
            health,
            position: None,
            caught_up: Counter::default(),
            held: matches!(&redis.mode, RedisMode::Sentinel(s) if s.min_replicas_acked > 0)
                .then(Held::new),
            write_window: config.frontend.write_window(),
            full_bytes: config.frontend.max_queued_bytes.get() / 4,
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
            if let FeedError::PrimaryChanged = error {
                // Straight on to the new primary.
                continue;
            }
            self.primary.suspect();
            if self.health.set_up(false) {
                tracing::warn!(
                    "lost Redis, delivery paused at {:?}: {error}",
                    self.delivered_up_to().map(|id| id.to_string())
                );
            } else {
                tracing::debug!("Redis still unreachable: {error}");
            }
            tokio::time::sleep(jitter(pause)).await;
            pause = (pause * 2).min(self.reconnect_max);
        }
    }

    /// The last entry handed to the subscriber, where delivery goes on from:
    /// the last released one when entries are held for the replicas.
    fn delivered_up_to(&self) -> Option<StreamId> {
        let cursor = self.position.as_ref().map(|p| p.cursor)?;
        Some(self.held.as_ref().map_or(cursor, |h| h.released))
    }

    /// Connects, subscribes and delivers until the connection fails.
    async fn follow(
        &mut self,
        subscriber: &impl Subscriber,
        pause: &mut Duration,
    ) -> Result<Infallible, FeedError> {
        let mut changes = self.primary.changes();
        let resolved = changes.borrow_and_update().clone();
        let resolved = resolved.ok_or(FeedError::NoPrimary)?;
        let (sender, mut pushes) = mpsc::unbounded_channel();
        let mut conn = self.connect(&resolved, sender).await?;
        // Subscribed before the stream is read: whatever is appended after
        // that read is pushed.
        conn.subscribe(self.keys.feed()).await?;
        let mut position = self.position.take();
        if let Some(held) = &mut self.held {
            conn.subscribe(self.keys.replicated()).await?;
            let last = Self::last_id(&self.keys, &mut conn).await?;
            if held.follow(&resolved.address, last) || position.is_none() {
                // Read again from the new primary after what was released.
                position = Some(Position::at(held.released));
            }
            if let Some(replicated) = Self::replicated(&self.keys, &mut conn).await? {
                held.replicated_up_to(replicated);
            }
        }
        let position = match position {
            Some(position) => position,
            None => Position::at(Self::last_id(&self.keys, &mut conn).await?),
        };
        let start = self.held.as_ref().map_or(position.cursor, |h| h.released);
        subscriber.following(start).await;
        if self.health.set_up(true) {
            tracing::info!("following the Redis feed from {start}");
        }
        *pause = self.reconnect_min;
        let window = self.write_window;
        let mut reader = Reader {
            conn,
            keys: &self.keys,
            caught_up: &self.caught_up,
            position: self.position.insert(position),
            held: self.held.as_mut(),
            batch: Vec::new(),
            batch_bytes: 0,
            full_bytes: self.full_bytes,
        };
        // The first tick is immediate: it reads what was appended while away.
        let mut poll = tokio::time::interval(POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // With a write window: until when what is taken is held back.
        let mut window_ends: Option<tokio::time::Instant> = None;
        loop {
            let held_until = window_ends.filter(|_| reader.has_pending());
            let step = tokio::select! {
                push = pushes.recv() => reader.take_pushed(push, &mut pushes, subscriber).await,
                _ = poll.tick() => async {
                    reader.read_replicated().await?;
                    reader.catch_up(subscriber).await
                }.await,
                // Never fires with one Redis, whose primary never changes.
                _ = changes.changed() => {
                    let now = changes.borrow().as_ref().map(|r| r.generation);
                    if now == Some(resolved.generation) {
                        Ok(())
                    } else {
                        Err(FeedError::PrimaryChanged)
                    }
                }
                () = tokio::time::sleep_until(held_until.unwrap_or_else(tokio::time::Instant::now)),
                    if held_until.is_some() => Ok(()),
            };
            // Within the window, what was taken waits, unless the batch is
            // full. What was taken goes out even when the step then failed:
            // the cursor has moved past it, and the next connection goes on
            // from there.
            let full = reader.full();
            let window_open = window_ends.is_some_and(|ends| tokio::time::Instant::now() < ends);
            if step.is_err() || full || !window_open {
                let delivered = reader.hand_over(subscriber).await;
                // A full batch leaves more waiting: that goes on at once.
                window_ends = window
                    .filter(|_| delivered && !full)
                    .map(|w| tokio::time::Instant::now() + w);
            }
            step?;
        }
    }

    async fn connect(
        &self,
        resolved: &super::Resolved,
        pushes: mpsc::UnboundedSender<PushInfo>,
    ) -> Result<MultiplexedConnection, FeedError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_push_sender(pushes);
        // Pushes share the connection with commands only in RESP3.
        let client = self.primary.client(resolved, ProtocolVersion::RESP3)?;
        Ok(client
            .get_multiplexed_async_connection_with_config(&config)
            .await?)
    }

    /// The id of the newest entry in the feed, so delivery starts after it.
    async fn last_id(keys: &Keys, conn: &mut MultiplexedConnection) -> Result<StreamId, FeedError> {
        let mut cmd = redis::cmd("XREVRANGE");
        cmd.arg(keys.feed()).arg("+").arg("-").arg("COUNT").arg(1);
        let newest: Entries = cmd.query_async(conn).await?;
        match newest.first() {
            Some((id, _)) => StreamId::parse(id).ok_or_else(|| FeedError::Malformed(id.clone())),
            None => Ok(StreamId::ZERO),
        }
    }
}

impl Feed {
    /// The newest id the backends found on enough replicas, if recorded.
    async fn replicated(
        keys: &Keys,
        conn: &mut MultiplexedConnection,
    ) -> Result<Option<StreamId>, FeedError> {
        let recorded: Option<String> = redis::cmd("GET")
            .arg(keys.replicated())
            .query_async(conn)
            .await?;
        Ok(recorded.as_deref().and_then(StreamId::parse))
    }
}

/// Following the feed over one connection.
struct Reader<'a> {
    conn: MultiplexedConnection,
    keys: &'a Keys,
    caught_up: &'a Counter,
    /// Where the feed is, counting the messages taken into `batch`; it
    /// outlives the connection.
    position: &'a mut Position,
    /// Sentinel mode with replica acknowledgements: what waits for them.
    held: Option<&'a mut Held>,
    /// Messages taken but not yet handed to the subscriber (or held).
    batch: Vec<ChatMessage>,
    /// The bytes of their text.
    batch_bytes: usize,
    /// The bytes of text that make a batch full (see [`Reader::full`]).
    full_bytes: usize,
}

/// Pushed ids the stream may leave unconfirmed before it is read anyway
/// (it is read every [`POLL`] regardless).
const MAX_UNCONFIRMED: usize = 100_000;

impl Reader<'_> {
    /// Takes `push` (`None`: the connection is gone) and everything pushed
    /// meanwhile, up to a batch.
    async fn take_pushed(
        &mut self,
        push: Option<PushInfo>,
        pushes: &mut mpsc::UnboundedReceiver<PushInfo>,
        subscriber: &impl Subscriber,
    ) -> Result<(), FeedError> {
        let mut push = push.ok_or(FeedError::Disconnected)?;
        loop {
            self.take(push, subscriber).await?;
            if self.full() {
                return Ok(());
            }
            match pushes.try_recv() {
                Ok(next) => push = next,
                Err(_) => return Ok(()),
            }
        }
    }

    /// Takes one push: the next message, one already handed out, or news
    /// that something was missed (or that a push cannot be trusted), and
    /// then reads the stream.
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
        if let Some(held) = self.held.as_deref_mut()
            && channel_of(&push) == Some(self.keys.replicated().as_bytes())
        {
            if let Some(id) = replicated_id(push) {
                held.replicated_up_to(id);
            }
            return Ok(());
        }
        if !self.has_room() {
            // Read from the stream once releases make room.
            return Ok(());
        }
        let position = &mut *self.position;
        match Pushed::parse(push) {
            // Handed out already: read from the stream before its push came.
            Some(pushed) if position.handed_out(pushed.id) => Ok(()),
            // At or behind the cursor yet never handed out: the cursor ran
            // past a real message.
            Some(pushed) if pushed.id <= position.cursor => self.catch_up(subscriber).await,
            Some(pushed)
                if pushed.previous == position.cursor
                    && plausible(pushed.id)
                    && position.unconfirmed.len() < MAX_UNCONFIRMED =>
            {
                position.push(pushed.id);
                self.add(pushed.message);
                Ok(())
            }
            // A gap, an id too far ahead, or something that is not a message.
            _ => self.catch_up(subscriber).await,
        }
    }

    /// Reads the stream from the cursor to its end, and hands out what
    /// follows the cursor and was not handed out yet.
    ///
    /// Each read starts at the cursor itself, to see that the stream holds
    /// it. If it does not, yet holds older entries (so the cursor was not
    /// trimmed away), the cursor came from a push the stream never had: the
    /// feed goes back to the last confirmed position and reads from there.
    async fn catch_up(&mut self, subscriber: &impl Subscriber) -> Result<(), FeedError> {
        loop {
            if !self.has_room() {
                return Ok(());
            }
            let cursor = self.position.cursor;
            let entries = self.read_from(cursor).await?;
            let holds_cursor = entries.first().is_some_and(|(id, _)| *id == cursor);
            if !holds_cursor && cursor != StreamId::ZERO {
                if self.holds_older(cursor).await? {
                    if cursor != self.position.confirmed {
                        self.go_back();
                        continue;
                    }
                    tracing::warn!(
                        "feed entry {cursor} is gone from Redis; delivery goes on after it"
                    );
                } else if !entries.is_empty() {
                    tracing::warn!(
                        "the feed was trimmed past entry {cursor} before this frontend read what \
                         followed it: messages may have been skipped (history.feed_length, feed_bytes)"
                    );
                }
            }
            let mut complete = entries.len() <= BATCH;
            for (id, message) in entries.into_iter().filter(|(id, _)| *id > cursor) {
                if !self.has_room() {
                    // The rest is read once releases make room.
                    complete = true;
                    break;
                }
                let again = self.position.handed_out(id);
                self.position.read(id);
                match message {
                    _ if again => {}
                    Some(message) => {
                        self.caught_up.inc();
                        self.add(message);
                    }
                    None => tracing::error!("skipping malformed feed entry {id}"),
                }
            }
            if complete {
                return Ok(());
            }
            self.hand_over(subscriber).await;
        }
    }

    /// Goes back to the last position the stream confirmed. Pushed messages
    /// not yet handed to the subscriber are dropped: those the stream has
    /// are read from it again.
    fn go_back(&mut self) {
        let position = &mut *self.position;
        tracing::warn!(
            "feed entry {} was pushed but Redis does not have it; reading the feed again from {}",
            position.cursor,
            position.confirmed
        );
        let confirmed = position.confirmed;
        let (kept, dropped): (Vec<_>, Vec<_>) = std::mem::take(&mut self.batch)
            .into_iter()
            .partition(|m| m.id <= confirmed);
        self.batch_bytes = kept.iter().map(|m| m.message.len()).sum();
        self.batch = kept;
        let mut dropped: Vec<StreamId> = dropped.iter().map(|m| m.id).collect();
        if let Some(held) = self.held.as_deref_mut() {
            dropped.extend(held.drop_after(confirmed));
        }
        position.unconfirmed.retain(|id| !dropped.contains(id));
        position.cursor = confirmed;
    }

    /// Hands the messages taken to the subscriber; while replica
    /// acknowledgements are awaited, holds them and hands over those
    /// replicated, in feed order. Says whether it handed over any.
    async fn hand_over(&mut self, subscriber: &impl Subscriber) -> bool {
        self.batch_bytes = 0;
        let Some(held) = self.held.as_deref_mut() else {
            if self.batch.is_empty() {
                return false;
            }
            subscriber.deliver(std::mem::take(&mut self.batch)).await;
            return true;
        };
        held.hold(std::mem::take(&mut self.batch));
        let mut delivered = false;
        loop {
            let released = held.release();
            if released.is_empty() {
                break;
            }
            held.full = false;
            delivered = true;
            subscriber.deliver(released).await;
        }
        if !held.has_room(&[]) && !held.full {
            held.full = true;
            tracing::warn!(
                "{} messages wait for replicas to hold them, past {}: delivery waits for a \
                 backend to publish that they do (every backend needs \
                 redis.min_replicas_acked > 0, as this frontend has, and a version that \
                 publishes {})",
                held.entries.len(),
                held.released,
                self.keys.replicated()
            );
        }
        delivered
    }

    /// Takes `message` into the batch.
    fn add(&mut self, message: ChatMessage) {
        self.batch_bytes += message.message.len();
        self.batch.push(message);
    }

    /// Whether the batch is full: [`BATCH`] messages, or the write window's
    /// bytes. A full batch is handed over at once, window or not.
    fn full(&self) -> bool {
        self.batch.len() >= BATCH || self.batch_bytes >= self.full_bytes
    }

    /// Whether anything taken waits to be handed over: messages in the
    /// batch, or held ones that replicas now hold.
    fn has_pending(&self) -> bool {
        !self.batch.is_empty() || self.held.as_deref().is_some_and(Held::has_releasable)
    }

    /// Whether one more entry may be taken from the feed (always, unless
    /// entries are held until replicated).
    fn has_room(&self) -> bool {
        self.held
            .as_deref()
            .is_none_or(|held| held.has_room(&self.batch))
    }

    /// Learns from its key how far replicas hold the feed, in case a push
    /// of it was lost.
    async fn read_replicated(&mut self) -> Result<(), FeedError> {
        if let Some(held) = self.held.as_deref_mut()
            && let Some(id) = Feed::replicated(self.keys, &mut self.conn).await?
        {
            held.replicated_up_to(id);
        }
        Ok(())
    }

    /// The entry `from` (if the stream holds it) and up to [`BATCH`] after
    /// it. Each comes with its id, and with its message unless the entry is
    /// malformed (written by something else than [`super::Store`]): the
    /// cursor moves past it anyway.
    async fn read_from(
        &mut self,
        from: StreamId,
    ) -> Result<Vec<(StreamId, Option<ChatMessage>)>, FeedError> {
        let mut cmd = redis::cmd("XRANGE");
        cmd.arg(self.keys.feed())
            .arg(from.to_string())
            .arg("+")
            .arg("COUNT")
            .arg(BATCH + 1);
        let entries: Entries = cmd.query_async(&mut self.conn).await?;
        entries
            .into_iter()
            .map(|(id, mut fields)| {
                let parsed =
                    StreamId::parse(&id).ok_or_else(|| FeedError::Malformed(id.clone()))?;
                let room = take_field(&mut fields, b"r").and_then(|r| Room::parse(&r).ok());
                let text = take_field(&mut fields, b"m");
                let message = room
                    .zip(text)
                    .map(|(room, text)| ChatMessage::new(parsed, room, text));
                Ok((parsed, message))
            })
            .collect()
    }

    /// Whether the stream holds an entry older than `id`.
    async fn holds_older(&mut self, id: StreamId) -> Result<bool, FeedError> {
        let mut cmd = redis::cmd("XREVRANGE");
        cmd.arg(self.keys.feed())
            .arg(format!("({id}"))
            .arg("-")
            .arg("COUNT")
            .arg(1);
        let older: Entries = cmd.query_async(&mut self.conn).await?;
        Ok(!older.is_empty())
    }
}

/// Whether a pushed `id` is no further ahead of this host's clock than
/// [`MAX_AHEAD`].
fn plausible(id: StreamId) -> bool {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    u128::from(id.ms) <= (now + MAX_AHEAD).as_millis()
}

/// The channel a message push came on.
fn channel_of(push: &PushInfo) -> Option<&[u8]> {
    match push.data.first()? {
        redis::Value::BulkString(channel) => Some(channel),
        _ => None,
    }
}

/// The id a push on the replicated channel names.
fn replicated_id(push: PushInfo) -> Option<StreamId> {
    let redis::Value::BulkString(payload) = push.data.into_iter().nth(1)? else {
        return None;
    };
    StreamId::parse(std::str::from_utf8(&payload).ok()?)
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
        let id = StreamId::parse(parts.next()?)?;
        let room = Room::parse(parts.next()?).ok()?;
        let text = parts.next()?;
        Some(Pushed {
            previous,
            id,
            message: ChatMessage::new(id, room, text.to_owned()),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn now_ms() -> u64 {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        u64::try_from(now.unwrap().as_millis()).unwrap()
    }

    fn message(ms: u64, text: &str) -> ChatMessage {
        let room = Room::parse("r").unwrap();
        ChatMessage::new(StreamId { ms, seq: 0 }, room, text.to_owned())
    }

    fn ids(messages: &[ChatMessage]) -> Vec<u64> {
        messages.iter().map(|m| m.id.ms).collect()
    }

    #[test]
    fn entries_are_released_in_order_up_to_the_replicated_id() {
        let base = now_ms();
        let mut held = Held::new();
        held.follow("primary:1", StreamId { ms: base, seq: 0 });
        held.hold(vec![message(base + 1, "a"), message(base + 2, "b")]);
        held.hold(vec![message(base + 3, "c")]);
        assert!(held.release().is_empty(), "nothing is replicated yet");
        held.replicated_up_to(StreamId {
            ms: base + 2,
            seq: 0,
        });
        assert_eq!(ids(&held.release()), [base + 1, base + 2]);
        assert_eq!(held.released.ms, base + 2);
        assert_eq!(held.bytes, 1);
        // A replicated id far ahead of this host's clock is not taken.
        held.replicated_up_to(StreamId {
            ms: base + 3_600_000,
            seq: 0,
        });
        assert!(held.release().is_empty());
        held.replicated_up_to(StreamId {
            ms: base + 9,
            seq: 0,
        });
        assert_eq!(ids(&held.release()), [base + 3]);
        assert!(held.release().is_empty(), "released once");
    }

    #[test]
    fn a_new_primary_drops_what_is_held_and_counts_what_it_has_as_replicated() {
        let base = now_ms();
        let mut held = Held::new();
        assert!(!held.follow("old:1", StreamId { ms: base, seq: 0 }));
        held.hold(vec![message(base + 1, "lost?")]);
        assert!(
            !held.follow(
                "old:1",
                StreamId {
                    ms: base + 1,
                    seq: 0
                }
            ),
            "the same primary answering again keeps what is held"
        );
        assert_eq!(held.entries.len(), 1);
        assert!(held.follow(
            "new:1",
            StreamId {
                ms: base + 1,
                seq: 0
            }
        ));
        assert!(held.entries.is_empty() && held.bytes == 0);
        assert_eq!(held.released.ms, base, "read again after the last released");
        assert_eq!(held.replicated.ms, base + 1);
    }

    #[test]
    fn the_hold_is_bounded_in_entries_and_bytes() {
        let base = now_ms();
        let mut held = Held::new();
        held.follow("primary:1", StreamId { ms: base, seq: 0 });
        held.hold(
            (1..MAX_HELD as u64)
                .map(|i| message(base + i, ""))
                .collect(),
        );
        assert!(!held.has_room(&[message(base + MAX_HELD as u64, "")]));
        held.replicated_up_to(StreamId {
            ms: base + 1,
            seq: 0,
        });
        assert_eq!(held.release().len(), 1);
        assert!(held.has_room(&[]));

        let mut held = Held::new();
        let text = "x".repeat(MAX_HELD_BYTES / 2);
        held.hold(vec![message(base + 1, &text)]);
        assert!(held.has_room(&[]));
        assert!(!held.has_room(&[message(base + 2, &text)]));
    }
}
