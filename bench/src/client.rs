//! The simulated chat clients: a websocket each, speaking Engine.IO v4 /
//! Socket.IO v5 framing directly, joining one room and recording every
//! message they receive.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{WebSocketStream, client_async_with_config};

use crate::procfs::mono_ns;

/// Latency histograms record microseconds, up to ten minutes.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

const SHARDS: usize = 64;
const FLUSH_EVERY: usize = 128;

/// State shared by every client.
pub struct Shared {
    pub connect_gate: Semaphore,
    pub connect_timeout: Duration,
    pub joined: AtomicUsize,
    pub joined_in_room: Vec<AtomicUsize>,
    pub failed: AtomicUsize,
    /// Connections closed by the other side after the join.
    pub dropped: AtomicUsize,
    /// First deliveries of a (room, seq), counted per shard of clients.
    deliveries: Vec<DeliveryShard>,
    pub first_start_ns: AtomicU64,
    pub last_joined_ns: AtomicU64,
    latency: Vec<Mutex<Histogram<u64>>>,
    pub setup: Mutex<Histogram<u64>>,
    pub errors: Mutex<Vec<String>>,
}

impl Shared {
    pub fn new(rooms: usize, connect_concurrency: usize, connect_timeout: Duration) -> Self {
        Shared {
            connect_gate: Semaphore::new(connect_concurrency.max(1)),
            connect_timeout,
            joined: AtomicUsize::new(0),
            joined_in_room: (0..rooms).map(|_| AtomicUsize::new(0)).collect(),
            failed: AtomicUsize::new(0),
            dropped: AtomicUsize::new(0),
            deliveries: (0..SHARDS).map(|_| DeliveryShard::default()).collect(),
            first_start_ns: AtomicU64::new(u64::MAX),
            last_joined_ns: AtomicU64::new(0),
            latency: (0..SHARDS).map(|_| Mutex::new(new_histogram())).collect(),
            setup: Mutex::new(new_histogram()),
            errors: Mutex::new(Vec::new()),
        }
    }

    /// End-to-end latency of every first delivery, merged.
    pub fn latency(&self) -> Histogram<u64> {
        let mut all = new_histogram();
        for shard in &self.latency {
            let _ = all.add(&*shard.lock().unwrap());
        }
        all
    }

    /// First deliveries so far, all clients together.
    pub fn delivered(&self) -> u64 {
        self.deliveries
            .iter()
            .map(|d| d.count.load(Ordering::Relaxed))
            .sum()
    }

    /// When the last first delivery arrived (monotonic ns; 0 if none did).
    pub fn last_delivery_ns(&self) -> u64 {
        self.deliveries
            .iter()
            .map(|d| d.last_ns.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0)
    }

    fn error(&self, e: String) {
        let mut errors = self.errors.lock().unwrap();
        if errors.len() < 10 {
            errors.push(e);
        }
    }
}

/// Delivery counters of one shard of clients, on a cache line of its own:
/// one shared counter, updated for every message by clients on both cores,
/// would move between them at every update.
#[derive(Default)]
#[repr(align(128))]
struct DeliveryShard {
    count: AtomicU64,
    last_ns: AtomicU64,
}

/// One client: where it connects from and to, and its room.
#[derive(Debug, Clone)]
pub struct Spec {
    pub id: usize,
    pub source: Ipv4Addr,
    pub target: SocketAddr,
    pub room_index: usize,
    pub room: String,
    /// Speak Engine.IO 3, as socket.io 2.x clients do, instead of 4.
    pub eio3: bool,
}

impl Spec {
    /// Client `id`: room `id mod rooms`, target `id mod targets`, source
    /// address 127.0.0.1 + `id / per_source`.
    pub fn new(
        id: usize,
        per_source: usize,
        targets: &[SocketAddr],
        rooms: &[String],
    ) -> Result<Spec, String> {
        let source_index = (id / per_source.max(1)) as u32;
        if source_index >= 250 {
            return Err(
                "too many clients for the source addresses; raise --clients-per-source".into(),
            );
        }
        Ok(Spec {
            id,
            source: Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 0, 1)) + source_index),
            target: targets[id % targets.len()],
            room_index: id % rooms.len(),
            room: rooms[id % rooms.len()].clone(),
            eio3: false,
        })
    }

    /// The same client, speaking Engine.IO 3 (socket.io 2.x) when `eio3`.
    pub fn speaking_eio3(mut self, eio3: bool) -> Spec {
        self.eio3 = eio3;
        self
    }
}

