//! Building base images.
//!
//! Layout: `images_dir/<name>` is a symlink to `images_dir/<name>.<build-time>/` holding
//! `base.qcow2`, `vmlinuz` and `initrd-tiny.img`. A build runs in a hidden scratch directory that is
//! renamed into place only on success, and the symlink is swapped atomically, so readers see the
//! old image or the new one, never half of one. Clones point at the versioned path of their base,
//! so a rebuild never changes the backing file under an existing VM; older versions are left for
//! the operator to delete when no VM uses them any more.

use basphere_core::ImageName;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncBufReadExt, BufReader};

/// The files every image directory holds.
pub const IMAGE_FILES: [&str; 3] = ["base.qcow2", "vmlinuz", "initrd-tiny.img"];

/// The build script of `debian-12` (see the script's header).
const DEBIAN_12_SCRIPT: &str = include_str!("image/debian-12.sh");

/// Images this crate can build.
pub const BUILDABLE: [&str; 1] = ["debian-12"];

/// File in an image directory naming the recipe it was built from (a hash of the script).
const RECIPE_FILE: &str = "recipe";

/// Identifies the embedded build script, so a cached image made by an older recipe is rebuilt.
pub fn recipe_id(name: &str) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in DEBIAN_12_SCRIPT.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{name} {h:016x}")
}

/// Whether `dir` holds a complete image.
pub fn is_complete(dir: &Path) -> bool {
    IMAGE_FILES.iter().all(|f| dir.join(f).is_file())
}

/// Apt archive URIs found in the host's own sources.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Mirrors {
    /// Serves `<suite>` (and `<suite>-updates`).
    pub main: Option<String>,
    /// Serves `<suite>-security`.
    pub security: Option<String>,
}

/// Finds the archives serving `suite` and `suite-security` in apt sources: `.sources` files in
/// deb822 form and one-line `.list` files. Only `deb` entries count.
pub fn mirrors_from_sources(files: &[(PathBuf, String)], suite: &str) -> Mirrors {
    let security = format!("{suite}-security");
    let mut m = Mirrors::default();
    let mut note = |uri: &str, suites: &[&str]| {
        let uri = uri.trim_end_matches('/').to_string();
        if m.main.is_none() && suites.contains(&suite) {
            m.main = Some(uri.clone());
        }
        if m.security.is_none() && suites.contains(&security.as_str()) {
            m.security = Some(uri);
        }
    };
    for (path, text) in files {
        if path.extension().is_some_and(|e| e == "sources") {
            for stanza in text.split("\n\n") {
                let field = |name: &str| {
                    stanza
                        .lines()
                        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
                        .map(str::trim)
                };
                if field("Enabled").is_some_and(|v| v.eq_ignore_ascii_case("no")) {
                    continue;
                }
                if !field("Types").is_some_and(|t| t.split_whitespace().any(|t| t == "deb")) {
                    continue;
                }
                let suites: Vec<&str> = field("Suites").unwrap_or("").split_whitespace().collect();
                for uri in field("URIs").unwrap_or("").split_whitespace() {
                    note(uri, &suites);
                }
            }
        } else {
            for line in text.lines() {
                let mut words = line.split_whitespace().filter(|w| !w.is_empty());
                if words.next() != Some("deb") {
                    continue;
                }
                let mut rest: Vec<&str> = words.collect();
                if rest.first().is_some_and(|w| w.starts_with('[')) {
                    let end = rest.iter().position(|w| w.ends_with(']')).unwrap_or(0);
                    rest.drain(..=end);
                }
                if let [uri, s, ..] = rest.as_slice() {
                    note(uri, &[s]);
                }
            }
        }
    }
    m
}

/// Reads the host's apt sources (`/etc/apt/sources.list` and `sources.list.d/*.{list,sources}`).
pub fn host_apt_sources() -> Vec<(PathBuf, String)> {
    let mut paths = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "list" || e == "sources"))
            .collect();
        more.sort();
        paths.extend(more);
    }
    paths
        .into_iter()
        .filter_map(|p| std::fs::read_to_string(&p).ok().map(|t| (p, t)))
        .collect()
}

