//! Delivery through a real redis-server: every message appended to a room a
//! feed follows reaches it once, in the room's order, across lost
//! connections and Redis restarts; and only those rooms' messages do.

mod common;

use std::sync::Arc;
use std::time::Duration;

use chat_ha::config::Config;
use chat_ha::delivery::{Feed, Interest, Keys, RedisHealth, Store};
use chat_ha::message::{ChatMessage, PostMessage, Room, StreamId};
use common::{Forward, Redis, post, write_config};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;

fn config(redis: &Redis) -> (Config, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &redis.url(), "");
    (Config::load(&path, true).unwrap(), dir)
}

async fn wait_up(health: &RedisHealth) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while !health.is_up() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("feed reached Redis");
}

/// The rooms the feeds of these tests follow.
const FOLLOWED: [&str; 3] = ["rooma", "roomb", "roomc"];

fn room(name: &str) -> Room {
    Room::parse(name).unwrap()
}

/// Starts a feed whose deliveries arrive on the returned channel, and has
/// it follow `rooms`.
async fn follow(
    config: &Config,
    rooms: &[&str],
) -> (mpsc::UnboundedReceiver<ChatMessage>, Arc<RedisHealth>) {
    let (rx, health, _, _) = follow_counting(config, rooms).await;
    (rx, health)
}

/// Starts a feed as [`follow`] does, which also counts the messages it read
/// from the stream rather than from pushes; and the handle that tells it
/// which rooms to follow.
async fn follow_counting(
    config: &Config,
    rooms: &[&str],
) -> (
    mpsc::UnboundedReceiver<ChatMessage>,
    Arc<RedisHealth>,
    Counter,
    Interest,
) {
    let health = RedisHealth::new();
    let caught_up = Counter::default();
    let (feed, interest) = Feed::new(config, health.clone()).unwrap();
    let feed = feed.counting_caught_up(caught_up.clone());
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(feed.run(Arc::new(Forward(tx))));
    follow_rooms(&interest, rooms).await;
    (rx, health, caught_up, interest)
}

/// Has the feed of `interest` follow `rooms`, once it reached Redis.
async fn follow_rooms(interest: &Interest, rooms: &[&str]) {
    for name in rooms {
        interest
            .follow(&room(name), Duration::from_secs(10))
            .await
            .expect("the feed reached Redis and follows the room");
    }
}

/// A redis-server, a store appending to it and a feed following it, which
/// has reached it.
struct Setup {
    redis: Redis,
    config: Config,
    /// Holds the configuration file.
    _dir: tempfile::TempDir,
    store: Store,
    rx: mpsc::UnboundedReceiver<ChatMessage>,
    health: Arc<RedisHealth>,
    /// Messages the feed read from the stream rather than from pushes.
    caught_up: Counter,
}

impl Setup {
    /// The feed follows [`FOLLOWED`].
    async fn start() -> Self {
        let redis = Redis::start();
        let (config, _dir) = config(&redis);
        let store = Store::new(&config).unwrap();
        let (rx, health, caught_up, _) = follow_counting(&config, &FOLLOWED).await;
        Setup {
            redis,
            config,
            _dir,
            store,
            rx,
            health,
            caught_up,
        }
    }
}

/// A connection of the test's own, as another program would have.
async fn connect(redis: &Redis) -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(redis.url().as_str()).unwrap();
    client.get_multiplexed_async_connection().await.unwrap()
}

/// Closes every connection to `redis` but the one this takes to ask.
async fn kill_other_clients(redis: &Redis) {
    let _: redis::Value = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("SKIPME")
        .arg("yes")
        .query_async(&mut connect(redis).await)
        .await
        .unwrap();
}

/// The stream of `name`'s history, and the channel its messages are
/// published on.
fn room_key(config: &Config, name: &str) -> String {
    Keys::new(&config.redis).room(&room(name))
}

/// Appends `count` messages to `room` ("`prefix` 0", "`prefix` 1", ...) and
/// returns them as stored.
async fn append_numbered(
    store: &Store,
    room: &str,
    prefix: &str,
    count: usize,
) -> Vec<ChatMessage> {
    let mut sent = Vec::with_capacity(count);
    for i in 0..count {
        let message = post(room, &format!("{prefix} {i}"));
        sent.push(store.append(&message, None).await.unwrap().message);
    }
    sent
}

