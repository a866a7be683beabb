//! Paging of list routes: `?limit=&after=`.
//!
//! Every list is in a stable order of a key each item carries (`id`, or `username` for users),
//! and `after` is that key of the last item of the previous page. `data` stays the array it
//! always was; when a page is full and more items follow, the response also carries the key to
//! ask for next in the `X-Next-After` header (a client that sees no header, or a short page,
//! has everything).

use crate::envelope::{ApiError, Ok200, ok};
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

/// Items per page unless `limit` says otherwise.
pub const DEFAULT_LIMIT: i64 = 100;
/// The most items one page holds.
pub const MAX_LIMIT: i64 = 1000;
/// The response header naming the `after` of the next page.
pub const NEXT_AFTER: &str = "x-next-after";

/// `?limit=&after=` of a list route.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct PageQuery {
    pub limit: Option<i64>,
    pub after: Option<String>,
}

impl PageQuery {
    /// The page size asked for, refused outside `1..=MAX_LIMIT`.
    pub fn limit(&self) -> Result<i64, ApiError> {
        match self.limit {
            None => Ok(DEFAULT_LIMIT),
            Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
            Some(n) => Err(ApiError::bad_request(format!(
                "limit must be between 1 and {MAX_LIMIT} (got {n}); ask for further pages with \
                 ?after=<the last id of this page>"
            ))),
        }
    }

    /// `after` where the list's key is a number.
    pub fn after_num(&self) -> Result<Option<i64>, ApiError> {
        self.after
            .as_deref()
            .map(|a| {
                a.parse().map_err(|_| {
                    ApiError::bad_request(format!(
                        "after must be the id (a number) of the last item of the previous page \
                         (got {a:?})"
                    ))
                })
            })
            .transpose()
    }
}

/// One page: the items (fetched with one more than `limit`, to know whether more follow),
/// the message, and `key` of an item for the next page's `after`.
pub fn page<T: Serialize>(
    message: impl FnOnce(usize) -> String,
    mut items: Vec<T>,
    limit: i64,
    key: impl Fn(&T) -> String,
) -> Response {
    let more = items.len() as i64 > limit;
    items.truncate(limit.max(0) as usize);
    let next = more.then(|| items.last().map(&key)).flatten();
    let mut r = ok(message(items.len()), items).into_response();
    if let Some(v) = next.and_then(|n| HeaderValue::from_str(&n).ok()) {
        r.headers_mut().insert(NEXT_AFTER, v);
    }
    r
}

/// A first page of at most `limit` items without the next-page header, for callers inside
/// the process (the portal) that take a handler's plain response.
pub fn first<T: Serialize>(
    message: impl FnOnce(usize) -> String,
    mut items: Vec<T>,
    limit: i64,
) -> Ok200 {
    items.truncate(limit.clamp(0, MAX_LIMIT) as usize);
    ok(message(items.len()), items)
}
