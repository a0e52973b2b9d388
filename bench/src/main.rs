//! chat-bench: the project's benchmark.
//!
//! Starts a private topology (or targets a running one), connects N websocket
//! clients spread over R rooms, posts P messages per second for D seconds on
//! an open-loop schedule, and reports delivery rate, end-to-end latency, lost
//! and duplicated messages, and the CPU and memory the servers used — as one
//! JSON line on stdout and a human summary on stderr.

mod client;
mod pool;
mod poster;
mod procfs;
mod topology;
mod workers;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::Parser;
use hdrhistogram::Histogram;
use serde_json::{Value, json};

use procfs::{CpuTimes, mono_ns};
use topology::{Measured, Role, Stack, Topology};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Benchmark for chat-ha: websocket clients in rooms, open-loop posts, \
             end-to-end latency, loss, CPU and memory of the servers"
)]
struct Args {
    /// Websocket clients [default: 1000; 50 with --smoke].
    #[arg(long)]
    clients: Option<usize>,
    /// Rooms; client i joins room i mod R [default: 10; 5 with --smoke].
    #[arg(long)]
    rooms: Option<usize>,
    /// Posts per second, over all rooms [default: 1000; 100 with --smoke].
    #[arg(long)]
    rate: Option<f64>,
    /// Seconds of posting [default: 20; 3 with --smoke].
    #[arg(long)]
    duration: Option<f64>,
    /// Small run for the test suite: exits non-zero if any client failed to
    /// join or was dropped, or any message was lost, duplicated or refused.
    #[arg(long)]
    smoke: bool,
    /// Memory only: connect and join, wait, report RSS per connection; no posts.
    #[arg(long)]
    idle: bool,
    /// Seconds to wait after the last join before measuring memory with --idle.
    #[arg(long, default_value_t = 5.0)]
    idle_wait: f64,

    /// The servers to start: chat-ha's; the Node.js Socket.IO reference
    /// stack of bench/node (run `npm ci` there first); plain socketioxide
    /// with socketioxide-redis and axum (chat-sio); or the floor,
    /// chat-floor, one process without Socket.IO library or Redis. With
    /// --frontend, it only labels the run.
    #[arg(long, value_enum, default_value_t = Stack::ChatHa)]
    stack: Stack,
    /// The Node.js executable, for --stack node.
    #[arg(long, value_name = "PATH", default_value = "node")]
    node_bin: PathBuf,
    /// Frontend instances to start.
    #[arg(long, default_value_t = 1)]
    frontends: usize,
    /// More frontend instances to start that no client connects to: what
    /// a frontend spends on the rooms it does not serve (without a load
    /// balancer only).
    #[arg(long, default_value_t = 0)]
    idle_frontends: usize,
    /// Backend instances to start.
    #[arg(long, default_value_t = 1)]
    backends: usize,
    /// Runtime threads of each started frontend (chat-ha only).
    #[arg(long, default_value_t = 1)]
    frontend_threads: usize,
    /// Runtime threads of each started backend (chat-ha only).
    #[arg(long, default_value_t = 1)]
    backend_threads: usize,
    /// Put a load balancer in front: /front (leastconn) and /back (round-robin).
    #[arg(long)]
    haproxy: bool,
    /// Load-balancer processes sharing its port [default: enough for the
    /// connections within the open-files limit].
    #[arg(long)]
    haproxy_procs: Option<usize>,
    /// Do not pin instance N to CPU N mod ncpu.
    #[arg(long)]
    no_pin: bool,
    /// Where chat-frontend and chat-backend are [default: $CHAT_HA_BIN_DIR,
    /// else <repo>/target/release].
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,
    #[arg(long, value_name = "PATH", default_value = "redis-server")]
    redis_server: PathBuf,
    /// Start this many Redis replicas and a Sentinel: the daemons run in
    /// Sentinel mode, and a post is answered once --replicas-acked replicas
    /// hold it (chat-ha only). With --redis-cluster: this many replicas of
    /// each primary.
    #[arg(long, default_value_t = 0)]
    redis_replicas: usize,
    /// Start a Redis Cluster of this many primaries instead of one Redis:
    /// the daemons run in cluster mode (chat-ha only).
    #[arg(long, default_value_t = 0)]
    redis_cluster: usize,
    /// With --redis-replicas: redis.min_replicas_acked (0: no WAIT).
    #[arg(long, default_value_t = 1)]
    replicas_acked: usize,
    /// chat-ha's frontend.write_window_us: deliveries within this many
    /// microseconds of the last one wait and go out together (0: off).
    /// Unset, the daemons run with their default.
    #[arg(long)]
    write_window_us: Option<u32>,
    /// Run this many busy loops (`sh -c 'while :; do :; done'`, unpinned, at
    /// normal priority) beside the servers while measuring: a neighbour that
    /// wants whole CPUs, as a batch job or another tenant would.
    #[arg(long, default_value_t = 0)]
    cpu_hogs: usize,
    #[arg(long, value_name = "PATH", default_value = "haproxy")]
    haproxy_bin: PathBuf,
    /// Keep the started processes' logs and configuration (path printed).
    #[arg(long)]
    keep_logs: bool,

    /// Target a running frontend instead of starting one (repeatable), e.g.
    /// http://127.0.0.1:9100.
    #[arg(long = "frontend", value_name = "URL")]
    frontend_urls: Vec<String>,
    /// Target a running backend (repeatable), e.g. http://127.0.0.1:9200.
    #[arg(long = "backend", value_name = "URL")]
    backend_urls: Vec<String>,
    /// A server process to measure (repeatable); its role is read from its name.
    #[arg(long = "pid", value_name = "PID")]
    pids: Vec<u32>,

