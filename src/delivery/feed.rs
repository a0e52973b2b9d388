//! The frontend's side of Redis: follow the rooms this frontend serves.
//!
//! A frontend hears only of the rooms it has sockets in. When a room's first
//! socket joins, the frontend asks its [`Feed`] to follow the room
//! ([`Interest::follow`]): the feed subscribes to the room's shard channel
//! (`SSUBSCRIBE`, through [`Subscriptions`], which keeps it subscribed across
//! lost connections and, in a Redis Cluster, moved slots), on which the
//! append script publishes each message the moment it is stored, together
//! with the id of the room's entry before it; once the subscription is
//! confirmed it reads the id of the room's newest entry, its *cursor* in
//! that room. Commands go over a connection of their own. When the room's last socket leaves, the feed stops following it
//! after [`LEAVE_GRACE`], so that a client that reconnects does not make it
//! unsubscribe and subscribe again.
//!
//! A pushed message is handed on only if its previous id is the room's
//! cursor; otherwise the frontend has missed something (it was away, or an
//! entry was appended without a push) and it reads the room's stream from
//! the cursor instead, which is where the truth is. It also reads a room's
//! stream each time its subscription is made again (after a lost
//! connection, a failover or a moved slot), and a few rooms every [`POLL`]
//! ([`SWEEP`], in turn), which both checks that Redis still answers and finds
//! any entry that no later push revealed.
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
//! # A push is a hint; the stream is the truth
//!
//! Whoever may publish on a room's channel could push a message with an id
//! of its choosing. Taken as truth, an id far ahead would move the cursor
//! past every real message to come, and the frontend would skip them all.
//! So:
//!
//! - a pushed id more than [`MAX_AHEAD`] ahead of this host's clock is not
//!   taken; the stream is read instead;
//! - every read of a stream starts *at* the cursor, and so checks that the
//!   stream holds it. A cursor the stream does not hold, while it holds
//!   older entries (so the cursor was not trimmed away), was never a real
//!   entry: the room goes back to the last position the stream confirmed,
//!   and hands out what it has after it, less what was handed out already;
//! - a push naming an id at or behind the cursor that was never handed out
//!   means the cursor ran past a real message: the stream is read at once.
//!
//! # Across a failover (Sentinel mode)
//!
//! The feed follows the primary of [`Primary`]: when it changes, the
//! connection to the old one is dropped (nothing more is read from a demoted
//! primary) and the feed reconnects to the new one, where it subscribes
//! again and reads on from each room's cursor as after any reconnection.
//! Every acknowledged message is on the new primary (the backend waited for
//! a replica), so none is skipped. The new primary may lack a cursor
//! itself: the old primary's last entries, never acknowledged, were lost
//! with it. The feed then logs a warning and goes on after the cursor; the
//! backend takes the ids of new appends above the ids it stored before (see
//! the store's append script), so they are not hidden behind the cursor by
//! a new primary's slower clock.
//!
//! # On a Redis Cluster
//!
//! Commands go through the cluster's [`Router`], which sends each to the
//! node of its key's slot; the subscriptions ([`Subscriptions`]) keep each
//! room's channel subscribed on whichever primary holds its slot. When a
//! shard fails over, or a slot moves, the rooms of the slot are subscribed
//! again on their new node and read on from their cursors, as after a
//! reconnection. A room confirmed on another node than before gives up what
//! it held for replicas and reads it again from the new node, whose entries
//! count as replicated (as after a Sentinel failover).
//!
//! A node that does not answer holds up only its own rooms. The command
//! that found it silent costs one timeout; from then on the rooms it serves
//! *wait* ([`Stalls`]): nothing is sent for them, so the other rooms are
//! delivered as before. Each [`POLL`] the node is asked, off the feed's
//! path, whether it answers again; once it does, or once its slots have
//! another owner (a failover), its rooms are read on from their cursors.
//! The frontend's metric `redis_rooms_waiting` counts the rooms waiting.
//! Only when no node answers at all does the feed lose Redis, as with one
//! server.
//!
//! # Only what replicas hold reaches sockets
//!
//! With `redis.min_replicas_acked` > 0, the append script publishes a
//! message before the backend's `WAIT` has seen replicas take it. Handed to
//! sockets at once, a message whose primary then died unreplicated would be
//! shown, answered 503, retried with the same `Idempotency-Key` on the new
//! primary (which has neither the message nor the record of its key), and
//! stored and shown again under a new id: the same text twice. So the feed
//! *holds* what it takes from Redis (pushes and reads alike, in room order,
//! [`Held`]) and *releases* it to the subscriber only once it is
//! replicated: at or below the newest id of the room the backends found on
//! enough replicas, which they record in the room's `acked` key and publish
//! on the room's channel (`acked <id>`) after each `WAIT` (see the module
//! `acks`). The feed reads that key too when it starts following a room,
//! after each (re)connection and as it sweeps, so a lost push only delays a
//! release.
//!
//! - The position the subscriber is told of, which resuming clients are
//!   replayed up to, only ever moves over released entries: a resume never
//!   hands out an entry a failover could still take back.
//! - A message whose `WAIT` failed (503) stays held until a later `WAIT`
//!   covers it: replicated after all, it is real, released once, and a
//!   retry with the same key gets its id. Or until a failover drops it.
//! - After a failover, what the new primary holds when the feed connects to
//!   it survived the failover: it is taken as replicated. What was held
//!   from the old primary is dropped, and read again from the new one from
//!   the last released entry: the new primary's stream decides.
//! - The hold is bounded ([`MAX_HELD`] entries, [`MAX_HELD_BYTES`] of
//!   text, over all rooms). When it is full the feed stops taking entries;
//!   once releases make room it reads on from the streams, where the rest
//!   is.
//! - A replicated id is a hint like a pushed message: one further ahead of
//!   this host's clock than [`MAX_AHEAD`] is ignored, and it can only
//!   release entries the feed took from Redis, never move the cursor.
//!   Whoever may publish on the channel (or set the key) can at worst
//!   release entries early, before replicas hold them.
//!
//! Without replica acknowledgements, nothing is held.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{AsyncConnectionConfig, ProtocolVersion};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::primary::{Primary, Resolved};
use super::router::Router;
use super::shards::{self, Event, NodeId, Nodes, Subscriptions};
use super::{Entries, Keys, RedisHealth, Subscriber, jitter, take_field};
use crate::config::{Config, RedisMode};
use crate::message::{ChatMessage, Room, StreamId};

/// How often a few rooms' streams are read even when pushes arrive as they
/// should, and rooms nobody is in any more are let go. Short enough that a
/// silently dead connection is noticed within a few seconds.
const POLL: Duration = Duration::from_secs(2);
/// Rooms whose streams are read at each [`POLL`], in turn.
const SWEEP: usize = 32;
/// How long a room nobody is in is still followed, in case someone comes
/// back (a client reconnecting).
pub const LEAVE_GRACE: Duration = Duration::from_secs(5);
/// Most entries taken per read of a stream, and most pushed messages handed
/// on together: bounds the work done between two awaits.
const BATCH: usize = 512;
/// How far ahead of this host's clock a pushed id may be and still be taken
/// (Redis's clock makes the ids; hosts' clocks agree far better than this).
const MAX_AHEAD: Duration = Duration::from_secs(60);

