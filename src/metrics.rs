//! Prometheus metrics, served at `GET /metrics` on each instance's own port.
//!
//! HAProxy routes only `/front` and `/back`, so `/metrics` cannot be reached
//! through the load balancer: operators scrape each instance directly.

use std::sync::Arc;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::delivery::RedisHealth;

/// Counters of one frontend instance.
#[derive(Debug, Default)]
pub struct FrontendMetrics {
    /// Sockets connected right now.
    pub sockets: Gauge,
    /// Rooms with at least one local socket.
    pub rooms: Gauge,
    /// Messages read from the Redis feed.
    pub received: Counter,
    /// Of those, the ones read from the feed stream rather than pushed.
    pub caught_up: Counter,
    /// Messages emitted to sockets (one per socket per message).
    pub delivered: Counter,
    /// Messages a socket could not take because its send queue was full.
    pub dropped: Counter,
    /// Messages sent to resuming sockets from the room's history.
    pub replayed: Counter,
    /// `room` events refused.
    pub joins_refused: Counter,
}

/// The label of the POST counter: the HTTP status answered.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: u16,
}

/// Counters of one backend instance.
#[derive(Debug)]
pub struct BackendMetrics {
    /// `POST /back/message` answers, by status.
    pub posts: Family<StatusLabel, Counter>,
    /// Time to answer `POST /back/message`, in seconds.
    pub post_seconds: Histogram,
}

impl Default for BackendMetrics {
    fn default() -> Self {
        // 50 µs .. ~1.6 s: a store is normally well under a millisecond.
        let buckets = prometheus_client::metrics::histogram::exponential_buckets(0.00005, 2.0, 16);
        BackendMetrics {
            posts: Family::default(),
            post_seconds: Histogram::new(buckets),
        }
    }
}

/// Redis's state as a daemon sees it.
#[derive(Debug, Default)]
struct RedisMetrics {
    up: Gauge,
    losses: Counter,
}

/// Everything one instance exposes, ready to be encoded.
pub struct Metrics {
    registry: Registry,
    redis: RedisMetrics,
    health: Arc<RedisHealth>,
}

impl Metrics {
    pub fn frontend(metrics: &FrontendMetrics, health: Arc<RedisHealth>) -> Self {
        let mut registry = Registry::with_prefix("chat_frontend");
        registry.register("sockets", "Sockets connected", metrics.sockets.clone());
        registry.register(
            "rooms",
            "Rooms with at least one local socket",
            metrics.rooms.clone(),
        );
        registry.register(
            "messages_received",
            "Messages read from the Redis feed",
            metrics.received.clone(),
        );
        registry.register(
            "messages_caught_up",
            "Messages read from the feed stream rather than pushed by Redis",
            metrics.caught_up.clone(),
        );
        registry.register(
            "messages_delivered",
            "Messages emitted to sockets",
            metrics.delivered.clone(),
        );
        registry.register(
            "messages_dropped",
            "Messages not queued because a socket's send queue was full",
            metrics.dropped.clone(),
        );
        registry.register(
            "messages_replayed",
            "Messages sent to resuming sockets",
            metrics.replayed.clone(),
        );
        registry.register(
            "joins_refused",
            "Refused room events",
            metrics.joins_refused.clone(),
        );
        Self::with_redis(registry, health)
    }

    pub fn backend(metrics: &BackendMetrics, health: Arc<RedisHealth>) -> Self {
        let mut registry = Registry::with_prefix("chat_backend");
        registry.register(
            "posts",
            "Answers to POST /back/message, by status",
            metrics.posts.clone(),
        );
        registry.register(
            "post_seconds",
            "Time to answer POST /back/message",
            metrics.post_seconds.clone(),
        );
        Self::with_redis(registry, health)
    }

    fn with_redis(mut registry: Registry, health: Arc<RedisHealth>) -> Self {
        let redis = RedisMetrics::default();
        registry.register(
            "redis_up",
            "1 when Redis answered last time",
            redis.up.clone(),
        );
        registry.register(
            "redis_losses",
            "Times Redis went from reachable to unreachable",
            redis.losses.clone(),
        );
        Metrics {
            registry,
            redis,
            health,
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        self.redis.up.set(i64::from(self.health.is_up()));
        let losses = self.health.losses();
        let counted = self.redis.losses.get();
        if losses > counted {
            self.redis.losses.inc_by(losses - counted);
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String");
        text
    }

    /// An axum response carrying the rendered metrics.
    pub fn response(&self) -> Response {
        let content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
        ([(header::CONTENT_TYPE, content_type)], self.render()).into_response()
    }
}
