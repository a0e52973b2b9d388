//! Writing to a websocket from whichever task has something to send
//! (chat-ha patch; see vendor/README.md).
//!
//! Upstream, every packet goes through the socket's channel to a writer task,
//! which turns it into a new string, frames it, and writes it through the
//! split websocket's lock. A server that sends one message to many sockets
//! pays all of that once per socket. Here, a websocket upgraded from a
//! [`TcpConnection`] has an [`Outbox`]: a frame goes straight to the TCP
//! socket when nothing waits before it, and what the kernel does not take
//! waits in the outbox for the connection's writer task. A message framed
//! once ([`SharedMessage`]) is then written to each socket as it is, with one
//! system call and no copy.
//!
//! Order is kept: a frame is written directly only while the socket's channel
//! is empty and nothing is reserved in it, and the writer task moves packets
//! from the channel to the outbox under the outbox's lock.

use std::any::Any;
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker, ready};

use bytes::{BufMut, Bytes, BytesMut};
use engineioxide_core::{Packet, ProtocolVersion, Str};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::backlog::{Backlog, batch_bytes};
use crate::socket::Queued;

/// A server's accepted TCP connection, for hyper to serve in place of the
/// bare stream: a websocket upgraded from it is written to directly.
/// `guard` is kept as long as the connection lives, whatever it becomes
/// (an HTTP connection, a websocket).
pub struct TcpConnection {
    stream: TcpStream,
    guard: Box<dyn Any + Send + Sync>,
}

impl TcpConnection {
    /// Wraps an accepted stream; `guard` is dropped when the connection closes.
    pub fn new(stream: TcpStream, guard: impl Any + Send + Sync) -> Self {
        TcpConnection {
            stream,
            guard: Box::new(guard),
        }
    }

    pub(crate) fn into_parts(self) -> (TcpStream, Box<dyn Any + Send + Sync>) {
        (self.stream, self.guard)
    }
}

impl AsyncRead for TcpConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TcpConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Engine.IO message packets framed once, as websocket text frames, for
/// every socket they are sent to; written to a websocket at once.
#[derive(Debug, Clone)]
pub struct SharedMessage {
    pub(crate) texts: Vec<Str>,
    pub(crate) frames: Bytes,
}

impl SharedMessage {
    /// Frames the message `text` (without the Engine.IO packet type).
    pub fn new(text: Str) -> Self {
        let mut frames = BytesMut::with_capacity(text.len() + 11);
        put_frame(&mut frames, TEXT, &[b"4", text.as_bytes()]);
        SharedMessage {
            texts: vec![text],
            frames: frames.freeze(),
        }
    }

    /// The messages of `messages`, in order, as one.
    pub fn join<'a>(messages: impl IntoIterator<Item = &'a SharedMessage>) -> Self {
        let mut texts = Vec::new();
        let mut frames = BytesMut::new();
        for message in messages {
            texts.extend(message.texts.iter().cloned());
            frames.extend_from_slice(&message.frames);
        }
        SharedMessage {
            texts,
            frames: frames.freeze(),
        }
    }

    /// How many messages this is.
    pub fn len(&self) -> usize {
        self.texts.len()
    }

    /// Whether this holds no message.
    pub fn is_empty(&self) -> bool {
        self.texts.is_empty()
    }
}

const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
/// A close frame without a status code, as tungstenite's `close(None)` sends.
const CLOSE: &[u8] = &[0x88, 0x00];

/// Appends one final, unmasked (server) frame made of `parts` to `out`.
fn put_frame(out: &mut BytesMut, opcode: u8, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    out.put_u8(0x80 | opcode);
    match len {
        0..=125 => out.put_u8(len as u8),
        126..=0xFFFF => {
            out.put_u8(126);
            out.put_u16(len as u16);
        }
        _ => {
            out.put_u8(127);
            out.put_u64(len as u64);
        }
    }
    for part in parts {
        out.put_slice(part);
    }
}

/// Appends the websocket frame of `packet` to `out`, as the upstream writer
/// would send it.
fn put_packet(out: &mut BytesMut, packet: Packet, protocol: ProtocolVersion) {
    match packet {
        Packet::Message(msg) => put_frame(out, TEXT, &[b"4", msg.as_bytes()]),
        Packet::Binary(bin) | Packet::BinaryV3(bin) => {
            if protocol == ProtocolVersion::V3 {
                // v3 protocol requires packet type as the first byte.
                put_frame(out, BINARY, &[&[0x04], &bin]);
            } else {
                put_frame(out, BINARY, &[&bin]);
            }
        }
        // Meant for a polling request that an upgrade cut short; nothing to send.
        Packet::Noop => {}
        packet => {
            let text = String::from(packet);
            put_frame(out, TEXT, &[text.as_bytes()]);
        }
    }
}

