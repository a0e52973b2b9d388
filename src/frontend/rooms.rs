//! Room membership and fan-out: joining (with or without resuming), and
//! emitting each message of the feed to its room's sockets.
//!
//! # Resuming without a gap or a duplicate
//!
//! A client that reconnects joins with the id of the last message it saw
//! (`since`). The frontend must send it everything after that id, then live
//! messages, each once and in order, although the feed keeps delivering while
//! the history is read from Redis. The join therefore goes in three steps:
//!
//! 1. Under the lock the delivery path also takes, the socket is registered as
//!    *resuming* in its room and the frontend's cursor `L` (the last feed id
//!    delivered) is read. From then on, every message for that room is held
//!    for the socket instead of being missed.
//! 2. Without the lock, the room's stream is read from `since` (exclusive) to
//!    `L` (inclusive): exactly what the socket missed up to the cursor. It is
//!    sent to the socket.
//! 3. Under the lock again, the held messages (all after `L`) are sent and the
//!    socket joins the room, so the next message reaches it through the room.
//!
//! Delivery emits to the room while holding the lock, so no message can be
//! both held and emitted to the room after the socket joined it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use socketioxide::extract::SocketRef;
use socketioxide::{BroadcastError, SocketIo};

use crate::delivery::{Store, Subscriber};
use crate::message::{ChatMessage, InvalidInput, JoinRequest, Room, StreamId};
use crate::metrics::FrontendMetrics;

/// How long a resuming join waits for the feed to reach Redis at start-up.
const CURSOR_WAIT: Duration = Duration::from_secs(2);

/// Why a `room` event was refused.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("{0}")]
    Invalid(#[from] InvalidInput),
    #[error("a socket may be in at most {0} rooms")]
    TooManyRooms(usize),
    #[error("history is unavailable right now; join again shortly")]
    HistoryUnavailable,
}

/// What a successful join did.
#[derive(Debug)]
pub struct Joined {
    pub room: Room,
    /// Whether the join asked to resume (`since`).
    pub resumed: bool,
    /// Messages sent to catch up.
    pub replayed: usize,
}

/// A socket catching up on a room, and the live messages held for it.
struct Resuming {
    socket: SocketRef,
    held: Vec<ChatMessage>,
}

#[derive(Default)]
struct Shared {
    /// Local sockets per room.
    members: HashMap<String, u64>,
    /// Id of the last feed message delivered; `None` before the feed started.
    cursor: Option<StreamId>,
    /// Resuming sockets, by room.
    resuming: HashMap<String, Vec<Resuming>>,
}

/// The frontend's rooms: who is in which, and how messages reach them.
pub struct Rooms {
    io: SocketIo,
    store: Store,
    max_rooms: usize,
    metrics: Arc<FrontendMetrics>,
    shared: tokio::sync::Mutex<Shared>,
}

impl Rooms {
    pub fn new(
        io: SocketIo,
        store: Store,
        max_rooms: usize,
        metrics: Arc<FrontendMetrics>,
    ) -> Self {
        Rooms {
            io,
            store,
            max_rooms,
            metrics,
            shared: Default::default(),
        }
    }

    pub fn metrics(&self) -> &FrontendMetrics {
        &self.metrics
    }

    /// Forgets a disconnected socket's memberships (socketioxide removes the
    /// socket itself once the disconnect handler returns).
    pub async fn leave_all(&self, socket: &SocketRef) {
        let mut shared = self.shared.lock().await;
        for room in socket.rooms() {
            if let Some(count) = shared.members.get_mut(room.as_ref()) {
                *count -= 1;
                if *count == 0 {
                    shared.members.remove(room.as_ref());
                }
            }
        }
        self.metrics.rooms.set(shared.members.len() as i64);
    }

    /// Puts `socket` in `room`; the caller holds the lock.
    fn enter(&self, shared: &mut Shared, socket: &SocketRef, room: &Room) {
        socket.join(room.to_string());
        *shared.members.entry(room.to_string()).or_default() += 1;
        self.metrics.rooms.set(shared.members.len() as i64);
    }
}

