//! Redis Cluster's sharded pub/sub (`SSUBSCRIBE`), kept subscribed across
//! lost connections, failovers and slot migrations.
//!
//! In a Redis Cluster a plain `PUBLISH` is broadcast to every node over the
//! cluster bus, which stops scaling as nodes are added. A *shard channel*
//! belongs to a hash slot like a key does: `SPUBLISH` reaches only the
//! primary owning the slot (and its replicas), and a subscriber must
//! `SSUBSCRIBE` there. So a subscriber needs to know who owns each slot, and
//! must follow the slot when it moves.
//!
//! # Why not redis-rs's cluster client
//!
//! redis-rs 1.8's `cluster-async` subscribes shard channels itself, with two
//! defects that silently stop delivery:
//!
//! 1. after a lost connection it subscribes again *all* of a node's shard
//!    channels in one `SSUBSCRIBE`, which spans several slots: Redis answers
//!    `CROSSSLOT` and subscribes none of them;
//! 2. when a slot migrates (or a failover moves it), Redis tells the
//!    subscriber with an unsolicited `sunsubscribe` push for each channel of
//!    the slot, and redis-rs does not subscribe again on the new owner.
//!
//! So this module keeps connections of its own: one plain RESP3
//! [`MultiplexedConnection`] per node that owns a subscribed slot, with a
//! push sender, and it reconciles what each node has subscribed with what
//! is wanted.
//!
//! # Design
//!
//! A *coordinator* task knows which channels are wanted, grouped by slot,
//! and which primary owns each slot (`CLUSTER SLOTS`, asked again whenever
//! something shows it stale). It hands each slot to a *worker* task for the
//! owning node. The worker holds that node's connection: it subscribes its
//! slots, forwards the messages, `PING`s every [`LIVENESS`] so that a
//! silently dead connection is noticed, reconnects with jittered
//! exponential backoff, and reports back what it cannot fix alone (a lost
//! connection, a slot Redis says is elsewhere). A slot moves from one worker
//! to another only once the first has let it go, so a message of the old
//! owner never follows the new owner's [`Event::Subscribed`].
//!
//! # One reply per command
//!
//! `SSUBSCRIBE a b c` is answered with three confirmations, or with one
//! error (`MOVED`, `CROSSSLOT`...). redis-rs's public API matches one reply
//! to each command it sends, so a multi-channel `SSUBSCRIBE` would leave
//! surplus confirmations to be taken for the replies of later commands.
//! Instead the channels of a slot are subscribed together as a pipeline of
//! one-channel `SSUBSCRIBE`s: one round trip per slot, never a command
//! spanning slots, and every reply belongs to its command whatever the
//! server answers.
//!
//! redis-rs also takes any `sunsubscribe` push for the reply of the command
//! in flight, including the unsolicited ones a migration sends. Every reply
//! is therefore checked against its command (the `PING`s carry a token the
//! reply must echo); one that does not match means the replies have shifted,
//! and the connection is dropped and made again.
//!
//! # Bounds
//!
//! The channels are the caller's, and so is their number. What Redis sends
//! cannot grow anything here: messages on channels not subscribed are
//! dropped, a `CLUSTER SLOTS` reply cannot name more ranges than there are
//! slots, and `MOVED` answers only trigger a refresh from the configured
//! seeds and known nodes (their address is not followed). The events go out
//! on an unbounded channel that the caller drains.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{AsyncConnectionConfig, PushInfo, PushKind, RedisResult, Value};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;

use super::jitter;
use crate::config::RedisConfig;

/// How many hash slots a Redis Cluster has.
pub const SLOT_COUNT: u16 = 16384;

/// How often each node connection is checked with a `PING`: a connection
/// that died without a word (a host gone, a firewall dropping it) is
/// noticed within this and a command timeout.
pub const LIVENESS: Duration = Duration::from_secs(2);

/// Redis Cluster's hash slot of `channel`: CRC16 (XMODEM) of its hash tag
/// (the text between the first `{` and the next `}`, when not empty), or of
/// the whole name, modulo [`SLOT_COUNT`]. Channels sharing a hash tag share
/// a slot, and so a node.
pub fn slot(channel: &str) -> u16 {
    crc16(hash_tag(channel.as_bytes())) % SLOT_COUNT
}

/// The part of `key` that is hashed: its hash tag if it has a non-empty
/// one, else all of it.
fn hash_tag(key: &[u8]) -> &[u8] {
    let Some(open) = key.iter().position(|&byte| byte == b'{') else {
        return key;
    };
    let rest = &key[open + 1..];
    match rest.iter().position(|&byte| byte == b'}') {
        Some(close) if close > 0 => &rest[..close],
        _ => key,
    }
}

/// CRC16-CCITT as Redis Cluster uses it (XMODEM: polynomial 0x1021,
/// initial value 0, no reflection).
fn crc16(data: &[u8]) -> u16 {
    crc16::State::<crc16::XMODEM>::calculate(data)
}

/// Builds a client, logged in as the daemons are, for a cluster node the
/// topology names by host and port.
pub type ClientFor = Arc<dyn Fn(&str, u16) -> RedisResult<redis::Client> + Send + Sync>;

