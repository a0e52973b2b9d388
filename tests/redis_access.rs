//! Redis that not everyone may use: the daemons log in as an ACL user limited
//! to chat-ha's keys, channels and commands, with a password from a file of
//! its own that is never printed, and reach Redis over TLS when told to.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use chat_ha::config::Config;
use chat_ha::delivery::{Feed, PostKey, RedisHealth, Store};
use chat_ha::message::{ChatMessage, IdempotencyKey, Room};
use common::{
    Forward, Redis, binary, certificates, daemon_on_any_port, free_port, post, start_daemon,
    wait_for, write_config,
};
use tokio::sync::mpsc;

const PASSWORD: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
const ADMIN_PASSWORD: &str = "admin-password-for-the-test";

/// `redis-server` options, as the package chat-redis sets Redis up:
/// nobody anonymous (the default user locked by the administrator's
/// password), the `chat-ha` user with the rules of
/// `etc/redis/chat-ha-user.acl`, and the administrator.
fn acl_options() -> Vec<String> {
    let mut options: Vec<String> = [
        "--user",
        "default",
        "on",
        &format!(">{ADMIN_PASSWORD}"),
        "~*",
        "&*",
        "+@all",
    ]
    .map(String::from)
    .to_vec();
    options.push("--user".into());
    options.extend(common::chat_ha_acl_rules(&format!(">{PASSWORD}")));
    options.extend(
        [
            "--user",
            "admin",
            "on",
            &format!(">{ADMIN_PASSWORD}"),
            "~*",
            "&*",
            "+@all",
        ]
        .map(String::from),
    );
    options
}

/// Writes into `dir` a configuration pointing at `url`, logging in with
/// `password` (if any) from a file beside it, with `redis_lines` more keys
/// of `[redis]`; returns its path.
fn write(dir: &Path, url: &str, password: Option<&str>, redis_lines: &str) -> PathBuf {
    let mut lines = redis_lines.to_owned();
    if let Some(password) = password {
        let file = dir.join("redis-password");
        std::fs::write(&file, format!("{password}\n")).unwrap();
        lines.push_str(&format!("password_file = \"{}\"\n", file.display()));
    }
    let path = write_config(dir, url, "");
    // write_config opens [redis] itself: the keys go into that table.
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replacen("[redis]\n", &format!("[redis]\n{lines}"), 1),
    )
    .unwrap();
    path
}

/// As [`write`], loaded.
fn config(dir: &Path, url: &str, password: Option<&str>, redis_lines: &str) -> Config {
    Config::load(&write(dir, url, password, redis_lines), true).unwrap()
}

/// A feed following `rooms` on Redis as `config` says, once it has
/// reached it.
async fn follow(config: &Config, rooms: &[&str]) -> mpsc::UnboundedReceiver<ChatMessage> {
    let (feed, interest) = Feed::new(config, RedisHealth::new()).unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(feed.run(Arc::new(Forward(tx))));
    for room in rooms {
        let room = Room::parse(room).unwrap();
        interest
            .follow(&room, Duration::from_secs(10))
            .await
            .expect("the feed logged in to Redis and follows the room");
    }
    rx
}

async fn next(rx: &mut mpsc::UnboundedReceiver<ChatMessage>) -> ChatMessage {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a message within 10 s")
        .expect("the feed runs")
}

/// Everything the daemons do with Redis works as the limited user: the
/// append script (loaded, then called by digest), a repeated post, history,
/// and the feed, pushed and read.
#[tokio::test]
async fn the_daemons_do_all_their_work_as_the_limited_acl_user() {
    let redis = Redis::start_with(acl_options());
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &redis.url(), Some(PASSWORD), "");
    let mut rx = follow(&config, &["acl"]).await;
    let store = Store::new(&config).unwrap();

    let key = PostKey::message(
        &IdempotencyKey::parse("acl-test-key").unwrap(),
        &Room::parse("acl").unwrap(),
    );
    let first = store
        .append(&post("acl", "hello"), Some(&key))
        .await
        .unwrap();
    let again = store
        .append(&post("acl", "hello"), Some(&key))
        .await
        .unwrap();
    assert!(again.repeated && again.message == first.message);
    let second = store.append(&post("acl", "world"), None).await.unwrap();

    assert_eq!(next(&mut rx).await, first.message);
    assert_eq!(next(&mut rx).await, second.message);
    let history = store
        .history(&Room::parse("acl").unwrap(), 10, None, 1 << 20)
        .await
        .unwrap();
    assert_eq!(history, [first.message, second.message]);
}

