//! Backups and restores of a whole store, on each backend: a backup holds the state and the
//! restore puts it into an empty database with the old node's leases dropped (a new node
//! claims at once); a restore into a database that is not empty, and one from a truncated
//! file, are refused and leave the target as it was (a good restore into it works after).
use crate::vms::{admit, user};
use basphere_store::{ClaimLimits, Location, Store};
use std::path::Path;

/// A store with user `alice` and three admitted VMs, one of whose workflows node `n1` holds.
async fn populated(store: &Store) {
    let alice = user(store, "alice", 5).await;
    admit(store, &alice, &["a", "b", "c"]).await.unwrap();
    let leased = store
        .claim_workflow("n1", 600_000, &ClaimLimits::default())
        .await
        .unwrap();
    assert!(leased.is_some());
}

async fn case(source: Location, target: Location, dir: &Path) {
    let store = source.open().await.unwrap();
    populated(&store).await;
    let file = dir.join("backup");
    let made = source.backup(&file).await.unwrap();
    store.close().await;
    let s = &made.summary;
    assert_eq!((s.rows("vms"), s.rows("workflows")), (3, 3), "{s:?}");
    assert_eq!(s.unfinished_workflows, 3);
    let again = source.backup(&file).await.unwrap_err().to_string();
    assert!(again.contains("already exists"), "{again}");

    // A truncated file is refused; the target stays empty (the good restore below proves it).
    let bytes = std::fs::read(&file).unwrap();
    let cut = dir.join("cut");
    std::fs::write(&cut, &bytes[..bytes.len() - 200]).unwrap();
    let e = target.restore(&cut).await.unwrap_err().to_string();
    assert!(
        ["truncated", "damaged", "not a whole", "pg_restore failed"]
            .iter()
            .any(|w| e.contains(w)),
        "{e}"
    );

    let restored = target.restore(&file).await.unwrap();
    assert_eq!(restored.summary.tables, made.summary.tables);
    assert_eq!(restored.leases_released, 1);
    let store = target.open().await.unwrap();
    for _ in 0..3 {
        let w = store
            .claim_workflow("n2", 60_000, &ClaimLimits::default())
            .await
            .unwrap();
        assert!(w.is_some(), "every workflow is claimable at once");
    }
    store.close().await;

    let e = target.restore(&file).await.unwrap_err().to_string();
    assert!(e.contains("exists") || e.contains("not empty"), "{e}");
    let e = source.restore(&file).await.unwrap_err().to_string();
    assert!(e.contains("exists") || e.contains("not empty"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_and_restore_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let source = Location::Sqlite(dir.path().join("source.db"));
    let target = Location::Sqlite(dir.path().join("target.db"));
    case(source, target, dir.path()).await;
    let junk = dir.path().join("junk");
    std::fs::write(&junk, b"not a database at all, not even close").unwrap();
    let fresh = Location::Sqlite(dir.path().join("fresh.db"));
    let e = fresh.restore(&junk).await.unwrap_err().to_string();
    assert!(e.contains("not an SQLite database"), "{e}");
    assert!(!dir.path().join("fresh.db").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_and_restore_on_postgres() {
    let pg = basphere_testkit::postgres::Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let source = Location::Postgres(pg.create_database("source"));
    let target = Location::Postgres(pg.create_database("target"));
    case(source, target, dir.path()).await;
}
