//! The PostgreSQL 15 fixture: a real server, reachable only on 127.0.0.1, isolated databases,
//! and nothing left behind when dropped.

use basphere_testkit::Postgres;
use basphere_testkit::postgres::connect;
use basphere_testkit::process::{alive, children_of};
use std::path::Path;

async fn show(c: &tokio_postgres::Client, setting: &str) -> String {
    c.query_one(&format!("SHOW {setting}"), &[])
        .await
        .unwrap()
        .get(0)
}

async fn has_table(c: &tokio_postgres::Client, name: &str) -> bool {
    let found: Option<String> = c
        .query_one("SELECT to_regclass($1)::text", &[&name])
        .await
        .unwrap()
        .get(0);
    found.is_some()
}

/// The uid `/proc/PID/status` gives for `pid`'s real user.
fn uid_of(pid: u32) -> u32 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|u| u.parse().ok())
        .unwrap()
}

#[tokio::test]
async fn starts_and_takes_a_table() {
    let pg = Postgres::start();
    let c = connect(&pg.url()).await.unwrap();
    assert!(show(&c, "server_version").await.starts_with("15."));
    assert_eq!(show(&c, "listen_addresses").await, "127.0.0.1");
    let sockets = show(&c, "unix_socket_directories").await;
    assert!(
        Path::new(&sockets).starts_with(pg.dir()),
        "socket dir {sockets} is not private to the fixture"
    );
    assert_eq!(show(&c, "server_encoding").await, "UTF8");
    assert!(show(&c, "max_connections").await.parse::<u32>().unwrap() >= 200);
    if basphere_testkit::is_root() {
        let postgres = nix::unistd::User::from_name("postgres").unwrap().unwrap();
        assert_eq!(
            uid_of(pg.pid()),
            postgres.uid.as_raw(),
            "not run as postgres"
        );
    }
    c.batch_execute(
        "CREATE TABLE steps (id text PRIMARY KEY, attempt int NOT NULL);
         INSERT INTO steps VALUES ('a', 1), ('b', 2);",
    )
    .await
    .unwrap();
    let n: i64 = c
        .query_one("SELECT sum(attempt) FROM steps", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 3);
    // Nothing listens on the IPv6 loopback.
    let v6 = format!("postgres://postgres@[::1]:{}/postgres", pg.port());
    assert!(connect(&v6).await.is_err(), "reachable on ::1");
}

#[tokio::test]
async fn databases_are_isolated() {
    let pg = Postgres::start();
    let a = connect(&pg.create_database("test_a")).await.unwrap();
    let b = connect(&pg.create_database("test_b")).await.unwrap();
    a.batch_execute("CREATE TABLE t (x int); INSERT INTO t VALUES (7);")
        .await
        .unwrap();
    assert!(has_table(&a, "t").await);
    assert!(
        !has_table(&b, "t").await,
        "test_a's table is visible in test_b"
    );
    b.batch_execute("CREATE TABLE t (x int)").await.unwrap();
    let n: i64 = b
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    let db: String = a
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(db, "test_a");
}

#[tokio::test]
async fn drop_stops_the_server_and_removes_its_dir() {
    let pg = Postgres::start();
    // An open session must not hold the shutdown up.
    let c = connect(&pg.url()).await.unwrap();
    c.simple_query("SELECT 1").await.unwrap();
    let pid = pg.pid();
    let workers = children_of(pid);
    assert!(!workers.is_empty(), "no postgres workers under {pid}");
    assert!(alive(pid as i32, "postgres"));
    let dir = pg.dir().to_path_buf();
    let t0 = std::time::Instant::now();
    drop(pg);
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(5),
        "a fast shutdown took {:?}",
        t0.elapsed()
    );
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "postmaster {pid} is still there"
    );
    for w in workers {
        assert!(!alive(w, "postgres"), "worker {w} is still running");
    }
    assert!(!dir.exists(), "{} was not removed", dir.display());
    assert!(c.simple_query("SELECT 1").await.is_err());
}

#[tokio::test]
async fn two_servers_at_once_get_their_own_ports() {
    let (one, two) = (Postgres::start(), Postgres::start());
    assert_ne!(one.port(), two.port());
    assert_ne!(one.pid(), two.pid());
    let c1 = connect(&one.url()).await.unwrap();
    let c2 = connect(&two.url()).await.unwrap();
    c1.batch_execute("CREATE TABLE only_here (x int)")
        .await
        .unwrap();
    assert!(has_table(&c1, "only_here").await);
    assert!(
        !has_table(&c2, "only_here").await,
        "one server's table on the other"
    );
}
