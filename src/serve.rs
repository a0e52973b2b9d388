//! HTTP serving shared by both daemons: who may connect, counting open
//! connections, the metrics port, and stopping gracefully within a time
//! limit.

use std::future::Future;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::StatusCode;

use axum::routing::get;
use axum::{Json, Router};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use crate::config::{Network, allowed};
use crate::metrics::Metrics;

/// The sockets an instance serves on: the public one, which the load
/// balancers reach, and the one of its metrics, for the monitoring.
pub struct Listeners {
    pub public: TcpListener,
    pub metrics: TcpListener,
}

/// The address of the peer a request came from, in each request's
/// extensions: the load balancer's, for requests that came through it.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// Who may connect to a listener, and the connections open on it.
#[derive(Debug, Clone)]
pub struct Access {
    allow: Arc<[Network]>,
    count: ConnectionCount,
}

impl Access {
    /// Connections from `allow` only, counted in `count`.
    pub fn new(allow: &[Network], count: ConnectionCount) -> Self {
        Access {
            allow: allow.into(),
            count,
        }
    }
}

/// Number of open TCP connections, shared with the status endpoint.
#[derive(Debug, Clone, Default)]
pub struct ConnectionCount(Arc<AtomicUsize>);

impl ConnectionCount {
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }

    fn open(&self) -> Counted {
        self.0.fetch_add(1, Ordering::Relaxed);
        Counted(self.clone())
    }
}

/// Held by each connection, whatever serves it; counts it closed when
/// dropped.
pub struct Counted(ConnectionCount);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An accepted stream as it is, counted open as long as it lives: the
/// connection of a daemon that serves plain HTTP.
pub struct CountedStream {
    stream: TcpStream,
    _counted: Counted,
}

impl CountedStream {
    pub fn new(stream: TcpStream, counted: Counted) -> Self {
        CountedStream {
            stream,
            _counted: counted,
        }
    }
}

impl AsyncRead for CountedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for CountedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// How long a client may take to send a request's headers (and, on a
/// kept-alive connection, to start its next request) before the connection
/// is closed: slow or silent clients cannot hold connections for ever.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `app` until `shutdown` resolves, then stops accepting, lets open
/// requests finish, and returns once every connection closed or after `grace`.
///
/// This is axum's own serving loop with what it does not offer: HTTP/1 with
/// a header timeout, connection counting, and connections refused from
/// addresses not allowed (closed at once, before a byte is read).
///
/// `connection` makes what hyper serves from each accepted stream and its
/// [`Counted`], which it must keep as long as the connection lives: a
/// [`CountedStream`] for plain HTTP, or a wrapper of the daemon's own (the
/// frontend's lets its websockets be written to directly).
pub async fn serve<C>(
    listener: TcpListener,
    app: Router,
    access: Access,
    connection: impl Fn(TcpStream, Counted) -> C,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> io::Result<()>
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Access { allow, count } = access;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    pause_after_accept_error(e).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        if !allowed(&allow, peer.ip()) {
            tracing::debug!("refusing a connection from {peer}: not in access.allow");
            continue;
        }
        // Chat frames are small and latency matters more than packet count.
        let _ = stream.set_nodelay(true);
        let io = connection(stream, count.open());
        tokio::spawn(serve_connection(io, peer, app.clone(), stop_rx.clone()));
    }
    // Connections made from now on wait in the socket's backlog (the socket
    // stays open in systemd) for the next process.
    drop(listener);
    let _ = stop_tx.send(true);
    let deadline = tokio::time::Instant::now() + grace;
    while count.get() > 0 {
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                "{} connections still open after {grace:?}; closing them",
                count.get()
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Serves one connection until it closes, or ends it gracefully (finishing
/// the request in progress) once `stop` turns true.
async fn serve_connection(
    io: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
    peer: SocketAddr,
    app: Router,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let service =
        hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            let mut request = request.map(axum::body::Body::new);
            request.extensions_mut().insert(Peer(peer));
            tower::ServiceExt::oneshot(app.clone(), request)
        });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(hyper_util::rt::TokioIo::new(io), service)
        .with_upgrades();
    let mut connection = std::pin::pin!(connection);
    let mut stopping = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!("connection ended: {e}");
                }
                return;
            }
            changed = stop.changed(), if !stopping => {
                stopping = true;
                if changed.is_ok() {
                    connection.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// Errors such as "too many open files" would make the accept loop spin;
/// wait a little, as axum does, so that connections can close meanwhile.
async fn pause_after_accept_error(e: io::Error) {
    use io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    ) {
        return;
    }
    tracing::error!("accept error: {e}");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Serves `GET /metrics` from `exposition` on `listener`, to `allow` only,
/// until the task is dropped. Kept off the public port: the load balancers
/// reach that one, and whoever reaches them must not read the metrics.
pub async fn serve_metrics(
    listener: TcpListener,
    exposition: Arc<Metrics>,
    allow: &[Network],
) -> io::Result<()> {
    let app = Router::new()
        .route(
            "/metrics",
            get(move || std::future::ready(exposition.response())),
        )
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                Json(serde_json::json!({"error": "no such endpoint"})),
            )
        });
    let access = Access::new(allow, ConnectionCount::default());
    serve(
        listener,
        app,
        access,
        CountedStream::new,
        std::future::pending(),
        Duration::ZERO,
    )
    .await
}