/// Appends, retrying while Redis is away, like a client that got 503.
async fn append_acknowledged(store: &Store, message: &PostMessage) -> ChatMessage {
    for _ in 0..200 {
        if let Ok(stored) = store.append(message, None).await {
            return stored.message;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("Redis never came back");
}

async fn receive(rx: &mut mpsc::UnboundedReceiver<ChatMessage>, count: usize) -> Vec<ChatMessage> {
    let mut got = Vec::new();
    while got.len() < count {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(message)) => got.push(message),
            _ => panic!("received {} of {count} messages", got.len()),
        }
    }
    got
}

/// The messages of `room` among `messages`, in the order given.
fn of_room(messages: &[ChatMessage], name: &str) -> Vec<ChatMessage> {
    messages
        .iter()
        .filter(|m| m.room.as_str() == name)
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn feed_delivers_every_message_of_its_rooms_once_in_order_with_its_stored_form() {
    let redis = Redis::start();
    let (config, _dir) = config(&redis);
    let store = Store::new(&config).unwrap();
    store
        .append(&post("rooma", "appended before the frontend started"), None)
        .await
        .unwrap();

    let (mut rx, _health) = follow(&config, &FOLLOWED).await;
    let mut sent = Vec::new();
    for i in 0..100 {
        let room = FOLLOWED[i % 3];
        sent.push(
            store
                .append(&post(room, &format!("message {i}")), None)
                .await
                .unwrap()
                .message,
        );
    }
    let got = receive(&mut rx, sent.len()).await;
    for room in FOLLOWED {
        assert_eq!(
            of_room(&got, room),
            of_room(&sent, room),
            "same messages, same ids, same order in {room}; nothing from before the start"
        );
    }
    // Nothing delivered twice: a fence message is the next thing delivered.
    let fence = append_numbered(&store, "rooma", "fence", 1).await;
    assert_eq!(receive(&mut rx, 1).await, fence, "no duplicate deliveries");
}

/// How many connections are subscribed to each of `channels`.
async fn subscribers(conn: &mut redis::aio::MultiplexedConnection, channels: &[&str]) -> Vec<i64> {
    let counts: Vec<(String, i64)> = redis::cmd("PUBSUB")
        .arg("SHARDNUMSUB")
        .arg(channels)
        .query_async(conn)
        .await
        .unwrap();
    counts.into_iter().map(|(_, count)| count).collect()
}

/// A frontend hears of the rooms it follows only: Redis pushes it nothing
/// of the others, and it reads nothing of them.
#[tokio::test(flavor = "multi_thread")]
async fn a_feed_hears_only_the_rooms_it_follows() {
    let Setup {
        redis,
        config,
        _dir,
        store,
        mut rx,
        ..
    } = Setup::start().await;
    let mut conn = connect(&redis).await;
    let followed = room_key(&config, "rooma");
    let other = room_key(&config, "elsewhere");
    assert_eq!(subscribers(&mut conn, &[&followed, &other]).await, [1, 0]);

    let mut sent = Vec::new();
    for i in 0..20 {
        append_numbered(&store, "elsewhere", &format!("not followed {i}"), 1).await;
        sent.extend(append_numbered(&store, "rooma", &format!("followed {i}"), 1).await);
    }
    assert_eq!(receive(&mut rx, sent.len()).await, sent);
    let fence = append_numbered(&store, "rooma", "fence", 1).await;
    assert_eq!(
        receive(&mut rx, 1).await,
        fence,
        "nothing of the other room"
    );
}

/// A subscriber that forwards what it is handed, and says which rooms the
/// feed let go.
struct Leaving {
    messages: mpsc::UnboundedSender<ChatMessage>,
    left: mpsc::UnboundedSender<Room>,
}

impl chat_ha::delivery::Subscriber for Leaving {
    async fn deliver(&self, messages: Vec<ChatMessage>) {
        for message in messages {
            let _ = self.messages.send(message);
        }
    }
    async fn left(&self, room: &Room) {
        let _ = self.left.send(room.clone());
    }
}

/// A room nobody is in is let go after the grace period, not before: a
/// client that comes back within it finds the room still followed. Once
/// let go, the room is followed again from its newest message.
#[tokio::test(flavor = "multi_thread")]
async fn a_room_left_is_let_go_after_the_grace_and_can_be_followed_again() {
    let redis = Redis::start();
    let (config, _dir) = config(&redis);
    let store = Store::new(&config).unwrap();
    let (feed, interest) = Feed::new(&config, RedisHealth::new()).unwrap();
    let (messages, mut rx) = mpsc::unbounded_channel();
    let (left, mut gone) = mpsc::unbounded_channel();
    tokio::spawn(feed.run(Arc::new(Leaving { messages, left })));
    let mut conn = connect(&redis).await;
    let channel = room_key(&config, "rooma");
    follow_rooms(&interest, &["rooma", "roomb"]).await;

    // Left, and joined again at once: still followed, nothing missed.
    interest.leave(&room("rooma"));
    follow_rooms(&interest, &["rooma"]).await;
    let kept = append_numbered(&store, "rooma", "kept", 3).await;
    assert_eq!(receive(&mut rx, 3).await, kept);

    // Left for good: let go once the grace is over. Another room left and
    // kept (someone came in without waiting for the feed) stays followed.
    let started = std::time::Instant::now();
    interest.leave(&room("rooma"));
    interest.leave(&room("roomb"));
    interest.keep(&room("roomb"));
    let let_go = tokio::time::timeout(Duration::from_secs(20), gone.recv())
        .await
        .expect("the room is let go")
        .unwrap();
    assert_eq!(let_go, room("rooma"));
    assert!(started.elapsed() >= chat_ha::delivery::LEAVE_GRACE);
    let still = append_numbered(&store, "roomb", "still followed", 1).await;
    assert_eq!(receive(&mut rx, 1).await, still);
    assert!(gone.try_recv().is_err(), "only rooma was let go");
    // The subscription is dropped as the room is let go.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while subscribers(&mut conn, &[&channel]).await != [0] {
        assert!(std::time::Instant::now() < deadline, "still subscribed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let unheard = append_numbered(&store, "rooma", "while let go", 2).await;

    // Followed again: from the newest message, which the feed answers.
    let from = interest
        .follow(&room("rooma"), Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(from, unheard[1].id);
    assert_eq!(subscribers(&mut conn, &[&channel]).await, [1]);
    let again = append_numbered(&store, "rooma", "again", 2).await;
    assert_eq!(
        receive(&mut rx, 2).await,
        again,
        "nothing from while it was let go"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn feed_resumes_after_its_connection_is_killed_without_loss_or_duplicate() {
    let Setup {
        redis,
        _dir,
        store,
        mut rx,
        health,
        ..
    } = Setup::start().await;

    let mut sent = Vec::new();
    for i in 0..300 {
        if i % 50 == 25 {
            // Drops every connection of the feed (and the store, which reconnects too).
            kill_other_clients(&redis).await;
        }
        sent.push(append_acknowledged(&store, &post("rooma", &format!("m{i}"))).await);
    }
    let got = receive(&mut rx, sent.len()).await;
    assert_eq!(got, sent);
    assert!(health.losses() >= 1, "the feed really lost its connection");
}

/// A subscriber that forwards what it is handed, each handing only once
/// the test lets it through (a permit of `gate`); `waiting` says when the
/// feed is held at it. While the feed is held, what Redis pushes queues up.
struct Gated {
    tx: mpsc::UnboundedSender<ChatMessage>,
    gate: Arc<tokio::sync::Semaphore>,
    waiting: Arc<tokio::sync::Notify>,
}

impl chat_ha::delivery::Subscriber for Gated {
    async fn left(&self, _room: &Room) {}
    async fn deliver(&self, messages: Vec<ChatMessage>) {
        self.waiting.notify_one();
        self.gate.acquire().await.unwrap().forget();
        for message in messages {
            let _ = self.tx.send(message);
        }
    }
}

/// A message whose push the feed takes together with the news that its
/// connection is gone is delivered all the same: the feed's cursor has
/// moved past it, so a message dropped there would never come again.
#[tokio::test(flavor = "multi_thread")]
async fn a_message_pushed_just_before_the_connection_drops_is_delivered() {
    let redis = Redis::start();
    let (config, _dir) = config(&redis);
    let store = Store::new(&config).unwrap();
    let health = RedisHealth::new();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let waiting = Arc::new(tokio::sync::Notify::new());
    let subscriber = Gated {
        tx,
        gate: gate.clone(),
        waiting: waiting.clone(),
    };
    let (feed, interest) = Feed::new(&config, health.clone()).unwrap();
    tokio::spawn(feed.run(Arc::new(subscriber)));
    follow_rooms(&interest, &["rooma"]).await;

    // The feed takes the first message and is held handing it over; the
    // second one's push queues up behind it, then the connection drops.
    let first = append_numbered(&store, "rooma", "first", 1).await;
    waiting.notified().await;
    let second = append_numbered(&store, "rooma", "second", 1).await;
    kill_other_clients(&redis).await;
    gate.add_permits(1000);

    assert_eq!(receive(&mut rx, 2).await, [first, second].concat());
    let third = append_acknowledged(&store, &post("rooma", "third")).await;
    assert_eq!(receive(&mut rx, 1).await, [third], "the next one, once");
}

/// A subscriber that passes on each delivery whole: the messages the feed
/// handed over together.
struct Batches(mpsc::UnboundedSender<Vec<ChatMessage>>);

impl chat_ha::delivery::Subscriber for Batches {
    async fn left(&self, _room: &Room) {}
    async fn deliver(&self, messages: Vec<ChatMessage>) {
        let _ = self.0.send(messages);
    }
}

/// A feed with the `[frontend]` settings `extra`, whose deliveries arrive
/// whole in `batches`.
struct WindowedFeed {
    _redis: Redis,
    _dir: tempfile::TempDir,
    store: Store,
    batches: mpsc::UnboundedReceiver<Vec<ChatMessage>>,
}

impl WindowedFeed {
    async fn start(extra: &str) -> Self {
        let redis = Redis::start();
        let dir = tempfile::tempdir().unwrap();
        let path = write_config(dir.path(), &redis.url(), extra);
        let config = Config::load(&path, true).unwrap();
        let store = Store::new(&config).unwrap();
        let health = RedisHealth::new();
        let (tx, batches) = mpsc::unbounded_channel();
        let (feed, interest) = Feed::new(&config, health).unwrap();
        tokio::spawn(feed.run(Arc::new(Batches(tx))));
        follow_rooms(&interest, &FOLLOWED).await;
        WindowedFeed {
            _redis: redis,
            _dir: dir,
            store,
            batches,
        }
    }
}

impl WindowedFeed {
    /// The next delivery, within 10 s.
    async fn next(&mut self) -> Vec<ChatMessage> {
        tokio::time::timeout(Duration::from_secs(10), self.batches.recv())
            .await
            .expect("a delivery within 10 s")
            .unwrap()
    }

    /// The deliveries that bring `count` messages in all.
    async fn deliveries(&mut self, count: usize) -> Vec<Vec<ChatMessage>> {
        let mut deliveries = Vec::new();
        let mut received = 0;
        while received < count {
            let batch = self.next().await;
            received += batch.len();
            deliveries.push(batch);
        }
        deliveries
    }
}

/// With a write window, the first message after a quiet spell is handed
/// over alone, and the messages that follow within the window are handed
/// over together: one write per socket for all of them. Nothing is lost,
/// repeated or reordered.
#[tokio::test(flavor = "multi_thread")]
async fn a_write_window_hands_a_burst_over_together_in_order() {
    // The longest window: a burst fits in it even on a busy machine.
    let mut feed = WindowedFeed::start("write_window_us = 100000").await;

    let first = append_numbered(&feed.store, "rooma", "first", 1).await;
    assert_eq!(feed.next().await, first, "alone, after a quiet spell");
    // Ten posts one after the other, each waiting for its answer, within
    // the window the first delivery opened (100 ms: one append takes well
    // under a millisecond). Without a window each would go out on its own.
    let mut sent = Vec::new();
    for i in 0..10 {
        let room = ["rooma", "roomb"][i % 2];
        sent.extend(append_numbered(&feed.store, room, &format!("burst {i}"), 1).await);
    }
    let deliveries = feed.deliveries(sent.len()).await;
    assert_eq!(
        deliveries.concat(),
        sent,
        "every message once, in feed order"
    );
    // Two at most: a burst on a very busy machine may straddle the end of
    // the window once.
    let count = deliveries.len();
    assert!(count <= 2, "the burst in {count} deliveries");
}

/// The window ends early once a quarter of `frontend.max_queued_bytes` of
/// text waits: what it joins always fits in a socket's send queue, so a
/// burst of long messages never makes a socket that keeps up look slow.
#[tokio::test(flavor = "multi_thread")]
async fn a_write_window_hands_over_at_most_a_quarter_of_the_send_queue_at_once() {
    let mut feed = WindowedFeed::start("write_window_us = 100000\nmax_queued_bytes = 65536").await;

    let first = append_numbered(&feed.store, "rooma", "first", 1).await;
    assert_eq!(feed.next().await, first);
    // 40 messages of 1,000 characters, 40,000 in all, within the window
    // the first delivery opened: without the bound, one or two deliveries.
    let mut sent = Vec::new();
    for i in 0..40 {
        let text = format!("{i:03} {}", "x".repeat(996));
        sent.push(
            feed.store
                .append(&post("rooma", &text), None)
                .await
                .unwrap()
                .message,
        );
    }
    let quarter = 65536 / 4;
    let deliveries = feed.deliveries(sent.len()).await;
    for batch in &deliveries {
        let bytes: usize = batch.iter().map(|m| m.message.len()).sum();
        // The message that reached the bound is the last one taken.
        assert!(
            bytes < quarter + 1000,
            "a delivery of {bytes} bytes of text, past {quarter} and the message that reached it"
        );
    }
    assert_eq!(
        deliveries.concat(),
        sent,
        "every message once, in feed order"
    );
    let count = deliveries.len();
    assert!(count >= 3, "40,000 bytes in {count} deliveries");
}

#[tokio::test(flavor = "multi_thread")]
async fn feed_resumes_after_redis_restarts_and_reports_its_health() {
    let Setup {
        mut redis,
        _dir,
        store,
        mut rx,
        health,
        ..
    } = Setup::start().await;

    let sent = append_numbered(&store, "rooma", "before", 20).await;
    let before = receive(&mut rx, 20).await;
    assert_eq!(before, sent);

    redis.stop();
    tokio::time::timeout(Duration::from_secs(10), async {
        while health.is_up() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the feed notices Redis is gone");
    redis.restart();

    let mut after = Vec::new();
    for i in 0..20 {
        after.push(append_acknowledged(&store, &post("rooma", &format!("after {i}"))).await);
    }
    assert_eq!(receive(&mut rx, 20).await, after);
    wait_up(&health).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn feed_skips_entries_the_backend_did_not_write_and_delivers_what_follows() {
    let Setup {
        redis,
        config,
        _dir,
        store,
        mut rx,
        ..
    } = Setup::start().await;

    // Written by something else: a field missing, a text that is not UTF-8.
    let mut conn = connect(&redis).await;
    let stream = room_key(&config, "rooma");
    let foreign: [&[(&str, &[u8])]; 2] = [&[("x", b"no text")], &[("m", &[0x68, 0xff, 0xfe])]];
    for fields in foreign {
        let mut xadd = redis::cmd("XADD");
        xadd.arg(&stream).arg("*");
        for (field, value) in fields {
            xadd.arg(*field).arg(*value);
        }
        let _: String = xadd.query_async(&mut conn).await.unwrap();
    }
    let after = store
        .append(&post("rooma", "after the foreign entries"), None)
        .await
        .unwrap()
        .message;
    assert_eq!(receive(&mut rx, 1).await, vec![after]);
}

/// Appends an entry to a room's stream without a push, as something else
/// than the backend could.
async fn append_without_push(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    text: &str,
) -> StreamId {
    let id: String = redis::cmd("XADD")
        .arg(stream)
        .arg("*")
        .arg("m")
        .arg(text)
        .query_async(conn)
        .await
        .unwrap();
    StreamId::parse(&id).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn feed_delivers_entries_that_were_not_pushed_in_order() {
    let Setup {
        redis,
        config,
        _dir,
        store,
        mut rx,
        caught_up,
        ..
    } = Setup::start().await;
    let mut conn = connect(&redis).await;
    let feed = room_key(&config, "rooma");

    // Between two pushed messages: the second one's push reveals the gap.
    let first = store.append(&post("rooma", "first"), None).await.unwrap();
    let unpushed = append_without_push(&mut conn, &feed, "not pushed").await;
    let last = store.append(&post("rooma", "last"), None).await.unwrap();
    let got = receive(&mut rx, 3).await;
    let texts: Vec<_> = got.iter().map(|m| (m.id, m.message.as_str())).collect();
    assert_eq!(
        texts,
        [
            (first.message.id, "first"),
            (unpushed, "not pushed"),
            (last.message.id, "last"),
        ]
    );

    // Last in the room, with no push after it: found by the periodic read.
    let tail = append_without_push(&mut conn, &feed, "the tail").await;
    let got = receive(&mut rx, 1).await;
    assert_eq!((got[0].id, got[0].message.as_str()), (tail, "the tail"));
    // Nothing delivered twice: a fence message is the next thing delivered.
    let fence = append_numbered(&store, "rooma", "fence", 1).await;
    assert_eq!(receive(&mut rx, 1).await, fence, "no duplicate deliveries");
    // The two entries not pushed; "last" too when its push revealed the gap,
    // and "first" and the fence if a periodic read came before their push.
    let read = caught_up.get();
    assert!(
        (2..=5).contains(&read),
        "{read} messages read from the stream"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn feed_follows_pushes_and_reads_the_stream_only_to_catch_up() {
    let Setup {
        redis,
        _dir,
        store,
        mut rx,
        caught_up,
        ..
    } = Setup::start().await;
    let mut conn = connect(&redis).await;
    let stream_reads = async |conn: &mut redis::aio::MultiplexedConnection| {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(conn)
            .await
            .unwrap();
        info.lines()
            .filter(|l| l.starts_with("cmdstat_xrange:") || l.starts_with("cmdstat_xread:"))
            .filter_map(|l| {
                l.split("calls=")
                    .nth(1)?
                    .split(',')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum::<u64>()
    };

    let before = stream_reads(&mut conn).await;
    let sent = append_numbered(&store, "rooma", "m", 200).await;
    assert_eq!(receive(&mut rx, sent.len()).await, sent);
    let reads = stream_reads(&mut conn).await - before;
    // One read every two seconds while this runs (and the first), none per message.
    assert!(reads <= 10, "200 messages took {reads} reads of the stream");
    // A periodic read finds the messages whose pushes are on their way, one
    // or two at a time here, where each append waits for the one before.
    let read = caught_up.get();
    assert!(read <= 10, "{read} of 200 messages read from the stream");
}

/// Stream entries as Redis sends them: ids with field-value pairs.
type RawEntries = Vec<(String, Vec<(Vec<u8>, Vec<u8>)>)>;

/// A room keeps about `max_per_room` messages, dropping the oldest (Redis
/// trims whole nodes of the stream at once, so up to a node more stay), and
/// its history expires `room_ttl_days` after its last post; the frontends
/// still get every message.
#[tokio::test(flavor = "multi_thread")]
async fn a_room_is_bounded_and_expires_when_idle() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let extra = "[history]\nmax_per_room = 50\nroom_ttl_days = 2\n";
    let path = write_config(dir.path(), &redis.url(), extra);
    let config = Config::load(&path, true).unwrap();
    let store = Store::new(&config).unwrap();
    let (mut rx, _health) = follow(&config, &["heavy"]).await;
    let mut conn = connect(&redis).await;

    let mut sent = append_numbered(&store, "heavy", "m", 400).await;
    let stream = room_key(&config, "heavy");
    let length: usize = redis::cmd("XLEN")
        .arg(&stream)
        .query_async(&mut conn)
        .await
        .unwrap();
    // A node of the stream holds at most 100 entries (stream-node-max-entries).
    assert!((50..=150).contains(&length), "{length} entries kept");
    let newest: RawEntries = redis::cmd("XREVRANGE")
        .arg(&stream)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(newest[0].0, sent[399].id.to_string(), "the newest are kept");

    let ttl = redis::cmd("TTL").arg(&stream).to_owned();
    let two_days = 2 * 86400 - 60..=2 * 86400;
    assert!(two_days.contains(&ttl.query_async::<i64>(&mut conn).await.unwrap()));
    // Nearly expired, then a post: the room has two days again.
    let _: () = redis::cmd("EXPIRE")
        .arg(&stream)
        .arg(5)
        .query_async(&mut conn)
        .await
        .unwrap();
    sent.push(
        store
            .append(&post("heavy", "still here"), None)
            .await
            .unwrap()
            .message,
    );
    assert!(two_days.contains(&ttl.query_async::<i64>(&mut conn).await.unwrap()));
    assert_eq!(receive(&mut rx, sent.len()).await, sent);
}

/// Publishes on a room's channel, as anyone who may publish there could.
async fn publish_forged(
    conn: &mut redis::aio::MultiplexedConnection,
    config: &Config,
    payload: &str,
) {
    let _: i64 = redis::cmd("SPUBLISH")
        .arg(room_key(config, "rooma"))
        .arg(payload)
        .query_async(conn)
        .await
        .unwrap();
}

/// A stream id `ahead` of this host's clock.
fn id_ahead_of_now(ahead: Duration) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    format!("{}-0", (now + ahead).as_millis())
}

/// The id of the newest entry of `rooma`.
async fn newest_id(conn: &mut redis::aio::MultiplexedConnection, config: &Config) -> String {
    let newest: RawEntries = redis::cmd("XREVRANGE")
        .arg(room_key(config, "rooma"))
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(conn)
        .await
        .unwrap();
    newest[0].0.clone()
}

/// A push is a hint: one naming an id far in the future is not taken, and
/// one naming an id a little ahead, though taken, does not make the
/// frontend skip the real messages that follow it.
#[tokio::test(flavor = "multi_thread")]
async fn forged_pushes_do_not_stop_delivery() {
    let Setup {
        redis,
        config,
        _dir,
        store,
        mut rx,
        ..
    } = Setup::start().await;
    let mut conn = connect(&redis).await;
    let mut sent = append_numbered(&store, "rooma", "before", 3).await;
    assert_eq!(receive(&mut rx, 3).await, sent);

    // Far ahead, following on from the real last id: not taken.
    let last = newest_id(&mut conn, &config).await;
    publish_forged(
        &mut conn,
        &config,
        &format!("{last} 99999999999999-0 far ahead"),
    )
    .await;
    let after_far = append_numbered(&store, "rooma", "after far", 3).await;
    assert_eq!(receive(&mut rx, 3).await, after_far);
    sent.extend(after_far);

    // Thirty seconds ahead: taken (and so delivered), then the next real
    // push names an id behind it that was never handed out, and the stream
    // is read again from the last confirmed entry.
    let last = newest_id(&mut conn, &config).await;
    let ahead = id_ahead_of_now(Duration::from_secs(30));
    publish_forged(
        &mut conn,
        &config,
        &format!("{last} {ahead} a little ahead"),
    )
    .await;
    let forged = receive(&mut rx, 1).await;
    assert_eq!(
        (forged[0].id.to_string(), forged[0].message.as_str()),
        (ahead, "a little ahead")
    );
    let after_near = append_numbered(&store, "rooma", "after near", 5).await;
    assert_eq!(
        receive(&mut rx, 5).await,
        after_near,
        "every real message, once, in order"
    );

    // Nothing more comes: a fence message is the next thing delivered.
    let fence = append_numbered(&store, "rooma", "fence", 1).await;
    assert_eq!(receive(&mut rx, 1).await, fence);
}

/// A forged push that is followed by no real push is found out by the
/// periodic read of the stream, which does not hold its id.
#[tokio::test(flavor = "multi_thread")]
async fn a_forged_cursor_is_found_out_by_the_periodic_read() {
    let Setup {
        redis,
        config,
        _dir,
        store,
        mut rx,
        ..
    } = Setup::start().await;
    let mut conn = connect(&redis).await;
    let feed = room_key(&config, "rooma");
    let first = append_numbered(&store, "rooma", "first", 1).await;
    assert_eq!(receive(&mut rx, 1).await, first);
    let last = newest_id(&mut conn, &config).await;
    let ahead = id_ahead_of_now(Duration::from_secs(30));
    publish_forged(&mut conn, &config, &format!("{last} {ahead} forged")).await;
    assert_eq!(receive(&mut rx, 1).await[0].message, "forged");
    // Written without a push, behind the forged id: only a read finds it.
    let unpushed = append_without_push(&mut conn, &feed, "not pushed").await;
    let got = receive(&mut rx, 1).await;
    assert_eq!(
        (got[0].id, got[0].message.as_str()),
        (unpushed, "not pushed")
    );
}
