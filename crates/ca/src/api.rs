//! The CA's HTTP API (docs/requirements.md §4). A thin shell: parse and check the request, call the store on
//! a blocking thread, map the outcome to a status.
//!
//! Callers: with an admin token configured, the admin token may do everything; a hub token
//! (`POST /api/hubs/{name}`) only what its hub needs: its own certificate, the revocations, the
//! CRL and the CA certificate. Without an admin token, every local caller is the admin.

use std::sync::Arc;

use crate::store::TokenHub;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Query, Request, State};
use axum::http::{header, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use ztm_proto::addr::is_valid_host;
use ztm_proto::local::{refusal, Refusal};
use ztm_proto::model::ApiError;
use ztm_proto::names::{check_name, check_user_name, decode_segment, is_reserved_user, NameError};

use crate::store::{CaStore, StoreError};

/// Largest request body the CA reads (a public key PEM is a few hundred bytes).
const BODY_LIMIT: usize = 16 * 1024;
/// Most revocations returned by one feed request.
const FEED_PAGE: usize = 1000;

pub struct CaState {
    pub store: CaStore,
    /// When set, every request but `GET /api/certificates/ca` must carry
    /// `Authorization: Bearer <token>` with this admin token or a hub token.
    pub token: Option<String>,
    /// The address the API listens on. Without a token, only requests addressed to it or to a
    /// loopback name are answered, and state-changing ones only from our own origin: a web page
    /// must not get keys from a CA on the user's computer (DNS rebinding, cross-site requests).
    pub listen: std::net::SocketAddr,
}

pub fn router(state: Arc<CaState>) -> Router {
    Router::new()
        .route("/api/certificates", get(list))
        .route(
            "/api/certificates/",
            get(empty_name).post(empty_name).delete(empty_name),
        )
        .route(
            "/api/certificates/{*name}",
            get(get_cert).post(create).delete(delete),
        )
        .route("/api/revocations", get(revocations))
        .route("/api/crl", get(crl))
        .route("/api/hubs", get(hubs))
        .route("/api/hubs/", post(empty_name).delete(empty_name))
        .route("/api/hubs/{*name}", post(create_hub).delete(revoke_hub))
        .route("/api/sign/hub/", post(empty_name))
        .route("/api/sign/hub/{*name}", post(sign_hub))
        .method_not_allowed_fallback(|| async {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        })
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such API") })
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(ApiError::new(status.as_u16(), message.into()))).into_response()
}

fn pem(body: String) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
}

fn store_error(e: StoreError) -> Response {
    match e {
        StoreError::Exists(_) => error(StatusCode::CONFLICT, e.to_string()),
        StoreError::NotFound(_) | StoreError::NoHub(_) => {
            error(StatusCode::NOT_FOUND, e.to_string())
        }
        StoreError::HubExists(_) => error(StatusCode::CONFLICT, e.to_string()),
        StoreError::HubRevoked(_) => error(StatusCode::FORBIDDEN, e.to_string()),
        StoreError::Pki(ztm_pki::PkiError::BadPublicKey(_)) => {
            error(StatusCode::BAD_REQUEST, e.to_string())
        }
        other => {
            tracing::error!("{other}");
            error(StatusCode::INTERNAL_SERVER_ERROR, other.to_string())
        }
    }
}