/// Where the shard channels live. Every client must speak RESP3: the
/// messages arrive as pushes on a connection that also carries commands.
pub enum Nodes {
    /// One server holds every slot: a single Redis, or the primary the
    /// Sentinels name (following a failover is then the caller's: start
    /// anew on the new primary). `SSUBSCRIBE` works on a standalone Redis 7
    /// too: shard channels are then a namespace of their own.
    One(redis::Client),
    /// A Redis Cluster, found through these seed nodes (reached by host and
    /// port, as the cluster names its nodes): the topology comes from
    /// `CLUSTER SLOTS`, asked of the node that answered last, then of the
    /// seeds, then of the nodes the last topology named.
    Cluster {
        seeds: Vec<redis::Client>,
        client_for: ClientFor,
    },
}

/// Timeouts and pauses, as `[redis]` configures them for the daemons.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// How long connecting, and each command, may take.
    pub command_timeout: Duration,
    /// The first pause before connecting again after a failure...
    pub reconnect_min: Duration,
    /// ...doubled after each failure up to this.
    pub reconnect_max: Duration,
}

impl Settings {
    /// The daemons' `redis.command_timeout_ms`, `reconnect_min_ms` and
    /// `reconnect_max_ms`.
    pub fn from_config(config: &RedisConfig) -> Self {
        Settings {
            command_timeout: config.command_timeout(),
            reconnect_min: config.reconnect_min(),
            reconnect_max: config.reconnect_max(),
        }
    }
}

/// What the subscriptions tell their receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A message published on a subscribed channel.
    Message { channel: String, payload: Vec<u8> },
    /// `channels` are now subscribed: the first time, or again after a lost
    /// connection, a failover or a slot that moved. They are channels of
    /// one slot, those subscribed together. Anything published on them
    /// before this event may have been missed: the receiver reads what it
    /// missed from its streams after this event. Messages of these channels
    /// that follow this event were published after the subscription took
    /// effect.
    Subscribed {
        channels: Vec<String>,
        /// The node that now serves them (`HOST:PORT`; `Redis` for
        /// [`Nodes::One`]): another than before after a failover or a moved
        /// slot.
        node: String,
    },
    /// The connection serving `channels` was lost: they are subscribed
    /// again (and [`Event::Subscribed`] follows) once a node owns them and
    /// answers. `error` says why, for the log.
    Lost {
        channels: Vec<String>,
        error: String,
    },
}

/// Shard channel subscriptions, served by a task that ends when this
/// handle is dropped.
pub struct Subscriptions {
    requests: mpsc::UnboundedSender<Request>,
    task: AbortHandle,
}

impl Subscriptions {
    /// Starts serving subscriptions on `nodes` (this needs a Tokio runtime).
    /// The events arrive on the returned receiver, which the caller must
    /// keep draining.
    pub fn start(
        nodes: Nodes,
        settings: Settings,
    ) -> (Subscriptions, mpsc::UnboundedReceiver<Event>) {
        let (requests, requests_rx) = mpsc::unbounded_channel();
        let (events, events_rx) = mpsc::unbounded_channel();
        let coordinator = Coordinator::new(nodes, settings, events);
        let task = tokio::spawn(coordinator.run(requests_rx)).abort_handle();
        (Subscriptions { requests, task }, events_rx)
    }

    /// Subscribes to `channels`. Those sharing a slot (a hash tag) are
    /// subscribed together, each slot on the node that owns it; channels
    /// already subscribed are left as they are.
    pub fn subscribe(&self, channels: Vec<String>) {
        // Fails only once the task is gone, which the handle outlives.
        let _ = self.requests.send(Request::Subscribe(channels));
    }

    /// Unsubscribes from `channels`. A node connection left with no channel
    /// is closed.
    pub fn unsubscribe(&self, channels: Vec<String>) {
        let _ = self.requests.send(Request::Unsubscribe(channels));
    }
}

impl Drop for Subscriptions {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Debug, thiserror::Error)]
pub(super) enum ShardError {
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("the connection to {0} closed")]
    Disconnected(NodeId),
    #[error("{node} answered {command} with {reply}: replies no longer match commands")]
    Desync {
        node: NodeId,
        command: &'static str,
        reply: String,
    },
    #[error("{0} is not reached over RESP3, which shard channel messages need")]
    NotResp3(NodeId),
    #[error("no node gave the cluster's slots: {0}")]
    NoTopology(String),
    #[error("malformed CLUSTER SLOTS reply: {0}")]
    Malformed(&'static str),
}

/// A node, as workers and the topology name it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) enum NodeId {
    /// The server of [`Nodes::One`].
    Single,
    At {
        host: String,
        port: u16,
    },
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodeId::Single => f.write_str("Redis"),
            NodeId::At { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// The node a client connects to, when it names one by host and port.
pub(super) fn node_of(client: &redis::Client) -> Option<NodeId> {
    match client.get_connection_info().addr() {
        redis::ConnectionAddr::Tcp(host, port)
        | redis::ConnectionAddr::TcpTls { host, port, .. } => Some(NodeId::At {
            host: host.clone(),
            port: *port,
        }),
        _ => None,
    }
}

/// How to get a client for a node: the one given, or one built from the
/// topology's host and port (afresh each time, so that a failure to build
/// one, reading the password say, is retried like a failure to connect).
#[derive(Clone)]
enum Connector {
    Given(redis::Client),
    Built(ClientFor, String, u16),
}

impl Connector {
    fn client(&self) -> RedisResult<redis::Client> {
        match self {
            Connector::Given(client) => Ok(client.clone()),
            Connector::Built(client_for, host, port) => client_for(host, *port),
        }
    }
}

/// What the handle asks of the coordinator.
enum Request {
    Subscribe(Vec<String>),
    Unsubscribe(Vec<String>),
}

/// What the coordinator asks of a worker.
enum Order {
    /// Serve `slot` with exactly `channels`: subscribe those not yet
    /// subscribed, unsubscribe the others.
    Assign {
        slot: u16,
        channels: BTreeSet<String>,
    },
    /// Stop serving `slot`, and say so with [`Report::Released`].
    Release { slot: u16 },
}

/// What a worker tells the coordinator.
enum Report {
    /// A node's connection was lost, or could not be made: its slots may
    /// have moved (a failover).
    Failed,
    /// Channels of `slot` are not subscribed on `node` any more, or could
    /// not be: a `MOVED` answer, an unsolicited `sunsubscribe`, an error.
    Dropped { node: NodeId, slot: u16 },
    /// `node` no longer serves `slot`: nothing more of it will come from it.
    Released { node: NodeId, slot: u16 },
    /// A node subscribed channels: things work, so the next refresh need
    /// not wait long.
    Subscribed,
}

/// Which primary owns each slot, as `CLUSTER SLOTS` said.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Topology {
    /// Sorted, disjoint `(first, last, owner)` slot ranges.
    ranges: Vec<(u16, u16, NodeId)>,
}

