//! chat-ha on a real Redis Cluster (three primaries, three replicas, on
//! loopback): messages of rooms in every shard reach the feeds that follow
//! them, once and in order, a resuming client reads what it missed, and a
//! primary killed under a stream of posts loses no acknowledged message.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chat_ha::config::Config;
use chat_ha::delivery::shards::slot;
use chat_ha::delivery::{Feed, Interest, Keys, RedisHealth, Store};
use chat_ha::message::{ChatMessage, Room, StreamId};
use common::cluster::Cluster;
use common::{Forward, post};
use tokio::sync::mpsc;

/// The longest any awaited event may take: a failover takes a few seconds.
const PATIENCE: Duration = Duration::from_secs(30);

/// A configuration of cluster mode, found through every node.
fn config(cluster: &Cluster, dir: &std::path::Path, extra: &str) -> Config {
    let seeds: Vec<String> = cluster.nodes.iter().map(|node| node.url()).collect();
    config_with_seeds(&seeds, dir, extra)
}

/// A configuration of cluster mode, found through `seeds`.
fn config_with_seeds(seeds: &[String], dir: &std::path::Path, extra: &str) -> Config {
    let seeds: Vec<String> = seeds.iter().map(|url| format!("\"{url}\"")).collect();
    let path = dir.join("chat-ha.toml");
    let text = format!(
        "[redis]\ncluster = [{}]\ncommand_timeout_ms = 1000\nreconnect_min_ms = 50\n\
         reconnect_max_ms = 500\n{extra}\n",
        seeds.join(", ")
    );
    std::fs::write(&path, text).unwrap();
    Config::load(&path, true).unwrap()
}

/// Gives every node of `cluster` the `chat-ha` user of the shipped ACL, and
/// returns the `[redis]` settings that log in as it (its password in a file
/// in `dir`).
fn as_chat_ha_user(cluster: &Cluster, dir: &std::path::Path) -> String {
    const PASSWORD: &str = "cluster-acl-test-password";
    let rules = common::chat_ha_acl_rules(&format!(">{PASSWORD}"));
    for node in &cluster.nodes {
        let _: () = node.query(redis::cmd("ACL").arg("SETUSER").arg(&rules));
    }
    let password = dir.join("redis-password");
    std::fs::write(&password, format!("{PASSWORD}\n")).unwrap();
    format!(
        "username = \"chat-ha\"\npassword_file = \"{}\"\n",
        password.display()
    )
}

/// Rooms whose keys are on each primary, `per_primary` of each.
fn rooms_on_every_primary(cluster: &Cluster, config: &Config, per_primary: usize) -> Vec<Room> {
    let keys = Keys::new(&config.redis);
    let mut rooms: BTreeMap<usize, Vec<Room>> = BTreeMap::new();
    for n in 0.. {
        let room = Room::parse(&format!("room-{n}")).unwrap();
        let owner = cluster.owner(slot(&keys.room(&room)));
        let on = rooms.entry(owner).or_default();
        if on.len() < per_primary {
            on.push(room);
        }
        if rooms.len() == cluster.primaries().len()
            && rooms.values().all(|r| r.len() == per_primary)
        {
            break;
        }
    }
    rooms.into_values().flatten().collect()
}

/// A feed of `config` following `rooms`, and what it delivers.
async fn follow(
    config: &Config,
    rooms: &[Room],
) -> (Interest, mpsc::UnboundedReceiver<ChatMessage>) {
    let (feed, interest) = Feed::new(config, RedisHealth::new()).unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(feed.run(Arc::new(Forward(tx))));
    for room in rooms {
        interest
            .follow(room, PATIENCE)
            .await
            .unwrap_or_else(|| panic!("the feed follows {room} on the cluster"));
    }
    (interest, rx)
}

async fn receive(rx: &mut mpsc::UnboundedReceiver<ChatMessage>, count: usize) -> Vec<ChatMessage> {
    let mut got = Vec::with_capacity(count);
    while got.len() < count {
        match tokio::time::timeout(PATIENCE, rx.recv()).await {
            Ok(Some(message)) => got.push(message),
            _ => panic!("received {} of {count} messages", got.len()),
        }
    }
    got
}

