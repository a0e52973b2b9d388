//! `chat-floor`: the practical floor the benchmark compares chat-ha against.
//!
//! A hand-written, single-threaded Engine.IO broadcaster with no Socket.IO
//! library and no Redis, in one process that serves both halves of what
//! `chat-bench` speaks:
//!
//! - `GET /front/socket.io/?EIO=4&transport=websocket`: a websocket that
//!   sends the Engine.IO open packet, answers `40` (connect to `/`),
//!   `42<ack>["room","NAME"]` (join one room, leaving the previous one) and
//!   pings, and pings the client every 25 s;
//! - `POST /back/message` with `{"room":R,"message":M}`: numbers the message
//!   `<counter>-0`, sends `42["message",{"id","room","message"}]` to every
//!   socket of the room and answers 201 with the message;
//! - `GET /front/status`, `GET /back/status`: 200 and a small JSON body.
//!
//! Nothing is stored and nothing crosses a process, so what it costs per
//! delivery is close to what any server must pay: one `write` system call per
//! socket (on loopback about 4.5 µs of kernel TCP work, charged to the
//! sender). Measuring it next to chat-ha in the same session gives the floor
//! on that day's machine.
//!
//! Choices, each to keep it short, correct and cheap:
//! - HTTP/1.1 is parsed with `httparse`: requests are small, with a
//!   Content-Length body (chunked bodies are refused with 411), kept alive.
//! - The websocket accept key comes from tungstenite; client frames (masked,
//!   small, unfragmented) are parsed here, and server frames are encoded here.
//! - A post encodes its frame (header and payload) once into a shared
//!   `Bytes`; server frames are unmasked, so the same bytes go to every socket.
//!   Each socket is written at once with `try_write`; only what the kernel
//!   does not take is queued (a reference, not a copy), and the socket's own
//!   task flushes its queue in order when the socket becomes writable. A
//!   socket with more than `MAX_QUEUED` frames waiting is closed.
//! - Everything runs on one thread (`current_thread` runtime and `Rc`), as
//!   one chat-ha frontend and backend each do with one runtime thread.
//!
//! What the floor is not: a bound on system time under saturation. It makes
//! one `write` per post per socket however far behind it is, where a server
//! that lets frames gather while it is behind (chat-ha's frontend does) sends
//! several per system call, and so can spend less kernel time per delivery
//! and recover from a backlog that this server only works through.
//!
//! Not done, being unneeded for the benchmark: the polling transport,
//! namespaces other than `/`, fragmented frames, message history, `ts`.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::io::{self, ErrorKind, IoSlice, Write};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::rc::Rc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use clap::Parser;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

const PING_INTERVAL: Duration = Duration::from_secs(25);
const PING_TIMEOUT: Duration = Duration::from_secs(20);
const MAX_PAYLOAD: usize = 1_000_000;
const MAX_QUEUED: usize = 1_000;
const MAX_HEAD: usize = 16 * 1024;

