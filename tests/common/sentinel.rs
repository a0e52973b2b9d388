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
    /// The default user's password, when it has one (a locked set).
    pub password: Option<String>,
    pub process: Process,
}

impl Node {
    /// The node's address, without a login.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A client logged in as the default user (an administrator).
    pub fn client(&self) -> redis::Client {
        redis::Client::open(login_url(self.port, self.password.as_deref())).unwrap()
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

/// The passwords of a locked set ([`SentinelSet::start_locked`]), as an
/// operator sets them up with chat-redis: one per user, the same on every
/// server.
pub struct Passwords {
    /// The servers' default user: the tests' own administrator.
    pub admin: &'static str,
    /// The daemons' user, chat-ha.
    pub chat_ha: &'static str,
    /// The user replicas log in to their primary as, replica.
    pub replica: &'static str,
    /// The user Sentinels log in to the servers as, sentinel.
    pub sentinel_user: &'static str,
    /// The Sentinels' own (`requirepass`).
    pub sentinels: &'static str,
}

/// The passwords of every locked set.
pub const PASSWORDS: Passwords = Passwords {
    admin: "password-of-the-admin",
    chat_ha: "password-of-chat-ha",
    replica: "password-of-the-replica-user",
    sentinel_user: "password-of-the-sentinel-user",
    sentinels: "password-of-the-sentinels",
};

/// How the nodes of a set let clients in.
#[derive(Clone, Copy)]
enum Locks {
    /// Anyone, as anything.
    Open,
    /// Each user as the shipped ACL files allow, with [`PASSWORDS`].
    Shipped,
}

impl SentinelSet {
    pub fn start() -> SentinelSet {
        SentinelSet::start_as(Locks::Open)
    }

    /// Starts a set locked as chat-redis and the Sentinel example lock it:
    /// no anonymous login anywhere; the daemons' user (chat-ha), the
    /// replicas' (replica) and the Sentinels' (sentinel) with the rules of
    /// the shipped ACL files; the Sentinels with a password of their own.
    /// The passwords are [`PASSWORDS`].
    pub fn start_locked() -> SentinelSet {
        SentinelSet::start_as(Locks::Shipped)
    }

    fn start_as(locks: Locks) -> SentinelSet {
        let dir = tempfile::tempdir().unwrap();
        let primary = start_server(dir.path(), "server0", None, locks);
        let replicas: Vec<Node> = (1..3)
            .map(|i| {
                let name = format!("server{i}");
                start_server(dir.path(), &name, Some(primary.port), locks)
            })
            .collect();
        let mut servers = vec![primary];
        servers.extend(replicas);
        wait_for("both replicas online", Duration::from_secs(20), || {
            let info: String = servers[0].query(redis::cmd("INFO").arg("replication"));
            (info.matches("state=online").count() == 2).then_some(())
        });
        let sentinels: Vec<Node> = (0..3)
            .map(|i| start_sentinel(dir.path(), i, servers[0].port, locks))
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
        let server = start_server(self.dir.path(), "cut-off", None, Locks::Open);
        let sentinel = start_sentinel(self.dir.path(), 9, server.port, Locks::Open);
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
/// replica of `primary` when given, locked with `locks`, on a free port.
fn start_server(dir: &Path, name: &str, primary: Option<u16>, locks: Locks) -> Node {
    let password = match locks {
        Locks::Open => None,
        Locks::Shipped => Some(PASSWORDS.admin),
    };
    start_on_free_port(name, password, |port| {
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
        if let Locks::Shipped = locks {
            text.push_str(&shipped_users());
            let replica = PASSWORDS.replica;
            text.push_str(&format!("masteruser replica\nmasterauth {replica}\n"));
        }
        std::fs::write(&conf, text).unwrap();
        let mut command = Command::new("redis-server");
        command.arg(conf);
        command
    })
}

/// The users of a locked server: the administrator (the default user, as
/// chat-redis's postinst keeps it), and the shipped ones.
fn shipped_users() -> String {
    let users = [
        vec![format!("default on >{} ~* &* +@all", PASSWORDS.admin)],
        super::chat_ha_acl_rules(&format!(">{}", PASSWORDS.chat_ha)),
        super::acl_rules(
            "chat-ha-sentinel-users.acl",
            "replica",
            &format!(">{}", PASSWORDS.replica),
        ),
        super::acl_rules(
            "chat-ha-sentinel-users.acl",
            "sentinel",
            &format!(">{}", PASSWORDS.sentinel_user),
        ),
    ];
    users
        .iter()
        .map(|words| format!("user {}\n", words.join(" ")))
        .collect()
}

/// Starts a Sentinel with the example configuration, watching the primary
/// on `primary`, locked with `locks` (the example's commented-out login
/// lines, filled in), made fast for tests.
fn start_sentinel(dir: &Path, index: usize, primary: u16, locks: Locks) -> Node {
    let example =
        std::fs::read_to_string(repository("etc/redis/sentinel-chat-ha.conf.example")).unwrap();
    let password = match locks {
        Locks::Open => None,
        Locks::Shipped => Some(PASSWORDS.sentinels),
    };
    start_on_free_port(&format!("sentinel{index}"), password, |port| {
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
                l => match (locks, login_line(l)) {
                    (Locks::Shipped, Some(line)) => line,
                    _ => l.to_owned(),
                },
            })
            .map(|line| line + "\n")
            .collect();
        assert!(text.contains(&format!("127.0.0.1 {primary} 2")), "{text}");
        if let Locks::Shipped = locks {
            assert!(text.contains("\nrequirepass "), "{text}");
        }
        let conf = dir.join(format!("sentinel{index}.conf"));
        std::fs::write(&conf, text).unwrap();
        let mut command = Command::new("redis-server");
        command.arg(conf).arg("--sentinel");
        command
    })
}

/// The example's commented-out login line `line` of a Sentinel, filled in
/// with [`PASSWORDS`]; `None` for any other line.
fn login_line(line: &str) -> Option<String> {
    Some(match line.strip_prefix("# ")? {
        "sentinel auth-user chat-ha sentinel" => "sentinel auth-user chat-ha sentinel".into(),
        l if l.starts_with("sentinel auth-pass chat-ha ") => {
            format!("sentinel auth-pass chat-ha {}", PASSWORDS.sentinel_user)
        }
        l if l.starts_with("requirepass ") => format!("requirepass {}", PASSWORDS.sentinels),
        _ => return None,
    })
}

/// `redis://` to loopback port `port`, as the default user with `password`.
fn login_url(port: u16, password: Option<&str>) -> String {
    match password {
        None => format!("redis://127.0.0.1:{port}"),
        Some(password) => format!("redis://:{password}@127.0.0.1:{port}"),
    }
}

/// Starts the command `make(port)` builds on a port that was free, again
/// on another if the process exits before it answers PING there (as the
/// default user with `password`).
fn start_on_free_port(
    name: &str,
    password: Option<&'static str>,
    make: impl Fn(u16) -> Command,
) -> Node {
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
        let node_url = login_url(port, password);
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
            return Node {
                port,
                password: password.map(str::to_owned),
                process,
            };
        }
        let _ = process.child.wait();
    }
    panic!("{name} could not start on any of 5 free ports");
}
