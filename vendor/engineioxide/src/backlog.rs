//! What waits for a client, counted in bytes and watched in time (chat-ha
//! patch; see vendor/README.md).
//!
//! A socket's packets wait in its channel until a transport takes them (a
//! long-polling request, a websocket's writer) and, on a websocket written
//! directly, in its outbox until the kernel takes them. [`Backlog`] counts
//! the bytes in the channel (the outbox counts its own), so that a send is
//! refused before a client that does not read makes the server hold more than
//! [`EngineIoConfig::max_buffer_bytes`]; and it runs a timer while packets
//! wait, so that a client that keeps its session alive (it answers pings)
//! without reading is let go after [`EngineIoConfig::backlog_timeout`].
//!
//! # When the queue "has not been empty"
//!
//! A client that keeps up takes what is sent at once or soon: its queue is
//! empty most of the time, whatever the rate. So the timer starts when
//! packets wait that no transport is waiting to take (a sender sees that when
//! it queues them), or that the kernel does not take (a websocket's writer
//! sees that), and transports note the time whenever they leave the queue
//! empty while it runs. When it expires, an empty queue ends it; a queue left
//! empty since it started moves its deadline to `timeout` after that moment;
//! otherwise the transport is closed. A transport is thus closed only once
//! its queue has gone `timeout` without being empty once, never for the
//! packets of a burst it takes in good time.
//!
//! A socket has at most one timer, and an idle one none. The per-socket
//! state is one word in the socket (the channel's bytes and two flags) and a
//! pointer to a [`Watch`], made the first time the socket falls behind or a
//! task waits for room.
//!
//! [`EngineIoConfig::max_buffer_bytes`]: crate::config::EngineIoConfig::max_buffer_bytes
//! [`EngineIoConfig::backlog_timeout`]: crate::config::EngineIoConfig::backlog_timeout

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use engineioxide_core::Packet;
use once_cell::race::OnceBox;
use tokio::sync::{Notify, futures::Notified};
use tokio::time::Instant;

/// A timer watches the queue.
const ARMED: usize = 1 << (usize::BITS - 1);
/// A transport waits to take packets from the channel the moment they come
/// (a polling request, a websocket's writer): what is queued is not left
/// waiting.
const DRAINER: usize = 1 << (usize::BITS - 2);
/// The bits of the word that count bytes.
const BYTES: usize = DRAINER - 1;

/// The bytes `packet` counts for: its Engine.IO encoding, type and payload.
/// At least 1, so that a queue that counts no bytes is empty.
pub(crate) fn packet_bytes(packet: &Packet) -> usize {
    match packet {
        Packet::Message(msg) => 1 + msg.len(),
        Packet::Binary(bin) | Packet::BinaryV3(bin) => 1 + bin.len(),
        _ => 1,
    }
}

/// The bytes `packets` count for (see [`packet_bytes`]).
pub(crate) fn batch_bytes(packets: &[Packet]) -> usize {
    packets.iter().map(packet_bytes).sum()
}

/// The bytes in a socket's channel, and its backlog timer; see the module.
pub(crate) struct Backlog {
    /// The bytes of the packets in the channel, with the flags [`ARMED`] and
    /// [`DRAINER`]: one word, so that a sender learns with the same atomic
    /// addition whether its packets will be taken or must be watched.
    word: AtomicUsize,
    watch: OnceBox<Watch>,
}

/// What a socket that once fell behind, or was waited on, keeps.
struct Watch {
    /// The origin of `emptied`.
    origin: Instant,
    /// When a transport last left the queue empty while the timer ran, in
    /// nanoseconds after `origin` (0: never).
    emptied: AtomicU64,
    /// Tasks in [`Backlog::room`]; transports wake them only if there are.
    waiters: AtomicUsize,
    room: Notify,
}

/// The state of the word before packets were added to the channel.
#[derive(Clone, Copy)]
pub(crate) struct Added(usize);

impl Added {
    /// Whether the packets wait with no transport waiting to take them and
    /// no timer running: the sender must start one.
    pub(crate) fn unattended(self) -> bool {
        self.0 & (ARMED | DRAINER) == 0
    }
}

