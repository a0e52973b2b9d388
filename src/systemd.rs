//! systemd glue: the listening socket, readiness, status, watchdog, stopping.
//!
//! Outside systemd every call here is harmless: without `LISTEN_FDS` the
//! daemon binds its own socket, and without `NOTIFY_SOCKET` the notifications
//! go nowhere.

use std::net::SocketAddr;
use std::os::fd::FromRawFd;
use std::time::Duration;

use sd_notify::NotifyState;

/// Backlog of sockets the daemon binds itself. systemd's socket units set
/// their own (`Backlog=`); this matches them so bursts of connections are not
/// dropped either way.
const LISTEN_BACKLOG: u32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("socket activation: {0}")]
    Activation(std::io::Error),
    #[error("socket activation passed {0} sockets; one is expected")]
    TooManySockets(usize),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The socket to serve on: the one systemd passed (when `LISTEN_FDS` is set
/// and `LISTEN_PID` is this process), else `addr` freshly bound.
///
/// Must be called from within a Tokio runtime.
pub fn listener(addr: SocketAddr) -> Result<tokio::net::TcpListener, ListenError> {
    let mut fds = sd_notify::listen_fds().map_err(ListenError::Activation)?;
    match fds.len() {
        0 => {
            let listener = bind(addr)?;
            tracing::info!("listening on {}", listener.local_addr().unwrap_or(addr));
            Ok(listener)
        }
        1 => {
            let fd = fds.next().expect("one descriptor");
            // SAFETY: systemd passed this descriptor to this process (LISTEN_PID
            // was checked) and nothing else in the process owns it.
            let std_listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
            std_listener
                .set_nonblocking(true)
                .map_err(ListenError::Activation)?;
            let listener =
                tokio::net::TcpListener::from_std(std_listener).map_err(ListenError::Activation)?;
            if let Ok(local) = listener.local_addr() {
                tracing::info!("listening on {local} (socket from systemd)");
            }
            Ok(listener)
        }
        n => Err(ListenError::TooManySockets(n)),
    }
}

/// A freshly bound listening socket at `addr` (port 0: any free port).
///
/// Must be called from within a Tokio runtime.
pub fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, ListenError> {
    let bind_error = |source| ListenError::Bind { addr, source };
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .map_err(bind_error)?;
    socket.set_reuseaddr(true).map_err(bind_error)?;
    socket.bind(addr).map_err(bind_error)?;
    socket.listen(LISTEN_BACKLOG).map_err(bind_error)
}

/// Tells systemd the daemon is serving, with a one-line status.
pub fn notify_ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Tells systemd the daemon is stopping on purpose.
pub fn notify_stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("cannot notify systemd: {e}");
    }
}

/// When systemd's watchdog is on (`WatchdogSec=`), pings it at half the
/// interval from a task on the serving runtime: if that runtime stops making
/// progress, the pings stop and systemd restarts the instance.
pub fn spawn_watchdog() {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    let period = (interval / 2).max(Duration::from_millis(10));
    tracing::info!("pinging the systemd watchdog every {period:?}");
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(period);
        loop {
            ticks.tick().await;
            notify(&[NotifyState::Watchdog]);
        }
    });
}

/// Debug builds only: SIGUSR2 blocks the thread running this task for ever,
/// so that a test can see the watchdog pings stop when the runtime stops
/// making progress (and systemd then restarts the instance). Release builds
/// have no such hook.
#[cfg(debug_assertions)]
pub fn spawn_stall_hook() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut usr2) = signal(SignalKind::user_defined2()) else {
        return;
    };
    tokio::spawn(async move {
        if usr2.recv().await.is_some() {
            tracing::warn!("SIGUSR2: blocking the runtime (debug build test hook)");
            loop {
                std::thread::park();
            }
        }
    });
}

/// Resolves on the first SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!("{name} received, stopping");
}
