//! The container image as a test sees it: built by `scripts/build-image` from this crate's
//! binary, its OCI archive read by hand (index.json → manifest → config and gzip layers), and
//! its rootfs run with `unshare`/`chroot` as the image's user, the volumes bind-mounted.
#![allow(dead_code)]

use basphere_testkit::run_ok;
use serde_json::Value;
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

pub const BIN: &str = env!("CARGO_BIN_EXE_basphere");

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// True when the test may run (root); false after printing why it is skipped. Not root in CI
/// is a failure: there the image test must run.
pub fn must_run() -> bool {
    if basphere_testkit::is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI is set but the image test is not root: run scripts/test as root"
    );
    eprintln!("SKIPPED: building and running the container image needs root (mmdebstrap, chroot)");
    false
}

/// A built image: its config (`config` of the image config JSON) and its unpacked rootfs.
pub struct Image {
    pub dir: tempfile::TempDir,
    pub archive: PathBuf,
    pub config: Value,
    pub rootfs: PathBuf,
}

impl Image {
    /// Builds the image from this crate's (debug) binary with `scripts/build-image` and
    /// unpacks it.
    pub fn build() -> Image {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("basphere.oci.tar");
        let t0 = Instant::now();
        let out = run_ok(
            Command::new(repo().join("scripts/build-image"))
                .args(["--binary", BIN, "--tag", "basphere:test", "--out"])
                .arg(&archive),
        );
        eprintln!(
            "{}image built in {:.1}s, {} bytes",
            String::from_utf8_lossy(&out.stdout),
            t0.elapsed().as_secs_f64(),
            std::fs::metadata(&archive).unwrap().len()
        );
        let (config, rootfs) = unpack(&archive, dir.path());
        Image {
            dir,
            archive,
            config,
            rootfs,
        }
    }

    /// A string list of the image config (`Entrypoint`, `Cmd`, `Env`, `Healthcheck.Test`).
    pub fn list(&self, pointer: &str) -> Vec<String> {
        self.config
            .pointer(pointer)
            .and_then(Value::as_array)
            .unwrap_or_else(|| panic!("no list at {pointer} in {:#}", self.config))
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    }

    /// The `User` as numeric `uid:gid`.
    pub fn user(&self) -> (u32, u32) {
        let user = self.config["User"].as_str().unwrap_or_default();
        let (u, g) = user
            .split_once(':')
            .unwrap_or_else(|| panic!("User {user:?} is not uid:gid"));
        (u.parse().unwrap(), g.parse().unwrap())
    }

    /// The paths the image declares as volumes.
    pub fn volumes(&self) -> Vec<String> {
        let v = self.config["Volumes"].as_object();
        v.map(|m| m.keys().cloned().collect()).unwrap_or_default()
    }

    /// `argv` as the image runs it: in a new mount and PID namespace, each volume bind-mounted
    /// from `mounts` (image path → host dir) and `/proc` mounted, chrooted into the rootfs as the
    /// image's user, with the image's environment plus `env`. The namespace and its mounts go
    /// when the process ends (`--kill-child`: also when `unshare` is killed).
    pub fn command(
        &self,
        mounts: &BTreeMap<String, PathBuf>,
        env: &[(&str, &str)],
        argv: &[String],
    ) -> Command {
        self.command_as(self.user(), mounts, env, argv)
    }

