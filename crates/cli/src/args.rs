use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// Self-service VMs within your quota, at your own IPs, reachable by SSH.
///
/// Local use on the Basphere host needs no token: the server knows your Unix account.
/// Remote use: `--url HOST:PORT` with a token from `basphere token create` (or BASPHERE_TOKEN).
#[derive(Parser, Debug)]
#[command(
    name = "basphere",
    version,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// The heading the global (connection and output) options are listed under, apart from each
/// command's own.
pub const GLOBAL: &str = "Global options";

#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Config file (server commands; clients read the socket path from it).
    #[arg(long, global = true, help_heading = GLOBAL, env = "BASPHERE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Server's Unix socket.
    #[arg(long, global = true, help_heading = GLOBAL, env = "BASPHERE_SOCKET")]
    pub socket: Option<PathBuf>,
    /// Server's address for remote use with a token: https://HOST:PORT (TLS) or HOST:PORT.
    #[arg(long, global = true, help_heading = GLOBAL, env = "BASPHERE_URL")]
    pub url: Option<String>,
    /// PEM file of the CA (or self-signed certificate) an https:// --url must chain to
    /// (default: the system's roots).
    #[arg(long, global = true, help_heading = GLOBAL, env = "BASPHERE_CA")]
    pub ca: Option<PathBuf>,
    /// PEM file of the client certificate (chain) to present to an https:// --url that
    /// requires one (mTLS); with it, no token is read from ~/.config/basphere/token.
    #[arg(long, global = true, help_heading = GLOBAL, env = "BASPHERE_CERT", requires = "key")]
    pub cert: Option<PathBuf>,
    /// PEM file of the private key of --cert.
    #[arg(long, global = true, help_heading = GLOBAL, env = "BASPHERE_KEY", requires = "cert")]
    pub key: Option<PathBuf>,
    /// API token for --url (default: ~/.config/basphere/token).
    #[arg(long, global = true, help_heading = GLOBAL, env = "BASPHERE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Output format.
    #[arg(long, global = true, help_heading = GLOBAL, value_enum, default_value_t = Output::Table, env = "BASPHERE_OUTPUT")]
    pub output: Output,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Write a default config (if missing), create the data dir, database and first admin token.
    Init {
        /// Replace an existing config file (and with --tls-cert, an existing certificate).
        #[arg(long)]
        force: bool,
        /// Write a self-signed TLS certificate for HOSTNAME next to the config (tls/cert.pem,
        /// tls/key.pem), turn on TLS in a newly written config, and print its fingerprint.
        #[arg(long, value_name = "HOSTNAME")]
        tls_cert: Option<String>,
    },
    /// Run the server: API on the Unix socket and TCP, and the workflow engine.
    Serve,
    /// Create the prototype's command names (create-vm, list-vms, …) as links to this binary.
    InstallAliases {
        /// Directory for the links, e.g. /usr/local/bin.
        dir: PathBuf,
    },
    /// Ask for an account (an admin approves it).
    Register {
        /// Defaults to your Unix account name.
        #[arg(long, short = 'u')]
        username: Option<String>,
        #[arg(long, short = 'e')]
        email: String,
        /// Your team (optional).
        #[arg(long, short = 't')]
        team: Option<String>,
        /// Your SSH public key file.
        #[arg(long, short = 'k', default_value = "~/.ssh/id_ed25519.pub")]
        key_file: String,
    },
    /// Show your account, its status and IP block.
    Me,
    /// Exchange an enrollment code (from your approval) for an API token.
    Enroll {
        #[arg(long, short = 'u')]
        username: String,
        #[arg(long, short = 'c')]
        code: String,
        /// Save the token to ~/.config/basphere/token.
        #[arg(long)]
        save: bool,
    },
    /// Manage your API tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Request a new SSH key (an admin approves it).
    #[command(subcommand)]
    Key(KeyCmd),
    /// Create, list and delete VMs.
    #[command(subcommand)]
    Vm(VmCmd),
    /// Show your quota and what you use (alias: show-quota).
    Quota,
    /// Show your IP block, quota, VMs and clusters (alias: list-resources).
    Resources,
    /// Follow, inspect, cancel and retry operations (workflows).
    #[command(subcommand)]
    Ops(OpsCmd),
    /// Show what applying a manifest (TOML or YAML) would create, keep and delete.
    Plan {
        /// Manifest file (.toml, .yaml/.yml; - for stdin as TOML).
        #[arg(short = 'f', long)]
        file: String,
        /// Nodes run at once (default: the manifest's, else 10).
        #[arg(long)]
        parallelism: Option<u32>,
    },
    /// Apply a manifest as one batch: independent nodes in parallel, dependents in order.
    Apply {
        /// Manifest file (.toml, .yaml/.yml; - for stdin as TOML).
        #[arg(short = 'f', long)]
        file: String,
        /// Nodes run at once (default: the manifest's, else 10).
        #[arg(long)]
        parallelism: Option<u32>,
        /// Do not ask before deleting VMs that left the manifest.
        #[arg(short = 'y', long)]
        yes: bool,
        /// Return as soon as the batch is accepted.
        #[arg(long)]
        no_wait: bool,
    },
    /// Admin commands (alias: basphere-admin).
    #[command(subcommand)]
    Admin(AdminCmd),
    /// Build OS base images for the qemu provider.
    #[command(subcommand)]
    Image(ImageCmd),
    /// The database: apply migrations, or copy this install into an empty PostgreSQL.
    #[command(subcommand)]
    Db(DbCmd),
    /// Write a consistent snapshot of the database into FILE while the server runs (SQLite: a
    /// database file; PostgreSQL: a pg_dump custom-format archive). Never overwrites FILE.
    Backup {
        /// The new backup file (mode 0600).
        file: PathBuf,
    },
    /// Restore a backup (from `basphere backup`) into this config's database, which must be
    /// empty: a new data dir (SQLite) or a new database (PostgreSQL). Then start the server:
    /// it resumes the workflows that were unfinished at the backup.
    Restore {
        /// The backup file.
        file: PathBuf,
    },
    /// SSH into one of your VMs (enters the lab network namespace when needed).
    Ssh {
        name: String,
        /// Command to run instead of a shell.
        #[arg(trailing_var_arg = true)]
        command: Vec<String>,
    },
    /// Measure the platform's own overhead and print the figures: runs `basphere-bench ARGS`
    /// (`cargo build --release -p basphere-bench`; `basphere bench --help` for its options).
    #[command(disable_help_flag = true)]
    Bench(crate::bench::BenchArgs),
}