/// Most entries held until replicated, and most bytes of their text, over
/// all rooms: past either, the feed stops taking entries until releases
/// make room.
const MAX_HELD: usize = 20_000;
const MAX_HELD_BYTES: usize = 16 << 20;

/// Pushed ids a room's stream may leave unconfirmed before it is read
/// anyway.
const MAX_UNCONFIRMED: usize = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error(transparent)]
    Setup(#[from] super::ConnectError),
    #[error("malformed entry {0:?}")]
    Malformed(String),
    #[error("no Redis primary: the Sentinels name none that answers as one")]
    NoPrimary,
    #[error("the Redis primary changed")]
    PrimaryChanged,
}

/// What a frontend asks of its feed.
enum Request {
    /// Follow the room; answer with the position it is delivered from.
    Follow(Room, oneshot::Sender<StreamId>),
    /// Nobody is in the room any more.
    Leave(Room),
}

/// The frontend's handle on which rooms its [`Feed`] follows. Cheap to clone.
#[derive(Clone)]
pub struct Interest(mpsc::UnboundedSender<Request>);

impl Interest {
    /// Follows `room` (again, if it was left); returns, once the feed
    /// hears of the room, the id of its last message handed to the
    /// subscriber: every later one will be handed over. `None` when Redis
    /// does not answer within `limit` (the feed follows the room once it
    /// does).
    pub async fn follow(&self, room: &Room, limit: Duration) -> Option<StreamId> {
        let (reply, position) = oneshot::channel();
        self.0.send(Request::Follow(room.clone(), reply)).ok()?;
        tokio::time::timeout(limit, position).await.ok()?.ok()
    }

    /// Someone is in `room` again: the feed keeps following it (or follows
    /// it again), without waiting for an answer. Sent after a
    /// [`Interest::leave`] of the room, it cancels it.
    pub fn keep(&self, room: &Room) {
        let (reply, _) = oneshot::channel();
        let _ = self.0.send(Request::Follow(room.clone(), reply));
    }

    /// Nobody is in `room` any more: the feed lets it go after
    /// [`LEAVE_GRACE`], unless someone joins it again.
    pub fn leave(&self, room: &Room) {
        let _ = self.0.send(Request::Leave(room.clone()));
    }
}

/// Follows the rooms the frontend serves, each from a cursor that survives
/// reconnections.
pub struct Feed {
    primary: Primary,
    settings: Settings,
    timeout: Duration,
    reconnect_min: Duration,
    reconnect_max: Duration,
    health: Arc<RedisHealth>,
    requests: mpsc::UnboundedReceiver<Request>,
    state: State,
    /// `frontend.write_window_us`: how long after a delivery the next waits.
    write_window: Option<Duration>,
    /// How the subscriptions time out and reconnect.
    subscriptions: shards::Settings,
    /// Cluster mode: the cluster, instead of the primary.
    cluster: Option<ClusterFeed>,
}

/// The primary a session follows (one Redis, or Sentinel mode).
struct Following {
    changes: tokio::sync::watch::Receiver<Option<Arc<super::Resolved>>>,
    primary: Arc<super::Resolved>,
}

impl Following {
    /// Waits for news of the primary: whether it is another one now.
    async fn changed(&mut self) -> Option<bool> {
        self.changes.changed().await.ok()?;
        let now = self.changes.borrow().as_ref().map(|r| r.generation);
        Some(now != Some(self.primary.generation))
    }
}

/// Cluster mode: how the feed reaches the cluster.
struct ClusterFeed {
    /// For commands: routes each to the node of its key's slot.
    router: super::router::Router,
    redis: crate::config::RedisConfig,
    cluster: crate::config::ClusterConfig,
}

impl ClusterFeed {
    /// Where the shard subscriptions find the cluster.
    fn nodes(&self) -> Result<Nodes, FeedError> {
        Ok(super::connect::cluster_nodes(&self.redis, &self.cluster)?)
    }
}

/// What a session follows: one primary (one Redis, or Sentinel mode), or
/// a cluster.
enum Mode {
    Primary(Following),
    Cluster(Cluster),
}

/// A session on a cluster: the nodes found silent, and where the nodes
/// asked again say whether they answer.
struct Cluster {
    stalls: Stalls,
    answers: mpsc::UnboundedReceiver<(NodeId, bool)>,
}

/// Cluster mode: the nodes that stopped answering the feed, and the rooms
/// that wait for them while the others are delivered.
struct Stalls {
    /// Where each room's commands go.
    router: Router,
    /// Nodes that did not answer a command; `None` stands for slots with no
    /// known owner.
    nodes: HashSet<Option<NodeId>>,
    /// Rooms that wait, to be read from their cursors once their node
    /// answers again (or their slot has another).
    rooms: HashSet<Room>,
    /// Nodes being asked whether they answer again.
    probing: HashSet<NodeId>,
    answers: mpsc::UnboundedSender<(NodeId, bool)>,
}

impl Stalls {
    fn new(router: Router) -> (Self, mpsc::UnboundedReceiver<(NodeId, bool)>) {
        let (answers, receiver) = mpsc::unbounded_channel();
        let stalls = Stalls {
            router,
            nodes: HashSet::new(),
            rooms: HashSet::new(),
            probing: HashSet::new(),
            answers,
        };
        (stalls, receiver)
    }

    /// The node that serves the room of `channel` now, as the router knows.
    fn owner(&self, channel: &str) -> Option<NodeId> {
        self.router.owner(shards::slot(channel))
    }

    /// The node the room of `channel` waits for: its owner, when that owner
    /// is known and taken as silent.
    fn silent_owner(&self, channel: &str) -> Option<NodeId> {
        let owner = self.owner(channel)?;
        self.nodes.contains(&Some(owner.clone())).then_some(owner)
    }

    /// Asks `node` in the background whether it answers again, with a read
    /// of `key` (a room's stream in one of its slots, read as the feed
    /// reads it, so that the daemons' Redis user may), unless that is under
    /// way. Any answer counts, an error reply too: only a node that answers
    /// nothing is silent.
    fn probe(&mut self, node: NodeId, key: String) {
        if !self.probing.insert(node.clone()) {
            return;
        }
        let (mut router, answers) = (self.router.clone(), self.answers.clone());
        tokio::spawn(async move {
            let mut cmd = redis::cmd("XREVRANGE");
            cmd.arg(key).arg("+").arg("-").arg("COUNT").arg(1);
            let answered = match cmd.query_async::<redis::Value>(&mut router).await {
                Ok(_) => true,
                Err(e) => !super::router::lost(&e),
            };
            let _ = answers.send((node, answered));
        });
    }
}

/// What a session on one connection needs to know.
struct Settings {
    keys: Keys,
    /// Messages read from a stream rather than pushed.
    caught_up: Counter,
    /// With replica acknowledgements: entries wait for them.
    holding: bool,
    /// The bytes of text that make a batch full (and end a write window): a
    /// quarter of `frontend.max_queued_bytes`, so that a batch fits in a
    /// socket's send queue with room to spare.
    full_bytes: usize,
}

