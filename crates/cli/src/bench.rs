//! `basphere bench`: a thin entry that runs `basphere-bench` (the `basphere-bench` crate), so the
//! product binary carries no bench code.

use std::os::unix::process::CommandExt;

/// Everything after `bench`, handed to `basphere-bench` as is (`--help` included).
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "ARGS"
    )]
    pub args: Vec<String>,
}

/// Replaces this process with the `basphere-bench` beside this executable; returns only if
/// that fails.
pub async fn run(a: BenchArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?.with_file_name("basphere-bench");
    anyhow::ensure!(
        exe.is_file(),
        "the benchmarks are a separate binary, and there is none at {}: build it with \
         `cargo build --release -p basphere-bench` (beside `basphere`)",
        exe.display()
    );
    let e = std::process::Command::new(&exe).args(&a.args).exec();
    Err(anyhow::anyhow!("running {}: {e}", exe.display()))
}
