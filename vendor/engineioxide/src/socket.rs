//! ## A [`Socket`] represents a client connection to the server
//!
//! It can be used to :
//! * Emit binary or string data
//! * Get a reference to the request made to connect to the socket.io server
//! * Close the connection
//!
//! #### Example :
//! ```rust
//! # use bytes::Bytes;
//! # use engineioxide::service::EngineIoService;
//! # use engineioxide::handler::EngineIoHandler;
//! # use engineioxide::{Socket, DisconnectReason, Str};
//! # use std::sync::{Mutex, Arc};
//! # use std::sync::atomic::{AtomicUsize, Ordering};
//! // Global state
//! #[derive(Debug, Default)]
//! struct MyHandler {
//!     user_cnt: AtomicUsize,
//! }
//!
//! // Socket state
//! #[derive(Debug, Default)]
//! struct SocketState {
//!     id: Mutex<String>,
//! }
//!
//! impl EngineIoHandler for MyHandler {
//!     type Data = SocketState;
//!
//!     fn on_connect(self: Arc<Self>, socket: Arc<Socket<SocketState>>) {
//!         // Get the request made to initialize the connection
//!         // and check that the authorization header is correct
//!         let connected = socket.req_parts.headers.get("Authorization")
//!             .map(|a| a == "mysuperpassword!").unwrap_or_default();
//!         // Close the socket if the authentication is invalid
//!         if !connected {
//!             socket.close(DisconnectReason::TransportError);
//!             return;
//!         }
//!
//!         let cnt = self.user_cnt.fetch_add(1, Ordering::Relaxed) + 1;
//!         // Emit string data to the client
//!         socket.emit(cnt.to_string()).ok();
//!     }
//!     fn on_disconnect(&self, socket: Arc<Socket<SocketState>>, reason: DisconnectReason) {
//!         let cnt = self.user_cnt.fetch_sub(1, Ordering::Relaxed) - 1;
//!     }
//!     fn on_message(self: &Arc<Self>, msg: Str, socket: Arc<Socket<SocketState>>) {
//!         *socket.data.id.lock().unwrap() = msg.into(); // bind a provided user id to a socket
//!     }
//!     fn on_binary(self: &Arc<Self>, data: Bytes, socket: Arc<Socket<SocketState>>) { }
//! }
//!
//! let svc = EngineIoService::new(Arc::new(MyHandler::default()));
//! ```
use std::{
    collections::VecDeque,
    fmt::Debug,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, AtomicU8, Ordering},
    },
    time::Duration,
};

use crate::{
    backlog::{Added, Backlog, batch_bytes},
    config::EngineIoConfig,
    errors::Error,
    transport::direct::{Direct, Outbox, SharedMessage, Waiting},
};
use bytes::Bytes;
use engineioxide_core::{Packet, PacketBuf, ProtocolVersion, Str, TransportType};
use futures_util::FutureExt;
use http::request::Parts;
use smallvec::{SmallVec, smallvec};
use tokio::sync::{
    Mutex, Notify,
    mpsc::{self, Receiver, error::TrySendError},
    watch,
};

pub use engineioxide_core::Sid;
use tokio_util::sync::CancellationToken;

/// A [`DisconnectReason`] represents the reason why a [`Socket`] was closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DisconnectReason {
    /// The client gracefully closed the connection
    TransportClose,
    /// The client sent multiple polling requests at the same time (it is forbidden according to the engine.io protocol)
    MultipleHttpPollingError,
    /// The client sent a bad request / the packet could not be parsed correctly
    PacketParsingError,
    /// An error occured in the transport layer
    /// (e.g. the client closed the connection without sending a close packet)
    TransportError,
    /// The client did not respond to the heartbeat
    HeartbeatTimeout,
    /// The server is being closed
    ClosingServer,
}

/// Convert an [`Error`] to a [`DisconnectReason`] if possible
/// This is used to notify the [`Handler`](crate::handler::EngineIoHandler) of the reason why a [`Socket`] was closed
/// If the error cannot be converted to a [`DisconnectReason`] it means that the error was not fatal and the [`Socket`] can be kept alive
impl From<&Error> for Option<DisconnectReason> {
    fn from(err: &Error) -> Self {
        use Error::*;
        match err {
            WsTransport(_) => Some(DisconnectReason::TransportError),
            BadPacket(_) | PacketParse(_) => Some(DisconnectReason::PacketParsingError),
            HeartbeatTimeout => Some(DisconnectReason::HeartbeatTimeout),
            _ => None,
        }
    }
}

/// What the internal channel carries. Boxed because a channel allocates its
/// first block of 32 slots when it is made: 32 pointers (256 bytes) per socket
/// rather than 32 `PacketBuf`s (5.3 KiB), resident for every idle socket.
pub(crate) type Queued = Box<PacketBuf>;