/// The rooms followed, which outlive connections.
#[derive(Default)]
struct State {
    rooms: HashMap<Room, Followed>,
    /// The room of each subscribed channel.
    channels: HashMap<String, Room>,
    /// Rooms in the order the sweep reads them.
    sweep: VecDeque<Room>,
    /// With replica acknowledgements: the primary entries were taken from,
    /// the rooms with entries held, and how many entries and bytes of text
    /// are held over all rooms.
    primary: Option<String>,
    holding: HashSet<Room>,
    held_entries: usize,
    held_bytes: usize,
    /// Whether the hold was found full since it last released something.
    held_full: bool,
}

/// One room followed.
struct Followed {
    channel: String,
    /// Where the room is; `None` until Redis was first asked.
    position: Option<Position>,
    /// With replica acknowledgements: what waits for them.
    held: Held,
    /// The last entry handed to the subscriber (or where the room started).
    delivered: StreamId,
    /// The node its subscription was last confirmed on.
    node: Option<String>,
    /// On a new primary, whose newest entry (which survived the failover)
    /// is yet to be read.
    new_primary: bool,
    /// Follow requests waiting for the position.
    waiting: Vec<oneshot::Sender<StreamId>>,
    /// When the room is let go, now that nobody is in it.
    leaving: Option<Instant>,
}

/// A room's entries taken from its stream that replicas are not known to
/// hold yet.
#[derive(Debug, Default)]
struct Held {
    /// The last entry released to the subscriber.
    released: StreamId,
    /// The newest id replicas are known to hold.
    replicated: StreamId,
    /// Taken after `released`, in order, up to the room's cursor.
    entries: VecDeque<ChatMessage>,
    bytes: usize,
}

impl Held {
    fn at(id: StreamId) -> Self {
        Held {
            released: id,
            replicated: id,
            ..Held::default()
        }
    }

    /// Learns that replicas hold every entry up to `id`; ignored when `id`
    /// is implausibly far ahead (a forged push).
    fn replicated_up_to(&mut self, id: StreamId) {
        if plausible(id) {
            self.replicated = self.replicated.max(id);
        }
    }

    fn hold(&mut self, message: ChatMessage) {
        self.bytes += message.message.len();
        self.entries.push_back(message);
    }

    /// Whether the oldest held entry is replicated.
    fn has_releasable(&self) -> bool {
        self.entries
            .front()
            .is_some_and(|m| m.id <= self.replicated)
    }

    /// The held entries that are replicated, at most `most`, oldest first.
    fn release(&mut self, most: usize) -> Vec<ChatMessage> {
        let count = self
            .entries
            .iter()
            .take(most)
            .take_while(|m| m.id <= self.replicated)
            .count();
        let released: Vec<ChatMessage> = self.entries.drain(..count).collect();
        if let Some(last) = released.last() {
            self.released = last.id;
        }
        self.bytes -= released.iter().map(|m| m.message.len()).sum::<usize>();
        released
    }

    /// Drops the held entries after `id` (the stream does not confirm
    /// them, or they came from a primary that is gone).
    fn drop_after(&mut self, id: StreamId) -> Vec<ChatMessage> {
        let keep = self.entries.partition_point(|m| m.id <= id);
        let dropped: Vec<ChatMessage> = self.entries.drain(keep..).collect();
        self.bytes -= dropped.iter().map(|m| m.message.len()).sum::<usize>();
        dropped
    }
}

/// Where a room is, and how much of that its stream has confirmed.
#[derive(Debug)]
struct Position {
    /// Id of the last entry taken: the room's cursor.
    cursor: StreamId,
    /// The newest id known to be in the stream, with everything before it
    /// taken.
    confirmed: StreamId,
    /// Ids taken after `confirmed`, in order: from pushes, which the stream
    /// has yet to confirm.
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

