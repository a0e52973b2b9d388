//! A Redis Cluster as processes on this host: six `redis-server`s on
//! loopback, made three primaries with a replica each by `redis-cli
//! --cluster create`. Each server listens on a port, and talks to the others
//! on a cluster bus port (`cluster-port`), both ports the kernel had free a
//! moment before; a server that cannot bind them exits, and is started again
//! on others. Every process is killed (by PID) when the cluster is dropped.
//!
//! A primary is taken for failed after `cluster-node-timeout` (two seconds
//! here), and its replica may then be promoted however long ago it last
//! heard from it (`cluster-replica-validity-factor 0`): a failover takes a
//! few seconds. Meanwhile the other primaries go on serving their slots
//! (`cluster-require-full-coverage no`), as the settings chat-redis ships
//! for a cluster node have them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{Process, free_port, wait_for};

/// How many servers: three primaries and their replicas.
pub const NODES: usize = 6;

/// How long the cluster may take to agree after a change.
const SETTLE: Duration = Duration::from_secs(30);

/// One `redis-server` of the cluster.
pub struct ClusterNode {
    pub port: u16,
    pub cluster_port: u16,
    /// Over TLS (clients, replication and the cluster bus): its TLS port.
    pub tls_port: Option<u16>,
    /// With TLS: the certificates (`common::certificates`).
    certs: Option<PathBuf>,
    /// Its cluster node id (`CLUSTER MYID`), which it keeps across restarts.
    pub id: String,
    dir: PathBuf,
    process: Option<Process>,
    /// Stopped with SIGSTOP: running, but answering nothing.
    frozen: bool,
    /// While frozen: connections that fill its accept queue, so that new
    /// ones are not even accepted.
    held: Vec<std::net::TcpStream>,
}

impl ClusterNode {
    /// The node's TLS address, when it has one.
    pub fn tls_url(&self) -> Option<String> {
        self.tls_port
            .map(|port| format!("rediss://127.0.0.1:{port}"))
    }

    /// The node's address for a RESP3 client, without a login.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/?protocol=resp3", self.port)
    }

    /// Whether the node runs and answers.
    pub fn is_running(&self) -> bool {
        self.process.is_some() && !self.frozen
    }

    /// Runs `cmd` on this node (over RESP2), failing the test on error.
    pub fn query<T: redis::FromRedisValue>(&self, cmd: &mut redis::Cmd) -> T {
        self.try_query(cmd)
            .unwrap_or_else(|e| panic!("node {}: {e}", self.port))
    }

    pub fn try_query<T: redis::FromRedisValue>(
        &self,
        cmd: &mut redis::Cmd,
    ) -> redis::RedisResult<T> {
        let url = format!("redis://127.0.0.1:{}", self.port);
        let mut conn =
            redis::Client::open(url)?.get_connection_with_timeout(Duration::from_secs(2))?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        cmd.query(&mut conn)
    }

    /// The ids of the clients with shard channels subscribed (`ssub` > 0).
    pub fn shard_subscribers(&self) -> Vec<String> {
        clients_where(self, |fields| {
            field(fields, "ssub").is_some_and(|n| n != "0")
        })
    }

    /// The ids of the RESP3 clients: only the subscriber's (the tests' own
    /// connections, `redis-cli` and the replication links speak RESP2).
    pub fn resp3_clients(&self) -> Vec<String> {
        clients_where(self, |fields| field(fields, "resp") == Some("3"))
    }

    /// Closes the clients of `ids`; returns how many it closed.
    pub fn kill_clients(&self, ids: &[String]) -> usize {
        ids.iter()
            .map(|id| self.query::<usize>(redis::cmd("CLIENT").arg("KILL").arg("ID").arg(id)))
            .sum()
    }

    /// `INFO errorstats`: the errors the node answered, counted by code.
    pub fn error_stats(&self) -> String {
        self.query(redis::cmd("INFO").arg("errorstats"))
    }

    /// The TLS options of a node over TLS: its TLS port, and TLS for the
    /// cluster bus and replication too, with the test CA's certificate.
    fn tls_options(&self) -> Vec<String> {
        let (Some(port), Some(certs)) = (self.tls_port, &self.certs) else {
            return Vec::new();
        };
        let mut options = super::tls_options(certs, port);
        options.extend(["--tls-cluster", "yes", "--tls-replication", "yes"].map(String::from));
        options
    }

    fn start(&mut self) {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .arg("--cluster-port")
            .arg(self.cluster_port.to_string())
            .args(["--cluster-enabled", "yes"])
            .args(["--cluster-node-timeout", "2000"])
            .args(["--cluster-replica-validity-factor", "0"])
            .args(["--cluster-require-full-coverage", "no"])
            // A short accept queue, which a frozen node's fills at once.
            .args(["--tcp-backlog", "16"])
            .args(self.tls_options())
            .args(["--cluster-config-file", "nodes.conf"])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--logfile", "redis.log"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (make deps-apt)");
        self.process = Some(Process {
            child,
            name: format!("redis-server on {}", self.port),
        });
    }

    /// Waits until the node answers PING; false if it exited first (its
    /// ports were taken meanwhile).
    fn wait_up(&mut self) -> bool {
        let what = format!("redis-server to answer on port {}", self.port);
        wait_for(&what, Duration::from_secs(10), || {
            let process = self.process.as_mut()?;
            if process.child.try_wait().unwrap().is_some() {
                return Some(false);
            }
            self.try_query::<String>(&mut redis::cmd("PING"))
                .ok()
                .map(|_| true)
        })
    }
}

