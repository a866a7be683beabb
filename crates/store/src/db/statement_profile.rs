//! Time per statement on this process's SQLite connections (and per write commit), and per
//! round trip to PostgreSQL as this process waits for it, for benchmarks: off unless
//! [`start`]ed.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

static ON: AtomicBool = AtomicBool::new(false);
static TIMES: Mutex<Option<HashMap<String, (u64, Duration)>>> = Mutex::new(None);

/// One statement's runs: its text (whitespace folded), how many, and their total time.
#[derive(Debug, Clone)]
pub struct StatementTime {
    pub sql: String,
    pub calls: u64,
    pub total: Duration,
}

/// Times `sql` until the guard drops, if recording.
pub(crate) fn time(sql: &str) -> Option<Timed<'_>> {
    ON.load(Ordering::Relaxed)
        .then(|| Timed(Cow::Borrowed(sql), std::time::Instant::now()))
}

/// Times what `label` makes until the guard drops, if recording (the label is only made
/// then): a PostgreSQL round trip, as this process waits for it.
pub(crate) fn time_with(label: impl FnOnce() -> String) -> Option<Timed<'static>> {
    ON.load(Ordering::Relaxed)
        .then(|| Timed(Cow::Owned(label()), std::time::Instant::now()))
}

pub(crate) struct Timed<'a>(Cow<'a, str>, std::time::Instant);

impl Drop for Timed<'_> {
    fn drop(&mut self) {
        note(&self.0, self.1.elapsed());
    }
}

fn note(what: &str, took: Duration) {
    let mut t = TIMES.lock().expect("statement times lock");
    let e = t
        .get_or_insert_with(HashMap::new)
        .entry(what.to_string())
        .or_default();
    e.0 += 1;
    e.1 += took;
}

/// Starts recording (and clears what was recorded).
pub fn start() {
    *TIMES.lock().expect("statement times lock") = None;
    ON.store(true, Ordering::Relaxed);
}

/// Stops recording; what was recorded since [`start`], the most total time first.
pub fn stop() -> Vec<StatementTime> {
    ON.store(false, Ordering::Relaxed);
    let t = TIMES.lock().expect("statement times lock").take();
    let mut by_text: HashMap<String, StatementTime> = HashMap::new();
    for (sql, (calls, total)) in t.unwrap_or_default() {
        let text = sql.split_whitespace().collect::<Vec<_>>().join(" ");
        let e = by_text.entry(text.clone()).or_insert(StatementTime {
            sql: text,
            calls: 0,
            total: Duration::ZERO,
        });
        e.calls += calls;
        e.total += total;
    }
    let mut v: Vec<StatementTime> = by_text.into_values().collect();
    v.sort_by_key(|t| std::cmp::Reverse(t.total));
    v
}
