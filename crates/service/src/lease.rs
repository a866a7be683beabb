//! Work leased at admission: a transaction that queues workflows leases them to this node's
//! free engine slots, and the engine runs them without a claim.

use crate::ServiceError;
use basphere_engine::{Adopt, Engine};
use basphere_store::LeaseTo;
use std::future::Future;

/// Runs `admit` — a transaction that may lease up to `n` of the workflows it queues to this
/// node (`Some` lease when the engine has free slots) — and hands those to the engine. On a
/// task of its own: a caller gone mid-way cannot leave leased work undriven.
pub(crate) async fn admit_leased<T, A, E, F>(
    engine: &Engine,
    n: usize,
    admit: impl FnOnce(Option<LeaseTo>) -> F,
) -> Result<Result<T, E>, ServiceError>
where
    F: Future<Output = Result<(T, A), E>> + Send + 'static,
    A: Into<Adopt> + Send + 'static,
    T: Send + 'static,
    E: Send + 'static,
{
    let slots = engine.reserve(n);
    let run = admit(slots.as_ref().map(|s| s.lease()));
    let adopter = engine.clone();
    let done = tokio::spawn(async move {
        let (made, claimed) = run.await?;
        if let Some(slots) = slots {
            adopter.adopt(slots, claimed);
        }
        Ok(made)
    })
    .await
    .map_err(|e| ServiceError::Internal(format!("the admission task failed: {e}")))?;
    engine.wake();
    Ok(done)
}
