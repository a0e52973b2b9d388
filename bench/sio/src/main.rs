//! The plain socketioxide stack the benchmark compares against
//! (`chat-bench --stack socketioxide`): what a Rust user would build in
//! place of chat-ha, from the same crates, with their defaults and no
//! tuning. It does what the Node.js stack of `bench/node/` does:
//!
//! - `chat-sio frontend`: socketioxide on a current-thread runtime, with
//!   socketioxide-redis's adapter; a client joins one room at a time with
//!   `room` and gets `message` events through Redis pub/sub.
//! - `chat-sio backend`: axum; `POST /back/message` emits `message` to the
//!   room through a socketioxide instance that has the Redis adapter and no
//!   sockets, and answers 201 once the emit is published.
//!
//! No history, no idempotency, no bounds: the figures show what those cost
//! chat-ha, not what this skips. A crate of its own, outside chat-ha's
//! workspace, so that it builds on the published socketioxide and
//! engineioxide rather than on chat-ha's patched ones (`vendor/`).
//!
//!   chat-sio frontend|backend --listen HOST:PORT --redis URL

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use socketioxide::SocketIo;
use socketioxide::extract::{AckSender, Data, SocketRef};
use socketioxide::layer::SocketIoLayer;
use socketioxide_redis::drivers::redis::redis_client as redis;
use socketioxide_redis::{RedisAdapter, RedisAdapterCtr};

type Adapter = RedisAdapter<socketioxide::adapter::Emitter>;
type Io = SocketIo<Adapter>;

fn main() {
    let mut args = std::env::args().skip(1);
    let role = args.next().unwrap_or_default();
    let (mut listen, mut redis_url) = (None, None);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => listen = args.next().and_then(|a| a.parse::<SocketAddr>().ok()),
            "--redis" => redis_url = args.next(),
            _ => usage(),
        }
    }
    let (Some(listen), Some(redis_url)) = (listen, redis_url) else {
        usage()
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let served = runtime.block_on(async {
        match role.as_str() {
            "frontend" => frontend(listen, &redis_url).await,
            "backend" => backend(listen, &redis_url).await,
            _ => usage(),
        }
    });
    if let Err(e) = served {
        eprintln!("chat-sio {role}: {e}");
        std::process::exit(1);
    }
}

fn usage() -> ! {
    eprintln!("usage: chat-sio frontend|backend --listen HOST:PORT --redis URL");
    std::process::exit(2);
}

type Error = Box<dyn std::error::Error>;

/// socketioxide with the Redis adapter (RESP3, as socketioxide-redis wants).
async fn socket_io(redis_url: &str) -> Result<(SocketIoLayer<Adapter>, Io), Error> {
    let client = redis::Client::open(format!("{redis_url}?protocol=resp3"))?;
    let adapter = RedisAdapterCtr::new_with_redis(&client).await?;
    Ok(SocketIo::builder()
        .req_path("/front/socket.io")
        .with_adapter::<Adapter>(adapter)
        .build_layer())
}

async fn frontend(listen: SocketAddr, redis_url: &str) -> Result<(), Error> {
    let (layer, io) = socket_io(redis_url).await?;
    io.ns("/", async |socket: SocketRef<Adapter>| {
        socket.on("room", join);
    })
    .await?;
    let app = axum::Router::new()
        .route("/front/status", get(|| async { Json(Status::UP) }))
        .layer(layer);
    serve(listen, app).await
}

/// `room`: leaves the room joined before, joins this one, and acknowledges.
async fn join(socket: SocketRef<Adapter>, Data(room): Data<String>, ack: AckSender<Adapter>) {
    if room.is_empty() {
        let _ = ack.send(&Joined { ok: false, room });
        return;
    }
    socket.leave_all();
    socket.join(room.clone());
    let _ = ack.send(&Joined { ok: true, room });
}

#[derive(Serialize)]
struct Joined {
    ok: bool,
    room: String,
}

#[derive(Serialize)]
struct Status {
    status: &'static str,
    redis: &'static str,
}

impl Status {
    const UP: Status = Status {
        status: "ok",
        redis: "up",
    };
}

#[derive(Deserialize)]
struct Post {
    room: String,
    message: String,
}

#[derive(Serialize)]
struct Message {
    id: String,
    room: String,
    message: String,
}

struct Backend {
    io: Io,
    next_id: AtomicU64,
}

async fn backend(listen: SocketAddr, redis_url: &str) -> Result<(), Error> {
    let (_layer, io) = socket_io(redis_url).await?;
    // An instance with no sockets still needs its namespace to broadcast.
    io.ns("/", async |_: SocketRef<Adapter>| {}).await?;
    let state = std::sync::Arc::new(Backend {
        io,
        next_id: AtomicU64::new(1),
    });
    let app = axum::Router::new()
        .route("/back/status", get(|| async { Json(Status::UP) }))
        .route("/back/message", post(emit))
        .with_state(state);
    serve(listen, app).await
}

/// `POST /back/message`: emits the message to its room, awaiting the
/// publish, and answers 201 with it.
async fn emit(
    State(backend): State<std::sync::Arc<Backend>>,
    Json(post): Json<Post>,
) -> Result<(StatusCode, Json<Message>), StatusCode> {
    let id = backend.next_id.fetch_add(1, Ordering::Relaxed);
    let message = Message {
        id: format!("{}-{id}", std::process::id()),
        room: post.room,
        message: post.message,
    };
    let ns = backend.io.of("/").ok_or(StatusCode::SERVICE_UNAVAILABLE)?;
    ns.to(message.room.clone())
        .emit("message", &message)
        .await
        .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
    Ok((StatusCode::CREATED, Json(message)))
}

async fn serve(listen: SocketAddr, app: axum::Router) -> Result<(), Error> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    eprintln!("chat-sio listening on {listen}");
    let stop = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler");
        term.recv().await;
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await?;
    Ok(())
}