impl Topology {
    /// Every slot on the one server.
    fn single() -> Self {
        Topology {
            ranges: vec![(0, SLOT_COUNT - 1, NodeId::Single)],
        }
    }

    pub(super) fn owner(&self, slot: u16) -> Option<&NodeId> {
        let after = self.ranges.partition_point(|(first, _, _)| *first <= slot);
        let (_, last, owner) = self.ranges.get(after.checked_sub(1)?)?;
        (slot <= *last).then_some(owner)
    }

    /// The primaries, each once.
    pub(super) fn nodes(&self) -> BTreeSet<&NodeId> {
        self.ranges.iter().map(|(_, _, node)| node).collect()
    }

    /// Reads a `CLUSTER SLOTS` reply from `asked`: an array of ranges, each
    /// `[first, last, primary, replicas...]`, a node being `[endpoint,
    /// port, id, ...]`. An empty or null endpoint means the node asked; `?`,
    /// an endpoint the node does not know: that range has no owner here.
    pub(super) fn parse(reply: Value, asked: &NodeId) -> Result<Self, ShardError> {
        let Value::Array(items) = reply else {
            return Err(ShardError::Malformed("not an array"));
        };
        let mut ranges = Vec::with_capacity(items.len());
        for item in items {
            let Value::Array(fields) = item else {
                return Err(ShardError::Malformed("a range that is not an array"));
            };
            let mut fields = fields.into_iter();
            let first = slot_number(fields.next())?;
            let last = slot_number(fields.next())?;
            if first > last {
                return Err(ShardError::Malformed("a range that ends before it starts"));
            }
            if let Some(owner) = endpoint(fields.next(), asked)? {
                ranges.push((first, last, owner));
            }
        }
        ranges.sort();
        if ranges.windows(2).any(|pair| pair[1].0 <= pair[0].1) {
            return Err(ShardError::Malformed("overlapping ranges"));
        }
        Ok(Topology { ranges })
    }
}

fn slot_number(value: Option<Value>) -> Result<u16, ShardError> {
    match value {
        Some(Value::Int(n)) => u16::try_from(n)
            .ok()
            .filter(|slot| *slot < SLOT_COUNT)
            .ok_or(ShardError::Malformed("a slot out of range")),
        _ => Err(ShardError::Malformed("a slot that is not a number")),
    }
}

/// The primary of a range; `None` when its endpoint is unknown (`?`).
fn endpoint(value: Option<Value>, asked: &NodeId) -> Result<Option<NodeId>, ShardError> {
    let Some(Value::Array(node)) = value else {
        return Err(ShardError::Malformed("a range without a primary"));
    };
    let mut node = node.into_iter();
    let host = match node.next() {
        Some(Value::BulkString(host)) => String::from_utf8(host).ok(),
        Some(Value::SimpleString(host)) => Some(host),
        Some(Value::Nil) => Some(String::new()),
        _ => None,
    };
    let host = host.ok_or(ShardError::Malformed("a node without an endpoint"))?;
    let port = match node.next() {
        Some(Value::Int(port)) => u16::try_from(port).ok(),
        _ => None,
    };
    let port = port.ok_or(ShardError::Malformed("a node without a port"))?;
    Ok(match host.as_str() {
        "?" => None,
        "" => match asked {
            NodeId::At { host, .. } => Some(NodeId::At {
                host: host.clone(),
                port,
            }),
            NodeId::Single => None,
        },
        _ => Some(NodeId::At { host, port }),
    })
}

/// When the topology is to be asked for again: at once the first time,
/// then no sooner than a pause after the last time, the pause doubling
/// while asking does not lead to a subscription, so that a stale node
/// answering `MOVED` over and over is not asked in a tight loop.
struct Schedule {
    due: Option<Instant>,
    last: Option<Instant>,
    pause: Duration,
    settings: Settings,
}

impl Schedule {
    fn new(settings: Settings) -> Self {
        Schedule {
            due: None,
            last: None,
            pause: settings.reconnect_min,
            settings,
        }
    }

    fn request(&mut self) {
        if self.due.is_none() {
            let now = Instant::now();
            let earliest = self.last.map_or(now, |last| last + jitter(self.pause));
            self.due = Some(earliest.max(now));
        }
    }

