//! Checking a request's fields in order, so that every bad field (of the wrong JSON type, or
//! with an invalid value) is reported at once and in the order of the fields.

use crate::ServiceError;
use basphere_core::FieldErrors;

pub(crate) struct Check {
    pub errs: FieldErrors,
    unreadable: FieldErrors,
}

impl Check {
    /// Starts with the fields the request reader could not read.
    pub fn new(unreadable: &FieldErrors) -> Self {
        Self {
            errs: FieldErrors::new(),
            unreadable: unreadable.clone(),
        }
    }

    /// Moves the read errors of `key` into the report; whether there were any.
    fn unreadable(&mut self, key: &str) -> bool {
        let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.unreadable.0)
            .into_iter()
            .partition(|e| e.field == key);
        self.unreadable.0 = rest;
        let found = !mine.is_empty();
        self.errs.0.extend(mine);
        found
    }

    /// An optional list field: its readable entries, after moving the read errors of the
    /// field and of its entries (`key[i]…`) into the report in order.
    pub fn opt_list<T>(&mut self, key: &str, v: Option<Vec<T>>) -> Vec<T> {
        let entry = format!("{key}[");
        let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.unreadable.0)
            .into_iter()
            .partition(|e| e.field == key || e.field.starts_with(&entry));
        self.unreadable.0 = rest;
        self.errs.0.extend(mine);
        v.unwrap_or_default()
    }

    /// An optional field: its value when it was readable.
    pub fn opt<T>(&mut self, key: &str, v: Option<T>) -> Option<T> {
        if self.unreadable(key) { None } else { v }
    }

    /// A required field: its value, or an error when absent or unreadable.
    pub fn req<T>(&mut self, key: &str, v: Option<T>) -> Option<T> {
        if self.unreadable(key) {
            return None;
        }
        if v.is_none() {
            self.errs.push(key, "is required");
        }
        v
    }

    /// Every error found, or `Ok`.
    pub fn finish(mut self) -> Result<(), ServiceError> {
        self.errs.0.append(&mut self.unreadable.0);
        self.errs.into_result().map_err(ServiceError::Invalid)
    }
}
