//! The one error every endpoint returns: a status, a stable `kind`, the request field at fault
//! and a message, as JSON `{"error": {"kind", "field", "message"}}`.
//!
//! Bad requests are `4xx` naming the field; `5xx` is kept for the server's own faults (its
//! database or disk), never for anything a client sent.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// The error kind of a response, read by the metrics layer (errors by kind).
#[derive(Clone, Copy, Debug)]
pub struct ErrorKindTag(pub &'static str);

/// An API error: HTTP status, kind, the field at fault and the message, as JSON.
#[derive(Debug, Serialize)]
pub struct ApiError {
    #[serde(skip)]
    pub status: StatusCode,
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    pub message: String,
    #[serde(skip)]
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            kind,
            field: None,
            message: bounded(message.into()),
            retry_after: None,
        }
    }

    /// A bad value of request field `field` (`400 bad_field`).
    pub fn field(field: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            field: Some(bounded(field.to_string())),
            ..ApiError::new(StatusCode::BAD_REQUEST, "bad_field", message)
        }
    }

    pub fn not_found(what: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no {what} with this id"),
        )
    }

    /// The server's own fault (database, disk): logged, and the client told only that.
    pub fn internal(e: impl std::fmt::Display) -> ApiError {
        eprintln!("v2l-serve: internal error: {e}");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the server failed to store or read its state; see its log",
        )
    }

    pub fn with_status(mut self, status: StatusCode, kind: &'static str) -> ApiError {
        self.status = status;
        self.kind = kind;
        self
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> ApiError {
        ApiError::internal(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": &self });
        let mut r = (self.status, axum::Json(body)).into_response();
        r.extensions_mut().insert(ErrorKindTag(self.kind));
        if let Some(s) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

/// A runtime error about an uploaded input, told with the field's name instead of the server
/// path the upload was written to (clients never see server paths).
pub fn upload_error(field: &str, e: v2l_runtime::RuntimeError) -> ApiError {
    use v2l_runtime::RuntimeError as E;
    let message = match e {
        E::BadFile { message, .. } => message,
        E::Invalid { message, .. } => message,
        E::MissingTensor { name, .. } => format!("missing tensor `{name}`"),
        E::Io { source, .. } => source.to_string(),
        E::Lora(l) => strip_paths(&l.to_string()),
        other => strip_paths(&other.to_string()),
    };
    ApiError::field(field, message)
}

/// Drops anything that looks like an absolute path from a message (`/x/y/z: rest` → `rest`).
fn strip_paths(m: &str) -> String {
    match m.split_once(": ") {
        Some((head, rest)) if head.starts_with('/') => rest.to_string(),
        _ => m.to_string(),
    }
}

/// Longest message or field name an error carries: what a client sent is echoed, but a 100 KB
/// `lora_id` is not sent back whole.
const MAX_ECHO: usize = 512;

fn bounded(mut s: String) -> String {
    if s.len() > MAX_ECHO {
        let mut cut = MAX_ECHO;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("… (truncated)");
    }
    s
}