    fn ran(&mut self) {
        self.due = None;
        self.last = Some(Instant::now());
        self.pause = (self.pause * 2).min(self.settings.reconnect_max);
    }

    fn settled(&mut self) {
        self.pause = self.settings.reconnect_min;
    }
}

/// Where a wanted slot is served.
#[derive(Debug, PartialEq)]
enum Place {
    Served(NodeId),
    /// Being let go by this node; placed again once it has.
    Releasing(NodeId),
}

/// The coordinator's side of a worker.
struct WorkerHandle {
    orders: mpsc::UnboundedSender<Order>,
    /// Slots served or being released: the worker is let go at zero.
    slots: usize,
}

/// Decides which node serves each slot (see the module's doc).
struct Coordinator {
    nodes: Nodes,
    settings: Settings,
    events: mpsc::UnboundedSender<Event>,
    reports: mpsc::UnboundedSender<Report>,
    reports_rx: mpsc::UnboundedReceiver<Report>,
    wanted: BTreeMap<u16, BTreeSet<String>>,
    topology: Topology,
    /// The node that last gave the topology, asked first next time.
    answered: Option<NodeId>,
    /// Whether the last attempt to learn the topology failed (logged once).
    topology_failing: bool,
    places: HashMap<u16, Place>,
    workers: HashMap<NodeId, WorkerHandle>,
    tasks: JoinSet<()>,
    refresh: Schedule,
}

impl Coordinator {
    fn new(nodes: Nodes, settings: Settings, events: mpsc::UnboundedSender<Event>) -> Self {
        let (reports, reports_rx) = mpsc::unbounded_channel();
        let mut refresh = Schedule::new(settings);
        let topology = match &nodes {
            Nodes::One(_) => Topology::single(),
            Nodes::Cluster { .. } => {
                refresh.request();
                Topology::default()
            }
        };
        Coordinator {
            nodes,
            settings,
            events,
            reports,
            reports_rx,
            wanted: BTreeMap::new(),
            topology,
            answered: None,
            topology_failing: false,
            places: HashMap::new(),
            workers: HashMap::new(),
            tasks: JoinSet::new(),
            refresh,
        }
    }

