//! The frontend: Socket.IO at `/front/socket.io`, the chat page at
//! `/front/{room}`, and `/front/status`.
//!
//! A client joins a room by emitting `room` with the room's name. The
//! frontend follows the Redis feed ([`crate::delivery::Feed`]) and emits each
//! message, as event `message`, to the sockets of its room: the message is
//! encoded once, then queued to each socket ([`Rooms`]).

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};
use socketioxide::SocketIo;
use socketioxide::extract::{AckSender, SocketRef, TryData};
use socketioxide::handler::ConnectHandler;
use socketioxide::socket::DisconnectReason;
use tower_http::services::ServeDir;
use tower_http::set_header::SetResponseHeaderLayer;

use crate::config::Config;
use crate::delivery::{Feed, RedisHealth, Store};
use crate::message::{InvalidInput, JoinRequest, Room};
use crate::metrics::{FrontendMetrics, Metrics};
use crate::serve::{Access, ConnectionCount, Listeners, Status, serve, serve_metrics};

/// Where the Socket.IO endpoint lives; clients pass it as `path`.
pub const SOCKET_IO_PATH: &str = "/front/socket.io";

/// The chat page's `Content-Security-Policy`.
const PAGE_POLICY: &str = "default-src 'self'; frame-ancestors 'none'";

mod budget;
mod replay;
mod request;
mod rooms;

pub use rooms::{JoinError, Joined, Rooms};

use budget::{Admission, Flood};

/// Largest Engine.IO payload (a long-polling request or response). It must
/// hold the largest message the server sends: 4000 characters, each escaped
/// in JSON as up to 6 bytes, plus the envelope.
const MAX_PAYLOAD: u64 = 32 * 1024;
/// Largest websocket message a client may send: clients send only small
/// events (`room`), so anything larger is an error, not a message.
const MAX_CLIENT_FRAME: usize = 4 * 1024;
/// The kernel's send buffer of each client connection. Left to itself, the
/// kernel grows a connection's buffer up to 4 MiB while its client does not
/// read; a few hundred such clients would hold a gigabyte of the host's
/// memory, outside any of the frontend's own bounds. 256 KiB (the kernel
/// doubles it for its bookkeeping) holds seconds of even a busy room's
/// messages.
const SEND_BUFFER: usize = 256 * 1024;

/// Bytes a websocket reads from its connection at once. The buffer lives as
/// long as the socket and is zeroed up to this size before each read, so it
/// costs every idle connection this much; clients send small, rare events,
/// and a larger frame (up to `MAX_CLIENT_FRAME`) grows it as needed.
const WS_READ_BUFFER: usize = 256;

/// Per-socket event limits, from the configuration.
#[derive(Debug, Clone, Copy)]
struct EventLimits {
    rate: u32,
    burst: u32,
}

/// Registers the socket's event handlers. Runs as connect middleware, which
/// socketioxide awaits *before* it confirms the connection to the client:
/// a `room` event sent the instant the client sees itself connected always
/// finds its handler (an async connect handler would race with it).
fn register_socket(socket: &SocketRef, rooms: &Arc<Rooms>, limits: EventLimits) {
    let flood = Arc::new(Flood::new(limits.rate, limits.burst));
    let (join_rooms, join_flood) = (rooms.clone(), flood.clone());
    socket.on("room", move |s: SocketRef, TryData(data): TryData<Value>, ack: AckSender| async move {
        let rooms = join_rooms;
        let slow_down = json!({"ok": false, "error": "too many events; slow down"});
        let _answering = match join_flood.admit() {
            Admission::Allow(answering) => answering,
            Admission::Refuse(_answering) => {
                rooms.metrics().joins_refused.inc();
                let _ = ack.send(&slow_down);
                return;
            }
            Admission::Disconnect => {
                rooms.metrics().joins_refused.inc();
                let _answered = join_flood.answered().await;
                let _ = ack.send(&slow_down);
                disconnect_flooder(s);
                return;
            }
            Admission::Ignore => return,
        };
        // One join at a time, in the order they came.
        let _turn = join_flood.turn().await;
        let answer = match on_room(&rooms, &s, data.ok()).await {
            Ok(joined) => {
                tracing::debug!(sid = %s.id, room = %joined.room, replayed = joined.replayed, "joined");
                match joined.resumed {
                    true => json!({"ok": true, "replayed": joined.replayed}),
                    false => json!({"ok": true}),
                }
            }
            Err(e) => {
                rooms.metrics().joins_refused.inc();
                json!({"ok": false, "error": e.to_string()})
            }
        };
        // Fails only when the client asked for no acknowledgement.
        let _ = ack.send(&answer);
    });
    // Events the server does not know count against the budget too, so a
    // flood of them ends the same way.
    socket.on_fallback(move |s: SocketRef| async move {
        if let Admission::Disconnect = flood.admit() {
            let _answered = flood.answered().await;
            disconnect_flooder(s);
        }
    });
    rooms.metrics().sockets.inc();
    let rooms = rooms.clone();
    socket.on_disconnect(move |s: SocketRef, reason: DisconnectReason| async move {
        rooms.metrics().sockets.dec();
        rooms.leave_all(&s).await;
        // Only a flooder is disconnected by the server (see `budget`).
        if reason == DisconnectReason::ServerNSDisconnect {
            budget::linger(&s).await;
        }
    });
}

/// Disconnects a socket that keeps flooding.
fn disconnect_flooder(socket: SocketRef) {
    tracing::warn!(sid = %socket.id, "disconnecting a socket that floods events");
    let _ = socket.disconnect();
}

