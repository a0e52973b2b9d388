//! The REST backend: `POST /back/message`, `GET /back/messages`, `GET /back/status`.
//!
//! It holds no sockets: a posted message is checked, stored in Redis (which
//! also hands it to every frontend), and only then acknowledged with 201.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequest, FromRequestParts, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::{Deserialize, Serialize};

use crate::auth::{PublishTokens, TokenId};
use crate::config::Config;
use crate::delivery::{PostKey, Store, StoreError};
use crate::message::{
    ChatMessage, IdempotencyKey, InvalidInput, PostBody, PostMessage, Publish, PublishBody, Room,
    StreamId, parse_object,
};
use crate::metrics::{BackendMetrics, Metrics};
use crate::serve::{Access, ConnectionCount, Listeners, serve, serve_metrics};
use crate::status::Status;

/// How long a client may take to send a request body.
pub const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The request header that makes a post safe to repeat.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Messages returned by `GET /back/messages` when no `limit` is given.
pub const DEFAULT_HISTORY: usize = 50;
/// Most messages one `GET /back/messages` returns.
pub const MAX_HISTORY: usize = 200;
/// Most bytes of text one `GET /back/messages` returns: fewer messages than
/// asked for come back when they would weigh more (ask again with `before`).
pub const MAX_HISTORY_BYTES: usize = 256 * 1024;

/// Everything a handler needs.
#[derive(Clone)]
struct AppState {
    store: Store,
    body_limit: usize,
    instance: u32,
    connections: ConnectionCount,
    metrics: Arc<BackendMetrics>,
    tokens: Arc<PublishTokens>,
}

/// An error answer: a status and `{"error": "..."}`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Invalid(#[from] InvalidInput),
    #[error("{0}")]
    BadRequest(String),
    #[error("request body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("expected Content-Type: application/json")]
    NotJson,
    #[error("the request body did not arrive within {BODY_TIMEOUT:?}")]
    BodyTimeout,
    #[error("message store unavailable, try again")]
    Unavailable(#[source] StoreError),
    #[error("message store is full, try again later")]
    StoreFull,
    /// Sentinel mode: the primary has the message, but too few replicas
    /// confirmed it to survive a failover; the retry is safe.
    #[error(
        "the message store could not copy the message to a replica; \
         retry with the same Idempotency-Key"
    )]
    NotReplicated(#[source] StoreError),
    #[error("this Idempotency-Key was already used for another message")]
    KeyConflict,
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("no such endpoint")]
    NotFound,
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::Invalid(_) | ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::NotJson => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::Unavailable(_) | ApiError::StoreFull | ApiError::NotReplicated(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::KeyConflict => StatusCode::CONFLICT,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
        }
    }
}

#[derive(Serialize)]
struct ErrorBody {
    error: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match &self {
            ApiError::Unavailable(cause) | ApiError::NotReplicated(cause) => {
                tracing::warn!("answering 503: {cause}")
            }
            ApiError::StoreFull => tracing::warn!("answering 503: {}", StoreError::Full),
            _ => {}
        }
        let body = ErrorBody {
            error: self.to_string(),
        };
        let mut response = (self.status(), Json(body)).into_response();
        if let ApiError::Unauthorized(_) = self {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::KeyConflict => ApiError::KeyConflict,
            StoreError::Full => ApiError::StoreFull,
            e @ StoreError::NotReplicated(_) => ApiError::NotReplicated(e),
            e => ApiError::Unavailable(e),
        }
    }
}

/// A request body as received, and what it becomes once checked.
trait CheckedBody: Sized {
    type Raw: serde::de::DeserializeOwned;
    fn check(raw: Self::Raw) -> Result<Self, InvalidInput>;
}

impl CheckedBody for PostMessage {
    type Raw = PostBody;
    fn check(raw: PostBody) -> Result<Self, InvalidInput> {
        PostMessage::try_from(raw)
    }
}

impl CheckedBody for Publish {
    type Raw = PublishBody;
    fn check(raw: PublishBody) -> Result<Self, InvalidInput> {
        Publish::try_from(raw)
    }
}

