//! Command-line arguments. Every option also reads an `OUTBOX_*` environment variable, and the
//! settings of `--config FILE` fill in what neither gives.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "outbox",
    version,
    about = "Transactional outbox: deliver the events your transactions commit, never lost, in order per key",
    long_about = None,
    propagate_version = true
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct Global {
    /// Database holding the outbox: postgres://…, sqlite://PATH (mysql:// is not supported yet)
    #[arg(
        long,
        global = true,
        env = "OUTBOX_DATABASE_URL",
        hide_env_values = true
    )]
    pub database_url: Option<String>,

    /// PostgreSQL schema of the outbox tables [default: public]
    #[arg(long, global = true, env = "OUTBOX_SCHEMA")]
    pub schema: Option<String>,

    /// Prefix of the outbox tables [default: outbox_]
    #[arg(long, global = true, env = "OUTBOX_TABLE_PREFIX")]
    pub table_prefix: Option<String>,

    /// TOML file with settings (keys as the long options, with underscores)
    #[arg(long, global = true, env = "OUTBOX_CONFIG")]
    pub config: Option<PathBuf>,

    /// Log filter, as in RUST_LOG [default: info]
    #[arg(long, global = true, env = "OUTBOX_LOG")]
    pub log: Option<String>,

    /// Log lines as text, or as one JSON object per line (with the trace id inside a trace)
    /// [default: text]
    #[arg(long, global = true, env = "OUTBOX_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or upgrade the outbox schema (idempotent)
    Migrate(MigrateArgs),
    /// Enqueue messages in one transaction, from flags or a JSON-lines file
    Enqueue(EnqueueArgs),
    /// Run the relay: claim pending messages, deliver them to a sink, retry, dead-letter
    Relay(RelayArgs),
    /// Counts of pending, in-flight, delivered and dead messages
    Status(JsonFlag),
    /// List, retry and purge dead messages
    #[command(subcommand)]
    Dead(DeadCommand),
    /// Log-based capture (PostgreSQL): tear down the replication slot
    #[command(subcommand)]
    Capture(CaptureCommand),
    /// The payment system of the outbox pattern: API, worker, gateway and e-mail
    #[cfg(feature = "demo")]
    Demo(DemoArgs),
    /// Measure the relay's drain rate on the configured database
    #[cfg(feature = "bench")]
    Bench(BenchArgs),
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Also set up log-based capture: check wal_level, create the publication and the slot
    #[arg(long, value_enum)]
    pub capture: Option<CaptureArg>,
    /// Replication slot to create [default: {schema}_{prefix}slot]
    #[arg(long, env = "OUTBOX_SLOT", requires = "capture")]
    pub slot: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum CaptureCommand {
    /// Drop the replication slot: PostgreSQL stops keeping WAL for it, and messages emitted
    /// since its relay last confirmed are lost. Refused while a relay streams from it.
    DropSlot {
        /// The slot [default: {schema}_{prefix}slot]
        #[arg(long, env = "OUTBOX_SLOT")]
        slot: Option<String>,
    },
}

/// Where a relay reads messages from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CaptureArg {
    /// Claims rows from the outbox table (every database)
    #[default]
    Poll,
    /// Streams committed messages from a PostgreSQL replication slot, in commit order
    Wal,
}

#[derive(Debug, Args)]
pub struct JsonFlag {
    /// Print JSON instead of text
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct EnqueueArgs {
    /// Topic of the message
    #[arg(long, required_unless_present = "file", conflicts_with = "file")]
    pub topic: Option<String>,
    /// Type of the message (for example payment.created)
    #[arg(
        long = "type",
        required_unless_present = "file",
        conflicts_with = "file"
    )]
    pub message_type: Option<String>,
    /// Ordering key: messages with the same key are delivered in order
    #[arg(long, conflicts_with = "file")]
    pub key: Option<String>,
    /// JSON payload
    #[arg(long, required_unless_present = "file", conflicts_with = "file")]
    pub payload: Option<String>,
    /// Header NAME=VALUE (repeatable)
    #[arg(long = "header", value_name = "NAME=VALUE", conflicts_with = "file")]
    pub headers: Vec<String>,
    /// Deliver no earlier than this long after commit (for example 30s)
    #[arg(long, value_parser = parse_duration, conflicts_with = "file")]
    pub delay: Option<Duration>,
    /// JSON lines {"topic","type","key","payload","headers"} to enqueue together; - for stdin
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Largest message accepted, in bytes of payload and headers [default: 1048576]
    #[arg(long, env = "OUTBOX_MAX_MESSAGE_SIZE")]
    pub max_message_size: Option<usize>,
    /// Emit logical decoding messages instead of rows, for a relay run with --capture wal
    /// (PostgreSQL with wal_level = logical)
    #[arg(long)]
    pub wal_message: bool,
    /// Write a row that only a relay run with --capture wal delivers, from the table's inserts
    /// (table capture; PostgreSQL with wal_level = logical)
    #[arg(long, conflicts_with = "wal_message")]
    pub captured_row: bool,
}

