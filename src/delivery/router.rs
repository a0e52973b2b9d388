//! Commands to a Redis Cluster, each sent to the primary that owns its key's
//! slot.
//!
//! # Why not redis-rs's cluster client
//!
//! redis-rs 1.8's cluster connection is one task for every node. While it
//! recovers (asks the cluster's slots again, or reconnects to its seeds
//! after a node it needed had no connection), it holds every command, to
//! every node; and a node whose host lost power does not refuse anything, it
//! only lets each attempt time out. One machine powered off then stalls
//! posts to every shard for whole timeouts, though the other primaries are
//! fine.
//!
//! So the [`Router`] keeps connections of its own, per node, and nothing
//! that concerns one node waits on another:
//!
//! - it knows which primary owns each slot from `CLUSTER SLOTS`, asked in
//!   the background (after a `MOVED`, a connection lost, a slot with no known
//!   owner), never in the way of commands: they go on with what is known;
//! - `MOVED` says where a slot is now: the command follows it at once;
//! - `ASK` (a slot being migrated) sends the command, after `ASKING`, to the
//!   node named, that once;
//! - a connection that fails, or a node that does not answer within nine
//!   tenths of the command timeout, is dropped and made again on the next
//!   command to its node; that command's caller gets the error, and
//!   commands with no slot (the status check's `PING`) go to other nodes.
//!
//! It is a [`ConnectionLike`]: a command (or pipeline) goes where its first
//! key leads, or to any node if it has none. `SCRIPT LOAD` goes to every
//! primary. Writers ([`Router::writer`]) have connections of their own, a
//! few per node taken in turn: a `WAIT` holds the connection it is sent on.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Cmd, Pipeline, RedisError, RedisFuture, RedisResult, Value};
use tokio::task::JoinSet;

use super::shards::{ClientFor, NodeId, Topology, node_of, slot};

/// Redirections one command may follow.
const REDIRECTS: usize = 3;

/// Connections per node for writers.
const WRITERS: usize = 8;

/// A handle on the cluster that routes commands; cheap to clone.
#[derive(Clone)]
pub struct Router {
    shared: Arc<Shared>,
    writer: bool,
}

struct Shared {
    seeds: Vec<redis::Client>,
    client_for: ClientFor,
    reading: AsyncConnectionConfig,
    writing: AsyncConnectionConfig,
    timeout: Duration,
    write_timeout: Duration,
    state: Mutex<State>,
    refreshing: AtomicBool,
}

#[derive(Default)]
struct State {
    topology: Arc<Topology>,
    /// Slots `MOVED` answers placed since the topology was read.
    moved: HashMap<u16, NodeId>,
    nodes: HashMap<NodeId, Conns>,
    /// The node that gave the topology last: it answered then.
    answered: Option<NodeId>,
    /// Nodes whose connection failed, until one is made again.
    down: HashSet<NodeId>,
    /// Why no node gave the topology, the last time none did.
    failure: Option<String>,
}

/// One node's connections.
struct Conns {
    reader: Option<MultiplexedConnection>,
    /// [`WRITERS`] of them, each made when its turn first comes.
    writers: Vec<Option<MultiplexedConnection>>,
    next: usize,
}

impl Default for Conns {
    fn default() -> Self {
        Conns {
            reader: None,
            writers: vec![None; WRITERS],
            next: 0,
        }
    }
}

/// Where a command goes.
enum Target {
    Slot(u16),
    Any,
    EveryPrimary,
}

