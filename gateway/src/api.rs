//! The HTTP API: channel list, history pages, server-side publish, and the
//! JSON error body every HTTP error uses.
//!
//! The read routes take the same credentials as the WebSocket (in JWT mode a
//! bearer JWT, or `?token=`, whose `channels` claim applies; or the API key);
//! publishing takes the API key.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use chatcluster_protocol::frame::{ChannelMessage, ErrorCode, PublishReply};
use chatcluster_protocol::validate;

use crate::auth::{self, Identity};
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
            ErrorCode::RateLimited | ErrorCode::LimitExceeded => StatusCode::TOO_MANY_REQUESTS,
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
    /// Where the next page starts; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    cursor: Option<String>,
}

/// Query of `GET /api/channels`.
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    cursor: Option<String>,
    limit: Option<u32>,
    token: Option<String>,
}

/// The bearer credential of a request: the `Authorization` header, else `?token=`.
fn credential<'a>(headers: &'a HeaderMap, query_token: Option<&'a str>) -> Option<&'a str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(auth::bearer)
        .or(query_token)
}

/// Who reads: `None` is unrestricted (`AUTH_MODE=none`, or the API key).
fn reader(
    gateway: &Gateway,
    headers: &HeaderMap,
    query_token: Option<&str>,
) -> Result<Option<Identity>, ApiError> {
    gateway
        .auth
        .authorize_read(credential(headers, query_token))
        .map_err(|error| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthorized,
                error.to_string(),
            )
        })
}

fn bad_query(rejection: &axum::extract::rejection::QueryRejection) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        ErrorCode::BadRequest,
        rejection.body_text(),
    )
}

/// `GET /api/channels?cursor=&limit=`: a page of channel names (only those
/// the reader's token allows).
pub async fn list_channels(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<ChannelList>, ApiError> {
    let Query(query) = query.map_err(|e| bad_query(&e))?;
    let reader = reader(&gateway, &headers, query.token.as_deref())?;
    let cursor = query.cursor.map(validate::nfc_owned);
    if let Some(cursor) = &cursor {
        validate::channel_name(cursor).map_err(OpError::from)?;
    }
    let (channels, cursor) = gateway
        .list_page(
            Registry::Channels,
            cursor.as_deref(),
            query.limit,
            reader.as_ref(),
        )
        .await?;
    Ok(Json(ChannelList { channels, cursor }))
}

/// Query of `GET /api/channels/{channel}/messages`.
#[derive(Debug, Deserialize)]
pub struct PageQuery {
    before: Option<u64>,
    limit: Option<u32>,
    token: Option<String>,
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
    headers: HeaderMap,
    query: Result<Query<PageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<MessagePage>, ApiError> {
    let Query(query) = query.map_err(|e| bad_query(&e))?;
    let reader = reader(&gateway, &headers, query.token.as_deref())?;
    let channel = validate::nfc_owned(channel);
    validate::channel_name(&channel).map_err(OpError::from)?;
    if reader.as_ref().is_some_and(|r| !r.may_use(&channel)) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            format!("your token does not allow channel {channel:?}"),
        ));
    }
    if query.before.is_some_and(|b| b > validate::MAX_SAFE_INTEGER) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest,
            "before must be at most 2^53-1",
        ));
    }
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
    if !gateway.auth.has_api_key() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            "server-side publishing is disabled (no API_KEY)",
        ));
    }
    if !gateway.auth.is_api_key(credential(&headers, None)) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            "send Authorization: Bearer <API_KEY>",
        ));
    }
    let Json(body) =
        body.map_err(|e| ApiError::new(e.status(), ErrorCode::BadRequest, e.body_text()))?;
    let (channel, user) = (validate::nfc_owned(channel), validate::nfc_owned(body.user));
    validate::channel_name(&channel).map_err(OpError::from)?;
    validate::user_name(&user).map_err(OpError::from)?;
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
    gateway.ensure_user(&user).await?;
    let clock = gateway.clock.tick(None);
    let reply = gateway
        .publish(&channel, &user, body.text, clock, key.as_deref())
        .await?;
    Ok((StatusCode::CREATED, Json(reply)))
}

/// Any other path.
pub async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        ErrorCode::NotFound,
        "no such endpoint",
    )
}