impl EnqueueArgs {
    /// How `enqueue` writes, and the flag that chose it when it is not a plain row.
    pub fn mode(&self) -> Option<(outbox_postgres::EnqueueMode, &'static str)> {
        use outbox_postgres::EnqueueMode;
        if self.wal_message {
            Some((EnqueueMode::WalMessage, "--wal-message"))
        } else if self.captured_row {
            Some((EnqueueMode::CapturedRow, "--captured-row"))
        } else {
            None
        }
    }
}

#[derive(Debug, Args, Default)]
pub struct RelayArgs {
    /// Where to deliver: file:PATH, stdout:, null:, http(s)://…, redis://…, nats://…
    #[arg(long, env = "OUTBOX_SINK", hide_env_values = true)]
    pub sink: Option<String>,
    /// Messages claimed per round trip [default: 100]
    #[arg(long, env = "OUTBOX_BATCH_SIZE")]
    pub batch_size: Option<usize>,
    /// A batch stops before its payloads pass this many bytes; it always takes one message
    /// [default: 16777216]
    #[arg(long, env = "OUTBOX_MAX_BATCH_BYTES")]
    pub max_batch_bytes: Option<usize>,
    /// Batches delivered at once; the next is claimed while earlier ones are published [default: 2]
    #[arg(long, env = "OUTBOX_IN_FLIGHT_BATCHES")]
    pub in_flight_batches: Option<usize>,
    /// How long a claim is held before another relay may take it over [default: 30s]
    #[arg(long, env = "OUTBOX_LEASE", value_parser = parse_duration)]
    pub lease: Option<Duration>,
    /// Polling fallback when no wake-up arrives [default: 1s]
    #[arg(long, env = "OUTBOX_POLL_INTERVAL", value_parser = parse_duration)]
    pub poll_interval: Option<Duration>,
    /// Attempts before a message is dead [default: 10]
    #[arg(long, env = "OUTBOX_MAX_ATTEMPTS")]
    pub max_attempts: Option<i32>,
    /// Backoff after the first failure, doubled per attempt [default: 1s]
    #[arg(long, env = "OUTBOX_RETRY_BASE", value_parser = parse_duration)]
    pub retry_base: Option<Duration>,
    /// Longest backoff [default: 10m]
    #[arg(long, env = "OUTBOX_RETRY_MAX", value_parser = parse_duration)]
    pub retry_max: Option<Duration>,
    /// Keep delivered messages this long (0 deletes them at once) [default: 0]
    #[arg(long, env = "OUTBOX_RETENTION", value_parser = parse_duration)]
    pub retention: Option<Duration>,
    /// On SIGINT/SIGTERM, how long the batch in hand may take [default: 10s]
    #[arg(long, env = "OUTBOX_SHUTDOWN_TIMEOUT", value_parser = parse_duration)]
    pub shutdown_timeout: Option<Duration>,
    /// How a PostgreSQL relay holds messages in delivery: transaction (row locks in an open
    /// transaction, the fastest) or lease (written on the rows; in-flight shows in status)
    /// [default: transaction]. SQLite always uses leases.
    #[arg(long, env = "OUTBOX_CLAIM", value_enum)]
    pub claim: Option<ClaimArg>,
    /// Where messages come from: poll (claim rows from the table) or wal (stream the
    /// PostgreSQL replication slot in commit order; failures are retried from the table)
    /// [default: poll]
    #[arg(long, env = "OUTBOX_CAPTURE", value_enum)]
    pub capture: Option<CaptureArg>,
    /// Replication slot of --capture wal; relays sharing it stream one at a time, the
    /// others wait as standbys [default: {schema}_{prefix}slot]
    #[arg(long, env = "OUTBOX_SLOT")]
    pub slot: Option<String>,
    /// Name of this relay's leases [default: relay-PID-RANDOM]
    #[arg(long, env = "OUTBOX_RELAY_ID")]
    pub relay_id: Option<String>,
    /// Do not create or upgrade the schema at start
    #[arg(long, env = "OUTBOX_NO_MIGRATE")]
    pub no_migrate: bool,
    /// Exit once nothing is left to deliver (drain mode)
    #[arg(long)]
    pub exit_when_idle: bool,
    /// Serve /health/live, /health/ready, /metrics, the admin API (/admin/api/) and the
    /// dashboard (/admin/) on this address (port 0 picks a free port; the base URL is printed
    /// first)
    #[arg(long, env = "OUTBOX_LISTEN")]
    pub listen: Option<std::net::SocketAddr>,
    /// Bearer token the admin API and dashboard require; without one, --listen must be a
    /// loopback address
    #[arg(long, env = "OUTBOX_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Validate the configuration and exit
    #[arg(long)]
    pub check: bool,
}

