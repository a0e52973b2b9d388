//! The daemons as processes: socket activation through
//! `systemd-socket-activate`, notifications on a real `NOTIFY_SOCKET`, start-up
//! errors, and a graceful stop on SIGTERM.

mod common;

use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    Daemon, Process, Redis, accepts, binary, daemon_on_any_port, free_port, start_daemon, wait_for,
    write_config,
};

/// A datagram socket standing in for systemd's notification socket. Like
/// systemd, it reads every datagram as it arrives (a full socket buffer would
/// block the sender), and hands them to the test in order.
struct NotifySocket {
    path: std::path::PathBuf,
    received: std::sync::mpsc::Receiver<String>,
}

impl NotifySocket {
    fn bind(dir: &std::path::Path) -> Self {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        let (tx, received) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf) {
                if tx
                    .send(String::from_utf8_lossy(&buf[..n]).into_owned())
                    .is_err()
                {
                    break;
                }
            }
        });
        NotifySocket { path, received }
    }

    /// Collects datagrams until one contains the line `wanted`, within `limit`.
    fn wait_for_line(&self, wanted: &str, limit: Duration) -> Vec<String> {
        let deadline = Instant::now() + limit;
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Ok(text) = self.received.recv_timeout(left) else {
                break;
            };
            let found = text.lines().any(|l| l == wanted);
            seen.push(text);
            if found {
                return seen;
            }
        }
        panic!("no {wanted:?} within {limit:?}; received {seen:?}");
    }
}

fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    http_get_on(stream, path)
}

/// As [`http_get`], from the source address `from`.
fn http_get_from(from: std::net::IpAddr, addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).ok()?;
    socket.bind(&SocketAddr::new(from, 0).into()).ok()?;
    socket
        .connect_timeout(&addr.into(), Duration::from_millis(500))
        .ok()?;
    http_get_on(socket.into(), path)
}

fn http_get_on(mut stream: std::net::TcpStream, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    stream.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    Some((status, body))
}

fn spawn(name: &str, command: &mut Command) -> Process {
    let child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    Process {
        child,
        name: name.into(),
    }
}

#[test]
fn both_daemons_serve_a_socket_passed_by_systemd_and_notify_readiness_and_stopping() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &redis.url(), "");
    for (name, status_path) in [
        ("chat-backend", "/back/status"),
        ("chat-frontend", "/front/status"),
    ] {
        let notify = NotifySocket::bind(dir.path());
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        // The configured address is a different free port: serving on `addr`
        // proves the passed socket was used.
        let mut daemon = spawn(
            name,
            Command::new("systemd-socket-activate")
                .arg("--listen")
                .arg(addr.to_string())
                .arg("--setenv=NOTIFY_SOCKET")
                .arg("--setenv=WATCHDOG_USEC")
                .arg(binary(name))
                .arg("--metrics-listen=127.0.0.1:0")
                .arg("--config")
                .arg(&config)
                .arg("--instance")
                .arg("3")
                .env("NOTIFY_SOCKET", &notify.path)
                .env("WATCHDOG_USEC", "200000"),
        );
        // systemd-socket-activate binds at once and starts the daemon on the first connection.
        wait_for("the activation socket", Duration::from_secs(5), || {
            accepts(addr).then_some(())
        });
        let (status, body) = wait_for("a status answer", Duration::from_secs(10), || {
            http_get(addr, status_path)
        });
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\"instance\":3"), "{body}");

        let seen = notify.wait_for_line("READY=1", Duration::from_secs(5));
        assert!(
            seen.iter()
                .any(|d| d.lines().any(|l| l.starts_with("STATUS="))),
            "{seen:?}"
        );
        notify.wait_for_line("WATCHDOG=1", Duration::from_secs(2));
        notify.wait_for_line("WATCHDOG=1", Duration::from_secs(2));

        daemon.signal(15);
        notify.wait_for_line("STOPPING=1", Duration::from_secs(5));
        let exit = daemon.wait(Duration::from_secs(15));
        assert!(exit.success(), "{name} exits cleanly on SIGTERM: {exit:?}");
        std::fs::remove_file(&notify.path).unwrap();
    }
}

