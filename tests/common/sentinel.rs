//! A replicated Redis watched by Sentinels, as processes on this host: a
//! primary, two replicas and three Sentinels, on TCP ports of loopback
//! (Sentinels name servers by host and port, so no unix sockets here). Each
//! port is one the kernel had free a moment before; a server that cannot
//! bind it exits, and is started again on another.
//!
//! The servers run with the project's shipped settings
//! (`etc/redis/chat-ha-sentinel-replica.conf`), the Sentinels with its
//! example configuration (`etc/redis/sentinel-chat-ha.conf.example`), made
//! faster: a primary is taken for down after one second.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{Process, free_port, wait_for};

/// The master name of the example configuration.
pub const MASTER: &str = "chat-ha";

fn repository(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// One `redis-server`, primary or replica, or a Sentinel.
pub struct Node {
    pub port: u16,
    pub process: Process,
}

impl Node {
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).unwrap()
    }

    /// Runs `cmd` on this node, failing the test on error.
    pub fn query<T: redis::FromRedisValue>(&self, cmd: &mut redis::Cmd) -> T {
        self.try_query(cmd).unwrap()
    }

    pub fn try_query<T: redis::FromRedisValue>(
        &self,
        cmd: &mut redis::Cmd,
    ) -> redis::RedisResult<T> {
        let mut conn = self
            .client()
            .get_connection_with_timeout(Duration::from_secs(2))?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        cmd.query(&mut conn)
    }
}

/// A primary, two replicas and three Sentinels, stopped when dropped.
pub struct SentinelSet {
    dir: tempfile::TempDir,
    /// Index 0 is the primary at the start.
    pub servers: Vec<Node>,
    pub sentinels: Vec<Node>,
}

impl SentinelSet {
    pub fn start() -> SentinelSet {
        SentinelSet::start_with("")
    }

    /// Starts the set with `server_lines` more in each server's
    /// configuration (ACL users, say).
    pub fn start_with(server_lines: &str) -> SentinelSet {
        let dir = tempfile::tempdir().unwrap();
        let primary = start_server(dir.path(), "server0", None, server_lines);
        let replicas: Vec<Node> = (1..3)
            .map(|i| {
                let name = format!("server{i}");
                start_server(dir.path(), &name, Some(primary.port), server_lines)
            })
            .collect();
        let mut servers = vec![primary];
        servers.extend(replicas);
        wait_for("both replicas online", Duration::from_secs(20), || {
            let info: String = servers[0].query(redis::cmd("INFO").arg("replication"));
            (info.matches("state=online").count() == 2).then_some(())
        });
        let sentinels: Vec<Node> = (0..3)
            .map(|i| start_sentinel(dir.path(), i, servers[0].port))
            .collect();
        let set = SentinelSet {
            dir,
            servers,
            sentinels,
        };
        set.wait_until_sentinels_know_everyone();
        set
    }

    /// Waits until each Sentinel knows both replicas and both other Sentinels:
    /// only then can they agree on a failover.
    pub fn wait_until_sentinels_know_everyone(&self) {
        for sentinel in &self.sentinels {
            wait_for(
                "Sentinels to know each other",
                Duration::from_secs(30),
                || {
                    let others: Vec<redis::Value> = sentinel
                        .try_query(redis::cmd("SENTINEL").arg("SENTINELS").arg(MASTER))
                        .ok()?;
                    let replicas: Vec<redis::Value> = sentinel
                        .try_query(redis::cmd("SENTINEL").arg("REPLICAS").arg(MASTER))
                        .ok()?;
                    (others.len() == 2 && replicas.len() == 2).then_some(())
                },
            );
        }
    }

    /// The `[redis]` keys of chat-ha.toml for this set, a dead Sentinel first
    /// so that the daemons must try the next.
    pub fn redis_keys(&self, extra: &str) -> String {
        let mut urls = vec![format!("\"redis://127.0.0.1:{}\"", free_port())];
        urls.extend(self.sentinels.iter().map(|s| format!("\"{}\"", s.url())));
        format!(
            "[redis]\nsentinels = [{}]\nsentinel_master = \"{MASTER}\"\n\
             command_timeout_ms = 1000\nreconnect_min_ms = 50\nreconnect_max_ms = 500\n{extra}",
            urls.join(", ")
        )
    }