    /// Serves requests until the handle is gone.
    async fn run(mut self, mut requests: mpsc::UnboundedReceiver<Request>) {
        loop {
            let due = self.refresh.due;
            tokio::select! {
                request = requests.recv() => match request {
                    Some(request) => self.request(request),
                    None => return,
                },
                Some(report) = self.reports_rx.recv() => self.report(report),
                () = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                    self.refresh().await;
                }
                // Reaps the workers that ended.
                Some(_) = self.tasks.join_next(), if !self.tasks.is_empty() => {}
            }
        }
    }

    fn request(&mut self, request: Request) {
        let mut touched = BTreeSet::new();
        match request {
            Request::Subscribe(channels) => {
                for channel in channels {
                    let slot = slot(&channel);
                    if self.wanted.entry(slot).or_default().insert(channel) {
                        touched.insert(slot);
                    }
                }
            }
            Request::Unsubscribe(channels) => {
                for channel in channels {
                    let slot = slot(&channel);
                    if let Some(wanted) = self.wanted.get_mut(&slot)
                        && wanted.remove(&channel)
                    {
                        touched.insert(slot);
                        if wanted.is_empty() {
                            self.wanted.remove(&slot);
                        }
                    }
                }
            }
        }
        for slot in touched {
            self.place(slot);
        }
    }

    fn report(&mut self, report: Report) {
        match report {
            // The slots may have moved (a failover); a single Redis's worker
            // connects again by itself.
            Report::Failed => {
                if let Nodes::Cluster { .. } = self.nodes {
                    self.refresh.request();
                }
            }
            Report::Dropped { node, slot } => {
                // A report about a slot since given to another node is stale.
                if self.places.get(&slot) == Some(&Place::Served(node)) {
                    self.refresh.request();
                }
            }
            Report::Released { node, slot } => {
                if self.places.get(&slot) == Some(&Place::Releasing(node.clone())) {
                    self.places.remove(&slot);
                    self.let_go(&node);
                    self.place(slot);
                }
            }
            Report::Subscribed => self.refresh.settled(),
        }
    }

    /// Asks for the topology again (a cluster's), and places every slot
    /// anew: slots whose owner changed move, and slots a node dropped are
    /// subscribed again.
    async fn refresh(&mut self) {
        self.refresh.ran();
        if let Nodes::Cluster { .. } = self.nodes {
            match self.topology().await {
                Ok(topology) => {
                    self.topology = topology;
                    self.topology_failing = false;
                }
                Err(error) => {
                    if std::mem::replace(&mut self.topology_failing, true) {
                        tracing::debug!("still no Redis Cluster topology: {error}");
                    } else {
                        tracing::warn!(
                            "cannot learn which Redis Cluster node owns which slot: {error}"
                        );
                    }
                    self.refresh.request();
                }
            }
        }
        let slots: BTreeSet<u16> = self
            .wanted
            .keys()
            .chain(self.places.keys())
            .copied()
            .collect();
        for slot in slots {
            self.place(slot);
        }
    }

    /// The topology, from the first node that gives it.
    async fn topology(&mut self) -> Result<Topology, ShardError> {
        let mut failures = Vec::new();
        for (node, connector) in self.candidates() {
            match self.ask_slots(&node, &connector).await {
                Ok(topology) => {
                    self.answered = Some(node);
                    return Ok(topology);
                }
                Err(error) => failures.push(format!("{node}: {error}")),
            }
        }
        Err(ShardError::NoTopology(failures.join("; ")))
    }

    /// The nodes to ask for the topology, in order: the one that answered
    /// last, the seeds, the primaries of the last topology.
    fn candidates(&self) -> Vec<(NodeId, Connector)> {
        let Nodes::Cluster { seeds, client_for } = &self.nodes else {
            return Vec::new();
        };
        let mut candidates: Vec<(NodeId, Connector)> = seeds
            .iter()
            .filter_map(|seed| Some((node_of(seed)?, Connector::Given(seed.clone()))))
            .collect();
        for node in self.topology.nodes() {
            if let NodeId::At { host, port } = node
                && !candidates.iter().any(|(known, _)| known == node)
            {
                let connector = Connector::Built(client_for.clone(), host.clone(), *port);
                candidates.push((node.clone(), connector));
            }
        }
        if let Some(at) = candidates
            .iter()
            .position(|(node, _)| Some(node) == self.answered.as_ref())
        {
            candidates[..=at].rotate_right(1);
        }
        candidates
    }

    async fn ask_slots(
        &self,
        node: &NodeId,
        connector: &Connector,
    ) -> Result<Topology, ShardError> {
        let timeout = Some(self.settings.command_timeout);
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(timeout)
            .set_response_timeout(timeout);
        let mut conn = connector
            .client()?
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        let reply: Value = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut conn)
            .await?;
        Topology::parse(reply, node)
    }

    /// Brings `slot` where it belongs: to the worker of its owner with the
    /// channels wanted, or away from a node that no longer owns it (or
    /// where nothing is wanted any more).
    fn place(&mut self, slot: u16) {
        let wanted = self.wanted.get(&slot).cloned();
        let owner = wanted
            .as_ref()
            .and_then(|_| self.topology.owner(slot))
            .cloned();
        if wanted.is_some() && owner.is_none() {
            // No node is known to own it (yet): ask again.
            self.refresh.request();
        }
        match self.places.get(&slot) {
            // Placed once let go.
            Some(Place::Releasing(_)) => {}
            Some(Place::Served(node)) if Some(node) == owner.as_ref() => {
                let channels = wanted.unwrap_or_default();
                self.order(&node.clone(), Order::Assign { slot, channels });
            }
            Some(Place::Served(node)) => {
                let node = node.clone();
                if let Some(owner) = &owner {
                    tracing::debug!("slot {slot} moves from Redis node {node} to {owner}");
                }
                self.order(&node, Order::Release { slot });
                self.places.insert(slot, Place::Releasing(node));
            }
            None => {
                if let (Some(channels), Some(owner)) = (wanted, owner) {
                    self.worker(&owner).slots += 1;
                    self.order(&owner, Order::Assign { slot, channels });
                    self.places.insert(slot, Place::Served(owner));
                }
            }
        }
    }

    fn order(&self, node: &NodeId, order: Order) {
        // A node a slot is placed on has a worker (let go only once it has
        // released every slot), and the worker ends only once let go.
        if let Some(worker) = self.workers.get(node) {
            let _ = worker.orders.send(order);
        }
    }

    /// The worker of `node`, started if there is none.
    fn worker(&mut self, node: &NodeId) -> &mut WorkerHandle {
        let Coordinator {
            workers,
            tasks,
            nodes,
            settings,
            events,
            reports,
            ..
        } = self;
        workers.entry(node.clone()).or_insert_with(|| {
            let connector = match (nodes, node) {
                (Nodes::One(client), _) => Connector::Given(client.clone()),
                (Nodes::Cluster { client_for, .. }, NodeId::At { host, port }) => {
                    Connector::Built(client_for.clone(), host.clone(), *port)
                }
                // Never: a cluster's topology names its nodes by address.
                (Nodes::Cluster { client_for, .. }, NodeId::Single) => {
                    Connector::Built(client_for.clone(), String::new(), 0)
                }
            };
            let (orders, orders_rx) = mpsc::unbounded_channel();
            let worker = Worker {
                node: node.clone(),
                connector,
                settings: *settings,
                events: events.clone(),
                reports: reports.clone(),
                orders: orders_rx,
                slots: BTreeMap::new(),
                own_unsubscribes: HashMap::new(),
                pings: 0,
                failing: false,
            };
            tasks.spawn(worker.run());
            WorkerHandle { orders, slots: 0 }
        })
    }

    /// Counts one slot fewer for `node`'s worker, and lets the worker go
    /// when it has none left: it ends once it has carried out its orders,
    /// closing its connection.
    fn let_go(&mut self, node: &NodeId) {
        if let Some(worker) = self.workers.get_mut(node) {
            worker.slots = worker.slots.saturating_sub(1);
            if worker.slots == 0 {
                self.workers.remove(node);
            }
        }
    }
}

/// The channels of one slot on a worker.
#[derive(Debug, Default)]
struct SlotChannels {
    /// What the coordinator assigned.
    wanted: BTreeSet<String>,
    /// What the current connection has confirmed: messages are forwarded
    /// for these only.
    subscribed: BTreeSet<String>,
}

/// How a worker's connection ended.
enum Outcome {
    /// The coordinator let the worker go.
    Ended,
    Lost(ShardError),
}

/// A node's connection and the pushes it receives.
struct Link {
    conn: MultiplexedConnection,
    pushes: mpsc::UnboundedReceiver<PushInfo>,
}