#[test]
fn without_activation_the_listen_option_or_the_configured_address_is_bound() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let configured = free_port();
    let config = write_config(
        dir.path(),
        &redis.url(),
        &format!("[backend]\nlisten = \"127.0.0.1:{configured}\"\n"),
    );

    // LISTEN_FDS meant for another process (LISTEN_PID is not ours) is ignored.
    let mut from_config = spawn(
        "chat-backend",
        Command::new(binary("chat-backend"))
            .arg("--metrics-listen=127.0.0.1:0")
            .arg("--config")
            .arg(&config)
            .env("LISTEN_FDS", "1")
            .env("LISTEN_PID", "1"),
    );
    let addr: SocketAddr = format!("127.0.0.1:{configured}").parse().unwrap();
    let (status, _) = wait_for("the configured address", Duration::from_secs(10), || {
        http_get(addr, "/back/status")
    });
    assert_eq!(status, 200);
    from_config.signal(2);
    assert!(
        from_config.wait(Duration::from_secs(15)).success(),
        "SIGINT stops it cleanly"
    );

    // --listen overrides it: another address (and any port).
    let from_option = start_daemon(
        "chat-frontend",
        &mut daemon_on_any_port("chat-frontend", &config, "127.0.0.2"),
    );
    assert_eq!(from_option.public.ip().to_string(), "127.0.0.2");
    let (status, _) = wait_for("the --listen address", Duration::from_secs(10), || {
        http_get(from_option.public, "/front/status")
    });
    assert_eq!(status, 200);
}

#[test]
fn a_bad_configuration_stops_the_daemon_at_start_naming_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.toml");
    std::fs::write(
        &path,
        "[redis]\nurl = \"redis://127.0.0.1:1/0\"\n\n[frontend]\nmax_rooms = 3\n",
    )
    .unwrap();
    for name in ["chat-frontend", "chat-backend"] {
        let output = Command::new(binary(name))
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{name}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(&path.display().to_string()), "{stderr}");
        assert!(stderr.contains("line 5"), "{stderr}");
        assert!(stderr.contains("unknown field `max_rooms`"), "{stderr}");
    }

    let missing = dir.path().join("missing.toml");
    let output = Command::new(binary("chat-backend"))
        .arg("--config")
        .arg(&missing)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("missing.toml"));
}

#[test]
fn the_shipped_configuration_passes_the_check() {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/etc/chat-ha/chat-ha.toml");
    for name in ["chat-frontend", "chat-backend"] {
        let output = Command::new(binary(name))
            .args(["--config", shipped, "--check-config"])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(String::from_utf8_lossy(&output.stdout).contains("max_per_room: 1000"));
    }
}

#[test]
fn a_stopping_frontend_reports_draining_before_it_lets_clients_go() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &redis.url(), "drain_delay_ms = 1500\n");
    let Daemon {
        process: mut frontend,
        public: addr,
        ..
    } = start_daemon(
        "chat-frontend",
        &mut daemon_on_any_port("chat-frontend", &config, "127.0.0.1"),
    );
    // Until the feed has reached Redis, the status is "degraded".
    let (status, body) = wait_for("the frontend", Duration::from_secs(10), || {
        http_get(addr, "/front/status").filter(|(_, body)| !body.contains("degraded"))
    });
    assert_eq!(
        (status, body.contains("\"status\":\"ok\"")),
        (200, true),
        "{body}"
    );

    frontend.signal(15);
    let (status, body) = wait_for("a draining status", Duration::from_secs(2), || {
        http_get(addr, "/front/status").filter(|(status, _)| *status != 200)
    });
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"status\":\"draining\""), "{body}");
    assert!(frontend.wait(Duration::from_secs(10)).success());
}

/// The watchdog pings come from the serving runtime: when it stops making
/// progress they stop, and systemd (WatchdogSec=) restarts the instance.
/// The stall is caused by a hook that exists in debug builds only.
#[test]
#[cfg(debug_assertions)]
fn watchdog_pings_stop_when_the_runtime_is_blocked() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &redis.url(), "");
    for name in ["chat-frontend", "chat-backend"] {
        let notify = NotifySocket::bind(dir.path());
        let Daemon {
            process: daemon,
            public: addr,
            ..
        } = start_daemon(
            name,
            daemon_on_any_port(name, &config, "127.0.0.1")
                .env("NOTIFY_SOCKET", &notify.path)
                .env("WATCHDOG_USEC", "200000"),
        );
        notify.wait_for_line("READY=1", Duration::from_secs(10));
        notify.wait_for_line("WATCHDOG=1", Duration::from_secs(2));
        daemon.signal(12); // SIGUSR2
        // Pings already queued may still arrive; then none for 10 intervals.
        std::thread::sleep(Duration::from_millis(300));
        while notify.received.try_recv().is_ok() {}
        let late = notify.received.recv_timeout(Duration::from_secs(2));
        assert!(
            late.is_err(),
            "{name} still pinged the watchdog while blocked: {late:?}"
        );
        assert!(http_get(addr, "/").is_none(), "{name} no longer answers");
        std::fs::remove_file(&notify.path).unwrap();
    }
}

