//! Shard channel subscriptions (`delivery::shards`) against a real Redis
//! Cluster of six processes on loopback, and against a single Redis:
//! messages arrive on the channels of every primary, and keep arriving
//! after a killed connection, a migrated slot and a failover, the three
//! cases where redis-rs's own cluster subscriptions stop delivering.
//!
//! The tests wait on events (a `Subscribed`, a published message), each
//! wait bounded by [`PATIENCE`], never on a fixed sleep.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use chat_ha::delivery::shards::{Event, Nodes, Settings, Subscriptions, slot};
use common::cluster::Cluster;
use common::{Redis, wait_for};
use tokio::sync::mpsc;

/// The longest any awaited event may take: a failover takes a few seconds.
const PATIENCE: Duration = Duration::from_secs(30);

fn settings() -> Settings {
    Settings {
        command_timeout: Duration::from_secs(1),
        reconnect_min: Duration::from_millis(50),
        reconnect_max: Duration::from_millis(500),
    }
}

/// The cluster, found through all its nodes; the others it names are
/// reached over RESP3 without a login.
fn cluster_nodes(cluster: &Cluster) -> Nodes {
    Nodes::Cluster {
        seeds: cluster.seeds(),
        client_for: Arc::new(|host: &str, port: u16| {
            redis::Client::open(format!("redis://{host}:{port}/?protocol=resp3"))
        }),
    }
}

/// `count` channels named after `prefix`, each with a hash tag of its own,
/// in slots node `index` owns.
fn channels_on(cluster: &Cluster, index: usize, prefix: &str, count: usize) -> Vec<String> {
    let slots = cluster.slots_of(index);
    (0..)
        .map(|n| format!("{{{prefix}-{n}}}:messages"))
        .filter(|channel| {
            let slot = slot(channel);
            slots
                .iter()
                .any(|(first, last)| (*first..=*last).contains(&slot))
        })
        .take(count)
        .collect()
}

/// Publishes `payload` on `channel` at the node owning its slot, and checks
/// that the one subscriber there received it. Returns the message as the
/// subscriber should see it.
fn publish(cluster: &Cluster, channel: &str, payload: &str) -> (String, String) {
    let receivers = cluster.spublish(channel, payload);
    assert_eq!(receivers, 1, "SPUBLISH {channel}: subscribers on its node");
    (channel.to_owned(), payload.to_owned())
}

/// How many shard channels each RESP3 client (the subscriber's) of a
/// `CLIENT LIST` has subscribed.
fn subscribed_counts(list: &str) -> Vec<usize> {
    list.lines()
        .filter(|line| line.contains(" resp=3"))
        .filter_map(|line| {
            let count = line.split(' ').find_map(|f| f.strip_prefix("ssub="))?;
            count.parse().ok()
        })
        .collect()
}

/// The receiving end of the subscriptions. It checks, for every event, what
/// a subscriber relies on: a message arrives only on a channel subscribed
/// (after its `Subscribed`, and not since `Lost`), and each `Subscribed`
/// names channels of one slot.
struct Events {
    rx: mpsc::UnboundedReceiver<Event>,
    subscribed: BTreeSet<String>,
    /// Every event so far, for failure messages.
    log: Vec<Event>,
}

impl Events {
    fn new(rx: mpsc::UnboundedReceiver<Event>) -> Self {
        Events {
            rx,
            subscribed: BTreeSet::new(),
            log: Vec::new(),
        }
    }

    /// The last events, for a failure message.
    fn recent(&self) -> &[Event] {
        &self.log[self.log.len().saturating_sub(20)..]
    }

    async fn next(&mut self, waiting_for: &str) -> Event {
        let event = match tokio::time::timeout(PATIENCE, self.rx.recv()).await {
            Ok(Some(event)) => event,
            Ok(None) => panic!(
                "the subscriptions ended while waiting for {waiting_for}; last events: {:#?}",
                self.recent()
            ),
            Err(_) => panic!(
                "timed out after {PATIENCE:?} waiting for {waiting_for}; last events: {:#?}",
                self.recent()
            ),
        };
        match &event {
            Event::Message { channel, payload } => assert!(
                self.subscribed.contains(channel),
                "message {:?} on {channel}, which is not subscribed; last events: {:#?}",
                String::from_utf8_lossy(payload),
                self.recent()
            ),
            Event::Subscribed { channels, .. } => {
                let slots: BTreeSet<u16> = channels.iter().map(|c| slot(c)).collect();
                assert_eq!(slots.len(), 1, "one Subscribed per slot: {channels:?}");
                self.subscribed.extend(channels.iter().cloned());
            }
            Event::Lost { channels, .. } => {
                for channel in channels {
                    self.subscribed.remove(channel);
                }
            }
        }
        self.log.push(event.clone());
        event
    }