/// What one client saw.
#[derive(Debug, Default)]
pub struct Outcome {
    pub room_index: usize,
    pub joined: bool,
    /// Bit `seq` set: message `seq` of the room arrived.
    pub seen: Vec<u64>,
    pub unique: u64,
    pub duplicates: u64,
    /// Messages of another room, or that could not be parsed.
    pub foreign: u64,
}

type Ws = WebSocketStream<TcpStream>;

/// Runs one client until `stop` turns true.
pub async fn run(
    spec: Spec,
    shared: std::sync::Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> Outcome {
    let mut outcome = Outcome {
        room_index: spec.room_index,
        ..Outcome::default()
    };
    let permit = tokio::select! {
        p = shared.connect_gate.acquire() => p.expect("gate never closed"),
        _ = stopped(&mut stop) => return outcome,
    };
    let start = mono_ns();
    shared.first_start_ns.fetch_min(start, Ordering::Relaxed);
    let setup = tokio::time::timeout(shared.connect_timeout, connect_and_join(&spec)).await;
    drop(permit);
    let mut ws = match setup {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            shared.failed.fetch_add(1, Ordering::Relaxed);
            shared.error(format!("client {} via {}: {e}", spec.id, spec.source));
            return outcome;
        }
        Err(_) => {
            shared.failed.fetch_add(1, Ordering::Relaxed);
            shared.error(format!(
                "client {}: no join within {:?}",
                spec.id, shared.connect_timeout
            ));
            return outcome;
        }
    };
    let joined = mono_ns();
    shared.last_joined_ns.fetch_max(joined, Ordering::Relaxed);
    let _ = shared
        .setup
        .lock()
        .unwrap()
        .record(((joined - start) / 1000).max(1));
    shared.joined_in_room[spec.room_index].fetch_add(1, Ordering::Relaxed);
    shared.joined.fetch_add(1, Ordering::Relaxed);
    outcome.joined = true;

    let mut pending: Vec<u64> = Vec::with_capacity(FLUSH_EVERY);
    let shard = &shared.latency[spec.id % SHARDS];
    let counters = &shared.deliveries[spec.id % SHARDS];
    // Made once: a wait made anew for every frame would register with the
    // stop channel and leave it again, under its lock, for every message.
    let mut stop_requested = std::pin::pin!(stopped(&mut stop));
    loop {
        tokio::select! {
            _ = &mut stop_requested => break,
            frame = ws.next() => match frame {
                Some(Ok(Message::Text(text))) => {
                    let text = text.as_str();
                    if text == "2" {
                        if ws.send(Message::text("3")).await.is_err() {
                            shared.dropped.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    } else if let Some(body) = text.strip_prefix("42[\"message\",") {
                        let now = mono_ns();
                        match parse_delivery(body) {
                            Some((room, seq, sent)) if room == spec.room => {
                                let (word, bit) = ((seq / 64) as usize, 1u64 << (seq % 64));
                                if outcome.seen.len() <= word {
                                    outcome.seen.resize(word + 1, 0);
                                }
                                if outcome.seen[word] & bit != 0 {
                                    outcome.duplicates += 1;
                                } else {
                                    outcome.seen[word] |= bit;
                                    outcome.unique += 1;
                                    counters.count.fetch_add(1, Ordering::Relaxed);
                                    counters.last_ns.fetch_max(now, Ordering::Relaxed);
                                    pending.push(now.saturating_sub(sent) / 1000);
                                    if pending.len() >= FLUSH_EVERY {
                                        let mut h = shard.lock().unwrap();
                                        for v in pending.drain(..) {
                                            h.saturating_record(v.max(1));
                                        }
                                    }
                                }
                            }
                            _ => outcome.foreign += 1,
                        }
                    } else if text.starts_with("41") || text.starts_with('1') {
                        shared.error(format!("client {}: server closed the session ({text})", spec.id));
                        shared.dropped.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                    shared.dropped.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Some(Ok(_)) => {}
            }
        }
    }
    {
        let mut h = shard.lock().unwrap();
        for v in pending.drain(..) {
            h.saturating_record(v.max(1));
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
    outcome
}

/// Resolves once `stop` is true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    loop {
        if *stop.borrow_and_update() {
            return;
        }
        if stop.changed().await.is_err() {
            return;
        }
    }
}

async fn connect_and_join(spec: &Spec) -> Result<Ws, String> {
    let socket = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
    bind_no_port(&socket);
    socket
        .bind(SocketAddr::from((spec.source, 0)))
        .map_err(|e| format!("bind {}: {e}", spec.source))?;
    let stream = socket
        .connect(spec.target)
        .await
        .map_err(|e| format!("connect {}: {e}", spec.target))?;
    let _ = stream.set_nodelay(true);
    let url = format!(
        "ws://{}/front/socket.io/?EIO={}&transport=websocket",
        spec.target,
        if spec.eio3 { 3 } else { 4 }
    );
    // Each read zeroes the unused part of the read buffer first: 2 KiB holds
    // a dozen messages of the default size, more than arrive between two
    // reads even at the highest rates measured.
    let config = WebSocketConfig::default()
        .read_buffer_size(2 * 1024)
        .write_buffer_size(0);
    let (mut ws, _) = client_async_with_config(url, stream, Some(config))
        .await
        .map_err(|e| format!("websocket upgrade: {e}"))?;

    // Engine.IO open packet: 0{"sid":...}
    let open = next_text(&mut ws).await?;
    if !open.starts_with('0') {
        return Err(format!("expected the open packet, got {open:?}"));
    }
    // A socket.io 2.x client is connected to the default namespace without
    // asking; a 3/4 client asks.
    if !spec.eio3 {
        send(&mut ws, "40").await?;
    }
    loop {
        let text = next_text(&mut ws).await?;
        if text.starts_with("40") {
            break;
        } else if text.starts_with("44") {
            return Err(format!("namespace refused: {text}"));
        }
    }
    send(&mut ws, &format!("421[\"room\",\"{}\"]", spec.room)).await?;
    loop {
        let text = next_text(&mut ws).await?;
        if let Some(answer) = text.strip_prefix("431") {
            return if answer.contains("\"ok\":true") {
                Ok(ws)
            } else {
                Err(format!("join refused: {answer}"))
            };
        }
    }
}

/// The next text frame; answers pings on the way.
async fn next_text(ws: &mut Ws) -> Result<String, String> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) if t.as_str() == "2" => send(ws, "3").await?,
            Some(Ok(Message::Text(t))) => return Ok(t.as_str().to_owned()),
            Some(Ok(Message::Close(_))) | None => return Err("closed during the join".into()),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(format!("websocket: {e}")),
        }
    }
}