/// A JSON body that parsed and passed every check, with the request's
/// `Idempotency-Key` if it has one. Every way of getting it wrong has its
/// status: 415 not JSON, 413 too large, 400 malformed or invalid.
struct Checked<T>(T, Option<IdempotencyKey>);

impl<T: CheckedBody> FromRequest<AppState> for Checked<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        if !is_json(req.headers()) {
            return Err(ApiError::NotJson);
        }
        let key = match req.headers().get(IDEMPOTENCY_KEY) {
            None => None,
            Some(value) => Some(IdempotencyKey::parse(
                value.to_str().map_err(|_| InvalidInput::IdempotencyKey)?,
            )?),
        };
        let bytes = read_body(req, state.body_limit).await?;
        let raw = parse_object::<T::Raw>(&bytes).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => {
                ApiError::BadRequest(format!("invalid message: {e}"))
            }
            _ => ApiError::BadRequest(format!("malformed JSON: {e}")),
        })?;
        Ok(Checked(T::check(raw)?, key))
    }
}

/// Reads a request body of at most `limit` bytes, arriving within
/// [`BODY_TIMEOUT`]: a body that trickles in (slow-loris) is cut off.
///
/// Done here, for the routes that read a body, rather than by router-wide
/// layers, which every request of every route would pay for.
async fn read_body(req: Request, limit: usize) -> Result<Bytes, ApiError> {
    let collect = Limited::new(req.into_body(), limit).collect();
    match tokio::time::timeout(BODY_TIMEOUT, collect).await {
        Err(_) => Err(ApiError::BodyTimeout),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<LengthLimitError>() => Err(ApiError::TooLarge(limit)),
        Ok(Err(e)) => Err(ApiError::BadRequest(format!("cannot read the body: {e}"))),
    }
}

/// True for `application/json` and `application/<something>+json`, with or
/// without parameters such as `charset`.
fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// `POST /back/message`: stores a message, and counts and times the answer,
/// whatever it is (a rejected body included).
///
/// The measuring is done here rather than by a middleware layer, which would
/// box the request's future once more and cost every post a few thousand
/// instructions for two clock readings and a counter.
async fn post_message(State(state): State<AppState>, request: Request) -> Response {
    let started = Instant::now();
    let response = match Checked::<PostMessage>::from_request(request, &state).await {
        Ok(Checked(message, key)) => store_post(&state, message, key).await.into_response(),
        Err(rejection) => rejection.into_response(),
    };
    state
        .metrics
        .record_post(response.status(), started.elapsed());
    response
}

/// Stores a message; a repeated post (same Idempotency-Key, same message)
/// gets the same answer as the first, and is not stored again.
async fn store_post(
    state: &AppState,
    message: PostMessage,
    key: Option<IdempotencyKey>,
) -> Result<(StatusCode, Json<ChatMessage>), ApiError> {
    let key = key.as_ref().map(|key| PostKey::message(key, &message.room));
    let appended = state.store.append(&message, key.as_ref()).await?;
    let stored = appended.message;
    if appended.repeated {
        tracing::info!(room = %stored.room, id = %stored.id, "repeated post, stored before");
    } else {
        tracing::debug!(room = %stored.room, id = %stored.id, "stored");
    }
    Ok((StatusCode::CREATED, Json(stored)))
}

#[derive(Serialize)]
struct Published {
    messages: Vec<ChatMessage>,
}

/// `POST /back/publish`: one message to several rooms, for servers holding a
/// token. The token is checked before the body is read ([`Publisher`]).
/// With an Idempotency-Key, each room's message is recorded under a key of
/// its own, derived from the key, the token and the room, so a retry after
/// a partial failure stores what is missing and no more.
async fn publish(
    State(state): State<AppState>,
    Publisher(token): Publisher,
    Checked(publish, key): Checked<Publish>,
) -> Result<(StatusCode, Json<Published>), ApiError> {
    let mut messages = Vec::with_capacity(publish.rooms.len());
    for room in publish.rooms {
        let room_key = key.as_ref().map(|key| PostKey::publish(key, &token, &room));
        let message = PostMessage {
            room,
            text: publish.text.clone(),
        };
        messages.push(
            state
                .store
                .append(&message, room_key.as_ref())
                .await?
                .message,
        );
    }
    Ok((StatusCode::CREATED, Json(Published { messages })))
}