    /// Client runtime threads [default: number of CPUs; 1 per process with
    /// --client-procs].
    #[arg(long)]
    threads: Option<usize>,
    /// Processes the clients are spread over (with --idle): each may hold
    /// only as many connections as its open-files limit allows.
    #[arg(long, default_value_t = 1)]
    client_procs: usize,
    /// Run as one of the client processes of --client-procs (internal).
    #[arg(long, hide = true)]
    worker: bool,
    /// The first client id of this worker (internal).
    #[arg(long, hide = true, default_value_t = 0)]
    client_offset: usize,
    /// Connections being set up at once.
    #[arg(long, default_value_t = 200)]
    connect_concurrency: usize,
    /// The Engine.IO protocol the clients speak: 4 (socket.io 3/4) or 3
    /// (socket.io 2.x). Engine.IO 3 clients ping the server themselves;
    /// the bench's do not, so a run must end within the server's interval +
    /// timeout (45 s by default) of the connections.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u8).range(3..=4))]
    eio: u8,
    /// Clients per source address: 127.0.0.1, 127.0.0.2, ... in turn.
    #[arg(long, default_value_t = 5000)]
    clients_per_source: usize,
    /// Seconds allowed for one client's connect and join.
    #[arg(long, default_value_t = 30.0)]
    connect_timeout: f64,
    /// Seconds allowed, after the last post was answered, for deliveries.
    #[arg(long, default_value_t = 5.0)]
    grace: f64,
    /// Message text length in bytes (at least the "seq:time" header).
    #[arg(long, default_value_t = 0)]
    size: usize,
    /// Posts in flight at once (more wait, still timed from their schedule).
    #[arg(long, default_value_t = 512)]
    max_inflight: usize,
    /// A label copied into the JSON line.
    #[arg(long, default_value = "")]
    label: String,
}

/// The run's shape, after defaults.
#[derive(Debug, Clone)]
struct Shape {
    clients: usize,
    rooms: usize,
    rate: f64,
    duration: f64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let shape = Shape {
        clients: args.clients.unwrap_or(if args.smoke { 50 } else { 1000 }),
        rooms: args.rooms.unwrap_or(if args.smoke { 5 } else { 10 }),
        rate: args.rate.unwrap_or(if args.smoke { 100.0 } else { 1000.0 }),
        duration: args.duration.unwrap_or(if args.smoke { 3.0 } else { 20.0 }),
    };
    if shape.clients == 0 || shape.rooms == 0 || shape.rate <= 0.0 || shape.duration <= 0.0 {
        eprintln!("chat-bench: --clients, --rooms, --rate and --duration must be positive");
        return ExitCode::from(2);
    }
    if let Err(e) = check_args(&args) {
        eprintln!("chat-bench: {e}");
        return ExitCode::from(2);
    }
    let nofile = procfs::raise_nofile_limit();
    if args.client_procs > 1 && !args.idle {
        eprintln!("chat-bench: --client-procs works with --idle only");
        return ExitCode::from(2);
    }
    if args.client_procs <= 1 && !args.worker && shape.clients + 64 > nofile as usize {
        eprintln!(
            "chat-bench: {} clients, but a process may open {nofile} files; spread them with \
             --client-procs (with --idle)",
            shape.clients
        );
        return ExitCode::from(2);
    }
    let default_threads = if args.worker { 1 } else { procfs::cpu_count() };
    let threads = args.threads.unwrap_or(default_threads).max(1);
    // A worker process's clients run on this runtime; otherwise they run on
    // their own threads (`pool`), and this one only coordinates.
    let runtime_threads = if args.worker { threads } else { 1 };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(runtime_threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("chat-bench: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    if args.worker {
        let result = runtime.block_on(worker(&args, &shape));
        runtime.shutdown_timeout(Duration::from_secs(2));
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("chat-bench worker: {e}");
                ExitCode::from(1)
            }
        };
    }
    let abort = Arc::new(AtomicBool::new(false));
    let result = runtime.block_on(async {
        tokio::select! {
            r = run(&args, &shape, threads, nofile, abort.clone()) => r,
            _ = interrupted() => {
                abort.store(true, Ordering::Relaxed);
                Err("interrupted".to_owned())
            }
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(2));
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("chat-bench: {e}");
            ExitCode::from(1)
        }
    }
}

/// Combinations of options that cannot work.
fn check_args(args: &Args) -> Result<(), String> {
    if args.redis_cluster > 0 && args.stack != Stack::ChatHa {
        return Err("--redis-cluster runs chat-ha on a cluster: not another stack".into());
    }
    if args.idle_frontends > 0 && (args.haproxy || !args.frontend_urls.is_empty()) {
        return Err(
            "--idle-frontends starts frontends no client reaches: not with --haproxy, \
             which spreads clients over all, nor with --frontend"
                .into(),
        );
    }
    let one_loop = matches!(args.stack, Stack::Node | Stack::Socketioxide);
    if one_loop && (args.frontend_threads > 1 || args.backend_threads > 1) {
        return Err(format!(
            "--stack {} runs one event loop per process: use --frontends and \
             --backends instead of --frontend-threads and --backend-threads",
            args.stack.name()
        ));
    }
    if args.stack == Stack::Floor
        && (args.frontends != 1
            || args.backends != 1
            || args.frontend_threads > 1
            || args.backend_threads > 1)
    {
        return Err(
            "--stack floor is one single-threaded process: it takes no --frontends, \
             --backends or threads"
                .into(),
        );
    }
    Ok(())
}

/// A client process of `--client-procs` (see `workers`).
async fn worker(args: &Args, shape: &Shape) -> Result<(), String> {
    let mut fronts = Vec::new();
    for url in &args.frontend_urls {
        fronts.push(target(url).await?);
    }
    if fronts.is_empty() {
        return Err("no --frontend".into());
    }
    let shared = Arc::new(client::Shared::new(
        shape.rooms,
        args.connect_concurrency,
        Duration::from_secs_f64(args.connect_timeout),
    ));
    workers::work(
        args.client_offset,
        shape.clients,
        shape.rooms,
        &fronts,
        shared,
        args.clients_per_source,
        args.eio == 3,
    )
    .await
}

