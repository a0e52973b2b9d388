//! A private topology: a redis-server without persistence, F frontends and B
//! backends (each pinned to CPU `instance mod ncpu`, as in production) of
//! chat-ha or of the Node.js reference stack, or the floor's one process, and
//! optionally a load balancer in front of them. Every process is started by
//! PID and stopped by PID when the topology is dropped.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What a measured process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Frontend,
    Backend,
    Redis,
    Lb,
    Other,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Frontend => "frontend",
            Role::Backend => "backend",
            Role::Redis => "redis",
            Role::Lb => "lb",
            Role::Other => "other",
        }
    }

    /// Guesses the role of a running process (one named with `--pid`) from
    /// its command name and, for Node.js, the script it runs.
    pub fn of_pid(pid: u32) -> Role {
        let comm = crate::procfs::comm(pid).unwrap_or_default();
        Role::of_command(&comm, &crate::procfs::cmdline(pid))
    }

    /// The role of a process whose command name is `comm` and whose
    /// arguments are `cmdline` (program first).
    pub fn of_command(comm: &str, cmdline: &[String]) -> Role {
        match comm {
            "chat-frontend" => Role::Frontend,
            "chat-backend" => Role::Backend,
            c if c.starts_with("redis-server") => Role::Redis,
            "haproxy" => Role::Lb,
            "node" => {
                // The first argument that is not an option is the script.
                let script = cmdline.iter().skip(1).find(|a| !a.starts_with('-'));
                match script.and_then(|s| Path::new(s).file_name()?.to_str()) {
                    Some(NODE_FRONTEND) => Role::Frontend,
                    Some(NODE_BACKEND) => Role::Backend,
                    _ => Role::Other,
                }
            }
            _ => Role::Other,
        }
    }
}

/// The servers a run measures: chat-ha's, the Node.js Socket.IO reference
/// stack of `bench/node` (socket.io with the Redis adapter, an express
/// backend emitting through the Redis emitter), or the floor: `chat-floor`,
/// one single-threaded process that takes the posts and writes them to the
/// sockets itself, with no Socket.IO library and no Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Stack {
    #[default]
    #[value(name = "chat-ha")]
    ChatHa,
    Node,
    /// Plain socketioxide with socketioxide-redis, and an axum backend
    /// (`chat-sio`): what a Rust user would build instead.
    Socketioxide,
    Floor,
}

impl Stack {
    pub fn name(self) -> &'static str {
        match self {
            Stack::ChatHa => "chat-ha",
            Stack::Node => "node",
            Stack::Socketioxide => "socketioxide",
            Stack::Floor => "floor",
        }
    }
}

/// The reference stack's programs, in `Plan::node_dir`.
pub const NODE_FRONTEND: &str = "frontend.mjs";
pub const NODE_BACKEND: &str = "backend.mjs";

/// A process to measure: one we started, or one named with `--pid`.
#[derive(Debug, Clone)]
pub struct Measured {
    pub role: Role,
    pub name: String,
    pub pid: u32,
}

struct Started {
    name: String,
    child: Child,
}

/// What to start.
#[derive(Debug, Clone)]
pub struct Plan {
    pub stack: Stack,
    pub bin_dir: PathBuf,
    /// The Node.js executable and the directory of the reference stack
    /// (with its `node_modules`), for `Stack::Node`.
    pub node_bin: PathBuf,
    pub node_dir: PathBuf,
    pub www_dir: PathBuf,
    /// The repository: the shipped HAProxy configuration and the script that
    /// adds its server lines, for the load balancer.
    pub repo_dir: PathBuf,
    pub redis_server: PathBuf,
    pub lb_bin: PathBuf,
    pub frontends: usize,
    pub backends: usize,
    pub frontend_threads: usize,
    pub backend_threads: usize,
    pub pin: bool,
    /// Start the load balancer with this many processes (0: none).
    pub lb_processes: usize,
    /// Connections each load-balancer process must accept.
    pub lb_maxconn: usize,
    /// Redis replicas to start beside the primary (0: one Redis, found by
    /// URL). With replicas, a Sentinel watches them and the daemons find the
    /// primary through it (Sentinel mode), waiting for `replicas_acked` of
    /// them to hold each message before answering 201.
    pub redis_replicas: usize,
    pub replicas_acked: usize,
    /// Redis Cluster primaries to start instead of one Redis (0: none): the
    /// daemons run in cluster mode, the slots spread evenly over them; each
    /// has `redis_replicas` replicas.
    pub redis_cluster: usize,
    /// chat-ha's `frontend.write_window_us`; `None`: the daemons' default.
    pub write_window_us: Option<u32>,
    pub keep_dir: bool,
}