    /// Whether the entry `id`, at or behind the cursor, was taken.
    fn taken(&self, id: StreamId) -> bool {
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
    /// A feed of the Redis `config` names, and the handle that tells it
    /// which rooms to follow; in Sentinel mode it follows the primary
    /// itself (so this needs a Tokio runtime).
    pub fn new(config: &Config, health: Arc<RedisHealth>) -> Result<(Self, Interest), FeedError> {
        Self::with_primary(config, health, Primary::new(&config.redis))
    }

    /// A feed of `primary`'s Redis, which may be shared with a [`super::Store`].
    pub fn with_primary(
        config: &Config,
        health: Arc<RedisHealth>,
        primary: Primary,
    ) -> Result<(Self, Interest), FeedError> {
        let redis = &config.redis;
        let cluster = match &redis.mode {
            RedisMode::Cluster(cluster) => Some(ClusterFeed {
                router: super::connect::cluster_router(redis, cluster, redis.command_timeout())?,
                redis: redis.clone(),
                cluster: cluster.clone(),
            }),
            _ => None,
        };
        if let Some(cluster) = &cluster {
            // Checks the settings (password file, TLS) now, at start.
            cluster.nodes()?;
        } else if let Some(resolved) = primary.current() {
            primary.client(&resolved, ProtocolVersion::RESP3)?;
        }
        let (requests, receiver) = mpsc::unbounded_channel();
        let feed = Feed {
            primary,
            settings: Settings {
                keys: Keys::new(redis),
                caught_up: Counter::default(),
                holding: match &redis.mode {
                    RedisMode::Single(_) => false,
                    RedisMode::Sentinel(s) => s.min_replicas_acked > 0,
                    RedisMode::Cluster(c) => c.min_replicas_acked > 0,
                },
                full_bytes: config.frontend.max_queued_bytes.get() / 4,
            },
            timeout: redis.command_timeout(),
            reconnect_min: redis.reconnect_min(),
            reconnect_max: redis.reconnect_max(),
            health,
            requests: receiver,
            state: State::default(),
            write_window: config.frontend.write_window(),
            subscriptions: shards::Settings::from_config(redis),
            cluster,
        };
        Ok((feed, Interest(requests)))
    }

    /// Counts in `counter` the messages read from a stream rather than
    /// pushed: those appended while the frontend was away, and any whose push
    /// did not arrive (from a backend of a version that did not push).
    pub fn counting_caught_up(mut self, counter: Counter) -> Self {
        self.settings.caught_up = counter;
        self
    }

    /// Hands every message appended from now on to the rooms it is asked to
    /// follow to `subscriber`, in each room's order, once each, for ever.
    /// Losing Redis pauses delivery; on reconnection it goes on from the
    /// last message delivered in each room.
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
                    "lost Redis, delivery of {} rooms paused: {error}",
                    self.state.rooms.len()
                );
            } else {
                tracing::debug!("Redis still unreachable: {error}");
            }
            self.pause(jitter(pause), &*subscriber).await;
            pause = (pause * 2).min(self.reconnect_max);
        }
    }

    /// Waits `pause` before connecting again, taking requests meanwhile:
    /// rooms to follow are followed once connected. A new primary named
    /// (a Sentinel failover) ends the wait at once: the backoff spares a
    /// Redis that does not answer, and every second of it after a failover
    /// is a second of posts the frontend's sockets get late, all at once.
    async fn pause(&mut self, pause: Duration, subscriber: &impl Subscriber) {
        let until = Instant::now() + pause;
        let mut changes = self.primary.changes();
        let followed = self.state.primary.clone();
        let is_new = |named: &Option<Arc<Resolved>>| {
            followed.is_some()
                && named
                    .as_ref()
                    .is_some_and(|r| followed.as_deref() != Some(r.address.as_str()))
        };
        if is_new(&changes.borrow_and_update()) {
            return;
        }
        loop {
            let request = tokio::select! {
                request = tokio::time::timeout_at(until, self.requests.recv()) => request,
                Ok(()) = changes.changed() => {
                    if is_new(&changes.borrow_and_update()) {
                        return;
                    }
                    continue;
                }
            };
            let Ok(Some(request)) = request else {
                return;
            };
            match request {
                Request::Follow(room, reply) => {
                    let followed = self.state.follow(&self.settings.keys, room);
                    followed.waiting.push(reply);
                }
                Request::Leave(room) => {
                    self.state.leave(&room);
                    self.state.let_go(Instant::now(), subscriber).await;
                }
            }
        }
    }

    /// Connects, subscribes and delivers until the connection fails.
    ///
    /// Commands go over a connection of their own; the messages come from
    /// the shard subscriptions ([`Subscriptions`]), which keep themselves
    /// subscribed and say when they (re)subscribed a room, which is then
    /// read from its cursor.
    async fn follow(
        &mut self,
        subscriber: &impl Subscriber,
        pause: &mut Duration,
    ) -> Result<Infallible, FeedError> {
        if let Some(cluster) = &self.cluster {
            let router = cluster.router.clone();
            let nodes = cluster.nodes()?;
            let (stalls, answers) = Stalls::new(router.clone());
            let on = Mode::Cluster(Cluster { stalls, answers });
            return self.session(router, nodes, on, subscriber, pause).await;
        }
        let mut changes = self.primary.changes();
        let resolved = changes.borrow_and_update().clone();
        let resolved = resolved.ok_or(FeedError::NoPrimary)?;
        let conn = self.connect(&resolved).await?;
        let nodes = Nodes::One(self.primary.client(&resolved, ProtocolVersion::RESP3)?);
        let following = Following {
            changes,
            primary: resolved,
        };
        self.session(conn, nodes, Mode::Primary(following), subscriber, pause)
            .await
    }

    /// Follows the rooms with commands over `conn` and messages from the
    /// subscriptions on `nodes`, until a command fails (on a cluster: until
    /// no node answers) or, in Sentinel mode, the primary changes.
    async fn session(
        &mut self,
        conn: impl ConnectionLike + Send,
        nodes: Nodes,
        mode: Mode,
        subscriber: &impl Subscriber,
        pause: &mut Duration,
    ) -> Result<Infallible, FeedError> {
        let (subscriptions, mut events) = Subscriptions::start(nodes, self.subscriptions);
        let (mut following, stalls, mut answers) = match mode {
            Mode::Primary(following) => (Some(following), None, None),
            Mode::Cluster(on) => (None, Some(on.stalls), Some(on.answers)),
        };
        self.health.set_rooms_waiting(0);
        let mut session = Session {
            conn,
            subscriptions,
            settings: &self.settings,
            state: &mut self.state,
            health: &self.health,
            stalls,
            batch: Vec::new(),
            batch_bytes: 0,
        };
        if let Some(following) = &following {
            let address = &following.primary.address;
            let new_primary = session.state.primary.as_deref() != Some(address);
            if new_primary && session.state.primary.is_some() && self.settings.holding {
                session.follow_new_primary().await?;
            }
            session.state.primary = Some(address.clone());
        }
        // Each room goes on once its subscription is confirmed.
        session.subscribe_all();
        if self.health.set_up(true) {
            tracing::info!("following {} rooms on Redis", session.state.rooms.len());
        }
        *pause = self.reconnect_min;
        let window = self.write_window;
        let requests = &mut self.requests;
        let mut poll = tokio::time::interval(POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The rooms are read as their subscriptions are confirmed.
        poll.reset();
        // With a write window: until when what is taken is held back.
        let mut window_ends: Option<Instant> = None;
        loop {
            let held_until = window_ends.filter(|_| session.has_pending());
            let step = tokio::select! {
                Some(event) = events.recv() => session.take_events(event, &mut events, subscriber).await,
                Some(request) = requests.recv() => {
                    session.request(request);
                    Ok(())
                }
                _ = poll.tick() => session.poll(subscriber).await,
                // Only on a cluster: a node that did not answer was asked again.
                Some((node, answers)) = async { answers.as_mut()?.recv().await }, if answers.is_some() => {
                    session.answered(node, answers, subscriber).await
                }
                // Only in Sentinel mode, where the primary can change.
                changed = async { following.as_mut()?.changed().await }, if following.is_some() => {
                    match changed {
                        Some(true) => Err(FeedError::PrimaryChanged),
                        _ => Ok(()),
                    }
                }
                () = tokio::time::sleep_until(held_until.unwrap_or_else(Instant::now)),
                    if held_until.is_some() => Ok(()),
            };
            // Within the window, what was taken waits, unless the batch is
            // full. What was taken goes out even when the step then failed:
            // the cursors have moved past it, and the next connection goes
            // on from there.
            let full = session.full();
            let window_open = window_ends.is_some_and(|ends| Instant::now() < ends);
            if step.is_err() || full || !window_open {
                let delivered = session.hand_over(subscriber).await;
                // A full batch leaves more waiting: that goes on at once.
                window_ends = window
                    .filter(|_| delivered && !full)
                    .map(|w| Instant::now() + w);
            }
            step?;
        }
    }

    /// The connection commands go over.
    async fn connect(
        &self,
        resolved: &super::Resolved,
    ) -> Result<MultiplexedConnection, FeedError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let client = self.primary.client(resolved, ProtocolVersion::RESP2)?;
        Ok(client
            .get_multiplexed_async_connection_with_config(&config)
            .await?)
    }
}

impl State {
    /// The room followed, following it if it was not.
    fn follow(&mut self, keys: &Keys, room: Room) -> &mut Followed {
        let followed = match self.rooms.entry(room) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => {
                let channel = keys.room(entry.key());
                self.channels.insert(channel.clone(), entry.key().clone());
                self.sweep.push_back(entry.key().clone());
                entry.insert(Followed {
                    channel,
                    position: None,
                    held: Held::default(),
                    delivered: StreamId::ZERO,
                    node: None,
                    new_primary: false,
                    waiting: Vec::new(),
                    leaving: None,
                })
            }
        };
        followed.leaving = None;
        followed
    }

    /// Marks `room` to be let go after [`LEAVE_GRACE`].
    fn leave(&mut self, room: &Room) {
        if let Some(followed) = self.rooms.get_mut(room) {
            followed.leaving = Some(Instant::now() + LEAVE_GRACE);
        }
    }

    /// Stops following the rooms left before `now`, and tells the
    /// subscriber; returns their channels.
    async fn let_go(&mut self, now: Instant, subscriber: &impl Subscriber) -> Vec<String> {
        let gone: Vec<Room> = self
            .rooms
            .iter()
            .filter(|(_, f)| f.leaving.is_some_and(|at| at <= now))
            .map(|(room, _)| room.clone())
            .collect();
        let mut channels = Vec::with_capacity(gone.len());
        for room in gone {
            let Some(followed) = self.rooms.remove(&room) else {
                continue;
            };
            self.channels.remove(&followed.channel);
            self.held_entries -= followed.held.entries.len();
            self.held_bytes -= followed.held.bytes;
            self.holding.remove(&room);
            channels.push(followed.channel);
            subscriber.left(&room).await;
        }
        if !channels.is_empty() {
            self.sweep.retain(|room| self.rooms.contains_key(room));
        }
        channels
    }
}

