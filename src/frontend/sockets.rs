//! The Socket.IO side of the frontend: the engine's settings, and each
//! socket's `room` event (join, or resume with `since`), answered in order
//! and within the socket's budget of events.

use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;
use socketioxide::SocketIo;
use socketioxide::extract::{AckSender, SocketRef, TryData};
use socketioxide::handler::ConnectHandler;
use socketioxide::layer::SocketIoLayer;
use socketioxide::socket::DisconnectReason;

use super::SOCKET_IO_PATH;
use super::budget::{self, Admission, Flood};
use super::rooms::{self, JoinError, Joined, Rooms};
use crate::config::Config;
use crate::message::JoinRequest;

/// Largest Engine.IO payload (a long-polling request or response). It must
/// hold the largest message the server sends: 4000 characters, each escaped
/// in JSON as up to 6 bytes, plus the envelope.
pub(super) const MAX_PAYLOAD: u64 = 32 * 1024;
/// Largest websocket message a client may send: clients send only small
/// events (`room`), so anything larger is an error, not a message.
const MAX_CLIENT_FRAME: usize = 4 * 1024;
/// Bytes a websocket reads from its connection at once. The buffer lives as
/// long as the socket and is zeroed up to this size before each read, so it
/// costs every idle connection this much; clients send small, rare events,
/// and a larger frame (up to `MAX_CLIENT_FRAME`) grows it as needed.
const WS_READ_BUFFER: usize = 256;

/// The Socket.IO server of the frontend, its sockets joining `rooms`: the
/// layer to serve, and the handle that closes every socket at a stop.
pub fn socket_io(config: &Config, rooms: Arc<Rooms>) -> (SocketIoLayer, SocketIo) {
    let (layer, io) = SocketIo::builder()
        .req_path(SOCKET_IO_PATH)
        .max_buffer_size(rooms::send_queue_len(&config.history))
        .max_buffer_bytes(config.frontend.max_queued_bytes.get())
        .backlog_timeout(config.frontend.backlog_timeout())
        .max_payload(MAX_PAYLOAD)
        .ws_max_message_size(MAX_CLIENT_FRAME)
        .ws_max_frame_size(MAX_CLIENT_FRAME)
        .ws_read_buffer_size(WS_READ_BUFFER)
        .ping_interval(config.frontend.ping_interval())
        .ping_timeout(config.frontend.ping_timeout())
        .build_layer();
    let limits = EventLimits {
        rate: config.frontend.events_per_second.get(),
        burst: config.frontend.events_burst.get(),
    };
    let middleware = move |s: SocketRef| {
        register_socket(&s, &rooms, limits);
        std::future::ready(Ok::<(), std::convert::Infallible>(()))
    };
    io.ns("/", { async |_: SocketRef| {} }.with(middleware));
    (layer, io)
}

/// Per-socket event limits, from the configuration.
#[derive(Debug, Clone, Copy)]
struct EventLimits {
    rate: u32,
    burst: u32,
}

/// The acknowledgement of a `room` event: `{"ok": true}`, with `replayed`
/// when the join resumed, or `{"ok": false, "error": ...}`.
#[derive(Debug, Serialize)]
struct JoinAnswer {
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    replayed: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl JoinAnswer {
    fn joined(joined: &Joined) -> Self {
        JoinAnswer {
            ok: true,
            replayed: joined.resumed.then_some(joined.replayed),
            error: None,
        }
    }

    fn refused(why: impl std::fmt::Display) -> Self {
        JoinAnswer {
            ok: false,
            replayed: None,
            error: Some(why.to_string()),
        }
    }
}

/// Why an event is refused before it is looked at.
const SLOW_DOWN: &str = "too many events; slow down";

/// Registers the socket's event handlers. Runs as connect middleware, which
/// socketioxide awaits *before* it confirms the connection to the client:
/// a `room` event sent the instant the client sees itself connected always
/// finds its handler (an async connect handler would race with it).
fn register_socket(socket: &SocketRef, rooms: &Arc<Rooms>, limits: EventLimits) {
    let flood = Arc::new(Flood::new(limits.rate, limits.burst));
    let (join_rooms, join_flood) = (rooms.clone(), flood.clone());
    socket.on("room", move |s: SocketRef, TryData(data): TryData<Value>, ack: AckSender| async move {
        let rooms = join_rooms;
        let _answering = match join_flood.admit() {
            Admission::Allow(answering) => answering,
            Admission::Refuse(_answering) => {
                rooms.metrics().joins_refused.inc();
                let _ = ack.send(&JoinAnswer::refused(SLOW_DOWN));
                return;
            }
            Admission::Disconnect => {
                rooms.metrics().joins_refused.inc();
                let _answered = join_flood.answered().await;
                let _ = ack.send(&JoinAnswer::refused(SLOW_DOWN));
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
                JoinAnswer::joined(&joined)
            }
            Err(e) => {
                rooms.metrics().joins_refused.inc();
                JoinAnswer::refused(e)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_answers_are_what_clients_read() {
        let answer = |a: &JoinAnswer| serde_json::to_value(a).unwrap();
        let room = crate::message::Room::parse("lobby").unwrap();
        let plain = Joined {
            room: room.clone(),
            resumed: false,
            replayed: 0,
        };
        assert_eq!(
            answer(&JoinAnswer::joined(&plain)),
            serde_json::json!({"ok": true})
        );
        let resumed = Joined {
            room,
            resumed: true,
            replayed: 0,
        };
        assert_eq!(
            answer(&JoinAnswer::joined(&resumed)),
            serde_json::json!({"ok": true, "replayed": 0})
        );
        assert_eq!(
            answer(&JoinAnswer::refused(SLOW_DOWN)),
            serde_json::json!({"ok": false, "error": "too many events; slow down"})
        );
    }
}
