//! Delivery through Redis: how a message is stored and how every frontend
//! hears of it.
//!
//! # Design
//!
//! Each message is appended, atomically by one Lua script, to two Redis
//! streams under the same id:
//!
//! - `{prefix}:room:{room}`: the room's history, trimmed to
//!   `history.max_per_room`, forgotten `history.room_ttl_days` after its last
//!   post. `GET /back/messages` and resuming clients read it.
//! - `{prefix}:feed`: every message of every room, trimmed to
//!   `history.feed_length` messages and `history.feed_bytes` of text (counted
//!   in `{prefix}:feed:bytes`). Every frontend follows it from the id of the
//!   last message it delivered.
//!
//! The script also publishes the message, with the id of the feed entry
//! before it, on the channel `{prefix}:feed`: Redis pushes it to every
//! frontend, which reads the stream itself only when a push does not follow
//! on from its cursor (see [`Feed`]).
//!
//! The backend answers 201 only once the script has returned, so an
//! acknowledged message is in both streams. A frontend that loses Redis keeps
//! that cursor, and when Redis is back it reads on from it: nothing appended
//! meanwhile is skipped, and nothing is delivered twice. A push is forgotten
//! by Redis the moment a frontend is away; a stream entry is not.
//!
//! A post may carry an idempotency key (recorded as `{prefix}:idem:{digest}`,
//! see [`PostKey`], kept ten minutes): a post repeated with the same key
//! returns the first one's id and is not stored again, so retrying a post
//! whose answer was lost is safe.
//!
//! The daemons reach Redis as the module `connect` says: logged in as an ACL user,
//! over TLS where configured. Which Redis is the module `primary`'s business:
//! the one of `redis.url`, or, in Sentinel mode, the primary the Sentinels
//! name, followed across failovers ([`Primary`]). In Sentinel mode an append
//! is acknowledged once replicas hold it too (the module `acks`), and
//! frontends hand it to sockets only then: the backends publish how far
//! replicas hold the feed (`{prefix}:feed:replicated`), and a frontend holds
//! what it reads or is pushed until that covers it (see [`Feed`]), so a
//! message a failover takes back is never shown.
//!
//! The id Redis assigns to the feed entry is reused for the room entry, so ids
//! increase within a room as they do in the feed, and one id tells a client
//! where it is in either.

mod acks;
mod connect;
mod feed;
mod primary;
pub mod shards;
mod store;

pub use acks::AckError;
pub use connect::{ConnectError, PASSWORD_CREDENTIAL, SENTINEL_PASSWORD_CREDENTIAL};
pub use feed::{Feed, FeedError};
pub use primary::{Primary, PrimaryStats, Resolved};
pub use store::{Appended, IDEMPOTENCY_WINDOW, Store, StoreError};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::auth::TokenId;
use crate::message::{ChatMessage, IdempotencyKey, Room, StreamId};

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

/// Takes the text of the field `name` out of `fields`, if it is there and UTF-8.
fn take_field(fields: &mut Fields, name: &[u8]) -> Option<String> {
    let index = fields.iter().position(|(field, _)| field == name)?;
    String::from_utf8(fields.swap_remove(index).1).ok()
}

/// What a [`Feed`] hands its messages to.
pub trait Subscriber: Send + Sync + 'static {
    /// The feed (re)connected and continues after `cursor`; called before the
    /// messages that follow it.
    fn following(&self, cursor: StreamId) -> impl std::future::Future<Output = ()> + Send;
    /// The next messages of the feed, in order, each once: those that
    /// arrived from Redis together, so that they can be sent together.
    fn deliver(&self, messages: Vec<ChatMessage>) -> impl std::future::Future<Output = ()> + Send;
}

/// Names of the Redis keys, derived from `redis.key_prefix`.
#[derive(Debug, Clone)]
pub struct Keys {
    feed: String,
    feed_bytes: String,
    replicated: String,
    room_prefix: String,
    post_prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Keys {
            feed: format!("{prefix}:feed"),
            feed_bytes: format!("{prefix}:feed:bytes"),
            replicated: format!("{prefix}:feed:replicated"),
            room_prefix: format!("{prefix}:room:"),
            post_prefix: format!("{prefix}:idem:"),
        }
    }

    /// The stream every frontend follows.
    pub fn feed(&self) -> &str {
        &self.feed
    }

    /// The count of the bytes of text in the feed.
    pub fn feed_bytes(&self) -> &str {
        &self.feed_bytes
    }

    /// Sentinel mode: the newest feed id replicas are known to hold, as a
    /// key and as the channel it is published on (see the module `acks`).
    pub fn replicated(&self) -> &str {
        &self.replicated
    }

    /// The stream holding one room's history.
    pub fn room(&self, room: &Room) -> String {
        let mut name = String::with_capacity(self.room_prefix.len() + room.as_str().len());
        name.push_str(&self.room_prefix);
        name.push_str(room.as_str());
        name
    }

    /// The record of a post made with an idempotency key.
    pub fn post(&self, key: &PostKey) -> String {
        let mut name = String::with_capacity(self.post_prefix.len() + 64);
        name.push_str(&self.post_prefix);
        for byte in key.0 {
            name.push_str(&format!("{byte:02x}"));
        }
        name
    }
}

/// Where a post made with an `Idempotency-Key` is recorded: a digest of the
/// key and of the key space it belongs to. Each endpoint has its own space,
/// and publishing one per token and room: a client cannot make another's
/// post fail with 409 by guessing its key on another endpoint or with
/// another token. Derived keys never fail a length check, and what a client
/// or the load balancer sent (a key made of the client's address and port)
/// is never stored as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PostKey([u8; 32]);

impl PostKey {
    /// A key of `POST /back/message`.
    pub fn message(key: &IdempotencyKey) -> Self {
        Self::digest(&[b"message", key.as_str().as_bytes()])
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
}
