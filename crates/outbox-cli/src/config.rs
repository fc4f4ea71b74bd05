//! Settings: flags and `OUTBOX_*` variables first, then the TOML file, then defaults.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use outbox_core::{RelayConfig, Retention, RetryPolicy};
use serde::Deserialize;

use crate::cli::{ClaimArg, Global, RelayArgs, parse_duration};

/// The TOML file. Keys are the long options with underscores; unknown keys are errors, so a
/// typo never silently falls back to a default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub database_url: Option<String>,
    pub schema: Option<String>,
    pub table_prefix: Option<String>,
    pub log: Option<String>,
    pub log_format: Option<crate::cli::LogFormat>,
    pub sink: Option<String>,
    pub batch_size: Option<usize>,
    pub max_batch_bytes: Option<usize>,
    pub in_flight_batches: Option<usize>,
    pub lease: Option<String>,
    pub poll_interval: Option<String>,
    pub max_attempts: Option<i32>,
    pub retry_base: Option<String>,
    pub retry_max: Option<String>,
    pub retention: Option<String>,
    pub shutdown_timeout: Option<String>,
    pub relay_id: Option<String>,
    pub claim: Option<ClaimArg>,
    /// Largest message `enqueue` accepts, in bytes.
    pub max_message_size: Option<usize>,
    /// `[[routes]]`: which sinks get which messages.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
}

/// One `[[routes]]` table: messages whose type or topic matches `match` go to `sinks`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    #[serde(rename = "match")]
    pub pattern: String,
    pub sinks: Vec<String>,
}

/// Every problem of the sink configuration, for `relay --check` (nothing is connected).
pub fn sink_problems(default: Option<&str>, routes: &[RouteConfig]) -> Vec<String> {
    let mut problems = Vec::new();
    if default.is_none() && routes.is_empty() {
        problems.push(
            "no sink: pass --sink URL, set OUTBOX_SINK, or add [[routes]] to the config file"
                .to_owned(),
        );
    }
    if let Some(url) = default
        && let Err(e) = outbox_sinks::check_url(url)
    {
        problems.push(format!("default sink: {e}"));
    }
    for (i, r) in routes.iter().enumerate() {
        let n = i + 1;
        if r.pattern.trim().is_empty() {
            problems.push(format!("route {n}: match must not be empty"));
        }
        if r.sinks.is_empty() {
            problems.push(format!(
                "route {n} ({:?}): sinks must list at least one sink",
                r.pattern
            ));
        }
        for url in &r.sinks {
            if let Err(e) = outbox_sinks::check_url(url) {
                problems.push(format!("route {n} ({:?}): {e}", r.pattern));
            }
        }
    }
    problems
}

impl FileConfig {
    pub fn load(path: Option<&Path>) -> anyhow::Result<Self> {
        let Some(path) = path else {
            return Ok(Self::default());
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        toml::from_str(&text).map_err(|e| {
            let msg = e.message().to_owned();
            let at = e
                .span()
                .map(|s| format!(" at line {}", text[..s.start].lines().count().max(1)))
                .unwrap_or_default();
            anyhow::anyhow!("config file {}{at}: {msg}", path.display())
        })
    }
}

/// Where the outbox is.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    pub database_url: String,
    pub schema: Option<String>,
    pub table_prefix: Option<String>,
}

pub fn store_settings(global: &Global, file: &FileConfig) -> anyhow::Result<StoreSettings> {
    let Some(database_url) = global.database_url.clone().or(file.database_url.clone()) else {
        bail!(
            "no database: pass --database-url URL or set OUTBOX_DATABASE_URL (postgres://…, mysql://… or sqlite://PATH)"
        );
    };
    Ok(StoreSettings {
        database_url,
        schema: global.schema.clone().or(file.schema.clone()),
        table_prefix: global.table_prefix.clone().or(file.table_prefix.clone()),
    })
}

fn duration(
    flag: Option<Duration>,
    file: &Option<String>,
    name: &str,
    default: Duration,
) -> anyhow::Result<Duration> {
    if let Some(d) = flag {
        return Ok(d);
    }
    match file {
        Some(s) => parse_duration(s).map_err(|e| anyhow::anyhow!("config key {name} = {s:?}: {e}")),
        None => Ok(default),
    }
}

