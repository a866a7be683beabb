//! A VFS for the write thread's connection that writes each commit's WAL frames in one
//! `pwrite` instead of two per frame (SQLite writes a frame's 24-byte header, then its page).
//!
//! A group commit of five batch nodes appends ~25 frames: 50 system calls, a fifth of the
//! write thread's time. This VFS is SQLite's default (`unix`) for every file but the WAL, whose
//! appends it gathers in memory and writes as one when the commit frame (a frame header with a
//! non-zero database size) has its page, before SQLite publishes the commit in the WAL index:
//! no reader can see a commit whose frames are not in the file. Everything else on the WAL —
//! a read, a write elsewhere, a sync, a truncate, its size, a file control, its close — first
//! writes what is gathered. Durability is SQLite's own: with `synchronous = NORMAL` a commit
//! is in the kernel when `COMMIT` returns, as it was. Frames of a transaction that rolls back
//! stay gathered until the next write, which writes them first: SQLite itself would have
//! written them (past the last commit frame, where readers and recovery never look), and the
//! next transaction's frames then overwrite them.

use rusqlite::ffi;
use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::OnceLock;

/// The VFS's registered name.
pub(crate) const NAME: &str = "basphere-wal-writes";
const NAME_C: &CStr = c"basphere-wal-writes";
/// A WAL frame header's size; bytes 4..8 hold the database size after a commit (else 0).
const FRAME_HEADER: c_int = 24;

/// An open WAL file: the default VFS's file and the appends gathered for it.
#[repr(C)]
struct WalFile {
    base: ffi::sqlite3_file,
    real: *mut ffi::sqlite3_file,
    real_layout: std::alloc::Layout,
    gathered: Vec<u8>,
    /// Offset of `gathered`'s first byte.
    at: i64,
    /// The last write was a commit frame's header: its page completes the commit.
    commit_page_next: bool,
}

static VFS: OnceLock<Result<(), String>> = OnceLock::new();

/// Registers the VFS (once per process; not the default). Connections ask for it by [`NAME`].
pub(crate) fn register() -> Result<(), String> {
    VFS.get_or_init(|| {
        // SAFETY: `sqlite3_vfs_find` returns the default VFS, which SQLite never frees; the
        // copy is leaked, so it outlives every connection.
        unsafe {
            let real = ffi::sqlite3_vfs_find(std::ptr::null());
            if real.is_null() {
                return Err("SQLite has no default VFS".into());
            }
            let mut vfs: ffi::sqlite3_vfs = std::ptr::read(real);
            vfs.szOsFile = vfs.szOsFile.max(std::mem::size_of::<WalFile>() as c_int);
            vfs.zName = NAME_C.as_ptr();
            vfs.pNext = std::ptr::null_mut();
            vfs.xOpen = Some(open);
            let vfs = Box::into_raw(Box::new(vfs));
            let rc = ffi::sqlite3_vfs_register(vfs, 0);
            if rc != ffi::SQLITE_OK {
                return Err(format!("registering the {NAME} VFS: SQLite error {rc}"));
            }
            Ok(())
        }
    })
    .clone()
}

fn default_vfs() -> *mut ffi::sqlite3_vfs {
    // SAFETY: as in `register`.
    unsafe { ffi::sqlite3_vfs_find(std::ptr::null()) }
}

unsafe extern "C" fn open(
    _vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let real_vfs = default_vfs();
    // SAFETY: SQLite gives `file` szOsFile bytes, at least the default VFS's own; any file but
    // the WAL is the default VFS's, opened in place.
    unsafe {
        let xopen = (*real_vfs).xOpen.expect("a VFS opens files");
        if flags & ffi::SQLITE_OPEN_WAL == 0 {
            return xopen(real_vfs, name, file, flags, out_flags);
        }
        let Ok(layout) = std::alloc::Layout::from_size_align((*real_vfs).szOsFile as usize, 16)
        else {
            return ffi::SQLITE_CANTOPEN;
        };
        let real = std::alloc::alloc_zeroed(layout) as *mut ffi::sqlite3_file;
        if real.is_null() {
            return ffi::SQLITE_NOMEM;
        }
        let rc = xopen(real_vfs, name, real, flags, out_flags);
        if rc != ffi::SQLITE_OK {
            if !(*real).pMethods.is_null()
                && let Some(close) = (*(*real).pMethods).xClose
            {
                close(real);
            }
            std::alloc::dealloc(real as *mut u8, layout);
            (*file).pMethods = std::ptr::null();
            return rc;
        }
        std::ptr::write(
            file as *mut WalFile,
            WalFile {
                base: ffi::sqlite3_file { pMethods: &METHODS },
                real,
                real_layout: layout,
                gathered: Vec::new(),
                at: 0,
                commit_page_next: false,
            },
        );
        ffi::SQLITE_OK
    }
}

static METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 1,
    xClose: Some(close),
    xRead: Some(read),
    xWrite: Some(write),
    xTruncate: Some(truncate),
    xSync: Some(sync),
    xFileSize: Some(file_size),
    xLock: Some(lock),
    xUnlock: Some(unlock),
    xCheckReservedLock: Some(check_reserved_lock),
    xFileControl: Some(file_control),
    xSectorSize: Some(sector_size),
    xDeviceCharacteristics: Some(device_characteristics),
    xShmMap: None,
    xShmLock: None,
    xShmBarrier: None,
    xShmUnmap: None,
    xFetch: None,
    xUnfetch: None,
};

/// The WAL file behind `f`, and its default-VFS methods.
///
/// # Safety
/// `f` is a file [`open`] made a `WalFile`.
unsafe fn parts<'a>(f: *mut ffi::sqlite3_file) -> (&'a mut WalFile, &'a ffi::sqlite3_io_methods) {
    unsafe {
        let w = &mut *(f as *mut WalFile);
        let m = &*(*w.real).pMethods;
        (w, m)
    }
}

/// Bytes the default VFS writes in one call at most (`unix` masks a write's length with
/// 0x1ffff: a write of exactly 128 KiB would write nothing and report the disk full). Also
/// the most bytes gathered before they are written.
const MAX_WRITE: usize = 0x1ffff;

/// Writes what is gathered: one `pwrite` per [`MAX_WRITE`] bytes (a group commit's ~25 frames
/// are one; a larger transaction's are written as they reach it, so little memory is held).
fn flush(w: &mut WalFile, m: &ffi::sqlite3_io_methods) -> c_int {
    let write = m.xWrite.expect("a file is written");
    let mut rc = ffi::SQLITE_OK;
    let mut at = w.at;
    for chunk in w.gathered.chunks(MAX_WRITE) {
        // SAFETY: `chunk` is readable and shorter than 2^31.
        rc = unsafe {
            write(
                w.real,
                chunk.as_ptr() as *const c_void,
                chunk.len() as c_int,
                at,
            )
        };
        if rc != ffi::SQLITE_OK {
            break;
        }
        at += chunk.len() as i64;
    }
    w.gathered.clear();
    rc
}

unsafe extern "C" fn write(
    f: *mut ffi::sqlite3_file,
    data: *const c_void,
    n: c_int,
    offset: i64,
) -> c_int {
    // SAFETY: SQLite passes `n` readable bytes at `data`.
    let (w, m) = unsafe { parts(f) };
    let bytes = unsafe { std::slice::from_raw_parts(data as *const u8, n.max(0) as usize) };
    let end = w.at + w.gathered.len() as i64;
    if !w.gathered.is_empty() && offset != end {
        let rc = flush(w, m);
        if rc != ffi::SQLITE_OK {
            return rc;
        }
    }
    if w.gathered.is_empty() {
        w.at = offset;
    }
    w.gathered.extend_from_slice(bytes);
    let commit = std::mem::take(&mut w.commit_page_next);
    if n == FRAME_HEADER {
        w.commit_page_next = bytes[4..8] != [0, 0, 0, 0];
    }
    if commit || w.gathered.len() >= MAX_WRITE {
        return flush(w, m);
    }
    ffi::SQLITE_OK
}

/// Writes what is gathered for `f`, then runs `then` on the default VFS's file.
///
/// # Safety
/// As [`parts`].
unsafe fn flushed(
    f: *mut ffi::sqlite3_file,
    then: impl FnOnce(*mut ffi::sqlite3_file, &ffi::sqlite3_io_methods) -> c_int,
) -> c_int {
    let (w, m) = unsafe { parts(f) };
    match flush(w, m) {
        ffi::SQLITE_OK => then(w.real, m),
        rc => rc,
    }
}

unsafe extern "C" fn read(
    f: *mut ffi::sqlite3_file,
    data: *mut c_void,
    n: c_int,
    offset: i64,
) -> c_int {
    unsafe {
        flushed(f, |r, m| {
            m.xRead.expect("a file is read")(r, data, n, offset)
        })
    }
}

unsafe extern "C" fn truncate(f: *mut ffi::sqlite3_file, size: i64) -> c_int {
    unsafe { flushed(f, |r, m| m.xTruncate.expect("a file is truncated")(r, size)) }
}

unsafe extern "C" fn sync(f: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    unsafe { flushed(f, |r, m| m.xSync.expect("a file is synced")(r, flags)) }
}

unsafe extern "C" fn file_size(f: *mut ffi::sqlite3_file, size: *mut i64) -> c_int {
    unsafe { flushed(f, |r, m| m.xFileSize.expect("a file has a size")(r, size)) }
}

unsafe extern "C" fn file_control(f: *mut ffi::sqlite3_file, op: c_int, arg: *mut c_void) -> c_int {
    unsafe {
        flushed(f, |r, m| match m.xFileControl {
            Some(fc) => fc(r, op, arg),
            None => ffi::SQLITE_NOTFOUND,
        })
    }
}

