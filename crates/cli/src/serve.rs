//! `basphere init` and `basphere serve`.

use anyhow::{Context, bail};
use basphere_api::{Listeners, ServeOptions};
use basphere_config::{Config, DEFAULT_TOML, TlsFiles};
use basphere_store::{Actor, Store};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Default place of the config file.
pub const DEFAULT_CONFIG: &str = "/etc/basphere/basphere.toml";

/// The config path in effect: `--config`, else the default if it exists.
pub fn config_path(flag: Option<&Path>) -> Option<PathBuf> {
    match flag {
        Some(p) => Some(p.to_path_buf()),
        None => Some(PathBuf::from(DEFAULT_CONFIG)).filter(|p| p.exists()),
    }
}

pub fn load_config(flag: Option<&Path>) -> anyhow::Result<Config> {
    let path = config_path(flag);
    Ok(Config::load(path.as_deref(), std::env::vars())?)
}

/// Writes the config (if missing), makes the data dir, database and first admin token, and
/// with `tls_host` a self-signed TLS certificate for that host name.
pub async fn init(flag: Option<&Path>, force: bool, tls_host: Option<&str>) -> anyhow::Result<()> {
    crate::modes::private_umask();
    let path = flag
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
    let tls_files = tls_host.map(|_| {
        let dir = path.parent().unwrap_or_else(|| Path::new(".")).join("tls");
        TlsFiles::new(dir.join("cert.pem"), dir.join("key.pem"))
    });
    if !path.exists() || force {
        if let Some(dir) = path.parent().filter(|d| !d.exists()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            // Readable configuration (it holds no secrets) for the CLI of every bastion user.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
        }
        let text = match &tls_files {
            Some(t) => with_tls_line(DEFAULT_TOML, t),
            None => DEFAULT_TOML.to_string(),
        };
        std::fs::write(&path, text)
            .and_then(|()| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)))
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    } else {
        println!("keeping existing {}", path.display());
    }
    if let (Some(host), Some(files)) = (tls_host, &tls_files) {
        self_signed(host, files, force)?;
    }
    let cfg = Config::load(Some(&path), std::env::vars())?;
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating data dir {}", cfg.data_dir.display()))?;
    // Only root enters: the socket lives under /run/basphere, tokens of users in their homes.
    std::fs::set_permissions(&cfg.data_dir, std::fs::Permissions::from_mode(0o700))?;
    let store = basphere_app::open_store(&cfg).await?;
    store
        .ensure_admin(&cfg.server.admin, &cfg.quota, &cfg.network)
        .await?;
    give_admin_a_key(&store, &cfg).await?;
    let token_path = cfg.admin_token_path();
    if !token_path.exists() {
        let (_, secret) = store
            .create_token(
                &cfg.server.admin,
                "init",
                None,
                &Actor::new("basphere", "init"),
            )
            .await?;
        write_private(&token_path, format!("{secret}\n").as_bytes())?;
        println!(
            "admin token written to {} (mode 0600)",
            token_path.display()
        );
    } else {
        // An older install (or a hand-made file) may have left it readable by others.
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&token_path)
            .with_context(|| format!("opening {}", token_path.display()))?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("making {} mode 0600", token_path.display()))?;
    }
    store.close().await;
    println!("data dir {} ready", cfg.data_dir.display());
    Ok(())
}

/// `text` (the default config) with `tls = {…}` set in `[server]`.
fn with_tls_line(text: &str, t: &TlsFiles) -> String {
    let line = format!(
        "tls = {{ cert = {:?}, key = {:?} }}",
        t.cert.display().to_string(),
        t.key.display().to_string()
    );
    let mut out = String::new();
    let mut done = false;
    for l in text.lines() {
        if !done && l.trim_start().starts_with("# tls = {") {
            out.push_str(&line);
            done = true;
        } else {
            out.push_str(l);
        }
        out.push('\n');
    }
    if !done {
        out = text.replacen("[server]\n", &format!("[server]\n{line}\n"), 1);
    }
    out
}