/// The floor of the chat-ha benchmark: a single-threaded Engine.IO broadcaster.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Address to listen on; port 0 lets the system choose. The bound
    /// address is printed on the first line of standard output.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let local = tokio::task::LocalSet::new();
    match local.block_on(&runtime, serve(args.listen)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chat-floor: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Accepts connections until SIGTERM or SIGINT.
async fn serve(listen: SocketAddr) -> io::Result<()> {
    let socket = if listen.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(listen)?;
    // As chat-ha's own sockets: bursts of connections wait, not dropped.
    let listener = socket.listen(4096)?;
    let mut stdout = io::stdout();
    writeln!(stdout, "{}", listener.local_addr()?)?;
    stdout.flush()?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let hub = Rc::new(Hub::default());
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    tokio::task::spawn_local(serve_http(hub.clone(), stream));
                }
                Err(e) => {
                    // Out of descriptors, most likely: wait for some to close.
                    eprintln!("chat-floor: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// Rooms and counters, shared by every task of the one thread.
#[derive(Default)]
struct Hub {
    rooms: RefCell<HashMap<String, Vec<Rc<Socket>>>>,
    sockets: Cell<usize>,
    last_id: Cell<u64>,
    last_sid: Cell<u64>,
}

impl Hub {
    fn join(&self, socket: &Rc<Socket>, room: &str) {
        self.leave(socket);
        let mut rooms = self.rooms.borrow_mut();
        rooms
            .entry(room.to_owned())
            .or_default()
            .push(socket.clone());
        *socket.room.borrow_mut() = Some(room.to_owned());
    }

    fn leave(&self, socket: &Rc<Socket>) {
        let Some(name) = socket.room.borrow_mut().take() else {
            return;
        };
        let mut rooms = self.rooms.borrow_mut();
        if let Some(members) = rooms.get_mut(&name) {
            if let Some(i) = members.iter().position(|s| Rc::ptr_eq(s, socket)) {
                members.swap_remove(i);
            }
            if members.is_empty() {
                rooms.remove(&name);
            }
        }
    }

    /// Numbers a message, sends it to its room; returns the message's JSON.
    fn post(&self, room: &str, message: &str) -> String {
        self.last_id.set(self.last_id.get() + 1);
        let message = format!(
            "{{\"id\":\"{}-0\",\"room\":{},\"message\":{}}}",
            self.last_id.get(),
            Value::from(room),
            Value::from(message)
        );
        let frame = ws_frame(0x1, format!("42[\"message\",{message}]").as_bytes());
        if let Some(members) = self.rooms.borrow().get(room) {
            for socket in members {
                socket.send(&frame);
            }
        }
        message
    }

    fn status(&self) -> String {
        format!(
            "{{\"status\":\"ok\",\"server\":\"chat-floor\",\"sockets\":{},\"rooms\":{}}}",
            self.sockets.get(),
            self.rooms.borrow().len()
        )
    }
}

/// One websocket: its stream, and the frames the kernel has not taken yet.
struct Socket {
    stream: TcpStream,
    queue: RefCell<VecDeque<Bytes>>,
    /// Wakes the socket's task when its queue starts, or it must close.
    wake: Notify,
    broken: Cell<bool>,
    room: RefCell<Option<String>>,
}

impl Socket {
    /// Writes `frame` now if nothing waits before it; queues what is left.
    fn send(&self, frame: &Bytes) {
        if self.broken.get() {
            return;
        }
        let mut queue = self.queue.borrow_mut();
        if !queue.is_empty() {
            if queue.len() < MAX_QUEUED {
                queue.push_back(frame.clone());
            } else {
                self.break_off();
            }
            return;
        }
        match self.stream.try_write(frame) {
            Ok(n) if n == frame.len() => return,
            Ok(n) => queue.push_back(frame.slice(n..)),
            Err(e) if e.kind() == ErrorKind::WouldBlock => queue.push_back(frame.clone()),
            Err(_) => self.broken.set(true),
        }
        self.wake.notify_one();
    }

    fn break_off(&self) {
        self.broken.set(true);
        self.wake.notify_one();
    }

    /// Writes queued frames, in order, until the queue is empty or the
    /// kernel's buffer is full.
    fn flush(&self) -> io::Result<()> {
        let mut queue = self.queue.borrow_mut();
        while !queue.is_empty() {
            let mut slices = [IoSlice::new(&[]); 64];
            let count = queue.len().min(slices.len());
            for (slice, frame) in slices.iter_mut().zip(queue.iter()) {
                *slice = IoSlice::new(frame);
            }
            let mut written = match self.stream.try_write_vectored(&slices[..count]) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            };
            while written > 0 {
                let front = queue.front_mut().expect("written from the queue");
                if written < front.len() {
                    front.advance(written);
                    break;
                }
                written -= front.len();
                queue.pop_front();
            }
        }
        Ok(())
    }
}

/// A request's head, as far as this server cares.
struct Head {
    method: String,
    target: String,
    content_length: usize,
    ws_key: Option<String>,
    keep_alive: bool,
}

/// Serves HTTP/1.1 requests on one connection until it closes or upgrades.
async fn serve_http(hub: Rc<Hub>, mut stream: TcpStream) {
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        let head = loop {
            match parse_head(&mut buf) {
                Ok(Some(head)) => break head,
                Ok(None) if buf.len() < MAX_HEAD => {}
                Ok(None) => return respond(&mut stream, 431, "{}", false).await,
                Err(status) => return respond(&mut stream, status, "{}", false).await,
            }
            if !matches!(stream.read_buf(&mut buf).await, Ok(n) if n > 0) {
                return;
            }
        };
        let path = head.target.split('?').next().unwrap_or("");
        if (head.method.as_str(), path) == ("GET", "/front/socket.io/") {
            return upgrade(hub, stream, head, buf).await;
        }
        if head.content_length > MAX_PAYLOAD {
            return respond(&mut stream, 413, "{}", false).await;
        }
        while buf.len() < head.content_length {
            if !matches!(stream.read_buf(&mut buf).await, Ok(n) if n > 0) {
                return;
            }
        }
        let request_body = buf.split_to(head.content_length);
        let (status, body) = match (head.method.as_str(), path) {
            ("GET", "/front/status" | "/back/status") => (200, hub.status()),
            ("POST", "/back/message") => post(&hub, &request_body),
            _ => (404, "{\"error\":\"not found\"}".to_owned()),
        };
        respond(&mut stream, status, &body, head.keep_alive).await;
        if !head.keep_alive {
            return;
        }
    }
}

/// Takes a complete request head off `buf`; `Ok(None)` when more is needed.
fn parse_head(buf: &mut BytesMut) -> Result<Option<Head>, u16> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    let len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(400),
    };
    let mut head = Head {
        method: request.method.unwrap_or_default().to_owned(),
        target: request.path.unwrap_or_default().to_owned(),
        content_length: 0,
        ws_key: None,
        keep_alive: request.version == Some(1),
    };
    for header in request.headers.iter() {
        let value = std::str::from_utf8(header.value)
            .map_err(|_| 400u16)?
            .trim();
        let name = header.name.to_ascii_lowercase();
        match name.as_str() {
            "content-length" => head.content_length = value.parse().map_err(|_| 400u16)?,
            "transfer-encoding" => return Err(411),
            "sec-websocket-key" => head.ws_key = Some(value.to_owned()),
            "connection" => {
                let value = value.to_ascii_lowercase();
                if value.contains("close") {
                    head.keep_alive = false;
                } else if value.contains("keep-alive") {
                    head.keep_alive = true;
                }
            }
            _ => {}
        }
    }
    buf.advance(len);
    Ok(Some(head))
}