fn by_room(messages: &[ChatMessage]) -> BTreeMap<String, Vec<ChatMessage>> {
    let mut rooms: BTreeMap<String, Vec<ChatMessage>> = BTreeMap::new();
    for message in messages {
        rooms
            .entry(message.room.as_str().to_owned())
            .or_default()
            .push(message.clone());
    }
    rooms
}

/// Two feeds, as two frontends would, each following rooms on every
/// primary (one room in common): each gets every message of its rooms,
/// once, in the room's order, and nothing else; a client resuming a room
/// reads what it missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_in_every_shard_reach_the_feeds_that_follow_them() {
    let cluster = tokio::task::block_in_place(Cluster::start);
    let dir = tempfile::tempdir().unwrap();
    let config = config(&cluster, dir.path(), "min_replicas_acked = 1\n");
    let rooms = rooms_on_every_primary(&cluster, &config, 2);
    let (first, second) = (&rooms[..rooms.len() / 2 + 1], &rooms[rooms.len() / 2..]);
    let (_one, mut one) = follow(&config, first).await;
    let (_two, mut two) = follow(&config, second).await;
    let store = Store::new(&config).unwrap();

    let mut sent = Vec::new();
    for i in 0..60 {
        let room = &rooms[i % rooms.len()];
        let message = post(room.as_str(), &format!("message {i}"));
        sent.push(store.append(&message, None).await.unwrap().message);
    }
    let wanted = |rooms: &[Room]| -> Vec<ChatMessage> {
        sent.iter()
            .filter(|m| rooms.contains(&m.room))
            .cloned()
            .collect()
    };
    for (rx, rooms) in [(&mut one, first), (&mut two, second)] {
        let expected = wanted(rooms);
        let got = receive(rx, expected.len()).await;
        assert_eq!(
            by_room(&got),
            by_room(&expected),
            "each room once, in order"
        );
    }
    // Nothing more: a fence in a room both follow is the next thing each gets.
    let shared = &rooms[rooms.len() / 2];
    let fence = store
        .append(&post(shared.as_str(), "fence"), None)
        .await
        .unwrap()
        .message;
    assert_eq!(receive(&mut one, 1).await, std::slice::from_ref(&fence));
    assert_eq!(receive(&mut two, 1).await, std::slice::from_ref(&fence));

    // A client that saw the room's first message resumes from it.
    let history: Vec<ChatMessage> = sent.iter().filter(|m| m.room == *shared).cloned().collect();
    let page = store
        .page(shared, history[0].id, fence.id, 100, 1 << 20)
        .await
        .unwrap();
    let mut missed = history[1..].to_vec();
    missed.push(fence);
    assert_eq!(page, missed);
}

/// How a primary fails.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    /// SIGKILL: its connections are reset at once; it is restarted.
    Killed,
    /// SIGSTOP: it stops answering on open connections, as a host powered
    /// off does; it goes on (SIGCONT) later, as the host powered on.
    Frozen,
}

/// A primary killed with SIGKILL under a stream of posts to rooms on every
/// shard: posts to the other shards never fail; posts to its shard fail
/// (503, retried with their key) until its replica has taken over and has
/// a replica again (the killed node, restarted), as a post is acknowledged
/// only once a replica holds it; every acknowledged message reaches the
/// feed once, in its room's order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_killed_under_posts_loses_no_acknowledged_message() {
    a_primary_fails_under_posts(Fault::Killed).await;
}

/// The same with a primary that stops answering without closing its
/// connections, as a host powered off: posts to the other shards never
/// fail either, though requests to it hang until they time out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_that_stops_answering_under_posts_loses_no_acknowledged_message() {
    a_primary_fails_under_posts(Fault::Frozen).await;
}

/// What the posters of [`a_primary_fails_under_posts`] record.
#[derive(Default)]
struct Posted {
    acknowledged: Vec<ChatMessage>,
    /// Failed tries: the room, when, and why.
    failed: Vec<(Room, Instant, String)>,
}