    /// Writes a daemons' configuration using this set; `redis_extra` goes in
    /// `[redis]`.
    pub fn write_config(&self, dir: &Path, redis_extra: &str) -> PathBuf {
        let path = dir.join("chat-ha.toml");
        let www = repository("share/www");
        let text = format!(
            "{}\n[frontend]\nwww_dir = \"{}\"\n",
            self.redis_keys(redis_extra),
            www.display()
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    /// A Redis of its own and a Sentinel that names it the primary under
    /// the same master name: what a daemon sees of a primary cut off with
    /// the Sentinel on its host, after the others promoted a replica (that
    /// primary still says `master` to `ROLE`). Stopped when dropped.
    pub fn start_cut_off_pair(&self) -> (Node, Node) {
        let server = start_server(self.dir.path(), "cut-off", None, "");
        let sentinel = start_sentinel(self.dir.path(), 9, server.port);
        (server, sentinel)
    }

    /// The port of the server the Sentinels name as the primary now.
    pub fn primary_port(&self) -> Option<u16> {
        self.sentinels.iter().find_map(|sentinel| {
            let reply: Option<(String, u16)> = sentinel
                .try_query(
                    redis::cmd("SENTINEL")
                        .arg("GET-MASTER-ADDR-BY-NAME")
                        .arg(MASTER),
                )
                .ok()?;
            reply.map(|(_, port)| port)
        })
    }

    /// The server listening on `port`.
    pub fn server(&self, port: u16) -> &Node {
        self.servers.iter().find(|s| s.port == port).unwrap()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// Starts `redis-server` with the shipped replication settings, as a
/// replica of `primary` when given, and `extra` configuration lines, on a
/// free port.
fn start_server(dir: &Path, name: &str, primary: Option<u16>, extra: &str) -> Node {
    start_on_free_port(name, |port| {
        let data = dir.join(name);
        std::fs::create_dir_all(&data).unwrap();
        let conf = data.join("redis.conf");
        let mut text = format!(
            "include {}\nport {port}\nbind 127.0.0.1\ndir {}\nsave \"\"\n\
             appendfsync always\n",
            repository("etc/redis/chat-ha-sentinel-replica.conf").display(),
            data.display()
        );
        if let Some(primary) = primary {
            text.push_str(&format!("replicaof 127.0.0.1 {primary}\n"));
        }
        text.push_str(extra);
        std::fs::write(&conf, text).unwrap();
        let mut command = Command::new("redis-server");
        command.arg(conf);
        command
    })
}

/// Starts a Sentinel with the example configuration, watching the primary
/// on `primary`, made fast for tests.
fn start_sentinel(dir: &Path, index: usize, primary: u16) -> Node {
    let example =
        std::fs::read_to_string(repository("etc/redis/sentinel-chat-ha.conf.example")).unwrap();
    start_on_free_port(&format!("sentinel{index}"), |port| {
        let text: String = example
            .lines()
            .map(|line| match line {
                "port 26379" => format!("port {port}\nbind 127.0.0.1"),
                l if l.starts_with("sentinel monitor chat-ha ") => {
                    format!("sentinel monitor chat-ha 127.0.0.1 {primary} 2")
                }
                l if l.starts_with("sentinel down-after-milliseconds ") => {
                    "sentinel down-after-milliseconds chat-ha 1000".into()
                }
                l if l.starts_with("sentinel failover-timeout ") => {
                    "sentinel failover-timeout chat-ha 4000".into()
                }
                l => l.to_owned(),
            })
            .map(|line| line + "\n")
            .collect();
        assert!(text.contains(&format!("127.0.0.1 {primary} 2")), "{text}");
        let conf = dir.join(format!("sentinel{index}.conf"));
        std::fs::write(&conf, text).unwrap();
        let mut command = Command::new("redis-server");
        command.arg(conf).arg("--sentinel");
        command
    })
}

/// Starts the command `make(port)` builds on a port that was free, again
/// on another if the process exits before it answers PING there.
fn start_on_free_port(name: &str, make: impl Fn(u16) -> Command) -> Node {
    for _ in 0..5 {
        let port = free_port();
        let child = make(port)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed");
        let mut process = Process {
            child,
            name: name.to_owned(),
        };
        let node_url = format!("redis://127.0.0.1:{port}");
        let started = wait_for(
            &format!("{name} to answer on port {port}"),
            Duration::from_secs(10),
            || {
                if process.child.try_wait().unwrap().is_some() {
                    return Some(false);
                }
                let client = redis::Client::open(node_url.as_str()).ok()?;
                let mut conn = client
                    .get_connection_with_timeout(Duration::from_millis(200))
                    .ok()?;
                redis::cmd("PING")
                    .query::<String>(&mut conn)
                    .ok()
                    .map(|_| true)
            },
        );
        if started {
            return Node { port, process };
        }
        let _ = process.child.wait();
    }
    panic!("{name} could not start on any of 5 free ports");
}