/// Serves the slots one node owns over one connection (see the module's
/// doc).
struct Worker {
    node: NodeId,
    connector: Connector,
    settings: Settings,
    events: mpsc::UnboundedSender<Event>,
    reports: mpsc::UnboundedSender<Report>,
    orders: mpsc::UnboundedReceiver<Order>,
    slots: BTreeMap<u16, SlotChannels>,
    /// Confirmations of this worker's own `SUNSUBSCRIBE`s yet to come
    /// through the pushes, by channel: any other `sunsubscribe` push is
    /// Redis dropping the channel (its slot moved).
    own_unsubscribes: HashMap<String, usize>,
    /// `PING`s sent, for each one's token.
    pings: u64,
    /// Whether the node failed to answer since it last did: an unreachable
    /// node is logged once, not at every attempt.
    failing: bool,
}

impl Worker {
    async fn run(mut self) {
        let mut pause = self.settings.reconnect_min;
        loop {
            let outcome = match self.connect().await {
                Ok(link) => self.serve(link, &mut pause).await,
                Err(error) => Outcome::Lost(error),
            };
            let Outcome::Lost(error) = outcome else {
                return;
            };
            self.lost(&error);
            let _ = self.reports.send(Report::Failed);
            if !self.wait(jitter(pause)).await {
                return;
            }
            pause = (pause * 2).min(self.settings.reconnect_max);
        }
    }

    async fn connect(&self) -> Result<Link, ShardError> {
        let client = self.connector.client()?;
        if !client
            .get_connection_info()
            .redis_settings()
            .protocol()
            .supports_resp3()
        {
            return Err(ShardError::NotResp3(self.node.clone()));
        }
        let (pushes_tx, pushes) = mpsc::unbounded_channel();
        let timeout = Some(self.settings.command_timeout);
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(timeout)
            .set_response_timeout(timeout)
            .set_push_sender(pushes_tx);
        let conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        Ok(Link { conn, pushes })
    }