/// `POST /back/message`: (status, body).
fn post(hub: &Hub, body: &[u8]) -> (u16, String) {
    let value: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let room = value.get("room").and_then(Value::as_str);
    let message = value.get("message").and_then(Value::as_str);
    match (room, message) {
        (Some(room), Some(message)) if !room.is_empty() => (201, hub.post(room, message)),
        _ => (
            400,
            "{\"error\":\"room and message must be strings\"}".to_owned(),
        ),
    }
}

async fn respond(stream: &mut TcpStream, status: u16, body: &str, keep_alive: bool) {
    let reason = match status {
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        404 => "Not Found",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        _ => "Bad Request",
    };
    let connection = if keep_alive {
        ""
    } else {
        "connection: close\r\n"
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{connection}\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
}

/// Completes the websocket handshake, then runs the socket.
async fn upgrade(hub: Rc<Hub>, mut stream: TcpStream, head: Head, buf: BytesMut) {
    let query = head.target.split_once('?').map_or("", |(_, q)| q);
    let wanted = ["EIO=4", "transport=websocket"];
    let Some(key) = head
        .ws_key
        .filter(|_| wanted.iter().all(|w| query.split('&').any(|p| p == *w)))
    else {
        return respond(
            &mut stream,
            400,
            "{\"error\":\"websocket, EIO=4 only\"}",
            false,
        )
        .await;
    };
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {}\r\n\r\n",
        derive_accept_key(key.as_bytes())
    );
    if stream.write_all(response.as_bytes()).await.is_err() {
        return;
    }
    let socket = Rc::new(Socket {
        stream,
        queue: RefCell::default(),
        wake: Notify::new(),
        broken: Cell::new(false),
        room: RefCell::default(),
    });
    hub.sockets.set(hub.sockets.get() + 1);
    run_socket(&hub, &socket, buf).await;
    hub.leave(&socket);
    hub.sockets.set(hub.sockets.get() - 1);
}

