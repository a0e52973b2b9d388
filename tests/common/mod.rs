//! Helpers for the integration tests: a real `redis-server` on a free port,
//! the daemons as real processes, and waiting with a deadline.
#![allow(dead_code)] // each test binary uses a different subset

pub mod cluster;
pub mod sentinel;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `check` every 20 ms until it returns `Some`, or panics after `limit`
/// naming `what` was awaited.
pub fn wait_for<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process killed (by PID) when dropped.
pub struct Process {
    pub child: Child,
    pub name: String,
}

impl Process {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends `signal` (e.g. libc SIGTERM = 15) to the process.
    pub fn signal(&self, signal: i32) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} {}", self.name);
    }

    /// Waits for the process to exit, at most `limit`.
    pub fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        wait_for(&format!("{} to exit", self.name), limit, || {
            self.child.try_wait().unwrap()
        })
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A private `redis-server` with append-only persistence in a temp dir, so a
/// restart keeps what was stored (as a production Redis with AOF would). It
/// listens on a unix socket in that directory, not on a TCP port: no other
/// process can have taken it.
pub struct Redis {
    dir: tempfile::TempDir,
    process: Option<Process>,
    /// More configuration, as `redis-server` command-line options.
    options: Vec<String>,
}

impl Redis {
    pub fn start() -> Redis {
        Redis::start_with(Vec::new())
    }

    /// Starts a server with more configuration (`--name value...` options).
    pub fn start_with(options: Vec<String>) -> Redis {
        let mut redis = Redis {
            dir: tempfile::tempdir().unwrap(),
            process: None,
            options,
        };
        redis.restart();
        redis
    }

    /// The server's data directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's unix socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("redis.sock")
    }

    pub fn url(&self) -> String {
        format!("unix://{}?db=0", self.socket().display())
    }

    /// The URL with a login, for a connection of the test's own.
    pub fn url_as(&self, user: &str, password: &str) -> String {
        format!("{}&user={user}&pass={password}", self.url())
    }

    /// Starts the server again (after [`Redis::stop`]) on the same socket and data.
    pub fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", "0", "--unixsocketperm", "700", "--save", ""])
            .arg("--unixsocket")
            .arg(self.socket())
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.options)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (make deps-apt)");
        self.process = Some(Process {
            child,
            name: "redis-server".into(),
        });
        let socket = self.socket();
        wait_for(
            "redis-server to accept connections",
            Duration::from_secs(10),
            || redis_ping(&socket).then_some(()),
        );
    }

    /// Stops the server (SIGTERM, so the append-only file is complete).
    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.signal(15);
            process.wait(Duration::from_secs(10));
        }
    }
}

/// Whether a Redis answers on `socket`: a pong, or an error such as NOAUTH
/// from one that wants a login.
fn redis_ping(socket: &Path) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::os::unix::net::UnixStream::connect(socket) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut reply = [0u8; 1];
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut reply).is_ok()
        && matches!(&reply, b"+" | b"-")
}

/// Writes a configuration file for the daemons pointing at `redis_url`.
pub fn write_config(dir: &Path, redis_url: &str, extra: &str) -> PathBuf {
    let path = dir.join("chat-ha.toml");
    let www = Path::new(env!("CARGO_MANIFEST_DIR")).join("share/www");
    let text = format!(
        "[redis]\nurl = \"{redis_url}\"\ncommand_timeout_ms = 1000\nreconnect_min_ms = 50\nreconnect_max_ms = 500\n\
         [frontend]\nwww_dir = \"{}\"\n{extra}\n",
        www.display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// The path of one of this package's binaries.
pub fn binary(name: &str) -> PathBuf {
    match name {
        "chat-frontend" => PathBuf::from(env!("CARGO_BIN_EXE_chat-frontend")),
        "chat-backend" => PathBuf::from(env!("CARGO_BIN_EXE_chat-backend")),
        other => panic!("no binary {other}"),
    }
}

/// True once something accepts TCP connections at `addr`.
pub fn accepts(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// The `user` line of the package chat-redis's ACL for the daemons
/// (`etc/redis/chat-ha-user.acl`), split into words after `user`, with
/// `password_rule` (`>secret` or `#sha256`) for its password; without the
/// rule the Redis on this machine does not know (CLIENT SETINFO came with
/// Redis 7.2).
pub fn chat_ha_acl_rules(password_rule: &str) -> Vec<String> {
    let knows_setinfo = redis_version() >= (7, 2);
    acl_rules("chat-ha-user.acl", "chat-ha", password_rule)
        .into_iter()
        .filter(|word| knows_setinfo || *word != "+client|setinfo")
        .collect()
}

/// The `user NAME` line of the shipped ACL file `etc/redis/FILE`, split
/// into words after `user`, with `password_rule` for its password.
pub fn acl_rules(file: &str, name: &str, password_rule: &str) -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("etc/redis")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("user {name} ")))
        .unwrap_or_else(|| panic!("{}: no user {name} line", path.display()));
    line.split_whitespace()
        .skip(1)
        .map(|word| word.replace("@PASSWORD@", password_rule))
        .collect()
}