    /// Subscribes every slot, then forwards messages and carries out orders
    /// until the connection fails or the worker is let go.
    async fn serve(&mut self, mut link: Link, pause: &mut Duration) -> Outcome {
        let slots: Vec<u16> = self.slots.keys().copied().collect();
        for slot in slots {
            if let Err(error) = self.subscribe(&mut link.conn, slot).await {
                return Outcome::Lost(error);
            }
        }
        *pause = self.settings.reconnect_min;
        if std::mem::take(&mut self.failing) {
            tracing::info!("Redis node {} answers again", self.node);
        }
        let start = Instant::now() + LIVENESS;
        let mut liveness = tokio::time::interval_at(start, LIVENESS);
        liveness.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let step = tokio::select! {
                push = link.pushes.recv() => self.take(push),
                order = self.orders.recv() => match order {
                    Some(order) => self.apply(order, &mut link.conn).await,
                    None => return Outcome::Ended,
                },
                _ = liveness.tick() => self.ping(&mut link.conn).await,
            };
            if let Err(error) = step {
                return Outcome::Lost(error);
            }
        }
    }

    /// Forgets what the lost connection had subscribed, and says so.
    fn lost(&mut self, error: &ShardError) {
        self.own_unsubscribes.clear();
        let channels: Vec<String> = self
            .slots
            .values_mut()
            .flat_map(|slot| std::mem::take(&mut slot.subscribed))
            .collect();
        let first = !std::mem::replace(&mut self.failing, true);
        if channels.is_empty() {
            // Said once, until the node answers again.
            if first {
                tracing::warn!("cannot reach Redis node {}: {error}", self.node);
            } else {
                tracing::debug!("Redis node {} still unreachable: {error}", self.node);
            }
            return;
        }
        tracing::warn!(
            "lost Redis node {}, {} shard channels unsubscribed until it or another node serves them: {error}",
            self.node,
            channels.len()
        );
        let error = error.to_string();
        let _ = self.events.send(Event::Lost { channels, error });
    }

    /// Waits `pause` before connecting again, taking orders meanwhile.
    /// Returns false when the worker was let go.
    async fn wait(&mut self, pause: Duration) -> bool {
        let until = Instant::now() + pause;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(until) => return true,
                order = self.orders.recv() => match order {
                    Some(order) => self.note(order),
                    None => return false,
                },
            }
        }
    }

    /// Takes `order` while there is no connection: nothing is subscribed.
    fn note(&mut self, order: Order) {
        match order {
            Order::Assign { slot, channels } => {
                self.slots.entry(slot).or_default().wanted = channels
            }
            Order::Release { slot } => {
                self.slots.remove(&slot);
                self.released(slot);
            }
        }
    }

    fn released(&self, slot: u16) {
        let node = self.node.clone();
        let _ = self.reports.send(Report::Released { node, slot });
    }

    async fn apply(
        &mut self,
        order: Order,
        conn: &mut MultiplexedConnection,
    ) -> Result<(), ShardError> {
        match order {
            Order::Assign { slot, channels } => {
                let entry = self.slots.entry(slot).or_default();
                let dropped: Vec<String> = entry
                    .subscribed
                    .iter()
                    .filter(|channel| !channels.contains(*channel))
                    .cloned()
                    .collect();
                entry
                    .subscribed
                    .retain(|channel| channels.contains(channel));
                entry.wanted = channels;
                self.unsubscribe(conn, dropped).await?;
                self.subscribe(conn, slot).await
            }
            Order::Release { slot } => {
                let subscribed = self
                    .slots
                    .remove(&slot)
                    .map(|slot| slot.subscribed)
                    .unwrap_or_default();
                // Nothing of the slot is forwarded from here on: it can be
                // handed to another node.
                self.released(slot);
                self.unsubscribe(conn, subscribed.into_iter().collect())
                    .await
            }
        }
    }

    /// Subscribes the channels of `slot` not yet subscribed, in one round
    /// trip (see "One reply per command" in the module's doc), and tells the
    /// receiver which are.
    async fn subscribe(
        &mut self,
        conn: &mut MultiplexedConnection,
        slot: u16,
    ) -> Result<(), ShardError> {
        let Some(entry) = self.slots.get(&slot) else {
            return Ok(());
        };
        let new: Vec<String> = entry
            .wanted
            .difference(&entry.subscribed)
            .cloned()
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for channel in &new {
            pipe.cmd("SSUBSCRIBE").arg(channel);
        }
        let replies = conn.req_packed_commands(&pipe, 0, new.len()).await?;
        if replies.len() != new.len() {
            return Err(self.desync("SSUBSCRIBE", &Value::Array(replies)));
        }
        let mut confirmed = Vec::with_capacity(new.len());
        let mut refusal = None;
        for (channel, reply) in new.into_iter().zip(&replies) {
            match reply {
                Value::Push {
                    kind: PushKind::SSubscribe,
                    data,
                } if names(data, &channel) => confirmed.push(channel),
                // MOVED (the topology is stale), CLUSTERDOWN, NOPERM...
                Value::ServerError(error) => refusal = Some(error.clone()),
                other => return Err(self.desync("SSUBSCRIBE", other)),
            }
        }
        if let Some(entry) = self.slots.get_mut(&slot) {
            entry.subscribed.extend(confirmed.iter().cloned());
        }
        if let Some(error) = refusal {
            if error.kind() == Some(redis::ServerErrorKind::Moved) {
                tracing::info!("slot {slot} is no longer on Redis node {}", self.node);
            } else {
                tracing::warn!(
                    "Redis node {} refused to subscribe slot {slot}: {error}",
                    self.node
                );
            }
            self.dropped(slot);
        }
        if !confirmed.is_empty() {
            let _ = self.reports.send(Report::Subscribed);
            let _ = self.events.send(Event::Subscribed {
                channels: confirmed,
                node: self.node.to_string(),
            });
        }
        Ok(())
    }

    /// Unsubscribes `channels` (one command each, pipelined). A node that
    /// answers `MOVED` has nothing of them subscribed any more.
    async fn unsubscribe(
        &mut self,
        conn: &mut MultiplexedConnection,
        channels: Vec<String>,
    ) -> Result<(), ShardError> {
        if channels.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for channel in &channels {
            pipe.cmd("SUNSUBSCRIBE").arg(channel);
            *self.own_unsubscribes.entry(channel.clone()).or_default() += 1;
        }
        let replies = conn.req_packed_commands(&pipe, 0, channels.len()).await?;
        if replies.len() != channels.len() {
            return Err(self.desync("SUNSUBSCRIBE", &Value::Array(replies)));
        }
        for (channel, reply) in channels.iter().zip(&replies) {
            match reply {
                Value::Push {
                    kind: PushKind::SUnsubscribe,
                    data,
                } if names(data, channel) => {}
                // No confirmation will come through the pushes.
                Value::ServerError(_) => {
                    self.expect_fewer(channel);
                }
                other => return Err(self.desync("SUNSUBSCRIBE", other)),
            }
        }
        Ok(())
    }

    /// One fewer confirmation of our own `SUNSUBSCRIBE` of `channel` to
    /// come; returns whether one was expected.
    fn expect_fewer(&mut self, channel: &str) -> bool {
        let Some(count) = self.own_unsubscribes.get_mut(channel) else {
            return false;
        };
        *count -= 1;
        if *count == 0 {
            self.own_unsubscribes.remove(channel);
        }
        true
    }

    /// Checks that the node answers, and that its replies still match the
    /// commands: the reply must echo this `PING`'s token.
    async fn ping(&mut self, conn: &mut MultiplexedConnection) -> Result<(), ShardError> {
        self.pings += 1;
        let token = format!("shards-{}", self.pings);
        let reply = conn
            .send_packed_command(redis::cmd("PING").arg(&token))
            .await?;
        match reply {
            Value::BulkString(echo) if echo == token.as_bytes() => Ok(()),
            other => Err(self.desync("PING", &other)),
        }
    }

    /// Takes a push: a message to forward, Redis dropping a channel, or the
    /// connection's end (`None`: the connection is gone).
    fn take(&mut self, push: Option<PushInfo>) -> Result<(), ShardError> {
        let push = push.ok_or_else(|| ShardError::Disconnected(self.node.clone()))?;
        match push.kind {
            PushKind::SMessage => self.forward(push.data),
            PushKind::SUnsubscribe => self.unsubscribed(push.data),
            PushKind::Disconnection => return Err(ShardError::Disconnected(self.node.clone())),
            // Confirmations of our SSUBSCRIBEs, checked on their replies.
            _ => {}
        }
        Ok(())
    }

    /// Forwards a message (`[channel, payload]`) if its channel is
    /// subscribed here.
    fn forward(&mut self, data: Vec<Value>) {
        let mut data = data.into_iter();
        let (Some(Value::BulkString(channel)), Some(Value::BulkString(payload))) =
            (data.next(), data.next())
        else {
            return;
        };
        let Ok(channel) = String::from_utf8(channel) else {
            return;
        };
        let subscribed = self
            .slots
            .get(&slot(&channel))
            .is_some_and(|slot| slot.subscribed.contains(&channel));
        if subscribed {
            let _ = self.events.send(Event::Message { channel, payload });
        }
    }

    /// A `sunsubscribe` push (`[channel, count]`). Unless it confirms our
    /// own `SUNSUBSCRIBE`, Redis dropped the channel: its slot left this
    /// node (a migration, or a failover that made this node a replica).
    /// Redis 7.0 sends one such push per channel of the slot, the moment
    /// the node deletes the slot: when it learns, by its own `CLUSTER
    /// SETSLOT` or by gossip, that another node claims it.
    fn unsubscribed(&mut self, data: Vec<Value>) {
        let Some(Value::BulkString(channel)) = data.into_iter().next() else {
            return;
        };
        let Ok(channel) = String::from_utf8(channel) else {
            return;
        };
        if self.expect_fewer(&channel) {
            return;
        }
        let slot = slot(&channel);
        if let Some(entry) = self.slots.get_mut(&slot)
            && entry.subscribed.remove(&channel)
        {
            tracing::info!(
                "Redis node {} dropped shard channel {channel}: slot {slot} moved",
                self.node
            );
            self.dropped(slot);
        }
    }

    fn dropped(&self, slot: u16) {
        let node = self.node.clone();
        let _ = self.reports.send(Report::Dropped { node, slot });
    }

    fn desync(&self, command: &'static str, reply: &Value) -> ShardError {
        let mut reply = format!("{reply:?}");
        if reply.len() > 200 {
            let mut end = 200;
            while !reply.is_char_boundary(end) {
                end -= 1;
            }
            reply.truncate(end);
            reply.push('…');
        }
        ShardError::Desync {
            node: self.node.clone(),
            command,
            reply,
        }
    }
}

