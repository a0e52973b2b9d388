//! The answer of both status endpoints, `GET /front/status` and
//! `GET /back/status`, which the load balancer's health checks read.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::delivery::Primary;

/// What an instance says of itself: 200 while it takes new clients (even
/// with Redis down: a frontend keeps its sockets, a backend answers 503
/// itself), 503 once it is draining before a stop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub status: State,
    pub redis: Redis,
    pub instance: u32,
    /// Sockets (frontend) or open HTTP connections (backend).
    pub connections: usize,
    /// In Sentinel mode, the primary followed now (`HOST:PORT`), absent
    /// while there is none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_primary: Option<String>,
}

/// Whether the instance serves as it should.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Ok,
    /// Redis is unreachable.
    Degraded,
    /// Stopping: the load balancer should send new clients elsewhere.
    Draining,
}

/// Whether Redis answered the last time it was asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Redis {
    Up,
    Down,
}

impl Status {
    pub fn new(redis_up: bool, instance: u32, connections: usize) -> Self {
        let (status, redis) = match redis_up {
            true => (State::Ok, Redis::Up),
            false => (State::Degraded, Redis::Down),
        };
        Status {
            status,
            redis,
            instance,
            connections,
            redis_primary: None,
        }
    }

    /// The same, naming the Redis primary followed now (Sentinel mode).
    pub fn following(mut self, primary: Option<&Primary>) -> Self {
        self.redis_primary = primary.and_then(|p| p.stats().address());
        self
    }

    /// The same, marked as draining.
    pub fn draining(mut self) -> Self {
        self.status = State::Draining;
        self
    }
}

impl IntoResponse for Status {
    fn into_response(self) -> Response {
        let code = match self.status {
            State::Draining => StatusCode::SERVICE_UNAVAILABLE,
            State::Ok | State::Degraded => StatusCode::OK,
        };
        (code, Json(self)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_are_lowercase_words_and_draining_is_a_503() {
        let status = Status::new(false, 3, 7);
        assert_eq!(
            serde_json::to_value(&status).unwrap(),
            serde_json::json!({"status": "degraded", "redis": "down", "instance": 3, "connections": 7})
        );
        assert_eq!(status.clone().into_response().status(), StatusCode::OK);
        let draining = Status::new(true, 3, 7).draining();
        assert_eq!(draining.status, State::Draining);
        assert_eq!(draining.redis, Redis::Up);
        assert_eq!(
            draining.into_response().status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