unsafe extern "C" fn close(f: *mut ffi::sqlite3_file) -> c_int {
    let (w, m) = unsafe { parts(f) };
    let flushed = flush(w, m);
    let closed = unsafe { m.xClose.expect("a file is closed")(w.real) };
    // SAFETY: `open` wrote the WalFile and allocated `real` with `real_layout`; SQLite
    // calls xClose once and forgets the file.
    unsafe {
        std::alloc::dealloc(w.real as *mut u8, w.real_layout);
        std::ptr::drop_in_place(f as *mut WalFile);
    }
    if flushed != ffi::SQLITE_OK {
        flushed
    } else {
        closed
    }
}

unsafe extern "C" fn lock(f: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    let (w, m) = unsafe { parts(f) };
    unsafe { m.xLock.expect("a file locks")(w.real, level) }
}

unsafe extern "C" fn unlock(f: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    let (w, m) = unsafe { parts(f) };
    unsafe { m.xUnlock.expect("a file unlocks")(w.real, level) }
}

unsafe extern "C" fn check_reserved_lock(f: *mut ffi::sqlite3_file, out: *mut c_int) -> c_int {
    let (w, m) = unsafe { parts(f) };
    unsafe { m.xCheckReservedLock.expect("a file has locks")(w.real, out) }
}

unsafe extern "C" fn sector_size(f: *mut ffi::sqlite3_file) -> c_int {
    let (w, m) = unsafe { parts(f) };
    match m.xSectorSize {
        Some(s) => unsafe { s(w.real) },
        None => 4096,
    }
}

unsafe extern "C" fn device_characteristics(f: *mut ffi::sqlite3_file) -> c_int {
    let (w, m) = unsafe { parts(f) };
    match m.xDeviceCharacteristics {
        Some(d) => unsafe { d(w.real) },
        None => 0,
    }
}

#[cfg(test)]
mod tests {
    use crate::db::sqlite::{open, open_writer};

    fn count(c: &rusqlite::Connection) -> (i64, i64) {
        c.query_row(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(x)), 0) FROM t",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
    }

    /// Every commit through the gathering VFS is in the WAL file when `COMMIT` returns: a
    /// reader on its own connection sees it at once, whatever the commit's size (one frame;
    /// many more than one write's worth). A transaction that outgrows the page cache reads its
    /// own gathered pages back; a rolled-back one leaves nothing; a reopened file has it all.
    #[test]
    fn every_commit_is_in_the_file_when_it_returns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let w = open_writer(&path).unwrap();
        w.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, x TEXT)")
            .unwrap();
        // The WAL's file is this VFS's.
        let mut wal: *mut rusqlite::ffi::sqlite3_file = std::ptr::null_mut();
        // SAFETY: the file control writes the WAL's file pointer, owned by the connection.
        let methods = unsafe {
            let rc = rusqlite::ffi::sqlite3_file_control(
                w.handle(),
                c"main".as_ptr(),
                rusqlite::ffi::SQLITE_FCNTL_JOURNAL_POINTER,
                &mut wal as *mut _ as *mut std::ffi::c_void,
            );
            assert_eq!(rc, rusqlite::ffi::SQLITE_OK);
            assert!(!wal.is_null());
            (*wal).pMethods
        };
        assert!(std::ptr::eq(methods, &super::METHODS));
        let r = open(&path).unwrap();
        let (mut rows, mut bytes) = (0i64, 0i64);
        for (n, len) in [
            (1, 10),
            (5, 100),
            (30, 4000),
            (1, 10),
            (200, 3000),
            (2, 70_000),
        ] {
            w.execute_batch("BEGIN IMMEDIATE").unwrap();
            for _ in 0..n {
                w.execute("INSERT INTO t (x) VALUES (?1)", ["y".repeat(len)])
                    .unwrap();
            }
            w.execute_batch("COMMIT").unwrap();
            rows += n;
            bytes += n * len as i64;
            assert_eq!(count(&r), (rows, bytes), "after {n} rows of {len} bytes");
        }
        // Bigger than the writer's page cache: pages spill to the WAL mid-transaction and
        // are read back from it by the same transaction.
        w.execute_batch("PRAGMA cache_size = 10; BEGIN IMMEDIATE")
            .unwrap();
        for _ in 0..500 {
            w.execute("INSERT INTO t (x) VALUES (?1)", ["z".repeat(2000)])
                .unwrap();
        }
        assert_eq!(count(&w), (rows + 500, bytes + 500 * 2000));
        assert_eq!(count(&r), (rows, bytes), "uncommitted rows are not seen");
        w.execute_batch("ROLLBACK").unwrap();
        assert_eq!(count(&w), (rows, bytes));
        w.execute_batch("BEGIN IMMEDIATE").unwrap();
        for _ in 0..500 {
            w.execute("INSERT INTO t (x) VALUES (?1)", ["z".repeat(2000)])
                .unwrap();
        }
        w.execute_batch("COMMIT").unwrap();
        rows += 500;
        bytes += 500 * 2000;
        assert_eq!(count(&r), (rows, bytes));
        drop(r);
        drop(w);
        assert_eq!(count(&open(&path).unwrap()), (rows, bytes));
    }
}
