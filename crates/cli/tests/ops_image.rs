//! The container image (`scripts/build-image`, `contrib/container/`). Built here from this
//! crate's debug binary (stripped of debug info in the image) with mmdebstrap and buildah, no
//! container runtime: its config runs a non-root user with a health check and volumes, and
//! agrees with the Containerfile; its rootfs holds no package manager and no shell; its
//! entrypoint, run as its user with `unshare`/`chroot` and the volumes bind-mounted from temp
//! dirs (TCP on 127.0.0.1 only), starts, answers `/ready`, passes its own health check, mints
//! an operator's token for root on its socket, and writes nothing outside its volumes. The compose file passes `docker-compose config` and
//! keeps its secrets in files.
mod image;
use basphere_testkit::process::{children_of, poll_until_blocking, stop_child};
use basphere_testkit::server::free_port;
use image::*;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const VOLUMES: [&str; 3] = ["/etc/basphere", "/run/basphere", "/var/lib/basphere"];

#[test]
fn the_image_runs_as_its_user_and_writes_only_to_its_volumes() {
    if !must_run() {
        return;
    }
    let img = Image::build();
    check_config(&img);
    check_rootfs(&img);
    check_containerfile(&img);

    let (uid, gid) = img.user();
    let mut mounts = BTreeMap::new();
    for v in img.volumes() {
        let host = img
            .dir
            .path()
            .join("volumes")
            .join(v.trim_start_matches('/'));
        std::fs::create_dir_all(&host).unwrap();
        std::os::unix::fs::chown(&host, Some(uid), Some(gid)).unwrap();
        mounts.insert(v, host);
    }
    // The operator's config in the config volume: the do-nothing provider.
    let toml = basphere_config::DEFAULT_TOML.replace("kind = \"qemu\"", "kind = \"null\"");
    assert!(toml.contains("kind = \"null\""));
    std::fs::write(mounts["/etc/basphere"].join("basphere.toml"), toml).unwrap();

    let before = snapshot(&img.rootfs, &img.volumes());
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut argv = img.list("/Entrypoint");
    argv.extend(img.list("/Cmd"));
    let logs = img.dir.path().join("stdout");
    let errs = img.dir.path().join("stderr");
    let child = img
        .command(&mounts, &[("BASPHERE_SERVER__LISTEN", &listen)], &argv)
        .stdout(std::fs::File::create(&logs).unwrap())
        .stderr(std::fs::File::create(&errs).unwrap())
        .spawn()
        .unwrap();
    let mut running = Running(child);
    let said = || std::fs::read_to_string(&errs).unwrap_or_default();

    let ready = poll_until_blocking(Duration::from_secs(60), Duration::from_millis(200), || {
        http_status(port, "/ready", None)
    });
    assert_eq!(
        ready.ok(),
        Some(200),
        "/ready on {listen}; server said: {}",
        said()
    );
    let server = server_pid(&running.0);
    let status = std::fs::read_to_string(format!("/proc/{server}/status")).unwrap();
    let uids = field(&status, "Uid:");
    assert_eq!(uids, vec![uid.to_string(); 4], "{status}");
    assert_eq!(field(&status, "Gid:"), vec![gid.to_string(); 4], "{status}");
    assert_eq!(field(&status, "Name:"), ["basphere"], "{status}");

    let health = img.list("/Healthcheck/Test");
    let probe = img.command(&mounts, &[], &health[1..]).output().unwrap();
    let shown = String::from_utf8_lossy(&probe.stdout);
    assert!(probe.status.success() && shown.contains("ready"), "{shown}");

    // The operator's first token: root on the socket is the admin (`docker exec --user 0`).
    let mint: Vec<String> = ["token", "create", "--name", "ops"]
        .map(String::from)
        .to_vec();
    let argv_mint = [&img.list("/Entrypoint")[..], &mint].concat();
    let minted = img
        .command_as((0, 0), &mounts, &[], &argv_mint)
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&minted.stdout);
    assert!(
        minted.status.success(),
        "{shown}{}",
        String::from_utf8_lossy(&minted.stderr)
    );
    let token = shown.lines().next().unwrap().trim();
    assert_eq!(http_status(port, "/api/v1/tokens", Some(token)), Ok(200));
    assert_eq!(http_status(port, "/api/v1/tokens", None), Ok(401));

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let ended = poll_until_blocking(Duration::from_secs(30), Duration::from_millis(50), || {
        running.0.try_wait().ok().flatten().ok_or(())
    });
    let ended = ended.unwrap_or_else(|()| panic!("no exit 30 s after SIGTERM: {}", said()));
    assert!(ended.success(), "{ended}: {}", said());

    // Down: the health check fails and says so.
    let probe = img.command(&mounts, &[], &health[1..]).output().unwrap();
    assert!(!probe.status.success());
    assert!(String::from_utf8_lossy(&probe.stderr).contains("not ready"));

    let after = snapshot(&img.rootfs, &img.volumes());
    assert_eq!(changed(&before, &after), Vec::<PathBuf>::new());
    let data = &mounts["/var/lib/basphere"];
    let db = std::fs::metadata(data.join("basphere.db")).expect("the database in the volume");
    assert_eq!((db.uid(), db.gid()), (uid, gid));
    let first = std::fs::read_to_string(&logs).unwrap();
    let line: serde_json::Value = serde_json::from_str(first.lines().next().unwrap_or("")).unwrap();
    assert!(line["message"].is_string(), "JSON logs on stdout: {first}");
}