/// What the engine that owns a socket does for it: a socket keeps a
/// reference to it instead of a closure that only closes its session (which
/// cost an allocation per socket), and so can also read the configuration and
/// have its backlog watched (chat-ha patch; see vendor/README.md).
pub(crate) trait Sessions: Send + Sync + 'static {
    /// Closes the session `sid` (see [`EngineIo::close_session`](crate::engine::EngineIo::close_session)).
    fn close_session(&self, sid: Sid, reason: DisconnectReason);
    /// The engine's configuration.
    fn config(&self) -> &EngineIoConfig;
    /// Starts the backlog timer of the socket `sid` (see [`Socket::watch_backlog`]).
    fn watch_backlog(&self, sid: Sid);
}

/// The part of a [`Socket`] a [`Permit`] counts its packets in (chat-ha patch).
pub(crate) trait Queue: Send + Sync {
    /// Counts `bytes` about to enter the channel (see [`Backlog::add`]).
    fn add_queued(&self, bytes: usize);
    /// See [`Socket::has_room_for`].
    fn has_room_for(&self, bytes: usize) -> bool;
}

/// A permit to emit a message to the client.
/// A permit holds a place in the internal channel to send one packet to the client.
pub struct Permit<'a> {
    inner: mpsc::Permit<'a, Queued>,
    queue: &'a dyn Queue,
}
impl Permit<'_> {
    /// Whether the socket's queue has room for `bytes` more (see
    /// [`Socket::has_room_for`]): a permit holds a place for a packet, not
    /// its bytes, which are known only once it is encoded.
    ///
    /// (chat-ha patch; see vendor/README.md)
    pub fn has_room_for(&self, bytes: usize) -> bool {
        self.queue.has_room_for(bytes)
    }

    fn send(self, packets: PacketBuf) {
        self.queue.add_queued(batch_bytes(&packets));
        self.inner.send(Box::new(packets));
    }

    /// Consume the permit and emit a message to the client.
    #[inline]
    pub fn emit(self, msg: Str) {
        self.send(smallvec![Packet::Message(msg)]);
    }
    /// Consume the permit and emit a binary message to the client.
    #[inline]
    pub fn emit_binary(self, data: Bytes) {
        self.send(smallvec![Packet::Binary(data)]);
    }

    /// Consume the permit and emit a message with multiple binary data to the client.
    ///
    /// It can be used to ensure atomicity when sending a string packet with adjacent binary packets.
    pub fn emit_many(self, msg: Str, data: VecDeque<Bytes>) {
        let mut packets = SmallVec::with_capacity(data.len() + 1);
        packets.push(Packet::Message(msg));
        for d in data {
            packets.push(Packet::Binary(d));
        }
        self.send(packets);
    }

    /// Consume the permit and emit a message with multiple binary data to the client.
    ///
    /// It can be used to ensure atomicity when sending a string packet with adjacent binary packets.
    pub fn emit_many_binary(self, bin: Bytes, data: Vec<Bytes>) {
        let mut packets = SmallVec::with_capacity(data.len() + 1);
        packets.push(Packet::Binary(bin));
        for d in data {
            packets.push(Packet::Binary(d));
        }
        self.send(packets);
    }
}

#[derive(Debug)]
pub(crate) struct InternalRx {
    pub buffered_rx: Receiver<Queued>,
    pub peeked_packet: Option<PacketBuf>,
    pub volatile_rx: watch::Receiver<Option<PacketBuf>>,
}

impl InternalRx {
    fn new(
        buffered_rx: Receiver<Queued>,
        volatile_rx: watch::Receiver<Option<PacketBuf>>,
    ) -> Self {
        Self {
            buffered_rx,
            peeked_packet: None,
            volatile_rx,
        }
    }
}

/// A [`Socket`] represents a client connection to the server.
/// It is agnostic to the [`TransportType`].
///
/// It handles :
/// * the packet communication between with the `Engine`
///   and the user defined [`Handler`](crate::handler::EngineIoHandler).
/// * the user defined [`Data`](crate::handler::EngineIoHandler::Data) bound to the socket.
/// * the heartbeat job that verify that the connection is still up by sending packets periodically.
pub struct Socket<D>
where
    D: Default + Send + Sync + 'static,
{
    /// The socket id
    pub id: Sid,

    /// The protocol version used by the socket
    pub protocol: ProtocolVersion,

    /// The transport type represented as a bitfield
    /// It is represented as a bitfield to allow the use of an [`AtomicU8`] so it can be shared between threads
    /// without any mutex
    transport: AtomicU8,

    /// Whether the socket is currently upgrading to a new transport.
    upgrading: AtomicBool,

    /// Channel to send [`PacketBuf`] to the connection
    ///
    /// It is used and managed by the [`EngineIo`](crate::engine) struct depending on the transport type
    ///
    /// It is locked if [`EngineIo`](crate::engine) is currently reading from it :
    /// * In case of polling transport it will be locked and released for each request
    /// * In case of websocket transport it will always be locked until the connection is closed
    ///
    /// Closing behavior is driven by the [`Socket::cancellation_token`].
    ///
    /// The channel is made of a [`SmallVec`] of [`Packet`]s so that adjacent packets can be sent atomically.
    pub(crate) internal_rx: Mutex<InternalRx>,

    /// Channel to send [PacketBuf] to the internal connection
    pub(crate) internal_tx: mpsc::Sender<Queued>,

    /// The bytes in the channel, and the timer that lets go of a transport
    /// that stays behind (chat-ha patch; see vendor/README.md).
    pub(crate) backlog: Backlog,

    /// The websocket's frames waiting to be written, once a websocket writer
    /// that writes directly runs (chat-ha patch; see vendor/README.md).
    pub(crate) outbox: OnceLock<Arc<Outbox>>,

    /// Channel to send volatile [PacketBuf]s that bypass the internal buffer.
    /// Uses a [`watch`](tokio::sync::watch) channel so only the latest volatile
    /// message is retained; subsequent volatile sends overwrite the previous one.
    volatile_tx: watch::Sender<Option<PacketBuf>>,

    /// Signals a Pong [`Packet`] (v4 protocol) or Ping (v3 protocol) from the connection to the
    /// heartbeat job, which is running in a separate task. Holds at most one unconsumed signal, as
    /// the channel of capacity 1 it replaces did (a channel costs ~600 bytes per socket).
    pub(crate) heartbeat: Notify,

    /// A cancellation token that will be triggered when the socket is being closed.
    pub(crate) cancellation_token: CancellationToken,

    /// The engine that owns the socket, which closes it.
    engine: Arc<dyn Sessions>,
    /// User data bound to the socket
    pub data: D,

    /// Http Request data used to create a socket
    pub req_parts: Parts,

    /// If the client supports binary packets (via polling XHR2)
    pub(crate) supports_binary: bool,
}