async fn send(ws: &mut Ws, text: &str) -> Result<(), String> {
    ws.send(Message::text(text.to_owned()))
        .await
        .map_err(|e| format!("send: {e}"))
}

/// Lets the kernel choose the source port at connect time, per destination,
/// so that many connections from one source address do not exhaust the
/// ephemeral range.
fn bind_no_port(socket: &TcpSocket) {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: a valid socket and a c_int option value.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Parses `{"id":..,"room":"R","message":"SEQ:SENT_NS[|padding]",...}]`.
fn parse_delivery(body: &str) -> Option<(&str, u64, u64)> {
    let room = field(body, "\"room\":\"")?;
    let text = field(body, "\"message\":\"")?;
    let (seq, rest) = text.split_once(':')?;
    let sent = rest.split('|').next()?;
    Some((room, seq.parse().ok()?, sent.parse().ok()?))
}

fn field<'a>(body: &'a str, key: &str) -> Option<&'a str> {
    let start = body.find(key)? + key.len();
    let len = body[start..].find('"')?;
    Some(&body[start..start + len])
}

/// The text of message `seq` scheduled at `sent_ns`, padded to at least `size` bytes.
pub fn message_text(seq: u64, sent_ns: u64, size: usize) -> String {
    let mut text = format!("{seq}:{sent_ns}");
    if text.len() + 1 < size {
        text.push('|');
        text.extend(std::iter::repeat_n('x', size - text.len()));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_it_sends() {
        let text = message_text(12, 345, 40);
        assert_eq!(text.len(), 40);
        let frame =
            format!("{{\"id\":\"1-0\",\"room\":\"bench-r3\",\"message\":\"{text}\",\"ts\":1}}]");
        assert_eq!(parse_delivery(&frame), Some(("bench-r3", 12, 345)));
        let plain = message_text(7, 9, 0);
        assert_eq!(plain, "7:9");
    }
}