/// Kills `unshare` (and with it, `--kill-child`, the server) if the test ends early.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        stop_child(&mut self.0, Duration::from_secs(5));
    }
}

fn check_config(img: &Image) {
    let (uid, gid) = img.user();
    assert!(uid != 0 && gid != 0, "User {:?}", img.config["User"]);
    let passwd = std::fs::read_to_string(img.rootfs.join("etc/passwd")).unwrap();
    assert!(
        passwd.contains(&format!("basphere:x:{uid}:{gid}:")),
        "{passwd}"
    );
    let mut volumes = img.volumes();
    volumes.sort();
    assert_eq!(volumes, VOLUMES);
    let health = img.list("/Healthcheck/Test");
    assert_eq!(health, ["CMD", "/usr/bin/basphere", "ready"]);
    for key in ["Interval", "Timeout", "StartPeriod"] {
        assert!(img.config["Healthcheck"][key].as_u64() > Some(0), "{key}");
    }
    assert_eq!(img.list("/Entrypoint"), ["/usr/bin/basphere"]);
    assert_eq!(img.list("/Cmd"), ["serve"]);
    // The volume dirs in the image belong to its user (a fresh volume is copied from them).
    for v in VOLUMES {
        let m = std::fs::metadata(img.rootfs.join(v.trim_start_matches('/'))).unwrap();
        assert_eq!((m.uid(), m.gid()), (uid, gid), "{v}");
    }
}

