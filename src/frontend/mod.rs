//! The frontend: Socket.IO at `/front/socket.io`, the chat page at
//! `/front/{room}`, and `/front/status`.
//!
//! A client joins a room by emitting `room` with the room's name. The
//! frontend follows, through Redis, the rooms its sockets are in
//! ([`crate::delivery::Feed`]) and emits each message, as event `message`,
//! to the sockets of its room: the message is encoded once, then queued to
//! each socket ([`Rooms`]).
//!
//! - `sockets`: the Socket.IO server and each socket's `room` event;
//! - `rooms`: who is in which room, resuming, and the fan-out;
//! - `replay`: what replaying history may cost;
//! - `budget`: how many events a socket may send;
//! - `request`: what a Socket.IO request keeps of itself;
//! - `http`: the chat page and the status.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::config::Config;
use crate::delivery::{Feed, Primary, RedisHealth, Store};
use crate::metrics::{FrontendMetrics, Metrics};
use crate::serve::{Access, ConnectionCount, Listeners, serve, serve_metrics};

/// Where the Socket.IO endpoint lives; clients pass it as `path`.
pub const SOCKET_IO_PATH: &str = "/front/socket.io";

mod budget;
mod eio3_payload;
mod http;
mod replay;
mod request;
mod rooms;
mod sockets;

pub use eio3_payload::splits_a_character;
pub use rooms::{JoinError, Joined, Rooms};
pub use sockets::socket_io;

/// The kernel's send buffer of each client connection. Left to itself, the
/// kernel grows a connection's buffer up to 4 MiB while its client does not
/// read; a few hundred such clients would hold a gigabyte of the host's
/// memory, outside any of the frontend's own bounds. 256 KiB (the kernel
/// doubles it for its bookkeeping) holds seconds of even a busy room's
/// messages.
const SEND_BUFFER: usize = 256 * 1024;

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
    // One primary followed for both the feed and the history reads.
    let primary = Primary::new(&config.redis);
    let store = Store::with_primary(&config, primary.clone()).map_err(std::io::Error::other)?;
    let (feed, interest) = Feed::with_primary(&config, health.clone(), primary.clone())
        .map_err(std::io::Error::other)?;
    let feed = feed.counting_caught_up(metrics.caught_up.clone());
    let rooms = Arc::new(Rooms::new(
        store,
        interest,
        &config.frontend,
        &config.history,
        metrics.clone(),
    ));
    let (layer, io) = socket_io(&config, rooms.clone());
    let delivery = tokio::spawn(feed.run(rooms.clone()));

    let following = primary.follows_sentinels().then_some(&primary);
    let exposition = Arc::new(Metrics::frontend(&metrics, health.clone()).following(following));
    let metrics_server = tokio::spawn({
        let allow = config.access.metrics_allow.clone();
        async move { serve_metrics(listeners.metrics, exposition, &allow).await }
    });
    let draining = Arc::new(AtomicBool::new(false));
    let pages = http::Pages {
        www_dir: config.frontend.www_dir.clone(),
        health,
        metrics,
        instance,
        draining: draining.clone(),
        primary: following.cloned(),
    };
    let app = http::router(pages)
        .layer(layer)
        // Engine.IO 3 text payloads that engineioxide's decoder would never
        // finish are refused before it reads them.
        .layer(axum::middleware::from_fn(eio3_payload::check_posts))
        .layer(http::no_sniffing())
        // Outside socketioxide's layer, so it sees the request first.
        .layer(tower::util::MapRequestLayer::new(request::trim_socket_io));

    crate::systemd::notify_ready("serving");
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
        io.close().await;
    };
    let result = serve(
        listeners.public,
        app,
        Access::new(&config.access.allow, ConnectionCount::default()),
        // A websocket upgraded from it is written to without a task in
        // between (vendor/README.md); the count lasts as long as it does.
        engineioxide::TcpConnection::new,
        stop,
        config.frontend.shutdown_timeout(),
    )
    .await;
    delivery.abort();
    metrics_server.abort();
    result
}