#[test]
fn only_allowed_addresses_may_connect_and_metrics_have_a_port_of_their_own() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &redis.url(),
        "[access]\nallow = [\"127.0.0.2\"]\nmetrics_allow = [\"127.0.0.3/32\"]\n",
    );
    for (name, status_path) in [
        ("chat-backend", "/back/status"),
        ("chat-frontend", "/front/status"),
    ] {
        let Daemon {
            process: _daemon,
            public: addr,
            metrics,
            ..
        } = start_daemon(name, &mut daemon_on_any_port(name, &config, "127.0.0.1"));
        let allowed = [127, 0, 0, 2].into();
        let (status, _) = wait_for(
            "an answer to an allowed address",
            Duration::from_secs(10),
            || http_get_from(allowed, addr, status_path),
        );
        assert_eq!(status, 200, "{name}");
        // Another address is let in by the kernel, then closed at once, unanswered.
        assert_eq!(
            http_get_from([127, 0, 0, 1].into(), addr, status_path),
            None,
            "{name}"
        );
        assert_eq!(
            http_get_from([127, 0, 0, 3].into(), addr, status_path),
            None,
            "{name}"
        );

        let (status, _) = http_get_from(allowed, addr, "/metrics").unwrap();
        assert_eq!(status, 404, "{name}: no metrics on the public port");
        let (status, body) = http_get_from([127, 0, 0, 3].into(), metrics, "/metrics").unwrap();
        assert_eq!(status, 200, "{name}");
        assert!(body.contains("redis_up"), "{name}: {body}");
        assert_eq!(http_get_from(allowed, metrics, "/metrics"), None, "{name}");
    }
}

#[test]
fn the_socket_units_are_described_by_print_network() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("chat-ha.toml");
    std::fs::write(
        &config,
        "[frontend]\nlisten = \"10.0.0.5:9100\"\n[backend]\nlisten = \"[fd00::5]:9200\"\n\
         [access]\nallow = [\"10.0.0.10\", \"fd00::/64\"]\n",
    )
    .unwrap();
    let print = |name| {
        let output = Command::new(binary(name))
            .arg("--config")
            .arg(&config)
            .arg("--print-network")
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout).unwrap()
    };
    assert_eq!(
        print("chat-frontend"),
        "address 10.0.0.5\nport 9100\nallow 10.0.0.10/32 fd00::/64\n"
    );
    assert_eq!(
        print("chat-backend"),
        "address [fd00::5]\nport 9200\nallow 10.0.0.10/32 fd00::/64\n"
    );
}

/// A frontend's client connections have a send buffer of 256 KiB (the
/// kernel doubles it), not one the kernel grows to megabytes for a client
/// that does not read.
#[test]
fn client_connections_of_a_frontend_have_a_bounded_send_buffer() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &redis.url(), "");
    let Daemon {
        process: _frontend,
        public: addr,
        ..
    } = start_daemon(
        "chat-frontend",
        &mut daemon_on_any_port("chat-frontend", &config, "127.0.0.1"),
    );
    // Serving: the listener has its buffer size, which connections take.
    wait_for("the frontend", Duration::from_secs(10), || {
        http_get(addr, "/front/status")
    });
    let _client = std::net::TcpStream::connect(addr).unwrap();
    // The server's side of the connection: its local port is the frontend's.
    let send_buffer = wait_for("the connection in ss", Duration::from_secs(5), || {
        let output = Command::new("ss")
            .args([
                "-tmnH",
                "state",
                "established",
                "sport",
                "=",
                &format!(":{}", addr.port()),
            ])
            .output()
            .expect("ss (iproute2) must be installed");
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let at = text.find(",tb")?;
        let digits: String = text[at + 3..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse::<usize>().ok()
    });
    assert_eq!(send_buffer, 2 * 256 * 1024);
}
