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
//! the task records, for each room appended to on that writer before the
//! `WAIT`, the newest id appended, in the room's `acked` key, and publishes
//! it on the room's channel as `acked <id>` (`ACKED_SCRIPT`, one call per
//! partition). Replication is one ordered stream per primary, so that
//! `WAIT` covers every write the primary made before it, other backends'
//! too; and a room's ids grow in the order its appends ran: the id says
//! "replicas hold every entry of this room up to here".

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ProtocolVersion};
use tokio::sync::{Notify, watch};
use tokio::task::AbortHandle;

use super::primary::Primary;
use super::{Keys, StoreError};
use crate::config::{RedisConfig, SentinelConfig};
use crate::message::{Room, StreamId};

/// Records and publishes, for each room of one partition, that replicas
/// hold it up to an id: KEYS[2i-1] is the room's `acked` key, KEYS[2i] its
/// stream and channel, ARGV[i+1] the id, ARGV[1] how long the key lives (as
/// long as the room). A key at or past its id already (another backend's
/// `WAIT` came first) is left alone and nothing is published for it, so that
/// the key only moves forward and frontends get no push that tells them
/// nothing.
const ACKED_SCRIPT: &str = r"
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local published = 0
for i = 1, #KEYS / 2 do
  local key, channel, id = KEYS[2 * i - 1], KEYS[2 * i], ARGV[i + 1]
  local current = redis.call('GET', key)
  local newer = true
  if current then
    local cms, cseq = parse(current)
    local ms, seq = parse(id)
    if cms and (ms < cms or (ms == cms and seq <= cseq)) then
      newer = false
    end
  end
  if newer then
    redis.call('SET', key, id, 'EX', ARGV[1])
    redis.call('SPUBLISH', channel, 'acked ' .. id)
    published = published + 1
  end
end
return published
";

/// [`ACKED_SCRIPT`], called by its digest.
pub(super) static ACKED: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(ACKED_SCRIPT));

/// One room's [`ACKED_SCRIPT`] call: replicas hold `room` up to `id`.
pub(super) fn acked_invocation(
    keys: &Keys,
    room: &Room,
    id: StreamId,
    room_ttl: Duration,
) -> redis::Cmd {
    let mut cmd = super::script::evalsha(&ACKED, 2);
    cmd.arg(keys.acked(room))
        .arg(keys.room(room))
        .arg(room_ttl.as_secs())
        .arg(id.to_string());
    cmd
}

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
    keys: Keys,
    /// How long a room's `acked` key lives: as long as the room.
    room_ttl: Duration,
    /// The writer that took the last ticket, and the newest id appended on
    /// it to each room that no `WAIT` has confirmed yet: what the next
    /// `WAIT` on it confirms.
    newest: std::sync::Mutex<(u64, HashMap<Room, StreamId>)>,
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
    pub fn new(
        primary: Primary,
        config: &RedisConfig,
        sentinel: &SentinelConfig,
        room_ttl: Duration,
    ) -> Self {
        let shared = Arc::new(Shared {
            primary,
            config: config.clone(),
            keys: Keys::new(config),
            room_ttl,
            newest: std::sync::Mutex::new((0, HashMap::new())),
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
    /// before this call, the entry `appended` of `room` among it, or why
    /// they do not.
    pub async fn confirm(&self, id: u64, room: &Room, appended: StreamId) -> Result<(), AckError> {
        let shared = &self.shared;
        self.task
            .get_or_init(|| tokio::spawn(shared.clone().send_waits()).abort_handle());
        shared.note_appended(id, room, appended);
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
                let newest = lock(&self.newest).clone();
                let (writer, acked) = self.wait().await;
                self.rounds.send_replace(Round {
                    covered,
                    writer,
                    acked,
                });
                answered = covered;
                let (on, rooms) = newest;
                if on == writer && acked >= Some(u64::from(self.needed)) && !rooms.is_empty() {
                    self.confirmed(writer, &rooms);
                    // Sent on the writer ahead of the next WAIT, which
                    // need not wait for its answer.
                    tokio::spawn(self.clone().publish_acked(writer, rooms));
                }
            }
        }
    }

    /// Notes that `id` was appended to `room` on writer `writer`.
    fn note_appended(&self, writer: u64, room: &Room, id: StreamId) {
        let mut newest = lock(&self.newest);
        if newest.0 != writer {
            // A WAIT on the new writer says nothing of the old one's.
            *newest = (writer, HashMap::new());
        }
        let last = newest.1.entry(room.clone()).or_insert(id);
        *last = (*last).max(id);
    }

    /// Forgets the ids a `WAIT` on `writer` confirmed, unless a newer one
    /// was appended to the room meanwhile.
    fn confirmed(&self, writer: u64, rooms: &HashMap<Room, StreamId>) {
        let mut newest = lock(&self.newest);
        if newest.0 == writer {
            newest
                .1
                .retain(|room, id| rooms.get(room).is_none_or(|done| *id > *done));
        }
    }

    /// Tells the frontends that replicas hold each of `rooms` up to its id,
    /// on writer `writer` if it is still the current one: one call per
    /// partition, whose keys are all in one slot. A failure costs only
    /// delay: frontends read the rooms' `acked` keys as they poll.
    async fn publish_acked(self: Arc<Self>, writer: u64, rooms: HashMap<Room, StreamId>) {
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
        let mut by_partition: HashMap<u32, Vec<(&Room, &StreamId)>> = HashMap::new();
        for (room, id) in &rooms {
            by_partition
                .entry(self.keys.partition(room))
                .or_default()
                .push((room, id));
        }
        let mut pipeline = redis::pipe();
        for rooms in by_partition.values() {
            let mut invocation = super::script::evalsha(&ACKED, rooms.len() * 2);
            for (room, _) in rooms {
                invocation
                    .arg(self.keys.acked(room))
                    .arg(self.keys.room(room));
            }
            invocation.arg(self.room_ttl.as_secs());
            for (_, id) in rooms {
                invocation.arg(id.to_string());
            }
            pipeline.add_command(invocation).ignore();
        }
        let published = super::script::run::<(), _>(&ACKED, &pipeline, &mut conn).await;
        if let Err(e) = published {
            tracing::debug!(
                "could not publish that replicas hold {} rooms: {e}",
                rooms.len()
            );
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