/// Following the rooms over one connection for commands, and shard
/// subscriptions for pushes.
struct Session<'a, C> {
    conn: C,
    subscriptions: Subscriptions,
    settings: &'a Settings,
    state: &'a mut State,
    health: &'a RedisHealth,
    /// Cluster mode: the nodes that do not answer, and their rooms.
    stalls: Option<Stalls>,
    /// Messages taken but not yet handed to the subscriber (or held).
    batch: Vec<ChatMessage>,
    /// The bytes of their text.
    batch_bytes: usize,
}

impl<C: ConnectionLike + Send> Session<'_, C> {
    /// Subscribes to the channels of every room followed.
    fn subscribe_all(&self) {
        let channels = self.state.channels.keys().cloned().collect();
        self.subscriptions.subscribe(channels);
    }

    /// Goes on in `room` after (re)subscribing: from its cursor, reading what
    /// was appended meanwhile, or from its newest entry when it was never
    /// read; then answers those waiting for its position.
    async fn resume(&mut self, room: &Room, subscriber: &impl Subscriber) -> Result<(), FeedError> {
        let Some(followed) = self.state.rooms.get(room) else {
            return Ok(());
        };
        let started = followed.position.is_some();
        self.read_survivors(room).await?;
        if !started {
            self.start(room).await?;
        } else {
            self.read_acked(room).await?;
        }
        self.catch_up(room, subscriber).await?;
        self.answer_waiting(room);
        Ok(())
    }

    /// Starts `room` at its newest entry: with replica acknowledgements, at
    /// the newest one replicas are known to hold, what follows being read
    /// and held.
    async fn start(&mut self, room: &Room) -> Result<(), FeedError> {
        let mut start = self.last_id(room).await?;
        if self.settings.holding
            && let Some(acked) = self.acked(room).await?
        {
            start = start.min(acked);
        }
        if let Some(followed) = self.state.rooms.get_mut(room) {
            followed.position = Some(Position::at(start));
            followed.held = Held::at(start);
            followed.delivered = start;
        }
        Ok(())
    }

    /// Answers those waiting to hear where `room` is delivered from: the
    /// last message handed to the subscriber, not the cursor, which may be
    /// ahead of it by a batch or by what waits for replicas.
    fn answer_waiting(&mut self, room: &Room) {
        if let Some(followed) = self.state.rooms.get_mut(room)
            && followed.position.is_some()
        {
            for reply in followed.waiting.drain(..) {
                let _ = reply.send(followed.delivered);
            }
        }
    }

    /// Notes that `room` is now served by `node`: another node than before
    /// (a Redis Cluster's failover, or a moved slot) is a new primary for
    /// the room, which its next [`Session::resume`] reads.
    fn moved(&mut self, room: &Room, node: &str) {
        let Some(followed) = self.state.rooms.get_mut(room) else {
            return;
        };
        let before = followed.node.replace(node.to_owned());
        if self.settings.holding && before.is_some_and(|before| before != node) {
            self.on_new_primary(room);
        }
    }

    /// Every room is on a new primary (a Sentinel failover).
    async fn follow_new_primary(&mut self) -> Result<(), FeedError> {
        let rooms: Vec<Room> = self.state.rooms.keys().cloned().collect();
        for room in rooms {
            self.on_new_primary(&room);
            self.read_survivors(&room).await?;
        }
        Ok(())
    }

    /// `room` is on a new primary. The entries held for replicas may be
    /// gone with the old one: they are dropped, with those taken and not
    /// held yet, and the room is read again after its last released entry,
    /// from the new primary, whose entries survived (see
    /// [`Session::read_survivors`]).
    fn on_new_primary(&mut self, room: &Room) {
        let Some(followed) = self.state.rooms.get_mut(room) else {
            return;
        };
        let released = followed.held.released;
        let dropped = followed.held.drop_after(released);
        if followed.position.is_some() {
            followed.position = Some(Position::at(released));
        }
        followed.new_primary = true;
        self.state.holding.remove(room);
        self.state.held_entries -= dropped.len();
        self.state.held_bytes -= dropped.iter().map(|m| m.message.len()).sum::<usize>();
        self.batch.retain(|m| m.room != *room);
        self.batch_bytes = self.batch.iter().map(|m| m.message.len()).sum();
    }

    /// On a new primary, what `room`'s stream holds survived the failover:
    /// it counts as replicated.
    async fn read_survivors(&mut self, room: &Room) -> Result<(), FeedError> {
        if !self.state.rooms.get(room).is_some_and(|f| f.new_primary) {
            return Ok(());
        }
        let last = self.last_id(room).await?;
        if let Some(followed) = self.state.rooms.get_mut(room) {
            followed.held.replicated = followed.held.replicated.max(last);
            followed.new_primary = false;
        }
        Ok(())
    }

    /// Answers a request of the frontend: a room followed already is
    /// answered at once, another once its subscription is confirmed.
    fn request(&mut self, request: Request) {
        match request {
            Request::Follow(room, reply) => {
                let followed = self.state.follow(&self.settings.keys, room.clone());
                followed.waiting.push(reply);
                if followed.position.is_none() {
                    self.subscriptions.subscribe(vec![followed.channel.clone()]);
                }
                self.answer_waiting(&room);
            }
            Request::Leave(room) => self.state.leave(&room),
        }
    }

    /// Every [`POLL`]: lets go of the rooms left, and reads the streams of
    /// the next [`SWEEP`] rooms (or checks that Redis answers, when there
    /// are none).
    async fn poll(&mut self, subscriber: &impl Subscriber) -> Result<(), FeedError> {
        let gone = self.state.let_go(Instant::now(), subscriber).await;
        if !gone.is_empty() {
            self.subscriptions.unsubscribe(gone);
        }
        self.retry_waiting(subscriber).await?;
        self.probe_silent();
        let count = self.state.sweep.len().min(SWEEP);
        let waiting = self.stalls.as_ref().map_or(0, |s| s.rooms.len());
        if count == 0 || waiting >= self.state.rooms.len() {
            // Nothing else would find out that Redis does not answer.
            self.ping().await?;
        }
        for _ in 0..count {
            let Some(room) = self.state.sweep.pop_front() else {
                break;
            };
            self.state.sweep.push_back(room.clone());
            let started = self
                .state
                .rooms
                .get(&room)
                .is_some_and(|f| f.position.is_some());
            if started && !self.waits(&room) {
                let swept = self.sweep_room(&room, subscriber).await;
                self.stall_on(&room, swept)?;
            }
        }
        Ok(())
    }

    /// Checks that Redis answers. On a cluster one node that does not is
    /// not all of Redis: the router, having found it silent, sends the
    /// second `PING` to another.
    async fn ping(&mut self) -> Result<(), FeedError> {
        let tries = if self.stalls.is_some() { 2 } else { 1 };
        let mut outcome = Ok(());
        for _ in 0..tries {
            outcome = redis::cmd("PING")
                .query_async::<String>(&mut self.conn)
                .await
                .map(drop);
            if outcome.is_ok() {
                break;
            }
        }
        Ok(outcome?)
    }

    /// Reads what replicas hold of `room` and what its stream has after its
    /// cursor.
    async fn sweep_room(
        &mut self,
        room: &Room,
        subscriber: &impl Subscriber,
    ) -> Result<(), FeedError> {
        self.read_acked(room).await?;
        self.catch_up(room, subscriber).await
    }

    /// Cluster mode: whether `room` waits for its node, which did not
    /// answer. Nothing is sent for it meanwhile; it is read from its cursor
    /// once its node answers again, or its slot has another owner.
    fn waits(&mut self, room: &Room) -> bool {
        let (Some(stalls), Some(followed)) = (self.stalls.as_mut(), self.state.rooms.get(room))
        else {
            return false;
        };
        if stalls.nodes.is_empty() {
            // Every node answers: the common case, on every push.
            return false;
        }
        if stalls.silent_owner(&followed.channel).is_none() {
            return false;
        }
        stalls.rooms.insert(room.clone());
        self.health.set_rooms_waiting(stalls.rooms.len());
        true
    }

    /// Takes the outcome of a command for `room`. A failure ends the
    /// session, except on a cluster, where the node of the room's slot is
    /// taken as silent: its rooms wait (see [`Session::waits`]) and the
    /// other rooms go on.
    fn stall_on(&mut self, room: &Room, outcome: Result<(), FeedError>) -> Result<(), FeedError> {
        let error = match outcome {
            Ok(()) => return Ok(()),
            Err(error) => error,
        };
        let (Some(stalls), Some(followed)) = (self.stalls.as_mut(), self.state.rooms.get(room))
        else {
            return Err(error);
        };
        let owner = stalls.owner(&followed.channel);
        if stalls.nodes.insert(owner.clone()) {
            match owner {
                Some(node) => tracing::warn!(
                    "Redis node {node} did not answer ({error}): delivery of its rooms waits \
                     for it, the other rooms' goes on"
                ),
                None => tracing::warn!(
                    "no Redis node is known to serve some rooms ({error}): their delivery \
                     waits, the other rooms' goes on"
                ),
            }
        }
        stalls.rooms.insert(room.clone());
        self.health.set_rooms_waiting(stalls.rooms.len());
        Ok(())
    }

    /// Reads on, from their cursors, the waiting rooms whose node is no
    /// longer taken as silent (it answered again, or the room's slot has
    /// another owner now); forgets the silent nodes no room waits for.
    async fn retry_waiting(&mut self, subscriber: &impl Subscriber) -> Result<(), FeedError> {
        let Some(stalls) = self.stalls.as_mut() else {
            return Ok(());
        };
        let rooms = &self.state.rooms;
        stalls.rooms.retain(|room| rooms.contains_key(room));
        let mut ready = Vec::new();
        let mut owners = HashSet::new();
        let mut served = 0;
        for (room, followed) in stalls.rooms.iter().filter_map(|r| Some((r, rooms.get(r)?))) {
            match stalls.silent_owner(&followed.channel) {
                Some(node) => {
                    owners.insert(Some(node));
                }
                None => {
                    served += usize::from(stalls.owner(&followed.channel).is_some());
                    ready.push(room.clone());
                }
            }
        }
        if served > 0 {
            tracing::info!("delivery of {served} rooms that waited for a Redis node goes on");
        }
        stalls.nodes.retain(|node| owners.contains(node));
        for room in &ready {
            stalls.rooms.remove(room);
        }
        self.health.set_rooms_waiting(stalls.rooms.len());
        for room in ready {
            if !self.waits(&room) {
                let resumed = self.resume(&room, subscriber).await;
                self.stall_on(&room, resumed)?;
            }
        }
        Ok(())
    }

    /// Asks each silent node, in the background, whether it answers again.
    fn probe_silent(&mut self) {
        let Some(stalls) = self.stalls.as_mut() else {
            return;
        };
        let mut asked = HashSet::new();
        let mut probes = Vec::new();
        for followed in stalls.rooms.iter().filter_map(|r| self.state.rooms.get(r)) {
            let channel = &followed.channel;
            if let Some(node) = stalls.silent_owner(channel)
                && asked.insert(node.clone())
            {
                probes.push((node, channel.clone()));
            }
        }
        for (node, key) in probes {
            stalls.probe(node, key);
        }
    }

    /// A silent node was asked again: if it answered, its rooms are read on.
    async fn answered(
        &mut self,
        node: NodeId,
        answered: bool,
        subscriber: &impl Subscriber,
    ) -> Result<(), FeedError> {
        let Some(stalls) = self.stalls.as_mut() else {
            return Ok(());
        };
        stalls.probing.remove(&node);
        if answered && stalls.nodes.remove(&Some(node.clone())) {
            tracing::info!("Redis node {node} answers again");
            self.retry_waiting(subscriber).await?;
        }
        Ok(())
    }

    /// Takes `event` and every event that arrived meanwhile, up to a batch.
    async fn take_events(
        &mut self,
        event: Event,
        events: &mut mpsc::UnboundedReceiver<Event>,
        subscriber: &impl Subscriber,
    ) -> Result<(), FeedError> {
        let mut event = event;
        loop {
            self.take(event, subscriber).await?;
            if self.full() {
                return Ok(());
            }
            match events.try_recv() {
                Ok(next) => event = next,
                Err(_) => return Ok(()),
            }
        }
    }

    /// Takes one event of the subscriptions: rooms (re)subscribed, which
    /// are read from their cursors, or a message.
    async fn take(&mut self, event: Event, subscriber: &impl Subscriber) -> Result<(), FeedError> {
        match event {
            Event::Message { channel, payload } => {
                let Some(room) = self.state.channels.get(&channel).cloned() else {
                    return Ok(());
                };
                if self.waits(&room) {
                    return Ok(());
                }
                let taken = self.take_message(&room, payload, subscriber).await;
                self.stall_on(&room, taken)
            }
            Event::Subscribed { channels, node } => {
                for channel in channels {
                    let Some(room) = self.state.channels.get(&channel).cloned() else {
                        continue;
                    };
                    self.moved(&room, &node);
                    if !self.waits(&room) {
                        let resumed = self.resume(&room, subscriber).await;
                        self.stall_on(&room, resumed)?;
                    }
                }
                Ok(())
            }
            Event::Lost { channels, error } => {
                tracing::info!(
                    "the subscription of {} rooms was lost ({error}); subscribing again",
                    channels.len()
                );
                Ok(())
            }
        }
    }

    /// Takes one pushed message: the next message of a room, one already
    /// taken, news that replicas hold a room up to an id, or news that
    /// something was missed (or that a push cannot be trusted), and then
    /// reads the room's stream.
    async fn take_message(
        &mut self,
        room: &Room,
        payload: Vec<u8>,
        subscriber: &impl Subscriber,
    ) -> Result<(), FeedError> {
        let room = room.clone();
        let Ok(payload) = String::from_utf8(payload) else {
            return self.catch_up(&room, subscriber).await;
        };
        let holding = self.settings.holding;
        let may_take = self.has_room();
        let Some(followed) = self.state.rooms.get_mut(&room) else {
            return Ok(());
        };
        if let Some(acked) = payload.strip_prefix("acked ") {
            if let (true, Some(id)) = (holding, StreamId::parse(acked)) {
                followed.held.replicated_up_to(id);
            }
            return Ok(());
        }
        let Some(position) = followed.position.as_mut() else {
            // Not started yet: starting reads the stream.
            return Ok(());
        };
        if !may_take {
            // Read from the stream once releases make room.
            return Ok(());
        }
        match Pushed::parse(&payload) {
            // Taken already: read from the stream before its push came.
            Some(pushed) if position.taken(pushed.id) => Ok(()),
            // At or behind the cursor yet never taken: the cursor ran past
            // a real message.
            Some(pushed) if pushed.id <= position.cursor => self.catch_up(&room, subscriber).await,
            Some(pushed)
                if pushed.previous == position.cursor
                    && plausible(pushed.id)
                    && position.unconfirmed.len() < MAX_UNCONFIRMED =>
            {
                position.push(pushed.id);
                let message = ChatMessage::new(pushed.id, room, pushed.text.to_owned());
                self.add(message);
                Ok(())
            }
            // A gap, an id too far ahead, or something that is not a message.
            _ => self.catch_up(&room, subscriber).await,
        }
    }

    /// Reads `room`'s stream from its cursor to its end, and takes what
    /// follows the cursor and was not taken yet.
    ///
    /// Each read starts at the cursor itself, to see that the stream holds
    /// it. If it does not, yet holds older entries (so the cursor was not
    /// trimmed away), the cursor came from a push the stream never had: the
    /// room goes back to the last confirmed position and reads from there.
    async fn catch_up(
        &mut self,
        room: &Room,
        subscriber: &impl Subscriber,
    ) -> Result<(), FeedError> {
        loop {
            if !self.has_room() {
                return Ok(());
            }
            let Some((cursor, confirmed)) = self.position(room) else {
                return Ok(());
            };
            let entries = self.read_from(room, cursor).await?;
            let holds_cursor = entries.first().is_some_and(|(id, _)| *id == cursor);
            if !holds_cursor && cursor != StreamId::ZERO {
                if self.holds_older(room, cursor).await? {
                    if cursor != confirmed {
                        self.go_back(room);
                        continue;
                    }
                    tracing::warn!(
                        %room,
                        "entry {cursor} is gone from Redis; delivery goes on after it"
                    );
                } else if !entries.is_empty() {
                    tracing::warn!(
                        %room,
                        "the room's history was trimmed past entry {cursor} before this \
                         frontend read what followed it: messages may have been skipped \
                         (history.max_per_room)"
                    );
                }
            }
            let mut complete = entries.len() <= BATCH;
            for (id, text) in entries.into_iter().filter(|(id, _)| *id > cursor) {
                if !self.has_room() {
                    // The rest is read once releases make room.
                    complete = true;
                    break;
                }
                let Some(position) = self
                    .state
                    .rooms
                    .get_mut(room)
                    .and_then(|f| f.position.as_mut())
                else {
                    return Ok(());
                };
                let again = position.taken(id);
                position.read(id);
                match text {
                    _ if again => {}
                    Some(text) => {
                        self.settings.caught_up.inc();
                        self.add(ChatMessage::new(id, room.clone(), text));
                    }
                    None => tracing::error!(%room, "skipping malformed entry {id}"),
                }
            }
            if complete {
                return Ok(());
            }
            self.hand_over(subscriber).await;
        }
    }

    /// `room`'s cursor and confirmed position, once it has one.
    fn position(&self, room: &Room) -> Option<(StreamId, StreamId)> {
        let position = self.state.rooms.get(room)?.position.as_ref()?;
        Some((position.cursor, position.confirmed))
    }

    /// Goes back to the last position `room`'s stream confirmed. Pushed
    /// messages not yet handed to the subscriber are dropped: those the
    /// stream has are read from it again.
    fn go_back(&mut self, room: &Room) {
        let Some(followed) = self.state.rooms.get_mut(room) else {
            return;
        };
        let Some(position) = followed.position.as_mut() else {
            return;
        };
        tracing::warn!(
            %room,
            "entry {} was pushed but Redis does not have it; reading the room again from {}",
            position.cursor,
            position.confirmed
        );
        let confirmed = position.confirmed;
        let (kept, dropped): (Vec<_>, Vec<_>) = std::mem::take(&mut self.batch)
            .into_iter()
            .partition(|m| m.room != *room || m.id <= confirmed);
        self.batch_bytes = kept.iter().map(|m| m.message.len()).sum();
        self.batch = kept;
        let mut dropped: Vec<StreamId> = dropped.iter().map(|m| m.id).collect();
        let unheld = followed.held.drop_after(confirmed);
        self.state.held_entries -= unheld.len();
        self.state.held_bytes -= unheld.iter().map(|m| m.message.len()).sum::<usize>();
        dropped.extend(unheld.iter().map(|m| m.id));
        position.unconfirmed.retain(|id| !dropped.contains(id));
        position.cursor = confirmed;
    }

    /// Hands the messages taken to the subscriber; while replica
    /// acknowledgements are awaited, holds them and hands over those
    /// replicated, in each room's order. Says whether it handed over any.
    async fn hand_over(&mut self, subscriber: &impl Subscriber) -> bool {
        self.batch_bytes = 0;
        if !self.settings.holding {
            if self.batch.is_empty() {
                return false;
            }
            let batch = std::mem::take(&mut self.batch);
            self.state.delivering(&batch);
            subscriber.deliver(batch).await;
            return true;
        }
        let state = &mut *self.state;
        for message in std::mem::take(&mut self.batch) {
            if let Some(followed) = state.rooms.get_mut(&message.room) {
                state.held_entries += 1;
                state.held_bytes += message.message.len();
                state.holding.insert(message.room.clone());
                followed.held.hold(message);
            }
        }
        let mut delivered = false;
        loop {
            let released = state.release();
            if released.is_empty() {
                break;
            }
            state.held_full = false;
            delivered = true;
            state.delivering(&released);
            subscriber.deliver(released).await;
        }
        if !has_room(state.held_entries, state.held_bytes) && !state.held_full {
            state.held_full = true;
            tracing::warn!(
                "{} messages of {} rooms wait for replicas to hold them: delivery waits for \
                 a backend to publish that they do (every backend needs \
                 redis.min_replicas_acked > 0, as this frontend has)",
                state.held_entries,
                state.holding.len(),
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
        self.batch.len() >= BATCH || self.batch_bytes >= self.settings.full_bytes
    }

    /// Whether one more entry may be taken: always, unless entries are held
    /// until replicated, and the hold, with the batch, is full.
    fn has_room(&self) -> bool {
        !self.settings.holding
            || has_room(
                self.state.held_entries + self.batch.len(),
                self.state.held_bytes + self.batch_bytes,
            )
    }

    /// Whether anything taken waits to be handed over: messages in the
    /// batch, or held ones that replicas now hold.
    fn has_pending(&self) -> bool {
        !self.batch.is_empty()
            || self.state.holding.iter().any(|room| {
                self.state
                    .rooms
                    .get(room)
                    .is_some_and(|f| f.held.has_releasable())
            })
    }

    /// Learns from its key how far replicas hold `room`, in case a push of
    /// it was lost.
    async fn read_acked(&mut self, room: &Room) -> Result<(), FeedError> {
        if self.settings.holding
            && let Some(id) = self.acked(room).await?
            && let Some(followed) = self.state.rooms.get_mut(room)
        {
            followed.held.replicated_up_to(id);
        }
        Ok(())
    }

    /// The newest id of `room` the backends found on enough replicas, if
    /// recorded.
    async fn acked(&mut self, room: &Room) -> Result<Option<StreamId>, FeedError> {
        let recorded: Option<String> = redis::cmd("GET")
            .arg(self.settings.keys.acked(room))
            .query_async(&mut self.conn)
            .await?;
        Ok(recorded.as_deref().and_then(StreamId::parse))
    }

    /// The name of `room`'s stream (and channel), as worked out when the
    /// room was followed.
    fn stream(&self, room: &Room) -> String {
        self.state
            .rooms
            .get(room)
            .map_or_else(|| self.settings.keys.room(room), |f| f.channel.clone())
    }

    /// The id of the newest entry of `room`, so delivery starts after it.
    async fn last_id(&mut self, room: &Room) -> Result<StreamId, FeedError> {
        let mut cmd = redis::cmd("XREVRANGE");
        cmd.arg(self.stream(room))
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1);
        let newest: Entries = cmd.query_async(&mut self.conn).await?;
        match newest.first() {
            Some((id, _)) => StreamId::parse(id).ok_or_else(|| FeedError::Malformed(id.clone())),
            None => Ok(StreamId::ZERO),
        }
    }

    /// The entry `from` of `room` (if the stream holds it) and up to
    /// [`BATCH`] after it. Each comes with its id, and with its text unless
    /// the entry is malformed (written by something else than
    /// [`super::Store`]): the cursor moves past it anyway.
    async fn read_from(
        &mut self,
        room: &Room,
        from: StreamId,
    ) -> Result<Vec<(StreamId, Option<String>)>, FeedError> {
        let mut cmd = redis::cmd("XRANGE");
        cmd.arg(self.stream(room))
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
                Ok((parsed, take_field(&mut fields, b"m")))
            })
            .collect()
    }

    /// Whether `room`'s stream holds an entry older than `id`.
    async fn holds_older(&mut self, room: &Room, id: StreamId) -> Result<bool, FeedError> {
        let mut cmd = redis::cmd("XREVRANGE");
        cmd.arg(self.stream(room))
            .arg(format!("({id}"))
            .arg("-")
            .arg("COUNT")
            .arg(1);
        let older: Entries = cmd.query_async(&mut self.conn).await?;
        Ok(!older.is_empty())
    }
}