impl<D> Socket<D>
where
    D: Default + Send + Sync + 'static,
{
    pub(crate) fn new(
        protocol: ProtocolVersion,
        transport: TransportType,
        engine: Arc<dyn Sessions>,
        req_parts: Parts,
        supports_binary: bool,
    ) -> Self {
        let (internal_tx, internal_rx) = mpsc::channel(engine.config().max_buffer_size);
        let (volatile_tx, volatile_rx) = watch::channel(None);

        Self {
            id: Sid::new(),
            protocol,
            transport: AtomicU8::new(transport as u8),
            upgrading: AtomicBool::new(false),

            internal_rx: Mutex::new(InternalRx::new(internal_rx, volatile_rx)),
            internal_tx,
            backlog: Backlog::new(),
            outbox: OnceLock::new(),

            volatile_tx,

            heartbeat: Notify::new(),
            cancellation_token: CancellationToken::new(),

            engine,

            data: D::default(),
            req_parts,

            supports_binary,
        }
    }

    /// Sends a control packet to the connection: counted in the bytes that
    /// wait, but never refused for them.
    pub(crate) fn send(&self, packet: Packet) -> Result<(), TrySendError<Packet>> {
        self.enqueue(packet, false)
    }

    /// Queues `packet` in the channel. If `limited`, refuses it (full) when
    /// the queue would then hold more than the configured bytes.
    fn enqueue(&self, packet: Packet, limited: bool) -> Result<(), TrySendError<Packet>> {
        #[cfg(feature = "tracing")]
        tracing::debug!(?packet, "sending packet");

        let bytes = crate::backlog::packet_bytes(&packet);
        let added = if limited {
            let added = self
                .backlog
                .try_add(bytes, self.outbox_bytes(), self.max_bytes());
            match added {
                Some(added) => added,
                None => return Err(TrySendError::Full(packet)),
            }
        } else {
            self.backlog.add(bytes)
        };
        if let Err(e) = self.internal_tx.try_send(Box::new(smallvec![packet])) {
            self.backlog.sub(bytes);
            return Err(match e {
                TrySendError::Full(p) => TrySendError::Full(p.into_iter().next().unwrap()),
                TrySendError::Closed(p) => TrySendError::Closed(p.into_iter().next().unwrap()),
            });
        }
        self.after_enqueue(added);
        Ok(())
    }

    /// Queues `packet` in the channel, waiting for a place: a control packet,
    /// as [`Socket::send`].
    pub(crate) async fn send_waiting(&self, packet: Packet) -> Result<(), ()> {
        let bytes = crate::backlog::packet_bytes(&packet);
        let added = self.backlog.add(bytes);
        if self
            .internal_tx
            .send(Box::new(smallvec![packet]))
            .await
            .is_err()
        {
            self.backlog.sub(bytes);
            return Err(());
        }
        self.after_enqueue(added);
        Ok(())
    }
    pub(crate) fn is_upgrading(&self) -> bool {
        self.upgrading.load(Ordering::Relaxed)
    }
    pub(crate) fn start_upgrade(&self) {
        self.upgrading.store(true, Ordering::Relaxed);
    }

    /// Spawn the heartbeat job
    ///
    /// Keep a handle to the job so that it can be aborted when the socket is closed
    pub(crate) fn spawn_heartbeat(self: Arc<Self>, interval: Duration, timeout: Duration) {
        // One `select!` rather than `run_until_cancelled_owned`, whose nested
        // futures made this task, which lives as long as the socket, ~3 times larger.
        tokio::spawn(async move {
            let _aborted = tokio::select! {
                biased;
                _ = self.cancellation_token.cancelled() => true,
                result = self.heartbeat_job(interval, timeout) => {
                    if let Err(_e) = result {
                        self.close(DisconnectReason::HeartbeatTimeout);
                        #[cfg(feature = "tracing")]
                        tracing::debug!(id = ?self.id, "heartbeat error: {_e}");
                    }
                    false
                }
            };
            #[cfg(feature = "tracing")]
            tracing::debug!(aborted = _aborted, "heartbeat job completed");
        });
    }

    /// Heartbeat is sent every `interval` milliseconds by the client and the server `is` expected to respond within `timeout` milliseconds.
    ///
    /// If the client or server does not respond within the timeout, the connection is closed.
    #[cfg(feature = "v3")]
    async fn heartbeat_job(&self, interval: Duration, timeout: Duration) -> Result<(), Error> {
        match self.protocol {
            ProtocolVersion::V3 => self.heartbeat_job_v3(interval, timeout).await,
            ProtocolVersion::V4 => self.heartbeat_job_v4(interval, timeout).await,
        }
    }

    /// Heartbeat is sent every `interval` milliseconds and the client is expected to respond within `timeout` milliseconds.
    ///
    /// If the client does not respond within the timeout, the connection is closed.
    #[cfg(not(feature = "v3"))]
    async fn heartbeat_job(&self, interval: Duration, timeout: Duration) -> Result<(), Error> {
        self.heartbeat_job_v4(interval, timeout).await
    }

    /// Heartbeat is sent every `interval` milliseconds and the client is expected to respond within `timeout` milliseconds.
    ///
    /// If the client does not respond within the timeout, the connection is closed.
    async fn heartbeat_job_v4(&self, interval: Duration, timeout: Duration) -> Result<(), Error> {
        #[cfg(feature = "tracing")]
        tracing::debug!(sid = ?self.id, "heartbeat sender routine started");

        // The first ping goes out one interval after the handshake, as the
        // Engine.IO protocol has it (chat-ha patch: a plain `interval` ticks at
        // once, so every connection began with a ping and its pong).
        let first = tokio::time::Instant::now() + interval;
        let mut interval_tick = tokio::time::interval_at(first, interval);
        interval_tick.tick().await;
        // Some clients send the pong packet in first. If that happens, we should consume it.
        self.heartbeat.notified().now_or_never();
        loop {
            // If we are currently upgrading we should pause the heartbeat process
            if self.is_upgrading() {
                interval_tick.tick().await;
                continue;
            }

            #[cfg(feature = "tracing")]
            tracing::trace!(sid = ?self.id, "emitting ping");

            self.send(Packet::Ping)
                .map_err(|_| Error::HeartbeatTimeout)?;

            #[cfg(feature = "tracing")]
            tracing::trace!(sid = ?self.id, "waiting for pong");

            tokio::time::timeout(timeout, self.heartbeat.notified())
                .await
                .map_err(|_| Error::HeartbeatTimeout)?;

            #[cfg(feature = "tracing")]
            tracing::trace!(sid = ?self.id, "pong received");

            interval_tick.tick().await;
        }
    }

    #[cfg(feature = "v3")]
    async fn heartbeat_job_v3(&self, interval: Duration, timeout: Duration) -> Result<(), Error> {
        #[cfg(feature = "tracing")]
        tracing::debug!(sid = ?self.id, "heartbeat receiver routine started");

        loop {
            tokio::time::timeout(interval + timeout, self.heartbeat.notified())
                .await
                .map_err(|_| Error::HeartbeatTimeout)?;

            #[cfg(feature = "tracing")]
            tracing::trace!(sid = ?self.id, "ping received, sending pong");
            self.send(Packet::Pong)
                .map_err(|_| Error::HeartbeatTimeout)?;
        }
    }

    /// Returns true if the [`Socket`] has a websocket [`TransportType`]
    pub(crate) fn is_ws(&self) -> bool {
        self.transport.load(Ordering::Relaxed) == TransportType::Websocket as u8
    }
    /// returns true if the [`Socket`] has an HTTP [`TransportType`]
    pub(crate) fn is_http(&self) -> bool {
        self.transport.load(Ordering::Relaxed) == TransportType::Polling as u8
    }

    /// Sets the [`TransportType`] to WebSocket
    /// Used when the client upgrade the connection from HTTP to WebSocket
    pub(crate) fn upgrade_to_websocket(&self) {
        self.upgrading.store(false, Ordering::Relaxed);
        self.transport
            .store(TransportType::Websocket as u8, Ordering::Relaxed);
    }

    /// Returns the current [`TransportType`] of the [`Socket`]
    pub fn transport_type(&self) -> TransportType {
        TransportType::from(self.transport.load(Ordering::Relaxed))
    }

    /// Packets waiting for the client: in the buffer, or written but not yet
    /// taken by the kernel.
    ///
    /// (chat-ha patch; see vendor/README.md)
    pub fn queued(&self) -> usize {
        let buffered = self.internal_tx.max_capacity() - self.internal_tx.capacity();
        buffered + self.outbox.get().map_or(0, |outbox| outbox.queued())
    }

    /// Bytes waiting for the client: the packets in the buffer (their
    /// Engine.IO encoding), and on a websocket written directly, the frames
    /// the kernel did not take yet.
    ///
    /// (chat-ha patch; see vendor/README.md)
    pub fn queued_bytes(&self) -> usize {
        self.backlog.bytes() + self.outbox_bytes()
    }

    /// Whether `bytes` more may wait for the client: if nothing waits, or
    /// if the bytes waiting would stay within
    /// [`EngineIoConfig::max_buffer_bytes`].
    ///
    /// (chat-ha patch; see vendor/README.md)
    pub fn has_room_for(&self, bytes: usize) -> bool {
        let waiting = self.queued_bytes();
        waiting == 0 || waiting.saturating_add(bytes) <= self.max_bytes()
    }

    /// Resolves to `true` once at most `packets` packets and `bytes` bytes
    /// wait for the client (see [`Socket::queued`] and
    /// [`Socket::queued_bytes`]), or to `false` if the socket closes first.
    /// Woken by the transport as it drains the queue, not by polling: a
    /// server can send a long history in pages, each once the previous one
    /// has mostly gone. Both bounds count: a sender that bounds a socket's
    /// backlog in packets must not fill it past that in small packets.
    ///
    /// (chat-ha patch; see vendor/README.md)
    pub async fn wait_for_room(&self, packets: usize, bytes: usize) -> bool {
        let waiter = self.backlog.room_waiter();
        loop {
            let notified = waiter.notified();
            tokio::pin!(notified);
            // Enabled before looking, so that a drain after the look wakes it.
            notified.as_mut().enable();
            if self.cancellation_token.is_cancelled() {
                return false;
            }
            if self.queued() <= packets && self.queued_bytes() <= bytes {
                return true;
            }
            tokio::select! {
                _ = notified => {}
                _ = self.cancellation_token.cancelled() => return false,
            }
        }
    }

    fn outbox_bytes(&self) -> usize {
        self.outbox.get().map_or(0, |outbox| outbox.queued_bytes())
    }

    fn max_bytes(&self) -> usize {
        self.engine.config().max_buffer_bytes
    }

    /// Packets were counted in the channel: if no transport waits to take
    /// them, they wait, and the backlog timer must run.
    fn after_enqueue(&self, added: Added) {
        if added.unattended() {
            self.backlogged();
        }
    }

    /// Packets wait for the client: starts the backlog timer unless one runs
    /// (or none is configured).
    fn backlogged(&self) {
        if self.backlog.is_armed() {
            return;
        }
        if self.engine.config().backlog_timeout == Duration::MAX {
            return;
        }
        if self.backlog.arm() {
            self.engine.watch_backlog(self.id);
        }
    }

    /// A transport took or wrote packets, or stopped waiting for them: starts
    /// the backlog timer if packets still wait, or notes that the queue is
    /// empty; wakes the tasks waiting for room.
    pub(crate) fn transport_progressed(&self) {
        if self.queued_bytes() > 0 {
            self.backlogged();
        } else {
            self.backlog.emptied();
        }
        self.backlog.drained();
    }

    /// The backlog timer: closes the transport once its queue has not been
    /// empty for `timeout` (see the module `backlog`). Runs from the moment
    /// the queue is seen backlogged until it is seen empty when the timer
    /// expires, or the socket closes.
    pub(crate) async fn watch_backlog(self: Arc<Self>, timeout: Duration) {
        let mut since = tokio::time::Instant::now();
        loop {
            let Some(deadline) = since.checked_add(timeout) else {
                return;
            };
            tokio::select! {
                _ = self.cancellation_token.cancelled() => return,
                _ = tokio::time::sleep_until(deadline) => {}
            }
            if self.queued_bytes() == 0 {
                self.backlog.disarm();
                // Packets queued while the timer still ran started no other:
                // they are watched from now on.
                if self.queued_bytes() == 0 || !self.backlog.arm() {
                    return;
                }
                since = tokio::time::Instant::now();
            } else if let Some(emptied) = self.backlog.last_emptied().filter(|e| *e > since) {
                since = emptied;
            } else {
                #[cfg(feature = "tracing")]
                tracing::debug!(sid = ?self.id, ?timeout, "backlogged for too long, closing");
                self.close(DisconnectReason::ClosingServer);
                return;
            }
        }
    }

    /// Emits messages framed once for many sockets, all or none, unless more
    /// than `backlog` packets would then wait for the client (see
    /// [`Socket::queued`]; the buffer's size is the most), or more than
    /// [`EngineIoConfig::max_buffer_bytes`] bytes. On a websocket
    /// whose connection allows it, they are written at once, unless packets
    /// wait before them; otherwise they are queued as [`Socket::emit`]
    /// queues. Fails as [`Socket::emit`] does, with the buffer full (or the
    /// backlog reached) or the socket closed.
    ///
    /// (chat-ha patch; see vendor/README.md)
    pub fn emit_shared(
        &self,
        msg: &SharedMessage,
        backlog: usize,
    ) -> Result<(), TrySendError<()>> {
        let backlog = backlog.min(self.internal_tx.max_capacity());
        let max_bytes = self.max_bytes();
        // What waits in the outbox; the channel is counted below.
        let mut waiting = Waiting::default();
        if let Some(outbox) = self.outbox.get() {
            match outbox.send_direct(msg, &self.internal_tx, backlog, max_bytes) {
                Direct::Sent => return Ok(()),
                Direct::Full => return Err(TrySendError::Full(())),
                Direct::Closed => return Err(TrySendError::Closed(())),
                Direct::Behind(outbox) => waiting = outbox,
            }
        }
        let buffered = self.internal_tx.max_capacity() - self.internal_tx.capacity();
        if buffered + waiting.packets + msg.len() > backlog {
            return Err(TrySendError::Full(()));
        }
        let bytes = msg.texts.iter().map(|text| 1 + text.len()).sum();
        let added = self
            .backlog
            .try_add(bytes, waiting.bytes, max_bytes)
            .ok_or(TrySendError::Full(()))?;
        let permits = match self.internal_tx.try_reserve_many(msg.len()) {
            Ok(permits) => permits,
            Err(e) => {
                self.backlog.sub(bytes);
                return Err(e);
            }
        };
        for (permit, text) in permits.zip(&msg.texts) {
            permit.send(Box::new(smallvec![Packet::Message(text.clone())]));
        }
        self.after_enqueue(added);
        Ok(())
    }

    /// Reserve `n` permits to emit multiple messages and ensure that there is enough
    /// space in the internal chan.
    ///
    /// If the internal chan is full, the function will return a [`TrySendError::Full`] error.
    /// If the socket is closed, the function will return a [`TrySendError::Closed`] error.
    ///
    /// Fails as full too when the bytes waiting reach
    /// [`EngineIoConfig::max_buffer_bytes`]; see [`Permit::has_room_for`]
    /// for the bytes of the packet itself.
    #[inline]
    pub fn reserve(&self) -> Result<Permit<'_>, TrySendError<()>> {
        if !self.has_room_for(1) {
            return Err(TrySendError::Full(()));
        }
        let permit = self.internal_tx.try_reserve()?;
        Ok(Permit {
            inner: permit,
            queue: self,
        })
    }

    /// Emits a message to the client.
    ///
    /// If the transport is in websocket mode, the message is directly sent as a text frame.
    ///
    /// If the transport is in polling mode, the message is buffered and sent as a text frame to the next polling request.
    ///
    /// ⚠️ If the buffer is full or the socket is disconnected, an error will be returned with the original data
    pub fn emit(&self, msg: impl Into<Str>) -> Result<(), TrySendError<Str>> {
        self.enqueue(Packet::Message(msg.into()), true)
            .map_err(|e| match e {
                TrySendError::Full(p) => TrySendError::Full(p.into_message()),
                TrySendError::Closed(p) => TrySendError::Closed(p.into_message()),
            })
    }

    /// Immediately closes the socket and the underlying connection.
    /// The socket will be removed from the `Engine` and the [`Handler`](crate::handler::EngineIoHandler) will be notified.
    #[cfg_attr(feature = "tracing", tracing::instrument(skip(self)))]
    pub fn close(&self, reason: DisconnectReason) {
        // Try to send a close packet is the connection is still operational.
        self.send(Packet::Close).ok();

        self.engine.close_session(self.id, reason);
    }

    /// Returns true if the socket is closed
    /// It means that no more packets can be sent to the client
    pub fn is_closed(&self) -> bool {
        self.internal_tx.is_closed()
    }

    /// Wait for the socket to be fully closed
    pub async fn closed(&self) {
        self.internal_tx.closed().await
    }

    /// Emits a binary message to the client.
    ///
    /// If the transport is in websocket mode, the message is directly sent as a binary frame.
    ///
    /// If the transport is in polling mode, the message is buffered and sent as a text frame **encoded in base64** to the next polling request.
    ///
    /// ⚠️ If the buffer is full or the socket is disconnected, an error will be returned with the original data
    pub fn emit_binary<B: Into<Bytes>>(&self, data: B) -> Result<(), TrySendError<Bytes>> {
        if self.protocol == ProtocolVersion::V3 {
            self.enqueue(Packet::BinaryV3(data.into()), true)
        } else {
            self.enqueue(Packet::Binary(data.into()), true)
        }
        .map_err(|e| match e {
            TrySendError::Full(p) => TrySendError::Full(p.into_binary()),
            TrySendError::Closed(p) => TrySendError::Closed(p.into_binary()),
        })
    }

    /// Try to send a volatile message bypassing the internal buffer channel.
    /// Volatile messages may be dropped if the transport is not ready to
    /// receive them.
    ///
    /// Because volatile messages bypass the main mpsc buffer queue, they may
    /// arrive out of order relative to regular messages.
    ///
    /// Returns `true` if the message was queued for sending, `false` if it
    /// was dropped (channel full or transport shutting down).
    #[inline]
    pub fn emit_volatile(&self, msg: impl Into<Str>) -> bool {
        self.send_volatile(smallvec![Packet::Message(msg.into())])
    }

    /// Try to send a volatile binary message bypassing the internal buffer channel.
    /// Volatile messages may be dropped if the transport is not ready to
    /// receive them.
    ///
    /// Returns `true` if the message was queued for sending, `false` if it
    /// was dropped.
    #[inline]
    pub fn emit_binary_volatile<B: Into<Bytes>>(&self, data: B) -> bool {
        if self.protocol == ProtocolVersion::V3 {
            self.send_volatile(smallvec![Packet::BinaryV3(data.into())])
        } else {
            self.send_volatile(smallvec![Packet::Binary(data.into())])
        }
    }

    /// Try to send a volatile message with multiple adjacent binary payloads.
    /// The message and all binary payloads are sent atomically as a single
    /// volatile write.
    ///
    /// Returns `true` if the message was queued for sending, `false` if it
    /// was dropped.
    #[inline]
    pub fn emit_many_volatile(&self, msg: Str, data: VecDeque<Bytes>) -> bool {
        let mut packets = SmallVec::with_capacity(1 + data.len());
        packets.push(Packet::Message(msg));
        for bin in data {
            packets.push(Packet::Binary(bin));
        }
        self.send_volatile(packets)
    }

    pub(crate) fn send_volatile(&self, packets: PacketBuf) -> bool {
        self.volatile_tx.send(Some(packets)).is_ok()
    }
}

