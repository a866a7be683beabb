//! The web portal: server-rendered pages on the same listeners as the API.

use axum::Router;
use basphere_api::AppState;

/// The portal's routes, merged beside the API's by `basphere serve`.
pub fn router(state: AppState) -> Router {
    Router::new().with_state(state)
}
