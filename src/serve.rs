//! HTTP serving shared by both daemons: counting open connections and
//! stopping gracefully within a time limit.

use std::future::{Future, IntoFuture};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// The answer of both status endpoints, which the load balancer's health
/// checks read: 200 while the instance takes new clients (even with Redis
/// down: a frontend keeps its sockets, a backend answers 503 itself), 503
/// once it is draining before a stop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// `ok`, `degraded` (Redis unreachable) or `draining` (stopping).
    pub status: String,
    /// `up` or `down`.
    pub redis: String,
    pub instance: u32,
    /// Sockets (frontend) or open HTTP connections (backend).
    pub connections: usize,
}

impl Status {
    pub fn new(redis_up: bool, instance: u32, connections: usize) -> Self {
        Status {
            status: if redis_up { "ok" } else { "degraded" }.into(),
            redis: if redis_up { "up" } else { "down" }.into(),
            instance,
            connections,
        }
    }

    /// The same, marked as draining.
    pub fn draining(mut self) -> Self {
        self.status = "draining".into();
        self
    }
}

impl IntoResponse for Status {
    fn into_response(self) -> Response {
        let code = if self.status == "draining" {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::OK
        };
        (code, Json(self)).into_response()
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

/// Held by each connection; counts it closed when dropped.
struct Counted(ConnectionCount);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A TCP stream that is counted while it is open.
pub struct CountedStream {
    stream: TcpStream,
    _counted: Counted,
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
        bufs: &[io::IoSlice<'_>],
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

/// A listener whose accepted connections are counted.
struct CountingListener {
    inner: TcpListener,
    count: ConnectionCount,
}

impl axum::serve::Listener for CountingListener {
    type Io = CountedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (CountedStream, SocketAddr) {
        // axum's own accept loop retries on errors (such as EMFILE) with a pause.
        let (stream, addr) = axum::serve::Listener::accept(&mut self.inner).await;
        // Chat frames are small and latency matters more than packet count.
        let _ = stream.set_nodelay(true);
        let counted = self.count.open();
        (
            CountedStream {
                stream,
                _counted: counted,
            },
            addr,
        )
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// Serves `app` until `shutdown` resolves, then lets open requests finish for
/// at most `grace` before returning.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    count: ConnectionCount,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> io::Result<()> {
    let stopping = Arc::new(tokio::sync::Notify::new());
    let stopped = stopping.clone();
    let listener = CountingListener {
        inner: listener,
        count,
    };
    let server = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            stopped.notify_one();
        })
        .into_future();
    tokio::select! {
        result = server => result,
        () = async { stopping.notified().await; tokio::time::sleep(grace).await } => {
            tracing::warn!("connections still open after {grace:?}; closing them");
            Ok(())
        }
    }
}