/// Whether a confirmation push (`[channel, count]`) names `channel`.
fn names(data: &[Value], channel: &str) -> bool {
    matches!(data.first(), Some(Value::BulkString(name)) if name == channel.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_those_of_redis_cluster() {
        // The examples of the Redis Cluster specification.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(slot("123456789"), 0x31C3);
        assert_eq!(slot("{user1000}.following"), slot("user1000"));
        assert_eq!(slot("{user1000}.followers"), slot("user1000"));
        assert_eq!(slot("foo{}{bar}"), crc16(b"foo{}{bar}") % SLOT_COUNT);
        assert_eq!(slot("foo{{bar}}zap"), slot("{bar"));
        assert_eq!(slot("foo{bar}{zap}"), slot("bar"));
        assert_eq!(slot("no{tag"), crc16(b"no{tag") % SLOT_COUNT);
        // As `CLUSTER KEYSLOT` answered on Redis 7.0.
        assert_eq!(slot("a"), 15495);
        assert_eq!(slot("b"), 3300);
        assert_eq!(slot("c"), 7365);
    }

    fn node(port: u16) -> Value {
        Value::Array(vec![
            Value::BulkString(b"10.0.0.1".to_vec()),
            Value::Int(i64::from(port)),
            Value::BulkString(b"id".to_vec()),
        ])
    }

    fn range(first: i64, last: i64, primary: Value) -> Value {
        Value::Array(vec![Value::Int(first), Value::Int(last), primary, node(9)])
    }

    fn at(host: &str, port: u16) -> NodeId {
        NodeId::At {
            host: host.to_owned(),
            port,
        }
    }

    #[test]
    fn the_topology_names_each_slots_primary() {
        let asked = at("seed", 7000);
        let reply = Value::Array(vec![range(5461, 16383, node(2)), range(0, 5460, node(1))]);
        let topology = Topology::parse(reply, &asked).unwrap();
        assert_eq!(topology.owner(0), Some(&at("10.0.0.1", 1)));
        assert_eq!(topology.owner(5460), Some(&at("10.0.0.1", 1)));
        assert_eq!(topology.owner(5461), Some(&at("10.0.0.1", 2)));
        assert_eq!(topology.owner(16383), Some(&at("10.0.0.1", 2)));
        assert_eq!(topology.nodes().len(), 2);
    }

    #[test]
    fn an_empty_endpoint_is_the_node_asked_and_an_unknown_one_owns_nothing() {
        let asked = at("seed", 7000);
        let unnamed = Value::Array(vec![Value::BulkString(Vec::new()), Value::Int(7001)]);
        let unknown = Value::Array(vec![Value::BulkString(b"?".to_vec()), Value::Int(7002)]);
        let reply = Value::Array(vec![range(0, 99, unnamed), range(100, 199, unknown)]);
        let topology = Topology::parse(reply, &asked).unwrap();
        assert_eq!(topology.owner(50), Some(&at("seed", 7001)));
        assert_eq!(topology.owner(150), None, "an unknown endpoint");
        assert_eq!(topology.owner(250), None, "an uncovered slot");
    }

    #[test]
    fn malformed_topologies_are_refused() {
        let asked = at("seed", 7000);
        for reply in [
            Value::Int(1),
            Value::Array(vec![range(0, 16384, node(1))]),
            Value::Array(vec![range(10, 5, node(1))]),
            Value::Array(vec![range(0, 10, node(1)), range(10, 20, node(2))]),
            Value::Array(vec![range(0, 10, Value::Nil)]),
        ] {
            assert!(Topology::parse(reply.clone(), &asked).is_err(), "{reply:?}");
        }
    }
}
