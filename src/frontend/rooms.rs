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
//! 1. The frontend follows the room (if it did not already: see
//!    [`Interest`]). Then, under the lock the delivery path also takes, the
//!    socket is registered as *resuming* in its room and the room's cursor
//!    `L` (the id of the last message of the room delivered) is read. From
//!    then on, every message for that room is held for the socket instead of
//!    being missed.
//! 2. Without the lock, the room's stream is read from `since` (exclusive) to
//!    `L` (inclusive): exactly what the socket missed up to the cursor. It is
//!    read a page at a time and sent to the socket as the socket takes it
//!    (see [`super::replay`] for what bounds it).
//! 3. The held messages (all after `L`) are sent as the socket's queue has
//!    room for them, and once what waits for it leaves room for live
//!    delivery, the last of them are sent and the socket joins the room,
//!    under the lock again, so the next message reaches it through the room.
//!
//! Delivery emits to the room while holding the lock, so no message can be
//! both held and emitted to the room after the socket joined it.
//!
//! # A socket that cannot keep up
//!
//! Each socket has a bounded send queue. A socket that falls behind is not
//! skipped silently: its transport is closed, the client reconnects and
//! resumes from the last message it received. Resuming reads the room's
//! history, which keeps `history.max_per_room` messages, so a socket is let
//! go while what it has not received still fits in it: once the history less
//! [`RESUME_MARGIN`] live messages wait in its queue, the margin being for
//! the messages that arrive while it reconnects. A resuming socket is sent
//! what it missed only as its queue has room, in packets and in bytes (half
//! of what live delivery allows), and joins its room only once the next live
//! messages would find room: otherwise the first of them would let it go
//! again with what it was just sent still queued, to be sent once more
//! after it reconnects, and a slow reader would never catch up. So a slow
//! reader costs the frontend at most its queue, and never a message. The
//! queue is bounded in bytes too (`frontend.max_queued_bytes`), and a socket
//! whose queue does not empty for `frontend.backlog_timeout_ms` is let go as
//! well.
//!
//! The fan-out is done here, socket by socket, because that is where a
//! lagging socket is seen. Each message is encoded and framed once. The
//! messages that arrived from Redis together go to each socket together,
//! in feed order: a websocket with nothing queued gets them with one write
//! to its connection, made here rather than by a task of the socket's.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use socketioxide::extract::SocketRef;
use socketioxide::socket::{EncodedEvent, Sid};
use socketioxide::{SendError, SocketError};

use super::replay::{self, ReplayLimits};
use super::request::ClientAddress;
use crate::config::{FrontendConfig, HistoryConfig};
use crate::delivery::{Interest, Store, Subscriber};
use crate::message::{ChatMessage, InvalidInput, JoinRequest, Room, StreamId};
use crate::metrics::FrontendMetrics;

/// Room, beyond a room's history, in each socket's send queue; and room,
/// within the history, for the messages that arrive while a socket that was
/// let go reconnects.
pub const RESUME_MARGIN: usize = 256;

/// Packets one socket's send queue holds: a room's history and
/// [`RESUME_MARGIN`] more, above every bound the frontend sets within it
/// (the live messages that may wait, and what a resume sends before it
/// waits), so that those bounds act before the channel is full.
pub fn send_queue_len(history: &HistoryConfig) -> usize {
    history.max_per_room.get() + RESUME_MARGIN
}

/// How long a join waits for the feed to follow the room: to subscribe and
/// find where the room is, which Redis answers at once unless it is down.
const FOLLOW_WAIT: Duration = Duration::from_secs(2);