/// The holder of a publish token: `Authorization: Bearer <token>`, checked
/// from the request's head alone, so that a caller without a valid token
/// learns nothing about the body and costs no more than its headers.
struct Publisher(TokenId);

impl FromRequestParts<AppState> for Publisher {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let tokens = &state.tokens;
        if tokens.is_empty() {
            return Err(ApiError::Unauthorized(
                "publishing is not enabled on this backend",
            ));
        }
        let presented = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match presented.map(|token| tokens.check(token.trim())) {
            Some(Some(token)) => Ok(Publisher(token)),
            Some(None) => Err(ApiError::Unauthorized("invalid token")),
            None => Err(ApiError::Unauthorized(
                "expected Authorization: Bearer <token>",
            )),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    room: String,
    limit: Option<usize>,
    /// Only messages older than this id.
    before: Option<String>,
}

#[derive(Serialize)]
struct History {
    room: Room,
    messages: Vec<ChatMessage>,
}

async fn get_messages(
    State(state): State<AppState>,
    query: Result<Query<HistoryQuery>, QueryRejection>,
) -> Result<Json<History>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let room = Room::parse(&query.room)?;
    let limit = query.limit.unwrap_or(DEFAULT_HISTORY);
    if !(1..=MAX_HISTORY).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {MAX_HISTORY}"
        )));
    }
    let before = match query.before.as_deref() {
        None => None,
        Some(id) => Some(StreamId::parse(id).ok_or(InvalidInput::Before)?),
    };
    let messages = state
        .store
        .history(&room, limit, before, MAX_HISTORY_BYTES)
        .await?;
    Ok(Json(History { room, messages }))
}

async fn status(State(state): State<AppState>) -> Json<Status> {
    let redis_up = state.store.ping().await;
    let following = state.store.primary().filter(|p| p.follows_sentinels());
    Json(Status::new(redis_up, state.instance, state.connections.get()).following(following))
}

async fn not_found() -> ApiError {
    ApiError::NotFound
}

/// The backend's routes, with body limits, error mapping and metrics
/// (counted in `metrics`).
pub fn router(
    config: &Config,
    store: Store,
    tokens: PublishTokens,
    instance: u32,
    connections: ConnectionCount,
    metrics: Arc<BackendMetrics>,
) -> Router {
    let body_limit = config.backend.max_body_bytes.get();
    let state = AppState {
        store,
        body_limit,
        instance,
        connections,
        metrics,
        tokens: Arc::new(tokens),
    };
    Router::new()
        .route("/back/message", post(post_message))
        .route("/back/publish", post(publish))
        .route("/back/messages", get(get_messages))
        .route("/back/status", get(status))
        .fallback(not_found)
        .with_state(state)
}

/// Serves the backend on `listeners` until `shutdown` resolves.
pub async fn run(
    config: Arc<Config>,
    listeners: Listeners,
    instance: u32,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let store = Store::new(&config).map_err(std::io::Error::other)?;
    let tokens = PublishTokens::load(config.backend.publish_tokens_file.as_deref())
        .map_err(std::io::Error::other)?;
    if tokens.is_empty() {
        tracing::info!("no publish tokens: POST /back/publish is off");
    }
    let connections = ConnectionCount::default();
    let metrics = Arc::new(BackendMetrics::default());
    let exposition =
        Arc::new(Metrics::backend(&metrics, store.health_handle()).following(store.primary()));
    let metrics_server = tokio::spawn({
        let allow = config.access.metrics_allow.clone();
        async move { serve_metrics(listeners.metrics, exposition, &allow).await }
    });
    let app = router(
        &config,
        store.clone(),
        tokens,
        instance,
        connections.clone(),
        metrics,
    );
    // Learn Redis's state before announcing readiness, without waiting on it.
    let redis_up = store.ping().await;
    crate::systemd::notify_ready(&format!(
        "serving; Redis {}",
        if redis_up { "up" } else { "down" }
    ));
    let result = serve(
        listeners.public,
        app,
        Access::new(&config.access.allow, connections),
        crate::serve::CountedStream::new,
        shutdown,
        config.backend.shutdown_timeout(),
    )
    .await;
    metrics_server.abort();
    result
}