/// The ids of `node`'s clients whose `CLIENT LIST` fields pass `keep`.
fn clients_where(node: &ClusterNode, keep: impl Fn(&[&str]) -> bool) -> Vec<String> {
    let list: String = node.query(redis::cmd("CLIENT").arg("LIST"));
    list.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            keep(&fields)
                .then(|| field(&fields, "id").map(str::to_owned))
                .flatten()
        })
        .collect()
}

/// The value of `name=value` among `fields`.
fn field<'a>(fields: &[&'a str], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
}

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone)]
pub struct NodeLine {
    pub id: String,
    pub port: u16,
    pub flags: Vec<String>,
    /// The primary's id, for a replica.
    pub primary: Option<String>,
    /// The slot ranges it owns (a primary), inclusive.
    pub slots: Vec<(u16, u16)>,
}

impl NodeLine {
    fn parse(line: &str) -> Option<NodeLine> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let id = words.first()?.to_string();
        // ip:port@cport[,hostname]
        let address = words.get(1)?.split('@').next()?;
        let port = address.rsplit(':').next()?.parse().ok()?;
        let flags = words.get(2)?.split(',').map(str::to_owned).collect();
        let primary = words.get(3).filter(|p| **p != "-").map(|p| p.to_string());
        // The slots follow the eight fields before them (id to link state).
        let slots = words
            .get(8..)
            .unwrap_or_default()
            .iter()
            // [slot->-id] and [slot-<-id]: a migration under way.
            .filter(|w| !w.starts_with('['))
            .filter_map(|w| match w.split_once('-') {
                Some((first, last)) => Some((first.parse().ok()?, last.parse().ok()?)),
                None => w.parse().ok().map(|slot| (slot, slot)),
            })
            .collect();
        Some(NodeLine {
            id,
            port,
            flags,
            primary,
            slots,
        })
    }

    fn has_flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }

    /// A primary not taken for failed.
    pub fn is_live_primary(&self) -> bool {
        self.has_flag("master") && !self.has_flag("fail") && !self.has_flag("fail?")
    }

    pub fn owns(&self, slot: u16) -> bool {
        self.slots
            .iter()
            .any(|(first, last)| (*first..=*last).contains(&slot))
    }
}

/// Six servers made a cluster, stopped when dropped.
pub struct Cluster {
    dir: tempfile::TempDir,
    pub nodes: Vec<ClusterNode>,
}

impl Cluster {
    /// Starts six servers, makes them a cluster of three primaries with a
    /// replica each, and waits until every node finds it healthy.
    pub fn start() -> Cluster {
        Self::start_with(None)
    }

