//! The dashboard in a real headless Chromium, driven over WebDriver by Debian's chromedriver
//! (`scripts/test` installs `chromium` and `chromium-driver`), against a real admin server and
//! a real SQLite outbox.
//!
//! `OUTBOX_DASHBOARD_PNG=docs/dashboard.png` also saves a screenshot of the seeded dashboard.

mod common;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Admin, dead, enqueue, message, start};
use fantoccini::{Client, ClientBuilder, Locator};
use outbox_core::Store;
use outbox_testkit::eventually;
use serde_json::{Value, json};

type R = anyhow::Result<()>;

const WAIT: Duration = Duration::from_secs(20);

/// A chromedriver of this test's own, and a headless session in it.
struct Browser {
    client: Client,
    base: String,
    _driver: Driver,
}

/// The chromedriver process, killed when the test ends however it ends.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Browser {
    async fn start() -> anyhow::Result<Self> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let binary = std::env::var("OUTBOX_CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
        let driver = Driver(
            Command::new(&binary)
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| {
                    anyhow::anyhow!(
                        "cannot run {binary} (apt-get install chromium chromium-driver): {e}"
                    )
                })?,
        );
        let base = format!("http://127.0.0.1:{port}");
        eventually("chromedriver listening", WAIT, || async {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        })
        .await;
        let mut caps = serde_json::Map::new();
        let mut options = json!({
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1280,1100"],
        });
        if std::path::Path::new("/usr/bin/chromium").exists() {
            options["binary"] = json!("/usr/bin/chromium");
        }
        caps.insert("goog:chromeOptions".into(), options);
        caps.insert("goog:loggingPrefs".into(), json!({ "browser": "ALL" }));
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&base)
            .await?;
        Ok(Self {
            client,
            base,
            _driver: driver,
        })
    }

    /// The browser's console since the last call (chromedriver's log endpoint).
    async fn console(&self) -> anyhow::Result<Vec<Value>> {
        let session = self.client.session_id().await?.unwrap_or_default();
        let log: Value = reqwest::Client::new()
            .post(format!("{}/session/{session}/se/log", self.base))
            .json(&json!({ "type": "browser" }))
            .send()
            .await?
            .json()
            .await?;
        match log["value"].as_array() {
            Some(entries) => Ok(entries.clone()),
            None => anyhow::bail!("chromedriver gave no browser log: {log}"),
        }
    }

    async fn text(&self, css: &str) -> String {
        match self.client.find(Locator::Css(css)).await {
            Ok(e) => e.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    async fn shows(&self, css: &str, want: &str) {
        let what = format!("{css} shows {want:?}");
        eventually(&what, WAIT, || async { self.text(css).await == want }).await;
    }

    async fn displayed(&self, css: &str) -> bool {
        match self.client.find(Locator::Css(css)).await {
            Ok(e) => e.is_displayed().await.unwrap_or(false),
            Err(_) => false,
        }
    }
}

async fn seed(admin: &Admin) -> anyhow::Result<Vec<uuid::Uuid>> {
    let dead_letters = [
        message("mail", "receipt.send", Some("order-17"), 1),
        message("mail", "receipt.send", Some("order-18"), 2),
        message("webhooks", "payment.paid", None, 3),
    ];
    dead(
        &admin.store,
        &dead_letters[..2],
        "SMTP 550 mailbox unavailable",
    )
    .await?;
    dead(
        &admin.store,
        &dead_letters[2..],
        "HTTP 410 Gone from the partner's webhook",
    )
    .await?;
    let pending: Vec<_> = (0..4)
        .map(|n| {
            message(
                "payments",
                "payment.created",
                Some(&format!("p{n}")),
                10 + n,
            )
        })
        .collect();
    enqueue(&admin.store, &pending).await?;
    let store = admin.dyn_store();
    store.pause_topic("audit").await?;
    store.heartbeat("relay-7f3a", "working").await?;
    Ok(dead_letters.iter().map(|m| m.id()).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_outbox_and_retries_a_dead_letter_by_click() -> R {
    let admin = start(|s| s).await?;
    let dead_ids = seed(&admin).await?;
    let browser = Browser::start().await?;
    let b = &browser.client;
    b.goto(&admin.url("/admin/")).await?;
    browser.shows("#count-pending", "4").await;
    browser.shows("#count-dead", "3").await;
    browser.shows("#relays td.id", "relay-7f3a").await;
    browser.shows("#paused li span", "audit").await;
    let row = format!("tr[data-id=\"{}\"]", dead_ids[0]);
    eventually("dead letters listed", WAIT, || async {
        browser.displayed(&row).await
    })
    .await;
    assert!(browser.text(&row).await.contains("SMTP 550"));

    // Retry the first dead letter by clicking its button: it leaves the list and is pending.
    b.find(Locator::Css(&format!(
        "{row} button[aria-label^=\"Retry\"]"
    )))
    .await?
    .click()
    .await?;
    eventually("retried row gone", WAIT, || async {
        !browser.displayed(&row).await
    })
    .await;
    browser.shows("#count-dead", "2").await;
    browser.shows("#count-pending", "5").await;
    let s = admin.store.status().await?;
    assert_eq!((s.pending, s.dead), (5, 2));
    assert!(browser.text("#notice").await.contains("pending again"));

    // Narrow enough for a phone, nothing sticks out sideways.
    b.set_window_size(390, 844).await?;
    let fits = b
        .execute(
            "return document.documentElement.scrollWidth <= window.innerWidth + 1",
            vec![],
        )
        .await?;
    assert_eq!(
        fits,
        json!(true),
        "the page scrolls sideways at a phone's width"
    );
    b.set_window_size(1280, 1100).await?;

    if let Ok(path) = std::env::var("OUTBOX_DASHBOARD_PNG") {
        screenshot(&admin, &browser, &path).await?;
    }
    let console = browser.console().await?;
    let errors: Vec<_> = console
        .iter()
        .filter(|e| e["level"] == "SEVERE" || e["level"] == "WARNING")
        .collect();
    assert!(errors.is_empty(), "console errors: {errors:#?}");
    b.clone().close().await?;
    Ok(())
}

/// Runs a slow relay on the outbox and lets the chart gather samples while waves of messages
/// arrive and drain, then saves the page.
async fn screenshot(admin: &Admin, browser: &Browser, path: &str) -> R {
    // A sink of about 200 messages a second, slow enough for the backlog to show.
    let sink = outbox_core::HandlerSink::new(|_| async {
        tokio::time::sleep(Duration::from_millis(5)).await;
        Ok(())
    })
    .concurrency(1);
    let config = outbox_core::RelayConfig::default()
        .relay_id("relay")
        .batch_size(20);
    let relay =
        outbox_core::Relay::with_config(admin.dyn_store(), std::sync::Arc::new(sink), config);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(relay.run(async {
        let _ = stopped.await;
    }));
    for wave in 1..=12u64 {
        let batch: Vec<_> = (0..(wave % 4) * 400)
            .map(|n| message("payments", "payment.created", None, 1000 * wave + n))
            .collect();
        enqueue(&admin.store, &batch).await?;
        let samples = wave as usize + 1;
        eventually("chart sample", WAIT, || async {
            let points = browser
                .client
                .find(Locator::Css("#line-backlog"))
                .await
                .ok();
            match points {
                Some(p) => p
                    .attr("points")
                    .await
                    .ok()
                    .flatten()
                    .is_some_and(|p| p.split(' ').count() > samples),
                None => false,
            }
        })
        .await;
    }
    let png = browser.client.screenshot().await?;
    std::fs::write(path, png)?;
    let _ = stop.send(());
    running.await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_asks_for_the_token_when_one_is_configured() -> R {
    let admin = start(|s| s.with_token(Some("correct horse".into()))).await?;
    seed(&admin).await?;
    let browser = Browser::start().await?;
    let b = &browser.client;
    b.goto(&admin.url("/admin/")).await?;
    eventually("token asked for", WAIT, || async {
        browser.displayed("#login").await
    })
    .await;
    assert!(
        !browser.displayed("#app").await,
        "data shown without a token"
    );

    b.find(Locator::Css("#token"))
        .await?
        .send_keys("wrong")
        .await?;
    b.find(Locator::Css("#login-form button"))
        .await?
        .click()
        .await?;
    browser
        .shows("#login-error", "That token was refused.")
        .await;
    assert!(!browser.displayed("#app").await);

    let field = b.find(Locator::Css("#token")).await?;
    field.clear().await?;
    field.send_keys("correct horse").await?;
    b.find(Locator::Css("#login-form button"))
        .await?
        .click()
        .await?;
    browser.shows("#count-dead", "3").await;
    assert!(!browser.displayed("#login").await);

    // The token lasts for the tab's session: a reload does not ask again.
    b.refresh().await?;
    browser.shows("#count-pending", "4").await;
    assert!(!browser.displayed("#login").await);
    b.clone().close().await?;
    Ok(())
}
