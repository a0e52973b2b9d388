//! Redis behind Sentinel: a primary, two replicas and three Sentinels as
//! real processes (tests/common/sentinel.rs), and the daemons following the
//! primary across a failover without losing or repeating an acknowledged
//! message.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use chat_ha::config::{Config, RedisConfig};
use chat_ha::delivery::{Feed, Keys, RedisHealth, Store};
use chat_ha::message::{Room, StreamId};
use common::sentinel::SentinelSet;
use common::{Daemon, Forward, binary, daemon_on_any_port, post, start_daemon};
use serde_json::Value;
use tokio::sync::mpsc;

const SIGKILL: i32 = 9;
const SIGSTOP: i32 = 19;
const SIGCONT: i32 = 18;

#[test]
fn a_configuration_with_both_modes_or_a_misplaced_key_stops_both_daemons() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[redis]\nurl = \"redis://127.0.0.1:1/0\"\nsentinels = [\"redis://127.0.0.1:2\"]\nsentinel_master = \"m\"\n",
            "redis.url and redis.sentinels are both set",
        ),
        (
            "[redis]\nsentinels = [\"redis://127.0.0.1:2\"]\n",
            "redis.sentinel_master is missing",
        ),
        (
            "[redis]\nsentinel_master = \"m\"\n",
            "redis.sentinel_master is only valid with redis.sentinels",
        ),
    ];
    for (text, problem) in cases {
        let path = dir.path().join("chat-ha.toml");
        std::fs::write(&path, text).unwrap();
        for name in ["chat-frontend", "chat-backend"] {
            for check in [false, true] {
                let mut command = Command::new(binary(name));
                command.arg("--config").arg(&path);
                if check {
                    command.arg("--check-config");
                }
                let output = command.output().unwrap();
                let stderr = String::from_utf8_lossy(&output.stderr);
                assert_eq!(output.status.code(), Some(2), "{name} {check}: {stderr}");
                assert!(stderr.contains(problem), "{name}: {stderr}");
            }
        }
    }
}

fn load(path: &std::path::Path) -> Config {
    Config::load(path, true).unwrap()
}

/// The stream of room `name` under the default key prefix.
fn room_key(name: &str) -> String {
    Keys::new(&RedisConfig::default()).room(&Room::parse(name).unwrap())
}

/// The primary is found through the Sentinels (the first listed is dead),
/// an acknowledged append is on both replicas, and a new primary that lost
/// the tail of a room and whose clock is behind still gives ids above those
/// delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_primary_is_found_and_ids_stay_above_a_lost_tail() {
    let set = tokio::task::block_in_place(SentinelSet::start);
    let dir = tempfile::tempdir().unwrap();
    let config = load(&set.write_config(dir.path(), "min_replicas_acked = 2\n"));
    let store = Store::new(&config).unwrap();
    let health = RedisHealth::new();
    let (tx, mut delivered) = mpsc::unbounded_channel();
    let (feed, interest) = Feed::new(&config, health).unwrap();
    tokio::spawn(feed.run(Arc::new(Forward(tx))));
    // A feed hands on what is appended once it follows the room: it starts
    // at the stream's end.
    interest
        .follow(&Room::parse("skew").unwrap(), Duration::from_secs(20))
        .await
        .expect("the feed follows the primary within 20 s");

    let first = append_until_stored(&store, "first").await;
    for replica in &set.servers[1..] {
        let on_replica: Vec<redis::Value> = tokio::task::block_in_place(|| {
            replica.query(redis::cmd("XRANGE").arg(room_key("skew")).arg("-").arg("+"))
        });
        assert_eq!(
            on_replica.len(),
            1,
            "acknowledged but not on replica {}",
            replica.port
        );
    }
    assert_eq!(next_delivered(&mut delivered).await.id, first);
    let primary = store.primary().unwrap().stats().address();
    assert_eq!(primary, Some(format!("127.0.0.1:{}", set.servers[0].port)));

    // A primary whose clock ran ahead stored the next entry a minute ahead...
    let ahead = StreamId {
        ms: first.ms + 60_000,
        seq: 0,
    };
    tokio::task::block_in_place(|| {
        set.servers[0].query::<()>(
            redis::cmd("XSETID")
                .arg(room_key("skew"))
                .arg(ahead.to_string()),
        )
    });
    let tail = append_until_stored(&store, "tail").await;
    assert!(tail > ahead, "{tail} after {ahead}");
    assert_eq!(next_delivered(&mut delivered).await.id, tail);
    // ...and was lost with that primary: the server now primary lacks it,
    // and its clock is a minute behind.
    tokio::task::block_in_place(|| {
        let stream = room_key("skew");
        set.servers[0].query::<()>(redis::cmd("XDEL").arg(&stream).arg(tail.to_string()));
        set.servers[0].query::<()>(redis::cmd("XSETID").arg(&stream).arg(first.to_string()));
    });
    let after = append_until_stored(&store, "after the lost tail").await;
    assert!(after > tail, "new id {after} is below the delivered {tail}");
    let next = next_delivered(&mut delivered).await;
    assert_eq!(
        (next.id, next.message.as_str()),
        (after, "after the lost tail")
    );
}