#[derive(Debug, Subcommand)]
pub enum DeadCommand {
    /// List dead messages with their last error
    List {
        #[command(flatten)]
        json: JsonFlag,
        /// At most this many [default: 100]
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Only messages of this topic
        #[arg(long)]
        topic: Option<String>,
        /// Only messages of this type
        #[arg(long = "type")]
        message_type: Option<String>,
        /// Only messages with this key
        #[arg(long)]
        key: Option<String>,
        /// Only messages whose last error contains this text (case-insensitive)
        #[arg(long)]
        error: Option<String>,
        /// Only messages after this id (the last one of a previous listing)
        #[arg(long)]
        after: Option<uuid::Uuid>,
    },
    /// Make dead messages pending again, with a fresh attempt count
    Retry {
        /// Ids of the messages to retry
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<uuid::Uuid>,
        /// Retry every dead message
        #[arg(long)]
        all: bool,
    },
    /// Delete dead messages
    Purge {
        /// Only those dead for longer than this (for example 7d)
        #[arg(long, value_parser = parse_duration)]
        older_than: Option<Duration>,
    },
}

#[cfg(feature = "demo")]
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Parts to run in this process: all, api, relay (with --broker), worker or gateway
    #[arg(long, default_value = "all", env = "OUTBOX_DEMO_ROLE")]
    pub role: outbox_payments::Role,
    /// Deliver the events through this broker (nats://… or amqp://…): the relay publishes,
    /// the worker consumes through the inbox
    #[arg(long, env = "OUTBOX_DEMO_BROKER", hide_env_values = true)]
    pub broker: Option<String>,
    /// Address of the payment API, with health and metrics (port 0 picks a free port;
    /// default 127.0.0.1:8080). With --role worker or relay, where they serve health and
    /// metrics (nothing when not given)
    #[arg(long, env = "OUTBOX_LISTEN")]
    pub listen: Option<std::net::SocketAddr>,
    /// Address of the simulated payment gateway
    #[arg(long, default_value = "127.0.0.1:0", env = "OUTBOX_GATEWAY_LISTEN")]
    pub gateway_listen: std::net::SocketAddr,
    /// Use this payment gateway instead of starting the simulated one
    #[arg(long, env = "OUTBOX_GATEWAY_URL", hide_env_values = true)]
    pub gateway_url: Option<String>,
    /// Share of charge attempts the simulated gateway declines, 0 to 1
    #[arg(long, default_value_t = 0.3, env = "OUTBOX_DECLINE_RATE")]
    pub decline_rate: f64,
    /// Latency range of the simulated gateway in milliseconds, MIN-MAX
    #[arg(long, default_value = "50-300", env = "OUTBOX_GATEWAY_LATENCY", value_parser = parse_range)]
    pub gateway_latency: std::ops::RangeInclusive<u64>,
    /// Charge attempts before a payment is rejected
    #[arg(long, default_value_t = 4, env = "OUTBOX_MAX_DECLINES")]
    pub max_declines: i64,
    /// Folder for e-mails as .eml files when no SMTP server is given
    #[arg(long, default_value = "outbox-data/mail", env = "OUTBOX_MAIL_DIR")]
    pub mail_dir: PathBuf,
    /// Send e-mails through this SMTP server (smtp://host:port)
    #[arg(long, env = "OUTBOX_SMTP_URL", hide_env_values = true)]
    pub smtp_url: Option<String>,
    /// Polling fallback of the worker
    #[arg(long, default_value = "1s", env = "OUTBOX_POLL_INTERVAL", value_parser = parse_duration)]
    pub poll_interval: Duration,
    /// How long the worker holds a claimed event before another worker may take it over
    #[arg(long, default_value = "30s", env = "OUTBOX_LEASE", value_parser = parse_duration)]
    pub lease: Duration,
    /// HTTP: time for a request's headers to arrive (also closes idle connections)
    #[arg(long, default_value = "10s", env = "OUTBOX_HEADER_READ_TIMEOUT", value_parser = parse_duration)]
    pub header_read_timeout: Duration,
    /// HTTP: time for a whole request, body included, before it is answered 408
    #[arg(long, default_value = "30s", env = "OUTBOX_REQUEST_TIMEOUT", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// HTTP: connections served at once per server; more wait until one closes
    #[arg(long, default_value_t = 1024, env = "OUTBOX_MAX_CONNECTIONS")]
    pub max_connections: usize,
    /// On SIGINT/SIGTERM, how long requests in progress and the relay's batch in hand may
    /// take before they are cut off
    #[arg(long, default_value = "10s", env = "OUTBOX_SHUTDOWN_TIMEOUT", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,
    /// Benchmark baseline: the API writes payments without their outbox event
    #[arg(long, hide = true)]
    pub without_outbox: bool,
}