async fn interrupted() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn repo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// `http://127.0.0.1:9100/...`, `ws://...` or `127.0.0.1:9100` → a loopback address.
async fn target(url: &str) -> Result<SocketAddr, String> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    let addr = tokio::net::lookup_host(authority)
        .await
        .map_err(|e| format!("{url}: {e}"))?
        .find(|a| a.ip().is_loopback())
        .ok_or_else(|| {
            format!(
                "{url}: not a loopback address; this benchmark only targets 127.0.0.0/8 and ::1"
            )
        })?;
    Ok(addr)
}

fn lb_processes(args: &Args, clients: usize, nofile: u64) -> (usize, usize) {
    if !args.haproxy {
        return (0, 0);
    }
    // Two descriptors per proxied connection, plus room for posts and checks.
    let conns = clients + args.max_inflight + 64;
    let per_process = ((nofile.max(2048) as usize - 200) / 2).max(512);
    let procs = args
        .haproxy_procs
        .unwrap_or_else(|| conns.div_ceil(per_process).max(1));
    let maxconn = (conns.div_ceil(procs) * 5 / 4 + 64).min(per_process);
    (procs, maxconn)
}

/// Runs the benchmark; `Ok(false)` when a smoke run found a failure.
async fn run(
    args: &Args,
    shape: &Shape,
    threads: usize,
    nofile: u64,
    abort: Arc<AtomicBool>,
) -> Result<bool, String> {
    // --- topology ---
    let mut topology = None;
    let (fronts, backs, mut measured): (Vec<SocketAddr>, Vec<SocketAddr>, Vec<Measured>) =
        if args.frontend_urls.is_empty() {
            let (lb_processes, lb_maxconn) = lb_processes(args, shape.clients, nofile);
            let plan = topology::Plan {
                stack: args.stack,
                node_bin: args.node_bin.clone(),
                node_dir: repo_dir().join("bench/node"),
                bin_dir: args.bin_dir.clone().unwrap_or_else(|| {
                    std::env::var_os("CHAT_HA_BIN_DIR")
                        .map(PathBuf::from)
                        .unwrap_or_else(|| repo_dir().join("target/release"))
                }),
                www_dir: repo_dir().join("share/www"),
                repo_dir: repo_dir(),
                redis_server: args.redis_server.clone(),
                lb_bin: args.haproxy_bin.clone(),
                frontends: args.frontends.max(1) + args.idle_frontends,
                backends: args.backends.max(1),
                frontend_threads: args.frontend_threads.max(1),
                backend_threads: args.backend_threads.max(1),
                pin: !args.no_pin,
                lb_processes,
                lb_maxconn,
                redis_replicas: args.redis_replicas,
                replicas_acked: args.replicas_acked,
                redis_cluster: args.redis_cluster,
                write_window_us: args.write_window_us,
                keep_dir: args.keep_logs,
            };
            let topo = Topology::start(&plan)?;
            if args.keep_logs {
                eprintln!(
                    "chat-bench: logs and configuration in {}",
                    topo.dir.display()
                );
            }
            // The idle frontends were started last: no client goes there.
            let served = topo.frontend_addrs.len().min(args.frontends.max(1));
            let t = (
                topo.frontend_addrs[..served].to_vec(),
                topo.backend_addrs.clone(),
                topo.measured.clone(),
            );
            topology = Some(topo);
            t
        } else {
            let mut fronts = Vec::new();
            for url in &args.frontend_urls {
                fronts.push(target(url).await?);
            }
            let mut backs = Vec::new();
            for url in &args.backend_urls {
                backs.push(target(url).await?);
            }
            if backs.is_empty() && !args.idle {
                return Err("--frontend needs --backend too (or --idle)".into());
            }
            (fronts, backs, Vec::new())
        };
    for &pid in &args.pids {
        if procfs::comm(pid).is_none() {
            return Err(format!("--pid {pid}: no such process"));
        }
        let role = Role::of_pid(pid);
        measured.push(Measured {
            role,
            name: format!("{}-pid{pid}", role.name()),
            pid,
        });
    }
    let hogs = CpuHogs::start(args.cpu_hogs)?;
    let result = if args.client_procs > 1 {
        measure_spread(args, shape, &fronts, &measured).await
    } else {
        measure(args, shape, threads, &fronts, &backs, &measured, abort).await
    };
    drop(hogs);
    if let Some(mut topo) = topology {
        // Stopping blocks briefly; do it off the runtime's worker.
        tokio::task::block_in_place(|| topo.stop(Duration::from_secs(8)));
    }
    result
}

/// Busy loops beside the servers (`--cpu-hogs`), killed by PID when dropped.
struct CpuHogs(Vec<std::process::Child>);

impl CpuHogs {
    fn start(count: usize) -> Result<Self, String> {
        let mut hogs = CpuHogs(Vec::with_capacity(count));
        for _ in 0..count {
            let hog = std::process::Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .spawn()
                .map_err(|e| format!("cannot start a CPU hog: {e}"))?;
            eprintln!("chat-bench: started a CPU hog, pid {}", hog.id());
            hogs.0.push(hog);
        }
        Ok(hogs)
    }
}