impl State {
    /// Notes that `messages` are handed to the subscriber.
    fn delivering(&mut self, messages: &[ChatMessage]) {
        for message in messages {
            if let Some(followed) = self.rooms.get_mut(&message.room) {
                followed.delivered = message.id;
            }
        }
    }

    /// The held entries replicas now hold, at most [`BATCH`], from the rooms
    /// that have some.
    fn release(&mut self) -> Vec<ChatMessage> {
        let mut released = Vec::new();
        let mut emptied = Vec::new();
        for room in &self.holding {
            let Some(followed) = self.rooms.get_mut(room) else {
                emptied.push(room.clone());
                continue;
            };
            let most = BATCH - released.len();
            let these = followed.held.release(most);
            self.held_entries -= these.len();
            self.held_bytes -= these.iter().map(|m| m.message.len()).sum::<usize>();
            released.extend(these);
            if followed.held.entries.is_empty() {
                emptied.push(room.clone());
            }
            if released.len() >= BATCH {
                break;
            }
        }
        for room in emptied {
            self.holding.remove(&room);
        }
        released
    }
}

/// Whether one more entry may be held, with `entries` entries of `bytes` of
/// text held or about to be.
fn has_room(entries: usize, bytes: usize) -> bool {
    entries < MAX_HELD && bytes < MAX_HELD_BYTES
}

