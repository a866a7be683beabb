//! Pages of lists: `limit` items after the key `after`.
//!
//! Every list is in a stable order of a key each item carries (`id`, or `username` for users),
//! and `after` is that key of the last item of the previous page.

use crate::ServiceError;

/// Items per page unless `limit` says otherwise.
pub const DEFAULT_LIMIT: i64 = 100;
/// The most items one page holds.
pub const MAX_LIMIT: i64 = 1000;

/// Which page to list.
#[derive(Debug, Clone, Default)]
pub struct Paging {
    pub limit: Option<i64>,
    pub after: Option<String>,
}

impl Paging {
    /// The first page of at most `limit` items.
    pub fn first(limit: i64) -> Self {
        Self {
            limit: Some(limit),
            after: None,
        }
    }

    /// The page size asked for (`default` when none), refused outside `1..=MAX_LIMIT`.
    pub(crate) fn limit_or(&self, default: i64) -> Result<i64, ServiceError> {
        match self.limit.unwrap_or(default) {
            n if (1..=MAX_LIMIT).contains(&n) => Ok(n),
            n => Err(ServiceError::BadRequest(format!(
                "limit must be between 1 and {MAX_LIMIT} (got {n}); ask for further pages with \
                 ?after=<the last id of this page>"
            ))),
        }
    }

    /// The page size asked for ([`DEFAULT_LIMIT`] when none), refused outside `1..=MAX_LIMIT`.
    pub fn limit(&self) -> Result<i64, ServiceError> {
        self.limit_or(DEFAULT_LIMIT)
    }

    /// `after` where the list's key is a number (or a request id such as `req-0000002a`,
    /// which stands for its number).
    pub(crate) fn after_num(&self) -> Result<Option<i64>, ServiceError> {
        self.after
            .as_deref()
            .map(|a| {
                basphere_wire::request_seq(a).ok_or_else(|| {
                    ServiceError::BadRequest(format!(
                        "after must be the id (a number) of the last item of the previous page \
                         (got {a:?})"
                    ))
                })
            })
            .transpose()
    }
}

/// One page of items, and the `after` of the next page when more follow.
#[derive(Debug, Clone)]
pub struct Paged<T> {
    pub items: Vec<T>,
    pub next_after: Option<String>,
}

impl<T> Paged<T> {
    /// A page of `items` fetched with one more than `limit` (to know whether more follow).
    pub(crate) fn of(mut items: Vec<T>, limit: i64, key: impl Fn(&T) -> String) -> Self {
        let more = items.len() as i64 > limit;
        items.truncate(limit.max(0) as usize);
        let next_after = more.then(|| items.last().map(&key)).flatten();
        Self { items, next_after }
    }

    pub(crate) fn map<U>(self, f: impl FnMut(T) -> U) -> Paged<U> {
        Paged {
            items: self.items.into_iter().map(f).collect(),
            next_after: self.next_after,
        }
    }
}