    /// Waits until each of `channels` has been `Subscribed` (again); returns
    /// the events meanwhile.
    async fn until_subscribed(&mut self, channels: &[String]) -> Vec<Event> {
        let mut waiting: BTreeSet<&String> = channels.iter().collect();
        let mut seen = Vec::new();
        while !waiting.is_empty() {
            let what = format!("{} channels to be subscribed", waiting.len());
            let event = self.next(&what).await;
            if let Event::Subscribed { channels, .. } = &event {
                for channel in channels {
                    waiting.remove(channel);
                }
            }
            seen.push(event);
        }
        seen
    }

    /// Waits for a `Lost`; returns the channels it names.
    async fn until_lost(&mut self) -> BTreeSet<String> {
        loop {
            if let Event::Lost { channels, error } = self.next("a Lost event").await {
                assert!(!error.is_empty());
                return channels.into_iter().collect();
            }
        }
    }

    /// Waits until every one of `expected` messages arrived, each once, and
    /// nothing else did.
    async fn messages(&mut self, expected: &[(String, String)]) {
        let mut waiting: Vec<&(String, String)> = expected.iter().collect();
        while !waiting.is_empty() {
            let what = format!("{} more messages: {waiting:?}", waiting.len());
            match self.next(&what).await {
                Event::Message { channel, payload } => {
                    let message = (channel, String::from_utf8(payload).unwrap());
                    let at = waiting.iter().position(|m| **m == message);
                    let at = at.unwrap_or_else(|| panic!("unexpected message {message:?}"));
                    waiting.swap_remove(at);
                }
                other => panic!("{other:?} while waiting for {what}"),
            }
        }
    }