impl Drop for CpuHogs {
    fn drop(&mut self) {
        for hog in &mut self.0 {
            let _ = hog.kill();
            let _ = hog.wait();
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn measure(
    args: &Args,
    shape: &Shape,
    threads: usize,
    fronts: &[SocketAddr],
    backs: &[SocketAddr],
    measured: &[Measured],
    abort: Arc<AtomicBool>,
) -> Result<bool, String> {
    let rooms: Vec<String> = (0..shape.rooms).map(|r| format!("bench-r{r}")).collect();
    let frontend_pids = frontends(measured);

    let netstat_start = procfs::tcp_ext();
    let rss_before = rss(&frontend_pids);

    // --- connect and join ---
    let shared = Arc::new(client::Shared::new(
        shape.rooms,
        args.connect_concurrency,
        Duration::from_secs_f64(args.connect_timeout),
    ));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let per_source = args.clients_per_source.max(1);
    let mut handles = Vec::with_capacity(shape.clients);
    let pool = pool::ClientPool::new(threads)?;
    let connect_cpu_start = cpu_snapshot(measured);
    let connect_self_start = procfs::self_cpu();
    eprintln!(
        "chat-bench: connecting {} clients to {} room(s) via {} address(es)",
        shape.clients,
        shape.rooms,
        fronts.len()
    );
    for id in 0..shape.clients {
        let spec = client::Spec::new(id, per_source, fronts, &rooms)?.speaking_eio3(args.eio == 3);
        handles.push(pool.spawn(id, client::run(spec, shared.clone(), stop_rx.clone())));
    }
    let mut last_report = mono_ns();
    loop {
        let done = shared.joined.load(Ordering::Relaxed) + shared.failed.load(Ordering::Relaxed);
        if done >= shape.clients {
            break;
        }
        if mono_ns() - last_report > 2_000_000_000 {
            eprintln!(
                "chat-bench: {} joined, {} failed",
                shared.joined.load(Ordering::Relaxed),
                shared.failed.load(Ordering::Relaxed)
            );
            last_report = mono_ns();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut connect_cpu = cpu_delta(measured, &connect_cpu_start, &cpu_snapshot(measured));
    // The clients' share of the cores bounds the connects/s as much as the servers do.
    let connect_self = procfs::self_cpu().since(connect_self_start);
    connect_cpu.insert("bench".into(), cpu_json(connect_self));
    let joined = shared.joined.load(Ordering::Relaxed);
    let failed_connects = shared.failed.load(Ordering::Relaxed);
    let first_start = shared.first_start_ns.load(Ordering::Relaxed);
    let last_joined = shared.last_joined_ns.load(Ordering::Relaxed);
    let connect_secs = if joined > 0 && last_joined > first_start {
        (last_joined - first_start) as f64 / 1e9
    } else {
        0.0
    };
    let connects_per_s = if connect_secs > 0.0 {
        joined as f64 / connect_secs
    } else {
        0.0
    };
    let setup_hist = shared.setup.lock().unwrap().clone();
    eprintln!(
        "chat-bench: {joined} joined, {failed_connects} failed in {connect_secs:.2} s ({connects_per_s:.0}/s)"
    );
    let rss_joined = rss(&frontend_pids);

    let mut report = json!({
        "label": args.label,
        "mode": if args.smoke { "smoke" } else if args.idle { "idle" } else { "load" },
        "stack": args.stack.name(),
        "clients": shape.clients,
        "rooms": shape.rooms,
        "frontends": fronts.len(),
        "backends": backs.len(),
        "haproxy": args.haproxy,
        "redis_replicas": args.redis_replicas,
        "redis_cluster": args.redis_cluster,
        "write_window_us": args.write_window_us,
        "cpu_hogs": args.cpu_hogs,
        "eio": args.eio,
        "replicas_acked": if args.redis_replicas > 0 { json!(args.replicas_acked) } else { Value::Null },
        "client_threads": threads,
        "connect_concurrency": args.connect_concurrency,
        "joined": joined,
        "failed_connects": failed_connects,
        "connect_s": round3(connect_secs),
        "connects_per_s": connects_per_s.round(),
        "setup_ms": quantiles(&setup_hist),
        "connect_cpu": Value::Object(connect_cpu),
    });

    let mut ok = failed_connects == 0 && joined == shape.clients;
    if args.idle {
        let (idle_s, idle_cpu) = idle_window(measured, args.idle_wait).await;
        let rss_idle = rss(&frontend_pids);
        report["idle_s"] = json!(round3(idle_s));
        report["idle_cpu"] = Value::Object(idle_cpu);
        report["memory"] =
            memory_report(&frontend_pids, &rss_before, &rss_idle, joined, fronts.len());
        report["memory_at_join"] = memory_report(
            &frontend_pids,
            &rss_before,
            &rss_joined,
            joined,
            fronts.len(),
        );
        let _ = stop_tx.send(true);
        let mut dropped = 0;
        for h in handles {
            let _ = h.await;
        }
        dropped += shared.dropped.load(Ordering::Relaxed);
        report["dropped"] = json!(dropped);
        ok &= dropped == 0;
        report["tcp_ext_delta"] = netstat_delta(&netstat_start);
        report["errors"] = json!(*shared.errors.lock().unwrap());
        print_report(&report);
        return Ok(ok || !args.smoke);
    }

    // --- post ---
    let total = (shape.rate * shape.duration).round() as u64;
    let start_ns = mono_ns() + 200_000_000;
    let plan = poster::Plan {
        backends: backs.to_vec(),
        rooms: rooms.clone(),
        rate: shape.rate,
        total,
        start_ns,
        size: args.size,
        max_inflight: args.max_inflight,
        timeout: Duration::from_secs(10),
    };
    let window_start_ns = mono_ns();
    let cpu_start = cpu_snapshot(measured);
    let self_start = procfs::self_cpu();
    let machine_start = procfs::machine_cpu();
    let load_start = procfs::loadavg();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let poster_abort = abort.clone();
    std::thread::Builder::new()
        .name("poster".into())
        .spawn(move || {
            let _ = tx.send(poster::run(plan, poster_abort));
        })
        .map_err(|e| format!("poster thread: {e}"))?;
    eprintln!("chat-bench: posting {total} messages at {}/s", shape.rate);
    let posts = rx.await.map_err(|_| "the poster thread died".to_owned())?;

    // Expected deliveries: every accepted post, to every joined member of its room.
    let members: Vec<u64> = shared
        .joined_in_room
        .iter()
        .map(|n| n.load(Ordering::Relaxed) as u64)
        .collect();
    let accepted_per_room: Vec<u64> = posts
        .accepted
        .iter()
        .map(|bits| bits.iter().map(|w| u64::from(w.count_ones())).sum())
        .collect();
    let expected_now: u64 = accepted_per_room
        .iter()
        .zip(&members)
        .map(|(a, m)| a * m)
        .sum();
    let grace_deadline = mono_ns() + (args.grace * 1e9) as u64;
    while shared.delivered() < expected_now && mono_ns() < grace_deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let end_ns = mono_ns();
    let cpu_end = cpu_snapshot(measured);
    let self_end = procfs::self_cpu();
    let machine_end = procfs::machine_cpu();
    let window_s = (end_ns - window_start_ns) as f64 / 1e9;

    let _ = stop_tx.send(true);
    let mut outcomes = Vec::with_capacity(handles.len());
    for h in handles {
        if let Ok(o) = h.await {
            outcomes.push(o);
        }
    }
    let mut expected = 0u64;
    let mut delivered = 0u64;
    let mut lost = 0u64;
    let mut duplicated = 0u64;
    let mut unaccepted_delivered = 0u64;
    let mut foreign = 0u64;
    for o in &outcomes {
        if !o.joined {
            continue;
        }
        let accepted = &posts.accepted[o.room_index];
        expected += accepted_per_room[o.room_index];
        delivered += o.unique;
        duplicated += o.duplicates;
        foreign += o.foreign;
        for (i, word) in accepted.iter().enumerate() {
            let seen = o.seen.get(i).copied().unwrap_or(0);
            lost += u64::from((word & !seen).count_ones());
        }
        for (i, seen) in o.seen.iter().enumerate() {
            let word = accepted.get(i).copied().unwrap_or(0);
            unaccepted_delivered += u64::from((seen & !word).count_ones());
        }
    }
    let dropped = shared.dropped.load(Ordering::Relaxed);
    let last_delivery = shared.last_delivery_ns();
    let delivery_span = (last_delivery.max(start_ns) - start_ns) as f64 / 1e9;
    let delivered_per_s = delivered as f64 / delivery_span.max(shape.duration);
    let latency = shared.latency();

    // CPU during the window, by role.
    let mut by_role: BTreeMap<Role, CpuTimes> = BTreeMap::new();
    let mut per_process = Vec::new();
    for (m, (start, end)) in measured.iter().zip(cpu_start.iter().zip(&cpu_end)) {
        if let (Some(s), Some(e)) = (start, end) {
            let d = e.since(*s);
            by_role.entry(m.role).or_default().add(d);
            // What each process spends per accepted post: a frontend with
            // no client in a room should spend nothing on its posts.
            let per_post =
                (posts.ok > 0).then(|| round3((d.user + d.system) * 1e6 / posts.ok as f64));
            per_process.push(json!({"name": m.name, "pid": m.pid, "user_s": round3(d.user), "system_s": round3(d.system), "us_per_post": per_post}));
        }
    }
    let bench_cpu = self_end.since(self_start);
    let role_cpu = |r: Role| by_role.get(&r).copied().unwrap_or_default();
    let (fe, be, rd, lb) = (
        role_cpu(Role::Frontend),
        role_cpu(Role::Backend),
        role_cpu(Role::Redis),
        role_cpu(Role::Lb),
    );
    let us_per = |secs: f64, n: u64| {
        if n > 0 {
            json!(round3(secs * 1e6 / n as f64))
        } else {
            Value::Null
        }
    };
    let server_user = fe.user + be.user + rd.user;
    let server_system = fe.system + be.system + rd.system;
    let mut cpu = serde_json::Map::new();
    for (role, t) in &by_role {
        cpu.insert(role.name().into(), cpu_json(*t));
    }
    cpu.insert("bench".into(), cpu_json(bench_cpu));
    // The whole machine (tick-sampled, so only roughly comparable with the
    // per-process figures): other processes' work skews results.
    if let (Some((busy0, total0)), Some((busy1, total1))) = (machine_start, machine_end) {
        report["machine"] = json!({
            "cpus": procfs::cpu_count(),
            "busy_s": round3(busy1 - busy0),
            "capacity_s": round3(total1 - total0),
            "loadavg_1m_at_start": load_start,
        });
    }

    report["rate"] = json!(shape.rate);
    report["duration_s"] = json!(shape.duration);
    report["message_bytes"] = json!(args.size);
    report["posts"] = json!({
        "sent": posts.sent,
        "accepted": posts.ok,
        "failed": posts.failed,
        "statuses": posts.statuses,
        "latency_ms": quantiles(&posts.latency),
        "send_lag_ms": quantiles(&posts.lag),
        "errors": posts.errors,
    });
    report["expected"] = json!(expected);
    report["delivered"] = json!(delivered);
    report["delivered_per_s"] = json!(delivered_per_s.round());
    report["delivery_span_s"] = json!(round3(delivery_span));
    report["lost"] = json!(lost);
    report["duplicated"] = json!(duplicated);
    report["delivered_unaccepted"] = json!(unaccepted_delivered);
    report["foreign"] = json!(foreign);
    report["dropped"] = json!(dropped);
    report["latency_ms"] = quantiles(&latency);
    report["cpu_window_s"] = json!(round3(window_s));
    report["cpu"] = Value::Object(cpu);
    report["cpu_per_process"] = json!(per_process);
    report["server_cpu_us_per_delivery"] = json!({
        "user": us_per(server_user, delivered),
        "system": us_per(server_system, delivered),
    });
    if args.haproxy {
        report["lb_cpu_us_per_delivery"] = json!({
            "user": us_per(lb.user, delivered),
            "system": us_per(lb.system, delivered),
        });
    }
    report["backend_cpu_us_per_post"] = json!({
        "user": us_per(be.user, posts.ok),
        "system": us_per(be.system, posts.ok),
    });
    report["memory"] = memory_report(
        &frontend_pids,
        &rss_before,
        &rss_joined,
        joined,
        fronts.len(),
    );
    report["tcp_ext_delta"] = netstat_delta(&netstat_start);
    report["errors"] = json!(*shared.errors.lock().unwrap());
    print_report(&report);

    ok &= lost == 0 && duplicated == 0 && posts.failed == 0 && dropped == 0 && foreign == 0;
    ok &= posts.sent == total;
    Ok(ok || !args.smoke)
}

/// `--idle` with the clients spread over `--client-procs` processes: the
/// same measurement as `measure`, the clients' figures summed over workers.
async fn measure_spread(
    args: &Args,
    shape: &Shape,
    fronts: &[SocketAddr],
    measured: &[Measured],
) -> Result<bool, String> {
    let procs = args.client_procs;
    let share = shape.clients.div_ceil(procs);
    let nofile = procfs::raise_nofile_limit() as usize;
    if share + 64 > nofile {
        return Err(format!(
            "{share} clients per process, but a process may open {nofile} files; raise --client-procs"
        ));
    }
    let frontend_pids = frontends(measured);
    let netstat_start = procfs::tcp_ext();
    let rss_before = rss(&frontend_pids);
    let worker_args = vec![
        "--idle".to_owned(),
        format!("--rooms={}", shape.rooms),
        format!(
            "--connect-concurrency={}",
            (args.connect_concurrency / procs).max(1)
        ),
        format!("--clients-per-source={}", args.clients_per_source),
        format!("--connect-timeout={}", args.connect_timeout),
        format!("--threads={}", args.threads.unwrap_or(1)),
        format!("--eio={}", args.eio),
    ];
    eprintln!(
        "chat-bench: connecting {} clients to {} room(s) via {} address(es), from {procs} processes",
        shape.clients,
        shape.rooms,
        fronts.len()
    );
    let mut workers = tokio::task::block_in_place(|| {
        workers::Workers::start(procs, shape.clients, fronts, &worker_args)
    })?;
    let joins = tokio::task::block_in_place(|| workers.joined())?;
    let sum = |list: &[Value], key: &str| {
        list.iter()
            .map(|r| r[key].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    let joined = sum(&joins, "joined") as usize;
    let failed_connects = sum(&joins, "failed") as usize;
    let first_start = joins
        .iter()
        .filter_map(|r| r["first_start_ns"].as_u64())
        .min()
        .unwrap_or(0);
    let last_joined = joins
        .iter()
        .filter_map(|r| r["last_joined_ns"].as_u64())
        .max()
        .unwrap_or(0);
    let connect_secs = if joined > 0 && last_joined > first_start {
        (last_joined - first_start) as f64 / 1e9
    } else {
        0.0
    };
    eprintln!("chat-bench: {joined} joined, {failed_connects} failed in {connect_secs:.2} s");
    let rss_joined = rss(&frontend_pids);

    let (idle_s, idle_cpu) = idle_window(measured, args.idle_wait).await;
    let rss_idle = rss(&frontend_pids);
    let per_frontend: Vec<Value> = frontend_pids
        .iter()
        .zip(&rss_idle)
        .map(|(m, r)| json!({"name": m.name, "pid": m.pid, "rss_bytes": r, "open_files_limit": procfs::nofile_limit(m.pid)}))
        .collect();
    let ends = tokio::task::block_in_place(|| workers.stop())?;
    let dropped = sum(&ends, "dropped");
    let errors: Vec<Value> = ends
        .iter()
        .flat_map(|r| r["errors"].as_array().cloned().unwrap_or_default())
        .take(10)
        .collect();
    let report = json!({
        "label": args.label,
        "mode": "idle",
        "stack": args.stack.name(),
        "clients": shape.clients,
        "rooms": shape.rooms,
        "frontends": fronts.len(),
        "backends": 0,
        "haproxy": args.haproxy,
        "client_procs": joins.len(),
        "connect_concurrency": args.connect_concurrency,
        "joined": joined,
        "failed_connects": failed_connects,
        "connect_s": round3(connect_secs),
        "connects_per_s": if connect_secs > 0.0 { (joined as f64 / connect_secs).round() } else { 0.0 },
        "setup_ms": Value::Null,
        "workers": joins,
        "idle_s": round3(idle_s),
        "idle_cpu": Value::Object(idle_cpu),
        "memory": memory_report(&frontend_pids, &rss_before, &rss_idle, joined, fronts.len()),
        "memory_at_join": memory_report(&frontend_pids, &rss_before, &rss_joined, joined, fronts.len()),
        "frontend_rss": per_frontend,
        "dropped": dropped,
        "tcp_ext_delta": netstat_delta(&netstat_start),
        "errors": errors,
    });
    print_report(&report);
    let ok = failed_connects == 0 && joined == shape.clients && dropped == 0;
    Ok(ok || !args.smoke)
}

/// Waits `seconds` with the clients idle; returns how long that took and the
/// CPU each measured process used meanwhile.
async fn idle_window(measured: &[Measured], seconds: f64) -> (f64, serde_json::Map<String, Value>) {
    let t0 = mono_ns();
    let start = cpu_snapshot(measured);
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    let end = cpu_snapshot(measured);
    let elapsed = (mono_ns() - t0) as f64 / 1e9;
    (elapsed, cpu_delta(measured, &start, &end))
}

/// Each measured process's CPU between two snapshots, by name.
fn cpu_delta(
    measured: &[Measured],
    start: &[Option<CpuTimes>],
    end: &[Option<CpuTimes>],
) -> serde_json::Map<String, Value> {
    let mut cpu = serde_json::Map::new();
    for (m, (s0, s1)) in measured.iter().zip(start.iter().zip(end)) {
        if let (Some(a), Some(b)) = (s0, s1) {
            cpu.insert(m.name.clone(), cpu_json(b.since(*a)));
        }
    }
    cpu
}

/// The frontends among the measured processes.
fn frontends(measured: &[Measured]) -> Vec<&Measured> {
    measured
        .iter()
        .filter(|m| m.role == Role::Frontend)
        .collect()
}

/// The resident memory of each of `list` now.
fn rss(list: &[&Measured]) -> Vec<Option<u64>> {
    list.iter().map(|m| procfs::rss_bytes(m.pid)).collect()
}

fn cpu_snapshot(measured: &[Measured]) -> Vec<Option<CpuTimes>> {
    measured.iter().map(|m| procfs::cpu(m.pid)).collect()
}

/// CPU seconds as the report gives them.
fn cpu_json(t: CpuTimes) -> Value {
    json!({"user_s": round3(t.user), "system_s": round3(t.system)})
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// p50 … max of a µs histogram, in ms.
fn quantiles(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!(null);
    }
    let ms = |us: u64| round3(us as f64 / 1000.0);
    json!({
        "count": h.len(),
        "p50": ms(h.value_at_quantile(0.50)),
        "p90": ms(h.value_at_quantile(0.90)),
        "p99": ms(h.value_at_quantile(0.99)),
        "p99.9": ms(h.value_at_quantile(0.999)),
        "max": ms(h.max()),
        "mean": round3(h.mean() / 1000.0),
    })
}

fn memory_report(
    frontends: &[&Measured],
    before: &[Option<u64>],
    after: &[Option<u64>],
    joined: usize,
    targets: usize,
) -> Value {
    if frontends.is_empty() {
        return json!(null);
    }
    let sum = |v: &[Option<u64>]| v.iter().map(|x| x.unwrap_or(0)).sum::<u64>();
    let (b, a) = (sum(before), sum(after));
    let growth = a.saturating_sub(b);
    // Only meaningful when the measured frontends hold all the connections.
    let per_connection = if joined > 0 && (targets == frontends.len() || targets == 1) {
        json!((growth as f64 / joined as f64).round() as u64)
    } else {
        json!(null)
    };
    json!({
        "frontend_rss_before_bytes": b,
        "frontend_rss_after_bytes": a,
        "frontend_rss_growth_bytes": growth,
        "bytes_per_connection": per_connection,
    })
}

fn netstat_delta(start: &BTreeMap<String, u64>) -> Value {
    let end = procfs::tcp_ext();
    let mut delta = serde_json::Map::new();
    for key in [
        "ListenOverflows",
        "ListenDrops",
        "TCPTimeouts",
        "TCPAbortOnMemory",
        "TCPBacklogDrop",
    ] {
        if let (Some(s), Some(e)) = (start.get(key), end.get(key)) {
            delta.insert(key.into(), json!(e.saturating_sub(*s)));
        }
    }
    Value::Object(delta)
}

fn print_report(r: &Value) {
    println!("{r}");
    let q = |v: &Value| {
        if v.is_null() {
            return "-".to_owned();
        }
        format!(
            "p50 {} p90 {} p99 {} p99.9 {} max {} ms",
            v["p50"], v["p90"], v["p99"], v["p99.9"], v["max"]
        )
    };
    let mut s = String::new();
    s += &format!(
        "chat-bench [{}] {}: {} clients{}, {} rooms, {} frontend target(s), {} backend target(s){}{}\n",
        r["mode"].as_str().unwrap_or(""),
        r["stack"].as_str().unwrap_or(""),
        r["clients"],
        if r["eio"] == 3 {
            " (socket.io 2.x: Engine.IO 3)"
        } else {
            ""
        },
        r["rooms"],
        r["frontends"],
        r["backends"],
        if r["haproxy"] == true {
            ", through the load balancer"
        } else {
            ""
        },
        match (r["redis_cluster"].as_u64(), r["redis_replicas"].as_u64()) {
            (Some(c), Some(n)) if c > 0 && n > 0 => format!(
                ", a Redis Cluster of {c} primaries with {n} replicas each, {} acknowledging each post",
                r["replicas_acked"]
            ),
            (Some(c), _) if c > 0 => format!(", a Redis Cluster of {c} primaries"),
            (_, Some(n)) if n > 0 => format!(
                ", Redis with {n} replicas behind a Sentinel, {} acknowledging each post",
                r["replicas_acked"]
            ),
            _ => String::new(),
        } + &match r["write_window_us"].as_u64() {
            Some(us) => format!(", a write window of {us} µs"),
            None => String::new(),
        } + &match r["cpu_hogs"].as_u64() {
            Some(n) if n > 0 => format!(", beside {n} CPU hog(s)"),
            _ => String::new(),
        }
    );
    s += &format!(
        "  connect   {} joined, {} failed in {} s: {} connects/s; setup {}\n",
        r["joined"],
        r["failed_connects"],
        r["connect_s"],
        r["connects_per_s"],
        q(&r["setup_ms"])
    );
    if !r["posts"].is_null() {
        let p = &r["posts"];
        s += &format!(
            "  posts     {} at {}/s for {} s: {} accepted, {} failed; answered {}; send lag {}\n",
            p["sent"],
            r["rate"],
            r["duration_s"],
            p["accepted"],
            p["failed"],
            q(&p["latency_ms"]),
            q(&p["send_lag_ms"])
        );
        s += &format!(
            "  delivery  {} expected, {} delivered ({}/s over {} s), {} lost, {} duplicated, {} dropped connections\n",
            r["expected"],
            r["delivered"],
            r["delivered_per_s"],
            r["delivery_span_s"],
            r["lost"],
            r["duplicated"],
            r["dropped"]
        );
        s += &format!("  latency   {}\n", q(&r["latency_ms"]));
        let mut cpu = format!("  cpu       over {} s:", r["cpu_window_s"]);
        if let Some(map) = r["cpu"].as_object() {
            for (role, t) in map {
                cpu += &format!(" {role} {}u+{}s", t["user_s"], t["system_s"]);
            }
        }
        s += &cpu;
        s += "\n";
        let m = &r["machine"];
        if !m.is_null() {
            s += &format!(
                "  machine   {} CPUs: {} of {} CPU-s busy (load {} at start)\n",
                m["cpus"], m["busy_s"], m["capacity_s"], m["loadavg_1m_at_start"]
            );
        }
        s += &format!(
            "  per unit  servers {} µs user + {} µs sys per delivery; backend {} µs user + {} µs sys per post\n",
            r["server_cpu_us_per_delivery"]["user"],
            r["server_cpu_us_per_delivery"]["system"],
            r["backend_cpu_us_per_post"]["user"],
            r["backend_cpu_us_per_post"]["system"],
        );
        if let Some(processes) = r["cpu_per_process"].as_array() {
            let each: Vec<String> = processes
                .iter()
                .map(|p| format!("{} {}", p["name"].as_str().unwrap_or("?"), p["us_per_post"]))
                .collect();
            s += &format!("  per post  µs of CPU: {}\n", each.join(", "));
        }
    }
    if let Some(cpu) = r["connect_cpu"].as_object() {
        s += &format!(
            "  connect cpu (all connections): {}\n",
            Value::Object(cpu.clone())
        );
    }
    if let Some(idle) = r["idle_cpu"].as_object() {
        s += &format!(
            "  idle cpu  over {} s: {}\n",
            r["idle_s"],
            Value::Object(idle.clone())
        );
    }
    for key in ["memory_at_join", "memory"] {
        let m = &r[key];
        if !m.is_null() {
            s += &format!(
                "  {key:<9} frontend RSS {:.1} MiB -> {:.1} MiB: {} bytes per connection\n",
                m["frontend_rss_before_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
                m["frontend_rss_after_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
                m["bytes_per_connection"],
            );
        }
    }
    if let Some(list) = r["frontend_rss"].as_array() {
        let mib: Vec<String> = list
            .iter()
            .map(|f| format!("{:.1}", f["rss_bytes"].as_f64().unwrap_or(0.0) / 1048576.0))
            .collect();
        s += &format!(
            "  frontends {} instances, {} client processes: RSS {} MiB\n",
            list.len(),
            r["client_procs"],
            mib.join(" + ")
        );
    }
    s += &format!("  kernel    {}\n", r["tcp_ext_delta"]);
    if let Some(errors) = r["errors"].as_array()
        && !errors.is_empty()
    {
        s += &format!("  errors    {}\n", r["errors"]);
    }
    eprint!("{s}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("chat-bench").chain(args.iter().copied()))
    }

    #[test]
    fn the_stack_is_chat_ha_unless_told() {
        let args = parse(&[]).unwrap();
        assert_eq!(args.stack, Stack::ChatHa);
        assert_eq!(args.node_bin, PathBuf::from("node"));
        assert!(check_args(&args).is_ok());
        let args = parse(&["--stack", "node", "--node-bin", "/opt/node/bin/node"]).unwrap();
        assert_eq!(args.stack, Stack::Node);
        assert_eq!(args.stack.name(), "node");
        assert_eq!(args.node_bin, PathBuf::from("/opt/node/bin/node"));
        assert!(check_args(&args).is_ok());
        assert_eq!(
            parse(&["--stack", "chat-ha"]).unwrap().stack.name(),
            "chat-ha"
        );
        assert!(parse(&["--stack", "deno"]).is_err());
    }

    #[test]
    fn the_floor_is_one_process() {
        let args = parse(&["--stack", "floor"]).unwrap();
        assert_eq!(args.stack.name(), "floor");
        assert!(check_args(&args).is_ok());
        // Behind the load balancer, both paths lead to it.
        assert!(check_args(&parse(&["--stack", "floor", "--haproxy"]).unwrap()).is_ok());
        for extra in [
            &["--frontends", "2"][..],
            &["--backends", "2"],
            &["--frontend-threads", "2"],
        ] {
            let mut all = vec!["--stack", "floor"];
            all.extend_from_slice(extra);
            assert!(check_args(&parse(&all).unwrap()).is_err(), "{extra:?}");
        }
    }

    #[test]
    fn node_and_plain_socketioxide_have_no_runtime_threads_to_set() {
        for stack in ["node", "socketioxide"] {
            let args = parse(&["--stack", stack, "--frontend-threads", "2"]).unwrap();
            assert_eq!(args.stack.name(), stack);
            let error = check_args(&args).unwrap_err();
            assert!(
                error.contains("--frontends") && error.contains(stack),
                "{error}"
            );
            let args = parse(&["--stack", stack, "--backend-threads", "2"]).unwrap();
            assert!(check_args(&args).is_err());
            let args = parse(&["--stack", stack, "--frontends", "2", "--backends", "2"]).unwrap();
            assert!(check_args(&args).is_ok());
        }
        let args = parse(&["--frontend-threads", "2"]).unwrap();
        assert!(check_args(&args).is_ok());
    }

    #[test]
    fn every_mode_takes_the_stack() {
        for extra in [
            &["--idle", "--idle-wait", "0"][..],
            &["--haproxy"][..],
            &["--idle", "--client-procs", "2"][..],
        ] {
            let mut all = vec!["--stack", "node"];
            all.extend_from_slice(extra);
            let args = parse(&all).unwrap();
            assert_eq!(args.stack, Stack::Node);
            assert!(check_args(&args).is_ok());
        }
    }
}