/// The version of `redis-server` on this machine, major and minor.
fn redis_version() -> (u32, u32) {
    let version = Command::new("redis-server")
        .arg("--version")
        .output()
        .unwrap();
    let version = String::from_utf8_lossy(&version.stdout).into_owned();
    version
        .split("v=")
        .nth(1)
        .and_then(|v| {
            let mut parts = v.split('.').map(|n| n.parse::<u32>().unwrap_or(0));
            Some((parts.next()?, parts.next()?))
        })
        .unwrap_or_else(|| panic!("no version in {version:?}"))
}

/// A message for `room` that passed every check.
pub fn post(room: &str, text: &str) -> chat_ha::message::PostMessage {
    chat_ha::message::PostMessage {
        room: chat_ha::message::Room::parse(room).unwrap(),
        text: text.to_owned(),
    }
}

/// A feed's subscriber that passes every delivered message on to a channel.
pub struct Forward(pub tokio::sync::mpsc::UnboundedSender<chat_ha::message::ChatMessage>);

impl chat_ha::delivery::Subscriber for Forward {
    async fn left(&self, _room: &chat_ha::message::Room) {}
    async fn deliver(&self, messages: Vec<chat_ha::message::ChatMessage>) {
        for message in messages {
            let _ = self.0.send(message);
        }
    }
}

/// A daemon started on any free ports: where the kernel put them, read from
/// its log, so that no other process can have taken them meanwhile.
pub struct Daemon {
    pub process: Process,
    pub public: SocketAddr,
    pub metrics: SocketAddr,
    /// Every line it logged so far.
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Daemon {
    /// What it logged so far, one line each.
    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

/// `name`'s command line with `config`, listening on `ip` and the metrics on
/// loopback, both on ports the kernel picks.
pub fn daemon_on_any_port(name: &str, config: &Path, ip: &str) -> Command {
    let mut command = Command::new(binary(name));
    command
        .arg("--config")
        .arg(config)
        .arg(format!("--listen={ip}:0"))
        .arg("--metrics-listen=127.0.0.1:0");
    command
}

/// Starts `command` and reads from its log (stderr, drained for as long as
/// it runs) where it listens and serves its metrics.
pub fn start_daemon(name: &str, command: &mut Command) -> Daemon {
    use std::io::BufRead;
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (lines, read) = std::sync::mpsc::channel();
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = log.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            kept.lock().unwrap().push(line.clone());
            let _ = lines.send(line);
        }
    });
    let mut process = Process {
        child,
        name: name.into(),
    };
    let address_after = |line: &str, marker: &str| {
        let at = line.find(marker)? + marker.len();
        line[at..]
            .split_whitespace()
            .next()?
            .parse::<SocketAddr>()
            .ok()
    };
    let (mut public, mut metrics) = (None, None);
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while public.is_none() || metrics.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        match read.recv_timeout(left) {
            Ok(line) => {
                public = public.or(address_after(&line, "listening on "));
                metrics = metrics.or(address_after(&line, "serving /metrics on "));
                seen.push(line);
            }
            Err(_) => {
                let exited = process.child.try_wait().unwrap();
                panic!(
                    "{name} did not say where it listens (exit: {exited:?}); its log: {seen:#?}"
                );
            }
        }
    }
    Daemon {
        process,
        public: public.unwrap(),
        metrics: metrics.unwrap(),
        log,
    }
}

/// A certificate authority and a server certificate for `localhost`, made
/// with openssl in `dir`: (ca.pem, server.pem, server.key).
pub fn certificates(dir: &Path) {
    let run = |args: &[&str]| {
        let status = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("openssl must be installed (make deps-apt)");
        assert!(status.success(), "openssl {args:?}");
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=chat-ha test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.pem",
    ]);
}

/// `redis-server` options for TLS on `port` with the certificates of
/// [`certificates`] in `certs`; clients need no certificate of their own.
pub fn tls_options(certs: &Path, port: u16) -> Vec<String> {
    let file = |name: &str| certs.join(name).display().to_string();
    vec![
        "--tls-port".into(),
        port.to_string(),
        "--tls-cert-file".into(),
        file("server.pem"),
        "--tls-key-file".into(),
        file("server.key"),
        "--tls-ca-cert-file".into(),
        file("ca.pem"),
        "--tls-auth-clients".into(),
        "no".into(),
    ]
}
