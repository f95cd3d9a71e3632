//! The live dashboard: one page and its assets, embedded in the binary (no CDN, no build step,
//! works offline), served at `/` and `/ui/{file}`. They are open without the token: they hold no
//! data about the host. The page's script asks for the token when the API answers 401, keeps it
//! in the tab's `sessionStorage` and sends it as `Authorization: Bearer` on every call.

use super::envelope::ApiError;
use axum::extract::Path;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// The page itself.
pub const INDEX_HTML: &str = include_str!("dashboard/index.html");

/// Every asset under `/ui/`: file name, content type, bytes.
pub const ASSETS: &[(&str, &str, &str)] = &[
    ("app.js", "text/javascript; charset=utf-8", include_str!("dashboard/app.js")),
    ("style.css", "text/css; charset=utf-8", include_str!("dashboard/style.css")),
    ("favicon.svg", "image/svg+xml", include_str!("dashboard/favicon.svg")),
];

/// Everything the page loads comes from this daemon; scripts and styles only from files (no
/// inline code), API calls only to this origin, and no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; \
                   base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// `GET /` and `GET /ui/{file}` (HEAD too). Not in the OpenAPI document: they are not API.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new().route("/", get(index)).route("/ui/{file}", get(asset))
}

async fn index() -> Response {
    page("text/html; charset=utf-8", INDEX_HTML)
}

async fn asset(Path(file): Path<String>) -> Response {
    match ASSETS.iter().find(|(name, _, _)| *name == file) {
        Some((_, content_type, body)) => page(content_type, body),
        None => ApiError::new(StatusCode::NOT_FOUND, "ROUTE_NOT_FOUND", format!("no dashboard asset {file}"))
            .into_response(),
    }
}

fn page(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // The assets change with the binary: revalidate rather than run a stale script.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}