/// What the socket's loop does next.
enum Flow {
    Go,
    /// Orderly end: flush what is queued, then close.
    Close,
    /// Protocol error or lost connection: close at once.
    Drop,
}

/// One Engine.IO session.
struct Session {
    sid: String,
    connected: bool,
    awaiting_pong: bool,
    next_ping: Instant,
}

async fn run_socket(hub: &Hub, socket: &Rc<Socket>, mut buf: BytesMut) {
    hub.last_sid.set(hub.last_sid.get() + 1);
    let mut session = Session {
        sid: format!("floor{}", hub.last_sid.get()),
        connected: false,
        awaiting_pong: false,
        next_ping: Instant::now() + PING_INTERVAL,
    };
    socket.send(&text(&format!(
        "0{{\"sid\":\"{}\",\"upgrades\":[],\"pingInterval\":{},\"pingTimeout\":{},\"maxPayload\":{MAX_PAYLOAD}}}",
        session.sid,
        PING_INTERVAL.as_millis(),
        PING_TIMEOUT.as_millis()
    )));
    let timer = tokio::time::sleep_until(session.next_ping);
    tokio::pin!(timer);
    let flow = loop {
        let queued = !socket.queue.borrow().is_empty();
        let flow = tokio::select! {
            ready = socket.stream.readable() => match ready {
                Ok(()) => read_frames(hub, socket, &mut session, &mut buf),
                Err(_) => Flow::Drop,
            },
            ready = socket.stream.writable(), if queued => match ready.and_then(|()| socket.flush()) {
                Ok(()) => Flow::Go,
                Err(_) => Flow::Drop,
            },
            () = socket.wake.notified() => Flow::Go,
            () = &mut timer => ping(socket, &mut session),
        };
        if socket.broken.get() {
            break Flow::Drop;
        }
        match flow {
            Flow::Go if timer.deadline() != session.next_ping => {
                timer.as_mut().reset(session.next_ping)
            }
            Flow::Go => {}
            end => break end,
        }
    };
    if matches!(flow, Flow::Close) {
        hub.leave(socket);
        let _ = tokio::time::timeout(Duration::from_secs(1), drain(socket)).await;
    }
}

/// Sends the next ping, or ends a session whose last ping went unanswered.
fn ping(socket: &Socket, session: &mut Session) -> Flow {
    if session.awaiting_pong {
        return Flow::Drop;
    }
    socket.send(&text("2"));
    session.awaiting_pong = true;
    session.next_ping = Instant::now() + PING_TIMEOUT;
    Flow::Go
}

async fn drain(socket: &Socket) {
    while !socket.queue.borrow().is_empty() {
        if socket.stream.writable().await.is_err() || socket.flush().is_err() {
            return;
        }
    }
}

/// Reads what the kernel has and handles every complete frame.
fn read_frames(hub: &Hub, socket: &Rc<Socket>, session: &mut Session, buf: &mut BytesMut) -> Flow {
    buf.reserve(4096);
    match socket.stream.try_read_buf(buf) {
        Ok(0) => return Flow::Drop,
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::WouldBlock => return Flow::Go,
        Err(_) => return Flow::Drop,
    }
    loop {
        let (opcode, payload) = match parse_frame(buf) {
            Ok(Some(frame)) => frame,
            Ok(None) => return Flow::Go,
            Err(()) => return Flow::Drop,
        };
        let flow = match opcode {
            0x1 => match std::str::from_utf8(&payload) {
                Ok(packet) => on_packet(hub, socket, session, packet),
                Err(_) => Flow::Drop,
            },
            0x8 => {
                socket.send(&ws_frame(0x8, &payload[..payload.len().min(2)]));
                Flow::Close
            }
            0x9 => {
                socket.send(&ws_frame(0xA, &payload));
                Flow::Go
            }
            0xA => Flow::Go,
            _ => Flow::Drop,
        };
        if !matches!(flow, Flow::Go) {
            return flow;
        }
    }
}

