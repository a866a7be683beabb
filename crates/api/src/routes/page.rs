//! Paging of list routes: `?limit=&after=`.
//!
//! Every list is in a stable order of a key each item carries (`id`, or `username` for users),
//! and `after` is that key of the last item of the previous page. `data` stays the array it
//! always was; when a page is full and more items follow, the response also carries the key to
//! ask for next in the `X-Next-After` header (a client that sees no header, or a short page,
//! has everything).

use crate::envelope::ok;
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
pub use basphere_service::{DEFAULT_LIMIT, MAX_LIMIT};
use basphere_service::{Paged, Paging};
use serde::{Deserialize, Serialize};
use utoipa::IntoParams;

/// The response header naming the `after` of the next page.
pub const NEXT_AFTER: &str = "x-next-after";

/// `?limit=&after=` of a list route.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Items per page, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<i64>,
    /// The key of the last item of the previous page (its `X-Next-After` header).
    pub after: Option<String>,
}

impl PageQuery {
    pub fn paging(&self) -> Paging {
        Paging {
            limit: self.limit,
            after: self.after.clone(),
        }
    }
}

/// One page as the envelope's `data` array, with the next page's `after` in the header.
pub fn page<T: Serialize>(message: impl FnOnce(usize) -> String, p: Paged<T>) -> Response {
    let r = ok(message(p.items.len()), p.items).into_response();
    with_next(r, p.next_after)
}

/// `r` with the next page's `after` (if more follow) in the header.
pub fn with_next(mut r: Response, next_after: Option<String>) -> Response {
    if let Some(v) = next_after.and_then(|n| HeaderValue::from_str(&n).ok()) {
        r.headers_mut().insert(NEXT_AFTER, v);
    }
    r
}