/// The relay's settings, with every value checked.
pub fn relay_settings(
    args: &RelayArgs,
    file: &FileConfig,
) -> anyhow::Result<(Option<String>, RelayConfig)> {
    let defaults = RelayConfig::default();
    let retry_defaults = RetryPolicy::default();
    let sink = args.sink.clone().or(file.sink.clone());
    if sink.is_none() && file.routes.is_empty() {
        bail!(
            "no sink: pass --sink URL (file:PATH, stdout:, null:, …), set OUTBOX_SINK, or add [[routes]] to the config file"
        );
    }
    let batch_size = args
        .batch_size
        .or(file.batch_size)
        .unwrap_or(defaults.batch_size);
    if !(1..=10_000).contains(&batch_size) {
        bail!("batch size must be between 1 and 10000, got {batch_size}");
    }
    let max_batch_bytes = args
        .max_batch_bytes
        .or(file.max_batch_bytes)
        .unwrap_or(defaults.max_batch_bytes);
    if max_batch_bytes == 0 {
        bail!("max batch bytes must be at least 1");
    }
    let in_flight_batches = args
        .in_flight_batches
        .or(file.in_flight_batches)
        .unwrap_or(defaults.in_flight_batches);
    if !(1..=64).contains(&in_flight_batches) {
        bail!("in-flight batches must be between 1 and 64, got {in_flight_batches}");
    }
    let max_attempts = args
        .max_attempts
        .or(file.max_attempts)
        .unwrap_or(retry_defaults.max_attempts);
    if max_attempts < 1 {
        bail!("max attempts must be at least 1, got {max_attempts}");
    }
    let lease = duration(args.lease, &file.lease, "lease", defaults.lease)?;
    if lease < Duration::from_millis(100) {
        bail!("lease must be at least 100ms, got {lease:?}");
    }
    let retention = duration(args.retention, &file.retention, "retention", Duration::ZERO)?;
    let relay_id = args
        .relay_id
        .clone()
        .or(file.relay_id.clone())
        .unwrap_or_else(|| RelayConfig::default().relay_id);
    let poll_interval = duration(
        args.poll_interval,
        &file.poll_interval,
        "poll_interval",
        defaults.poll_interval,
    )?
    .max(Duration::from_millis(10));
    let retry = RetryPolicy::default()
        .max_attempts(max_attempts)
        .base_delay(duration(
            args.retry_base,
            &file.retry_base,
            "retry_base",
            retry_defaults.base_delay,
        )?)
        .max_delay(duration(
            args.retry_max,
            &file.retry_max,
            "retry_max",
            retry_defaults.max_delay,
        )?);
    let retention = if retention.is_zero() {
        Retention::Delete
    } else {
        Retention::Keep(retention)
    };
    let shutdown_timeout = duration(
        args.shutdown_timeout,
        &file.shutdown_timeout,
        "shutdown_timeout",
        defaults.shutdown_timeout,
    )?;
    let config = defaults
        .relay_id(relay_id)
        .batch_size(batch_size)
        .max_batch_bytes(max_batch_bytes)
        .in_flight_batches(in_flight_batches)
        .lease(lease)
        .poll_interval(poll_interval)
        .retry(retry)
        .retention(retention)
        .shutdown_timeout(shutdown_timeout)
        .exit_when_idle(args.exit_when_idle);
    Ok((sink, config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let file: FileConfig = toml::from_str(
            "sink = \"null:\"\nbatch_size = 7\nlease = \"45s\"\nretention = \"1h\"\n",
        )
        .unwrap();
        let args = RelayArgs {
            batch_size: Some(9),
            ..RelayArgs::default()
        };
        let (sink, cfg) = relay_settings(&args, &file).unwrap();
        assert_eq!(sink.as_deref(), Some("null:"));
        assert_eq!(cfg.batch_size, 9);
        assert_eq!(cfg.max_batch_bytes, 16 << 20);
        assert_eq!(cfg.lease, Duration::from_secs(45));
        assert_eq!(cfg.retention, Retention::Keep(Duration::from_secs(3600)));
        assert_eq!(cfg.poll_interval, Duration::from_secs(1));
    }

    #[test]
    fn bad_values_are_named() {
        let file: FileConfig = toml::from_str("sink = \"null:\"\nlease = \"soon\"").unwrap();
        let err = relay_settings(&RelayArgs::default(), &file)
            .unwrap_err()
            .to_string();
        assert!(err.contains("lease"), "{err}");
        let err = toml::from_str::<FileConfig>("batchsize = 3")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field"), "{err}");
    }
}
