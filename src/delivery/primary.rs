//! Which Redis to talk to: the one of `redis.url`, or the primary the
//! Sentinels name, followed across failovers.
//!
//! # Following a primary
//!
//! In Sentinel mode ([`crate::config::RedisMode::Sentinel`]) the primary can
//! change at any moment: Sentinel promotes a replica when the primary stops
//! answering, and the old primary, if it comes back, is turned into a
//! replica. redis-rs's own Sentinel support looks the primary up once, so a
//! client built with it keeps talking to a demoted primary (whose writes then
//! fail with `READONLY`), or to nothing. [`Primary`] is the small layer that
//! follows it instead. A task of its own:
//!
//! 1. asks all the Sentinels at once
//!    `SENTINEL GET-MASTER-ADDR-BY-NAME <redis.sentinel_master>` (one whose
//!    host is gone would otherwise hold the others up for a timeout);
//! 2. counts the answers until a majority of the Sentinels name the same
//!    server (or all have answered), then asks the server named most `ROLE`,
//!    and takes it only if it says `master`, else the next one: a Sentinel
//!    that has not yet heard of a failover may still name the old primary,
//!    which by then may be a replica; and a Sentinel cut off with an old
//!    primary names it while it still says `master` (it has not heard that
//!    it was replaced), but only a minority of the Sentinels does. With no
//!    Sentinel answering, the current primary is kept as long as it says it
//!    is one;
//! 3. publishes the result as a [`Resolved`] with a new `generation`
//!    whenever the address changes (or the primary answers again after a
//!    spell without one), or `None` while there is no primary
//!    (`/front/status` then says `degraded`, the backend answers 503).
//!
//! It does so again, at once, when a user of the primary reports trouble
//! ([`Primary::suspect`]: a connection error, a `READONLY` or `LOADING`
//! reply), when a Sentinel announces `+switch-master` (subscribed to on one
//! Sentinel at a time), and every [`CHECK`] regardless, because an event can
//! be missed (the subscription was being remade) and a demoted primary that
//! still accepts reads says nothing of it. So a daemon stops writing to a
//! demoted primary within one [`CHECK`] at worst, and in practice at its
//! first write, which the demoted primary refuses with `READONLY`.
//!
//! Users of the primary ([`super::Store`], [`super::Feed`]) hold connections
//! to one generation, and build new ones when the generation changes: a
//! connection is never carried over from one primary to another.
//!
//! # Other modes
//!
//! Users see only [`Primary::current`], [`Primary::changes`],
//! [`Primary::client`] and [`Primary::suspect`]: where the primary is, when
//! it changes, a client for it, and "something is wrong with it". A Redis
//! Cluster mode would keep that interface per shard (a primary per slot
//! range, resolved from `CLUSTER SHARDS` instead of the Sentinels, and
//! suspected on `MOVED` as here on `READONLY`), so that the store and the
//! feed follow a shard's primary as they follow the one primary here.
//!
//! # One Redis
//!
//! With `redis.url`, the same interface hands out one [`Resolved`] for ever:
//! no task runs, [`Primary::suspect`] does nothing, and the generation never
//! changes, so callers keep their connections exactly as they did before
//! Sentinel mode existed. Nothing is added to the path of a post.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ProtocolVersion, PushKind};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::AbortHandle;

use super::ConnectError;
use crate::config::{RedisConfig, RedisMode, SentinelConfig};

/// How often the Sentinels and the primary are asked even when nothing
/// happened: the longest a missed `+switch-master` goes unnoticed.
pub const CHECK: Duration = Duration::from_secs(1);

/// The Sentinel event announcing a new primary.
const SWITCH_MASTER: &str = "+switch-master";

/// A primary to talk to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// Changes each time the primary does; one connection serves one
    /// generation only.
    pub generation: u64,
    /// `HOST:PORT` in Sentinel mode; the URL with one Redis.
    pub address: String,
    target: Target,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// `redis.url`.
    Configured,
    /// A server the Sentinels named.
    Server { host: String, port: u16, tls: bool },
}

/// What the daemons report of the primaries they followed.
#[derive(Debug, Default)]
pub struct PrimaryStats {
    failovers: AtomicU64,
    /// Milliseconds without a primary, not counting the current spell.
    without_ms: AtomicU64,
    /// Since when there is no primary (`None`: there is one).
    lost_at: Mutex<Option<Instant>>,
    address: Mutex<Option<String>>,
}

