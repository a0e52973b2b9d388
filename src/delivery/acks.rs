//! Sentinel mode: a message is acknowledged only once replicas hold it.
//!
//! Redis replicates asynchronously: a primary answers an append before any
//! replica has it, and if the primary dies then, the replica Sentinel
//! promotes never had the message. So the backend asks `WAIT <n> <timeout>`
//! after the append, and answers 201 only when at least
//! `redis.min_replicas_acked` replicas confirmed; otherwise 503, and the
//! client retries with the same `Idempotency-Key` (the record of the key
//! makes the retry return the first id if that append did survive).
//!
//! # Group commit
//!
//! `WAIT` blocks the connection it is sent on until the replicas answer, and
//! it covers every write made earlier on that connection. So:
//!
//! - appends go over a connection of their own (the *writer*): history
//!   reads and the status check never queue behind a `WAIT`;
//! - posts arriving together share one `WAIT`. Each append, once Redis
//!   answered it, takes a ticket; one task sends `WAIT` on the writer and
//!   publishes the outcome for every ticket taken before it was sent. The
//!   appends that arrive while a `WAIT` is out are pipelined on the writer
//!   behind it and share the next one.
//!
//! One `WAIT` round trip per post on a shared connection would instead hold
//! every other post behind each `WAIT` in turn: n posts would take n round
//! trips to the replicas, where here they take one or two.
//!
//! A ticket counts only for the writer it was appended on: `WAIT` on another
//! connection (remade after an error, or to a new primary) says nothing of
//! it, so such a post gets 503.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ProtocolVersion};
use tokio::sync::{Notify, watch};
use tokio::task::AbortHandle;

use super::StoreError;
use super::primary::Primary;
use crate::config::{RedisConfig, SentinelConfig};

/// Why a message was not acknowledged.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AckError {
    #[error(
        "only {acked} of the {needed} replicas (redis.min_replicas_acked) confirmed the \
         message within {timeout:?}"
    )]
    TooFew {
        acked: u64,
        needed: u32,
        timeout: Duration,
    },
    #[error("the connection to the primary was lost before the replicas confirmed the message")]
    Lost,
}

/// The connection appends go over, and its identity: tickets and `WAIT`
/// rounds name it.
#[derive(Clone)]
pub struct Writer {
    pub id: u64,
    generation: u64,
    pub conn: MultiplexedConnection,
}

/// The outcome of one `WAIT`.
#[derive(Debug, Clone, Copy, Default)]
struct Round {
    /// Tickets up to this one are answered by this round.
    covered: u64,
    /// The writer `WAIT` was sent on (0: none could be had).
    writer: u64,
    /// Replicas that confirmed; `None` when `WAIT` failed.
    acked: Option<u64>,
}

/// Waits for replicas on behalf of the appends of one [`super::Store`].
pub struct ReplicaAcks {
    shared: Arc<Shared>,
    /// The task that sends `WAIT`, started by the first append: a store
    /// that only reads (the frontend's) never runs it.
    task: OnceLock<AbortHandle>,
}

struct Shared {
    primary: Primary,
    config: RedisConfig,
    needed: u32,
    timeout: Duration,
    writer: tokio::sync::Mutex<Option<Writer>>,
    writers_made: AtomicU64,
    /// Tickets taken so far.
    issued: AtomicU64,
    wake: Notify,
    rounds: watch::Sender<Round>,
}

impl Drop for ReplicaAcks {
    fn drop(&mut self) {
        if let Some(task) = self.task.get() {
            task.abort();
        }
    }
}

impl ReplicaAcks {
    /// Ready to wait for replicas; the task that sends `WAIT` starts with
    /// the first [`ReplicaAcks::confirm`].
    pub fn new(primary: Primary, config: &RedisConfig, sentinel: &SentinelConfig) -> Self {
        let shared = Arc::new(Shared {
            primary,
            config: config.clone(),
            needed: sentinel.min_replicas_acked,
            timeout: sentinel.replica_ack_timeout(),
            writer: tokio::sync::Mutex::new(None),
            writers_made: AtomicU64::new(0),
            issued: AtomicU64::new(0),
            wake: Notify::new(),
            rounds: watch::Sender::new(Round::default()),
        });
        ReplicaAcks {
            shared,
            task: OnceLock::new(),
        }
    }

