//! The API's one error type, and where every other error becomes HTTP.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::error::MeshError;
use crate::store::StoreError;

/// An error answer: `{"status":N,"message":"..."}` (the model's `ApiError` body).
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

pub type ApiResult<T = Response> = Result<T, ApiError>;

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
    pub fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
    pub fn into_response_json(self) -> Response {
        (
            self.status,
            Json(ztm_proto::model::ApiError::new(
                self.status.as_u16(),
                self.message,
            )),
        )
            .into_response()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.into_response_json()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::error!("{e}");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

impl From<MeshError> for ApiError {
    fn from(e: MeshError) -> Self {
        let status = match &e {
            MeshError::NotConnected => StatusCode::SERVICE_UNAVAILABLE,
            MeshError::NotHere(_) => StatusCode::NOT_FOUND,
            MeshError::Unreachable(_) => StatusCode::BAD_GATEWAY,
            MeshError::BadRequest(_) => StatusCode::BAD_REQUEST,
        };
        ApiError::new(status, e.to_string())
    }
}
