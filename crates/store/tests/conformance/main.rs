//! One store test suite, run on every backend: each case gets a fresh store on the embedded
//! SQLite file and on a real PostgreSQL 15 server (a fresh database per case), and must
//! behave the same on both. A failing case prints its name before the panic.
//!
//! Add a case to a domain module's `cases()`; it runs on both backends.

mod audit;
mod users;
mod vms;
mod workflows;

use basphere_store::Store;
use std::future::Future;
use std::pin::Pin;

pub type Fut = Pin<Box<dyn Future<Output = ()> + Send>>;
/// A named case: it gets a fresh store.
pub type Case = (&'static str, fn(Store) -> Fut);

fn all() -> Vec<Case> {
    let mut v = vec![];
    v.extend(audit::cases());
    v.extend(users::cases());
    v.extend(vms::cases());
    v.extend(workflows::cases());
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
}