#[cfg(feature = "demo")]
fn parse_range(s: &str) -> Result<std::ops::RangeInclusive<u64>, String> {
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let (a, b): (u64, u64) = (
        a.trim()
            .parse()
            .map_err(|_| format!("{s:?} is not MIN-MAX in milliseconds"))?,
        b.trim()
            .parse()
            .map_err(|_| format!("{s:?} is not MIN-MAX in milliseconds"))?,
    );
    if a > b {
        return Err(format!("{s:?}: MIN is larger than MAX"));
    }
    Ok(a..=b)
}

#[derive(Debug, Args)]
#[cfg(feature = "bench")]
pub struct BenchArgs {
    /// Messages in the drain backlog (and per broker)
    #[arg(long, default_value_t = 200_000)]
    pub messages: usize,
    /// Distinct ordering keys among them (0: no keys)
    #[arg(long, default_value_t = 1000)]
    pub keys: usize,
    /// Approximate JSON payload size in bytes
    #[arg(long, default_value_t = 200)]
    pub payload_bytes: usize,
    /// Messages claimed per round trip
    #[arg(long, default_value_t = 1000)]
    pub batch_size: usize,
    /// How the PostgreSQL relay holds messages in delivery (see `relay --claim`)
    #[arg(long, value_enum, default_value = "transaction")]
    pub claim: ClaimArg,
    /// Concurrent writer connections
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// How long the write scenario runs each mode (split over two rounds)
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Messages committed per second in the latency scenario
    #[arg(long, default_value_t = 1000)]
    pub rate: u32,
    /// How long the latency scenario writes, with wake-ups and then polling only
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub latency_duration: Duration,
    /// The relay's polling interval in the latency scenario
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub poll_interval: Duration,
    /// Also drain the backlog to this sink (repeatable), e.g. nats://127.0.0.1:4222;
    /// kafka://mock is librdkafka's in-process mock cluster (feature kafka)
    #[arg(long = "sink", value_name = "URL")]
    pub sinks: Vec<String>,
    /// Relays draining the backlog at once in the drain scenario, each with its own pool
    /// (the relays scenario always runs 1, 2 and 4)
    #[arg(long, default_value_t = 1)]
    pub relays: usize,
    /// Scenarios to run (comma-separated): write, drain, latency, brokers (the default), keys,
    /// relays and surface (the drain without, then with --listen's health and metrics)
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "write,drain,latency,brokers"
    )]
    pub scenario: Vec<crate::bench::Scenario>,
    /// Folder for the JSON report, the Markdown table and the SVG charts
    #[arg(long, default_value = "bench-results")]
    pub out: PathBuf,
    /// Write nothing to the results folder
    #[arg(long)]
    pub no_files: bool,
    /// Print one JSON object
    #[arg(long)]
    pub json: bool,
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("{e} (expected for example 500ms, 30s, 5m, 7d)"))
}

/// Help and version go to stdout with success; usage errors become one line and exit 2.
pub fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind::*;
    if matches!(
        e.kind(),
        DisplayHelp | DisplayVersion | DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return if e.kind() == DisplayHelpOnMissingArgumentOrSubcommand {
            ExitCode::from(2)
        } else {
            ExitCode::SUCCESS
        };
    }
    let text = e.to_string();
    let line: Vec<&str> = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:"))
        .filter(|l| !l.is_empty() && !l.starts_with("tip:"))
        .collect();
    // A value that failed to parse is quoted in the message, and it may be a URL.
    let line = outbox_core::redact(&line.join(" "));
    eprintln!("{line} (see outbox --help)");
    ExitCode::from(2)
}

/// `--claim`: see [`outbox_postgres::ClaimMode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClaimArg {
    Transaction,
    Lease,
}

impl From<ClaimArg> for outbox_postgres::ClaimMode {
    fn from(arg: ClaimArg) -> Self {
        match arg {
            ClaimArg::Transaction => Self::Transaction,
            ClaimArg::Lease => Self::Lease,
        }
    }
}
