//! The response envelope every `/api/` route uses (its types are `memwarden_protocol::api::
//! {ApiResponse, ErrorResponse}`), the one error type with its HTTP mapping, and the JSON body
//! extractors that give malformed bodies the same envelope.

use crate::app::{AppError, ServiceError};
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};
use time::OffsetDateTime;

pub use memwarden_protocol::api::{rfc3339, ApiResponse, ErrorBody, ErrorResponse};

tokio::task_local! {
    /// The correlation id of the request being served (set by the middleware in `api::mod`).
    pub static CORRELATION_ID: String;
}

pub fn correlation_id() -> String {
    CORRELATION_ID.try_with(Clone::clone).unwrap_or_default()
}

/// A successful response: `Data(data)` in the envelope.
pub struct Data<T>(pub T);

impl<T: Serialize> IntoResponse for Data<T> {
    fn into_response(self) -> Response {
        axum::Json(ApiResponse::ok(self.0, rfc3339(OffsetDateTime::now_utc()), correlation_id())).into_response()
    }
}

/// An error response with its HTTP status and stable code.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into() }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", message)
    }
}

/// Each room's error keeps its own mapping; the use case's own reasons map here.
impl From<AppError> for ApiError {
    fn from(e: AppError) -> Self {
        match e {
            AppError::Service(e) => e.into(),
            AppError::Weights(e) => e.into(),
            AppError::Supervisor(e) => e.into(),
            AppError::Admission(e) => e.into(),
            AppError::Invalid(message) => ApiError::invalid(message),
            AppError::InvalidOperation(message) => ApiError::new(StatusCode::CONFLICT, "INVALID_OPERATION", message),
            AppError::DeviceUnavailable(message) => ApiError::new(StatusCode::CONFLICT, "DEVICE_UNAVAILABLE", message),
            AppError::InsufficientMemory(message) => {
                ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "INSUFFICIENT_MEMORY", message)
            }
            AppError::Internal(message) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL_ERROR", message),
        }
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        let status = match &e {
            ServiceError::DeviceNotFound { .. }
            | ServiceError::AllocationNotFound { .. }
            | ServiceError::TransferNotFound { .. } => StatusCode::NOT_FOUND,
            ServiceError::InvalidArgument { .. } => StatusCode::BAD_REQUEST,
            ServiceError::InsufficientMemory { .. } | ServiceError::QuotaExceeded { .. } => {
                StatusCode::INSUFFICIENT_STORAGE
            }
            ServiceError::InvalidOperation(_) => StatusCode::CONFLICT,
            ServiceError::TransferFailed { .. } | ServiceError::BackendFailed { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            ServiceError::BackendUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError::new(status, e.code(), e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(code = self.code, message = %self.message, "request failed");
        }
        let error = ErrorBody { code: self.code.into(), message: self.message, status_code: self.status.as_u16() };
        let body = ErrorResponse::new(error, rfc3339(OffsetDateTime::now_utc()), correlation_id());
        (self.status, axum::Json(body)).into_response()
    }
}

/// The largest request body a route takes, put in the request's extensions by the body-limit
/// middleware (`api::limit_body`) so a body cut short while streaming names the limit too.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub u64);

impl ApiError {
    /// 413 `PAYLOAD_TOO_LARGE`, naming the limit and where it is set.
    pub fn too_large(limit_bytes: u64) -> Self {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "PAYLOAD_TOO_LARGE",
            format!("request body larger than the limit of {limit_bytes} bytes (api.max_body_bytes)"),
        )
    }
}

/// A required JSON object body (`Content-Type: application/json`), bound as the seed's ASP.NET
/// clients expect: field names match case-insensitively (`SizeBytes` binds `sizeBytes`). Anything
/// else (not JSON, not an object, a wrong field type, an unknown field) is 400
/// `INVALID_ARGUMENT` naming the field; a body over the limit is 413 `PAYLOAD_TOO_LARGE`.
pub struct ApiJson<T>(pub T);

/// As [`ApiJson`], for routes whose body is optional: an empty body means `T::default()`, and no
/// content type is required.
pub struct OptionalJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let json_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| {
                let v = v.trim().to_ascii_lowercase();
                v == "application/json" || (v.starts_with("application/") && v.ends_with("+json"))
            });
        let body = read_body(req, state).await?;
        if !json_type {
            return Err(ApiError::invalid("request body must be JSON with Content-Type: application/json"));
        }
        if is_blank(&body) {
            return Err(ApiError::invalid("request body required: a JSON object"));
        }
        parse_object(&body).map(ApiJson)
    }
}