impl Router {
    /// A router over the cluster found through `seeds` (RESP2 clients, logged
    /// in), reaching other nodes with `client_for`. Commands time out after
    /// `timeout`, writers' after `write_timeout` (they carry `WAIT`s).
    pub fn new(
        seeds: Vec<redis::Client>,
        client_for: ClientFor,
        timeout: Duration,
        write_timeout: Duration,
    ) -> Self {
        let config = |response| {
            AsyncConnectionConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(response))
        };
        Router {
            shared: Arc::new(Shared {
                seeds,
                client_for,
                reading: config(timeout),
                writing: config(write_timeout),
                timeout,
                write_timeout,
                state: Mutex::new(State::default()),
                refreshing: AtomicBool::new(false),
            }),
            writer: false,
        }
    }

    /// The same cluster, through the writers' connections.
    pub fn writer(&self) -> Router {
        Router {
            shared: self.shared.clone(),
            writer: true,
        }
    }

    async fn run_cmd(&self, cmd: &Cmd) -> RedisResult<Value> {
        match target(cmd.args_iter()) {
            Target::EveryPrimary => self.on_every_primary(cmd).await,
            target => {
                let pipe = single(cmd);
                let mut values = self.run(target, &pipe, 0, 1).await?;
                values.pop().ok_or_else(no_reply)
            }
        }
    }

    /// Sends `pipeline` (its replies `offset..offset + count`) to the node
    /// of `target`, following redirections.
    async fn run(
        &self,
        target: Target,
        pipeline: &Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        let slot = match target {
            Target::Slot(slot) => Some(slot),
            _ => None,
        };
        let mut asking: Option<NodeId> = None;
        let mut redirects = 0;
        let started = tokio::time::Instant::now();
        let mut pause = Duration::from_millis(20);
        loop {
            let node = match asking.take() {
                Some(node) => Some((node, true)),
                None => self.node_for(slot).await?.map(|node| (node, false)),
            };
            let Some((node, ask)) = node else {
                let failure = lock(&self.shared.state).failure.clone();
                return Err(unknown_owner(slot, failure));
            };
            let reply = tokio::time::timeout(self.patience(), async {
                let mut conn = self.connection(&node).await?;
                if ask {
                    let mut asked = redis::pipe();
                    asked.cmd("ASKING").ignore();
                    for cmd in pipeline.cmd_iter() {
                        asked.add_command(cmd.clone());
                    }
                    conn.req_packed_commands(&asked, offset + 1, count).await
                } else {
                    conn.req_packed_commands(pipeline, offset, count).await
                }
            })
            .await
            .unwrap_or_else(|_| Err(no_answer(&node)));
            let values = match reply {
                Ok(values) => values,
                Err(e) => {
                    if lost(&e) {
                        self.forget(&node);
                    }
                    return Err(e);
                }
            };
            match redirect(&values) {
                Some(Redirect::Moved(slot, to)) => {
                    self.moved(slot, to);
                }
                Some(Redirect::Ask(to)) => asking = Some(to),
                Some(Redirect::Later) if started.elapsed() + pause < self.shared.timeout => {
                    // A failover or a migration under way: it ends soon.
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                    self.refresh_soon();
                    continue;
                }
                Some(Redirect::Later) | None => return Ok(values),
            }
            redirects += 1;
            if redirects > REDIRECTS {
                return Err(RedisError::from((
                    redis::ErrorKind::Client,
                    "too many cluster redirections",
                )));
            }
        }
    }

    /// How long a node may take to answer: nine tenths of the command
    /// timeout (the writers': theirs), so that the router, and not a caller
    /// bounding the same command by the same timeout, sees a node that
    /// stopped answering: it drops the node's connections, sends commands
    /// that have no slot elsewhere, and reads the topology again.
    fn patience(&self) -> Duration {
        let timeout = if self.writer {
            self.shared.write_timeout
        } else {
            self.shared.timeout
        };
        timeout * 9 / 10
    }

    /// `SCRIPT LOAD` and the like: on every primary known (those `MOVED`
    /// named too), all at once, each given as long as any command; once
    /// all have answered (the command that needs the script may go to any
    /// of them next), the first success, or else an error.
    async fn on_every_primary(&self, cmd: &Cmd) -> RedisResult<Value> {
        if self.topology().nodes().is_empty() {
            self.read_topology().await;
        }
        let nodes: BTreeSet<NodeId> = {
            let state = lock(&self.shared.state);
            let mut nodes: BTreeSet<NodeId> = state.topology.nodes().into_iter().cloned().collect();
            nodes.extend(state.moved.values().cloned());
            nodes
        };
        let mut tasks = JoinSet::new();
        for node in nodes {
            let (router, cmd) = (self.clone(), cmd.clone());
            tasks.spawn(async move {
                let sent = async {
                    let mut conn = router.connection(&node).await?;
                    conn.req_packed_command(&cmd).await
                };
                let result = tokio::time::timeout(router.patience(), sent)
                    .await
                    .unwrap_or_else(|_| Err(no_answer(&node)));
                if result.as_ref().is_err_and(lost) {
                    router.forget(&node);
                }
                result.and_then(Value::extract_error)
            });
        }
        let mut outcome = None;
        while let Some(joined) = tasks.join_next().await {
            match (joined, &outcome) {
                (Ok(Ok(value)), None | Some(Err(_))) => outcome = Some(Ok(value)),
                (Ok(Err(e)), None) => outcome = Some(Err(e)),
                _ => {}
            }
        }
        outcome.unwrap_or_else(|| Err(unknown_owner(None, None)))
    }

    /// The primary `slot`'s commands go to now, if the router knows one.
    pub(super) fn owner(&self, slot: u16) -> Option<NodeId> {
        self.known_node(Some(slot))
    }

    fn topology(&self) -> Arc<Topology> {
        lock(&self.shared.state).topology.clone()
    }

    /// The primary that owns `slot` (any primary for none), reading the
    /// topology first if it names none.
    async fn node_for(&self, slot: Option<u16>) -> RedisResult<Option<NodeId>> {
        if let Some(node) = self.known_node(slot) {
            return Ok(Some(node));
        }
        self.read_topology().await;
        Ok(self.known_node(slot))
    }

    fn known_node(&self, slot: Option<u16>) -> Option<NodeId> {
        let state = lock(&self.shared.state);
        match slot {
            Some(slot) => state
                .moved
                .get(&slot)
                .or_else(|| state.topology.owner(slot))
                .cloned(),
            // A command for no slot in particular (PING, of the status
            // check) goes to a node that answers: not one found down.
            None => {
                let nodes = state.topology.nodes();
                let up = |node: &&NodeId| !state.down.contains(*node);
                state
                    .answered
                    .as_ref()
                    .filter(|node| up(node) && nodes.contains(node))
                    .or_else(|| nodes.iter().copied().find(up))
                    .or_else(|| nodes.first().copied())
                    .cloned()
            }
        }
    }

    /// A connection to `node`, made if there is none.
    async fn connection(&self, node: &NodeId) -> RedisResult<MultiplexedConnection> {
        let turn = {
            let mut state = lock(&self.shared.state);
            let conns = state.nodes.entry(node.clone()).or_default();
            if self.writer {
                conns.next = (conns.next + 1) % WRITERS;
                if let Some(conn) = &conns.writers[conns.next] {
                    return Ok(conn.clone());
                }
                Some(conns.next)
            } else {
                if let Some(conn) = &conns.reader {
                    return Ok(conn.clone());
                }
                None
            }
        };
        let config = if self.writer {
            &self.shared.writing
        } else {
            &self.shared.reading
        };
        let made = self
            .client(node)?
            .get_multiplexed_async_connection_with_config(config)
            .await
            .inspect_err(|_| self.forget(node))?;
        let mut state = lock(&self.shared.state);
        state.down.remove(node);
        let conns = state.nodes.entry(node.clone()).or_default();
        match turn {
            Some(turn) => conns.writers[turn] = Some(made.clone()),
            None => conns.reader = Some(made.clone()),
        }
        Ok(made)
    }

    fn client(&self, node: &NodeId) -> RedisResult<redis::Client> {
        if let Some(seed) = self
            .shared
            .seeds
            .iter()
            .find(|seed| node_of(seed).as_ref() == Some(node))
        {
            return Ok(seed.clone());
        }
        match node {
            NodeId::At { host, port } => (self.shared.client_for)(host, *port),
            NodeId::Single => Err(unknown_owner(None, None)),
        }
    }

    /// Drops `node`'s connections after a failure: the next command makes
    /// new ones; and reads the topology again (a failover?).
    fn forget(&self, node: &NodeId) {
        let mut state = lock(&self.shared.state);
        state.nodes.remove(node);
        state.down.insert(node.clone());
        drop(state);
        self.refresh_soon();
    }

    /// A `MOVED` answer: `slot` is on `node` now.
    fn moved(&self, slot: u16, node: NodeId) {
        lock(&self.shared.state).moved.insert(slot, node);
        self.refresh_soon();
    }

    /// Reads the topology again in the background, unless that is under
    /// way already.
    fn refresh_soon(&self) {
        if self.shared.refreshing.swap(true, Ordering::SeqCst) {
            return;
        }
        let router = self.clone();
        tokio::spawn(async move {
            router.read_topology().await;
            router.shared.refreshing.store(false, Ordering::SeqCst);
        });
    }

    /// Asks the seeds and the nodes last known for the slots, all at once
    /// (a node that does not answer must not hold the others up): the
    /// first answer becomes the topology. Commands that find no topology
    /// call it themselves (several may, at start).
    async fn read_topology(&self) {
        let mut candidates: BTreeSet<NodeId> =
            self.shared.seeds.iter().filter_map(node_of).collect();
        candidates.extend(self.topology().nodes().into_iter().cloned());
        let mut asking = JoinSet::new();
        for node in candidates {
            let Ok(client) = self.client(&node) else {
                continue;
            };
            let (config, timeout) = (self.shared.reading.clone(), self.shared.timeout);
            asking.spawn(async move {
                let asked = async {
                    let mut conn = client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?;
                    redis::cmd("CLUSTER")
                        .arg("SLOTS")
                        .query_async::<Value>(&mut conn)
                        .await
                };
                match tokio::time::timeout(timeout, asked).await {
                    Ok(Ok(reply)) => Topology::parse(reply, &node)
                        .map(|topology| (node.clone(), topology))
                        .map_err(|e| format!("{node}: {e}")),
                    Ok(Err(e)) => Err(format!("{node}: {e}")),
                    Err(_) => Err(format!("{node}: no answer")),
                }
            });
        }
        let mut failures = Vec::new();
        while let Some(answer) = asking.join_next().await {
            match answer {
                Ok(Ok((node, topology))) => {
                    let mut state = lock(&self.shared.state);
                    state.topology = Arc::new(topology);
                    state.moved.clear();
                    state.answered = Some(node);
                    state.failure = None;
                    return;
                }
                Ok(Err(failure)) => failures.push(failure),
                Err(_) => {}
            }
        }
        failures.sort();
        let failure = failures.join("; ");
        tracing::debug!("no Redis Cluster node gave its slots: {failure}");
        lock(&self.shared.state).failure = Some(failure);
    }
}