/// Writes a self-signed certificate for `host` (a DNS name or IP address) and its key (mode
/// 0600) unless they exist (or `force`), and prints the certificate's SHA-256 fingerprint,
/// which clients compare before trusting it with `--ca`.
fn self_signed(host: &str, files: &TlsFiles, force: bool) -> anyhow::Result<()> {
    if files.cert.exists() && !force {
        let pem = std::fs::read(&files.cert)
            .with_context(|| format!("reading {}", files.cert.display()))?;
        use rustls_pki_types::pem::PemObject;
        let der = rustls_pki_types::CertificateDer::from_pem_slice(&pem)
            .map_err(|e| anyhow::anyhow!("{}: {e}", files.cert.display()))?;
        println!(
            "keeping existing TLS certificate {} (SHA-256 {})",
            files.cert.display(),
            basphere_api::fingerprint(&der)
        );
        return Ok(());
    }
    let mut names = vec![host.to_string()];
    if host != "localhost" && host.parse::<std::net::IpAddr>().is_err() {
        names.push("localhost".into());
    }
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .context("generating the TLS key")?;
    let mut params = rcgen::CertificateParams::new(names)
        .with_context(|| format!("{host:?} is not a valid host name for a certificate"))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, host);
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(825);
    let cert = params
        .self_signed(&key)
        .context("signing the TLS certificate")?;
    if let Some(dir) = files.cert.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    write_private(&files.key, key.serialize_pem().as_bytes())?;
    std::fs::write(&files.cert, cert.pem())
        .with_context(|| format!("writing {}", files.cert.display()))?;
    println!(
        "wrote a self-signed TLS certificate for {host}: {} (key {})",
        files.cert.display(),
        files.key.display()
    );
    println!(
        "certificate SHA-256 fingerprint: {}",
        basphere_api::fingerprint(cert.der())
    );
    println!(
        "clients: copy {} and use --url https://{host}:PORT --ca cert.pem (or BASPHERE_CA)",
        files.cert.display()
    );
    Ok(())
}

/// Writes `bytes` to `p` with mode 0600, also when `p` existed with a wider mode; never
/// through a symlink.
pub(crate) fn write_private(p: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(p)
        .with_context(|| format!("writing {}", p.display()))?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("making {} mode 0600", p.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", p.display()))?;
    Ok(())
}

/// The admin's VMs need an SSH key: use the invoking user's `~/.ssh/id_ed25519.pub`, making one
/// with ssh-keygen when there is none, so `basphere ssh` works for the admin out of the box.
async fn give_admin_a_key(store: &Store, cfg: &Config) -> anyhow::Result<()> {
    let admin = store
        .user(cfg.server.admin.as_str())
        .await?
        .context("the admin account is missing")?;
    if !admin.public_key.is_empty() {
        return Ok(());
    }
    let Some(home) = std::env::var_os("HOME").map(PathBuf::from) else {
        return Ok(());
    };
    let private = home.join(".ssh/id_ed25519");
    let public = home.join(".ssh/id_ed25519.pub");
    if !public.exists() {
        std::fs::create_dir_all(home.join(".ssh"))?;
        let st = std::process::Command::new("ssh-keygen")
            .args([
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                "basphere-admin",
                "-f",
            ])
            .arg(&private)
            .status()
            .context("running ssh-keygen (apt-get install openssh-client)")?;
        anyhow::ensure!(st.success(), "ssh-keygen failed");
        println!("made an SSH key for the admin: {}", public.display());
    }
    let key: basphere_core::SshPublicKey = std::fs::read_to_string(&public)?
        .trim()
        .parse()
        .map_err(|e| anyhow::anyhow!("{}: {e}", public.display()))?;
    let actor = Actor::new("basphere", "init");
    store
        .request_key_change(&cfg.server.admin, &key, &actor)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    store
        .decide_key_change(&cfg.server.admin, true, None, &actor)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("admin's VMs get the SSH key {}", public.display());
    Ok(())
}

/// Every connection holds a descriptor: raise the soft limit to the hard one so the connection
/// caps, not EMFILE, decide who is refused.
fn raise_fd_limit(cfg: &Config) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        }
    }
    let need = cfg.server.max_connections as u64 + 256;
    if lim.rlim_cur < need {
        tracing::warn!(
            "open-file limit {} is below server.max_connections + 256 = {need}; \
             raise LimitNOFILE or lower max_connections",
            lim.rlim_cur
        );
    }
}