impl Subscriber for Rooms {
    /// Emits one feed message to its room, and holds it for resuming sockets.
    async fn deliver(&self, message: ChatMessage) {
        let mut shared = self.shared.lock().await;
        if let Some(id) = StreamId::parse(&message.id) {
            shared.cursor = Some(id);
        }
        self.metrics.received.inc();
        if let Some(waiting) = shared.resuming.get_mut(&message.room) {
            for resuming in waiting {
                resuming.held.push(message.clone());
            }
        }
        let Some(&members) = shared.members.get(&message.room) else {
            return;
        };
        let emitted = self
            .io
            .to(message.room.clone())
            .emit("message", &message)
            .await;
        match emitted {
            Ok(()) => {
                self.metrics.delivered.inc_by(members);
            }
            Err(BroadcastError::Socket(failed)) => {
                let failed = failed.len() as u64;
                self.metrics.dropped.inc_by(failed);
                self.metrics
                    .delivered
                    .inc_by(members.saturating_sub(failed));
                tracing::warn!(room = %message.room, id = %message.id, "{failed} sockets could not take a message");
            }
            Err(e) => tracing::error!(room = %message.room, id = %message.id, "cannot emit: {e}"),
        }
    }

    /// Learns where the feed starts, so resuming works before the first message.
    async fn following(&self, cursor: StreamId) {
        self.shared.lock().await.cursor.get_or_insert(cursor);
    }
}

impl Rooms {
    /// Handles a `room` event.
    pub async fn join(
        &self,
        socket: &SocketRef,
        request: JoinRequest,
    ) -> Result<Joined, JoinError> {
        let room = request.room;
        let rooms = socket.rooms();
        let already_in = rooms.iter().any(|r| r.as_ref() == room.as_str());
        if !already_in && rooms.len() >= self.max_rooms {
            return Err(JoinError::TooManyRooms(self.max_rooms));
        }
        match request.since {
            // A socket already in the room receives everything live: nothing to resume.
            Some(since) if !already_in => self.resume(socket, room, since).await,
            _ => {
                if !already_in {
                    self.enter(&mut *self.shared.lock().await, socket, &room);
                }
                Ok(Joined {
                    room,
                    resumed: request.since.is_some(),
                    replayed: 0,
                })
            }
        }
    }

    async fn resume(
        &self,
        socket: &SocketRef,
        room: Room,
        since: StreamId,
    ) -> Result<Joined, JoinError> {
        let cursor = self.register(socket, &room).await;
        let missed = match cursor {
            Some(until) if until > since => {
                self.store.range(&room, since, until).await.map_err(|e| {
                    tracing::warn!(%room, "cannot read history to resume a socket: {e}");
                    JoinError::HistoryUnavailable
                })
            }
            Some(_) => Ok(Vec::new()),
            None => Err(JoinError::HistoryUnavailable),
        };
        let mut shared = self.shared.lock().await;
        let resuming = take_resuming(&mut shared, &room, socket);
        let missed = missed?;
        let held = resuming.into_iter().flat_map(|r| r.held);
        let mut replayed = 0;
        for message in missed.into_iter().chain(held.filter(|m| after(m, since))) {
            // A full socket buffer drops the socket; it will resume again.
            if socket.emit("message", &message).is_err() {
                break;
            }
            replayed += 1;
        }
        self.metrics.replayed.inc_by(replayed as u64);
        self.enter(&mut shared, socket, &room);
        Ok(Joined {
            room,
            resumed: true,
            replayed,
        })
    }

    /// Step 1: marks `socket` as resuming in `room` and returns the cursor.
    async fn register(&self, socket: &SocketRef, room: &Room) -> Option<StreamId> {
        let deadline = Instant::now() + CURSOR_WAIT;
        loop {
            let mut shared = self.shared.lock().await;
            if let Some(cursor) = shared.cursor {
                shared
                    .resuming
                    .entry(room.to_string())
                    .or_default()
                    .push(Resuming {
                        socket: socket.clone(),
                        held: Vec::new(),
                    });
                return Some(cursor);
            }
            drop(shared);
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn after(message: &ChatMessage, since: StreamId) -> bool {
    StreamId::parse(&message.id).is_some_and(|id| id > since)
}

fn take_resuming(shared: &mut Shared, room: &Room, socket: &SocketRef) -> Option<Resuming> {
    let waiting = shared.resuming.get_mut(room.as_str())?;
    let index = waiting.iter().position(|r| r.socket.id == socket.id)?;
    let resuming = waiting.swap_remove(index);
    if waiting.is_empty() {
        shared.resuming.remove(room.as_str());
    }
    Some(resuming)
}
