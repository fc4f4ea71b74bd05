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
    let line = outbox_core::redact(&one_line(e.chain().map(ToString::to_string)));
    eprintln!("error: {line}");
    ExitCode::FAILURE
}

/// The error and its causes, each said once: many errors quote their source in their own
/// message and hand it out as their source too, which would print it again at every level.
fn one_line(causes: impl Iterator<Item = String>) -> String {
    let mut line = String::new();
    for cause in causes {
        let cause = cause.replace('\n', " ");
        if line.contains(cause.as_str()) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&cause);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[test]
    fn a_cause_already_quoted_is_left_out() {
        let chain = ["cannot open x", "database error: no file", "no file"];
        assert_eq!(
            one_line(chain.iter().map(|s| s.to_string())),
            "cannot open x: database error: no file"
        );
        let distinct = ["connect failed", "timed out"];
        assert_eq!(
            one_line(distinct.iter().map(|s| s.to_string())),
            "connect failed: timed out"
        );
    }
}