    /// Waits until the subscriptions' task ended (its receiver closed).
    async fn until_closed(&mut self) {
        let closed = tokio::time::timeout(PATIENCE, async {
            while let Some(event) = self.rx.recv().await {
                self.log.push(event);
            }
        })
        .await;
        assert!(closed.is_ok(), "the subscriptions did not end");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn messages_arrive_on_the_channels_of_every_primary_once_subscribed() {
    let cluster = Cluster::start();
    let primaries = cluster.primaries();
    let mut channels = Vec::new();
    for &primary in &primaries {
        channels.extend(channels_on(&cluster, primary, &format!("room{primary}"), 2));
    }
    // Two channels sharing a hash tag share a slot: subscribed together.
    let lobby = ["{lobby}:messages".to_owned(), "{lobby}:typing".to_owned()];
    channels.extend(lobby.iter().cloned());
    for channel in &channels {
        assert_eq!(
            slot(channel),
            cluster.key_slot(channel),
            "slot of {channel}"
        );
    }

    let (subscriptions, rx) = Subscriptions::start(cluster_nodes(&cluster), settings());
    let mut events = Events::new(rx);
    subscriptions.subscribe(channels.clone());
    let seen = events.until_subscribed(&channels).await;
    assert!(
        seen.iter().all(|e| matches!(e, Event::Subscribed { .. })),
        "{seen:#?}"
    );
    assert!(
        seen.iter()
            .any(|e| matches!(e, Event::Subscribed { channels, .. } if channels[..] == lobby[..])),
        "the lobby's channels in one Subscribed: {seen:#?}"
    );
    for &primary in &primaries {
        let subscribers = cluster.nodes[primary].shard_subscribers();
        assert_eq!(subscribers.len(), 1, "one connection per node");
    }
    // Subscribing again changes nothing.
    subscriptions.subscribe(channels.clone());

    let sent: Vec<_> = channels
        .iter()
        .map(|channel| publish(&cluster, channel, &format!("hello on {channel}")))
        .collect();
    events.messages(&sent).await;

    // An unsubscribed channel gets nothing more: the node no longer sends
    // to it, and a message after it on the same node arrives alone.
    let (gone, kept) = (channels[0].clone(), channels[1].clone());
    let first = &cluster.nodes[primaries[0]];
    let on_first = channels
        .iter()
        .filter(|c| cluster.owner(slot(c)) == primaries[0])
        .count();
    subscriptions.unsubscribe(vec![gone.clone()]);
    wait_for("the unsubscription", PATIENCE, || {
        let list: String = first.query(redis::cmd("CLIENT").arg("LIST"));
        (subscribed_counts(&list) == [on_first - 1]).then_some(())
    });
    assert_eq!(cluster.spublish(&gone, "after"), 0);
    let fence = publish(&cluster, &kept, "fence");
    events.messages(&[fence]).await;

    // A node left without channels has its connection closed.
    let rest: Vec<String> = channels
        .iter()
        .filter(|c| cluster.owner(slot(c)) == primaries[0])
        .cloned()
        .collect();
    subscriptions.unsubscribe(rest);
    wait_for("the connection to be closed", PATIENCE, || {
        first.resp3_clients().is_empty().then_some(())
    });
    let others = &cluster.nodes[primaries[1]];
    assert_eq!(others.resp3_clients().len(), 1, "the others stay");

    drop(subscriptions);
    events.until_closed().await;
    wait_for("every connection to be closed", PATIENCE, || {
        primaries
            .iter()
            .all(|p| cluster.nodes[*p].resp3_clients().is_empty())
            .then_some(())
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_connection_is_subscribed_again_slot_by_slot() {
    let cluster = Cluster::start();
    let primaries = cluster.primaries();
    let node = primaries[0];
    let channels = channels_on(&cluster, node, "room", 50);
    let slots: BTreeSet<u16> = channels.iter().map(|c| slot(c)).collect();
    assert_eq!(
        slots.len(),
        50,
        "50 slots, as redis-rs would resubscribe in one command"
    );
    let elsewhere = channels_on(&cluster, primaries[1], "other", 1);

    let (subscriptions, rx) = Subscriptions::start(cluster_nodes(&cluster), settings());
    let mut events = Events::new(rx);
    subscriptions.subscribe(channels.clone());
    subscriptions.subscribe(elsewhere.clone());
    events
        .until_subscribed(&[channels.clone(), elsewhere.clone()].concat())
        .await;

    let subscribers = cluster.nodes[node].shard_subscribers();
    assert_eq!(
        subscribers.len(),
        1,
        "one connection for the node's 50 slots"
    );
    assert_eq!(cluster.nodes[node].kill_clients(&subscribers), 1);

    let lost = events.until_lost().await;
    let expected: BTreeSet<String> = channels.iter().cloned().collect();
    assert_eq!(
        lost, expected,
        "Lost names the channels of the killed connection"
    );
    // Each Subscribed names one slot (checked by Events).
    let seen = events.until_subscribed(&channels).await;
    let resubscribed = seen
        .iter()
        .filter(|e| matches!(e, Event::Subscribed { .. }))
        .count();
    assert_eq!(resubscribed, 50, "one Subscribed per slot: {seen:#?}");
    let errors = cluster.nodes[node].error_stats();
    assert!(!errors.contains("CROSSSLOT"), "{errors}");

    let mut sent: Vec<_> = channels
        .iter()
        .map(|channel| publish(&cluster, channel, "after the kill"))
        .collect();
    sent.push(publish(&cluster, &elsewhere[0], "elsewhere"));
    events.messages(&sent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_migrated_slot_is_followed_to_its_new_owner() {
    let cluster = Cluster::start();
    let primaries = cluster.primaries();
    let (from, to) = (primaries[0], primaries[1]);
    let moving = channels_on(&cluster, from, "moving", 1)[0].clone();
    // A second channel of the same slot, and a key there to migrate.
    let tag = &moving[..moving.find('}').unwrap() + 1];
    let channels = vec![moving.clone(), format!("{tag}:typing")];
    let key = format!("{tag}:history");
    let _: () = cluster.nodes[from].query(redis::cmd("SET").arg(&key).arg("kept"));
    let staying = channels_on(&cluster, from, "staying", 1);

    let (subscriptions, rx) = Subscriptions::start(cluster_nodes(&cluster), settings());
    let mut events = Events::new(rx);
    subscriptions.subscribe(channels.clone());
    subscriptions.subscribe(staying.clone());
    events
        .until_subscribed(&[channels.clone(), staying.clone()].concat())
        .await;
    let before = publish(&cluster, &moving, "before");
    events.messages(&[before]).await;

    let slot = slot(&moving);
    tokio::task::block_in_place(|| cluster.migrate_slot(slot, to));
    assert_eq!(cluster.owner(slot), to);
    let moved: String = cluster.nodes[to].query(redis::cmd("GET").arg(&key));
    assert_eq!(moved, "kept");

    // Redis drops the channels of a slot that leaves a node: they are
    // subscribed again on the new owner.
    events.until_subscribed(&channels).await;
    assert_eq!(cluster.nodes[to].shard_subscribers().len(), 1);
    let sent = vec![
        publish(&cluster, &channels[0], "after"),
        publish(&cluster, &channels[1], "after"),
        publish(&cluster, &staying[0], "unmoved"),
    ];
    events.messages(&sent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failover_moves_the_channels_to_the_promoted_replica() {
    let mut cluster = Cluster::start();
    let primaries = cluster.primaries();
    let (failing, other) = (primaries[0], primaries[1]);
    let replica = cluster.replica_of(failing);
    let channels = channels_on(&cluster, failing, "room", 3);
    let elsewhere = channels_on(&cluster, other, "other", 1);

    let (subscriptions, rx) = Subscriptions::start(cluster_nodes(&cluster), settings());
    let mut events = Events::new(rx);
    subscriptions.subscribe(channels.clone());
    subscriptions.subscribe(elsewhere.clone());
    events
        .until_subscribed(&[channels.clone(), elsewhere.clone()].concat())
        .await;

    cluster.kill(failing);
    let lost = events.until_lost().await;
    let expected: BTreeSet<String> = channels.iter().cloned().collect();
    assert_eq!(lost, expected);
    // The other nodes deliver meanwhile.
    let meanwhile = publish(&cluster, &elsewhere[0], "during the failover");
    events.messages(&[meanwhile]).await;

    // The cluster promotes the replica; the channels follow.
    let slot = slot(&channels[0]);
    tokio::task::block_in_place(|| cluster.wait_owner(slot, replica));
    events.until_subscribed(&channels).await;
    assert_eq!(cluster.owner(slot), replica);
    let sent: Vec<_> = channels
        .iter()
        .map(|channel| publish(&cluster, channel, "after the failover"))
        .collect();
    events.messages(&sent).await;

    // The old primary comes back as a replica: nothing changes for us.
    tokio::task::block_in_place(|| {
        cluster.restart(failing);
        cluster.wait_replica(failing, replica);
        cluster.wait_healthy();
    });
    let again = publish(&cluster, &channels[0], "after the restart");
    events.messages(&[again]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_redis_serves_every_slot() {
    let redis = Redis::start();
    let client = redis::Client::open(format!("{}&protocol=resp3", redis.url())).unwrap();
    let mut admin = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let channels = vec!["{a}:messages".to_owned(), "{b}:messages".to_owned()];
    let spublish = |admin: &mut redis::Connection, channel: &str, payload: &str| {
        let receivers: i64 = redis::cmd("SPUBLISH")
            .arg(channel)
            .arg(payload)
            .query(admin)
            .unwrap();
        assert_eq!(receivers, 1, "SPUBLISH {channel}: subscribers");
        (channel.to_owned(), payload.to_owned())
    };

    let (subscriptions, rx) = Subscriptions::start(Nodes::One(client), settings());
    let mut events = Events::new(rx);
    subscriptions.subscribe(channels.clone());
    events.until_subscribed(&channels).await;
    let sent: Vec<_> = channels
        .iter()
        .map(|c| spublish(&mut admin, c, "first"))
        .collect();
    events.messages(&sent).await;

    // The connection killed: lost, then subscribed again.
    let list: String = redis::cmd("CLIENT").arg("LIST").query(&mut admin).unwrap();
    let ids: Vec<&str> = list
        .lines()
        .filter(|line| line.contains(" resp=3"))
        .filter_map(|line| line.strip_prefix("id=")?.split(' ').next())
        .collect();
    assert_eq!(ids.len(), 1, "{list}");
    let _: () = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(ids[0])
        .query(&mut admin)
        .unwrap();
    let lost = events.until_lost().await;
    assert_eq!(lost, channels.iter().cloned().collect());
    events.until_subscribed(&channels).await;
    let sent: Vec<_> = channels
        .iter()
        .map(|c| spublish(&mut admin, c, "second"))
        .collect();
    events.messages(&sent).await;

    // Unsubscribed: nothing more, while the other channel still delivers.
    subscriptions.unsubscribe(vec![channels[0].clone()]);
    wait_for("the unsubscription", PATIENCE, || {
        let list: String = redis::cmd("CLIENT").arg("LIST").query(&mut admin).unwrap();
        (subscribed_counts(&list) == [1]).then_some(())
    });
    let unheard: i64 = redis::cmd("SPUBLISH")
        .arg(&channels[0])
        .arg("unheard")
        .query(&mut admin)
        .unwrap();
    assert_eq!(unheard, 0);
    let fence = spublish(&mut admin, &channels[1], "fence");
    events.messages(&[fence]).await;

    drop(subscriptions);
    events.until_closed().await;
}
