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

use crate::delivery::{Primary, RedisHealth};

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

impl BackendMetrics {
    /// Counts one answer to `POST /back/message` by its status, and records
    /// the time it took, `elapsed`.
    pub fn record_post(&self, status: axum::http::StatusCode, elapsed: std::time::Duration) {
        self.post_seconds.observe(elapsed.as_secs_f64());
        let label = StatusLabel {
            status: status.as_u16(),
        };
        self.posts.get_or_create(&label).inc();
    }
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
    /// Frontends: rooms waiting for a node that does not answer.
    waiting: Gauge,
}

/// The label of the primary's info metric: where it is.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AddressLabel {
    address: String,
}

/// Sentinel mode: the primary followed, and its changes.
#[derive(Debug, Default)]
struct PrimaryMetrics {
    /// 1 for the primary followed now; no series while there is none.
    primary: Family<AddressLabel, Gauge>,
    failovers: Counter,
    without: Counter<f64, std::sync::atomic::AtomicU64>,
}

/// Everything one instance exposes, ready to be encoded.
pub struct Metrics {
    registry: Registry,
    redis: RedisMetrics,
    health: Arc<RedisHealth>,
    /// Sentinel mode only.
    primary: Option<(Primary, PrimaryMetrics)>,
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
        let mut all = Self::with_redis(registry, health);
        all.registry.register(
            "redis_rooms_waiting",
            "Rooms followed whose Redis node does not answer (cluster mode): \
             their delivery waits, the other rooms' goes on",
            all.redis.waiting.clone(),
        );
        all
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
            primary: None,
        }
    }

    /// Adds, in Sentinel mode (`primary` given), the primary followed
    /// (`redis_primary{address="HOST:PORT"} 1`), the failovers seen and the
    /// time spent without a primary.
    pub fn following(mut self, primary: Option<&Primary>) -> Self {
        let Some(primary) = primary else {
            return self;
        };
        let metrics = PrimaryMetrics::default();
        self.registry.register(
            "redis_primary",
            "The Redis primary followed now (Sentinel mode), by address",
            metrics.primary.clone(),
        );
        self.registry.register(
            "redis_failovers",
            "Times the daemon moved to a new Redis primary",
            metrics.failovers.clone(),
        );
        self.registry.register(
            "redis_without_primary_seconds",
            "Time spent with no Redis primary to talk to",
            metrics.without.clone(),
        );
        self.primary = Some((primary.clone(), metrics));
        self
    }

    /// Brings the primary's metrics up to date.
    fn render_primary(&self) {
        let Some((primary, metrics)) = &self.primary else {
            return;
        };
        let stats = primary.stats();
        metrics.primary.clear();
        if let Some(address) = stats.address() {
            metrics
                .primary
                .get_or_create(&AddressLabel { address })
                .set(1);
        }
        let failovers = stats.failovers();
        let counted = metrics.failovers.get();
        if failovers > counted {
            metrics.failovers.inc_by(failovers - counted);
        }
        let without = stats.time_without().as_secs_f64();
        let counted = metrics.without.get();
        if without > counted {
            metrics.without.inc_by(without - counted);
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        self.render_primary();
        self.redis.up.set(i64::from(self.health.is_up()));
        let waiting = self.health.rooms_waiting();
        self.redis
            .waiting
            .set(i64::try_from(waiting).unwrap_or(i64::MAX));
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
