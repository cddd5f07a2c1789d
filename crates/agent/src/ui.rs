//! The web UI: static files built into the binary (no Node.js to build or run), served at `/`.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

const INDEX: &str = include_str!("../ui/index.html");
const APP: &str = include_str!("../ui/app.js");
const LIB: &str = include_str!("../ui/lib.js");
const STYLE: &str = include_str!("../ui/style.css");

fn file(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// The UI's only page. Its security headers (a policy that admits only the UI's own files,
/// no framing) are set for every answer by [`crate::guard::headers`].
pub async fn index() -> Response {
    file("text/html; charset=utf-8", INDEX)
}

pub async fn asset(axum::extract::Path(name): axum::extract::Path<String>) -> Response {
    match name.as_str() {
        "app.js" => file("text/javascript; charset=utf-8", APP),
        "lib.js" => file("text/javascript; charset=utf-8", LIB),
        "style.css" => file("text/css; charset=utf-8", STYLE),
        _ => (StatusCode::NOT_FOUND, "no such file").into_response(),
    }
}