/// Why a `room` event was refused.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("{0}")]
    Invalid(#[from] InvalidInput),
    #[error("a socket may be in at most {0} rooms")]
    TooManyRooms(usize),
    #[error("history is unavailable right now; join again shortly")]
    HistoryUnavailable,
    #[error("too much history replayed to this address; join again shortly")]
    ReplayBudget,
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

/// Bytes of text read from Redis at once for a resuming socket: its next
/// page waits in this process, so it stays small.
const PAGE_BYTES: usize = 64 * 1024;

/// The most bytes a message's text may take (four per character).
const MAX_MESSAGE_BYTES: usize = crate::message::MAX_MESSAGE_CHARS * 4;

/// A socket catching up on a room, and the live messages held for it.
struct Resuming {
    socket: SocketRef,
    held: Vec<ChatMessage>,
}

#[derive(Default)]
struct Shared {
    /// The sockets of each room.
    members: HashMap<Room, Vec<SocketRef>>,
    /// The rooms of each socket.
    rooms_of: HashMap<Sid, Vec<Room>>,
    /// Id of the last message delivered of each room followed.
    cursors: HashMap<Room, StreamId>,
    /// Resuming sockets, by room.
    resuming: HashMap<Room, Vec<Resuming>>,
}

/// The frontend's rooms: who is in which, and how messages reach them.
pub struct Rooms {
    store: Store,
    /// Which rooms the feed follows: those sockets are in.
    interest: Interest,
    max_rooms: usize,
    /// Size of each socket's send queue.
    queue_len: usize,
    /// Live messages a socket may have waiting before it is let go; and
    /// live messages held for a resuming socket before its resume is given
    /// up (it resumes again, from what it got).
    live_backlog: usize,
    /// Bytes a resuming socket's queue may hold before its replay waits:
    /// half the queue, which a message always fits in (the configuration
    /// makes the queue at least twice the largest message).
    replay_room: usize,
    /// Packets a resuming socket's queue may hold before what it catches up
    /// on waits: half of `live_backlog`, so that once it is in its room live
    /// messages find room.
    catch_up_packets: usize,
    replay: ReplayLimits,
    metrics: Arc<FrontendMetrics>,
    shared: tokio::sync::Mutex<Shared>,
}

/// What became of one event sent to one socket.
enum Sent {
    Yes,
    /// The socket was too far behind: its transport is now closing.
    Dropped,
    /// The socket is already gone.
    Gone,
}

/// Marks a socket closed for falling behind. Nothing more is queued for it
/// while it closes: its queue drains meanwhile, and a later message queued
/// then would reach the client after a gap (the message dropped), and the
/// client, resuming after the last message it got, would never get the one
/// dropped. So it gets a prefix of its room's messages, and resumes after
/// the last of them.
#[derive(Clone, Copy)]
struct FellBehind;

/// Sends one encoded event to one socket, unless more than `backlog`
/// packets would then wait for it: then its transport is closed, so that it
/// reconnects and resumes.
fn send(socket: &SocketRef, event: &EncodedEvent, backlog: usize) -> Sent {
    if socket.extensions.get::<FellBehind>().is_some() {
        return Sent::Dropped;
    }
    match socket.emit_encoded(event, backlog) {
        Ok(()) => Sent::Yes,
        Err(SendError::Socket(SocketError::InternalChannelFull)) => {
            socket.extensions.insert(FellBehind);
            tracing::info!(sid = %socket.id, "too far behind; closing the socket so it resumes");
            socket.close_transport();
            Sent::Dropped
        }
        Err(e) => {
            tracing::debug!(sid = %socket.id, "not sent: {e}");
            Sent::Gone
        }
    }
}

/// Encodes `message` as the Socket.IO event `message`, once for all the
/// sockets it goes to (`socket` only lends the namespace and parser, which
/// all sockets share).
fn encode(socket: &SocketRef, message: &ChatMessage) -> EncodedEvent {
    socket
        .encode_event("message", message)
        .expect("a message serialises")
}

impl Rooms {
    pub fn new(
        store: Store,
        interest: Interest,
        frontend: &FrontendConfig,
        history: &HistoryConfig,
        metrics: Arc<FrontendMetrics>,
    ) -> Self {
        let kept = history.max_per_room.get();
        let live_backlog = kept - RESUME_MARGIN.min(kept / 2);
        Rooms {
            store,
            interest,
            max_rooms: frontend.max_rooms_per_socket.get(),
            queue_len: send_queue_len(history),
            live_backlog,
            replay_room: frontend.max_queued_bytes.get() / 2,
            catch_up_packets: (live_backlog / 2).max(1),
            replay: ReplayLimits::new(
                frontend.replay_per_second.get(),
                frontend.replay_burst.get(),
            ),
            metrics,
            shared: Default::default(),
        }
    }

    pub fn metrics(&self) -> &FrontendMetrics {
        &self.metrics
    }

    /// Forgets a disconnected socket.
    pub async fn leave_all(&self, socket: &SocketRef) {
        let mut shared = self.shared.lock().await;
        let rooms = shared.rooms_of.remove(&socket.id).unwrap_or_default();
        for room in rooms {
            if let Some(sockets) = shared.members.get_mut(&room) {
                sockets.retain(|s| s.id != socket.id);
                if sockets.is_empty() {
                    shared.members.remove(&room);
                }
            }
            self.leave_if_empty(&shared, &room);
        }
        self.metrics.rooms.set(shared.members.len() as i64);
    }

    /// Tells the feed, when nobody was in `room`, that someone is now; the
    /// caller holds the lock. The room was followed before the socket came
    /// (the join asked the feed first), but the last socket before it may
    /// have left meanwhile: this cancels that leave.
    fn occupy(&self, shared: &Shared, room: &Room) {
        if !shared.members.contains_key(room) && !shared.resuming.contains_key(room) {
            self.interest.keep(room);
        }
    }

    /// Tells the feed that nobody is in `room` any more, if so; the caller
    /// holds the lock.
    fn leave_if_empty(&self, shared: &Shared, room: &Room) {
        if !shared.members.contains_key(room) && !shared.resuming.contains_key(room) {
            self.interest.leave(room);
        }
    }

    /// Puts `socket` in `room`; the caller holds the lock.
    ///
    /// A socket that disconnected meanwhile is left out: its disconnect
    /// handler ([`Rooms::leave_all`]) may already have run, and would not run
    /// again to remove it. So is one that joined other rooms meanwhile, up
    /// to its limit.
    fn enter(&self, shared: &mut Shared, socket: &SocketRef, room: &Room) -> Result<(), JoinError> {
        if !socket.connected() {
            return Err(JoinError::HistoryUnavailable);
        }
        // Most sockets are in one room: room for one, where a first push
        // would make room for four (a socket's rooms live as long as it does).
        let rooms = shared
            .rooms_of
            .entry(socket.id)
            .or_insert_with(|| Vec::with_capacity(1));
        if rooms.contains(room) {
            return Ok(());
        }
        if rooms.len() >= self.max_rooms {
            return Err(JoinError::TooManyRooms(self.max_rooms));
        }
        rooms.push(room.clone());
        self.occupy(shared, room);
        shared
            .members
            .entry(room.clone())
            .or_default()
            .push(socket.clone());
        self.metrics.rooms.set(shared.members.len() as i64);
        Ok(())
    }

    /// Sends live messages, unless `socket` would then have fallen so far
    /// behind that resuming could no longer fill its gap from the room's
    /// history: then its transport is closed now, and it resumes.
    fn send_live(&self, socket: &SocketRef, event: &EncodedEvent) -> Sent {
        send(socket, event, self.live_backlog)
    }
}

impl Subscriber for Rooms {
    /// Emits messages that arrived from Redis together to their rooms, and holds
    /// them for resuming sockets.
    async fn deliver(&self, messages: Vec<ChatMessage>) {
        let mut shared = self.shared.lock().await;
        for message in &messages {
            match shared.cursors.get_mut(&message.room) {
                Some(cursor) => *cursor = message.id,
                None => {
                    shared.cursors.insert(message.room.clone(), message.id);
                }
            }
            if let Some(waiting) = shared.resuming.get_mut(&message.room) {
                for resuming in waiting {
                    resuming.held.push(message.clone());
                    if resuming.held.len() == self.live_backlog {
                        tracing::info!(sid = %resuming.socket.id, "resuming too slowly; closing the socket so it resumes again");
                        resuming.socket.close_transport();
                    }
                }
            }
        }
        self.metrics.received.inc_by(messages.len() as u64);
        let mut counts = Counts::default();
        self.fan_out(&shared, &messages, &mut counts);
        self.metrics.delivered.inc_by(counts.delivered);
        self.metrics.dropped.inc_by(counts.dropped);
    }

    /// Forgets where a room no longer followed was.
    async fn left(&self, room: &Room) {
        self.shared.lock().await.cursors.remove(room);
    }
}

/// Messages sent and sockets let go during one delivery.
#[derive(Default)]
struct Counts {
    delivered: u64,
    dropped: u64,
}

impl Counts {
    fn add(&mut self, sent: Sent, messages: usize) {
        match sent {
            Sent::Yes => self.delivered += messages as u64,
            Sent::Dropped => self.dropped += 1,
            Sent::Gone => {}
        }
    }
}

impl Rooms {
    /// Sends `messages` to the sockets of their rooms, each socket getting
    /// its messages of the batch at once, in feed order: with one system call
    /// on a websocket, where messages sent one by one would cost one each.
    fn fan_out(&self, shared: &Shared, messages: &[ChatMessage], counts: &mut Counts) {
        // Encoded once each, with a socket of the room (all share the
        // namespace and parser); `None` for a room nobody is in.
        let events: Vec<Option<EncodedEvent>> = messages
            .iter()
            .map(|m| {
                let sockets = shared.members.get(&m.room)?;
                Some(encode(sockets.first()?, m))
            })
            .collect();
        let rooms = by_room(messages);
        // A socket in several rooms must get their messages interleaved as
        // the feed has them: it is sent its own selection below.
        let mixed = rooms.len() > 1;
        let mut in_several: HashMap<Sid, &SocketRef> = HashMap::new();
        for (room, picked) in rooms {
            let Some(sockets) = shared.members.get(room) else {
                continue;
            };
            let batch = joined(&events, &picked);
            for socket in sockets {
                if mixed && shared.rooms_of.get(&socket.id).is_some_and(|r| r.len() > 1) {
                    in_several.insert(socket.id, socket);
                    continue;
                }
                self.send_batch(socket, &batch, counts);
            }
        }
        for socket in in_several.values() {
            let theirs = shared
                .rooms_of
                .get(&socket.id)
                .map_or(&[][..], Vec::as_slice);
            let picked: Vec<usize> = (0..messages.len())
                .filter(|&i| theirs.contains(&messages[i].room))
                .collect();
            self.send_batch(socket, &joined(&events, &picked), counts);
        }
    }

    fn send_batch(
        &self,
        socket: &SocketRef,
        batch: &[(Cow<'_, EncodedEvent>, usize)],
        counts: &mut Counts,
    ) {
        for (event, messages) in batch {
            counts.add(self.send_live(socket, event), *messages);
        }
    }
}

/// The rooms of `messages`, in the order they first appear, each with the
/// indices of its messages.
fn by_room(messages: &[ChatMessage]) -> Vec<(&Room, Vec<usize>)> {
    let mut rooms: Vec<(&Room, Vec<usize>)> = Vec::new();
    let mut slots: HashMap<&Room, usize> = HashMap::new();
    for (i, message) in messages.iter().enumerate() {
        let slot = *slots.entry(&message.room).or_insert_with(|| {
            rooms.push((&message.room, Vec::new()));
            rooms.len() - 1
        });
        rooms[slot].1.push(i);
    }
    rooms
}

/// Most messages sent to a socket as one. A socket is sent a batch only if
/// its queue has room for all of it; kept well under the queue's length
/// (the room's history and more), a batch never waits for a queue that
/// cannot hold it.
const MAX_JOINED: usize = 64;

/// The encoded messages at `picked` as events of up to [`MAX_JOINED`]
/// messages each, with how many messages each holds (borrowed when it is
/// one message). Events with binary parts cannot be joined; they would go
/// one by one.
fn joined<'a>(
    events: &'a [Option<EncodedEvent>],
    picked: &[usize],
) -> Vec<(Cow<'a, EncodedEvent>, usize)> {
    let mut batch = Vec::new();
    for chunk in picked.chunks(MAX_JOINED) {
        let each = || chunk.iter().filter_map(|&i| events[i].as_ref());
        let one = match chunk {
            [_, _, ..] => EncodedEvent::join(each()),
            _ => None,
        };
        match one {
            Some(event) => batch.push((Cow::Owned(event), each().count())),
            None => batch.extend(each().map(|event| (Cow::Borrowed(event), 1))),
        }
    }
    batch
}

impl Rooms {
    /// Handles a `room` event.
    pub async fn join(
        &self,
        socket: &SocketRef,
        request: JoinRequest,
    ) -> Result<Joined, JoinError> {
        let room = request.room;
        if self.is_in(socket, &room).await? {
            // A socket already in the room receives everything live: nothing to resume.
            return Ok(Joined {
                room,
                resumed: request.since.is_some(),
                replayed: 0,
            });
        }
        // Followed before the socket enters: every message after the
        // position the feed answers reaches the room's sockets.
        let followed = self.interest.follow(&room, FOLLOW_WAIT).await;
        match request.since {
            Some(since) => self.resume(socket, room, since, followed).await,
            None => {
                let mut shared = self.shared.lock().await;
                if let Err(refused) = self.enter(&mut shared, socket, &room) {
                    self.leave_if_empty(&shared, &room);
                    return Err(refused);
                }
                Ok(Joined {
                    room,
                    resumed: false,
                    replayed: 0,
                })
            }
        }
    }

    /// Whether `socket` is in `room`; an error if it is not and may join no
    /// more rooms.
    async fn is_in(&self, socket: &SocketRef, room: &Room) -> Result<bool, JoinError> {
        let shared = self.shared.lock().await;
        let rooms = shared
            .rooms_of
            .get(&socket.id)
            .map_or(&[][..], Vec::as_slice);
        let already_in = rooms.contains(room);
        if !already_in && rooms.len() >= self.max_rooms {
            return Err(JoinError::TooManyRooms(self.max_rooms));
        }
        Ok(already_in)
    }

    async fn resume(
        &self,
        socket: &SocketRef,
        room: Room,
        since: StreamId,
        followed: Option<StreamId>,
    ) -> Result<Joined, JoinError> {
        let client = ClientAddress::kept(&socket.req_parts().headers).map(|c| c.0);
        let admitted = client.is_none_or(|c| self.replay.budgets().admits(c, Instant::now()));
        let (cursor, refused) = match (followed, admitted) {
            (Some(followed), true) => (self.register(socket, &room, followed).await, None),
            (None, _) => (StreamId::ZERO, Some(JoinError::HistoryUnavailable)),
            (_, false) => (StreamId::ZERO, Some(JoinError::ReplayBudget)),
        };
        if let Some(refused) = refused {
            self.leave_if_empty(&*self.shared.lock().await, &room);
            return Err(refused);
        }
        let missed = match cursor > since {
            true => {
                self.replay_history(socket, &room, since, cursor, client)
                    .await
            }
            false => Ok(0),
        };
        let result = match missed {
            Ok(replayed) => self.join_live(socket, &room, since, replayed).await,
            Err(refused) => Err(refused),
        };
        if result.is_err() {
            let mut shared = self.shared.lock().await;
            take_resuming(&mut shared, &room, socket);
            self.leave_if_empty(&shared, &room);
        }
        result
    }

    /// Step 3: sends `socket` the messages held for it while it caught up,
    /// as its queue has room for them, and puts it in `room` once what waits
    /// for it leaves room for live delivery. Until then it stays resuming:
    /// new messages are held for it. Put in its room with its queue nearly
    /// full, it would be let go by the next live message with what it was
    /// just sent still queued, and sent it all again once it reconnects.
    async fn join_live(
        &self,
        socket: &SocketRef,
        room: &Room,
        since: StreamId,
        mut replayed: usize,
    ) -> Result<Joined, JoinError> {
        loop {
            if !socket
                .wait_for_room(self.catch_up_packets / 2, self.replay_room / 2)
                .await
            {
                return Err(JoinError::HistoryUnavailable);
            }
            let held = {
                let mut shared = self.shared.lock().await;
                let held = resuming_of(&mut shared, room, socket)
                    .map(|r| std::mem::take(&mut r.held))
                    .ok_or(JoinError::HistoryUnavailable)?;
                if self.fits_now(socket, &held) {
                    // The last few, and into the room, under the lock.
                    for message in held.iter().filter(|m| m.id > since) {
                        self.send_now(socket, message)?;
                        replayed += 1;
                    }
                    take_resuming(&mut shared, room, socket);
                    self.enter(&mut shared, socket, room)?;
                    return Ok(Joined {
                        room: room.clone(),
                        resumed: true,
                        replayed,
                    });
                }
                held
            };
            // Without the lock, each once there is room: the next are held
            // meanwhile, and come after these.
            for message in held.iter().filter(|m| m.id > since) {
                self.send_when_room(socket, message).await?;
                replayed += 1;
            }
        }
    }

    /// Whether `held` may be sent to `socket` at once and leave room in its
    /// queue for live delivery: at most half the live bound in packets, and
    /// half the queue in bytes.
    fn fits_now(&self, socket: &SocketRef, held: &[ChatMessage]) -> bool {
        // Packets first: the bytes take serialising each message.
        socket.queued() + held.len() <= self.catch_up_packets
            && socket.queued_bytes() + held.iter().map(queued_bytes).sum::<usize>()
                <= self.replay_room
    }

    /// Sends a message it missed to a resuming `socket` once its queue has
    /// room for it (see [`Rooms::catch_up_packets`]).
    async fn send_when_room(
        &self,
        socket: &SocketRef,
        message: &ChatMessage,
    ) -> Result<(), JoinError> {
        if !socket
            .wait_for_room(self.catch_up_packets, self.replay_room)
            .await
        {
            return Err(JoinError::HistoryUnavailable);
        }
        self.send_now(socket, message)
    }

    /// Sends a message it missed to a resuming `socket`.
    fn send_now(&self, socket: &SocketRef, message: &ChatMessage) -> Result<(), JoinError> {
        match send(socket, &encode(socket, message), self.queue_len) {
            Sent::Yes => {
                self.metrics.replayed.inc();
                Ok(())
            }
            // The socket is closing; it will resume again from what it got.
            Sent::Dropped | Sent::Gone => Err(JoinError::HistoryUnavailable),
        }
    }

    /// Step 2: sends `socket` the messages of `room` after `since` up to
    /// `until`, read from Redis a page at a time, each message once the
    /// socket's queue has room for it; returns how many. Fails when the
    /// socket goes away meanwhile, or Redis does not answer.
    async fn replay_history(
        &self,
        socket: &SocketRef,
        room: &Room,
        since: StreamId,
        until: StreamId,
        client: Option<std::net::IpAddr>,
    ) -> Result<usize, JoinError> {
        let mut after = since;
        let mut replayed = 0;
        loop {
            let page = {
                let _reading = self.replay.page().await;
                self.store
                    .page(room, after, until, replay::PAGE, PAGE_BYTES)
                    .await
                    .map_err(|e| {
                        tracing::warn!(%room, "cannot read history to resume a socket: {e}");
                        JoinError::HistoryUnavailable
                    })?
            };
            if let Some(client) = client {
                self.replay
                    .budgets()
                    .spend(client, page.len(), Instant::now());
            }
            // A page ends short of PAGE messages where the range ends, or
            // where the next message would pass PAGE_BYTES.
            let text: usize = page.iter().map(|m| m.message.len()).sum();
            let last_page = page.len() < replay::PAGE && text + MAX_MESSAGE_BYTES <= PAGE_BYTES;
            for message in &page {
                self.send_when_room(socket, message).await?;
                replayed += 1;
            }
            match page.last().map(|m| m.id) {
                Some(last) if !last_page && last < until => after = last,
                _ => return Ok(replayed),
            }
        }
    }

    /// Step 1: marks `socket` as resuming in `room` and returns the room's
    /// cursor: where the feed said it follows the room from (`followed`),
    /// or the last message delivered since.
    async fn register(&self, socket: &SocketRef, room: &Room, followed: StreamId) -> StreamId {
        let mut shared = self.shared.lock().await;
        self.occupy(&shared, room);
        let cursor = shared.cursors.entry(room.clone()).or_insert(followed);
        *cursor = (*cursor).max(followed);
        let cursor = *cursor;
        shared
            .resuming
            .entry(room.clone())
            .or_default()
            .push(Resuming {
                socket: socket.clone(),
                held: Vec::new(),
            });
        cursor
    }
}

/// The bytes `message` takes in a socket's queue: its JSON in the event
/// `2["message",…]`, with the byte that frames it.
fn queued_bytes(message: &ChatMessage) -> usize {
    const ENVELOPE: usize = r#"2["message",]"#.len() + 1;
    serde_json::to_string(message).map_or(MAX_MESSAGE_BYTES * 2, |json| json.len() + ENVELOPE)
}

/// `socket`'s resume of `room`, if it is resuming it.
fn resuming_of<'a>(
    shared: &'a mut Shared,
    room: &Room,
    socket: &SocketRef,
) -> Option<&'a mut Resuming> {
    shared
        .resuming
        .get_mut(room)?
        .iter_mut()
        .find(|r| r.socket.id == socket.id)
}

fn take_resuming(shared: &mut Shared, room: &Room, socket: &SocketRef) -> Option<Resuming> {
    let waiting = shared.resuming.get_mut(room)?;
    let index = waiting.iter().position(|r| r.socket.id == socket.id)?;
    let resuming = waiting.swap_remove(index);
    if waiting.is_empty() {
        shared.resuming.remove(room);
    }
    Some(resuming)
}
