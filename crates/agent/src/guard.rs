//! Who may talk to the agent's API. It has no login, so it only answers requests addressed to
//! a loopback name (against DNS rebinding) and refuses state-changing requests that a web page
//! of another origin sends (against cross-site request forgery).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;

use ztm_proto::local::{refusal, Refusal};

use crate::{Agent, ApiError};

pub async fn guard(State(agent): State<Arc<Agent>>, req: Request, next: Next) -> Response {
    match refusal(req.method(), req.headers(), &agent.listen) {
        Some(Refusal::NotLocal) => ApiError::new(
            StatusCode::FORBIDDEN,
            "this agent only answers requests addressed to localhost",
        )
        .into_response_json(),
        Some(Refusal::CrossOrigin) => {
            ApiError::new(StatusCode::FORBIDDEN, "cross-origin requests are refused")
                .into_response_json()
        }
        None => next.run(req).await,
    }
}