impl<D: Default + Send + Sync + 'static> Queue for Socket<D> {
    fn add_queued(&self, bytes: usize) {
        let added = self.backlog.add(bytes);
        self.after_enqueue(added);
    }
    fn has_room_for(&self, bytes: usize) -> bool {
        Socket::has_room_for(self, bytes)
    }
}

impl<D: Default + Send + Sync + 'static> std::fmt::Debug for Socket<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Socket")
            .field("sid", &self.id)
            .field("protocol", &self.protocol)
            .field("conn", &self.transport)
            .field("internal_rx", &self.internal_rx)
            .field("internal_tx", &self.internal_tx)
            .field("heartbeat", &self.heartbeat)
            .field("cancellation_token", &self.cancellation_token)
            .field("req_data", &self.req_parts)
            .finish()
    }
}

#[doc(hidden)]
#[cfg(feature = "__test_harness")]
impl<D> Drop for Socket<D>
where
    D: Default + Send + Sync + 'static,
{
    fn drop(&mut self) {
        #[cfg(feature = "tracing")]
        tracing::debug!("[sid={}] dropping socket", self.id);
    }
}

#[doc(hidden)]
#[cfg(feature = "__test_harness")]
impl<D> Socket<D>
where
    D: Default + Send + Sync + 'static,
{
    /// Create a dummy socket for testing purpose
    pub fn new_dummy(
        sid: Sid,
        close_fn: Box<dyn Fn(Sid, DisconnectReason) + Send + Sync>,
    ) -> Arc<Socket<D>> {
        let (s, mut rx) = Socket::new_dummy_piped(sid, close_fn, 1024);
        tokio::spawn(async move {
            while let Some(_el) = rx.recv().await {
                #[cfg(feature = "tracing")]
                tracing::debug!(?sid, ?_el, "emitting eio msg");
            }
        });
        s
    }

    /// Create a dummy socket for testing purpose with a
    /// receiver to get the packets sent to the client
    pub fn new_dummy_piped(
        sid: Sid,
        close_fn: Box<dyn Fn(Sid, DisconnectReason) + Send + Sync>,
        buffer_size: usize,
    ) -> (Arc<Socket<D>>, tokio::sync::mpsc::Receiver<Packet>) {
        let (internal_tx, internal_rx) = mpsc::channel(buffer_size);
        let (volatile_tx, volatile_rx) = watch::channel(None);

        let sock = Self {
            id: sid,
            protocol: ProtocolVersion::V4,
            transport: AtomicU8::new(TransportType::Websocket as u8),
            upgrading: AtomicBool::new(false),

            internal_rx: Mutex::new(InternalRx::new(internal_rx, volatile_rx)),
            internal_tx,
            backlog: Backlog::new(),
            outbox: OnceLock::new(),

            volatile_tx,

            heartbeat: Notify::new(),
            cancellation_token: CancellationToken::new(),
            engine: ClosingWith::sessions(close_fn, EngineIoConfig::default()),

            data: D::default(),
            req_parts: http::Request::<()>::default().into_parts().0,

            supports_binary: true,
        };
        let sock = Arc::new(sock);

        let (tx, rx) = mpsc::channel(buffer_size);
        let sock_clone = sock.clone();
        tokio::spawn(async move {
            let mut internal_rx = sock_clone.internal_rx.try_lock().unwrap();
            while let Some(packets) = internal_rx.buffered_rx.recv().await {
                sock_clone.backlog.sub(batch_bytes(&packets));
                sock_clone.transport_progressed();
                for packet in *packets {
                    tx.send(packet).await.unwrap();
                }
            }
        });

        (sock, rx)
    }
}