/// Messages appended as the limited user are still there after Redis
/// restarts from its append-only file: Redis replays it as the default user,
/// and drops every transaction (the append script's writes are one) that
/// user may not run, so the default user must never be "off".
#[tokio::test]
async fn what_the_acl_user_stored_survives_a_restart() {
    let mut redis = Redis::start_with(acl_options());
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &redis.url(), Some(PASSWORD), "");
    let store = Store::new(&config).unwrap();
    let stored = store
        .append(&post("kept", "before the restart"), None)
        .await
        .unwrap();
    redis.stop();
    redis.restart();
    let room = Room::parse("kept").unwrap();
    let history = loop {
        match store.history(&room, 10, None, 1 << 20).await {
            Ok(history) => break history,
            // The store reconnects on the next command.
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    assert_eq!(history, [stored.message]);
}

/// What the `chat-ha` user may not do, even with its password: flush,
/// reconfigure, or touch keys and channels that are not chat-ha's.
#[tokio::test]
async fn the_acl_user_cannot_flush_reconfigure_or_reach_other_keys() {
    let redis = Redis::start_with(acl_options());
    let mut conn = redis::Client::open(redis.url_as("chat-ha", PASSWORD))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for command in [
        redis::cmd("FLUSHALL"),
        redis::Cmd::new()
            .arg("CONFIG")
            .arg("SET")
            .arg("maxmemory")
            .arg("1")
            .to_owned(),
        redis::Cmd::new()
            .arg("SET")
            .arg("other:key")
            .arg("x")
            .to_owned(),
        redis::Cmd::new()
            .arg("PUBLISH")
            .arg("other:channel")
            .arg("x")
            .to_owned(),
        redis::Cmd::new()
            .arg("SPUBLISH")
            .arg("other:channel")
            .arg("x")
            .to_owned(),
        redis::Cmd::new().arg("KEYS").arg("*").to_owned(),
        redis::Cmd::new().arg("ACL").arg("LIST").to_owned(),
    ] {
        let refused = command
            .query_async::<redis::Value>(&mut conn)
            .await
            .unwrap_err();
        assert!(
            refused.to_string().contains("no permissions"),
            "{:?}: {refused}",
            command.args_iter().next()
        );
    }
    // Nobody gets in without logging in.
    let anonymous = redis::Client::open(redis.url()).unwrap();
    let mut anonymous = anonymous.get_multiplexed_async_connection().await.unwrap();
    let refused = redis::cmd("GET")
        .arg("chat:{p0}:room:lobby")
        .query_async::<redis::Value>(&mut anonymous)
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("NOAUTH"), "{refused}");
}

/// A backend with a wrong password, or none, answers 503 and reports Redis
/// down, and its output never shows the password; `--check-config` neither.
#[tokio::test]
async fn a_wrong_password_is_a_503_and_never_printed() {
    let redis = Redis::start_with(acl_options());
    for (password, case) in [
        (Some("wrong-password-not-to-be-printed"), "wrong"),
        (None, "none"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), &redis.url(), password, "");
        let mut backend = start_daemon(
            "chat-backend",
            &mut daemon_on_any_port("chat-backend", &path, "127.0.0.1"),
        );
        let addr = backend.public;
        let client = reqwest::Client::new();
        let post = || {
            client
                .post(format!("http://{addr}/back/message"))
                .header("content-type", "application/json")
                .body(r#"{"room":"acl","message":"hi"}"#)
                .send()
        };
        let answer = post().await.unwrap();
        assert_eq!(answer.status(), 503, "{case}");
        let status: serde_json::Value = client
            .get(format!("http://{addr}/back/status"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(status["redis"], "down", "{case}: {status}");
        let log = wait_for("the 503 in the log", Duration::from_secs(10), || {
            let log = backend.log_text();
            log.contains("answering 503").then_some(log)
        });
        backend.process.signal(15);
        backend.process.wait(Duration::from_secs(15));
        if let Some(password) = password {
            assert!(
                !log.contains(password),
                "{case}: the log shows the password: {log}"
            );
            let check = Command::new(binary("chat-backend"))
                .arg("--config")
                .arg(&path)
                .arg("--check-config")
                .output()
                .unwrap();
            assert!(check.status.success());
            let printed = String::from_utf8_lossy(&check.stdout);
            assert!(printed.contains("password_file"), "{printed}");
            assert!(!printed.contains(password), "{printed}");
        }
    }
}

/// Over `rediss://`, the daemons check the server's certificate against
/// `redis.tls_ca_file`: with it they store and deliver; without it (the
/// host's CAs do not know this one) they refuse the server.
#[tokio::test]
async fn over_tls_the_server_certificate_is_checked_against_the_configured_ca() {
    let certs = tempfile::tempdir().unwrap();
    certificates(certs.path());
    let tls_port = free_port();
    let file = |name: &str| certs.path().join(name).display().to_string();
    let mut options = acl_options();
    options.extend(common::tls_options(certs.path(), tls_port));
    let _redis = Redis::start_with(options);
    let url = format!("rediss://localhost:{tls_port}/0");

    let dir = tempfile::tempdir().unwrap();
    let ca = format!("tls_ca_file = \"{}\"\n", file("ca.pem"));
    let config = config(dir.path(), &url, Some(PASSWORD), &ca);
    let mut rx = follow(&config, &["tls"]).await;
    let store = Store::new(&config).unwrap();
    let stored = store.append(&post("tls", "over TLS"), None).await.unwrap();
    assert_eq!(next(&mut rx).await, stored.message);

    let untrusting = tempfile::tempdir().unwrap();
    let config = self::config(untrusting.path(), &url, Some(PASSWORD), "");
    let store = Store::new(&config).unwrap();
    let refused = store
        .append(&post("tls", "refused"), None)
        .await
        .unwrap_err();
    assert!(
        refused.to_string().to_lowercase().contains("certificate"),
        "{refused}"
    );
}