/// The running topology. Dropping it stops every process it started.
pub struct Topology {
    started: Vec<Started>,
    pub measured: Vec<Measured>,
    pub dir: PathBuf,
    keep_dir: bool,
    /// Where clients connect (the frontends, or the load balancer).
    pub frontend_addrs: Vec<SocketAddr>,
    /// Where posts go (the backends, or the load balancer).
    pub backend_addrs: Vec<SocketAddr>,
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn pin_and_tie(cmd: &mut Command, cpu: Option<usize>) {
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(cpu) = cpu {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // The server dies with the bench, even if the bench is killed.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

impl Topology {
    /// Starts everything in `plan` and waits until it answers.
    ///
    /// Must be called on the thread that lives as long as the topology (the
    /// main thread): the children are tied to it with PR_SET_PDEATHSIG.
    pub fn start(plan: &Plan) -> Result<Topology, String> {
        let dir = std::env::temp_dir().join(format!(
            "chat-bench-{}-{}",
            std::process::id(),
            crate::procfs::mono_ns()
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut topo = Topology {
            started: Vec::new(),
            measured: Vec::new(),
            dir,
            keep_dir: plan.keep_dir,
            frontend_addrs: Vec::new(),
            backend_addrs: Vec::new(),
        };
        topo.start_all(plan)?;
        Ok(topo)
    }

    fn spawn(
        &mut self,
        role: Role,
        name: &str,
        mut cmd: Command,
        cpu: Option<usize>,
    ) -> Result<u32, String> {
        let log = self.dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        pin_and_tie(&mut cmd, cpu);
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {name} ({:?}): {e}", cmd.get_program()))?;
        let pid = child.id();
        let pinned = cpu.map_or(String::new(), |c| format!(" on cpu {c}"));
        eprintln!("chat-bench: started {name} pid {pid}{pinned}");
        self.started.push(Started {
            name: name.to_owned(),
            child,
        });
        self.measured.push(Measured {
            role,
            name: name.to_owned(),
            pid,
        });
        Ok(pid)
    }

    /// Fails with the tail of the process's log if it has exited.
    fn check_alive(&mut self, name: &str) -> Result<(), String> {
        let dir = self.dir.clone();
        if let Some(s) = self.started.iter_mut().find(|s| s.name == name)
            && let Ok(Some(status)) = s.child.try_wait()
        {
            return Err(format!(
                "{name} exited ({status}); its log:\n{}",
                log_tail(&dir.join(format!("{name}.log")))
            ));
        }
        Ok(())
    }

    /// Starts a redis-server without persistence on a free port, with
    /// `extra` arguments, and waits until it answers; its port.
    fn start_redis(&mut self, plan: &Plan, name: &str, extra: &[&str]) -> Result<u16, String> {
        let port = free_port().map_err(|e| e.to_string())?;
        let mut redis = Command::new(&plan.redis_server);
        redis.args(["--port", &port.to_string()]);
        redis.args(["--bind", "127.0.0.1", "--protected-mode", "no"]);
        redis.args(["--save", "", "--appendonly", "no", "--daemonize", "no"]);
        redis.args(["--loglevel", "warning", "--maxclients", "1000"]);
        redis.args(extra);
        let dir = self.dir.join(name);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        redis.arg("--dir").arg(&dir);
        self.spawn(Role::Redis, name, redis, None)?;
        self.wait_for(name, name, || redis_ping(port))?;
        Ok(port)
    }

    /// Starts `plan.redis_replicas` replicas of the Redis on `primary` and
    /// one Sentinel watching it; the Sentinel's port once every replica is
    /// in sync and the Sentinel names the primary.
    fn start_replicas_and_sentinel(&mut self, plan: &Plan, primary: u16) -> Result<u16, String> {
        let primary_arg = primary.to_string();
        for i in 0..plan.redis_replicas {
            self.start_redis(
                plan,
                &format!("redis-replica{i}"),
                &["--replicaof", "127.0.0.1", &primary_arg],
            )?;
        }
        let online = format!("connected_slaves:{}", plan.redis_replicas);
        // The primary's answer counts them; each replica answered PING.
        self.wait_for("redis", "the replicas", || {
            redis_query(primary, "INFO replication").is_some_and(|info| {
                info.contains(&online)
                    && info.matches("state=online").count() == plan.redis_replicas
            })
        })?;
        let port = free_port().map_err(|e| e.to_string())?;
        let conf = self.dir.join("sentinel.conf");
        let text = format!(
            "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor {SENTINEL_MASTER} 127.0.0.1 {primary} 1\n",
            self.dir.display()
        );
        std::fs::write(&conf, text).map_err(|e| format!("{}: {e}", conf.display()))?;
        let mut sentinel = Command::new(&plan.redis_server);
        sentinel.arg(&conf).arg("--sentinel");
        self.spawn(Role::Redis, "sentinel", sentinel, None)?;
        let query = format!("SENTINEL GET-MASTER-ADDR-BY-NAME {SENTINEL_MASTER}");
        self.wait_for("sentinel", "the Sentinel", || {
            redis_query(port, &query).is_some_and(|reply| reply.contains(&primary_arg))
        })?;
        Ok(port)
    }

    /// Starts one Redis, and with `plan.redis_replicas` its replicas and a
    /// Sentinel; the `[redis]` keys that reach it, and its URL.
    fn redis_keys(&mut self, plan: &Plan) -> Result<(String, String), String> {
        let redis_port = self.start_redis(plan, "redis", &[])?;
        let url = format!("redis://127.0.0.1:{redis_port}/0");
        if plan.redis_replicas == 0 {
            return Ok((format!("url = \"{url}\"\n"), url));
        }
        let sentinel_port = self.start_replicas_and_sentinel(plan, redis_port)?;
        let keys = format!(
            "sentinels = [\"redis://127.0.0.1:{sentinel_port}\"]\nsentinel_master = \"{SENTINEL_MASTER}\"\n\
             min_replicas_acked = {}\n",
            plan.replicas_acked
        );
        Ok((keys, url))
    }

    /// Starts one Redis Cluster node named `name`; its port and bus port.
    fn start_cluster_node(&mut self, plan: &Plan, name: &str) -> Result<(u16, u16), String> {
        let bus = free_port().map_err(|e| e.to_string())?;
        let config_file = self.dir.join(format!("{name}-nodes.conf"));
        let port = self.start_redis(
            plan,
            name,
            &[
                "--cluster-enabled",
                "yes",
                "--cluster-port",
                &bus.to_string(),
                "--cluster-config-file",
                &config_file.display().to_string(),
                "--cluster-node-timeout",
                "2000",
            ],
        )?;
        Ok((port, bus))
    }

    /// Starts a Redis Cluster of `plan.redis_cluster` primaries, each with
    /// `plan.redis_replicas` replicas: introduces the nodes to each other,
    /// gives each primary an equal range of the slots and its replicas;
    /// the primaries' ports once every node says the cluster is ok and
    /// every replica is in sync.
    fn start_cluster(&mut self, plan: &Plan) -> Result<Vec<u16>, String> {
        let count = plan.redis_cluster;
        let mut primaries = Vec::with_capacity(count);
        for i in 0..count {
            primaries.push(self.start_cluster_node(plan, &format!("redis{i}"))?);
        }
        let mut replicas = Vec::new();
        for i in 0..count {
            for r in 0..plan.redis_replicas {
                let (port, bus) = self.start_cluster_node(plan, &format!("replica{i}-{r}"))?;
                replicas.push((i, port, bus));
            }
        }
        let (first, _) = primaries[0];
        let others = primaries[1..]
            .iter()
            .copied()
            .chain(replicas.iter().map(|&(_, port, bus)| (port, bus)));
        for (port, bus) in others {
            redis_query(first, &format!("CLUSTER MEET 127.0.0.1 {port} {bus}"))
                .filter(|reply| reply.starts_with("+OK"))
                .ok_or_else(|| format!("CLUSTER MEET of the node on {port} failed"))?;
        }
        let slots = 16384 / count;
        for (i, &(port, _)) in primaries.iter().enumerate() {
            let from = i * slots;
            let to = if i + 1 == count {
                16383
            } else {
                from + slots - 1
            };
            redis_query(port, &format!("CLUSTER ADDSLOTSRANGE {from} {to}"))
                .filter(|reply| reply.starts_with("+OK"))
                .ok_or_else(|| format!("CLUSTER ADDSLOTSRANGE on {port} failed"))?;
        }
        let nodes = count * (1 + plan.redis_replicas);
        let known = format!("cluster_known_nodes:{nodes}");
        // A replica can be given its primary once it knows the primary.
        self.wait_for("redis0", "the cluster's nodes", || {
            replicas.iter().all(|&(_, port, _)| {
                redis_query(port, "CLUSTER INFO").is_some_and(|info| info.contains(&known))
            })
        })?;
        for &(i, port, _) in &replicas {
            let (primary, _) = primaries[i];
            let id = redis_query(primary, "CLUSTER MYID")
                .and_then(|reply| reply.lines().nth(1).map(str::to_owned))
                .ok_or_else(|| format!("CLUSTER MYID on {primary} failed"))?;
            redis_query(port, &format!("CLUSTER REPLICATE {id}"))
                .filter(|reply| reply.starts_with("+OK"))
                .ok_or_else(|| format!("CLUSTER REPLICATE on {port} failed"))?;
        }
        let ports: Vec<u16> = primaries.iter().map(|(port, _)| *port).collect();
        let in_sync = plan.redis_replicas;
        self.wait_for("redis0", "the cluster", || {
            ports.iter().all(|port| {
                redis_query(*port, "CLUSTER INFO")
                    .is_some_and(|info| info.contains("cluster_state:ok") && info.contains(&known))
                    && redis_query(*port, "INFO replication")
                        .is_some_and(|info| info.matches("state=online").count() == in_sync)
            })
        })?;
        Ok(ports)
    }

    /// Waits up to 20 s for `what` to be `ready`, failing early if the
    /// started process named `process` exited.
    fn wait_for(
        &mut self,
        process: &str,
        what: &str,
        mut ready: impl FnMut() -> bool,
    ) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ready() {
            self.check_alive(process)?;
            if Instant::now() > deadline {
                return Err(format!("{what}: not ready within 20 s"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn start_all(&mut self, plan: &Plan) -> Result<(), String> {
        let ncpu = crate::procfs::cpu_count();
        if plan.stack == Stack::Node {
            check_node_dir(&plan.node_dir)?;
        }

        // The other stacks take the URL of the one Redis.
        let (redis_keys, redis_url) = if plan.redis_cluster > 0 {
            let ports = self.start_cluster(plan)?;
            let seeds: Vec<String> = ports
                .iter()
                .map(|port| format!("\"redis://127.0.0.1:{port}\""))
                .collect();
            let acked = if plan.redis_replicas > 0 {
                plan.replicas_acked
            } else {
                0
            };
            let keys = format!(
                "cluster = [{}]\nmin_replicas_acked = {acked}\n",
                seeds.join(", ")
            );
            (keys, format!("redis://127.0.0.1:{}/0", ports[0]))
        } else {
            self.redis_keys(plan)?
        };
        let config = self.dir.join("chat-ha.toml");
        let text = format!(
            "[log]\nlevel = \"warn\"\n\n[redis]\n{redis_keys}\n\
             [frontend]\nwww_dir = {www:?}\nthreads = {ft}\ndrain_delay_ms = 0\n\
             {window}\n\
             [backend]\nthreads = {bt}\n",
            www = plan.www_dir.display().to_string(),
            ft = plan.frontend_threads,
            bt = plan.backend_threads,
            window = plan
                .write_window_us
                .map_or_else(String::new, |us| format!("write_window_us = {us}\n")),
        );
        std::fs::write(&config, text).map_err(|e| format!("{}: {e}", config.display()))?;

        let mut fronts = Vec::new();
        let mut backs = Vec::new();
        // The floor is one process, both frontend and backend.
        let backends = if plan.stack == Stack::Floor {
            0
        } else {
            plan.backends
        };
        for (role, count, list) in [
            (Role::Frontend, plan.frontends, &mut fronts),
            (Role::Backend, backends, &mut backs),
        ] {
            for i in 0..count {
                let port = free_port().map_err(|e| e.to_string())?;
                let addr = SocketAddr::from(([127, 0, 0, 1], port));
                let cmd = server_command(plan, role, i, addr, &config, &redis_url);
                let name = format!("{}{i}", role.name());
                self.spawn(role, &name, cmd, plan.pin.then_some(i % ncpu))?;
                list.push((name, addr));
            }
        }
        if plan.stack == Stack::Floor {
            backs = fronts.clone();
        }
        for (name, addr) in fronts.iter().chain(backs.iter()) {
            let path = if name.starts_with("frontend") {
                "/front/status"
            } else {
                "/back/status"
            };
            let floor = plan.stack == Stack::Floor;
            self.wait_for(name, &format!("{name} at {addr}"), || {
                http_get(*addr, path, Duration::from_secs(2)).is_some_and(|body| {
                    body.starts_with("HTTP/1.1 200") && (body.contains("\"redis\":\"up\"") || floor)
                })
            })?;
        }

        if plan.lb_processes > 0 {
            let port = free_port().map_err(|e| e.to_string())?;
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let cfg = self.dir.join("lb.cfg");
            let text = shipped_lb_config(
                &plan.repo_dir,
                &self.dir,
                addr,
                plan.lb_maxconn,
                &fronts,
                &backs,
            )?;
            std::fs::write(&cfg, text).map_err(|e| format!("{}: {e}", cfg.display()))?;
            for p in 0..plan.lb_processes {
                // -db: stay in the foreground; every process binds the same
                // port (SO_REUSEPORT) and the kernel spreads connections.
                let mut cmd = Command::new(&plan.lb_bin);
                cmd.arg("-db").arg("-f").arg(&cfg);
                for limit in ADDRESS_LIMITS {
                    cmd.env(limit, LIFTED_LIMIT.to_string());
                }
                self.spawn(Role::Lb, &format!("lb{p}"), cmd, None)?;
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let front = http_get(addr, "/front/status", Duration::from_secs(2));
                let back = http_get(addr, "/back/status", Duration::from_secs(2));
                if front.is_some_and(|b| b.starts_with("HTTP/1.1 200"))
                    && back.is_some_and(|b| b.starts_with("HTTP/1.1 200"))
                {
                    break;
                }
                for p in 0..plan.lb_processes {
                    self.check_alive(&format!("lb{p}"))?;
                }
                if Instant::now() > deadline {
                    return Err(format!("load balancer at {addr} not ready within 10 s"));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            // Give every process time to bind before clients arrive.
            std::thread::sleep(Duration::from_millis(300));
            self.frontend_addrs = vec![addr];
            self.backend_addrs = vec![addr];
        } else {
            self.frontend_addrs = fronts.iter().map(|(_, a)| *a).collect();
            self.backend_addrs = backs.iter().map(|(_, a)| *a).collect();
        }
        Ok(())
    }

    /// Stops every process we started: SIGTERM in reverse start order, then
    /// SIGKILL for those still running after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        for s in self.started.iter().rev() {
            // SAFETY: signals a child we started and have not reaped.
            unsafe { libc::kill(s.child.id() as libc::pid_t, libc::SIGTERM) };
        }
        let deadline = Instant::now() + grace;
        for s in self.started.iter_mut().rev() {
            loop {
                match s.child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        eprintln!("chat-bench: {} did not stop; killing it", s.name);
                        let _ = s.child.kill();
                        let _ = s.child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
        self.started.clear();
        if !self.keep_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(8));
    }
}

/// The command that starts instance `i` of a frontend or backend of
/// `plan.stack`, listening on `addr`. chat-ha reads `config`; the Node.js
/// stack is told the Redis URL and runs as in production (NODE_ENV).
fn server_command(
    plan: &Plan,
    role: Role,
    i: usize,
    addr: SocketAddr,
    config: &Path,
    redis_url: &str,
) -> Command {
    let frontend = role == Role::Frontend;
    match plan.stack {
        Stack::ChatHa => {
            let exe = if frontend {
                "chat-frontend"
            } else {
                "chat-backend"
            };
            let mut cmd = Command::new(plan.bin_dir.join(exe));
            cmd.arg("--config").arg(config);
            cmd.arg("--listen").arg(addr.to_string());
            // Metrics are not read by the bench: any free port.
            cmd.arg("--metrics-listen").arg("127.0.0.1:0");
            cmd.arg("--instance").arg(i.to_string());
            cmd
        }
        Stack::Node => {
            let script = if frontend {
                NODE_FRONTEND
            } else {
                NODE_BACKEND
            };
            let mut cmd = Command::new(&plan.node_bin);
            cmd.arg(plan.node_dir.join(script));
            cmd.arg("--listen").arg(addr.to_string());
            cmd.arg("--redis").arg(redis_url);
            cmd.env("NODE_ENV", "production");
            cmd
        }
        Stack::Socketioxide => {
            let mut cmd = Command::new(plan.bin_dir.join("chat-sio"));
            cmd.arg(if frontend { "frontend" } else { "backend" });
            cmd.arg("--listen").arg(addr.to_string());
            cmd.arg("--redis").arg(redis_url);
            cmd
        }
        Stack::Floor => {
            let mut cmd = Command::new(plan.bin_dir.join("chat-floor"));
            cmd.arg("--listen").arg(addr.to_string());
            cmd
        }
    }
}

/// Fails with what to run if the reference stack's packages are missing.
fn check_node_dir(dir: &Path) -> Result<(), String> {
    if dir.join("node_modules/socket.io").is_dir() {
        Ok(())
    } else {
        Err(format!(
            "the Node.js stack's packages are not installed: run `npm ci` in {} \
             (or `make bench-compare`)",
            dir.display()
        ))
    }
}

/// The limits per client address of the shipped HAProxy configuration,
/// each read from HAProxy's environment: the bench's clients all come from
/// one address, so every limit is lifted.
const ADDRESS_LIMITS: [&str; 5] = [
    "CHAT_HA_POSTS_PER_10S",
    "CHAT_HA_READS_PER_10S",
    "CHAT_HA_SOCKETS_PER_ADDRESS",
    "CHAT_HA_CONNECTS_PER_10S",
    "CHAT_HA_AUTH_FAILURES_PER_MIN",
];
const LIFTED_LIMIT: u32 = 1_000_000;

/// The shipped HAProxy configuration (`etc/haproxy/chat-ha.cfg` of `repo`)
/// as a host runs it, for these servers: after a `global` section of the
/// bench's own (the one a host's haproxy.cfg gives), with its lists read
/// from the repository, listening on `bind` instead of port 80, and a
/// server line per instance added by chat-haproxy's own `chat-ha-servers`
/// from a `chat-ha-servers.lst` written in `dir`.
pub fn shipped_lb_config(
    repo: &Path,
    dir: &Path,
    bind: SocketAddr,
    maxconn: usize,
    fronts: &[(String, SocketAddr)],
    backs: &[(String, SocketAddr)],
) -> Result<String, String> {
    let shipped = repo.join("etc/haproxy/chat-ha.cfg");
    let text =
        std::fs::read_to_string(&shipped).map_err(|e| format!("{}: {e}", shipped.display()))?;
    let config = rebind(&text, bind, &repo.join("etc/haproxy"))
        .ok_or_else(|| format!("{}: no bind line in a frontend", shipped.display()))?;
    let list = dir.join("chat-ha-servers.lst");
    let mut servers = String::new();
    for (kind, instances) in [("chat-frontend", fronts), ("chat-backend", backs)] {
        for (name, addr) in instances {
            let _ = writeln!(servers, "{kind} {name} {addr}");
        }
    }
    std::fs::write(&list, servers).map_err(|e| format!("{}: {e}", list.display()))?;
    let script = repo.join("debian/haproxy-dropin/chat-ha-servers");
    let mut child = Command::new("sh")
        .arg(&script)
        .arg(&list)
        .args(["-", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e}", script.display()))?;
    child
        .stdin
        .take()
        .expect("a piped stdin")
        .write_all(config.as_bytes())
        .map_err(|e| format!("{}: {e}", script.display()))?;
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let servers_added = String::from_utf8(out.stdout).map_err(|e| e.to_string())?;
    Ok(format!("global\n    maxconn {maxconn}\n\n{servers_added}"))
}

/// `text` (chat-ha.cfg) listening on `bind` in place of its frontend's bind
/// line, reading its lists from `lists_dir`; `None` without a bind line.
fn rebind(text: &str, bind: SocketAddr, lists_dir: &Path) -> Option<String> {
    let mut out = String::new();
    let mut section = "";
    let mut bound = false;
    for line in text.lines() {
        if line.starts_with(|c: char| !c.is_whitespace() && c != '#') {
            section = line.split_whitespace().next().unwrap_or("");
        } else if section == "frontend" && line.trim_start().starts_with("bind ") {
            if !bound {
                let _ = writeln!(out, "    bind {bind}");
                bound = true;
            }
            continue;
        }
        let line = line.replace(
            "/etc/haproxy/chat-ha-",
            &format!("{}/chat-ha-", lists_dir.display()),
        );
        let _ = writeln!(out, "{line}");
    }
    bound.then_some(out)
}

/// The Sentinel master name of `--redis-replicas`.
const SENTINEL_MASTER: &str = "chat-ha";

/// The raw answer of Redis on `port` to the inline command `command`
/// (whatever arrives within 500 ms of the first bytes).
fn redis_query(port: u16, command: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(500),
    )
    .ok()?;
    s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    s.write_all(format!("{command}\r\n").as_bytes()).ok()?;
    let mut buf = vec![0u8; 16 * 1024];
    let n = s.read(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn redis_ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(500),
    ) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
}

/// A blocking `GET` with `Connection: close`; the whole answer, headers included.
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.set_write_timeout(Some(timeout)).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).ok()?;
    Some(answer)
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(stack: Stack) -> Plan {
        Plan {
            stack,
            bin_dir: PathBuf::from("/opt/chat/bin"),
            node_bin: PathBuf::from("node"),
            node_dir: PathBuf::from("/src/bench/node"),
            www_dir: PathBuf::from("/www"),
            repo_dir: PathBuf::from("/src"),
            redis_server: PathBuf::from("redis-server"),
            lb_bin: PathBuf::from("haproxy"),
            frontends: 1,
            backends: 1,
            frontend_threads: 1,
            backend_threads: 1,
            pin: true,
            lb_processes: 0,
            lb_maxconn: 0,
            redis_replicas: 0,
            redis_cluster: 0,
            replicas_acked: 1,
            write_window_us: None,
            keep_dir: false,
        }
    }

    fn args(cmd: &Command) -> Vec<String> {
        cmd.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    const ADDR: ([u8; 4], u16) = ([127, 0, 0, 1], 9100);

    #[test]
    fn chat_ha_servers_read_the_config() {
        let cmd = server_command(
            &plan(Stack::ChatHa),
            Role::Backend,
            2,
            SocketAddr::from(ADDR),
            Path::new("/tmp/c.toml"),
            "redis://127.0.0.1:6379/0",
        );
        assert_eq!(cmd.get_program(), "/opt/chat/bin/chat-backend");
        assert_eq!(
            args(&cmd),
            [
                "--config",
                "/tmp/c.toml",
                "--listen",
                "127.0.0.1:9100",
                "--metrics-listen",
                "127.0.0.1:0",
                "--instance",
                "2"
            ]
        );
        assert_eq!(cmd.get_envs().count(), 0);
    }

    #[test]
    fn node_servers_get_the_address_and_redis_in_production_mode() {
        for (role, script) in [
            (Role::Frontend, "/src/bench/node/frontend.mjs"),
            (Role::Backend, "/src/bench/node/backend.mjs"),
        ] {
            let cmd = server_command(
                &plan(Stack::Node),
                role,
                0,
                SocketAddr::from(ADDR),
                Path::new("/tmp/c.toml"),
                "redis://127.0.0.1:6379/0",
            );
            assert_eq!(cmd.get_program(), "node");
            assert_eq!(
                args(&cmd),
                [
                    script,
                    "--listen",
                    "127.0.0.1:9100",
                    "--redis",
                    "redis://127.0.0.1:6379/0"
                ]
            );
            let envs: Vec<_> = cmd.get_envs().collect();
            assert_eq!(
                envs,
                [(
                    std::ffi::OsStr::new("NODE_ENV"),
                    Some(std::ffi::OsStr::new("production"))
                )]
            );
        }
    }

    /// The load balancer runs chat-ha.cfg as shipped: listening where the
    /// bench says, its lists from the repository, a server per instance,
    /// and valid for HAProxy itself.
    #[test]
    fn the_load_balancer_runs_the_shipped_configuration() {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let dir = std::env::temp_dir().join(format!("chat-bench-lb-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let at = |port| SocketAddr::from(([127, 0, 0, 1], port));
        let fronts = [
            ("frontend0".to_owned(), at(9100)),
            ("frontend1".to_owned(), at(9101)),
        ];
        let backs = [("backend0".to_owned(), at(9200))];
        let bind = at(8088);
        let config = shipped_lb_config(repo, &dir, bind, 4096, &fronts, &backs).unwrap();
        let shipped = std::fs::read_to_string(repo.join("etc/haproxy/chat-ha.cfg")).unwrap();
        assert!(config.starts_with("global\n    maxconn 4096\n"), "{config}");
        assert!(config.contains("\n    bind 127.0.0.1:8088\n"), "{config}");
        assert!(!config.contains("bind :80"), "{config}");
        assert!(!config.contains("-f /etc/haproxy/"), "{config}");
        for line in [
            "frontend chat_ha",
            "backend chat_front",
            "backend chat_back",
        ] {
            assert!(shipped.contains(line) && config.contains(line), "{line}");
        }
        for server in [
            "server frontend0 127.0.0.1:9100",
            "server frontend1 127.0.0.1:9101",
            "server backend0 127.0.0.1:9200",
        ] {
            assert!(config.contains(server), "{server}: {config}");
        }
        let file = dir.join("lb.cfg");
        std::fs::write(&file, &config).unwrap();
        let check = Command::new("haproxy")
            .arg("-c")
            .arg("-q")
            .arg("-f")
            .arg(&file)
            .output();
        let _ = std::fs::remove_dir_all(&dir);
        let check = check.expect("haproxy must be installed");
        assert!(
            check.status.success(),
            "{}",
            String::from_utf8_lossy(&check.stderr)
        );
    }

    #[test]
    fn roles_of_named_processes() {
        let cmd = |args: &[&str]| args.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        assert_eq!(Role::of_command("chat-frontend", &[]), Role::Frontend);
        assert_eq!(Role::of_command("chat-backend", &[]), Role::Backend);
        assert_eq!(Role::of_command("redis-server", &[]), Role::Redis);
        assert_eq!(Role::of_command("haproxy", &[]), Role::Lb);
        assert_eq!(
            Role::of_command(
                "node",
                &cmd(&["node", "/x/bench/node/frontend.mjs", "--listen", "a:1"])
            ),
            Role::Frontend
        );
        assert_eq!(
            Role::of_command(
                "node",
                &cmd(&["/usr/bin/node", "--max-old-space-size=512", "backend.mjs"])
            ),
            Role::Backend
        );
        assert_eq!(
            Role::of_command("node", &cmd(&["node", "other.mjs"])),
            Role::Other
        );
        assert_eq!(Role::of_command("node", &[]), Role::Other);
        assert_eq!(Role::of_command("bash", &cmd(&["bash"])), Role::Other);
    }

    #[test]
    fn a_missing_node_modules_says_what_to_run() {
        let err = check_node_dir(Path::new("/nonexistent/bench/node")).unwrap_err();
        assert!(err.contains("npm ci"), "{err}");
    }
}
