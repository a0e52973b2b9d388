//! The frontend's rooms in-process: sockets made by socketioxide's test
//! harness go through the frontend's real `room` handler, messages reach
//! them as the feed hands them over, and resuming reads a real Redis.
//! What a client sees is read from the packets each socket is sent.

mod common;

use std::sync::Arc;
use std::time::Duration;

use chat_ha::config::Config;
use chat_ha::delivery::{Feed, LEAVE_GRACE, RedisHealth, Store, Subscriber};
use chat_ha::frontend::{Rooms, socket_io};
use chat_ha::message::{ChatMessage, Room, StreamId};
use chat_ha::metrics::FrontendMetrics;
use common::{Forward, Redis, post, write_config};
use engineioxide::Packet;
use serde_json::{Value, json};
use socketioxide::SocketIo;
use tokio::sync::mpsc;

/// Rooms over a real Redis, and the Socket.IO server their sockets join.
struct Frontend {
    rooms: Arc<Rooms>,
    io: SocketIo,
    store: Store,
    metrics: Arc<FrontendMetrics>,
    redis: Redis,
    _dir: tempfile::TempDir,
}

impl Frontend {
    async fn start(extra_config: &str) -> Frontend {
        let redis = Redis::start();
        let dir = tempfile::tempdir().unwrap();
        let config =
            Config::load(&write_config(dir.path(), &redis.url(), extra_config), true).unwrap();
        let store = Store::new(&config).unwrap();
        let metrics = Arc::new(FrontendMetrics::default());
        // The test hands messages to the rooms itself, as the feed would,
        // so the rooms' feed follows a key space nothing is posted to: it
        // answers that every room starts before any message.
        let mut elsewhere = config.clone();
        elsewhere.redis.key_prefix = "elsewhere".into();
        let (feed, interest) = Feed::new(&elsewhere, RedisHealth::new()).unwrap();
        let (nothing, _) = mpsc::unbounded_channel();
        tokio::spawn(feed.run(Arc::new(Forward(nothing))));
        let rooms = Arc::new(Rooms::new(
            store.clone(),
            interest,
            &config.frontend,
            &config.history,
            metrics.clone(),
        ));
        let (_layer, io) = socket_io(&config, rooms.clone());
        Frontend {
            rooms,
            io,
            store,
            metrics,
            redis,
            _dir: dir,
        }
    }

    async fn client(&self) -> Client {
        let (tx, rx) = self.io.new_dummy_sock("/", ()).await;
        Client {
            tx,
            rx,
            acks: 0,
            messages: Vec::new(),
        }
    }

    /// Stores `count` messages in `room` ("`prefix` 0", …), without handing
    /// them to the rooms.
    async fn store(&self, room: &str, prefix: &str, count: usize) -> Vec<ChatMessage> {
        let mut stored = Vec::with_capacity(count);
        for i in 0..count {
            let message = post(room, &format!("{prefix} {i}"));
            stored.push(self.store.append(&message, None).await.unwrap().message);
        }
        stored
    }

    /// Stores messages and hands them to the rooms as the feed would.
    async fn post(&self, room: &str, prefix: &str, count: usize) -> Vec<ChatMessage> {
        let stored = self.store(room, prefix, count).await;
        self.rooms.deliver(stored.clone()).await;
        stored
    }
}

/// A client of one test socket: what it sends, what it has received.
struct Client {
    tx: mpsc::Sender<Packet>,
    rx: mpsc::Receiver<Packet>,
    acks: u64,
    /// `message` events received, in order.
    messages: Vec<ChatMessage>,
}

impl Client {
    /// Emits `room` with `payload` and returns the acknowledgement, keeping
    /// the messages that came before it.
    async fn join(&mut self, payload: Value) -> Value {
        self.acks += 1;
        let event = format!("2{}{}", self.acks, json!(["room", payload]));
        self.tx.send(Packet::Message(event.into())).await.unwrap();
        let ack = format!("3{}", self.acks);
        loop {
            let text = self.next_text().await;
            if let Some(answer) = text.strip_prefix(&ack) {
                return serde_json::from_str::<Vec<Value>>(answer)
                    .unwrap()
                    .remove(0);
            }
            self.keep(&text);
        }
    }