    /// How long a `WAIT` may take.
    pub fn timeout(&self) -> Duration {
        self.shared.timeout
    }

    /// The writer to the primary now, made if there is none for it.
    pub async fn writer(&self) -> Result<Writer, StoreError> {
        self.shared.writer().await
    }

    /// Forgets writer `id` after an error on it: the next append makes a
    /// new one (and the posts still waiting on `id` get 503).
    pub async fn drop_writer(&self, id: u64) {
        let mut writer = self.shared.writer.lock().await;
        if writer.as_ref().is_some_and(|w| w.id == id) {
            *writer = None;
        }
    }

    /// Returns once enough replicas hold what was appended on writer `id`
    /// before this call, or why they do not.
    pub async fn confirm(&self, id: u64) -> Result<(), AckError> {
        let shared = &self.shared;
        self.task
            .get_or_init(|| tokio::spawn(shared.clone().send_waits()).abort_handle());
        let ticket = shared.issued.fetch_add(1, Ordering::SeqCst) + 1;
        let mut rounds = shared.rounds.subscribe();
        shared.wake.notify_one();
        // The task answers within two WAITs (the one under way, then the
        // one for this ticket); the bound only guards against a task that
        // is gone.
        let limit = (shared.timeout + shared.config.command_timeout()) * 2;
        let round = tokio::time::timeout(limit, rounds.wait_for(|r| r.covered >= ticket))
            .await
            .map_err(|_| AckError::Lost)?
            .map_err(|_| AckError::Lost)?;
        match (round.writer == id, round.acked) {
            (true, Some(acked)) if acked >= u64::from(shared.needed) => Ok(()),
            (true, Some(acked)) => Err(AckError::TooFew {
                acked,
                needed: shared.needed,
                timeout: shared.timeout,
            }),
            _ => Err(AckError::Lost),
        }
    }
}

impl Shared {
    async fn writer(&self) -> Result<Writer, StoreError> {
        let resolved = self.primary.current().ok_or(StoreError::NoPrimary)?;
        let mut writer = self.writer.lock().await;
        if let Some(current) = &*writer
            && current.generation == resolved.generation
        {
            return Ok(current.clone());
        }
        *writer = None;
        let client = self.primary.client(&resolved, ProtocolVersion::RESP2)?;
        // WAIT holds the answer back for up to its timeout.
        let response_timeout = self.config.command_timeout() + self.timeout;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.config.command_timeout()))
            .set_response_timeout(Some(response_timeout));
        let conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .inspect_err(|_| self.primary.suspect())?;
        let made = Writer {
            id: self.writers_made.fetch_add(1, Ordering::Relaxed) + 1,
            generation: resolved.generation,
            conn,
        };
        *writer = Some(made.clone());
        Ok(made)
    }

    /// Sends one `WAIT` for all tickets taken before it, again and again
    /// while appends take tickets.
    async fn send_waits(self: Arc<Self>) {
        let mut answered = 0;
        loop {
            self.wake.notified().await;
            loop {
                let covered = self.issued.load(Ordering::SeqCst);
                if covered <= answered {
                    break;
                }
                let (writer, acked) = self.wait().await;
                self.rounds.send_replace(Round {
                    covered,
                    writer,
                    acked,
                });
                answered = covered;
            }
        }
    }

    /// `WAIT` on the current writer: which writer, and how many replicas
    /// confirmed.
    async fn wait(&self) -> (u64, Option<u64>) {
        let Some(mut writer) = self.writer.lock().await.clone() else {
            return (0, None);
        };
        let timeout_ms = u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX);
        let mut cmd = redis::cmd("WAIT");
        cmd.arg(self.needed).arg(timeout_ms);
        match cmd.query_async::<u64>(&mut writer.conn).await {
            Ok(acked) => (writer.id, Some(acked)),
            Err(e) => {
                tracing::warn!("WAIT for replicas failed: {e}");
                self.primary.suspect();
                let mut current = self.writer.lock().await;
                if current.as_ref().is_some_and(|w| w.id == writer.id) {
                    *current = None;
                }
                (writer.id, None)
            }
        }
    }
}