async fn append_until_stored(store: &Store, text: &str) -> StreamId {
    let message = post("skew", text);
    for _ in 0..100 {
        match store.append(&message, None).await {
            Ok(appended) => return appended.message.id,
            Err(e) => {
                eprintln!("append: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    panic!("{text:?} was never stored");
}

async fn next_delivered(
    delivered: &mut mpsc::UnboundedReceiver<chat_ha::message::ChatMessage>,
) -> chat_ha::message::ChatMessage {
    tokio::time::timeout(Duration::from_secs(20), delivered.recv())
        .await
        .expect("a delivery within 20 s")
        .unwrap()
}

/// Both daemons on one [`SentinelSet`], and a client of the frontend.
struct Service {
    set: SentinelSet,
    backend: Daemon,
    frontend: Daemon,
    _dir: tempfile::TempDir,
}

impl Service {
    fn start(redis_extra: &str) -> Service {
        Service::on(SentinelSet::start(), redis_extra)
    }

    /// Both daemons on `set`, with `redis_extra` in `[redis]`.
    fn on(set: SentinelSet, redis_extra: &str) -> Service {
        Service::on_with(set, redis_extra, |_| {})
    }

    /// As [`Service::on`], each daemon's command changed by `adjust` first.
    fn on_with(set: SentinelSet, redis_extra: &str, adjust: impl Fn(&mut Command)) -> Service {
        let dir = tempfile::tempdir().unwrap();
        let config = set.write_config(dir.path(), redis_extra);
        let daemon = |name| {
            let mut command = daemon_on_any_port(name, &config, "127.0.0.1");
            adjust(&mut command);
            start_daemon(name, &mut command)
        };
        let backend = daemon("chat-backend");
        let frontend = daemon("chat-frontend");
        Service {
            set,
            backend,
            frontend,
            _dir: dir,
        }
    }

    fn backend_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.backend.public)
    }

    async fn frontend_status(&self) -> Option<String> {
        let url = format!("http://{}/front/status", self.frontend.public);
        let body: Value = reqwest::get(url).await.ok()?.json().await.ok()?;
        Some(body["status"].as_str()?.to_owned())
    }

    /// Waits, 20 s at most, until both daemons found the primary.
    async fn wait_ready(&self) {
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let backend = reqwest::get(self.backend_url("/back/status")).await;
                let backend: Option<Value> = match backend {
                    Ok(response) => response.json().await.ok(),
                    Err(_) => None,
                };
                let backend_ok = backend.is_some_and(|b| b["status"] == "ok");
                if backend_ok && self.frontend_status().await.as_deref() == Some("ok") {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("both daemons found the primary within 20 s");
    }

    /// Waits, 20 s at most, for the frontend to say `wanted`.
    async fn wait_for_status(&self, wanted: &str) {
        tokio::time::timeout(Duration::from_secs(20), async {
            while self.frontend_status().await.as_deref() != Some(wanted) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("the frontend never said {wanted}"));
    }

    async fn post(&self, room: &str, text: &str, key: &str) -> (u16, Value) {
        let response = reqwest::Client::new()
            .post(self.backend_url("/back/message"))
            .header("content-type", "application/json")
            .header("idempotency-key", key)
            .timeout(Duration::from_secs(10))
            .body(serde_json::json!({"room": room, "message": text}).to_string())
            .send()
            .await;
        match response {
            Ok(response) => {
                let status = response.status().as_u16();
                (status, response.json().await.unwrap_or(Value::Null))
            }
            Err(_) => (0, Value::Null),
        }
    }

    async fn metrics(&self, daemon: &Daemon) -> String {
        reqwest::get(format!("http://{}/metrics", daemon.metrics))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

/// A Socket.IO client over engine.io long-polling, as the browser's
/// fallback transport: joins one room and reports every message event.
struct PollingClient {
    base: String,
    sid: String,
    http: reqwest::Client,
}

impl PollingClient {
    async fn join(
        frontend: &Daemon,
        room: &str,
    ) -> (PollingClient, mpsc::UnboundedReceiver<Value>) {
        Self::join_with(frontend, &serde_json::json!(room)).await
    }

    /// Joins with `request`: a room's name, or `{"room": name, "since": id}`.
    async fn join_with(
        frontend: &Daemon,
        request: &Value,
    ) -> (PollingClient, mpsc::UnboundedReceiver<Value>) {
        let (client, messages, _) = Self::join_answered(frontend, request).await;
        (client, messages)
    }

    /// As [`PollingClient::join_with`], with the frontend's answer to the
    /// join (`{"ok": true, "replayed": n}` for a resume).
    async fn join_answered(
        frontend: &Daemon,
        request: &Value,
    ) -> (PollingClient, mpsc::UnboundedReceiver<Value>, Value) {
        let http = reqwest::Client::new();
        let base = format!(
            "http://{}/front/socket.io/?EIO=4&transport=polling",
            frontend.public
        );
        let open = http.get(&base).send().await.unwrap().text().await.unwrap();
        let handshake: Value = serde_json::from_str(open.trim_start_matches('0')).unwrap();
        let client = PollingClient {
            base,
            sid: handshake["sid"].as_str().unwrap().to_owned(),
            http,
        };
        client.send("40").await;
        client.send(&format!("421[\"room\",{request}]")).await;
        let (tx, rx) = mpsc::unbounded_channel();
        let mut answer = None;
        while answer.is_none() {
            for packet in client.poll().await {
                if let Some(ack) = packet.strip_prefix("431") {
                    answer = Some(ack.to_owned());
                }
                client.take(&packet, &tx).await;
            }
        }
        let answer: Value = serde_json::from_str(&answer.unwrap()).unwrap();
        assert_eq!(answer[0]["ok"], true, "join {request}: {answer}");
        let answer = answer[0].clone();
        let poller = PollingClient {
            base: client.base.clone(),
            sid: client.sid.clone(),
            http: client.http.clone(),
        };
        // Until the frontend is gone, at the end of the test.
        tokio::spawn(async move {
            while let Some(packets) = poller.try_poll().await {
                for packet in packets {
                    poller.take(&packet, &tx).await;
                }
            }
        });
        (client, rx, answer)
    }

    fn url(&self) -> String {
        format!("{}&sid={}", self.base, self.sid)
    }

    async fn send(&self, packet: &str) {
        let response = self
            .http
            .post(self.url())
            .body(packet.to_owned())
            .send()
            .await
            .unwrap();
        assert!(
            response.status().is_success(),
            "{packet}: {}",
            response.status()
        );
    }

    async fn try_poll(&self) -> Option<Vec<String>> {
        let response = self.http.get(self.url()).send().await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        let text = response.text().await.ok()?;
        Some(text.split('\u{1e}').map(str::to_owned).collect())
    }

    async fn poll(&self) -> Vec<String> {
        let response = self.http.get(self.url()).send().await.unwrap();
        assert!(
            response.status().is_success(),
            "poll: {}",
            response.status()
        );
        let text = response.text().await.unwrap();
        text.split('\u{1e}').map(str::to_owned).collect()
    }

    /// Answers a ping; passes a `message` event on.
    async fn take(&self, packet: &str, messages: &mpsc::UnboundedSender<Value>) {
        if packet == "2" {
            self.send("3").await;
        } else if let Some(event) = packet.strip_prefix("42") {
            let event: Value = serde_json::from_str(event).unwrap();
            if event[0] == "message" {
                let _ = messages.send(event[1].clone());
            }
        }
    }
}

/// Joins `room` from `since` as a new client, and returns the messages it
/// gets up to the one with id `until`: `(id, text)` each.
async fn resume(frontend: &Daemon, room: &str, since: &str, until: &str) -> Vec<(String, String)> {
    let request = serde_json::json!({"room": room, "since": since});
    let (_client, mut messages) = PollingClient::join_with(frontend, &request).await;
    receive_until(&mut messages, until)
        .await
        .unwrap_or_else(|got| {
            panic!("a client resuming from {since} never got {until}; got {got:?}")
        })
}

/// The messages a client receives up to the one with id `until`, `(id,
/// text)` each; `Err` with those it got when `until` has not come within
/// 30 s.
async fn receive_until(
    messages: &mut mpsc::UnboundedReceiver<Value>,
    until: &str,
) -> Result<Vec<(String, String)>, Vec<(String, String)>> {
    let mut got = Vec::new();
    let reached = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(message) = messages.recv().await {
            let id = message["id"].as_str().unwrap().to_owned();
            let done = id == until;
            got.push((id, message["message"].as_str().unwrap().to_owned()));
            if done {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    if reached { Ok(got) } else { Err(got) }
}

/// What a stream of posts saw across a failover.
#[derive(Debug, Default)]
struct Tally {
    sent: usize,
    acknowledged: Vec<(String, String)>,
    failed_attempts: usize,
}

/// SIGKILL of the primary while posts stream through a backend daemon and
/// a frontend daemon delivers them to a client: every acknowledged message
/// arrives once, in order; the frontend says `degraded` while it has no
/// primary; posting succeeds again after the failover.
/// A daemon that has just started (a restarted backend, its socket full of
/// waiting requests) has not asked the Sentinels yet: its first requests
/// wait for the primary instead of being refused, and so does a read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_made_before_the_primary_is_found_wait_for_it() {
    let set = tokio::task::block_in_place(SentinelSet::start);
    let dir = tempfile::tempdir().unwrap();
    let config = load(&set.write_config(dir.path(), ""));
    let store = Store::new(&config).unwrap();
    let first = store.append(&post("early", "first"), None).await.unwrap();
    let again = Store::new(&config).unwrap();
    let read = again
        .history(&first.message.room, 10, None, 64 * 1024)
        .await
        .unwrap();
    assert_eq!(read, vec![first.message]);
}

/// A primary cut off from the other Redis hosts, with the Sentinel beside
/// it, is still named by that Sentinel and still says `master`, while the
/// majority of the Sentinels name the replica they promoted: the daemons
/// follow the majority. Asked at once, the cut-off Sentinel answers first
/// about as often as any other; ten daemons starting show that none takes
/// its word over the majority's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemons_follow_the_primary_a_majority_of_sentinels_name() {
    let set = tokio::task::block_in_place(SentinelSet::start);
    let (cut_off, its_sentinel) = tokio::task::block_in_place(|| set.start_cut_off_pair());
    let dir = tempfile::tempdir().unwrap();
    let path = set.write_config(dir.path(), "");
    // The cut-off Sentinel first in the list.
    let text = std::fs::read_to_string(&path).unwrap().replacen(
        "sentinels = [",
        &format!("sentinels = [\"{}\", ", its_sentinel.url()),
        1,
    );
    std::fs::write(&path, text).unwrap();
    let config = load(&path);
    let majority = format!("127.0.0.1:{}", set.servers[0].port);
    for attempt in 0..10 {
        let store = Store::new(&config).unwrap();
        let stats = store.primary().unwrap().stats();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let address = loop {
            if let Some(address) = stats.address() {
                break address;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "daemon {attempt} found no primary"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(
            address, majority,
            "daemon {attempt} followed the cut-off primary 127.0.0.1:{}",
            cut_off.port
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_primary_loses_no_acknowledged_message() {
    let service = tokio::task::block_in_place(|| Service::start(""));
    service.wait_ready().await;
    let (_client, mut messages) = PollingClient::join(&service.frontend, "failover").await;
    let old_primary = service.set.servers[0].port;

    let mut tally = Tally::default();
    let mut seen_degraded = false;
    let mut killed_after = None;
    let mut killed_at = None;
    let mut back_after = None;
    let mut resumed_after = None;
    let mut n = 0;
    // Posts one message after another, each retried with its key until
    // acknowledged; the primary dies after 40, and 40 more are acknowledged
    // after the first one that succeeds on the new primary.
    while resumed_after.is_none_or(|resumed| tally.acknowledged.len() < resumed + 40) {
        let text = format!("message {n}");
        let key = format!("key-{n}");
        tally.sent += 1;
        // A generous bound: the failover takes a few seconds.
        let give_up = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            assert!(
                std::time::Instant::now() < give_up,
                "posting did not resume within 60 s: {tally:?}"
            );
            let (status, body) = service.post("failover", &text, &key).await;
            if status == 201 {
                tally
                    .acknowledged
                    .push((body["id"].as_str().unwrap().to_owned(), text.clone()));
                if back_after.is_none() {
                    back_after = killed_at.map(|at: std::time::Instant| at.elapsed());
                }
                break;
            }
            assert!(matches!(status, 0 | 503), "{status} {body}");
            tally.failed_attempts += 1;
            if service.frontend_status().await.as_deref() == Some("degraded") {
                seen_degraded = true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        n += 1;
        if tally.acknowledged.len() == 20 && killed_after.is_none() {
            // Resuming works before the failover too (and the frontend
            // reads history from the first primary).
            let got = resume(
                &service.frontend,
                "failover",
                &tally.acknowledged[9].0,
                &tally.acknowledged[19].0,
            )
            .await;
            assert_eq!(got, tally.acknowledged[10..20].to_vec());
        }
        if killed_after.is_none() && tally.acknowledged.len() == 40 {
            service.set.servers[0].process.signal(SIGKILL);
            killed_at = Some(std::time::Instant::now());
            killed_after = Some(tally.acknowledged.len());
        }
        if killed_after.is_some() && resumed_after.is_none() {
            let new_primary = tokio::task::block_in_place(|| service.set.primary_port());
            if new_primary.is_some_and(|port| port != old_primary) {
                resumed_after = Some(tally.acknowledged.len());
            }
        }
    }
    // Once every acknowledged message went out, a last one: the fence.
    let (status, fence) = service.post("failover", "fence", "key-fence").await;
    assert_eq!(status, 201, "{fence}");
    let fence_id = fence["id"].as_str().unwrap().to_owned();

    let delivered = receive_until(&mut messages, &fence_id)
        .await
        .unwrap_or_else(|got| panic!("the fence never arrived; delivered {got:?}"));

    let lost: Vec<&(String, String)> = tally
        .acknowledged
        .iter()
        .filter(|(id, text)| !delivered.iter().any(|(i, t)| i == id && t == text))
        .collect();
    let (duplicated_ids, duplicated_texts) = duplicates(&delivered);
    let ids: Vec<StreamId> = delivered
        .iter()
        .map(|(id, _)| StreamId::parse(id).unwrap())
        .collect();
    eprintln!(
        "sent {}, acknowledged {}, failed attempts {}, delivered {}, lost {}, duplicated \
         {duplicated_ids} by id and {duplicated_texts} by text; posting back {back_after:?} after \
         the SIGKILL",
        tally.sent,
        tally.acknowledged.len(),
        tally.failed_attempts,
        delivered.len(),
        lost.len()
    );
    assert!(
        lost.is_empty(),
        "acknowledged but never delivered: {lost:?}"
    );
    assert_eq!(
        (duplicated_ids, duplicated_texts),
        (0, 0),
        "delivered twice (by id, by text, as a user sees it): {delivered:?}"
    );
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "out of order: {delivered:?}"
    );
    assert!(
        tally.failed_attempts > 0,
        "the failover did not show at all"
    );
    assert!(
        seen_degraded,
        "the frontend never said degraded without a primary"
    );
    service.wait_for_status("ok").await;

    let new_primary = tokio::task::block_in_place(|| service.set.primary_port()).unwrap();
    let line = format!("following new Redis primary 127.0.0.1:{new_primary}");
    assert!(
        service.backend.log_text().contains(&line),
        "{}",
        service.backend.log_text()
    );
    assert!(
        service.frontend.log_text().contains(&line),
        "{}",
        service.frontend.log_text()
    );
    let metrics = service.metrics(&service.backend).await;
    assert!(
        metrics.contains("chat_backend_redis_failovers_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "chat_backend_redis_primary{{address=\"127.0.0.1:{new_primary}\"}} 1"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("chat_backend_redis_without_primary_seconds_total"),
        "{metrics}"
    );

    // A client resuming from before the SIGKILL gets every acknowledged
    // message after its position from the new primary's history, once.
    let since = &tally.acknowledged[29].0;
    let got = resume(&service.frontend, "failover", since, &fence_id).await;
    let mut expected: Vec<(String, String)> = tally.acknowledged[30..].to_vec();
    expected.push((fence_id.clone(), "fence".into()));
    assert_eq!(
        got, expected,
        "a resumed client's messages across the failover"
    );
}

/// How many ids, and how many texts, `delivered` holds more than once: a
/// message stored again under a new id after a failover shows as the same
/// text twice to a user.
fn duplicates(delivered: &[(String, String)]) -> (usize, usize) {
    let mut ids: HashMap<&str, usize> = HashMap::new();
    let mut texts: HashMap<&str, usize> = HashMap::new();
    for (id, text) in delivered {
        *ids.entry(id).or_default() += 1;
        *texts.entry(text).or_default() += 1;
    }
    let more_than_once = |counts: HashMap<&str, usize>| counts.values().filter(|&&n| n > 1).count();
    (more_than_once(ids), more_than_once(texts))
}

/// Posts `text` with `key` until it is acknowledged, for 60 s at most
/// (a failover takes a few seconds); returns its id.
async fn post_until_acknowledged(service: &Service, room: &str, text: &str, key: &str) -> String {
    let give_up = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = service.post(room, text, key).await;
        if status == 201 {
            return body["id"].as_str().unwrap().to_owned();
        }
        assert!(matches!(status, 0 | 503), "{status} {body}");
        assert!(
            std::time::Instant::now() < give_up,
            "{text:?} not acknowledged within 60 s: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A message the primary stored but no replica applied: the backend
/// answers 503, the primary dies, the promoted replica lacks the message
/// and the record of its key, so the retry with the same key stores it
/// again under a new id. A client in the room sees it once: the first copy
/// never reached sockets, as replicas never held it.
///
/// `CLIENT PAUSE ... ALL` on the replicas makes them read what the primary
/// sends without applying it (not `SIGSTOP`: the kernel would keep the
/// bytes for a stopped replica, which would apply them once continued);
/// when the primary dies, a replica drops what it had not applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_lost_with_its_primary_reaches_clients_once_after_the_retry() {
    let service = tokio::task::block_in_place(|| Service::start("replica_ack_timeout_ms = 300\n"));
    service.wait_ready().await;
    let (_client, mut messages) = PollingClient::join(&service.frontend, "lost").await;
    let before = post_until_acknowledged(&service, "lost", "before", "key-before").await;

    const PAUSE: Duration = Duration::from_secs(3);
    let paused_at = std::time::Instant::now();
    tokio::task::block_in_place(|| {
        for replica in &service.set.servers[1..] {
            replica.query::<()>(
                redis::cmd("CLIENT")
                    .arg("PAUSE")
                    .arg(PAUSE.as_millis() as u64)
                    .arg("ALL"),
            );
        }
    });
    let (status, body) = service
        .post("lost", "lost with its primary", "key-lost")
        .await;
    assert_eq!(status, 503, "{body}");
    service.set.servers[0].process.signal(SIGKILL);
    assert!(
        paused_at.elapsed() < PAUSE,
        "the primary died after the replicas went on: the test proves nothing"
    );

    let retried =
        post_until_acknowledged(&service, "lost", "lost with its primary", "key-lost").await;
    let new_primary = tokio::task::block_in_place(|| service.set.primary_port()).unwrap();
    let on_new_primary: Vec<redis::Value> = tokio::task::block_in_place(|| {
        service
            .set
            .server(new_primary)
            .query(redis::cmd("XRANGE").arg(room_key("lost")).arg("-").arg("+"))
    });
    assert_eq!(
        on_new_primary.len(),
        2,
        "the new primary holds the first copy: nothing was lost, the test proves nothing"
    );
    let fence = post_until_acknowledged(&service, "lost", "fence", "key-fence").await;

    let delivered = receive_until(&mut messages, &fence)
        .await
        .unwrap_or_else(|got| panic!("the fence never arrived; delivered {got:?}"));
    eprintln!("delivered across the loss: {delivered:?}");
    assert_eq!(
        delivered,
        vec![
            (before, "before".to_owned()),
            (retried, "lost with its primary".to_owned()),
            (fence, "fence".to_owned()),
        ]
    );
}

/// A message whose replicas did not confirm it (503) is not handed to
/// sockets, nor replayed to a resuming client, until a later post's `WAIT`
/// shows replicas hold it; then both clients get it once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_waits_for_its_replicas_before_reaching_clients() {
    let service = tokio::task::block_in_place(|| Service::start("replica_ack_timeout_ms = 300\n"));
    service.wait_ready().await;
    let (_live, mut live) = PollingClient::join(&service.frontend, "held").await;
    let before = post_until_acknowledged(&service, "held", "before", "key-before").await;
    assert_eq!(
        receive_until(&mut live, &before).await,
        Ok(vec![(before.clone(), "before".to_owned())])
    );

    for replica in &service.set.servers[1..] {
        replica.process.signal(SIGSTOP);
    }
    let (status, body) = service.post("held", "not yet replicated", "key-held").await;
    for replica in &service.set.servers[1..] {
        replica.process.signal(SIGCONT);
    }
    assert_eq!(status, 503, "{body}");

    // The frontend has not handed the message out: a client resuming from
    // the message before it is replayed nothing.
    let request = serde_json::json!({"room": "held", "since": before});
    let (_resumed, mut resumed, answer) =
        PollingClient::join_answered(&service.frontend, &request).await;
    assert_eq!(answer["replayed"], 0, "{answer}");

    // A post whose WAIT succeeds shows that replicas hold both.
    let after = post_until_acknowledged(&service, "held", "after", "key-after").await;
    let got = receive_until(&mut live, &after)
        .await
        .unwrap_or_else(|got| panic!("{after} never came live; got {got:?}"));
    let texts: Vec<&str> = got.iter().map(|(_, text)| text.as_str()).collect();
    assert_eq!(texts, ["not yet replicated", "after"], "{got:?}");
    let held = &got[0].0;
    assert!(
        StreamId::parse(held).unwrap() < StreamId::parse(&after).unwrap(),
        "{got:?}"
    );
    let resumed = receive_until(&mut resumed, &after)
        .await
        .unwrap_or_else(|got| panic!("{after} never came to the resumed client; got {got:?}"));
    assert_eq!(resumed, got);
    // The retry with the key is acknowledged with the id the message was
    // stored under.
    let (status, body) = service.post("held", "not yet replicated", "key-held").await;
    assert_eq!(
        (status, &body["id"]),
        (201, &Value::from(held.as_str())),
        "{body}"
    );
}

/// A set locked as chat-redis and the Sentinel example lock it: no
/// anonymous login anywhere, replicas and Sentinels logging in as their own
/// users with the shipped rules, the Sentinels with a password of their own.
/// The daemons read both their passwords from systemd credentials, do all
/// their work (`ROLE`, `WAIT`, the replicated position) as the shipped
/// chat-ha user, and follow a failover the Sentinels carry out as theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemons_and_a_failover_work_with_every_server_and_sentinel_locked() {
    let set = tokio::task::block_in_place(SentinelSet::start_locked);
    let anonymous: redis::RedisResult<String> = redis::Client::open(set.sentinels[0].url())
        .unwrap()
        .get_connection()
        .and_then(|mut c| redis::cmd("PING").query(&mut c));
    assert!(
        anonymous
            .as_ref()
            .is_err_and(|e| e.to_string().contains("NOAUTH")),
        "an anonymous client of a Sentinel: {anonymous:?}"
    );
    // What systemd gives the units: the two credentials, nothing in the
    // configuration.
    let credentials = set.dir().join("credentials");
    std::fs::create_dir(&credentials).unwrap();
    let passwords = &common::sentinel::PASSWORDS;
    std::fs::write(credentials.join("redis-password"), passwords.chat_ha).unwrap();
    std::fs::write(credentials.join("sentinel-password"), passwords.sentinels).unwrap();
    let service = tokio::task::block_in_place(|| {
        Service::on_with(set, "", |command| {
            command.env("CREDENTIALS_DIRECTORY", &credentials);
        })
    });
    service.wait_ready().await;
    let (_client, mut messages) = PollingClient::join(&service.frontend, "acl").await;
    let id = post_until_acknowledged(&service, "acl", "as chat-ha", "key-acl").await;
    assert_eq!(
        receive_until(&mut messages, &id).await,
        Ok(vec![(id.clone(), "as chat-ha".to_owned())])
    );
    let recorded: String = tokio::task::block_in_place(|| {
        service.set.servers[0].query(
            redis::cmd("GET")
                .arg(Keys::new(&RedisConfig::default()).acked(&Room::parse("acl").unwrap())),
        )
    });
    assert_eq!(recorded, id, "the replicated position, set as chat-ha");
    // A post to another room: its stream ends before this backend's newest
    // id, which the append script then checks against Redis's clock.
    let (status, body) = service.post("acl-other", "another room", "key-other").await;
    assert_eq!(status, 201, "{body}");

    // Both status answers name the primary they follow.
    let primary = format!("127.0.0.1:{}", service.set.servers[0].port);
    for url in [
        service.backend_url("/back/status"),
        format!("http://{}/front/status", service.frontend.public),
    ] {
        let status: Value = reqwest::get(&url).await.unwrap().json().await.unwrap();
        assert_eq!(status["redis_primary"], primary.as_str(), "{url}: {status}");
    }

    // The Sentinels promote a replica as the user sentinel; the remaining
    // replica follows it as the user replica (so WAIT succeeds again), and
    // the daemons follow it.
    service.set.servers[0].process.signal(SIGKILL);
    let after = post_until_acknowledged(&service, "acl", "after", "key-after").await;
    assert_eq!(
        receive_until(&mut messages, &after).await,
        Ok(vec![(after.clone(), "after".to_owned())])
    );
    let promoted = tokio::task::block_in_place(|| service.set.primary_port());
    assert_ne!(promoted, Some(service.set.servers[0].port));

    // A frontend given the Redis password but not the Sentinels' finds no
    // primary, and says why.
    let without = service.set.dir().join("without-sentinel-password");
    std::fs::create_dir(&without).unwrap();
    std::fs::write(without.join("redis-password"), passwords.chat_ha).unwrap();
    let config = service.set.write_config(&without, "");
    let mut command = daemon_on_any_port("chat-frontend", &config, "127.0.0.1");
    command.env("CREDENTIALS_DIRECTORY", &without);
    let frontend = tokio::task::block_in_place(|| start_daemon("chat-frontend", &mut command));
    let refused = tokio::time::timeout(Duration::from_secs(20), async {
        while !frontend.log_text().contains("refuses the login") {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(refused.is_ok(), "{}", frontend.log_text());
    let url = format!("http://{}/front/status", frontend.public);
    let status: Value = reqwest::get(&url).await.unwrap().json().await.unwrap();
    assert_eq!(status["status"], "degraded", "{status}");
}

/// A primary that keeps running but whose replicas stopped answering does
/// not acknowledge: 503, and the retry with the same key, once a replica
/// is back, is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_cut_off_from_its_replicas_answers_503_and_the_retry_is_stored_once() {
    let service = tokio::task::block_in_place(|| Service::start("replica_ack_timeout_ms = 300\n"));
    service.wait_ready().await;
    let (status, body) = service.post("cut", "before", "key-before").await;
    assert_eq!(status, 201, "{body}");

    for replica in &service.set.servers[1..] {
        replica.process.signal(SIGSTOP);
    }
    let (status, body) = service.post("cut", "while cut off", "key-cut").await;
    let error = body["error"].as_str().unwrap_or_default().to_owned();
    for replica in &service.set.servers[1..] {
        replica.process.signal(SIGCONT);
    }
    assert_eq!(status, 503, "{body}");
    assert!(
        error.contains("could not copy the message to a replica"),
        "{error}"
    );
    assert!(
        error.contains("retry with the same Idempotency-Key"),
        "{error}"
    );

    let mut retried = Value::Null;
    for _ in 0..100 {
        let (status, body) = service.post("cut", "while cut off", "key-cut").await;
        if status == 201 {
            retried = body;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let id = retried["id"]
        .as_str()
        .expect("the retry was acknowledged")
        .to_owned();
    let history: Value = reqwest::get(service.backend_url("/back/messages?room=cut"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let texts: Vec<(&str, &str)> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["id"].as_str().unwrap(), m["message"].as_str().unwrap()))
        .collect();
    assert_eq!(texts.len(), 2, "{texts:?}");
    assert_eq!(texts[1], (id.as_str(), "while cut off"));
}

/// Posts arriving together share their `WAIT`s (fewer `WAIT`s than posts,
/// all acknowledged and stored), and a history read is answered while a
/// post still waits for replicas that do not answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_posts_share_waits_and_reads_never_wait_behind_them() {
    let service = Arc::new(tokio::task::block_in_place(|| {
        Service::start("min_replicas_acked = 2\nreplica_ack_timeout_ms = 60000\n")
    }));
    const POSTS: usize = 100;
    service.wait_ready().await;
    let waits_before = wait_calls(&service);
    let mut posting = tokio::task::JoinSet::new();
    for i in 0..POSTS {
        let service = service.clone();
        posting.spawn(async move {
            service
                .post("group", &format!("post {i}"), &format!("g{i}"))
                .await
        });
    }
    while let Some(answer) = posting.join_next().await {
        let (status, body) = answer.unwrap();
        assert_eq!(status, 201, "{body}");
    }
    let waits = wait_calls(&service) - waits_before;
    eprintln!("{POSTS} concurrent posts, {waits} WAIT calls");
    assert!(waits < POSTS as u64, "one WAIT per post: {waits}");
    let history: Value = reqwest::get(service.backend_url("/back/messages?room=group&limit=200"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(history["messages"].as_array().unwrap().len(), POSTS);

    for replica in &service.set.servers[1..] {
        replica.process.signal(SIGSTOP);
    }
    let waiting = tokio::spawn({
        let service = service.clone();
        async move { service.post("group", "waits for replicas", "g-wait").await }
    });
    // The post has reached the WAIT once the primary holds it.
    let primary = &service.set.servers[0];
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let stored: u64 = tokio::task::block_in_place(|| {
                primary.query(redis::cmd("XLEN").arg(room_key("group")))
            });
            if stored as usize > POSTS {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the post reached the primary");
    // The post waits up to a minute; the read must not wait behind it (a
    // third of that is a generous bound).
    let read = reqwest::Client::new()
        .get(service.backend_url("/back/messages?room=group&limit=1"))
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .expect("a history read answered while a post waits for replicas");
    assert_eq!(read.status(), 200);
    assert!(
        !waiting.is_finished(),
        "the post did not wait for its replicas"
    );
    for replica in &service.set.servers[1..] {
        replica.process.signal(SIGCONT);
    }
    // Back, the replicas confirm the post: acknowledged.
    let (status, body) = waiting.await.unwrap();
    assert_eq!(status, 201, "{body}");
}

/// `WAIT` commands the primary ran so far.
fn wait_calls(service: &Service) -> u64 {
    let stats: String = tokio::task::block_in_place(|| {
        service.set.servers[0].query(redis::cmd("INFO").arg("commandstats"))
    });
    stats
        .lines()
        .find_map(|line| line.strip_prefix("cmdstat_wait:calls="))
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .unwrap_or(0)
}
