//! Static files, embedded in the binary (no CDN).

use axum::extract::Path;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

const CSS: &str = include_str!("../static/app.css");
const JS: &str = include_str!("../static/app.js");
const ICON: &str = include_str!("../static/icon.svg");

pub async fn serve(Path(file): Path<String>) -> Response {
    let (ty, body) = match file.as_str() {
        "app.css" => ("text/css; charset=utf-8", CSS),
        "app.js" => ("text/javascript; charset=utf-8", JS),
        "icon.svg" => ("image/svg+xml", ICON),
        _ => return (StatusCode::NOT_FOUND, "no such file").into_response(),
    };
    (
        [
            ("content-type", ty),
            ("cache-control", "public, max-age=300"),
        ],
        body,
    )
        .into_response()
}
