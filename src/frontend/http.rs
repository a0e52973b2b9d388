//! The frontend's HTTP side besides Socket.IO: the chat page, its assets,
//! and `/front/status`.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tower_http::services::ServeDir;
use tower_http::set_header::SetResponseHeaderLayer;

use crate::delivery::{Primary, RedisHealth};
use crate::message::{InvalidInput, Room};
use crate::metrics::FrontendMetrics;
use crate::status::Status;

/// The chat page's `Content-Security-Policy`: only the page's own scripts,
/// styles and connections, and no other site may frame it.
const PAGE_POLICY: &str = "default-src 'self'; frame-ancestors 'none'";

/// What the HTTP handlers read.
#[derive(Clone)]
pub struct Pages {
    pub www_dir: PathBuf,
    pub health: Arc<RedisHealth>,
    pub metrics: Arc<FrontendMetrics>,
    pub instance: u32,
    /// Set once the instance stops: its status then answers 503.
    pub draining: Arc<AtomicBool>,
    /// The primary followed, in Sentinel mode: status names it.
    pub primary: Option<Primary>,
}

/// An error answer: a status and `{"error": "..."}`.
#[derive(Debug, thiserror::Error)]
enum PageError {
    #[error("{0}")]
    Room(#[from] InvalidInput),
    #[error("chat page unavailable")]
    Unavailable,
    #[error("no such endpoint")]
    NotFound,
}

#[derive(Serialize)]
struct ErrorBody {
    error: String,
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let status = match self {
            PageError::Room(_) | PageError::NotFound => StatusCode::NOT_FOUND,
            PageError::Unavailable => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let body = ErrorBody {
            error: self.to_string(),
        };
        (status, Json(body)).into_response()
    }
}

/// The routes of the chat page, its assets and the status.
pub fn router(pages: Pages) -> Router {
    let assets = ServeDir::new(pages.www_dir.join("assets"));
    Router::new()
        .route("/front/status", get(status))
        .route("/front/{room}", get(page))
        .nest_service("/front/assets", assets)
        .fallback(not_found)
        .with_state(pages)
}

/// The header every answer of the frontend carries, Socket.IO's too:
/// browsers take each answer for the type it says it is.
pub fn no_sniffing() -> SetResponseHeaderLayer<HeaderValue> {
    SetResponseHeaderLayer::overriding(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    )
}

/// `GET /front/{room}`: the chat page, the same file for every valid room.
async fn page(State(pages): State<Pages>, Path(room): Path<String>) -> Result<Response, PageError> {
    Room::parse(&room)?;
    let html = tokio::fs::read(pages.www_dir.join("index.html"))
        .await
        .map_err(|e| {
            tracing::error!(
                "cannot read the chat page from {}: {e}",
                pages.www_dir.display()
            );
            PageError::Unavailable
        })?;
    let headers = [
        (header::CONTENT_TYPE, "text/html; charset=utf-8"),
        (header::CACHE_CONTROL, "no-cache"),
        (header::CONTENT_SECURITY_POLICY, PAGE_POLICY),
    ];
    Ok((headers, html).into_response())
}

async fn status(State(pages): State<Pages>) -> Status {
    let sockets = usize::try_from(pages.metrics.sockets.get()).unwrap_or(0);
    let status = Status::new(pages.health.is_up(), pages.instance, sockets)
        .following(pages.primary.as_ref());
    match pages.draining.load(Ordering::Relaxed) {
        true => status.draining(),
        false => status,
    }
}

async fn not_found() -> PageError {
    PageError::NotFound
}
