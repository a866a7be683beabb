//! What the ledger holds, counted (for metrics and operators).

use super::WorkflowStatus;
use crate::db::{Cols, stmt};
use crate::{Result, Store, parse};

/// Workflows by definition and status, and how many are ready to run now.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkflowCounts {
    /// (definition, status, count), every pair that has a workflow.
    pub by_status: Vec<(String, WorkflowStatus, u64)>,
    /// Unfinished, due, unleased (or their lease expired), not waiting on dependencies or a
    /// batch slot: the queue a free worker would claim from.
    pub ready: u64,
}

impl Store {
    /// Counts the ledger's workflows (one read transaction, two statements).
    pub async fn workflow_counts(&self) -> Result<WorkflowCounts> {
        self.db
            .read(move |tx| {
                Box::pin(async move {
                    let now = super::clock(tx).await?;
                    let mut by_status = vec![];
                    for r in tx
                        .query(&stmt!(
                            "SELECT definition, status, COUNT(*) AS n FROM workflows
                             GROUP BY definition, status ORDER BY definition, status"
                        ))
                        .await?
                    {
                        by_status.push((
                            r.text("definition")?,
                            parse("workflows.status", &r.text("status")?)?,
                            r.int("n")? as u64,
                        ));
                    }
                    let ready = tx
                        .query_one(&stmt!(
                            "SELECT COUNT(*) AS n FROM workflows
                             WHERE status IN ('pending', 'running', 'undoing') AND waiting_on = 0
                               AND parked = 0 AND next_run_at <= $1
                               AND (lease_owner IS NULL OR lease_until < $1)",
                            now
                        ))
                        .await?
                        .int("n")? as u64;
                    Ok(WorkflowCounts { by_status, ready })
                })
            })
            .await
    }
}
