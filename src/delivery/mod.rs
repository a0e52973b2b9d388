//! Delivery through Redis: how a message is stored and how the frontends
//! that serve its room hear of it.
//!
//! # Design
//!
//! Each message is appended, by one Lua script, to its room's stream
//! `{prefix}:{p<N>}:room:{room}`: the room's history, trimmed to
//! `history.max_per_room`, forgotten `history.room_ttl_days` after its last
//! post. `GET /back/messages` and resuming clients read it. `N` is the room's
//! partition ([`Keys::partition`]): every key and channel of a room carries
//! that hash tag, so that in a Redis Cluster they are in one slot and the
//! script runs atomically on one node.
//!
//! The script also publishes the message, with the id of the room's entry
//! before it, on the room's shard channel (`SPUBLISH`, named as the stream).
//! A frontend subscribes to the channels of the rooms it has sockets in, and
//! of those only (see [`Feed`]): Redis pushes it each of their messages, and
//! it reads a room's stream itself only when a push does not follow on from
//! its cursor in that room. Its work follows the rooms it serves, not the
//! whole cluster's traffic.
//!
//! The backend answers 201 only once the script has returned, so an
//! acknowledged message is in its room's stream. A frontend that loses Redis
//! keeps each room's cursor, and when Redis is back it reads on from them:
//! nothing appended meanwhile is skipped, and nothing is delivered twice. A
//! push is forgotten by Redis the moment a frontend is away; a stream entry
//! is not.
//!
//! A post may carry an idempotency key (recorded beside the room's history
//! as `{prefix}:{p<N>}:idem:{digest}`, see [`PostKey`], kept ten minutes): a
//! post repeated with the same key returns the first one's id and is not
//! stored again, so retrying a post whose answer was lost is safe.
//!
//! The daemons reach Redis as the module `connect` says: logged in as an ACL user,
//! over TLS where configured. Which Redis is the module `primary`'s business:
//! the one of `redis.url`, or, in Sentinel mode, the primary the Sentinels
//! name, followed across failovers ([`Primary`]). On a Redis Cluster,
//! commands go through the module `router`, each to the primary of its
//! key's slot, and subscriptions through [`shards`]. Scripts are sent by
//! their digest (the module `script`). In Sentinel mode an append
//! is acknowledged once replicas hold it too (the module `acks`), and
//! frontends hand it to sockets only then: the backends publish how far
//! replicas hold each room (`{prefix}:{p<N>}:acked:{room}`, and on the room's
//! channel), and a frontend holds what it reads or is pushed until that
//! covers it (see [`Feed`]), so a message a failover takes back is never
//! shown.
//!
//! Ids grow within a room; they are Redis stream ids, so one id tells a
//! client where it is in its room's history.

mod acks;
mod connect;
mod feed;
mod primary;
mod router;
mod script;
pub mod shards;
mod store;

pub use acks::AckError;
pub use connect::{ConnectError, PASSWORD_CREDENTIAL, SENTINEL_PASSWORD_CREDENTIAL};
pub use feed::{Feed, FeedError, Interest, LEAVE_GRACE};
pub use primary::{Primary, PrimaryStats, Resolved};
pub use store::{Appended, IDEMPOTENCY_WINDOW, Store, StoreError};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use crate::auth::TokenId;
use crate::message::{ChatMessage, IdempotencyKey, Room};

/// Stream entries as Redis sends them: each entry's id and its field-value
/// pairs. Read into these lists, a reply is converted as it is, where
/// redis-rs's `StreamReadReply` and `StreamRangeReply` copy the whole reply
/// and build a map per entry: a third of the instructions the frontend spent
/// on each message it read from the feed stream (24,200 then, 16,400 with
/// these lists, callgrind, when the feed was followed by reading the stream).
/// Values are bytes, so that an entry the backend did not write (text that
/// is not UTF-8) is found malformed rather than failing the whole reply.
type Entries = Vec<(String, Fields)>;
type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// Spreads reconnection attempts of many processes over time (75%–100% of
/// `pause`), so that a Redis coming back is not met by all of them at once.
fn jitter(pause: std::time::Duration) -> std::time::Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    pause.mul_f64(0.75 + f64::from(nanos % 1000) / 4000.0)
}

/// Takes the text of the field `name` out of `fields`, if it is there and UTF-8.
fn take_field(fields: &mut Fields, name: &[u8]) -> Option<String> {
    let index = fields.iter().position(|(field, _)| field == name)?;
    String::from_utf8(fields.swap_remove(index).1).ok()
}

/// What a [`Feed`] hands its messages to.
pub trait Subscriber: Send + Sync + 'static {
    /// The next messages of the rooms followed, in each room's order, each
    /// once: those that arrived from Redis together, so that they can be
    /// sent together.
    fn deliver(&self, messages: Vec<ChatMessage>) -> impl std::future::Future<Output = ()> + Send;
    /// `room` is no longer followed: no message of it comes until it is
    /// followed again ([`Interest::follow`]).
    fn left(&self, room: &Room) -> impl std::future::Future<Output = ()> + Send;
}