/// Why an image build failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("no recipe for image {0:?}; this version can build: {list}", list = BUILDABLE.join(", "))]
    UnknownImage(String),
    #[error("building images needs {tool}: {hint}")]
    MissingTool { tool: &'static str, hint: String },
    #[error("building images needs root (mmdebstrap, chroot)")]
    NotRoot,
    #[error("no apt source for Debian {0} found in /etc/apt/sources.list(.d): add one, then retry")]
    NoMirror(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("image build script failed ({status}); last output: {tail}")]
    Script { status: String, tail: String },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BuildError {
    let what = what.into();
    move |source| BuildError::Io { what, source }
}

/// Builds image `name` into `images_dir/<name>` unless it is there already, complete and made by
/// this version's recipe (or `force`).
/// `progress` receives one line per build step. Returns the image directory.
pub async fn build_image(
    name: &ImageName,
    images_dir: &Path,
    force: bool,
    mut progress: impl FnMut(&str),
) -> Result<PathBuf, BuildError> {
    let name = name.as_str();
    if !BUILDABLE.contains(&name) {
        return Err(BuildError::UnknownImage(name.to_string()));
    }
    let link = images_dir.join(name);
    let recipe = recipe_id(name);
    let built_by = std::fs::read_to_string(link.join(RECIPE_FILE)).unwrap_or_default();
    if !force && is_complete(&link) && built_by.trim() == recipe {
        progress(&format!("image {name} already built at {}", link.display()));
        return Ok(link);
    }
    if !nix::unistd::Uid::effective().is_root() {
        return Err(BuildError::NotRoot);
    }
    for (tool, pkg) in [
        ("mmdebstrap", "mmdebstrap"),
        ("mke2fs", "e2fsprogs"),
        ("cpio", "cpio"),
        ("qemu-img", "qemu-utils"),
    ] {
        if crate::host::find_in_path(tool).is_none() {
            return Err(BuildError::MissingTool {
                tool,
                hint: format!(
                    "apt-get install -y {pkg} (or run crates/provider-qemu/install-deps.sh)"
                ),
            });
        }
    }
    if !Path::new("/bin/busybox").is_file() {
        return Err(BuildError::MissingTool {
            tool: "busybox",
            hint: "apt-get install -y busybox-static".into(),
        });
    }
    let suite = "bookworm";
    let mirrors = mirrors_from_sources(&host_apt_sources(), suite);
    let main = mirrors
        .main
        .ok_or_else(|| BuildError::NoMirror(suite.into()))?;

    tokio::fs::create_dir_all(images_dir)
        .await
        .and_then(|()| private(images_dir, 0o700))
        .map_err(io(format!("cannot create {}", images_dir.display())))?;
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let scratch = images_dir.join(format!(".{name}.build-{}", std::process::id()));
    let _ = tokio::fs::remove_dir_all(&scratch).await;
    tokio::fs::create_dir(&scratch)
        .await
        .map_err(io(format!("cannot create {}", scratch.display())))?;

    let result = run_script(&scratch, &main, mirrors.security.as_deref(), &mut progress).await;
    if let Err(e) = result {
        let _ = tokio::fs::remove_dir_all(&scratch).await;
        return Err(e);
    }
    if !is_complete(&scratch) {
        let _ = tokio::fs::remove_dir_all(&scratch).await;
        return Err(BuildError::Script {
            status: "exit 0".into(),
            tail: format!("but {} is missing files", scratch.display()),
        });
    }

    tokio::fs::write(scratch.join(RECIPE_FILE), format!("{recipe}\n"))
        .await
        .map_err(io("cannot record the recipe"))?;
    // Only root reads images: QEMU opens its files before it drops root.
    private(&scratch, 0o700)
        .and_then(|()| {
            IMAGE_FILES
                .iter()
                .chain([&RECIPE_FILE])
                .try_for_each(|f| private(&scratch.join(f), 0o600))
        })
        .map_err(io("cannot make the image private"))?;
    let versioned_name = format!("{name}.{stamp}");
    let versioned = images_dir.join(&versioned_name);
    tokio::fs::rename(&scratch, &versioned)
        .await
        .map_err(io(format!(
            "cannot move the build to {}",
            versioned.display()
        )))?;
    // A plain directory from an older layout (or a manual build) is moved aside first.
    if let Ok(meta) = tokio::fs::symlink_metadata(&link).await
        && meta.is_dir()
    {
        let aside = images_dir.join(format!("{name}.old-{stamp}"));
        tokio::fs::rename(&link, &aside)
            .await
            .map_err(io(format!("cannot move {} aside", link.display())))?;
    }
    let tmp_link = images_dir.join(format!(".{name}.link-{}", std::process::id()));
    let _ = tokio::fs::remove_file(&tmp_link).await;
    tokio::fs::symlink(&versioned_name, &tmp_link)
        .await
        .map_err(io("cannot create the image symlink"))?;
    tokio::fs::rename(&tmp_link, &link)
        .await
        .map_err(io(format!(
            "cannot switch {} to the new build",
            link.display()
        )))?;
    progress(&format!("image {name} ready at {}", link.display()));
    Ok(link)
}

fn private(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// The backing file recorded in a qcow2 header, if any.
pub fn qcow2_backing_file(disk: &Path) -> Option<PathBuf> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(disk).ok()?;
    let mut header = [0u8; 20];
    f.read_exact(&mut header).ok()?;
    if &header[..4] != b"QFI\xfb" {
        return None;
    }
    let offset = u64::from_be_bytes(header[8..16].try_into().ok()?);
    let len = u32::from_be_bytes(header[16..20].try_into().ok()?) as usize;
    if offset == 0 || len == 0 || len > 4096 {
        return None;
    }
    f.seek(SeekFrom::Start(offset)).ok()?;
    let mut name = vec![0u8; len];
    f.read_exact(&mut name).ok()?;
    Some(PathBuf::from(String::from_utf8(name).ok()?))
}

/// Deletes superseded builds (`<name>.<stamp>` and `<name>.old-<stamp>` directories that the
/// `<name>` link no longer points at) unless a disk under `state_dir` still uses them as its
/// backing file. Returns the directories removed.
pub fn prune_images(images_dir: &Path, state_dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut in_use: Vec<PathBuf> = Vec::new();
    if let Ok(vms) = std::fs::read_dir(state_dir) {
        for vm in vms.flatten() {
            if let Some(base) = qcow2_backing_file(&vm.path().join("disk.qcow2"))
                && let Some(dir) = base.parent()
            {
                in_use.push(std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf()));
            }
        }
    }
    let mut current: Vec<PathBuf> = Vec::new();
    let mut candidates: Vec<PathBuf> = Vec::new();
    for entry in std::fs::read_dir(images_dir)?.flatten() {
        let path = entry.path();
        let file_name = entry.file_name().to_string_lossy().into_owned();
        if entry.file_type()?.is_symlink() {
            if let Ok(target) = std::fs::canonicalize(&path) {
                current.push(target);
            }
            continue;
        }
        let superseded = BUILDABLE.iter().any(|name| {
            file_name
                .strip_prefix(name)
                .and_then(|r| r.strip_prefix('.'))
                .is_some_and(|r| {
                    let r = r.strip_prefix("old-").unwrap_or(r);
                    !r.is_empty() && r.chars().all(|c| c.is_ascii_digit())
                })
        });
        if superseded && entry.file_type()?.is_dir() {
            candidates.push(std::fs::canonicalize(&path)?);
        }
    }
    let mut removed = Vec::new();
    for dir in candidates {
        if !current.contains(&dir) && !in_use.contains(&dir) {
            std::fs::remove_dir_all(&dir)?;
            removed.push(dir);
        }
    }
    Ok(removed)
}

