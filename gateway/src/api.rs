//! The HTTP API: channel list, history pages, server-side publish, and the
//! JSON error body every HTTP error uses.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use chatcluster_protocol::frame::{ChannelMessage, ErrorCode, PublishReply};
use chatcluster_protocol::validate;

use crate::auth;
use crate::state::{Gateway, OpError};
use crate::store::Registry;

/// An HTTP error: a status and a JSON body `{"code","message"}` like the WebSocket error frames.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: ErrorCode,
    message: String,
}

impl ApiError {
    /// An error with a status, code and message.
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: ErrorCode,
    message: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(ErrorBody {
            code: self.code,
            message: &self.message,
        });
        (self.status, body).into_response()
    }
}

impl From<OpError> for ApiError {
    fn from(error: OpError) -> Self {
        let status = match error.code {
            ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::UnknownOutcome => StatusCode::GATEWAY_TIMEOUT,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, error.code, error.message)
    }
}

/// `GET /api/channels` reply.
#[derive(Debug, Serialize)]
pub struct ChannelList {
    channels: Vec<String>,
}

/// `GET /api/channels`.
pub async fn list_channels(
    State(gateway): State<Arc<Gateway>>,
) -> Result<Json<ChannelList>, ApiError> {
    let channels = gateway
        .store
        .list(Registry::Channels)
        .await
        .map_err(OpError::from)?;
    Ok(Json(ChannelList { channels }))
}

/// Query of `GET /api/channels/{channel}/messages`.
#[derive(Debug, Deserialize)]
pub struct PageQuery {
    before: Option<u64>,
    limit: Option<u32>,
}

/// `GET /api/channels/{channel}/messages` reply.
#[derive(Debug, Serialize)]
pub struct MessagePage {
    channel: String,
    messages: Vec<ChannelMessage>,
}

/// `GET /api/channels/{channel}/messages?before=&limit=`: history from PostgreSQL, newest last.
pub async fn channel_messages(
    State(gateway): State<Arc<Gateway>>,
    Path(channel): Path<String>,
    query: Result<Query<PageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<MessagePage>, ApiError> {
    let Query(query) = query.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest,
            e.body_text(),
        )
    })?;
    validate::channel_name(&channel).map_err(OpError::from)?;
    let limit = validate::history_limit(query.limit).map_err(OpError::from)?;
    let messages = gateway.read_history(&channel, query.before, limit).await?;
    Ok(Json(MessagePage { channel, messages }))
}

/// Body of `POST /api/channels/{channel}/messages`.
#[derive(Debug, Deserialize)]
pub struct PostMessage {
    user: String,
    text: String,
    /// Retries with the same key return the first result (also taken from
    /// the `Idempotency-Key` header).
    #[serde(default)]
    idempotency_key: Option<String>,
}

/// `POST /api/channels/{channel}/messages`: publish on behalf of `user`, with `Authorization: Bearer <API_KEY>`.
pub async fn post_message(
    State(gateway): State<Arc<Gateway>>,
    Path(channel): Path<String>,
    headers: HeaderMap,
    body: Result<Json<PostMessage>, JsonRejection>,
) -> Result<(StatusCode, Json<PublishReply>), ApiError> {
    let Some(expected) = gateway.config.api_key.as_deref().filter(|k| !k.is_empty()) else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            "server-side publishing is disabled (no API_KEY)",
        ));
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(auth::bearer);
    if !presented.is_some_and(|key| constant_time_eq(key.as_bytes(), expected.as_bytes())) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            "send Authorization: Bearer <API_KEY>",
        ));
    }
    let Json(body) =
        body.map_err(|e| ApiError::new(e.status(), ErrorCode::BadRequest, e.body_text()))?;
    validate::channel_name(&channel).map_err(OpError::from)?;
    validate::user_name(&body.user).map_err(OpError::from)?;
    validate::text(&body.text, gateway.config.max_text_bytes).map_err(OpError::from)?;
    let key = body.idempotency_key.or_else(|| {
        headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    });
    if let Some(key) = &key {
        chatcluster_protocol::frame::check_idempotency_key(key)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, e))?;
    }
    gateway.ensure_user(&body.user).await?;
    let clock = gateway.clock.tick(None);
    let reply = gateway
        .publish(&channel, &body.user, body.text, clock, key.as_deref())
        .await?;
    Ok((StatusCode::CREATED, Json(reply)))
}

/// Compares secrets without leaking where they differ through timing.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Any other path.
pub async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        ErrorCode::NotFound,
        "no such endpoint",
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn constant_time_comparison() {
        assert!(super::constant_time_eq(b"key", b"key"));
        assert!(!super::constant_time_eq(b"key", b"kez"));
        assert!(!super::constant_time_eq(b"key", b"key2"));
    }
}
