//! The prototype's cluster routes: held for Stage 2, each answers an active user 501 until
//! clusters exist (and anyone else 401/403, like every user route).

use crate::auth::Caller;
use crate::envelope::ApiError;
use crate::openapi::{Forbidden, NotImplemented};
use axum::http::StatusCode;

fn not_yet() -> ApiError {
    ApiError::new(
        StatusCode::NOT_IMPLEMENTED,
        "clusters are not available yet (they arrive with Stage 2); use VMs for now",
    )
}

/// Declares each cluster route's handler and its (one) answer.
macro_rules! not_built {
    ($($name:ident: $method:ident $path:literal $($named:literal)?, $summary:literal;)+) => {$(
        #[utoipa::path(
            $method, path = $path, tag = "clusters",
            operation_id = concat!("clusters_", stringify!($name)), summary = $summary,
            $(params(($named = String, Path, description = "The cluster's name")),)?
            responses(
                (status = 403, response = Forbidden),
                (status = 501, response = NotImplemented),
            ),
        )]
        pub(crate) async fn $name(caller: Caller) -> ApiError {
            match caller.principal() {
                Ok(_) => not_yet(),
                Err(e) => e,
            }
        }
    )+};
}

not_built! {
    list: get "/clusters", "List clusters (not built yet)";
    create: post "/clusters", "Create a cluster (not built yet)";
    quota: get "/clusters/quota", "Cluster quota (not built yet)";
    show: get "/clusters/{name}" "name", "Show a cluster (not built yet)";
    delete: delete "/clusters/{name}" "name", "Delete a cluster (not built yet)";
    kubeconfig: get "/clusters/{name}/kubeconfig" "name", "A cluster's kubeconfig (not built yet)";
    status: get "/clusters/{name}/status" "name", "A cluster's status (not built yet)";
}