    /// [`Image::command`] as `uid:gid` (`docker exec --user` in a runtime).
    pub fn command_as(
        &self,
        (uid, gid): (u32, u32),
        mounts: &BTreeMap<String, PathBuf>,
        env: &[(&str, &str)],
        argv: &[String],
    ) -> Command {
        let root = self.rootfs.display().to_string();
        let mut script = String::from("set -e\n");
        for (inside, host) in mounts {
            script += &format!(
                "/usr/bin/mount --bind '{}' '{root}{inside}'\n",
                host.display()
            );
        }
        script += &format!(
            "/usr/bin/mount -t proc proc '{root}/proc'\n\
             exec /usr/sbin/chroot --userspec={uid}:{gid} '{root}' \"$@\"\n"
        );
        let mut cmd = Command::new("/usr/bin/unshare");
        cmd.args([
            "--mount",
            "--pid",
            "--fork",
            "--kill-child",
            "--propagation",
        ])
        .args(["private", "/bin/sh", "-c", &script, "sh"])
        .args(argv)
        .env_clear();
        for kv in self.list("/Env") {
            let (k, v) = kv.split_once('=').unwrap();
            cmd.env(k, v);
        }
        cmd.envs(env.iter().copied());
        cmd
    }
}

/// Reads the OCI layout in `archive`: the config of its one image, and its layers unpacked in
/// order into `<dir>/rootfs` (owners kept).
fn unpack(archive: &Path, dir: &Path) -> (Value, PathBuf) {
    let layout = dir.join("oci");
    let rootfs = dir.join("rootfs");
    std::fs::create_dir_all(&layout).unwrap();
    std::fs::create_dir_all(&rootfs).unwrap();
    run_ok(
        Command::new("tar")
            .arg("-xf")
            .arg(archive)
            .arg("-C")
            .arg(&layout),
    );
    let blob = |digest: &str| {
        let hex = digest
            .strip_prefix("sha256:")
            .unwrap_or_else(|| panic!("digest {digest} is not sha256"));
        layout.join("blobs/sha256").join(hex)
    };
    let json = |p: PathBuf| -> Value {
        serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap_or_else(|e| {
            panic!("{}: {e}", p.display());
        })
    };
    let index = json(layout.join("index.json"));
    let manifests = index["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 1, "one image in {index:#}");
    let manifest = json(blob(manifests[0]["digest"].as_str().unwrap()));
    let image_config = json(blob(manifest["config"]["digest"].as_str().unwrap()));
    for layer in manifest["layers"].as_array().unwrap() {
        let media = layer["mediaType"].as_str().unwrap();
        assert!(media.ends_with("gzip"), "layer {media} is not a gzip tar");
        run_ok(
            Command::new("tar")
                .args(["--numeric-owner", "-xzf"])
                .arg(blob(layer["digest"].as_str().unwrap()))
                .arg("-C")
                .arg(&rootfs),
        );
    }
    (image_config["config"].clone(), rootfs)
}

/// What a file looks like from outside: type and mode, owner, size, modification and change
/// times (a write, chmod or chown changes one of them).
#[derive(Debug, PartialEq, Eq)]
pub struct Stamp {
    mode: u32,
    owner: (u32, u32),
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

/// Every path under `root` with its [`Stamp`], not descending into `skip` (paths inside the
/// rootfs, e.g. `/var/lib/basphere`), which are listed themselves.
pub fn snapshot(root: &Path, skip: &[String]) -> BTreeMap<PathBuf, Stamp> {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(p) = todo.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        let inside = Path::new("/").join(p.strip_prefix(root).unwrap());
        if m.is_dir() && !skip.iter().any(|s| Path::new(s) == inside) {
            for e in std::fs::read_dir(&p).unwrap() {
                todo.push(e.unwrap().path());
            }
        }
        out.insert(
            inside,
            Stamp {
                mode: m.mode(),
                owner: (m.uid(), m.gid()),
                size: m.len(),
                mtime: (m.mtime(), m.mtime_nsec()),
                ctime: (m.ctime(), m.ctime_nsec()),
            },
        );
    }
    out
}

/// The paths whose stamp differs between two snapshots, or that one of them lacks.
pub fn changed(
    before: &BTreeMap<PathBuf, Stamp>,
    after: &BTreeMap<PathBuf, Stamp>,
) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = before
        .iter()
        .filter(|(p, s)| after.get(*p) != Some(*s))
        .map(|(p, _)| p.clone())
        .collect();
    paths.extend(after.keys().filter(|p| !before.contains_key(*p)).cloned());
    paths
}
