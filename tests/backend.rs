//! The REST backend against a real redis-server: what a client of
//! `/back/message`, `/back/messages` and `/back/status` sees.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chat_ha::config::Config;
use common::{Redis, write_config};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// A backend served in this process on a free port, stopped when dropped.
struct Backend {
    base: String,
    metrics_base: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl Backend {
    async fn start(redis: &Redis, extra_config: &str) -> Backend {
        let dir = tempfile::tempdir().unwrap();
        let path = write_config(dir.path(), &redis.url(), extra_config);
        let config = Arc::new(Config::load(&path, true).unwrap());
        let bind = || tokio::net::TcpListener::bind("127.0.0.1:0");
        let listeners = chat_ha::serve::Listeners {
            public: bind().await.unwrap(),
            metrics: bind().await.unwrap(),
        };
        let base = format!("http://{}", listeners.public.local_addr().unwrap());
        let metrics_base = format!("http://{}", listeners.metrics.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(chat_ha::backend::run(config, listeners, 7, async {
            let _ = stopped.await;
        }));
        Backend {
            base,
            metrics_base,
            stop: Some(stop),
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn post_raw(
        &self,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> (StatusCode, Value) {
        let response = reqwest::Client::new()
            .post(self.url("/back/message"))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        (status, response.json().await.unwrap())
    }

    async fn post(&self, room: &str, message: &str) -> (StatusCode, Value) {
        let body = json!({"room": room, "message": message}).to_string();
        self.post_raw("application/json", body).await
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let response = reqwest::get(self.url(path)).await.unwrap();
        let status = response.status();
        (status, response.json().await.unwrap())
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Posts until Redis is reachable again; every refusal meanwhile must be a 503.
async fn post_until_created(backend: &Backend, room: &str, text: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = backend.post(room, text).await;
        if status == StatusCode::CREATED {
            return body;
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(
            Instant::now() < deadline,
            "backend never reached Redis again: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn error_text(body: &Value) -> &str {
    body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error text in {body}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn posted_message_is_acknowledged_and_in_history_in_order() {
    let redis = Redis::start();
    let backend = Backend::start(&redis, "").await;

    let mut ids = Vec::new();
    for text in ["first", "second", "third"] {
        let (status, body) = backend.post("rooma", text).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(body["room"], "rooma");
        assert_eq!(body["message"], text);
        let id = body["id"].as_str().unwrap().to_owned();
        let ms: u64 = id.split('-').next().unwrap().parse().unwrap();
        assert_eq!(
            body["ts"].as_u64(),
            Some(ms),
            "ts is the time Redis stored it"
        );
        ids.push(id);
    }
    backend.post("roomb", "elsewhere").await;

    let (status, history) = backend.get("/back/messages?room=rooma").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(history["room"], "rooma");
    let texts: Vec<&str> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["message"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["first", "second", "third"]);
    let got_ids: Vec<&str> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(got_ids, ids);

    let (_, last_two) = backend.get("/back/messages?room=rooma&limit=2").await;
    let texts: Vec<&str> = last_two["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["message"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["second", "third"], "the last N, oldest first");

    let (_, empty) = backend.get("/back/messages?room=nobody-here").await;
    assert_eq!(empty["messages"], json!([]));
}

#[tokio::test(flavor = "multi_thread")]
async fn ids_increase_within_a_room_across_rooms_and_backends() {
    let redis = Redis::start();
    let one = Backend::start(&redis, "").await;
    let two = Backend::start(&redis, "").await;
    let mut last = (0u64, 0u64);
    for i in 0..40 {
        let backend = if i % 2 == 0 { &one } else { &two };
        backend
            .post(if i % 3 == 0 { "other" } else { "rooma" }, "x")
            .await;
        let (status, body) = backend.post("rooma", &format!("m{i}")).await;
        assert_eq!(status, StatusCode::CREATED);
        let (ms, seq) = body["id"].as_str().unwrap().split_once('-').unwrap();
        let id = (ms.parse().unwrap(), seq.parse().unwrap());
        assert!(id > last, "{id:?} after {last:?}");
        last = id;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_bad_request_gets_its_status_and_a_json_error() {
    let redis = Redis::start();
    let backend = Backend::start(&redis, "").await;

    let cases: Vec<(&str, String, StatusCode, &str)> = vec![
        (
            "application/json",
            "{\"room\":".into(),
            StatusCode::BAD_REQUEST,
            "malformed JSON",
        ),
        (
            "application/json",
            "[1,2]".into(),
            StatusCode::BAD_REQUEST,
            "invalid message",
        ),
        (
            "application/json",
            r#"{"room":"rooma"}"#.into(),
            StatusCode::BAD_REQUEST,
            "missing field `message`",
        ),
        (
            "application/json",
            r#"{"room":"rooma","message":7}"#.into(),
            StatusCode::BAD_REQUEST,
            "invalid type",
        ),
        (
            "application/json",
            r#"{"room":"rooma","message":"a","extra":1}"#.into(),
            StatusCode::BAD_REQUEST,
            "unknown field",
        ),
        (
            "application/json",
            r#"{"room":"a","room":"b","message":"a"}"#.into(),
            StatusCode::BAD_REQUEST,
            "duplicate field",
        ),
        (
            "application/json",
            r#"{"room":"a b","message":"hi"}"#.into(),
            StatusCode::BAD_REQUEST,
            "room must be",
        ),
        (
            "application/json",
            json!({"room": "x".repeat(65), "message": "hi"}).to_string(),
            StatusCode::BAD_REQUEST,
            "room must be",
        ),
        (
            "application/json",
            r#"{"room":"rooma","message":""}"#.into(),
            StatusCode::BAD_REQUEST,
            "must not be empty",
        ),
        (
            "application/json",
            r#"{"room":"rooma","message":"   "}"#.into(),
            StatusCode::BAD_REQUEST,
            "must not be empty",
        ),
        (
            "application/json",
            json!({"room": "rooma", "message": "é".repeat(4001)}).to_string(),
            StatusCode::BAD_REQUEST,
            "longer than 4000",
        ),
        (
            "application/json",
            json!({"room": "rooma", "message": "x".repeat(17 * 1024)}).to_string(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "larger than 16384 bytes",
        ),
        (
            "text/plain",
            r#"{"room":"rooma","message":"hi"}"#.into(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "application/json",
        ),
        (
            "application/json",
            format!("{}1{}", "[".repeat(5000), "]".repeat(5000)),
            StatusCode::BAD_REQUEST,
            "invalid message",
        ),
    ];
    for (content_type, body, status, text) in cases {
        let (got, answer) = backend.post_raw(content_type, body.clone()).await;
        assert_eq!(got, status, "{} → {answer}", &body[..body.len().min(60)]);
        assert!(
            error_text(&answer).contains(text),
            "{} → {answer}, expected {text:?}",
            &body[..body.len().min(60)]
        );
    }

    let (got, answer) = backend
        .post_raw(
            "application/json",
            b"{\"room\":\"a\",\"message\":\"\xff\"}".to_vec(),
        )
        .await;
    assert_eq!(got, StatusCode::BAD_REQUEST, "invalid UTF-8 → {answer}");

    let message_4000 = json!({"room": "rooma", "message": "é".repeat(4000)}).to_string();
    assert_eq!(
        backend.post_raw("application/json", message_4000).await.0,
        StatusCode::CREATED
    );

    for (path, status, text) in [
        ("/back/messages", StatusCode::BAD_REQUEST, "room"),
        (
            "/back/messages?room=bad%20room",
            StatusCode::BAD_REQUEST,
            "room must be",
        ),
        (
            "/back/messages?room=rooma&limit=0",
            StatusCode::BAD_REQUEST,
            "limit",
        ),
        (
            "/back/messages?room=rooma&limit=201",
            StatusCode::BAD_REQUEST,
            "limit",
        ),
        (
            "/back/messages?room=rooma&limit=many",
            StatusCode::BAD_REQUEST,
            "limit",
        ),
        ("/back/nothing", StatusCode::NOT_FOUND, "no such endpoint"),
        ("/", StatusCode::NOT_FOUND, "no such endpoint"),
    ] {
        let (got, answer) = backend.get(path).await;
        assert_eq!(got, status, "{path} → {answer}");
        assert!(error_text(&answer).contains(text), "{path} → {answer}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn status_reports_instance_and_redis() {
    let mut redis = Redis::start();
    let backend = Backend::start(&redis, "").await;
    let (status, body) = backend.get("/back/status").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "ok");
    assert_eq!(body["redis"], "up");
    assert_eq!(body["instance"], 7);
    assert!(
        body["connections"].as_u64().unwrap() >= 1,
        "this request's own connection: {body}"
    );

    redis.stop();
    let (status, body) = backend.get("/back/status").await;
    assert_eq!(
        status,
        StatusCode::OK,
        "status answers even while Redis is down"
    );
    assert_eq!(body["status"], "degraded");
    assert_eq!(body["redis"], "down");
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_down_gives_503_quickly_and_posts_succeed_again_after() {
    let mut redis = Redis::start();
    let backend = Backend::start(&redis, "").await;
    assert_eq!(backend.post("rooma", "before").await.0, StatusCode::CREATED);

    redis.stop();
    for _ in 0..3 {
        let started = Instant::now();
        let (status, body) = backend.post("rooma", "during").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(error_text(&body).contains("unavailable"), "{body}");
        // Within the command timeout (1 s here) and not a client's patience:
        // far from a hang, with room for a loaded machine.
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "503 took {:?}",
            started.elapsed()
        );
        let (status, _) = backend.get("/back/messages?room=rooma").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    }

    redis.restart();
    let body = post_until_created(&backend, "rooma", "after").await;
    assert_eq!(body["message"], "after");
    let (_, history) = backend.get("/back/messages?room=rooma").await;
    let texts: Vec<&str> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["message"].as_str().unwrap())
        .collect();
    assert_eq!(
        texts,
        ["before", "after"],
        "nothing acknowledged was lost, nothing refused was stored"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn backend_starts_and_answers_503_while_redis_was_never_up() {
    let mut redis = Redis::start();
    redis.stop();
    let backend = Backend::start(&redis, "").await;
    let (status, body) = backend.post("rooma", "hello").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    redis.restart();
    let body = post_until_created(&backend, "rooma", "after").await;
    assert_eq!(body["message"], "after");
}

#[tokio::test(flavor = "multi_thread")]
async fn history_is_bounded_per_room() {
    let redis = Redis::start();
    let backend = Backend::start(&redis, "[history]\nmax_per_room = 10\n").await;
    for i in 0..400 {
        assert_eq!(
            backend.post("small", &format!("m{i}")).await.0,
            StatusCode::CREATED
        );
    }
    let (_, history) = backend.get("/back/messages?room=small&limit=200").await;
    let kept = history["messages"].as_array().unwrap().len();
    // Trimming is approximate: Redis drops whole nodes of up to 100 entries.
    assert!(
        (10..=110).contains(&kept),
        "kept {kept} of 400 with max_per_room = 10"
    );
    assert_eq!(
        history["messages"].as_array().unwrap().last().unwrap()["message"],
        "m399"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_answers_by_status_and_time_them() {
    let redis = Redis::start();
    let backend = Backend::start(&redis, "").await;
    for _ in 0..3 {
        assert_eq!(
            backend.post("rooma", "counted").await.0,
            StatusCode::CREATED
        );
    }
    assert_eq!(
        backend.post("bad room", "x").await.0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        backend.post_raw("text/plain", "x").await.0,
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    );

    let public = reqwest::get(backend.url("/metrics")).await.unwrap();
    assert_eq!(
        public.status(),
        StatusCode::NOT_FOUND,
        "not on the public port"
    );
    let response = reqwest::get(format!("{}/metrics", backend.metrics_base))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let text = response.text().await.unwrap();
    for line in [
        "chat_backend_posts_total{status=\"201\"} 3",
        "chat_backend_posts_total{status=\"400\"} 1",
        "chat_backend_posts_total{status=\"415\"} 1",
        "chat_backend_post_seconds_count 5",
        "chat_backend_redis_up 1",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_post_repeated_with_its_idempotency_key_is_stored_once() {
    let redis = Redis::start();
    let backend = Backend::start(&redis, "").await;
    let post = |key: &'static str, text: &'static str| {
        let request = reqwest::Client::new()
            .post(backend.url("/back/message"))
            .header("idempotency-key", key)
            .json(&json!({"room": "rooma", "message": text}));
        async move {
            let response = request.send().await.unwrap();
            let status = response.status();
            (status, response.json::<Value>().await.unwrap())
        }
    };

    let (first_status, first) = post("retry-1", "once only").await;
    let (again_status, again) = post("retry-1", "once only").await;
    assert_eq!(
        (first_status, again_status),
        (StatusCode::CREATED, StatusCode::CREATED)
    );
    assert_eq!(first, again, "the repeat gets the first answer");

    let (status, body) = post("retry-1", "something else").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(error_text(&body).contains("Idempotency-Key"), "{body}");

    let (status, other) = post("retry-2", "once only").await;
    assert_eq!(status, StatusCode::CREATED);
    assert_ne!(other["id"], first["id"], "another key is another post");

    let (status, body) = post("bad key", "x").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(error_text(&body).contains("Idempotency-Key"), "{body}");

    let (_, history) = backend.get("/back/messages?room=rooma").await;
    let ids: Vec<&Value> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m["id"])
        .collect();
    assert_eq!(ids, [&first["id"], &other["id"]], "stored once per key");
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_clients_are_cut_off_and_others_are_served_meanwhile() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let redis = Redis::start();
    let backend = Backend::start(&redis, "").await;
    let addr = backend.base.trim_start_matches("http://").to_owned();

    // Headers that never end, and a body that never comes.
    let mut silent_headers = tokio::net::TcpStream::connect(&addr).await.unwrap();
    silent_headers
        .write_all(b"POST /back/message HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut silent_body = tokio::net::TcpStream::connect(&addr).await.unwrap();
    silent_body
        .write_all(b"POST /back/message HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"room\":")
        .await
        .unwrap();

    assert_eq!(
        backend.post("rooma", "not held up").await.0,
        StatusCode::CREATED
    );

    let started = Instant::now();
    let read_all = |mut stream: tokio::net::TcpStream| async move {
        let mut answer = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut answer)).await;
        assert!(read.is_ok(), "the server never closed the connection");
        String::from_utf8_lossy(&answer).into_owned()
    };
    let (headers_answer, body_answer) =
        tokio::join!(read_all(silent_headers), read_all(silent_body));
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "cut off after {:?}",
        started.elapsed()
    );
    assert!(
        headers_answer.is_empty() || headers_answer.starts_with("HTTP/1.1 408"),
        "headers: {headers_answer:?}"
    );
    assert!(
        body_answer.starts_with("HTTP/1.1 408"),
        "body: {body_answer:?}"
    );
    assert!(
        body_answer.ends_with(r#"{"error":"the request body did not arrive within 10s"}"#),
        "body: {body_answer:?}"
    );
    let (_, history) = backend.get("/back/messages?room=rooma").await;
    assert_eq!(
        history["messages"].as_array().unwrap().len(),
        1,
        "the trickled post was not stored"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn servers_with_a_token_publish_to_many_rooms_and_others_are_refused() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("publish-tokens");
    std::fs::write(&tokens, "# the announcer\nannouncer-token-0123456789\n").unwrap();
    let backend = Backend::start(
        &redis,
        &format!(
            "[backend]\npublish_tokens_file = \"{}\"\n",
            tokens.display()
        ),
    )
    .await;
    let publish = |token: Option<&'static str>, key: Option<&'static str>| {
        let mut request = reqwest::Client::new()
            .post(backend.url("/back/publish"))
            .json(&json!({"rooms": ["rooma", "roomb"], "message": "maintenance at noon"}));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status();
            let challenge = response
                .headers()
                .get("www-authenticate")
                .map(|v| v.to_str().unwrap().to_owned());
            (status, challenge, response.json::<Value>().await.unwrap())
        }
    };

    for (token, error) in [
        (None, "Bearer"),
        (Some("announcer-token-012345678"), "invalid token"),
        (Some(""), "Bearer"),
    ] {
        let (status, challenge, body) = publish(token, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert_eq!(challenge.as_deref(), Some("Bearer"));
        assert!(error_text(&body).contains(error), "{body}");
    }
    let (_, history) = backend.get("/back/messages?room=rooma").await;
    assert_eq!(
        history["messages"],
        json!([]),
        "nothing stored without a valid token"
    );

    let (status, _, body) = publish(Some("announcer-token-0123456789"), Some("notice-1")).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let rooms: Vec<&str> = body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["room"].as_str().unwrap())
        .collect();
    assert_eq!(rooms, ["rooma", "roomb"]);
    let (_, _, again) = publish(Some("announcer-token-0123456789"), Some("notice-1")).await;
    assert_eq!(again, body, "a repeated publish stores nothing new");
    for room in ["rooma", "roomb"] {
        let (_, history) = backend.get(&format!("/back/messages?room={room}")).await;
        assert_eq!(
            history["messages"].as_array().unwrap().len(),
            1,
            "{room}: {history}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn without_tokens_publishing_is_off() {
    let redis = Redis::start();
    let backend = Backend::start(&redis, "").await;
    let response = reqwest::Client::new()
        .post(backend.url("/back/publish"))
        .bearer_auth("anything-at-all-0123")
        .json(&json!({"rooms": ["rooma"], "message": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let body: Value = response.json().await.unwrap();
    assert!(error_text(&body).contains("not enabled"), "{body}");
}

/// A publisher that sends the body first, as any client may.
async fn publish_raw(
    backend: &Backend,
    token: Option<&str>,
    key: Option<&str>,
    content_type: &str,
    body: impl Into<reqwest::Body>,
) -> (StatusCode, Value) {
    let mut request = reqwest::Client::new()
        .post(backend.url("/back/publish"))
        .header("content-type", content_type)
        .body(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap())
}

/// A backend that accepts the publish tokens `tokens` (one per line).
async fn publishing_backend(redis: &Redis, dir: &std::path::Path, tokens: &str) -> Backend {
    let file = dir.join("publish-tokens");
    std::fs::write(&file, tokens).unwrap();
    let config = format!("[backend]\npublish_tokens_file = \"{}\"\n", file.display());
    Backend::start(redis, &config).await
}

#[tokio::test(flavor = "multi_thread")]
async fn publish_checks_the_token_before_it_reads_the_body() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let backend = publishing_backend(&redis, dir.path(), "announcer-token-0123456789\n").await;
    let oversize = "x".repeat(64 * 1024);
    for (content_type, body) in [
        ("text/plain", "not json".to_owned()),
        ("application/json", "{malformed".to_owned()),
        ("application/json", oversize.clone()),
    ] {
        for token in [None, Some("not-the-token-0123456789")] {
            let (status, answer) =
                publish_raw(&backend, token, None, content_type, body.clone()).await;
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{content_type} {token:?}: {answer}"
            );
        }
    }
    // With the token, the same bodies get what they deserve.
    let token = Some("announcer-token-0123456789");
    let statuses = [
        publish_raw(&backend, token, None, "text/plain", "x")
            .await
            .0,
        publish_raw(&backend, token, None, "application/json", "{malformed")
            .await
            .0,
        publish_raw(&backend, token, None, "application/json", oversize)
            .await
            .0,
    ];
    assert_eq!(
        statuses,
        [
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            StatusCode::BAD_REQUEST,
            StatusCode::PAYLOAD_TOO_LARGE
        ]
    );
}

/// Idempotency keys live in one space per endpoint, and per token for
/// publishing: the same key elsewhere is another key. The longest key with
/// the longest room name works: the key of each room is derived, not built
/// by joining strings that a length check could then refuse.
#[tokio::test(flavor = "multi_thread")]
async fn idempotency_keys_belong_to_their_endpoint_and_token() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let backend = publishing_backend(
        &redis,
        dir.path(),
        "first-token-0123456789\nsecond-token-0123456789\n",
    )
    .await;
    let key = "k".repeat(128);
    let room = "r".repeat(64);
    let publish = |token: &'static str, text: &str| {
        let body = json!({"rooms": [room, "rooma"], "message": text}).to_string();
        publish_raw(&backend, Some(token), Some(&key), "application/json", body)
    };
    let first = publish("first-token-0123456789", "one").await;
    assert_eq!(first.0, StatusCode::CREATED, "{}", first.1);
    let repeated = publish("first-token-0123456789", "one").await;
    assert_eq!(
        repeated, first,
        "the same token repeating itself stores nothing new"
    );
    let conflict = publish("first-token-0123456789", "two").await;
    assert_eq!(conflict.0, StatusCode::CONFLICT, "{}", conflict.1);
    // Another token with the same key and another text: its own key.
    let other = publish("second-token-0123456789", "two").await;
    assert_eq!(other.0, StatusCode::CREATED, "{}", other.1);
    // A post with the same key and another text: its own key too.
    let response = reqwest::Client::new()
        .post(backend.url("/back/message"))
        .header("idempotency-key", &key)
        .json(&json!({"room": "rooma", "message": "three"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let (_, history) = backend.get("/back/messages?room=rooma").await;
    let texts: Vec<&str> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["message"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["one", "two", "three"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn history_pages_back_with_before_and_is_capped_in_bytes() {
    let redis = Redis::start();
    let backend = Backend::start(&redis, "").await;
    let mut ids = Vec::new();
    for i in 0..120 {
        let (status, body) = backend.post("paged", &format!("small {i}")).await;
        assert_eq!(status, StatusCode::CREATED);
        ids.push(body["id"].as_str().unwrap().to_owned());
    }
    let texts = |history: &Value| -> Vec<String> {
        history["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["message"].as_str().unwrap().to_owned())
            .collect()
    };
    let (_, newest) = backend.get("/back/messages?room=paged&limit=30").await;
    assert_eq!(
        texts(&newest),
        (90..120).map(|i| format!("small {i}")).collect::<Vec<_>>()
    );
    let (_, older) = backend
        .get(&format!(
            "/back/messages?room=paged&limit=70&before={}",
            ids[90]
        ))
        .await;
    assert_eq!(
        texts(&older),
        (20..90).map(|i| format!("small {i}")).collect::<Vec<_>>()
    );
    let (status, body) = backend
        .get("/back/messages?room=paged&before=yesterday")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error_text(&body).contains("before"), "{body}");

    // 200 messages of about 4,000 four-byte characters weigh 3.2 MB: the
    // answer stops at 256 KiB of text, the newest messages kept.
    let large = "\u{1F600}".repeat(3990);
    for i in 0..200 {
        assert_eq!(
            backend.post("heavy", &format!("{i}{large}")).await.0,
            StatusCode::CREATED
        );
    }
    let response = reqwest::get(backend.url("/back/messages?room=heavy&limit=200"))
        .await
        .unwrap();
    let bytes = response.bytes().await.unwrap();
    assert!(
        bytes.len() <= 256 * 1024 + 16 * 1024,
        "{} bytes",
        bytes.len()
    );
    let history: Value = serde_json::from_slice(&bytes).unwrap();
    let got = texts(&history);
    let each = 3 + 3990 * 4;
    assert_eq!(got.len(), 256 * 1024 / each, "as many as fit");
    assert!(got.last().unwrap().starts_with("199"), "the newest last");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_redis_refuses_posts_with_503_and_keeps_what_it_has() {
    let redis = Redis::start_with(
        ["--maxmemory", "4mb", "--maxmemory-policy", "noeviction"]
            .map(String::from)
            .to_vec(),
    );
    let backend = Backend::start(&redis, "").await;
    let text = "x".repeat(4000);
    let mut stored = 0;
    let body = loop {
        let (status, body) = backend.post("full", &text).await;
        if status != StatusCode::CREATED {
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
            break body;
        }
        stored += 1;
        assert!(stored < 10_000, "Redis never filled up");
    };
    assert_eq!(error_text(&body), "message store is full, try again later");
    let (status, history) = backend.get("/back/messages?room=full&limit=200").await;
    assert_eq!(status, StatusCode::OK, "reading still works");
    let kept = history["messages"].as_array().unwrap().len();
    assert_eq!(
        kept,
        stored.min(200).min(256 * 1024 / 4000),
        "nothing acknowledged was evicted"
    );
}

/// Redis closes the connection of a client whose unread replies pass its
/// output buffer limit (chat-redis bounds them). A backend whose connection
/// Redis closed for that answers that request 503, and the next ones as
/// usual on a new connection.
#[tokio::test(flavor = "multi_thread")]
async fn a_connection_redis_closed_for_its_output_buffer_is_replaced() {
    let limit = ["--client-output-buffer-limit", "normal 64kb 32kb 0"];
    let redis = Redis::start_with(limit.map(String::from).to_vec());
    let backend = Backend::start(&redis, "").await;
    let large = "\u{1F600}".repeat(3990);
    for i in 0..20 {
        assert_eq!(
            backend.post("large", &format!("{i}{large}")).await.0,
            StatusCode::CREATED
        );
    }
    // One page of history, 20 messages of 16 KB, passes the limit.
    let (status, body) = backend.get("/back/messages?room=large&limit=20").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let (status, body) = backend.post("small", "after").await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, history) = backend.get("/back/messages?room=large&limit=3").await;
    assert_eq!(status, StatusCode::OK, "{history}");
    assert_eq!(history["messages"].as_array().unwrap().len(), 3);
}
