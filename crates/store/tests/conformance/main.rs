//! One store test suite, run on every backend: each case gets a fresh store on the embedded
//! SQLite file and on a real PostgreSQL 15 server (a fresh database per case), and must
//! behave the same on both. A failing case prints its name before the panic.
//!
//! Add a case to a domain module's `cases()`; it runs on both backends.

mod addresses;
mod ahead;
mod audit;
mod backup;
mod batches;
mod claimed;
mod extras;
mod users;
mod vms;
mod workflows;

use basphere_store::Store;
use std::future::Future;
use std::pin::Pin;

pub type Fut = Pin<Box<dyn Future<Output = ()> + Send>>;
/// A named case: it gets a fresh store.
pub type Case = (&'static str, fn(Store) -> Fut);
/// A named case run on two stores over one fresh database, as two servers (replicas) would
/// share it: two handles on one SQLite file, or two pools on one PostgreSQL database.
pub type ReplicaCase = (&'static str, fn(Store, Store) -> Fut);

fn all() -> Vec<Case> {
    let mut v = vec![];
    v.extend(audit::cases());
    v.extend(users::cases());
    v.extend(vms::cases());
    v.extend(addresses::cases());
    v.extend(batches::cases());
    v.extend(ahead::cases());
    v.extend(extras::cases());
    v.extend(workflows::cases());
    v.extend(claimed::cases());
    v
}

fn all_replicated() -> Vec<ReplicaCase> {
    let mut v = vec![];
    v.extend(users::replica_cases());
    v.extend(vms::replica_cases());
    v.extend(addresses::replica_cases());
    v.extend(extras::replica_cases());
    v.extend(workflows::replica_cases());
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_case_on_sqlite() {
    for (name, case) in all() {
        eprintln!("case {name} on sqlite");
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("basphere.db")).await.unwrap();
        assert_eq!(store.backend(), "sqlite");
        case(store.clone()).await;
        store.close().await;
    }
    for (name, case) in all_replicated() {
        eprintln!("case {name} on two sqlite handles");
        let dir = tempfile::tempdir().unwrap();
        let a = Store::open(&dir.path().join("basphere.db")).await.unwrap();
        let b = Store::open(&dir.path().join("basphere.db")).await.unwrap();
        case(a.clone(), b.clone()).await;
        a.close().await;
        b.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_case_on_postgres() {
    let pg = basphere_testkit::postgres::Postgres::start();
    for (i, (name, case)) in all().into_iter().enumerate() {
        eprintln!("case {name} on postgres");
        let url = pg.create_database(&format!("case{i}"));
        let store = Store::open_postgres(&url).await.unwrap();
        assert_eq!(store.backend(), "postgres");
        case(store.clone()).await;
        store.close().await;
    }
    for (i, (name, case)) in all_replicated().into_iter().enumerate() {
        eprintln!("case {name} on two postgres replicas");
        let url = pg.create_database(&format!("replicas{i}"));
        let a = Store::open_postgres(&url).await.unwrap();
        let b = Store::open_postgres(&url).await.unwrap();
        case(a.clone(), b.clone()).await;
        a.close().await;
        b.close().await;
    }
}