impl Backlog {
    pub(crate) fn new() -> Self {
        Backlog {
            word: AtomicUsize::new(0),
            watch: OnceBox::new(),
        }
    }

    /// The bytes in the channel.
    pub(crate) fn bytes(&self) -> usize {
        self.word.load(SeqCst) & BYTES
    }

    /// Counts `bytes` about to enter the channel, unless the queue, with
    /// `elsewhere` bytes waiting outside the channel, would then hold more
    /// than `max` (and already holds something: a packet larger than `max`
    /// goes alone). Checked and counted in one atomic addition. The caller
    /// undoes it with [`Backlog::sub`] if its packets do not enter after all.
    pub(crate) fn try_add(&self, bytes: usize, elsewhere: usize, max: usize) -> Option<Added> {
        let before = self.word.fetch_add(bytes, SeqCst);
        let waiting = (before & BYTES) + elsewhere;
        if waiting > 0 && waiting + bytes > max {
            self.word.fetch_sub(bytes, SeqCst);
            return None;
        }
        Some(Added(before))
    }

    /// Counts `bytes` about to enter the channel, whatever it holds.
    pub(crate) fn add(&self, bytes: usize) -> Added {
        Added(self.word.fetch_add(bytes, SeqCst))
    }

    /// Uncounts `bytes` taken from the channel (or that never entered it).
    pub(crate) fn sub(&self, bytes: usize) {
        self.word.fetch_sub(bytes, SeqCst);
    }

    /// A transport now waits for packets. Returns the bytes in the channel.
    pub(crate) fn drainer_waits(&self) -> usize {
        self.word.fetch_or(DRAINER, SeqCst) & BYTES
    }

    /// The transport no longer waits for packets. Returns the bytes in the
    /// channel.
    pub(crate) fn drainer_leaves(&self) -> usize {
        self.word.fetch_and(!DRAINER, SeqCst) & BYTES
    }

    pub(crate) fn is_armed(&self) -> bool {
        self.word.load(SeqCst) & ARMED != 0
    }

    /// Claims the timer: whether the caller must start it (none runs).
    pub(crate) fn arm(&self) -> bool {
        // Made first: a transport that sees the flag records into it.
        self.watch();
        self.word.fetch_or(ARMED, SeqCst) & ARMED == 0
    }

    /// The timer ends.
    pub(crate) fn disarm(&self) {
        self.word.fetch_and(!ARMED, SeqCst);
    }

    fn watch(&self) -> &Watch {
        self.watch.get_or_init(|| {
            Box::new(Watch {
                origin: Instant::now(),
                emptied: AtomicU64::new(0),
                waiters: AtomicUsize::new(0),
                room: Notify::new(),
            })
        })
    }

    /// A transport left the queue empty: noted if the timer runs.
    pub(crate) fn emptied(&self) {
        if !self.is_armed() {
            return;
        }
        if let Some(watch) = self.watch.get() {
            let nanos = watch.origin.elapsed().as_nanos();
            let nanos = u64::try_from(nanos).unwrap_or(u64::MAX).max(1);
            watch.emptied.store(nanos, SeqCst);
        }
    }

    /// When a transport last left the queue empty while the timer ran.
    pub(crate) fn last_emptied(&self) -> Option<Instant> {
        let watch = self.watch.get()?;
        match watch.emptied.load(SeqCst) {
            0 => None,
            nanos => Some(watch.origin + Duration::from_nanos(nanos)),
        }
    }

    /// A transport took or wrote packets: wakes the tasks waiting for room.
    pub(crate) fn drained(&self) {
        if let Some(watch) = self.watch.get()
            && watch.waiters.load(SeqCst) > 0
        {
            watch.room.notify_waiters();
        }
    }

    /// Registers a task that waits for room, until the returned value drops.
    pub(crate) fn room_waiter(&self) -> RoomWaiter<'_> {
        let watch = self.watch();
        watch.waiters.fetch_add(1, SeqCst);
        RoomWaiter(watch)
    }
}

/// A task waiting for room in the queue (see [`Backlog::room_waiter`]).
pub(crate) struct RoomWaiter<'a>(&'a Watch);

