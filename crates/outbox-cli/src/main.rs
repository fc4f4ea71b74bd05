//! The `outbox` command: a thin shell over the library crates. Run the relay, migrate, enqueue,
//! and inspect or repair an outbox on PostgreSQL or SQLite.

#[cfg(feature = "bench")]
mod bench;
mod cli;
mod commands;
mod config;
#[cfg(feature = "demo")]
mod demo;
mod store;
mod telemetry;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::Cli;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return cli::usage_error(e),
    };
    // Built and shut down outside the runtime: the exporter's HTTP client blocks.
    let telemetry = match telemetry::Telemetry::from_env() {
        Ok(t) => t,
        Err(e) => return fail(&e),
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => return fail(&anyhow::anyhow!("cannot start the async runtime: {e}")),
    };
    let code = match runtime.block_on(commands::run(cli, telemetry.as_ref())) {
        Ok(code) => code,
        Err(e) => fail(&e),
    };
    drop(runtime);
    if let Some(t) = telemetry {
        t.shutdown();
    }
    code
}

/// One readable line on stderr, and a non-zero exit. Errors quote the URLs they failed on
/// (ours and the libraries'), so the line loses its credentials.
fn fail(e: &anyhow::Error) -> ExitCode {
    let line = outbox_core::redact(&format!("{e:#}").replace('\n', " "));
    eprintln!("error: {line}");
    ExitCode::FAILURE
}
