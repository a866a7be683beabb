//! VM admission, deletes, listings and batches.
use crate::{Case, ReplicaCase};

pub fn cases() -> Vec<Case> {
    vec![]
}

pub fn replica_cases() -> Vec<ReplicaCase> {
    vec![]
}