/// What [`Outbox::send_direct`] did with a frame.
pub(crate) enum Direct {
    /// Written, or queued behind what the kernel did not take yet.
    Sent,
    /// Not written: packets wait in the socket's channel, and go first.
    /// What waits in the outbox, for the sender to count.
    Behind(Waiting),
    /// The outbox would hold more packets than the sender allows, or more
    /// bytes than the configuration does.
    Full,
    /// The connection is closing.
    Closed,
}

/// What waits in an outbox.
#[derive(Clone, Copy, Default)]
pub(crate) struct Waiting {
    pub(crate) packets: usize,
    pub(crate) bytes: usize,
}

/// The frames waiting to be written to one websocket's TCP connection.
pub(crate) struct Outbox {
    state: Mutex<OutState>,
}

struct OutState {
    /// `None` once the writer task is done: the last reference to the
    /// connection's write side goes with it.
    stream: Option<Arc<TcpStream>>,
    /// Frames not fully written yet, oldest first, each with the number of
    /// packets it carries.
    queue: VecDeque<(Bytes, usize)>,
    /// Packets in `queue`.
    packets: usize,
    /// Bytes in `queue` not written yet (chat-ha patch: the bound in bytes).
    bytes: usize,
    /// Bytes of the first frame already written.
    written: usize,
    /// The writer task, to wake when the queue stops being empty.
    writer: Option<Waker>,
    closed: bool,
}