/// Names of the Redis keys and channels, derived from `redis.key_prefix`
/// and `redis.partitions`.
///
/// Every key and channel of a room carries the hash tag of the room's
/// partition (`{p17}`), so that in a Redis Cluster they all live in one slot:
/// the append script touches several of them at once, and a frontend
/// subscribes to all its rooms of a partition on the node that holds it.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
    partitions: u32,
}

impl Keys {
    pub fn new(redis: &crate::config::RedisConfig) -> Self {
        Keys {
            prefix: redis.key_prefix.clone(),
            partitions: redis.partitions.get(),
        }
    }

    /// The partition of `room`: a digest of its name, so that every daemon
    /// of every version agrees, modulo `redis.partitions`.
    pub fn partition(&self, room: &Room) -> u32 {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(room.as_str().as_bytes());
        let head = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
        head % self.partitions
    }

    /// `{prefix}:{p<partition>}:{what}:`, to which a name is appended.
    fn in_partition(&self, room: &Room, what: &str, extra: usize) -> String {
        use std::fmt::Write;
        let mut name = String::with_capacity(self.prefix.len() + what.len() + extra + 16);
        let _ = write!(
            name,
            "{}:{{p{}}}:{what}:",
            self.prefix,
            self.partition(room)
        );
        name
    }

    /// The stream holding one room's history, and the channel its messages
    /// are published on as they are appended.
    pub fn room(&self, room: &Room) -> String {
        let mut name = self.in_partition(room, "room", room.as_str().len());
        name.push_str(room.as_str());
        name
    }

    /// With replica acknowledgements: the newest id of `room` that replicas
    /// are known to hold (see the module `acks`).
    pub fn acked(&self, room: &Room) -> String {
        let mut name = self.in_partition(room, "acked", room.as_str().len());
        name.push_str(room.as_str());
        name
    }

    /// The record of a post to `room` made with an idempotency key.
    pub fn post(&self, room: &Room, key: &PostKey) -> String {
        use std::fmt::Write;
        let mut name = self.in_partition(room, "idem", 64);
        for byte in key.0 {
            let _ = write!(name, "{byte:02x}");
        }
        name
    }
}

/// Where a post made with an `Idempotency-Key` is recorded: a digest of the
/// key and of the key space it belongs to. Each endpoint has its own space,
/// per room (the record lives beside the room's history, on the room's
/// shard in a Redis Cluster, so that one script checks it and appends), and
/// publishing one per token too: a client cannot make another's post fail
/// with 409 by guessing its key on another endpoint or with another token. Derived keys never fail a length check, and what a client
/// or the load balancer sent (a key made of the client's address and port)
/// is never stored as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PostKey([u8; 32]);

impl PostKey {
    /// A key of `POST /back/message` to `room`.
    pub fn message(key: &IdempotencyKey, room: &Room) -> Self {
        Self::digest(&[
            b"message",
            key.as_str().as_bytes(),
            room.as_str().as_bytes(),
        ])
    }

    /// A key of `POST /back/publish` by the holder of `token`, for `room`.
    pub fn publish(key: &IdempotencyKey, token: &TokenId, room: &Room) -> Self {
        Self::digest(&[
            b"publish",
            token.as_bytes(),
            key.as_str().as_bytes(),
            room.as_str().as_bytes(),
        ])
    }

    /// SHA-256 of the parts, each preceded by its length, so that no two
    /// lists of parts give the same input.
    fn digest(parts: &[&[u8]]) -> Self {
        use sha2::{Digest, Sha256};
        let mut hasher = Sha256::new();
        for part in parts {
            hasher.update((part.len() as u64).to_be_bytes());
            hasher.update(part);
        }
        PostKey(hasher.finalize().into())
    }
}

/// Whether Redis answered the last time it was asked, and how often it was
/// lost, shared between the Redis side and the status endpoints.
#[derive(Debug, Default)]
pub struct RedisHealth {
    up: AtomicBool,
    losses: AtomicU64,
    /// Cluster mode: rooms followed whose node does not answer.
    waiting: AtomicUsize,
}

impl RedisHealth {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Records the state; returns true when it changed.
    pub fn set_up(&self, up: bool) -> bool {
        let was = self.up.swap(up, Ordering::Relaxed);
        if was && !up {
            self.losses.fetch_add(1, Ordering::Relaxed);
        }
        was != up
    }

    /// How many times Redis went from up to down.
    pub fn losses(&self) -> u64 {
        self.losses.load(Ordering::Relaxed)
    }

    /// Cluster mode: how many rooms a frontend follows wait for a node that
    /// does not answer (the others are delivered meanwhile).
    pub fn rooms_waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    pub fn set_rooms_waiting(&self, rooms: usize) {
        self.waiting.store(rooms, Ordering::Relaxed);
    }
}