impl PrimaryStats {
    /// Times the daemon moved from one primary to another.
    pub fn failovers(&self) -> u64 {
        self.failovers.load(Ordering::Relaxed)
    }

    /// Time spent without a primary since the start, the current spell included.
    pub fn time_without(&self) -> Duration {
        let past = Duration::from_millis(self.without_ms.load(Ordering::Relaxed));
        let current = lock(&self.lost_at).map_or(Duration::ZERO, |since| since.elapsed());
        past + current
    }

    /// The primary followed now, if any.
    pub fn address(&self) -> Option<String> {
        lock(&self.address).clone()
    }

    fn found(&self, address: &str) {
        if let Some(since) = lock(&self.lost_at).take() {
            let millis = u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX);
            self.without_ms.fetch_add(millis, Ordering::Relaxed);
        }
        *lock(&self.address) = Some(address.to_owned());
    }

    fn lost(&self) {
        lock(&self.lost_at).get_or_insert_with(Instant::now);
        *lock(&self.address) = None;
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Whether `error` is a server refusing the login: no password given where
/// one is wanted, or a wrong one. A setup mistake, not an outage.
fn refuses_login(error: &ConnectError) -> bool {
    matches!(error, ConnectError::Redis(e)
        if e.kind() == redis::ErrorKind::AuthenticationFailed || e.code() == Some("NOAUTH"))
}

/// The primary to talk to, as it changes. Cheap to clone.
#[derive(Clone)]
pub struct Primary(Arc<Handle>);

struct Handle {
    shared: Arc<Shared>,
    config: RedisConfig,
    /// The tasks following the Sentinels, stopped with the last clone.
    tasks: Vec<AbortHandle>,
}

struct Shared {
    current: watch::Sender<Option<Arc<Resolved>>>,
    /// Generations handed out: kept apart from `current`, which is `None`
    /// between two primaries.
    generations: AtomicU64,
    /// The last primary followed, kept while there is none.
    last: Mutex<Option<Target>>,
    suspect: Notify,
    stats: PrimaryStats,
}

impl Drop for Handle {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Primary {
    /// The primary of `config`: fixed with `redis.url`; in Sentinel mode,
    /// followed by tasks started here (so this needs a Tokio runtime), and
    /// `None` until the Sentinels were first asked.
    pub fn new(config: &RedisConfig) -> Self {
        let fixed = |address: &str| {
            let resolved = Resolved {
                generation: 1,
                address: address.to_owned(),
                target: Target::Configured,
            };
            let shared = Shared::new(Some(Arc::new(resolved)));
            shared.stats.found(address);
            Primary(Arc::new(Handle {
                shared: Arc::new(shared),
                config: config.clone(),
                tasks: Vec::new(),
            }))
        };
        let sentinel = match &config.mode {
            RedisMode::Single(url) => return fixed(url.as_str()),
            // Each shard has a primary of its own, which the cluster names:
            // the store and the feed follow the cluster's topology instead.
            RedisMode::Cluster(cluster) => {
                let seeds: Vec<&str> = cluster.seeds.iter().map(|url| url.as_str()).collect();
                return fixed(&seeds.join(" "));
            }
            RedisMode::Sentinel(sentinel) => sentinel.clone(),
        };
        let shared = Arc::new(Shared::new(None));
        shared.stats.lost();
        let asker = Sentinels::new(config, &sentinel);
        let tasks = vec![
            tokio::spawn(asker.clone().follow(shared.clone())).abort_handle(),
            tokio::spawn(asker.listen(shared.clone())).abort_handle(),
        ];
        Primary(Arc::new(Handle {
            shared,
            config: config.clone(),
            tasks,
        }))
    }

    /// Whether the primary can change (Sentinel mode).
    pub fn follows_sentinels(&self) -> bool {
        matches!(self.0.config.mode, RedisMode::Sentinel(_))
    }

    /// The primary now; `None` while there is none.
    pub fn current(&self) -> Option<Arc<Resolved>> {
        self.0.shared.current.borrow().clone()
    }

    /// The primary now or, while there is none (the Sentinels are being
    /// asked, at start or during a failover), the one found within `limit`;
    /// `None` if none is. A request that arrives as the daemon starts, or
    /// as a failover ends, is served rather than refused.
    pub async fn current_within(&self, limit: Duration) -> Option<Arc<Resolved>> {
        let mut changes = self.changes();
        let found = changes.wait_for(Option::is_some);
        match tokio::time::timeout(limit, found).await {
            Ok(Ok(resolved)) => resolved.clone(),
            _ => None,
        }
    }

    /// A receiver that sees each change of [`Primary::current`]; with one
    /// Redis, it never does.
    pub fn changes(&self) -> watch::Receiver<Option<Arc<Resolved>>> {
        self.0.shared.current.subscribe()
    }

    /// Tells the layer that the primary misbehaved (a connection error, a
    /// `READONLY` or `LOADING` reply): the Sentinels are asked again at once.
    pub fn suspect(&self) {
        if self.follows_sentinels() {
            self.0.shared.suspect.notify_one();
        }
    }

    /// A client for `resolved`, speaking `protocol`, logged in as configured.
    /// Connects lazily.
    pub fn client(
        &self,
        resolved: &Resolved,
        protocol: ProtocolVersion,
    ) -> Result<redis::Client, ConnectError> {
        match &resolved.target {
            Target::Configured => super::connect::client(&self.0.config, protocol),
            Target::Server { host, port, tls } => {
                super::connect::client_at(&self.0.config, host, *port, *tls, protocol)
            }
        }
    }

    /// What was seen of primaries so far.
    pub fn stats(&self) -> &PrimaryStats {
        &self.0.shared.stats
    }
}

impl Shared {
    fn new(current: Option<Arc<Resolved>>) -> Self {
        Shared {
            generations: AtomicU64::new(u64::from(current.is_some())),
            current: watch::Sender::new(current),
            last: Mutex::new(None),
            suspect: Notify::new(),
            stats: PrimaryStats::default(),
        }
    }

    /// Publishes what the Sentinels and `ROLE` said, if it changed.
    fn publish(&self, found: Option<(String, u16, bool)>) {
        let current = self.current.borrow().clone();
        match (found, current) {
            (None, None) => {}
            (None, Some(was)) => {
                tracing::warn!("no Redis primary: {} is no longer one", was.address);
                self.stats.lost();
                self.current.send_replace(None);
            }
            (Some((host, port, tls)), was) => {
                let target = Target::Server { host, port, tls };
                if was.as_ref().is_some_and(|was| was.target == target) {
                    return;
                }
                let Target::Server { host, port, .. } = &target else {
                    unreachable!("built above")
                };
                let address = format!("{host}:{port}");
                let previous = lock(&self.last).replace(target.clone());
                match previous {
                    Some(previous) if previous == target => {
                        tracing::info!("Redis primary {address} answers again");
                    }
                    Some(_) => {
                        tracing::info!("following new Redis primary {address}");
                        self.stats.failovers.fetch_add(1, Ordering::Relaxed);
                    }
                    None => tracing::info!("following new Redis primary {address}"),
                }
                // Connections are remade even to the same server: one that
                // went away may have restarted without what it had.
                let generation = self.next_generation();
                self.stats.found(&address);
                self.current.send_replace(Some(Arc::new(Resolved {
                    generation,
                    address,
                    target,
                })));
            }
        }
    }

    /// A generation no primary had: the first is 1.
    fn next_generation(&self) -> u64 {
        self.generations.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// Asking the Sentinels, and `ROLE` of the server they name.
#[derive(Clone)]
struct Sentinels {
    config: RedisConfig,
    sentinel: SentinelConfig,
    timeout: Duration,
}

impl Sentinels {
    fn new(config: &RedisConfig, sentinel: &SentinelConfig) -> Self {
        Sentinels {
            config: config.clone(),
            sentinel: sentinel.clone(),
            timeout: config.command_timeout(),
        }
    }

    /// Resolves the primary now, on trouble, on `+switch-master` and every
    /// [`CHECK`], for ever.
    async fn follow(self, shared: Arc<Shared>) {
        let mut connections = Connections {
            sentinels: self
                .sentinel
                .sentinels
                .iter()
                .map(|_| Arc::default())
                .collect(),
            role: None,
        };
        loop {
            let found = self.resolve(&mut connections, &shared).await;
            shared.publish(found);
            tokio::select! {
                _ = shared.suspect.notified() => {}
                _ = tokio::time::sleep(CHECK) => {}
            }
        }
    }

    /// The primary: of the servers the Sentinels name, the one named most
    /// that `ROLE` confirms, else the current one if it still says it is the
    /// primary (no Sentinel answers).
    ///
    /// The Sentinels are all asked at once: one whose host is gone (its
    /// packets dropped) costs a connection timeout, which must not delay the
    /// answers of the others, so the count stops as soon as a majority
    /// agree. Counting, rather than taking the first answer, matters when
    /// the primary was cut off from the other Redis hosts but not from this
    /// daemon: the Sentinel beside it still names it, and it still says it
    /// is the primary, while the majority have promoted a replica.
    async fn resolve(
        &self,
        connections: &mut Connections,
        shared: &Shared,
    ) -> Option<(String, u16, bool)> {
        let named = self.named_by_sentinels(connections).await;
        for server in &named {
            if self.is_primary(connections, server).await {
                return Some(server.clone());
            }
        }
        let current = match shared.current.borrow().as_deref() {
            Some(Resolved {
                target: Target::Server { host, port, tls },
                ..
            }) => (host.clone(), *port, *tls),
            _ => return None,
        };
        let confirmed = !named.contains(&current) && self.is_primary(connections, &current).await;
        confirmed.then_some(current)
    }

    /// The servers the Sentinels name as the primary, the one named most
    /// first; asked until a majority agree or every Sentinel answered.
    async fn named_by_sentinels(&self, connections: &Connections) -> Vec<(String, u16, bool)> {
        let mut asking = tokio::task::JoinSet::new();
        for (index, slot) in connections.sentinels.iter().enumerate() {
            let (asker, slot) = (self.clone(), slot.clone());
            asking.spawn(async move { (index, asker.ask_sentinel(&slot, index).await) });
        }
        let majority = connections.sentinels.len() / 2 + 1;
        let mut votes: Vec<((String, u16, bool), usize)> = Vec::new();
        // Dropping the set stops the askers that have not answered yet.
        while let Some(joined) = asking.join_next().await {
            let Ok((index, answer)) = joined else {
                continue;
            };
            let url = self.sentinel.sentinels[index].as_str();
            let named = match answer {
                Ok(Some((host, port))) => (host, port, url.starts_with("rediss:")),
                Ok(None) => {
                    tracing::warn!(
                        "Sentinel {url} does not know the primary {:?}",
                        self.sentinel.master
                    );
                    continue;
                }
                Err(e) if refuses_login(&e) => {
                    tracing::warn!(
                        "Sentinel {url} refuses the login ({e}): the Sentinels' password is the \
                         sentinel-password credential (/etc/chat-ha/sentinel-password), or \
                         redis.sentinel_password_file"
                    );
                    continue;
                }
                Err(e) => {
                    tracing::debug!("Sentinel {url} does not answer: {e}");
                    continue;
                }
            };
            let count = match votes.iter_mut().find(|(server, _)| *server == named) {
                Some((_, count)) => {
                    *count += 1;
                    *count
                }
                None => {
                    votes.push((named, 1));
                    1
                }
            };
            if count >= majority {
                break;
            }
        }
        // Stable: among equal counts, the first named stays first.
        votes.sort_by_key(|(_, count)| std::cmp::Reverse(*count));
        votes.into_iter().map(|(server, _)| server).collect()
    }

    /// Whether the server says `ROLE` `master`.
    async fn is_primary(
        &self,
        connections: &mut Connections,
        server: &(String, u16, bool),
    ) -> bool {
        let (host, port, tls) = server;
        match self.role(connections, host, *port, *tls).await {
            Ok(role) if role == "master" => true,
            Ok(role) => {
                tracing::debug!("{host}:{port} is a {role}, not the primary (yet)");
                false
            }
            // Refused rather than unreachable: the login or the ACL is
            // wrong, which no failover mends; the operator must see it.
            Err(ConnectError::Redis(e)) if e.code().is_some() => {
                tracing::warn!("{host}:{port} refuses ROLE: {e}");
                false
            }
            Err(e) => {
                tracing::debug!("{host}:{port} does not answer ROLE: {e}");
                false
            }
        }
    }

    /// What Sentinel `index` says of the primary, over the connection kept
    /// in `slot` (made when there is none, forgotten on an error).
    async fn ask_sentinel(
        &self,
        slot: &tokio::sync::Mutex<Option<MultiplexedConnection>>,
        index: usize,
    ) -> Result<Option<(String, u16)>, ConnectError> {
        let mut slot = slot.lock().await;
        let conn = match &mut *slot {
            Some(conn) => conn,
            None => slot.insert(self.connect_sentinel(index, None).await?),
        };
        let mut cmd = redis::cmd("SENTINEL");
        cmd.arg("GET-MASTER-ADDR-BY-NAME")
            .arg(&self.sentinel.master);
        let reply = cmd.query_async(conn).await;
        if reply.is_err() {
            *slot = None;
        }
        Ok(reply?)
    }

    /// `ROLE`'s first word (`master`, `slave`...) from `host`:`port`.
    async fn role(
        &self,
        connections: &mut Connections,
        host: &str,
        port: u16,
        tls: bool,
    ) -> Result<String, ConnectError> {
        let address = (host.to_owned(), port);
        if connections.role.as_ref().map(|(a, _)| a) != Some(&address) {
            let client =
                super::connect::client_at(&self.config, host, port, tls, ProtocolVersion::RESP2)?;
            let conn = client
                .get_multiplexed_async_connection_with_config(&self.connection_config())
                .await?;
            connections.role = Some((address, conn));
        }
        let (_, conn) = connections.role.as_mut().expect("set above");
        let reply: redis::RedisResult<redis::Value> = redis::cmd("ROLE").query_async(conn).await;
        let reply = match reply {
            Ok(reply) => reply,
            Err(e) => {
                connections.role = None;
                return Err(e.into());
            }
        };
        match reply {
            redis::Value::Array(items) => match items.into_iter().next() {
                Some(first) => Ok(
                    redis::from_redis_value::<String>(first).map_err(redis::RedisError::from)?
                ),
                None => Ok(String::new()),
            },
            _ => Ok(String::new()),
        }
    }

    async fn connect_sentinel(
        &self,
        index: usize,
        pushes: Option<mpsc::UnboundedSender<redis::PushInfo>>,
    ) -> Result<MultiplexedConnection, ConnectError> {
        let protocol = match pushes {
            Some(_) => ProtocolVersion::RESP3,
            None => ProtocolVersion::RESP2,
        };
        let client = super::connect::sentinel_client(
            &self.config,
            &self.sentinel.sentinels[index],
            self.sentinel.password_file.as_deref(),
            protocol,
        )?;
        let mut config = self.connection_config();
        if let Some(pushes) = pushes {
            config = config.set_push_sender(pushes);
        }
        Ok(client
            .get_multiplexed_async_connection_with_config(&config)
            .await?)
    }

    fn connection_config(&self) -> AsyncConnectionConfig {
        AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
    }

    /// Listens for `+switch-master` on one Sentinel after another, and
    /// has the primary resolved again at each.
    async fn listen(self, shared: Arc<Shared>) {
        let mut index = 0;
        loop {
            if let Err(e) = self.listen_to(index, &shared).await {
                tracing::debug!("no {SWITCH_MASTER} events from Sentinel {index}: {e}");
            }
            index = (index + 1) % self.sentinel.sentinels.len();
            tokio::time::sleep(self.config.reconnect_min()).await;
        }
    }

    async fn listen_to(&self, index: usize, shared: &Shared) -> Result<(), ConnectError> {
        let (sender, mut events) = mpsc::unbounded_channel();
        let mut conn = self.connect_sentinel(index, Some(sender)).await?;
        conn.subscribe(SWITCH_MASTER).await?;
        let ours = format!("{} ", self.sentinel.master);
        while let Some(event) = events.recv().await {
            match event.kind {
                PushKind::Message => {
                    let about_ours = event.data.get(1).is_some_and(|payload| {
                        redis::from_redis_value_ref::<String>(payload)
                            .is_ok_and(|text| text.starts_with(&ours))
                    });
                    if about_ours {
                        tracing::info!("Sentinel {index} announced a new primary");
                        shared.suspect.notify_one();
                    }
                }
                PushKind::Disconnection => break,
                _ => {}
            }
        }
        Ok(())
    }
}

/// Connections kept between two checks.
struct Connections {
    /// To each Sentinel, in the order of `redis.sentinels`.
    sentinels: Vec<Arc<tokio::sync::Mutex<Option<MultiplexedConnection>>>>,
    /// To the server last asked `ROLE`.
    role: Option<((String, u16), MultiplexedConnection)>,
}
