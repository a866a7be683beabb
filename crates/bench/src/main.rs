//! `basphere-bench`: Basphere's own figures, measured on this machine (see `--help`).

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    // As in `basphere` itself (the figures include the batch child's peak RSS).
    basphere_app::alloc::tune();
    let args = basphere_bench::Args::parse();
    if std::env::var_os("BASPHERE_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_env("BASPHERE_LOG"))
            .with_writer(std::io::stderr)
            .init();
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(basphere_bench::run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