fn name_error(e: NameError) -> Response {
    match e {
        NameError::Reserved => error(StatusCode::FORBIDDEN, e.to_string()),
        _ => error(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

/// The name after `prefix` in the raw path, percent-decoded.
fn raw_name(uri: &Uri, prefix: &str) -> Result<String, NameError> {
    let raw = uri.path().strip_prefix(prefix).unwrap_or_default();
    decode_segment(raw)
}

/// The name after `prefix`, decoded and checked with `check`.
fn checked_name(
    uri: &Uri,
    prefix: &str,
    check: fn(&str) -> Result<(), NameError>,
) -> Result<String, NameError> {
    let name = raw_name(uri, prefix)?;
    check(&name)?;
    Ok(name)
}

/// Runs a store operation on the blocking pool.
async fn with_store<T: Send + 'static>(
    state: &Arc<CaState>,
    f: impl FnOnce(&CaStore) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Response> {
    let state = state.clone();
    match tokio::task::spawn_blocking(move || f(&state.store)).await {
        Ok(r) => r.map_err(store_error),
        Err(e) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether a hub token of hub `hub` may make this request: the CA certificate, the
/// revocations, the CRL, and a certificate for its own name.
fn hub_may(hub: &str, method: &Method, uri: &Uri) -> bool {
    let path = uri.path();
    match *method {
        Method::GET => matches!(
            path,
            "/api/certificates/ca" | "/api/revocations" | "/api/crl"
        ),
        Method::POST => path
            .strip_prefix("/api/sign/hub/")
            .and_then(|raw| decode_segment(raw).ok())
            .is_some_and(|name| name == hub),
        _ => false,
    }
}

async fn authorize(State(state): State<Arc<CaState>>, req: Request, next: Next) -> Response {
    let Some(token) = &state.token else {
        return match refusal(req.method(), req.headers(), &state.listen) {
            Some(Refusal::NotLocal) => error(
                StatusCode::FORBIDDEN,
                "this CA has no admin token, so it only answers requests addressed to localhost",
            ),
            Some(Refusal::CrossOrigin) => {
                error(StatusCode::FORBIDDEN, "cross-origin requests are refused")
            }
            None => next.run(req).await,
        };
    };
    if req.method() == Method::GET && req.uri().path() == "/api/certificates/ca" {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let unauthorized = || {
        error(
            StatusCode::UNAUTHORIZED,
            "this CA requires an admin token or a hub token: send 'Authorization: Bearer <token>'",
        )
    };
    let Some(given) = given.map(str::to_string) else {
        return unauthorized();
    };
    if constant_time_eq(given.as_bytes(), token.as_bytes()) {
        return next.run(req).await;
    }
    // Tokens are looked up by their hash, so the comparison leaks nothing of a stored one.
    match with_store(&state, move |s| s.hub_for_token(&given)).await {
        Ok(Some(TokenHub {
            name,
            revoked: true,
        })) => error(
            StatusCode::FORBIDDEN,
            format!("hub {name} has been revoked: its hub token no longer works"),
        ),
        Ok(Some(TokenHub { name, .. })) if hub_may(&name, req.method(), req.uri()) => {
            next.run(req).await
        }
        Ok(Some(TokenHub { name, .. })) => error(
            StatusCode::FORBIDDEN,
            format!(
                "this is the hub token of hub {name}: it may only get certificates for hub \
                 {name} (POST /api/sign/hub/{name}) and read GET /api/certificates/ca, \
                 /api/revocations and /api/crl; {} {} needs the admin token",
                req.method(),
                req.uri().path()
            ),
        ),
        Ok(None) => unauthorized(),
        Err(r) => r,
    }
}

async fn empty_name() -> Response {
    name_error(NameError::Empty)
}

async fn list(State(state): State<Arc<CaState>>) -> Response {
    match with_store(&state, |s| s.list()).await {
        Ok(list) => Json(list).into_response(),
        Err(r) => r,
    }
}

async fn get_cert(State(state): State<Arc<CaState>>, uri: Uri) -> Response {
    let name = match raw_name(&uri, "/api/certificates/") {
        Ok(n) => n,
        Err(e) => return name_error(e),
    };
    if name == "ca" {
        return pem(state.store.ca_cert_pem().to_string());
    }
    if !is_reserved_user(&name) {
        if let Err(e) = check_name(&name) {
            return name_error(e);
        }
    }
    let lookup = name.clone();
    match with_store(&state, move |s| s.get(&lookup)).await {
        Ok(Some(cert)) => pem(cert),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            format!("no certificate named {name}"),
        ),
        Err(r) => r,
    }
}

async fn create(State(state): State<Arc<CaState>>, uri: Uri) -> Response {
    let name = match checked_name(&uri, "/api/certificates/", check_user_name) {
        Ok(n) => n,
        Err(e) => return name_error(e),
    };
    let user = name.clone();
    match with_store(&state, move |s| s.create_user(&user)).await {
        Ok(key) => {
            tracing::info!("issued a certificate for user {name}");
            pem(key)
        }
        Err(r) => r,
    }
}

async fn delete(State(state): State<Arc<CaState>>, uri: Uri) -> Response {
    let name = match checked_name(&uri, "/api/certificates/", check_user_name) {
        Ok(n) => n,
        Err(e) => return name_error(e),
    };
    match with_store(&state, move |s| s.revoke(&name)).await {
        Ok(rev) => {
            tracing::info!(
                "revoked the certificate of user {} (serial {})",
                rev.name,
                rev.serial
            );
            StatusCode::NO_CONTENT.into_response()
        }
        Err(r) => r,
    }
}

#[derive(Deserialize)]
struct Since {
    #[serde(default)]
    since: i64,
}

async fn revocations(
    State(state): State<Arc<CaState>>,
    query: Result<Query<Since>, QueryRejection>,
) -> Response {
    let Ok(Query(Since { since })) = query else {
        return error(StatusCode::BAD_REQUEST, "since must be a whole number");
    };
    match with_store(&state, move |s| s.revocations(since, FEED_PAGE)).await {
        Ok(feed) => Json(feed).into_response(),
        Err(r) => r,
    }
}

#[derive(Deserialize)]
struct HubQuery {
    /// Comma-separated host names or IP addresses for the certificate's SANs.
    #[serde(default)]
    names: String,
}

async fn sign_hub(
    State(state): State<Arc<CaState>>,
    uri: Uri,
    query: Result<Query<HubQuery>, QueryRejection>,
    body: String,
) -> Response {
    let name = match checked_name(&uri, "/api/sign/hub/", check_name) {
        Ok(n) => n,
        Err(e) => return name_error(e),
    };
    let names = match query {
        Ok(Query(q)) => q.names,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let sans: Vec<String> = names
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    if let Some(bad) = sans.iter().find(|s| !is_valid_host(s)) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("bad host name {bad:?} in names"),
        );
    }
    if !body.contains("-----BEGIN PUBLIC KEY-----") {
        return error(StatusCode::BAD_REQUEST, "body is not a PEM public key");
    }
    match with_store(&state, move |s| s.sign_hub(&name, &body, &sans)).await {
        Ok(cert) => pem(cert),
        Err(r) => r,
    }
}

/// `GET /api/crl`: the CA's CRL, PEM.
async fn crl(State(state): State<Arc<CaState>>) -> Response {
    match with_store(&state, |s| s.crl()).await {
        Ok(pem) => ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], pem).into_response(),
        Err(r) => r,
    }
}

/// `GET /api/hubs`: every hub with its certificates.
async fn hubs(State(state): State<Arc<CaState>>) -> Response {
    match with_store(&state, |s| s.hubs()).await {
        Ok(list) => Json(list).into_response(),
        Err(r) => r,
    }
}

/// `POST /api/hubs/{name}`: creates hub `name` and answers its hub token, once.
async fn create_hub(State(state): State<Arc<CaState>>, uri: Uri) -> Response {
    let name = match checked_name(&uri, "/api/hubs/", check_name) {
        Ok(n) => n,
        Err(e) => return name_error(e),
    };
    let hub = name.clone();
    match with_store(&state, move |s| s.create_hub(&hub)).await {
        Ok(token) => {
            tracing::info!("issued the hub token of hub {name}");
            (
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                format!("{token}\n"),
            )
                .into_response()
        }
        Err(r) => r,
    }
}

/// `DELETE /api/hubs/{name}`: revokes hub `name`, its token and every certificate signed for it.
async fn revoke_hub(State(state): State<Arc<CaState>>, uri: Uri) -> Response {
    let name = match checked_name(&uri, "/api/hubs/", check_name) {
        Ok(n) => n,
        Err(e) => return name_error(e),
    };
    let hub = name.clone();
    match with_store(&state, move |s| s.revoke_hub(&hub)).await {
        Ok(revs) => {
            let serials: Vec<&str> = revs.iter().map(|r| r.serial.as_str()).collect();
            tracing::info!(
                "revoked hub {name} (its hub token, if any, and its {} certificates: {})",
                revs.len(),
                serials.join(", ")
            );
            StatusCode::NO_CONTENT.into_response()
        }
        Err(r) => r,
    }
}