fn check_rootfs(img: &Image) {
    for dir in ["bin", "sbin", "usr/bin", "usr/sbin"] {
        for tool in ["apt", "apt-get", "dpkg", "dpkg-deb", "sh", "bash", "dash"] {
            let p = img.rootfs.join(dir).join(tool);
            assert!(!p.exists(), "{} is in the image", p.display());
        }
    }
    for state in ["var/lib/dpkg", "var/lib/apt", "etc/apt"] {
        assert!(!img.rootfs.join(state).exists(), "{state} is in the image");
    }
    let programs: Vec<_> = std::fs::read_dir(img.rootfs.join("usr/bin"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(programs, ["basphere"], "the only program in the image");
    assert!(
        img.rootfs
            .join("etc/ssl/certs/ca-certificates.crt")
            .exists()
    );
}

/// The Containerfile's final stage describes the image the script built.
fn check_containerfile(img: &Image) {
    let text = std::fs::read_to_string(repo().join("contrib/container/Containerfile")).unwrap();
    let last = text.rfind("\nFROM ").expect("a multi-stage Containerfile");
    assert!(text[..last].contains(" AS "), "named build stages");
    let stage = &text[last..];
    assert!(
        stage.starts_with("\nFROM scratch"),
        "the runtime stage starts from scratch"
    );
    let directive = |name: &str| -> Vec<String> {
        stage
            .lines()
            .filter_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .map(str::to_string)
            .collect()
    };
    let json_list = |s: &str| -> Vec<String> {
        serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("{s}: {e}"))
    };
    assert_eq!(directive("USER"), [img.config["User"].as_str().unwrap()]);
    let volume = directive("VOLUME");
    assert_eq!(volume.len(), 1);
    assert_eq!(json_list(&volume[0]), img.volumes());
    assert_eq!(
        json_list(&directive("ENTRYPOINT")[0]),
        img.list("/Entrypoint")
    );
    assert_eq!(json_list(&directive("CMD")[0]), img.list("/Cmd"));
    let health = directive("HEALTHCHECK");
    let (_, cmd) = health[0]
        .split_once(" CMD ")
        .expect("HEALTHCHECK … CMD [...]");
    assert_eq!(json_list(cmd), img.list("/Healthcheck/Test")[1..]);
    let mut env: Vec<String> = directive("ENV");
    env.sort();
    let mut image_env = img.list("/Env");
    image_env.sort();
    assert_eq!(env, image_env);
}

#[test]
fn the_compose_file_is_valid_and_keeps_secrets_in_files() {
    let dir = repo().join("contrib/container");
    let text = std::fs::read_to_string(dir.join("compose.yaml")).unwrap();
    let doc: serde_json::Value = serde_norway::from_str(&text).unwrap();
    let basphere = &doc["services"]["basphere"];
    let postgres = &doc["services"]["postgres"];
    assert!(basphere.is_object() && postgres.is_object(), "{doc:#}");
    for (name, svc) in [("basphere", basphere), ("postgres", postgres)] {
        let image = svc["image"].as_str().unwrap_or_default();
        assert!(
            image
                .rsplit_once(':')
                .is_some_and(|(_, tag)| tag != "latest"),
            "{name}: pinned image, not {image:?}"
        );
        assert!(
            svc["healthcheck"]["test"].is_array(),
            "{name}: a health check"
        );
        // Secrets only as files: no password or URL value in the environment.
        for (key, value) in svc["environment"].as_object().into_iter().flatten() {
            let value = value.as_str().unwrap_or_default();
            assert!(
                !(key.contains("PASSWORD") || key.ends_with("__URL")) || key.ends_with("_FILE"),
                "{name}: {key} must name a file ({key}_FILE)"
            );
            assert!(
                !value.contains("://") || !value.contains('@'),
                "{name}: {key}"
            );
        }
        assert!(svc["secrets"].is_array(), "{name}: mounted secrets");
    }
    assert_eq!(
        basphere["environment"]["BASPHERE_DATABASE__URL_FILE"],
        "/run/secrets/database_url"
    );
    assert_eq!(
        basphere["depends_on"]["postgres"]["condition"],
        "service_healthy"
    );
    assert_eq!(basphere["healthcheck"]["test"][1], "/usr/bin/basphere");
    let volumes: Vec<&str> = basphere["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str()?.split(':').nth(1))
        .collect();
    for v in ["/etc/basphere", "/var/lib/basphere"] {
        assert!(volumes.contains(&v), "{v} mounted: {volumes:?}");
    }
    for (name, secret) in doc["secrets"].as_object().unwrap() {
        assert!(secret["file"].is_string(), "secret {name} from a file");
    }

    let compose = Path::new("/usr/bin/docker-compose");
    if !compose.exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "docker-compose missing in CI: scripts/install-deps installs it"
        );
        eprintln!("SKIPPED: docker-compose config (apt-get install docker-compose)");
        return;
    }
    let out = Command::new(compose)
        .args(["--file", "compose.yaml", "config", "--quiet"])
        .current_dir(&dir)
        .env_remove("DOCKER_HOST")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "docker-compose config: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The PID of the server `unshare` runs (its only child, once `chroot` has exec'd it).
fn server_pid(unshare: &Child) -> i32 {
    let found = poll_until_blocking(Duration::from_secs(10), Duration::from_millis(50), || {
        match children_of(unshare.id()).as_slice() {
            [pid] => Ok(*pid),
            other => Err(other.to_vec()),
        }
    });
    found.unwrap_or_else(|c| panic!("unshare's children: {c:?}"))
}

/// The whitespace-separated values of the `/proc/PID/status` line starting with `name`.
fn field(status: &str, name: &str) -> Vec<String> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// The status code of `GET path` on 127.0.0.1:`port`, with `token` as the bearer if given.
fn http_status(port: u16, path: &str, token: Option<&str>) -> Result<u16, String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{}Connection: close\r\n\r\n",
        auth.unwrap_or_default()
    )
    .map_err(|e| e.to_string())?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).map_err(|e| e.to_string())?;
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status in {answer:?}"))
}