/// Runs the server until SIGTERM/SIGINT.
pub async fn serve(flag: Option<&Path>) -> anyhow::Result<()> {
    crate::modes::private_umask();
    let cfg = Arc::new(load_config(flag)?);
    // Before anything is bound: a non-loopback listener without TLS needs allow_plaintext.
    if let Some(warning) = cfg.server.check_plaintext()? {
        tracing::warn!("{warning}");
        eprintln!("warning: {warning}");
    }
    let serve_opts = ServeOptions::from_config(&cfg.server)?;
    raise_fd_limit(&cfg);
    crate::modes::socket_dir(&cfg.server.socket)?;
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating data dir {}", cfg.data_dir.display()))?;
    crate::modes::repair_install(&cfg)?;
    // One server per data dir: the node id (and its leases) must not be shared.
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(cfg.data_dir.join("serve.lock"))?;
    let _lock =
        match nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err(_) => bail!(
                "another basphere server already runs on data dir {}",
                cfg.data_dir.display()
            ),
        };
    let app = basphere_app::App::build(cfg.clone(), Default::default()).await?;
    let listeners = Listeners::bind(&cfg)
        .await
        .context("binding the server's sockets")?;
    tracing::info!(
        socket = %cfg.server.socket.display(),
        listen = %cfg.server.listen,
        provider = app.provider().kind(),
        "basphere serving"
    );
    eprintln!(
        "basphere {} serving: socket {} tcp {} provider {}",
        env!("CARGO_PKG_VERSION"),
        cfg.server.socket.display(),
        if cfg.server.listen.is_empty() {
            "off".to_string()
        } else if serve_opts.tls.is_some() {
            format!("https://{}", cfg.server.listen)
        } else {
            format!("http://{}", cfg.server.listen)
        },
        app.provider().kind()
    );
    let tls = serve_opts.tls.clone();
    if let Some(tls) = &tls {
        eprintln!(
            "TLS certificate {} (SHA-256 {}); SIGHUP re-reads it",
            tls.files().cert.display(),
            tls.fingerprint()
        );
        if let Some(ca) = &tls.files().client_ca {
            eprintln!(
                "client certificates required on TCP (CA {}; {} mapped identities; tokens on \
                 TCP {})",
                ca.display(),
                tls.files().client_users.len(),
                if tls.files().tokens { "on" } else { "off" }
            );
        }
    }
    // SIGHUP re-reads the certificate and client CA; without TLS it is ignored (never the
    // default: exit).
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            let Some(tls) = &tls else {
                tracing::info!("SIGHUP: nothing to reload (TLS is off)");
                continue;
            };
            match tls.reload() {
                Ok(()) => {
                    tracing::info!(fingerprint = %tls.fingerprint(), "TLS certificate reloaded");
                    eprintln!("TLS certificate reloaded (SHA-256 {})", tls.fingerprint());
                }
                Err(e) => {
                    tracing::error!("TLS reload failed, keeping the old certificate: {e}");
                    eprintln!("error: TLS reload failed, keeping the old certificate: {e}");
                }
            }
        }
    });
    // Handled from before the first request is answered: a SIGTERM that came after it but
    // before these were registered ended the process at once, leaving its socket file behind.
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let running = app.serve(listeners, serve_opts);
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    eprintln!("basphere: shutting down");
    running.shutdown().await;
    Ok(())
}
