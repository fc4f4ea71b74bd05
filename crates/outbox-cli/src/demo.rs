//! `outbox demo`: the payment system, embedded on SQLite by default.

use crate::cli::DemoArgs;
use crate::commands::shutdown_signal;
use outbox_core::redact;
use outbox_payments::{DemoOptions, GatewayConfig, Role, ServerLimits, Urls};

const DEFAULT_DATABASE: &str = "sqlite://outbox-data/demo.db";
const DEFAULT_LISTEN: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8080);

pub async fn run(
    database_url: Option<String>,
    schema: Option<String>,
    args: DemoArgs,
) -> anyhow::Result<()> {
    if !(0.0..=1.0).contains(&args.decline_rate) {
        anyhow::bail!(
            "--decline-rate must be between 0 and 1, got {}",
            args.decline_rate
        );
    }
    if args.max_connections < 1 {
        anyhow::bail!("--max-connections must be at least 1");
    }
    for (flag, d) in [
        ("--header-read-timeout", args.header_read_timeout),
        ("--request-timeout", args.request_timeout),
    ] {
        if d.is_zero() {
            anyhow::bail!("{flag} must be longer than 0");
        }
    }
    if args.max_declines < 1 {
        anyhow::bail!(
            "--max-declines must be at least 1, got {}",
            args.max_declines
        );
    }
    let database_url = database_url.unwrap_or_else(|| DEFAULT_DATABASE.into());
    let opts = DemoOptions {
        database_url: database_url.clone(),
        schema,
        role: args.role,
        listen: args.listen.unwrap_or(DEFAULT_LISTEN),
        operations_listen: args.listen,
        gateway_listen: args.gateway_listen,
        gateway_url: args.gateway_url,
        gateway: GatewayConfig {
            latency_ms: args.gateway_latency,
            decline_rate: args.decline_rate,
        },
        mail_dir: args.mail_dir.clone(),
        smtp_url: args.smtp_url.clone(),
        max_declines: args.max_declines,
        poll_interval: args.poll_interval,
        lease: args.lease,
        write_events: !args.without_outbox,
        broker: args.broker.clone(),
        limits: ServerLimits {
            header_read_timeout: args.header_read_timeout,
            request_timeout: args.request_timeout,
            max_connections: args.max_connections,
            shutdown_timeout: args.shutdown_timeout,
        },
    };
    let role = args.role;
    let mail = match &args.smtp_url {
        Some(url) => format!("sent through {}", redact(url)),
        None => format!("written as .eml files to {}", args.mail_dir.display()),
    };
    let broker = args.broker;
    let ready = move |urls: &Urls| {
        print_banner(role, urls, &database_url, &mail);
        if let Some(url) = &broker {
            println!("events via:   {}", redact(url));
        }
        println!("Ctrl-C stops.");
    };
    outbox_payments::run(opts, ready, shutdown_signal()).await
}

/// The first URL printed is the base URL of what this process serves.
fn print_banner(role: Role, urls: &Urls, database: &str, mail: &str) {
    if let Some(ops) = &urls.operations {
        println!("operations:   {ops}  (/health/live, /health/ready, /metrics)");
    }
    if let Some(api) = &urls.api {
        println!("payment API:  {api}");
        println!("API docs:     {api}/api/docs");
        println!("metrics:      {api}/metrics");
    }
    if let Some(gw) = &urls.gateway {
        println!("gateway:      {gw}");
    }
    if matches!(role, Role::All | Role::Api | Role::Relay | Role::Worker) {
        println!("database:     {}", redact(database));
    }
    if matches!(role, Role::All | Role::Worker) {
        println!("e-mails:      {mail}");
    }
    if let Some(api) = &urls.api {
        println!();
        println!("Try a purchase:");
        println!(
            "  curl -i -X POST {api}/api/payments -H 'Content-Type: application/json' \\\n    -d '{{\"token_card\":\"tok_visa\",\"amount\":\"25.00\",\"currency\":\"EUR\",\"card_holder_email\":\"ana@example.com\",\"card_holder_name\":\"Ana\"}}'"
        );
        println!("then follow its Location: curl {api}/api/payments/PAYMENT_ID");
    }
}