    /// The same over TLS as well (clients, replication and the cluster
    /// bus), with the certificates in `certs` (`common::certificates`).
    pub fn start_tls(certs: &Path) -> Cluster {
        Self::start_with(Some(certs))
    }

    fn start_with(certs: Option<&Path>) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let nodes = (0..NODES)
            .map(|index| start_node(dir.path(), index, certs))
            .collect();
        let cluster = Cluster { dir, nodes };
        let addresses: Vec<String> = cluster
            .nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port))
            .collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli must be installed");
        assert!(
            created.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&created.stdout),
            String::from_utf8_lossy(&created.stderr)
        );
        cluster.wait_healthy();
        assert_eq!(cluster.primaries().len(), 3, "three primaries");
        cluster
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The index of the node with `id`.
    pub fn index_of(&self, id: &str) -> usize {
        self.nodes
            .iter()
            .position(|node| node.id == id)
            .unwrap_or_else(|| panic!("no node {id}"))
    }

    /// What the running node `index` says of the cluster (`CLUSTER NODES`).
    pub fn view(&self, index: usize) -> Option<Vec<NodeLine>> {
        let text: String = self.nodes[index]
            .try_query(redis::cmd("CLUSTER").arg("NODES"))
            .ok()?;
        text.lines().map(NodeLine::parse).collect()
    }

    /// The views of every running node; `None` if one does not answer.
    fn views(&self) -> Option<Vec<Vec<NodeLine>>> {
        self.running().map(|index| self.view(index)).collect()
    }

    /// The indexes of the running nodes.
    pub fn running(&self) -> impl Iterator<Item = usize> + '_ {
        (0..NODES).filter(|index| self.nodes[*index].is_running())
    }

    /// The first running node's view.
    fn any_view(&self) -> Vec<NodeLine> {
        self.running()
            .find_map(|index| self.view(index))
            .expect("a running node answers CLUSTER NODES")
    }

    /// The indexes of the primaries owning slots, as a running node sees them.
    pub fn primaries(&self) -> Vec<usize> {
        self.any_view()
            .iter()
            .filter(|line| line.is_live_primary() && !line.slots.is_empty())
            .map(|line| self.index_of(&line.id))
            .collect()
    }

    /// The index of the node owning `slot`, as a running node sees it.
    pub fn owner(&self, slot: u16) -> usize {
        let view = self.any_view();
        let line = view
            .iter()
            .find(|line| line.has_flag("master") && line.owns(slot))
            .unwrap_or_else(|| panic!("no node owns slot {slot}: {view:#?}"));
        self.index_of(&line.id)
    }

    /// The index of `primary`'s replica.
    pub fn replica_of(&self, primary: usize) -> usize {
        let id = &self.nodes[primary].id;
        let view = self.any_view();
        let line = view
            .iter()
            .find(|line| line.primary.as_ref() == Some(id))
            .unwrap_or_else(|| panic!("node {primary} has no replica: {view:#?}"));
        self.index_of(&line.id)
    }

    /// The slot of `key`, as the cluster computes it (`CLUSTER KEYSLOT`).
    pub fn key_slot(&self, key: &str) -> u16 {
        let index = self.running().next().expect("a running node");
        self.nodes[index].query(redis::cmd("CLUSTER").arg("KEYSLOT").arg(key))
    }

    /// The slots each of the running primaries owns, by node index.
    pub fn slots_of(&self, index: usize) -> Vec<(u16, u16)> {
        let id = &self.nodes[index].id;
        self.any_view()
            .into_iter()
            .find(|line| &line.id == id)
            .map(|line| line.slots)
            .unwrap_or_default()
    }

    /// Waits until every running node says the cluster is ok, with all
    /// slots served, and they all agree on which node owns which slots;
    /// and until each running replica is linked to its primary.
    pub fn wait_healthy(&self) {
        wait_for("the Redis Cluster to be healthy", SETTLE, || {
            for index in self.running() {
                let node = &self.nodes[index];
                let info: String = node.try_query(redis::cmd("CLUSTER").arg("INFO")).ok()?;
                let ok = info.contains("cluster_state:ok")
                    && info.contains("cluster_slots_assigned:16384")
                    && info.contains("cluster_slots_ok:16384");
                if !ok {
                    return None;
                }
                let replication: String =
                    node.try_query(redis::cmd("INFO").arg("replication")).ok()?;
                if replication.contains("role:slave")
                    && !replication.contains("master_link_status:up")
                {
                    return None;
                }
            }
            self.agreed_owners()
        });
    }

    /// Which node owns each slot range, if every running node says the same.
    fn agreed_owners(&self) -> Option<()> {
        let views = self.views()?;
        let owners = |view: &Vec<NodeLine>| -> BTreeSet<(String, Vec<(u16, u16)>)> {
            view.iter()
                .filter(|line| line.has_flag("master") && !line.slots.is_empty())
                .map(|line| (line.id.clone(), line.slots.clone()))
                .collect()
        };
        let first = owners(views.first()?);
        views.iter().all(|view| owners(view) == first).then_some(())
    }

    /// Waits until every running node says node `index` owns `slot`.
    pub fn wait_owner(&self, slot: u16, index: usize) {
        let id = &self.nodes[index].id;
        let what = format!("every node to say node {index} owns slot {slot}");
        wait_for(&what, SETTLE, || {
            let views = self.views()?;
            views
                .iter()
                .all(|view| {
                    view.iter()
                        .any(|line| &line.id == id && line.has_flag("master") && line.owns(slot))
                })
                .then_some(())
        });
    }

    /// Waits until every running node says `replica` replicates `primary`.
    pub fn wait_replica(&self, replica: usize, primary: usize) {
        let (replica_id, primary_id) = (&self.nodes[replica].id, &self.nodes[primary].id);
        let what = format!("every node to say node {replica} replicates node {primary}");
        wait_for(&what, SETTLE, || {
            let views = self.views()?;
            views
                .iter()
                .all(|view| {
                    view.iter().any(|line| {
                        &line.id == replica_id && line.primary.as_ref() == Some(primary_id)
                    })
                })
                .then_some(())
        });
    }

    /// Kills node `index` at once (SIGKILL), as a crashed host would stop.
    pub fn kill(&mut self, index: usize) {
        let mut process = self.nodes[index].process.take().expect("a running node");
        process.signal(9);
        process.wait(Duration::from_secs(10));
    }

    /// Freezes node `index` (SIGSTOP), as a host that lost power or its
    /// network stops answering: its connections stay open, whatever is sent
    /// on them waits for an answer that does not come, and so does a new
    /// connection.
    pub fn freeze(&mut self, index: usize) {
        let node = &mut self.nodes[index];
        node.process.as_ref().expect("a running node").signal(19);
        node.frozen = true;
        // Connect until the kernel accepts no more for it: from then on a
        // new connection is not refused, it waits, as one to a host that
        // lost power does.
        let address = std::net::SocketAddr::from(([127, 0, 0, 1], node.port));
        for _ in 0..1000 {
            match std::net::TcpStream::connect_timeout(&address, Duration::from_millis(200)) {
                Ok(stream) => node.held.push(stream),
                Err(_) => return,
            }
        }
        panic!("node {index} accepts connections while frozen");
    }

    /// Lets a frozen node go on (SIGCONT), as the host coming back: it
    /// finds it was failed over, and becomes the new primary's replica.
    pub fn thaw(&mut self, index: usize) {
        let node = &mut self.nodes[index];
        node.process.as_ref().expect("a frozen node").signal(18);
        node.frozen = false;
        node.held.clear();
    }

    /// Starts node `index` again, on its ports and with its data: it keeps
    /// its id, and rejoins the cluster.
    pub fn restart(&mut self, index: usize) {
        let node = &mut self.nodes[index];
        assert!(!node.is_running(), "node {index} is running");
        node.start();
        assert!(
            node.wait_up(),
            "node {index} could not start again on its ports"
        );
    }

    /// Moves `slot`, and its keys, from its owner to the primary `to`, as
    /// `redis-cli --cluster reshard` does: the target imports, the source
    /// migrates, the keys go over in batches, then every primary is told
    /// the new owner (the target first, so that it claims the slot).
    /// Returns once every running node agrees.
    pub fn migrate_slot(&self, slot: u16, to: usize) {
        let from = self.owner(slot);
        assert_ne!(from, to, "slot {slot} is on node {to} already");
        let (source, target) = (&self.nodes[from], &self.nodes[to]);
        let setslot = |node: &ClusterNode, state: &str, id: &str| {
            let _: () = node.query(
                redis::cmd("CLUSTER")
                    .arg("SETSLOT")
                    .arg(slot)
                    .arg(state)
                    .arg(id),
            );
        };
        setslot(target, "IMPORTING", &source.id);
        setslot(source, "MIGRATING", &target.id);
        loop {
            let keys: Vec<String> = source.query(
                redis::cmd("CLUSTER")
                    .arg("GETKEYSINSLOT")
                    .arg(slot)
                    .arg(100),
            );
            if keys.is_empty() {
                break;
            }
            let _: () = source.query(
                redis::cmd("MIGRATE")
                    .arg("127.0.0.1")
                    .arg(target.port)
                    .arg("")
                    .arg(0)
                    .arg(5000)
                    .arg("KEYS")
                    .arg(&keys),
            );
        }
        setslot(target, "NODE", &target.id);
        setslot(source, "NODE", &target.id);
        for other in self.primaries() {
            if other != from && other != to {
                setslot(&self.nodes[other], "NODE", &target.id);
            }
        }
        self.wait_owner(slot, to);
    }

    /// Publishes `payload` on the shard channel `channel` at the node
    /// owning its slot, following a `MOVED` answer if the view asked was
    /// stale. Returns how many subscribers of that node received it.
    pub fn spublish(&self, channel: &str, payload: &str) -> i64 {
        let mut index = self.owner(self.key_slot(channel));
        for _ in 0..5 {
            let result: redis::RedisResult<i64> =
                self.nodes[index].try_query(redis::cmd("SPUBLISH").arg(channel).arg(payload));
            match result {
                Ok(receivers) => return receivers,
                Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::Moved) => {
                    let port: u16 = e
                        .redirect_node()
                        .and_then(|(address, _)| address.rsplit(':').next()?.parse().ok())
                        .unwrap_or_else(|| panic!("MOVED without an address: {e}"));
                    index = self
                        .nodes
                        .iter()
                        .position(|node| node.port == port)
                        .unwrap_or_else(|| panic!("MOVED to an unknown node: {e}"));
                }
                Err(e) => panic!("SPUBLISH {channel} on node {index}: {e}"),
            }
        }
        panic!("SPUBLISH {channel}: redirected too often");
    }

    /// A RESP3 client for each node, as seeds.
    pub fn seeds(&self) -> Vec<redis::Client> {
        self.nodes
            .iter()
            .map(|node| redis::Client::open(node.url()).unwrap())
            .collect()
    }
}

/// Starts the server `index` in its directory under `root`, on ports that
/// were free, again on others if it exits before it answers; waits until it
/// answers, and learns its id.
fn start_node(root: &Path, index: usize, certs: Option<&Path>) -> ClusterNode {
    let dir = root.join(format!("node{index}"));
    std::fs::create_dir_all(&dir).unwrap();
    for _ in 0..5 {
        let port = free_port();
        let cluster_port = free_port();
        if cluster_port == port {
            continue;
        }
        let mut node = ClusterNode {
            port,
            cluster_port,
            tls_port: certs.map(|_| free_port()),
            certs: certs.map(Path::to_path_buf),
            id: String::new(),
            dir: dir.clone(),
            process: None,
            frozen: false,
            held: Vec::new(),
        };
        node.start();
        if node.wait_up() {
            node.id = node.query(redis::cmd("CLUSTER").arg("MYID"));
            return node;
        }
        // Its config file may hold a half-made identity: start afresh.
        let _ = std::fs::remove_file(dir.join("nodes.conf"));
    }
    panic!("redis-server {index} could not start on any of 5 pairs of free ports");
}