impl Outbox {
    pub(crate) fn new(stream: Arc<TcpStream>) -> Self {
        Outbox {
            state: Mutex::new(OutState {
                stream: Some(stream),
                queue: VecDeque::new(),
                packets: 0,
                bytes: 0,
                written: 0,
                writer: None,
                closed: false,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, OutState> {
        // A panic while the lock was held leaves a queue that is still whole.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Packets waiting to be written.
    pub(crate) fn queued(&self) -> usize {
        self.lock().packets
    }

    /// Bytes waiting to be written (of any frame, the packets' and
    /// tungstenite's own).
    pub(crate) fn queued_bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Writes `message` for a sender outside the writer task, unless
    /// packets wait in `channel` (they were sent first), or more than
    /// `backlog` packets, or `max_bytes` bytes, would then wait in the outbox
    /// (a message larger than `max_bytes` goes if nothing waits).
    pub(crate) fn send_direct(
        &self,
        message: &SharedMessage,
        channel: &mpsc::Sender<Queued>,
        backlog: usize,
        max_bytes: usize,
    ) -> Direct {
        let mut state = self.lock();
        if state.closed {
            return Direct::Closed;
        }
        // Under the lock, since the writer task takes packets from the channel
        // under it too: an empty channel means everything sent before is in
        // the queue or written. A reserved permit counts as a packet.
        if channel.capacity() < channel.max_capacity() {
            return Direct::Behind(Waiting {
                packets: state.packets,
                bytes: state.bytes,
            });
        }
        if state.packets + message.len() > backlog {
            return Direct::Full;
        }
        if state.bytes > 0 && state.bytes + message.frames.len() > max_bytes {
            return Direct::Full;
        }
        state.push(message.frames.clone(), message.len());
        Direct::Sent
    }

    /// Writes bytes that form whole frames (tungstenite's own replies, the
    /// handshake's packets).
    fn send_bytes(&self, bytes: Bytes) -> io::Result<()> {
        let mut state = self.lock();
        if state.closed {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        state.push(bytes, 0);
        Ok(())
    }

    /// The writer task's half: writes what the outbox holds, and once it is
    /// all written, moves the packets waiting in `channel` into the outbox,
    /// framed. Ready once the channel is closed (`Ok`) or the connection
    /// failed; pending otherwise.
    ///
    /// Packets stay in the channel while the kernel takes no more: a client
    /// that does not read fills the channel, and its senders see it full, as
    /// upstream. `backlog` counts the bytes in the channel: those taken
    /// from it are uncounted there, and counted in the outbox if they wait.
    pub(crate) fn poll_pump(
        &self,
        cx: &mut Context<'_>,
        channel: &mut mpsc::Receiver<Queued>,
        protocol: ProtocolVersion,
        backlog: &Backlog,
    ) -> Poll<io::Result<()>> {
        let mut state = self.lock();
        loop {
            ready!(state.poll_write_queue(cx))?;
            let mut frames = BytesMut::new();
            let mut count = 0;
            loop {
                match channel.poll_recv(cx) {
                    Poll::Ready(Some(mut packets)) => {
                        backlog.sub(batch_bytes(&packets));
                        count += packets.len();
                        for packet in packets.drain(..) {
                            put_packet(&mut frames, packet, protocol);
                        }
                    }
                    Poll::Ready(None) => {
                        state.push(frames.freeze(), count);
                        return state.poll_write_queue(cx);
                    }
                    Poll::Pending => break,
                }
            }
            if count == 0 {
                state.park(cx);
                return Poll::Pending;
            }
            state.push(frames.freeze(), count);
        }
    }

    /// Queues `packets`, framed (the volatile packets of the writer task).
    pub(crate) fn send_packets(
        &self,
        packets: impl IntoIterator<Item = Packet>,
        protocol: ProtocolVersion,
    ) {
        let mut frames = BytesMut::new();
        for packet in packets {
            put_packet(&mut frames, packet, protocol);
        }
        if !frames.is_empty() {
            let _ = self.send_bytes(frames.freeze());
        }
    }

    /// Takes no more frames, but a close frame, and lets the writer task
    /// write what is queued with [`Outbox::poll_flush`].
    pub(crate) fn close(&self) {
        let mut state = self.lock();
        if !state.closed {
            state.push(Bytes::from_static(CLOSE), 0);
            state.closed = true;
        }
    }

    /// Ready once everything queued is written (or cannot be).
    pub(crate) fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.lock().poll_write_queue(cx)
    }

    /// Lets go of the connection's write side.
    pub(crate) fn release(&self) {
        let mut state = self.lock();
        state.closed = true;
        state.stream = None;
        state.clear();
    }
}

impl OutState {
    /// Writes `frame`, which carries `packets` packets, at once if nothing
    /// waits before it; queues what the kernel does not take, and wakes the
    /// writer task to write it later.
    fn push(&mut self, frame: Bytes, packets: usize) {
        if frame.is_empty() {
            return;
        }
        if !self.queue.is_empty() {
            // The writer task is writing the queue, or has been woken to.
            self.bytes += frame.len();
            self.queue.push_back((frame, packets));
            self.packets += packets;
            return;
        }
        let written = match &self.stream {
            Some(stream) => match stream.try_write(&frame) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                // The reader sees the failure too, and closes the session.
                Err(_) => return,
            },
            None => return,
        };
        if written < frame.len() {
            self.written = written;
            self.bytes += frame.len() - written;
            self.queue.push_back((frame, packets));
            self.packets += packets;
            if let Some(writer) = self.writer.take() {
                writer.wake();
            }
        }
    }

    /// Remembers the writer task, to be woken when frames are queued.
    fn park(&mut self, cx: &mut Context<'_>) {
        match &self.writer {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            _ => self.writer = Some(cx.waker().clone()),
        }
    }

    /// Writes the queue until it is empty (ready) or the kernel takes no more
    /// (pending, woken when it does).
    fn poll_write_queue(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(stream) = self.stream.clone() else {
            return Poll::Ready(Ok(()));
        };
        while !self.queue.is_empty() {
            let mut slices = [IoSlice::new(&[]); 64];
            let mut count = 0;
            for (i, (frame, _)) in self.queue.iter().take(slices.len()).enumerate() {
                let start = if i == 0 { self.written } else { 0 };
                slices[i] = IoSlice::new(&frame[start..]);
                count += 1;
            }
            match stream.try_write_vectored(&slices[..count]) {
                Ok(n) => self.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(stream.poll_write_ready(cx))?;
                }
                Err(e) => {
                    self.clear();
                    return Poll::Ready(Err(e));
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Drops the `n` bytes just written from the front of the queue.
    fn advance(&mut self, mut n: usize) {
        self.bytes -= n;
        while let Some((front, packets)) = self.queue.front() {
            let left = front.len() - self.written;
            if n < left {
                self.written += n;
                return;
            }
            n -= left;
            self.packets -= packets;
            self.written = 0;
            self.queue.pop_front();
        }
    }

    fn clear(&mut self) {
        self.queue.clear();
        self.packets = 0;
        self.bytes = 0;
        self.written = 0;
    }
}

/// The connection as tungstenite sees it: reads come from the TCP socket,
/// and what it writes (the handshake's packets, replies to pings and
/// closes) joins the outbox, in order with every other frame.
pub(crate) struct WsIo {
    stream: Arc<TcpStream>,
    outbox: Arc<Outbox>,
}

impl WsIo {
    pub(crate) fn new(stream: Arc<TcpStream>, outbox: Arc<Outbox>) -> Self {
        WsIo { stream, outbox }
    }
}

impl AsyncRead for WsIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            ready!(self.stream.poll_read_ready(cx))?;
            match self.stream.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for WsIo {
    /// Takes all of `buf`: tungstenite writes whole frames, and a frame cut
    /// in two could not be interleaved with the outbox's.
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.outbox.send_bytes(Bytes::copy_from_slice(buf))?;
        Poll::Ready(Ok(buf.len()))
    }
    /// The writer task writes what the kernel did not take.
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