/// Sessions that are only closed, with a closure, for sockets made without
/// an engine (tests).
#[cfg(any(test, feature = "__test_harness"))]
pub(crate) struct ClosingWith {
    close_fn: Box<dyn Fn(Sid, DisconnectReason) + Send + Sync>,
    config: EngineIoConfig,
}

#[cfg(any(test, feature = "__test_harness"))]
impl ClosingWith {
    pub(crate) fn sessions(
        close_fn: Box<dyn Fn(Sid, DisconnectReason) + Send + Sync>,
        config: EngineIoConfig,
    ) -> Arc<dyn Sessions> {
        Arc::new(ClosingWith { close_fn, config })
    }
}

#[cfg(any(test, feature = "__test_harness"))]
impl Sessions for ClosingWith {
    fn close_session(&self, sid: Sid, reason: DisconnectReason) {
        (self.close_fn)(sid, reason)
    }
    fn config(&self) -> &EngineIoConfig {
        &self.config
    }
    fn watch_backlog(&self, _sid: Sid) {}
}

/// The heartbeat of each protocol (chat-ha patch; see vendor/README.md).
/// Engine.IO 4: the server pings, first one interval after the handshake,
/// and the client answers. Engine.IO 3, the reverse: the client pings every
/// interval, the server answers each ping with a pong and pings never.
/// Either way a client that stops for longer than the protocol allows is
/// closed, and one that keeps to it is not.
#[cfg(test)]
mod heartbeat_tests {
    use std::sync::Mutex as StdMutex;