impl<S, T> FromRequest<S> for OptionalJson<T>
where
    T: DeserializeOwned + Default,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let body = read_body(req, state).await?;
        if is_blank(&body) {
            return Ok(OptionalJson(T::default()));
        }
        parse_object(&body).map(OptionalJson)
    }
}

/// The body of a route that takes none: empty, or `{}`. Anything else is 400, so a client that
/// thinks it is passing options learns that it is not.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoFields {}

pub type NoBody = OptionalJson<NoFields>;

/// `axum::extract::Query`, with a malformed query (a repeated or mistyped parameter) answered
/// with the envelope: 400 `INVALID_ARGUMENT`.
pub struct ApiQuery<T>(pub T);

impl<S, T> axum::extract::FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(q)| ApiQuery(q))
            .map_err(|e| {
                ApiError::invalid(humane(&e.body_text().replace("Failed to deserialize query string: ", "query: ")))
            })
    }
}

/// No body: zero bytes. Whitespace alone is no JSON text (and a form feed, which
/// `is_ascii_whitespace` counts, is not even JSON's whitespace: schemathesis sent `\x0c` as a
/// defragment body and got 200), so it is parsed, and refused, like any other body.
fn is_blank(body: &[u8]) -> bool {
    body.is_empty()
}

async fn read_body<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    let limit = req.extensions().get::<BodyLimit>().copied();
    Bytes::from_request(req, state).await.map_err(|e| match (e.status(), limit) {
        (StatusCode::PAYLOAD_TOO_LARGE, Some(BodyLimit(l))) => ApiError::too_large(l),
        _ => ApiError::invalid(format!("request body could not be read: {}", e.body_text())),
    })
}

/// Parses `body` as a JSON object into `T`: keys bound case-insensitively to `T`'s fields, and
/// serde's messages rid of Rust type names.
pub fn parse_object<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| ApiError::invalid(format!("request body is not valid JSON: {e}")))?;
    let Value::Object(object) = value else {
        return Err(ApiError::invalid(format!("request body must be a JSON object, not {}", json_kind(&value))));
    };
    let object = bind_case_insensitively(object, serde_aux::serde_introspection::serde_introspect::<T>());
    for (key, value) in &object {
        within_int64(value, key)?;
    }
    serde_path_to_error::deserialize(Value::Object(object)).map_err(|e| {
        let path = e.path().to_string();
        let message = humane(&e.into_inner().to_string());
        ApiError::invalid(if path == "." { message } else { format!("{path}: {message}") })
    })
}

/// Refuses an integer above `i64::MAX` anywhere in a body (`path` names where). The document gives
/// every integer field as `int64` (JSON Schema has no unsigned 64-bit format), so, as with
/// [`query_u64`](super::query_u64), the range a `u64` field takes is int64's non-negative half:
/// serde alone would take `maxBytesToMove: 9223372036854775808` that the document calls invalid.
fn within_int64(value: &Value, path: &str) -> Result<(), ApiError> {
    match value {
        Value::Number(n) if n.as_u64().is_some_and(|n| n > i64::MAX as u64) => Err(ApiError::invalid(format!(
            "{path}: {n} is over {}, the largest integer the API takes (int64)",
            i64::MAX
        ))),
        Value::Array(items) => items.iter().enumerate().try_for_each(|(i, v)| within_int64(v, &format!("{path}[{i}]"))),
        Value::Object(fields) => fields.iter().try_for_each(|(k, v)| within_int64(v, &format!("{path}.{k}"))),
        _ => Ok(()),
    }
}