impl ConnectionLike for Router {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(self.run_cmd(cmd))
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        let target = pipeline
            .cmd_iter()
            .map(|cmd| target(cmd.args_iter()))
            .find(|target| matches!(target, Target::Slot(_)))
            .unwrap_or(Target::Any);
        Box::pin(self.run(target, pipeline, offset, count))
    }

    fn get_db(&self) -> i64 {
        0
    }
}

/// Where a command goes: the slot of its first key. Only the commands the
/// daemons send are known: scripts (`EVAL`, `EVALSHA`: the first of their
/// keys), keyless ones (`PING`, `WAIT`, `TIME`...), and those whose first
/// argument is their key.
fn target<'a>(mut args: impl Iterator<Item = redis::Arg<&'a [u8]>>) -> Target {
    let mut next = || match args.next() {
        Some(redis::Arg::Simple(bytes)) => Some(bytes),
        _ => None,
    };
    let Some(name) = next() else {
        return Target::Any;
    };
    let name = name.to_ascii_uppercase();
    let key = match name.as_slice() {
        b"SCRIPT" => return Target::EveryPrimary,
        b"PING" | b"WAIT" | b"TIME" | b"CLUSTER" | b"ASKING" | b"ROLE" | b"INFO" => {
            return Target::Any;
        }
        b"EVAL" | b"EVALSHA" => {
            let _script = next();
            match next() {
                Some(b"0") | None => return Target::Any,
                Some(_) => next(),
            }
        }
        _ => next(),
    };
    match key.and_then(|key| std::str::from_utf8(key).ok()) {
        Some(key) => Target::Slot(slot(key)),
        None => Target::Any,
    }
}

