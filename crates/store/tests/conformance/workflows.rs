//! The workflow ledger: queueing, claims, leases, step transitions, endings, children.
use crate::{Case, ReplicaCase};

pub fn cases() -> Vec<Case> {
    vec![]
}

pub fn replica_cases() -> Vec<ReplicaCase> {
    vec![]
}