/// Whether a pushed `id` is no further ahead of this host's clock than
/// [`MAX_AHEAD`].
fn plausible(id: StreamId) -> bool {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    u128::from(id.ms) <= (now + MAX_AHEAD).as_millis()
}

/// A message as the append script publishes it: `<previous id> <id> <text>`.
struct Pushed<'a> {
    previous: StreamId,
    id: StreamId,
    text: &'a str,
}

impl<'a> Pushed<'a> {
    fn parse(payload: &'a str) -> Option<Self> {
        let mut parts = payload.splitn(3, ' ');
        let previous = StreamId::parse(parts.next()?)?;
        let id = StreamId::parse(parts.next()?)?;
        let text = parts.next()?;
        Some(Pushed { previous, id, text })
    }
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
        let mut held = Held::at(StreamId { ms: base, seq: 0 });
        held.hold(message(base + 1, "a"));
        held.hold(message(base + 2, "b"));
        held.hold(message(base + 3, "c"));
        assert!(held.release(BATCH).is_empty(), "nothing is replicated yet");
        held.replicated_up_to(StreamId {
            ms: base + 2,
            seq: 0,
        });
        assert_eq!(ids(&held.release(BATCH)), [base + 1, base + 2]);
        assert_eq!(held.released.ms, base + 2);
        assert_eq!(held.bytes, 1);
        // A replicated id far ahead of this host's clock is not taken.
        held.replicated_up_to(StreamId {
            ms: base + 3_600_000,
            seq: 0,
        });
        assert!(held.release(BATCH).is_empty());
        held.replicated_up_to(StreamId {
            ms: base + 9,
            seq: 0,
        });
        assert_eq!(ids(&held.release(BATCH)), [base + 3]);
        assert!(held.release(BATCH).is_empty(), "released once");
    }

    #[test]
    fn the_hold_is_bounded_in_entries_and_bytes() {
        assert!(has_room(MAX_HELD - 1, 0));
        assert!(!has_room(MAX_HELD, 0));
        assert!(has_room(1, MAX_HELD_BYTES - 1));
        assert!(!has_room(1, MAX_HELD_BYTES));
    }

    #[test]
    fn a_push_names_the_previous_entry_the_entry_and_the_text() {
        let pushed = Pushed::parse("1-0 2-5 hello world").unwrap();
        assert_eq!(pushed.previous, StreamId { ms: 1, seq: 0 });
        assert_eq!(pushed.id, StreamId { ms: 2, seq: 5 });
        assert_eq!(pushed.text, "hello world");
        assert!(Pushed::parse("acked 2-5").is_none());
    }
}
