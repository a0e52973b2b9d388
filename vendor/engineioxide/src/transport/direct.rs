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

#[cfg(test)]
mod tests {
    //! The outbox against a real loopback TCP connection, read by
    //! tungstenite as a client reads it. The connection's buffers are made
    //! small, so that the kernel takes a few KiB of what a client does not
    //! read and a large write is taken in part.

    use std::sync::Arc;
    use std::time::Duration;

    use futures_util::{SinkExt, StreamExt};
    use http::Request;
    use tokio::net::{TcpSocket, TcpStream};
    use tokio::sync::mpsc::error::TrySendError;
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::Role;

    use super::*;
    use crate::config::EngineIoConfig;
    use crate::socket::{ClosingWith, Socket};
    use crate::transport::ws::{CLOSE_FLUSH_TIMEOUT, write_direct};
    use engineioxide_core::TransportType;

    /// What each end of the connection asks the kernel to buffer.
    const SMALL_BUFFER: u32 = 4096;
    /// Far more than the kernel buffers for the connection.
    const LARGE_TEXT: usize = 128 * 1024;
    /// For a client that is expected to read; never reached when it does.
    const TIMEOUT: Duration = Duration::from_secs(10);

    /// A loopback connection: the server's end, the client's end.
    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = TcpSocket::new_v4().unwrap();
        listener.set_send_buffer_size(SMALL_BUFFER).unwrap();
        listener.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = listener.listen(1).unwrap();
        let client = TcpSocket::new_v4().unwrap();
        client.set_recv_buffer_size(SMALL_BUFFER).unwrap();
        let client = client
            .connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (server, client)
    }

    /// The client's end, read as a websocket client reads it.
    async fn ws_client(stream: TcpStream) -> WebSocketStream<TcpStream> {
        WebSocketStream::from_raw_socket(stream, Role::Client, None).await
    }

    /// The next message the client reads, within [`TIMEOUT`].
    async fn next_message(client: &mut WebSocketStream<TcpStream>) -> Message {
        tokio::time::timeout(TIMEOUT, client.next())
            .await
            .expect("the client should receive a message")
            .expect("the connection should stay open")
            .expect("the frame should be valid")
    }

    /// The next `count` messages the client reads, as text.
    async fn next_texts(client: &mut WebSocketStream<TcpStream>, count: usize) -> Vec<String> {
        let mut texts = Vec::new();
        for _ in 0..count {
            match next_message(client).await {
                Message::Text(text) => texts.push(text.to_string()),
                other => panic!("expected a text message, got {other:?}"),
            }
        }
        texts
    }

    /// The text messages the client reads, as it reads them, in a task of
    /// their own; the channel ends with the first message of another kind.
    fn ws_reader(mut client: WebSocketStream<TcpStream>) -> mpsc::UnboundedReceiver<String> {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(Ok(Message::Text(text))) = client.next().await {
                if tx.send(text.to_string()).is_err() {
                    break;
                }
            }
        });
        rx
    }

    /// `len` characters that differ with `seed`, so that a message cut,
    /// doubled or swapped with another shows.
    fn text(seed: usize, len: usize) -> String {
        (0..len)
            .map(|i| char::from(b'a' + ((seed + i) % 26) as u8))
            .collect()
    }

    fn shared(text: &str) -> SharedMessage {
        SharedMessage::new(Str::from(text.to_owned()))
    }

    /// A websocket session as the engine makes one, on the server's end of
    /// a connection, with its direct writer running; and the writer task.
    async fn session(
        server: TcpStream,
        guard: impl Any + Send + Sync,
    ) -> (Arc<Socket<()>>, Arc<TcpStream>, tokio::task::JoinHandle<()>) {
        session_speaking(ProtocolVersion::V4, server, guard).await
    }

    /// [`session`] for a client of Engine.IO protocol `protocol`.
    async fn session_speaking(
        protocol: ProtocolVersion,
        server: TcpStream,
        guard: impl Any + Send + Sync,
    ) -> (Arc<Socket<()>>, Arc<TcpStream>, tokio::task::JoinHandle<()>) {
        let socket = Arc::new(Socket::new(
            protocol,
            TransportType::Websocket,
            ClosingWith::sessions(Box::new(|_, _| ()), EngineIoConfig::default()),
            Request::<()>::default().into_parts().0,
            false,
        ));
        let stream = Arc::new(server);
        let outbox = Arc::new(Outbox::new(stream.clone()));
        socket.backlog.drainer_waits();
        let writer = tokio::spawn(write_direct(socket.clone(), outbox, Box::new(guard)));
        // Direct writes start once the writer has taken the channel.
        until("the writer runs", || socket.outbox.get().is_some()).await;
        (socket, stream, writer)
    }

    /// Yields until `done` holds, while the other tasks (the writer, a
    /// reading client) make progress; fails after [`TIMEOUT`].
    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let waiting = async {
            while !done() {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(TIMEOUT, waiting)
            .await
            .unwrap_or_else(|_| panic!("timed out waiting until {what}"));
    }

    /// Whether packets wait in the socket's channel (or a place is reserved).
    fn channel_holds_packets(socket: &Socket<()>) -> bool {
        socket.internal_tx.capacity() < socket.internal_tx.max_capacity()
    }

    fn outbox(socket: &Socket<()>) -> &Outbox {
        socket.outbox.get().expect("the direct writer runs")
    }

    /// The header of a server's final text frame, by payload length: the
    /// length in 7 bits up to 125, then in 16 bits after 126, then in 64
    /// bits after 127 (RFC 6455, 5.2).
    #[test]
    fn frame_headers_at_each_length_form() {
        let cases: [(usize, &[u8]); 5] = [
            (0, &[0x81, 0]),
            (125, &[0x81, 125]),
            (126, &[0x81, 126, 0x00, 0x7E]),
            (65_535, &[0x81, 126, 0xFF, 0xFF]),
            (65_536, &[0x81, 127, 0, 0, 0, 0, 0, 1, 0, 0]),
        ];
        for (len, header) in cases {
            let payload = text(len, len);
            let mut out = BytesMut::new();
            put_frame(&mut out, TEXT, &[payload.as_bytes()]);
            assert_eq!(&out[..header.len()], header, "header at length {len}");
            assert_eq!(&out[header.len()..], payload.as_bytes(), "payload at {len}");
        }
    }

    /// A client reads each length form as the message framed, and a
    /// message split into parts is framed as one.
    #[tokio::test]
    async fn a_client_reads_frames_of_each_length_form() {
        let (mut writer, reader) = tokio::io::duplex(1024 * 1024);
        let mut client = WebSocketStream::from_raw_socket(reader, Role::Client, None).await;
        let mut frames = BytesMut::new();
        put_frame(&mut frames, TEXT, &[]);
        let lengths = [125, 126, 65_535, 65_536];
        // An Engine.IO message: the packet type, then the text.
        for len in lengths {
            frames.extend_from_slice(&shared(&text(len, len - 1)).frames);
        }
        tokio::io::AsyncWriteExt::write_all(&mut writer, &frames)
            .await
            .unwrap();
        let empty = client.next().await.unwrap().unwrap();
        assert_eq!(empty, Message::text(""));
        for len in lengths {
            let message = client.next().await.unwrap().unwrap();
            assert_eq!(message, Message::text(format!("4{}", text(len, len - 1))));
        }
    }

    /// What [`OutState::advance`] keeps for each way the kernel may cut the
    /// queue: the bytes not written, the packets of the frames not wholly
    /// written, where the first one resumes.
    #[test]
    fn partial_writes_are_accounted_at_every_cut() {
        // Three frames: one packet, two joined, one of tungstenite's own.
        let frames: [(&[u8], usize); 3] = [(b"abc", 1), (b"defgh", 2), (b"ij", 0)];
        let total: usize = frames.iter().map(|(f, _)| f.len()).sum();
        for step in 1..=total {
            let mut state = OutState {
                stream: None,
                queue: frames
                    .iter()
                    .map(|(f, p)| (Bytes::from_static(f), *p))
                    .collect(),
                packets: 3,
                bytes: total,
                written: 0,
                writer: None,
                closed: false,
            };
            let mut done = 0;
            while done < total {
                let n = step.min(total - done);
                state.advance(n);
                done += n;
                // The frames not wholly written, and how far into the first.
                let (mut rest, mut packets_left, mut frames_left) = (done, 0, 0);
                let mut first_offset = 0;
                for (frame, packets) in frames {
                    if rest >= frame.len() {
                        rest -= frame.len();
                        continue;
                    }
                    if frames_left == 0 {
                        first_offset = rest;
                    }
                    rest = 0;
                    packets_left += packets;
                    frames_left += 1;
                }
                let at = format!("steps of {step}, {done} written");
                assert_eq!(state.bytes, total - done, "bytes, {at}");
                assert_eq!(state.packets, packets_left, "packets, {at}");
                assert_eq!(state.queue.len(), frames_left, "frames, {at}");
                assert_eq!(state.written, first_offset, "offset, {at}");
            }
        }
    }

    /// Several messages joined into one write, which the kernel takes in
    /// part; more written behind them meanwhile. The client gets each whole,
    /// in order, and the outbox counts what waits until it is written.
    #[tokio::test]
    async fn messages_joined_in_one_write_arrive_whole_across_partial_writes() {
        let (server, client) = tcp_pair().await;
        let (socket, _stream, _writer) = session(server, ()).await;
        let texts: Vec<String> = (0..8).map(|i| text(i, LARGE_TEXT)).collect();
        let joined = SharedMessage::join(&texts.iter().map(|t| shared(t)).collect::<Vec<_>>());
        assert_eq!(joined.len(), 8);

        socket.emit_shared(&joined, usize::MAX).unwrap();
        assert!(
            outbox(&socket).queued_bytes() > 0,
            "the kernel should take only part of {} bytes",
            joined.frames.len()
        );
        assert_eq!(
            socket.queued(),
            8,
            "the write's packets wait until it is whole"
        );
        // Behind a partial write, frames wait in the outbox, in order.
        let behind: Vec<String> = (8..11).map(|i| text(i, 1000)).collect();
        for t in &behind {
            socket.emit_shared(&shared(t), usize::MAX).unwrap();
        }
        assert_eq!(socket.queued(), 11);

        let mut client = ws_client(client).await;
        let received = next_texts(&mut client, 11).await;
        let expected: Vec<String> = texts
            .iter()
            .chain(&behind)
            .map(|t| format!("4{t}"))
            .collect();
        assert!(
            received == expected,
            "the messages should arrive whole and in order"
        );
        until("the outbox is written out", || socket.queued_bytes() == 0).await;
        assert_eq!(socket.queued(), 0);
    }

    /// Packets queued in the socket's channel (`emit`, written by the
    /// writer task) and messages written directly (`emit_shared`) reach the
    /// client in the order they were sent, whether the kernel keeps up or
    /// not. Frames of tungstenite's own (the handshake's, replies to pings
    /// and closes) join the outbox when they are written, behind what is
    /// pending there, never inside it; like a reply of tungstenite's
    /// upstream, they can pass packets still in the channel.
    #[tokio::test]
    async fn direct_writes_keep_their_order_with_the_writer_and_tungstenite() {
        let (server, client) = tcp_pair().await;
        let (socket, stream, _writer) = session(server, ()).await;
        let mut tungstenite = WebSocketStream::from_raw_socket(
            WsIo::new(stream.clone(), socket.outbox.get().unwrap().clone()),
            Role::Server,
            None,
        )
        .await;
        const ROUNDS: usize = 40;
        // The client reads all along, so that the writer can progress.
        let mut client = ws_reader(ws_client(client).await);
        let mut expected = Vec::new();
        let (mut behind_channel, mut direct, mut own_behind_pending) = (0, 0, 0);
        let mut sent = Vec::new();
        for round in 0..ROUNDS {
            // Large messages in some rounds: the kernel takes them in part,
            // and what follows waits in the outbox or in the channel.
            let len = if round % 4 == 0 { LARGE_TEXT } else { 100 };
            let via_channel = text(round * 3, len);
            socket.emit(Str::from(via_channel.clone())).unwrap();
            sent.push(format!("4{via_channel}"));

            if round % 2 == 0 {
                until("the writer takes the channel", || {
                    !channel_holds_packets(&socket)
                })
                .await;
            }
            let shared_text = text(round * 3 + 1, len);
            if channel_holds_packets(&socket) {
                behind_channel += 1;
            } else {
                direct += 1;
            }
            socket
                .emit_shared(&shared(&shared_text), usize::MAX)
                .unwrap();
            sent.push(format!("4{shared_text}"));

            if !channel_holds_packets(&socket) {
                if outbox(&socket).queued_bytes() > 0 {
                    own_behind_pending += 1;
                }
                let own = text(round * 3 + 2, 10);
                tungstenite.send(Message::text(own.clone())).await.unwrap();
                sent.push(own);
            }
            expected.append(&mut sent);
        }
        assert!(
            behind_channel > 0 && direct > 0 && own_behind_pending > 0,
            "each case should occur: {behind_channel} messages behind the channel, {direct} \
             direct, {own_behind_pending} frames of tungstenite's behind a pending write"
        );
        for (i, want) in expected.iter().enumerate() {
            let got = tokio::time::timeout(TIMEOUT, client.recv())
                .await
                .unwrap_or_else(|_| panic!("message {i} should arrive"))
                .expect("the connection should stay open");
            assert!(&got == want, "message {i} out of order or altered");
        }
    }

    /// What a client of each Engine.IO protocol reads from the direct
    /// writer. Protocols 3 and 4 frame a message (packet type 4, then the
    /// text) and control packets (the pong with which a protocol 3 server
    /// answers its client's ping) alike, so a message framed once
    /// ([`SharedMessage`]) serves both, written directly or queued behind
    /// the channel; binary data differs: protocol 3 puts the packet type
    /// (the byte 4) before the data in a binary frame, 4 sends the data
    /// alone.
    #[cfg(feature = "v3")]
    #[tokio::test]
    async fn each_protocol_reads_its_own_framing() {
        for protocol in [ProtocolVersion::V3, ProtocolVersion::V4] {
            let (server, client) = tcp_pair().await;
            let (socket, _stream, _writer) = session_speaking(protocol, server, ()).await;
            let mut client = ws_client(client).await;
            socket.emit_shared(&shared("direct"), usize::MAX).unwrap();
            socket.send(Packet::Pong).unwrap();
            socket.emit_binary(Bytes::from_static(&[1, 2, 3])).unwrap();
            // Behind the binary packet if the writer has not taken it yet.
            socket
                .emit_shared(&shared("after \u{1d54a}"), usize::MAX)
                .unwrap();
            let binary = match protocol {
                ProtocolVersion::V3 => vec![4, 1, 2, 3],
                ProtocolVersion::V4 => vec![1, 2, 3],
            };
            let expected = [
                Message::text("4direct"),
                Message::text("3"),
                Message::binary(binary),
                Message::text("4after \u{1d54a}"),
            ];
            for (i, want) in expected.into_iter().enumerate() {
                let got = next_message(&mut client).await;
                assert_eq!(got, want, "protocol {protocol}, message {i}");
            }
            until("nothing waits for the client", || socket.queued_bytes() == 0).await;
        }
    }

    /// A session closed while the kernel holds back a write: what was
    /// accepted before is written whole, then a close frame, and nothing
    /// after; senders are refused from then on; the connection's guard goes
    /// with the writer.
    #[tokio::test]
    async fn closing_with_a_write_pending_writes_it_then_a_close_frame() {
        let (server, client) = tcp_pair().await;
        let guard = Arc::new(());
        let (socket, stream, writer) = session(server, guard.clone()).await;
        let texts: Vec<String> = (0..4).map(|i| text(i, LARGE_TEXT)).collect();
        for t in &texts {
            socket.emit_shared(&shared(t), usize::MAX).unwrap();
        }
        assert!(
            outbox(&socket).queued_bytes() > 0,
            "a write should be pending"
        );

        socket.cancellation_token.cancel();
        until("the writer closes the outbox", || {
            outbox(&socket).lock().closed
        })
        .await;
        assert!(matches!(
            socket.emit_shared(&shared("late"), usize::MAX),
            Err(TrySendError::Closed(()))
        ));

        let mut client = ws_client(client).await;
        let received = next_texts(&mut client, texts.len()).await;
        let expected: Vec<String> = texts.iter().map(|t| format!("4{t}")).collect();
        assert!(received == expected, "what was pending should arrive whole");
        assert_eq!(next_message(&mut client).await, Message::Close(None));
        tokio::time::timeout(TIMEOUT, writer)
            .await
            .expect("the writer should end once everything is written")
            .unwrap();
        assert_eq!(
            Arc::strong_count(&guard),
            1,
            "the guard goes with the writer"
        );
        // The outbox let go of the connection; the last reference closes it.
        drop(stream);
        let after = tokio::time::timeout(TIMEOUT, client.next())
            .await
            .expect("the connection should close");
        assert!(
            !matches!(after, Some(Ok(Message::Text(_) | Message::Binary(_)))),
            "nothing after the close frame: {after:?}"
        );
    }

    /// A client that does not read while its session closes holds the
    /// writer [`CLOSE_FLUSH_TIMEOUT`], not for ever.
    #[tokio::test(start_paused = true)]
    async fn closing_gives_up_on_a_client_that_does_not_read() {
        let (server, _client) = tcp_pair().await;
        let guard = Arc::new(());
        let (socket, _stream, writer) = session(server, guard.clone()).await;
        socket
            .emit_shared(&shared(&text(0, LARGE_TEXT)), usize::MAX)
            .unwrap();
        assert!(
            outbox(&socket).queued_bytes() > 0,
            "a write should be pending"
        );

        let start = tokio::time::Instant::now();
        socket.cancellation_token.cancel();
        writer.await.unwrap();
        assert!(
            start.elapsed() >= CLOSE_FLUSH_TIMEOUT,
            "the writer should wait for the client first, gave up after {:?}",
            start.elapsed()
        );
        assert_eq!(
            Arc::strong_count(&guard),
            1,
            "the guard goes with the writer"
        );
        assert_eq!(outbox(&socket).queued_bytes(), 0, "what waited is dropped");
    }
}
