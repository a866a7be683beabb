//! The workflow ledger: queueing, claims, leases, step transitions, endings, children.
use crate::Case;

pub fn cases() -> Vec<Case> {
    vec![]
}
