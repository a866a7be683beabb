//! The console ring writer on its own, for this crate's tests (`basphere` embeds the same).

fn main() -> std::process::ExitCode {
    basphere_qemu::console_helper_main().unwrap_or_else(|| {
        eprintln!(
            "usage: basphere-console-ring {} LOG_PATH CAP_BYTES (console on stdin)",
            basphere_qemu::CONSOLE_HELPER_ARG
        );
        std::process::ExitCode::from(2)
    })
}
