//! Users, registrations, key changes, tokens and enrollment.
use crate::{Case, ReplicaCase};

pub fn cases() -> Vec<Case> {
    vec![]
}

pub fn replica_cases() -> Vec<ReplicaCase> {
    vec![]
}
