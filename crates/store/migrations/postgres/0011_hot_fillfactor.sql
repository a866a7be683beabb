-- Room on each page for the new versions of the rows the engine updates, so the updates stay
-- HOT (no new index entries) instead of spilling to other pages. Measured on a 1,000-node batch
-- at the old settings, parallelism 100 (10): a VM's status update was HOT 48% (94%) of the time
-- (rows of ~200 bytes, 20% of a page free: about 8 new versions for 33 rows) and a step's start
-- and end 60% (72%); now 100% and 97% at parallelism 10. Half of
-- each page now: a VM row is updated about once in its life, a step row twice (its start and
-- its end; the first version is dead, and pruned, by the second). Pages written before keep
-- their layout until rewritten.
ALTER TABLE vms SET (fillfactor = 50);
ALTER TABLE workflow_steps SET (fillfactor = 50);
