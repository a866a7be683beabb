//! Users, registrations, key changes, tokens and enrollment.
use crate::Case;

pub fn cases() -> Vec<Case> {
    vec![]
}