async fn on_room(
    rooms: &Rooms,
    socket: &SocketRef,
    data: Option<Value>,
) -> Result<Joined, JoinError> {
    let request = JoinRequest::from_json(&data.unwrap_or(Value::Null))?;
    rooms.join(socket, request).await
}

#[derive(Clone)]
struct AppState {
    www_dir: PathBuf,
    health: Arc<RedisHealth>,
    metrics: Arc<FrontendMetrics>,
    instance: u32,
    draining: Arc<AtomicBool>,
}

/// `GET /front/{room}`: the chat page, the same file for every valid room.
async fn page(State(state): State<AppState>, Path(room): Path<String>) -> Response {
    if Room::parse(&room).is_err() {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"error": InvalidInput::Room.to_string()})),
        )
            .into_response();
    }
    match tokio::fs::read(state.www_dir.join("index.html")).await {
        Ok(html) => (
            [
                (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                (header::CACHE_CONTROL, "no-cache"),
                // Only the page's own scripts, styles and connections; and
                // no other site may frame it.
                (header::CONTENT_SECURITY_POLICY, PAGE_POLICY),
            ],
            html,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(
                "cannot read the chat page from {}: {e}",
                state.www_dir.display()
            );
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!({"error": "chat page unavailable"})),
            )
                .into_response()
        }
    }
}

async fn status(State(state): State<AppState>) -> Status {
    let sockets = usize::try_from(state.metrics.sockets.get()).unwrap_or(0);
    let status = Status::new(state.health.is_up(), state.instance, sockets);
    if state.draining.load(Ordering::Relaxed) {
        status.draining()
    } else {
        status
    }
}

async fn not_found() -> (StatusCode, Json<Value>) {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"error": "no such endpoint"})),
    )
}

/// Serves the frontend on `listeners` until `shutdown` resolves; then tells
/// every client to go (they reconnect elsewhere) and stops.
pub async fn run(
    config: Arc<Config>,
    listeners: Listeners,
    instance: u32,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // Connections accepted from now on take the listener's buffer size.
    socket2::SockRef::from(&listeners.public).set_send_buffer_size(SEND_BUFFER)?;
    let health = RedisHealth::new();
    let metrics = Arc::new(FrontendMetrics::default());
    let (layer, io) = SocketIo::builder()
        .req_path(SOCKET_IO_PATH)
        .max_buffer_size(rooms::send_queue_len(&config.history))
        .max_buffer_bytes(config.frontend.max_queued_bytes.get())
        .backlog_timeout(config.frontend.backlog_timeout())
        .max_payload(MAX_PAYLOAD)
        .ws_max_message_size(MAX_CLIENT_FRAME)
        .ws_max_frame_size(MAX_CLIENT_FRAME)
        .ws_read_buffer_size(WS_READ_BUFFER)
        .build_layer();
    let limits = EventLimits {
        rate: config.frontend.events_per_second.get(),
        burst: config.frontend.events_burst.get(),
    };
    // The feed reports Redis's health; the store only serves resuming joins.
    let store = Store::new(&config, RedisHealth::new()).map_err(std::io::Error::other)?;
    let rooms = Arc::new(Rooms::new(
        store,
        &config.frontend,
        &config.history,
        metrics.clone(),
    ));

    let connect_rooms = rooms.clone();
    let middleware = move |s: SocketRef| {
        register_socket(&s, &connect_rooms, limits);
        std::future::ready(Ok::<(), std::convert::Infallible>(()))
    };
    io.ns("/", { async |_: SocketRef| {} }.with(middleware));

    let feed = Feed::new(&config, health.clone())
        .map_err(std::io::Error::other)?
        .counting_caught_up(metrics.caught_up.clone());
    let delivery = tokio::spawn(feed.run(rooms));

    let www_dir = config.frontend.www_dir.clone();
    let draining = Arc::new(AtomicBool::new(false));
    let exposition = Arc::new(Metrics::frontend(&metrics, health.clone()));
    let metrics_server = tokio::spawn({
        let allow = config.access.metrics_allow.clone();
        async move { serve_metrics(listeners.metrics, exposition, &allow).await }
    });
    let state = AppState {
        www_dir: www_dir.clone(),
        health,
        metrics,
        instance,
        draining: draining.clone(),
    };
    let app = Router::new()
        .route("/front/status", get(status))
        .route("/front/{room}", get(page))
        .nest_service("/front/assets", ServeDir::new(www_dir.join("assets")))
        .fallback(not_found)
        .with_state(state)
        .layer(layer)
        // Browsers take every answer for the type it says it is.
        .layer(SetResponseHeaderLayer::overriding(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        // Outside socketioxide's layer, so it sees the request first.
        .layer(tower::util::MapRequestLayer::new(request::trim_socket_io));

    crate::systemd::notify_ready("serving");
    let close_io = io.clone();
    let drain_delay = config.frontend.drain_delay();
    let stop = async move {
        shutdown.await;
        // Fail health checks first so the load balancer sends new clients
        // elsewhere, then let the current ones go.
        draining.store(true, Ordering::Relaxed);
        tracing::info!("draining for {drain_delay:?} before closing client connections");
        tokio::time::sleep(drain_delay).await;
        // Sends every client a disconnect; socket.io clients then reconnect,
        // through the load balancer, to an instance that is still running.
        close_io.close().await;
    };
    let result = serve(
        listeners.public,
        app,
        Access::new(&config.access.allow, ConnectionCount::default()),
        stop,
        config.frontend.shutdown_timeout(),
    )
    .await;
    delivery.abort();
    metrics_server.abort();
    result
}