/// A pipeline of one command, sent as the command alone.
fn single(cmd: &Cmd) -> Pipeline {
    let mut pipe = redis::pipe();
    pipe.add_command(cmd.clone());
    pipe
}

enum Redirect {
    Moved(u16, NodeId),
    Ask(NodeId),
    /// `CLUSTERDOWN` (a primary failed, its replica not yet promoted) or
    /// `TRYAGAIN` (a slot's keys half migrated): the same, a moment later.
    Later,
}

/// The first redirection among `values`: `MOVED <slot> <host>:<port>`,
/// `ASK <slot> <host>:<port>`, or an answer to try again later.
fn redirect(values: &[Value]) -> Option<Redirect> {
    values.iter().find_map(|value| {
        let Value::ServerError(error) = value else {
            return None;
        };
        let code = error.code();
        if code == "CLUSTERDOWN" || code == "TRYAGAIN" {
            return Some(Redirect::Later);
        }
        if code != "MOVED" && code != "ASK" {
            return None;
        }
        let mut details = error.details()?.split(' ');
        let slot: u16 = details.next()?.parse().ok()?;
        let (host, port) = details.next()?.rsplit_once(':')?;
        let node = NodeId::At {
            host: host.to_owned(),
            port: port.parse().ok()?,
        };
        Some(match code {
            "MOVED" => Redirect::Moved(slot, node),
            _ => Redirect::Ask(node),
        })
    })
}