    use http::Request;
    use tokio::time::Instant;

    use super::*;

    const INTERVAL: Duration = Duration::from_secs(10);
    const TIMEOUT: Duration = Duration::from_secs(5);

    type Closed = Arc<StdMutex<Vec<DisconnectReason>>>;

    /// A socket of `protocol` with its heartbeat running, and the reasons
    /// it was closed for.
    fn socket(protocol: ProtocolVersion) -> (Arc<Socket<()>>, Closed) {
        let closed = Arc::new(StdMutex::new(Vec::new()));
        let record = closed.clone();
        let sessions = ClosingWith::sessions(
            Box::new(move |_, reason| record.lock().unwrap().push(reason)),
            EngineIoConfig::default(),
        );
        let socket = Arc::new(Socket::new(
            protocol,
            TransportType::Websocket,
            sessions,
            Request::<()>::default().into_parts().0,
            false,
        ));
        socket.clone().spawn_heartbeat(INTERVAL, TIMEOUT);
        (socket, closed)
    }

    /// Lets the clock reach `start + secs` (time is paused: it jumps), and
    /// the heartbeat task run.
    async fn at(start: Instant, secs: f64) {
        tokio::time::sleep_until(start + Duration::from_secs_f64(secs)).await;
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    /// The packets the server queued for the client since the last look, as text.
    fn sent(socket: &Socket<()>) -> Vec<String> {
        let mut rx = socket.internal_rx.try_lock().unwrap();
        let mut packets = Vec::new();
        while let Ok(batch) = rx.buffered_rx.try_recv() {
            packets.extend(batch.into_iter().map(String::from));
        }
        packets
    }

    #[tokio::test(start_paused = true)]
    async fn engine_io_4_the_server_pings_one_interval_after_the_handshake() {
        let (socket, closed) = socket(ProtocolVersion::V4);
        let start = Instant::now();
        at(start, 9.9).await;
        assert_eq!(sent(&socket), Vec::<String>::new(), "no ping before one interval");
        at(start, 10.0).await;
        assert_eq!(sent(&socket), ["2"], "the first ping");
        socket.heartbeat.notify_one(); // the client's pong
        at(start, 20.0).await;
        assert_eq!(sent(&socket), ["2"], "the second ping, one interval later");
        at(start, 24.9).await;
        assert!(closed.lock().unwrap().is_empty(), "still within the timeout");
        at(start, 25.1).await;
        assert_eq!(*closed.lock().unwrap(), [DisconnectReason::HeartbeatTimeout]);
    }

    #[cfg(feature = "v3")]
    #[tokio::test(start_paused = true)]
    async fn engine_io_3_the_server_answers_pings_and_never_pings() {
        let (socket, closed) = socket(ProtocolVersion::V3);
        let start = Instant::now();
        // A client that pings every interval, for a while: each ping is
        // answered with a pong, and nothing else is sent.
        for round in 1..=5 {
            let ping_at = 10.0 * f64::from(round);
            at(start, ping_at - 0.1).await;
            let unasked = sent(&socket);
            assert!(unasked.is_empty(), "round {round}: sent unasked: {unasked:?}");
            at(start, ping_at).await;
            socket.heartbeat.notify_one(); // the client's ping
            at(start, ping_at + 0.01).await;
            assert_eq!(sent(&socket), ["3"], "round {round}: the pong");
        }
        assert!(closed.lock().unwrap().is_empty(), "a client that pings stays");
        // Then it stops: closed once interval + timeout pass without a ping.
        at(start, 50.0 + 14.9).await;
        let within = closed.lock().unwrap().is_empty();
        assert!(within, "still within interval + timeout");
        at(start, 50.0 + 15.1).await;
        assert_eq!(*closed.lock().unwrap(), [DisconnectReason::HeartbeatTimeout]);
    }
}
