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
//!
//! # Telling the frontends
//!
//! Frontends hand a message to sockets only once replicas hold it (see
//! [`super::Feed`]). After a `WAIT` that reached `redis.min_replicas_acked`,
//! the task records the newest feed id appended on that writer before the
//! `WAIT` in `{prefix}:feed:replicated` and publishes it on the channel of
//! that name (`REPLICATED_SCRIPT`): one write and one push per `WAIT`, not
//! per post. Replication is one ordered stream per primary, so that `WAIT`
//! covers every write the primary made before it, other backends' too: the
//! id says "replicas hold every entry up to here".

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ProtocolVersion};
use tokio::sync::{Notify, watch};
use tokio::task::AbortHandle;

use super::primary::Primary;
use super::{Keys, StoreError};
use crate::config::{RedisConfig, SentinelConfig};
use crate::message::StreamId;

/// Records and publishes that replicas hold the feed up to ARGV[1]: in the
/// key KEYS[1] and on the channel of the same name, unless the key is at or
/// past it already (another backend's `WAIT` came first), so that the key
/// only moves forward and frontends get no push that tells them nothing.
const REPLICATED_SCRIPT: &str = r"
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local current = redis.call('GET', KEYS[1])
if current then
  local cms, cseq = parse(current)
  local ms, seq = parse(ARGV[1])
  if cms and (ms < cms or (ms == cms and seq <= cseq)) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
";

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
    /// Where replicated positions are recorded and published.
    replicated_key: String,
    replicated_script: redis::Script,
    /// The newest id appended on a writer that took a ticket, and that
    /// writer's id: what the next `WAIT` on it confirms.
    newest: std::sync::Mutex<Option<(u64, StreamId)>>,
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
            replicated_key: Keys::new(&config.key_prefix).replicated().to_owned(),
            replicated_script: redis::Script::new(REPLICATED_SCRIPT),
            newest: std::sync::Mutex::new(None),
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
    /// before this call, the feed entry `appended` among it, or why they do
    /// not.
    pub async fn confirm(&self, id: u64, appended: StreamId) -> Result<(), AckError> {
        let shared = &self.shared;
        self.task
            .get_or_init(|| tokio::spawn(shared.clone().send_waits()).abort_handle());
        shared.note_appended(id, appended);
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
        let resolved = self
            .primary
            .current_within(self.config.command_timeout())
            .await
            .ok_or(StoreError::NoPrimary)?;
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
                // Read before WAIT is sent: every id noted by then was
                // appended before it.
                let newest = *lock(&self.newest);
                let (writer, acked) = self.wait().await;
                self.rounds.send_replace(Round {
                    covered,
                    writer,
                    acked,
                });
                answered = covered;
                match newest {
                    Some((on, id)) if on == writer && acked >= Some(u64::from(self.needed)) => {
                        // Sent on the writer ahead of the next WAIT, which
                        // need not wait for its answer.
                        tokio::spawn(self.clone().publish_replicated(writer, id));
                    }
                    _ => {}
                }
            }
        }
    }

    /// Notes that `id` was appended on writer `writer`.
    fn note_appended(&self, writer: u64, id: StreamId) {
        let mut newest = lock(&self.newest);
        match &mut *newest {
            Some((on, newest)) if *on == writer => *newest = (*newest).max(id),
            other => *other = Some((writer, id)),
        }
    }

    /// Tells the frontends that replicas hold the feed up to `id`, on
    /// writer `writer` if it is still the current one. A failure costs
    /// only delay: the next `WAIT` publishes a newer id, and frontends read
    /// the key as they poll.
    async fn publish_replicated(self: Arc<Self>, writer: u64, id: StreamId) {
        let Some(mut conn) = self
            .writer
            .lock()
            .await
            .as_ref()
            .filter(|w| w.id == writer)
            .map(|w| w.conn.clone())
        else {
            return;
        };
        let published = self
            .replicated_script
            .key(&self.replicated_key)
            .arg(id.to_string())
            .invoke_async::<i64>(&mut conn)
            .await;
        if let Err(e) = published {
            tracing::debug!("could not publish that replicas hold the feed up to {id}: {e}");
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

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