impl RoomWaiter<'_> {
    /// Resolves at the next [`Backlog::drained`] after it is enabled.
    pub(crate) fn notified(&self) -> Notified<'_> {
        self.0.room.notified()
    }
}

impl Drop for RoomWaiter<'_> {
    fn drop(&mut self) {
        self.0.waiters.fetch_sub(1, SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use engineioxide_core::{ProtocolVersion, Str, TransportType};
    use http::Request;

    use super::*;
    use crate::config::EngineIoConfig;
    use crate::socket::{ClosingWith, DisconnectReason, Socket};

    const TIMEOUT: Duration = Duration::from_secs(5);

    /// A socket that nothing drains unless the test does, with `max_bytes`,
    /// and the reasons it was closed for.
    fn socket(max_bytes: usize) -> (Arc<Socket<()>>, Arc<Mutex<Vec<DisconnectReason>>>) {
        let closed = Arc::new(Mutex::new(Vec::new()));
        let record = closed.clone();
        let config = EngineIoConfig::builder()
            .max_buffer_bytes(max_bytes)
            .backlog_timeout(TIMEOUT)
            .build();
        let sessions = ClosingWith::sessions(
            Box::new(move |_, reason| record.lock().unwrap().push(reason)),
            config,
        );
        let socket = Socket::new(
            ProtocolVersion::V4,
            TransportType::Polling,
            sessions,
            Request::<()>::default().into_parts().0,
            false,
        );
        (Arc::new(socket), closed)
    }

    /// Takes everything from the channel, as a transport does.
    fn drain(socket: &Socket<()>) {
        let mut rx = socket.internal_rx.try_lock().unwrap();
        while let Ok(packets) = rx.buffered_rx.try_recv() {
            socket.backlog.sub(batch_bytes(&packets));
        }
        drop(rx);
        socket.transport_progressed();
    }

    async fn at(start: Instant, secs: f64) {
        tokio::time::sleep_until(start + Duration::from_secs_f64(secs)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_queue_never_emptied_is_closed_after_the_timeout() {
        let (socket, closed) = socket(usize::MAX);
        let start = Instant::now();
        socket.emit("waits").unwrap();
        assert!(
            socket.backlog.is_armed(),
            "no transport waits: the timer runs"
        );
        tokio::spawn(socket.clone().watch_backlog(TIMEOUT));
        at(start, 4.9).await;
        assert!(closed.lock().unwrap().is_empty(), "not before the timeout");
        at(start, 5.1).await;
        assert_eq!(*closed.lock().unwrap(), [DisconnectReason::ClosingServer]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_queue_emptied_meanwhile_has_the_timeout_from_then() {
        let (socket, closed) = socket(usize::MAX);
        let start = Instant::now();
        socket.emit("first").unwrap();
        tokio::spawn(socket.clone().watch_backlog(TIMEOUT));
        at(start, 3.0).await;
        drain(&socket);
        socket.emit("second").unwrap();
        at(start, 7.9).await;
        assert!(
            closed.lock().unwrap().is_empty(),
            "empty at 3 s: not before 8 s"
        );
        at(start, 8.1).await;
        assert_eq!(*closed.lock().unwrap(), [DisconnectReason::ClosingServer]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_timer_ends_with_an_empty_queue() {
        let (socket, closed) = socket(usize::MAX);
        let start = Instant::now();
        socket.emit("taken").unwrap();
        let timer = tokio::spawn(socket.clone().watch_backlog(TIMEOUT));
        at(start, 2.0).await;
        drain(&socket);
        at(start, 5.1).await;
        assert!(timer.is_finished());
        assert!(closed.lock().unwrap().is_empty());
        assert!(
            !socket.backlog.is_armed(),
            "the next packets that wait start a timer"
        );
    }

    #[tokio::test]
    async fn a_transport_waiting_for_packets_starts_no_timer() {
        let (socket, _) = socket(usize::MAX);
        socket.backlog.drainer_waits();
        socket.emit("taken at once").unwrap();
        assert!(!socket.backlog.is_armed());
        socket.backlog.drainer_leaves();
        socket.transport_progressed();
        assert!(
            socket.backlog.is_armed(),
            "left waiting when the transport went"
        );
    }

    #[tokio::test]
    async fn sends_past_the_bytes_are_refused_but_control_packets() {
        let (socket, _) = socket(10);
        socket.emit(Str::from("12345678")).unwrap();
        assert_eq!(socket.queued_bytes(), 9);
        assert!(socket.emit(Str::from("12")).is_err(), "11 bytes");
        assert!(socket.reserve().unwrap().has_room_for(1));
        assert!(!socket.reserve().unwrap().has_room_for(2));
        socket.send(Packet::Ping).unwrap();
        assert_eq!(socket.queued_bytes(), 10);
        assert!(socket.reserve().is_err(), "no room left");
        drain(&socket);
        assert_eq!(socket.queued_bytes(), 0);
        socket
            .emit(Str::from("a packet larger than the bound goes alone"))
            .unwrap();
    }

    #[tokio::test]
    async fn waiting_for_room_ends_as_the_queue_drains_or_the_socket_closes() {
        let (socket, _) = socket(usize::MAX);
        socket.emit("1234").unwrap();
        let soon = Duration::from_secs(1);
        let room = tokio::time::timeout(soon, socket.wait_for_room(usize::MAX, 5)).await;
        assert!(room.expect("room already"));
        let waiting = tokio::spawn({
            let socket = socket.clone();
            async move { socket.wait_for_room(usize::MAX, 0).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drain(&socket);
        let room = tokio::time::timeout(soon, waiting).await;
        assert!(room.expect("woken by the drain").unwrap());

        socket.emit("1234").unwrap();
        let waiting = tokio::spawn({
            let socket = socket.clone();
            async move { socket.wait_for_room(usize::MAX, 0).await }
        });
        tokio::task::yield_now().await;
        socket.cancellation_token.cancel();
        let room = tokio::time::timeout(soon, waiting).await;
        assert!(!room.expect("woken by the close").unwrap());
    }

    #[tokio::test]
    async fn waiting_for_room_counts_packets_too() {
        let (socket, _) = socket(usize::MAX);
        for _ in 0..3 {
            socket.emit("1").unwrap();
        }
        let soon = Duration::from_secs(1);
        let room = tokio::time::timeout(soon, socket.wait_for_room(3, usize::MAX)).await;
        assert!(room.expect("3 packets wait"));
        let waiting = tokio::spawn({
            let socket = socket.clone();
            async move { socket.wait_for_room(2, usize::MAX).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "3 packets wait, not 2");
        drain(&socket);
        let room = tokio::time::timeout(soon, waiting).await;
        assert!(room.expect("woken by the drain").unwrap());
    }

    #[test]
    fn a_send_over_the_limit_is_refused_unless_nothing_waits() {
        let backlog = Backlog::new();
        assert!(backlog.try_add(500, 0, 100).is_some(), "alone, it goes");
        assert!(backlog.try_add(1, 0, 100).is_none(), "behind it, nothing");
        backlog.sub(500);
        assert!(backlog.try_add(60, 0, 100).is_some());
        assert!(backlog.try_add(40, 0, 100).is_some(), "up to the limit");
        assert!(backlog.try_add(1, 0, 100).is_none());
        assert_eq!(backlog.bytes(), 100);
        backlog.sub(100);
        assert!(
            backlog.try_add(1, 100, 100).is_none(),
            "bytes elsewhere count"
        );
        assert_eq!(backlog.bytes(), 0);
    }

    #[test]
    fn packets_are_unattended_only_without_a_drainer_or_a_timer() {
        let backlog = Backlog::new();
        assert!(backlog.add(1).unattended());
        backlog.drainer_waits();
        assert!(!backlog.add(1).unattended());
        assert_eq!(backlog.drainer_leaves(), 2);
        assert!(backlog.arm());
        assert!(!backlog.arm(), "one timer at most");
        assert!(!backlog.add(1).unattended());
        backlog.disarm();
        assert!(backlog.add(1).unattended());
        assert_eq!(backlog.bytes(), 4);
    }
}