/// Takes one complete client frame off `buf`: (opcode, unmasked payload).
fn parse_frame(buf: &mut BytesMut) -> Result<Option<(u8, BytesMut)>, ()> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (first, second) = (buf[0], buf[1]);
    // FIN set, no extension bits, masked: anything else is not for us.
    if first & 0xF0 != 0x80 || second & 0x80 == 0 {
        return Err(());
    }
    let (len, at) = match second & 0x7F {
        126 if buf.len() >= 4 => (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
        127 if buf.len() >= 10 => (u64::from_be_bytes(buf[2..10].try_into().unwrap()), 10),
        126 | 127 => return Ok(None),
        n => (u64::from(n), 2),
    };
    if len > MAX_PAYLOAD as u64 {
        return Err(());
    }
    let len = len as usize;
    if buf.len() < at + 4 + len {
        return Ok(None);
    }
    let mask = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
    buf.advance(at + 4);
    let mut payload = buf.split_to(len);
    for (i, byte) in payload.iter_mut().enumerate() {
        *byte ^= mask[i % 4];
    }
    Ok(Some((first & 0x0F, payload)))
}

/// Handles one Engine.IO packet (with the Socket.IO packet inside a `4`).
fn on_packet(hub: &Hub, socket: &Rc<Socket>, session: &mut Session, packet: &str) -> Flow {
    match packet.as_bytes().first() {
        Some(b'2') => socket.send(&text(&format!("3{}", &packet[1..]))),
        Some(b'3') if session.awaiting_pong => {
            session.awaiting_pong = false;
            // The next ping is due one interval after the last one was sent.
            session.next_ping = session.next_ping - PING_TIMEOUT + PING_INTERVAL;
        }
        Some(b'1') => return Flow::Close,
        _ if packet == "40" || packet.starts_with("40{") => {
            session.connected = true;
            socket.send(&text(&format!("40{{\"sid\":\"{}-io\"}}", session.sid)));
        }
        _ if packet.starts_with("40") => {
            socket.send(&text("44{\"message\":\"Invalid namespace\"}"))
        }
        _ if packet.starts_with("41") => return Flow::Close,
        _ if packet.starts_with("42") && session.connected => on_event(hub, socket, &packet[2..]),
        _ => {}
    }
    Flow::Go
}

/// `<ack id>["room","NAME"]`: joins the room and acknowledges.
fn on_event(hub: &Hub, socket: &Rc<Socket>, event: &str) {
    let digits = event.bytes().take_while(u8::is_ascii_digit).count();
    let (ack, args) = event.split_at(digits);
    let args: Vec<Value> = serde_json::from_str(args).unwrap_or_default();
    let answer = match (args.first().and_then(Value::as_str), args.get(1)) {
        (Some("room"), Some(Value::String(room))) if !room.is_empty() => {
            hub.join(socket, room);
            "[{\"ok\":true}]"
        }
        (Some("room"), _) => "[{\"ok\":false,\"error\":\"the room must be a name\"}]",
        _ => return,
    };
    if !ack.is_empty() {
        socket.send(&text(&format!("43{ack}{answer}")));
    }
}

fn text(packet: &str) -> Bytes {
    ws_frame(0x1, packet.as_bytes())
}

/// An unmasked, final server frame: header and payload in one buffer.
fn ws_frame(opcode: u8, payload: &[u8]) -> Bytes {
    let mut frame = BytesMut::with_capacity(payload.len() + 10);
    frame.put_u8(0x80 | opcode);
    match payload.len() {
        n if n < 126 => frame.put_u8(n as u8),
        n if n <= 0xFFFF => {
            frame.put_u8(126);
            frame.put_u16(n as u16);
        }
        n => {
            frame.put_u8(127);
            frame.put_u64(n as u64);
        }
    }
    frame.put_slice(payload);
    frame.freeze()
}