/// Posts to `room` one message after another, each retried with its key
/// until acknowledged (as a client given 503 does), until `stop`.
async fn keep_posting(
    store: Arc<Store>,
    room: Room,
    posted: Arc<std::sync::Mutex<Posted>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    use std::sync::atomic::Ordering;
    for i in 0.. {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let key = chat_ha::message::IdempotencyKey::parse(&format!("post-{i}")).unwrap();
        let key = chat_ha::delivery::PostKey::message(&key, &room);
        let message = post(room.as_str(), &format!("post {i}"));
        loop {
            match store.append(&message, Some(&key)).await {
                Ok(appended) => {
                    posted.lock().unwrap().acknowledged.push(appended.message);
                    break;
                }
                Err(e) => {
                    let failure = (room.clone(), Instant::now(), e.to_string());
                    posted.lock().unwrap().failed.push(failure);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until `enough` says yes of what was posted.
async fn wait_posted(
    posted: &std::sync::Mutex<Posted>,
    what: &str,
    enough: impl Fn(&Posted) -> bool,
) {
    wait_for(what, || enough(&posted.lock().unwrap())).await;
}

/// Waits until `ready` says yes.
async fn wait_for(what: &str, ready: impl Fn() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !ready() {
        assert!(Instant::now() < deadline, "waited {PATIENCE:?} for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn a_primary_fails_under_posts(fault: Fault) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut cluster = tokio::task::block_in_place(Cluster::start);
    let dir = tempfile::tempdir().unwrap();
    let config = config(&cluster, dir.path(), "min_replicas_acked = 1\n");
    let rooms = rooms_on_every_primary(&cluster, &config, 1);
    let keys = Keys::new(&config.redis);
    // The room on the primary with the lowest port: the node a command with
    // no key (the status check's PING) went to first.
    let owner_port = |room: &Room| cluster.nodes[cluster.owner(slot(&keys.room(room)))].port;
    let victim_room = rooms
        .iter()
        .min_by_key(|room| owner_port(room))
        .unwrap()
        .clone();
    let victim_slot = slot(&keys.room(&victim_room));
    let victim = cluster.owner(victim_slot);
    let replica = cluster.replica_of(victim);
    let (_interest, mut rx) = follow(&config, &rooms).await;
    let store = Arc::new(Store::new(&config).unwrap());
    let posted = Arc::new(std::sync::Mutex::new(Posted::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let posters: Vec<_> = rooms
        .iter()
        .map(|room| {
            tokio::spawn(keep_posting(
                store.clone(),
                room.clone(),
                posted.clone(),
                stop.clone(),
            ))
        })
        .collect();
    let acked_in = |p: &Posted, victims: bool| {
        p.acknowledged
            .iter()
            .filter(|m| (m.room == victim_room) == victims)
            .count()
    };
    wait_posted(&posted, "30 posts", |p| p.acknowledged.len() >= 30).await;

    let fault_at = Instant::now();
    tokio::task::block_in_place(|| match fault {
        Fault::Killed => cluster.kill(victim),
        Fault::Frozen => cluster.freeze(victim),
    });
    // Its replica takes over; the other shards take posts all along.
    tokio::task::block_in_place(|| cluster.wait_owner(victim_slot, replica));
    let failover = fault_at.elapsed();
    // The status check still finds Redis: the other primaries answer.
    assert!(store.ping().await, "Redis is up for the status check");
    let others = acked_in(&posted.lock().unwrap(), false);
    wait_posted(&posted, "30 more posts to the other shards", |p| {
        acked_in(p, false) >= others + 30
    })
    .await;
    // The failed node comes back (restarted, as systemd does; or powered on)
    // as the new primary's replica, and replicas hold posts again.
    let victims = acked_in(&posted.lock().unwrap(), true);
    tokio::task::block_in_place(|| {
        match fault {
            Fault::Killed => cluster.restart(victim),
            Fault::Frozen => cluster.thaw(victim),
        }
        cluster.wait_replica(victim, replica);
    });
    wait_posted(&posted, "posts to the failed shard again", |p| {
        acked_in(p, true) >= victims + 10
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for poster in posters {
        poster.await.unwrap();
    }
    let Posted {
        acknowledged,
        failed,
    } = std::mem::take(&mut *posted.lock().unwrap());
    let back_after = failed
        .iter()
        .filter(|(room, _, _)| *room == victim_room)
        .map(|(_, at, _)| *at)
        .max()
        .map(|last| last.duration_since(fault_at));
    println!(
        "{fault:?}: failover after {failover:?}; the last failed post to the failed shard \
         {back_after:?} after the fault"
    );
    let failed_elsewhere: Vec<_> = failed
        .iter()
        .filter(|(room, _, _)| *room != victim_room)
        .map(|(room, at, e)| format!("{room} at +{:?}: {e}", at.duration_since(fault_at)))
        .collect();
    assert!(
        failed_elsewhere.is_empty(),
        "posts to other shards failed: {failed_elsewhere:?}"
    );
    // Each acknowledged message once: a repeat with the key returns it.
    let unique: BTreeSet<(String, StreamId)> = acknowledged
        .iter()
        .map(|m| (m.room.as_str().to_owned(), m.id))
        .collect();
    assert_eq!(unique.len(), acknowledged.len());
    let got = receive(&mut rx, acknowledged.len()).await;
    assert_eq!(
        by_room(&got),
        by_room(&acknowledged),
        "every acknowledged message once, in order"
    );
    let fence = store
        .append(&post(victim_room.as_str(), "fence"), None)
        .await
        .unwrap()
        .message;
    assert_eq!(receive(&mut rx, 1).await, [fence], "nothing twice");
}

/// A shard that stops answering, its primary and its replica both (so that
/// no failover ends it), holds up only its own rooms: while it is silent
/// the feed delivers the other rooms' messages as before, still counts
/// Redis as up, and says how many rooms wait; once the shard answers again
/// its rooms are read on from their cursors, and nothing is lost or
/// delivered twice. The daemons log in as the shipped ACL's user, as in
/// production: asking the shard whether it answers again is within it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_shard_holds_up_only_its_own_rooms() {
    let mut cluster = tokio::task::block_in_place(Cluster::start);
    let dir = tempfile::tempdir().unwrap();
    let extra = as_chat_ha_user(&cluster, dir.path());
    let config = config(&cluster, dir.path(), &(extra + "min_replicas_acked = 1\n"));
    let rooms = rooms_on_every_primary(&cluster, &config, 2);
    let keys = Keys::new(&config.redis);
    let owner = |room: &Room| cluster.owner(slot(&keys.room(room)));
    let victim = owner(&rooms[0]);
    let replica = cluster.replica_of(victim);
    let (silent, others): (Vec<Room>, Vec<Room>) = rooms
        .iter()
        .cloned()
        .partition(|room| owner(room) == victim);
    let health = RedisHealth::new();
    let (feed, interest) = Feed::new(&config, health.clone()).unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(feed.run(Arc::new(Forward(tx))));
    for room in &rooms {
        interest.follow(room, PATIENCE).await.unwrap();
    }
    let store = Store::new(&config).unwrap();
    let post_to = async |rooms: &[Room], count: usize, what: &str| {
        let mut sent = Vec::new();
        for i in 0..count {
            let room = rooms[i % rooms.len()].as_str();
            let message = post(room, &format!("{what} {i}"));
            sent.push(store.append(&message, None).await.unwrap().message);
        }
        sent
    };
    let before = post_to(&rooms, 12, "before").await;
    assert_eq!(by_room(&receive(&mut rx, 12).await), by_room(&before));

    tokio::task::block_in_place(|| {
        cluster.freeze(victim);
        cluster.freeze(replica);
    });
    // The feed finds the shard silent when it next reads one of its rooms
    // (its sweep reads every room within a few seconds).
    wait_for("the silent shard's rooms to wait", || {
        health.rooms_waiting() == silent.len()
    })
    .await;
    assert!(health.is_up(), "Redis is up: the other shards answer");
    let during = post_to(&others, 20, "during").await;
    assert_eq!(
        by_room(&receive(&mut rx, 20).await),
        by_room(&during),
        "the other rooms are delivered while a shard is silent"
    );
    assert_eq!(health.rooms_waiting(), silent.len());
    assert!(health.is_up());

    tokio::task::block_in_place(|| {
        cluster.thaw(replica);
        cluster.thaw(victim);
    });
    wait_for("the rooms to be read on", || health.rooms_waiting() == 0).await;
    let after = post_to(&rooms, 12, "after").await;
    assert_eq!(by_room(&receive(&mut rx, 12).await), by_room(&after));
    let fence = post_to(&silent[..1], 1, "fence").await;
    assert_eq!(receive(&mut rx, 1).await, fence, "nothing twice");
    assert_eq!(health.losses(), 0, "Redis was never lost");
}

/// A room's slot moved to another primary while posts keep coming to it and
/// to rooms on other shards: `MOVED` and `ASK` are followed (a post that
/// meets the move is retried with its key), and every acknowledged message
/// reaches the feed once, in its room's order, through the subscription on
/// the new owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_moved_under_posts_loses_nothing() {
    let cluster = tokio::task::block_in_place(Cluster::start);
    let dir = tempfile::tempdir().unwrap();
    let config = config(&cluster, dir.path(), "min_replicas_acked = 1\n");
    let rooms = rooms_on_every_primary(&cluster, &config, 1);
    let keys = Keys::new(&config.redis);
    let moving = slot(&keys.room(&rooms[0]));
    let to = cluster
        .primaries()
        .into_iter()
        .find(|&p| p != cluster.owner(moving))
        .unwrap();
    let store = Store::new(&config).unwrap();
    // Keys in the slot (a record per post with a key), so that moving it
    // takes several batches.
    for i in 0..400 {
        let key = chat_ha::message::IdempotencyKey::parse(&format!("before-{i}")).unwrap();
        let key = chat_ha::delivery::PostKey::message(&key, &rooms[0]);
        let message = post(rooms[0].as_str(), &format!("before {i}"));
        store.append(&message, Some(&key)).await.unwrap();
    }
    let (_interest, mut rx) = follow(&config, &rooms).await;

    // Posts go on from before the move begins until well after it ended.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (posted, mut progress) = tokio::sync::watch::channel(0usize);
    let poster = tokio::spawn({
        let (store, rooms, stop) = (store.clone(), rooms.clone(), stop.clone());
        async move {
            let mut acknowledged = Vec::new();
            let mut retries = 0;
            let mut i = 0;
            let mut after_stop = 0;
            while after_stop < 30 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    after_stop += 1;
                }
                let room = &rooms[i % rooms.len()];
                let key = chat_ha::message::IdempotencyKey::parse(&format!("move-{i}")).unwrap();
                let key = chat_ha::delivery::PostKey::message(&key, room);
                let message = post(room.as_str(), &format!("post {i}"));
                let started = Instant::now();
                let appended = loop {
                    match store.append(&message, Some(&key)).await {
                        Ok(appended) => break appended,
                        Err(e) => {
                            assert!(started.elapsed() < PATIENCE, "post {i} to {room}: {e}");
                            retries += 1;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                };
                acknowledged.push(appended.message);
                i += 1;
                posted.send_replace(i);
            }
            (acknowledged, retries)
        }
    });
    progress.wait_for(|&n| n >= 10).await.unwrap();
    let before = *progress.borrow();
    tokio::task::block_in_place(|| cluster.migrate_slot(moving, to));
    let during = *progress.borrow() - before;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (acknowledged, retries) = poster.await.unwrap();
    println!(
        "{} posts acknowledged ({during} while slot {moving} moved to node {to}), {retries} retried",
        acknowledged.len()
    );
    assert_eq!(cluster.owner(moving), to);
    let got = receive(&mut rx, acknowledged.len()).await;
    assert_eq!(
        by_room(&got),
        by_room(&acknowledged),
        "every acknowledged message once, in order"
    );
    // The moved room is still followed, on its new owner.
    let fence = store
        .append(&post(rooms[0].as_str(), "fence"), None)
        .await
        .unwrap()
        .message;
    assert_eq!(
        receive(&mut rx, 1).await,
        [fence],
        "nothing twice, and live"
    );
}

/// On a cluster whose nodes know the shipped chat-ha ACL user, the daemons'
/// work logged in as it: topology, appends waiting for a replica, the
/// rooms' subscriptions, their reads, history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemons_work_on_a_cluster_as_the_limited_acl_user() {
    let cluster = tokio::task::block_in_place(Cluster::start);
    let dir = tempfile::tempdir().unwrap();
    let extra = as_chat_ha_user(&cluster, dir.path());
    let config = config(&cluster, dir.path(), &(extra + "min_replicas_acked = 1\n"));
    let rooms = rooms_on_every_primary(&cluster, &config, 1);
    let (_interest, mut rx) = follow(&config, &rooms).await;
    let store = Store::new(&config).unwrap();
    let mut sent = Vec::new();
    for (i, room) in rooms.iter().enumerate() {
        let message = post(room.as_str(), &format!("as chat-ha {i}"));
        sent.push(store.append(&message, None).await.unwrap().message);
    }
    let got = receive(&mut rx, sent.len()).await;
    assert_eq!(by_room(&got), by_room(&sent));
    let history = store.history(&rooms[0], 10, None, 1 << 20).await.unwrap();
    assert_eq!(history, [sent[0].clone()]);
}

/// Over TLS (`rediss://` seeds), the daemons reach every node of the
/// cluster, those the topology names included, checking each certificate
/// against `redis.tls_ca_file`; without it (the host's CAs do not know this
/// one) they refuse the nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_every_node_is_checked_against_the_configured_ca() {
    let certs = tempfile::tempdir().unwrap();
    common::certificates(certs.path());
    let cluster = tokio::task::block_in_place(|| Cluster::start_tls(certs.path()));
    let seeds = [cluster.nodes[0].tls_url().unwrap()];
    let tls_config = |extra: &str| {
        let dir = tempfile::tempdir().unwrap();
        let extra = format!("min_replicas_acked = 1\n{extra}");
        (config_with_seeds(&seeds, dir.path(), &extra), dir)
    };
    let ca = certs.path().join("ca.pem");
    let (config, _dir) = tls_config(&format!("tls_ca_file = \"{}\"", ca.display()));
    let rooms = rooms_on_every_primary(&cluster, &config, 1);
    let (_interest, mut rx) = follow(&config, &rooms).await;
    let store = Store::new(&config).unwrap();
    let mut stored = Vec::new();
    for room in &rooms {
        let appended = store
            .append(&post(room.as_str(), "over TLS"), None)
            .await
            .unwrap();
        stored.push(appended.message);
    }
    assert_eq!(
        by_room(&receive(&mut rx, stored.len()).await),
        by_room(&stored)
    );

    let (untrusting, _dir) = tls_config("");
    let store = Store::new(&untrusting).unwrap();
    let refused = store
        .append(&post(rooms[0].as_str(), "refused"), None)
        .await
        .unwrap_err();
    assert!(
        refused.to_string().to_lowercase().contains("certificate"),
        "{refused}"
    );
}

/// Scripts gone from every node (restarted, or replicas promoted since
/// they were loaded): the next posts load them again wherever their rooms
/// are, and are acknowledged; none is refused for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_load_the_scripts_again_on_nodes_that_lost_them() {
    let cluster = tokio::task::block_in_place(Cluster::start);
    let dir = tempfile::tempdir().unwrap();
    let config = config(&cluster, dir.path(), "min_replicas_acked = 1\n");
    let rooms = rooms_on_every_primary(&cluster, &config, 2);
    let store = Store::new(&config).unwrap();
    for round in 0..10 {
        for index in cluster.primaries() {
            let flushed: String = cluster.nodes[index].query(redis::cmd("SCRIPT").arg("FLUSH"));
            assert_eq!(flushed, "OK");
        }
        for room in &rooms {
            let message = post(room.as_str(), &format!("round {round}"));
            if let Err(e) = store.append(&message, None).await {
                panic!("round {round}, {room}: {e}");
            }
        }
    }
}