/// Whether `e` says the connection is gone or stuck.
pub(super) fn lost(e: &RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal()
}

/// No node is known for `slot` (or at all); `failure` says why the
/// topology could not be read, if it could not.
fn unknown_owner(slot: Option<u16>, failure: Option<String>) -> RedisError {
    let mut detail = match slot {
        Some(slot) => format!("no node of the cluster is known to own slot {slot}"),
        None => "no node of the cluster answers".to_owned(),
    };
    if let Some(failure) = failure {
        detail = format!("{detail} (asked for the slots: {failure})");
    }
    RedisError::from((redis::ErrorKind::Io, "cluster", detail))
}

fn no_answer(node: &NodeId) -> RedisError {
    let error = std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("Redis Cluster node {node} did not answer in time"),
    );
    RedisError::from(error)
}

fn no_reply() -> RedisError {
    RedisError::from((redis::ErrorKind::Client, "no reply"))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target_of(cmd: &Cmd) -> Option<u16> {
        match target(cmd.args_iter()) {
            Target::Slot(slot) => Some(slot),
            _ => None,
        }
    }

    #[test]
    fn commands_go_to_the_slot_of_their_first_key() {
        let key = "chat:{p17}:room:lobby";
        assert_eq!(
            target_of(redis::cmd("XRANGE").arg(key).arg("-")),
            Some(slot(key))
        );
        assert_eq!(
            target_of(
                redis::cmd("EVALSHA")
                    .arg("abc")
                    .arg(2)
                    .arg(key)
                    .arg("other")
            ),
            Some(slot(key))
        );
        assert_eq!(
            target_of(redis::cmd("EVALSHA").arg("abc").arg(0).arg("x")),
            None
        );
        assert_eq!(target_of(&redis::cmd("PING")), None);
        assert_eq!(target_of(redis::cmd("WAIT").arg(1).arg(100)), None);
        assert!(matches!(
            target(redis::cmd("SCRIPT").arg("LOAD").arg("return 1").args_iter()),
            Target::EveryPrimary
        ));
    }
}