async fn run_script(
    scratch: &Path,
    mirror: &str,
    security: Option<&str>,
    progress: &mut impl FnMut(&str),
) -> Result<(), BuildError> {
    let script = scratch.join("build.sh");
    tokio::fs::write(&script, DEBIAN_12_SCRIPT)
        .await
        .map_err(io("cannot write the build script"))?;
    let out = scratch.join("out");
    let mut cmd = tokio::process::Command::new("bash");
    cmd.arg("-c")
        .arg("exec bash \"$0\" \"$1\" 2>&1")
        .arg(&script)
        .arg(&out)
        .env("MIRROR", mirror)
        .env("SECMIRROR", security.unwrap_or(""))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(io("cannot run bash"))?;
    let stdout = child.stdout.take().expect("piped");
    let mut lines = BufReader::new(stdout).lines();
    let mut tail: Vec<String> = Vec::new();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(step) = line.strip_prefix("step: ") {
            progress(step);
        } else {
            tracing::debug!(target: "basphere_qemu::image", "{line}");
        }
        tail.push(line);
        if tail.len() > 15 {
            tail.remove(0);
        }
    }
    let status = child.wait().await.map_err(io("waiting for the build"))?;
    if !status.success() {
        return Err(BuildError::Script {
            status: status.to_string(),
            tail: tail.join(" | "),
        });
    }
    // Move the three products up, drop the script and anything else.
    for f in IMAGE_FILES {
        tokio::fs::rename(out.join(f), scratch.join(f))
            .await
            .map_err(io(format!("build produced no {f}")))?;
    }
    let _ = tokio::fs::remove_dir_all(&out).await;
    let _ = tokio::fs::remove_file(&script).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_from_deb822_and_one_line_sources() {
        let deb822 = "Types: deb\n# a comment\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\n\
                      Types: deb\nURIs: http://mirror.example/debian-security/\nSuites: bookworm-security\nComponents: main\n";
        let files = vec![(PathBuf::from("/x/debian.sources"), deb822.to_string())];
        assert_eq!(
            mirrors_from_sources(&files, "bookworm"),
            Mirrors {
                main: Some("http://mirror.example/debian".into()),
                security: Some("http://mirror.example/debian-security".into()),
            }
        );
        let list = "# deb http://commented/ bookworm main\ndeb-src http://src/ bookworm main\n\
                    deb [arch=amd64 signed-by=/k.gpg] http://one.example/debian bookworm main\n";
        let files = vec![(PathBuf::from("/x/sources.list"), list.to_string())];
        assert_eq!(
            mirrors_from_sources(&files, "bookworm"),
            Mirrors {
                main: Some("http://one.example/debian".into()),
                security: None,
            }
        );
        let disabled = "Enabled: no\nTypes: deb\nURIs: http://off/\nSuites: bookworm\n";
        let files = vec![(PathBuf::from("/x/o.sources"), disabled.to_string())];
        assert_eq!(mirrors_from_sources(&files, "bookworm"), Mirrors::default());
    }

    #[test]
    fn prune_keeps_current_and_used_builds() {
        let images = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let i = images.path();
        for d in [
            "debian-12.100",
            "debian-12.200",
            "debian-12.300",
            "debian-12.old-50",
            "other.1",
        ] {
            std::fs::create_dir(i.join(d)).unwrap();
        }
        std::os::unix::fs::symlink("debian-12.300", i.join("debian-12")).unwrap();
        // A VM disk backed by build 100: a qcow2 header naming its backing file.
        let backing = format!("{}/debian-12.100/base.qcow2", i.display());
        let mut header = vec![0u8; 512];
        header[..4].copy_from_slice(b"QFI\xfb");
        header[8..16].copy_from_slice(&200u64.to_be_bytes());
        header[16..20].copy_from_slice(&(backing.len() as u32).to_be_bytes());
        header[200..200 + backing.len()].copy_from_slice(backing.as_bytes());
        std::fs::create_dir(state.path().join("vm1")).unwrap();
        std::fs::write(state.path().join("vm1/disk.qcow2"), &header).unwrap();
        assert_eq!(
            qcow2_backing_file(&state.path().join("vm1/disk.qcow2")),
            Some(PathBuf::from(&backing))
        );

        let mut removed = prune_images(i, state.path()).unwrap();
        removed.sort();
        let i = std::fs::canonicalize(i).unwrap();
        assert_eq!(
            removed,
            vec![i.join("debian-12.200"), i.join("debian-12.old-50")]
        );
        assert!(i.join("debian-12.100").is_dir() && i.join("debian-12.300").is_dir());
        assert!(i.join("other.1").is_dir());
    }

    #[tokio::test]
    async fn unknown_images_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let e = build_image(&"arch-1".parse().unwrap(), dir.path(), false, |_| {})
            .await
            .unwrap_err();
        assert!(e.to_string().contains("debian-12"), "{e}");
    }
}