/// Renames each key that matches one of `fields` but for case to that field (ASP.NET binds
/// `SizeBytes` and `sizebytes` to `sizeBytes`; serde only takes the exact name).
fn bind_case_insensitively(object: Map<String, Value>, fields: &[&str]) -> Map<String, Value> {
    object
        .into_iter()
        .map(|(k, v)| {
            if fields.contains(&k.as_str()) {
                return (k, v);
            }
            match fields.iter().find(|f| f.eq_ignore_ascii_case(&k)) {
                Some(f) => (f.to_string(), v),
                None => (k, v),
            }
        })
        .collect()
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// serde's message without the Rust names a client never sees: "expected struct AllocateBody"
/// becomes "expected an object", and an integer too large for its field (which serde_json reads
/// as a float, "floating point `1e20`, expected u64") says so.
fn humane(message: &str) -> String {
    if let Some((_, rest)) = message.split_once("invalid type: floating point `") {
        if let Some((number, expected)) = rest.split_once("`, expected ") {
            let kind = expected.split_whitespace().next().unwrap_or("");
            if let Some((min, max)) = integer_range(kind) {
                return format!("{number} is not an integer from {min} to {max}");
            }
        }
    }
    for kind in ["u8", "u16", "u32", "u64", "usize", "i8", "i16", "i32", "i64", "isize"] {
        let pattern = format!("expected {kind}");
        if message.ends_with(&pattern) {
            let (min, max) = integer_range(kind).unwrap_or_default();
            return message.replace(&pattern, &format!("expected an integer from {min} to {max}"));
        }
    }
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(i) = rest.find("struct ") {
        out.push_str(&rest[..i]);
        let after = &rest[i + "struct ".len()..];
        let name_end = after.find(|c: char| !c.is_alphanumeric() && c != '_').unwrap_or(after.len());
        out.push_str("an object");
        rest = &after[name_end..];
        if let Some(r) = rest.strip_prefix(" with ") {
            // "with 8 elements": how serde would take the object as an array.
            rest = r
                .split_once(" elements")
                .map(|(_, r)| r)
                .or_else(|| r.split_once(" element").map(|(_, r)| r))
                .unwrap_or(r);
        }
    }
    out.push_str(rest);
    out
}

/// The range of a Rust integer type by its name, as serde names it in messages.
fn integer_range(kind: &str) -> Option<(i128, i128)> {
    Some(match kind {
        "u8" => (0, u8::MAX.into()),
        "u16" => (0, u16::MAX.into()),
        "u32" => (0, u32::MAX.into()),
        "u64" | "usize" => (0, u64::MAX.into()),
        "i8" => (i8::MIN.into(), i8::MAX.into()),
        "i16" => (i16::MIN.into(), i16::MAX.into()),
        "i32" => (i32::MIN.into(), i32::MAX.into()),
        "i64" | "isize" => (i64::MIN.into(), i64::MAX.into()),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, serde::Deserialize, PartialEq)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    struct Body {
        size_bytes: Option<u64>,
        purpose: Option<String>,
    }

    fn message(body: &str) -> String {
        parse_object::<Body>(body.as_bytes()).expect_err(body).message
    }

    #[test]
    fn only_objects_are_bodies_and_messages_name_no_rust_type() {
        for (body, says) in [
            ("[null, null]", "must be a JSON object, not an array"),
            ("\"u\"", "not a string"),
            ("not json", "not valid JSON"),
            (r#"{"sizeBytes": 100000000000000000000}"#, "sizeBytes: 1e+20 is not an integer from 0 to"),
            (r#"{"sizeBytes": -1}"#, "sizeBytes: invalid value: integer `-1`, expected an integer from 0 to"),
            (r#"{"sizeBytes": "x"}"#, "expected an integer from 0"),
            (r#"{"nope": 1}"#, "unknown field `nope`"),
            (r#"{"sizeBytes": 9223372036854775808}"#, "sizeBytes: 9223372036854775808 is over 9223372036854775807"),
            (r#"{"purpose": [{"a": 18446744073709551615}]}"#, "purpose[0].a: 18446744073709551615 is over"),
        ] {
            let m = message(body);
            assert!(m.contains(says), "{body}: {m}");
            assert!(!m.contains("Body") && !m.contains("u64") && !m.contains("floating"), "{body}: {m}");
        }
    }

    #[test]
    fn field_names_bind_case_insensitively() {
        let b: Body = parse_object(br#"{"SizeBytes": 7, "PURPOSE": "kv"}"#).expect("binds");
        assert_eq!(b, Body { size_bytes: Some(7), purpose: Some("kv".into()) });
        assert_eq!(
            humane("invalid type: map, expected struct AllocateBody with 8 elements"),
            "invalid type: map, expected an object"
        );
    }
}
