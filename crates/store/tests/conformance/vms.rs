//! VM admission, deletes, listings and batches.
use crate::Case;

pub fn cases() -> Vec<Case> {
    vec![]
}