#[derive(Subcommand, Debug)]
pub enum DbCmd {
    /// Apply pending migrations to the configured database ([database] url, else the embedded
    /// SQLite file) and print its schema version.
    Migrate,
    /// Copy every row of the configured database (users, tokens, VMs, workflows, audit) into an
    /// empty PostgreSQL database, then point `[database] url` at it. Stop the server first.
    Copy {
        /// The target: postgres://user@host:port/db (must be empty; migrated here).
        #[arg(long, value_name = "URL")]
        to: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokenCmd {
    /// Mint a token (shown once).
    Create {
        #[arg(long, default_value = "cli")]
        name: String,
        #[arg(long)]
        ttl_days: Option<u32>,
    },
    /// List your tokens (never their secrets).
    List,
    /// Revoke one of your tokens.
    Revoke { id: String },
}

#[derive(Subcommand, Debug)]
pub enum KeyCmd {
    /// Request that your SSH key be replaced.
    Change {
        #[arg(long, short = 'k')]
        key_file: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum VmCmd {
    /// Create VMs (alias: create-vm). Prompts for what is missing on a terminal.
    Create {
        /// VM name (with -c N: NAME-1 … NAME-N).
        #[arg(short = 'n', long)]
        name: Option<String>,
        /// OS image (see `basphere vm catalog`).
        #[arg(short = 'o', long)]
        os: Option<String>,
        /// Size: tiny, small, medium, large, huge.
        #[arg(short = 's', long)]
        spec: Option<String>,
        /// How many (1-10; 0 or absent: 1). More than one are named NAME-1 … NAME-N, as the
        /// prototype's create-vm names them.
        #[arg(short = 'c', long)]
        count: Option<u32>,
        /// An extra disk of SIZE GiB (repeatable): `20G` is formatted ext4 and mounted at
        /// /data (then /data2, …), `20G:raw` left unformatted.
        #[arg(long = "disk", value_name = "SIZE[G][:raw]")]
        disks: Vec<String>,
        /// Also join the extra network NAME (repeatable; see `basphere vm catalog`).
        #[arg(long = "net", value_name = "NAME")]
        nets: Vec<String>,
        /// Return as soon as the request is accepted.
        #[arg(long)]
        no_wait: bool,
    },
    /// List your VMs (alias: list-vms).
    List {
        /// All users' VMs (admin).
        #[arg(short = 'a', long)]
        all: bool,
        /// JSON output (same as --output json).
        #[arg(short = 'j', long)]
        json: bool,
    },
    /// Show one VM.
    Show {
        name: String,
        /// Owner (admin).
        #[arg(long)]
        owner: Option<String>,
    },
    /// Delete a VM (alias: delete-vm).
    Delete {
        name: String,
        /// Do not ask for confirmation.
        #[arg(short = 'f', long)]
        force: bool,
        /// Owner (admin).
        #[arg(long)]
        owner: Option<String>,
        #[arg(long)]
        no_wait: bool,
    },
    /// Specs and OS images you can choose from.
    Catalog,
}

#[derive(Subcommand, Debug)]
pub enum OpsCmd {
    /// List your operations, newest first.
    List {
        #[arg(short = 'a', long)]
        all: bool,
    },
    /// Show one operation with its steps.
    Show { id: String },
    /// Follow an operation's steps (or a batch's nodes, with --batch) until it ends.
    Watch {
        #[arg(required_unless_present = "batch")]
        id: Option<String>,
        /// A batch id (from `basphere apply`): multi-line progress of all its nodes.
        #[arg(long, conflicts_with = "id")]
        batch: Option<String>,
    },
    /// Cancel an operation: its running step finishes (or hits its deadline), then its done
    /// steps are undone; batch nodes that require it are skipped.
    Cancel { id: String },
    /// Queue a failed or cancelled operation again from its first step not done (with its
    /// skipped batch dependents).
    Retry {
        id: String,
        /// Follow it until it ends.
        #[arg(short = 'w', long)]
        wait: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum AdminCmd {
    /// Users: registrations, approval, quota, disable, delete.
    #[command(subcommand)]
    User(UserCmd),
    /// SSH key changes waiting for a decision.
    #[command(subcommand)]
    Key(AdminKeyCmd),
    /// The audit trail, newest first.
    Audit {
        #[arg(long)]
        actor: Option<String>,
        /// Action prefix, e.g. vm. or user.approve
        #[arg(long)]
        action: Option<String>,
        #[arg(long)]
        target: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

#[derive(Subcommand, Debug)]
pub enum UserCmd {
    /// Add and approve a user in one go.
    Add {
        username: String,
        #[arg(long, short = 'e')]
        email: String,
        /// The user's team (optional).
        #[arg(long, short = 't')]
        team: Option<String>,
        #[arg(long, short = 'k')]
        key_file: String,
    },
    /// List users (optionally of one status: pending, active, disabled, rejected).
    List {
        #[arg(long)]
        status: Option<String>,
    },
    /// Show one user with usage, VMs and IP block.
    Show { username: String },
    /// Delete a user: their VMs first, then the account.
    Delete {
        username: String,
        #[arg(short = 'f', long)]
        force: bool,
    },
    /// Delete a user and every trace of their registration.
    Purge {
        username: String,
        #[arg(short = 'f', long)]
        force: bool,
    },
    /// Registrations waiting for a decision.
    Pending,
    /// Approve a registration (the account and its IP block are made).
    Approve { username: String },
    /// Reject a registration, with a reason the user sees.
    Reject {
        username: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Disable a user (their login is locked; VMs stay).
    Disable { username: String },
    /// Enable a disabled user again.
    Enable { username: String },
    /// Change a user's quota.
    Quota {
        username: String,
        #[arg(long)]
        max_vms: Option<u32>,
        #[arg(long)]
        max_ips: Option<u32>,
        #[arg(long)]
        max_clusters: Option<u32>,
        #[arg(long)]
        max_vcpus: Option<u32>,
        #[arg(long)]
        max_memory_mib: Option<u64>,
        /// GiB of disk (boot and extra disks) over all the user's VMs.
        #[arg(long)]
        max_disk_gib: Option<u64>,
    },
}

#[derive(Subcommand, Debug)]
pub enum AdminKeyCmd {
    /// Key changes waiting for a decision.
    Pending,
    /// Approve a user's key change (the new key is installed).
    Approve { username: String },
    /// Reject a user's key change, with a reason.
    Reject {
        username: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum ImageCmd {
    /// Build a base image (debian-12) into <data_dir>/images.
    Build {
        name: String,
        #[arg(long)]
        force: bool,
    },
}