    /// Waits for `count` more messages.
    async fn receive(&mut self, count: usize) -> &[ChatMessage] {
        let start = self.messages.len();
        while self.messages.len() < start + count {
            let text = self.next_text().await;
            self.keep(&text);
        }
        &self.messages[start..]
    }

    fn keep(&mut self, text: &str) {
        if let Some(event) = text.strip_prefix("2[\"message\",") {
            let message = &event[..event.len() - 1];
            self.messages.push(serde_json::from_str(message).unwrap());
        }
    }

    async fn next_text(&mut self) -> String {
        let packet = tokio::time::timeout(Duration::from_secs(10), self.rx.recv())
            .await
            .expect("a packet within 10 s")
            .expect("the socket is open");
        match packet {
            Packet::Message(text) => text.to_string(),
            other => panic!("unexpected packet {other:?}"),
        }
    }
}

#[tokio::test]
async fn each_socket_gets_the_messages_of_its_rooms_in_feed_order_and_no_others() {
    let frontend = Frontend::start("").await;
    let mut one = frontend.client().await;
    let mut both = frontend.client().await;
    assert_eq!(one.join(json!("red")).await, json!({"ok": true}));
    assert_eq!(both.join(json!("red")).await, json!({"ok": true}));
    assert_eq!(both.join(json!("blue")).await, json!({"ok": true}));
    assert_eq!(
        both.join(json!("blue")).await,
        json!({"ok": true}),
        "joining twice is fine"
    );

    // One batch from the feed, rooms interleaved, one room nobody is in.
    let mut batch = Vec::new();
    for (room, text) in [
        ("red", "r1"),
        ("blue", "b1"),
        ("green", "g1"),
        ("red", "r2"),
        ("blue", "b2"),
    ] {
        batch.extend(frontend.store(room, text, 1).await);
    }
    frontend.rooms.deliver(batch.clone()).await;
    let texts = |messages: &[ChatMessage]| {
        messages
            .iter()
            .map(|m| m.message.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(texts(one.receive(2).await), ["r1 0", "r2 0"]);
    assert_eq!(
        texts(both.receive(4).await),
        ["r1 0", "b1 0", "r2 0", "b2 0"]
    );

    // A fence: the next thing each receives, so nothing else came.
    let fence = frontend.post("red", "fence", 1).await;
    assert_eq!(one.receive(1).await, &fence[..]);
    assert_eq!(both.receive(1).await, &fence[..]);
}

/// How many connections are subscribed to `room`'s channel, under the
/// key prefix the rooms' feed follows.
async fn subscribers(redis: &Redis, room: &str) -> i64 {
    let config = chat_ha::config::RedisConfig {
        key_prefix: "elsewhere".into(),
        ..Default::default()
    };
    let channel = chat_ha::delivery::Keys::new(&config).room(&Room::parse(room).unwrap());
    let client = redis::Client::open(redis.url().as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let counts: Vec<(String, i64)> = redis::cmd("PUBSUB")
        .arg("SHARDNUMSUB")
        .arg(&channel)
        .query_async(&mut conn)
        .await
        .unwrap();
    counts[0].1
}

/// The frontend follows a room while sockets are in it: from the first
/// join, until a while after the last socket left (here, disconnected).
#[tokio::test]
async fn a_room_is_followed_while_sockets_are_in_it() {
    let frontend = Frontend::start("").await;
    assert_eq!(subscribers(&frontend.redis, "watched").await, 0);
    let mut client = frontend.client().await;
    assert_eq!(client.join(json!("watched")).await, json!({"ok": true}));
    assert_eq!(
        subscribers(&frontend.redis, "watched").await,
        1,
        "followed once the join is answered"
    );
    client.tx.send(Packet::Close).await.unwrap();
    let deadline = std::time::Instant::now() + LEAVE_GRACE + Duration::from_secs(10);
    while subscribers(&frontend.redis, "watched").await != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "still followed long after its last socket left"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn joins_are_refused_with_their_reason() {
    // Keys of [frontend], which the test configuration opens last.
    let frontend = Frontend::start("max_rooms_per_socket = 2\n").await;
    let mut client = frontend.client().await;
    let refused = |answer: Value| answer["error"].as_str().unwrap_or_default().to_owned();
    assert!(refused(client.join(json!("no spaces")).await).starts_with("room must be 1 to 64"));
    assert!(
        refused(client.join(json!({"room": "a", "since": "x"})).await).starts_with("since must be")
    );
    assert!(refused(client.join(json!(42)).await).starts_with("join with a room name"));
    assert_eq!(client.join(json!("a")).await, json!({"ok": true}));
    assert_eq!(client.join(json!("b")).await, json!({"ok": true}));
    assert_eq!(
        client.join(json!("c")).await["error"],
        "a socket may be in at most 2 rooms"
    );
    assert_eq!(frontend.metrics.joins_refused.get(), 4);
}

/// A socket resuming from any message of a room's history gets everything
/// after it once, in order, then the live messages, also while messages
/// keep arriving during its resume: whatever the seam between what it
/// reads from Redis and what the feed hands over meanwhile.
#[tokio::test]
async fn a_resume_gets_everything_after_since_once_in_order_whatever_arrives_meanwhile() {
    let frontend = Frontend::start("").await;
    // More than two pages (64 messages each) of history.
    let mut stored = frontend.post("room", "old", 150).await;
    let since_each = [
        StreamId::ZERO,
        stored[0].id,
        stored[63].id,
        stored[64].id,
        stored[100].id,
        stored[149].id,
    ];
    for (round, since) in since_each.into_iter().enumerate() {
        let mut client = frontend.client().await;
        // Messages keep arriving, one by one, while the socket resumes.
        let live = async {
            let mut live = Vec::new();
            for i in 0..40 {
                live.extend(frontend.post("room", &format!("live {round}.{i}"), 1).await);
                tokio::task::yield_now().await;
            }
            live
        };
        let join = client.join(json!({"room": "room", "since": since.to_string()}));
        let (answer, live) = tokio::join!(join, live);
        assert_eq!(answer["ok"], true, "{answer}");
        stored.extend(live);
        let wanted: Vec<ChatMessage> = stored.iter().filter(|m| m.id > since).cloned().collect();
        let still = wanted.len() - client.messages.len().min(wanted.len());
        client.receive(still).await;
        assert_eq!(client.messages, wanted, "since {since}");
        // The next message is the fence: nothing came twice.
        let fence = frontend.post("room", "fence", 1).await;
        assert_eq!(client.receive(1).await, &fence[..], "since {since}");
        stored.extend(fence);
    }
    assert!(frontend.metrics.replayed.get() > 0);
}

/// A socket that reads nothing is let go once the live messages waiting for
/// it would no longer leave room in the history for what arrives while it
/// reconnects; resuming from the last message it got, it misses nothing.
#[tokio::test]
async fn a_socket_that_falls_behind_is_let_go_and_resumes_without_a_gap() {
    // A short history, so that the socket is let go soon.
    let frontend = Frontend::start("[history]\nmax_per_room = 300\n").await;
    let mut stalled = frontend.client().await;
    assert_eq!(stalled.join(json!("busy")).await, json!({"ok": true}));
    let mut stored = Vec::new();
    while frontend.metrics.dropped.get() == 0 {
        stored.extend(frontend.post("busy", "m", 10).await);
        assert!(stored.len() < 1000, "never let go");
    }
    // What it was sent before it was let go: all in its queue already.
    while let Ok(Packet::Message(text)) = stalled.rx.try_recv() {
        stalled.keep(&text);
    }
    let got = stalled.messages.clone();
    assert!(got.len() < stored.len(), "let go before it had everything");
    assert_eq!(got[..], stored[..got.len()], "what it got came in order");

    let mut again = frontend.client().await;
    let since = got.last().map_or(StreamId::ZERO, |m| m.id);
    let answer = again
        .join(json!({"room": "busy", "since": since.to_string()}))
        .await;
    let missed = &stored[got.len()..];
    assert_eq!(answer["replayed"], json!(missed.len()), "{answer}");
    // The replay comes before the answer.
    assert_eq!(again.messages, missed);
}
