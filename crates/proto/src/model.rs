//! The JSON model of the agent's REST API (SPEC §5) and the error body every API uses.

use serde::{Deserialize, Serialize};

/// The error body of every ZTM HTTP API: `{"status":N,"message":"..."}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

/// One certificate as the CA lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CertificateEntry {
    pub name: String,
    pub serial: String,
    pub created: i64,
    pub not_after: i64,
}

/// One revocation in the CA's feed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Revocation {
    pub seq: i64,
    pub name: String,
    pub serial: String,
    pub time: i64,
}

/// `GET /api/revocations?since=N`: revocations with `seq > N`, oldest first, and the newest
/// sequence number the CA has (to pass as `since` next time).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RevocationFeed {
    pub last: i64,
    pub revocations: Vec<Revocation>,
}
