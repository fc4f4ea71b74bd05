//! The results folder: the JSON report, a Markdown table and two SVG charts (the commit-to-sink
//! latency histogram and the drain's progress against the raw-SQL loop).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;

use super::Report;

/// Writes `<backend>.json`, `<backend>.md`, `<backend>-latency.svg` and `<backend>-drain.svg`.
pub fn write_results(dir: &Path, r: &Report) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let base = dir.join(&r.backend);
    let write = |ext: &str, text: String| {
        let path = base.with_extension(ext);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))
    };
    write("json", serde_json::to_string_pretty(r)?)?;
    write("md", markdown(r))?;
    if !r.series.latency.is_empty() {
        let path = dir.join(format!("{}-latency.svg", r.backend));
        latency_chart(&path, r).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    }
    if !r.series.drain.is_empty() {
        let path = dir.join(format!("{}-drain.svg", r.backend));
        drain_chart(&path, r).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    }
    Ok(())
}

fn fmt(v: Option<f64>, unit: &str) -> String {
    match v {
        Some(v) if v >= 100.0 => format!("{v:.0}{unit}"),
        // The ratios of a collapsed drain (one hot key) would all read 0.00.
        Some(v) if v > 0.0 && v < 0.01 => format!("{v:.4}{unit}"),
        Some(v) => format!("{v:.2}{unit}"),
        None => "—".into(),
    }
}

/// The report as a Markdown table: each figure with the baseline it is compared to. Scenarios
/// that did not run leave no row.
pub fn markdown(r: &Report) -> String {
    let mut s = format!(
        "### {} ({} cores, {} messages, {} keys, {}-byte payloads, batch {}, {} claims, {} clients)\n\n\
         | scenario | outbox | raw SQL baseline | ratio |\n|---|---|---|---|\n",
        r.backend,
        r.cores,
        r.messages,
        r.keys,
        r.payload_bytes,
        r.batch_size,
        r.claim_mode,
        r.clients
    );
    s += &drain_and_latency_rows(r);
    for (url, rate) in &r.brokers {
        s += &format!("| drain to `{url}`, msg/s | {rate:.0} | | |\n");
    }
    s += &keys_rows(r);
    s += &relays_rows(r);
    s += &capture_rows(r);
    if let Some(n) = r.order_violations {
        s += &format!("| per-key order violations seen by the sinks | {n} | | |\n");
    }
    s
}

/// The rows of the write, drain and latency scenarios, and of the memory they took.
fn drain_and_latency_rows(r: &Report) -> String {
    let mut s = String::new();
    if r.write_outbox_tx_per_s.is_some() {
        s += &format!(
            "| write: business insert + enqueue, tx/s | {} | {} alone; {} with a plain second row ({}) | **{}** |\n",
            fmt(r.write_outbox_tx_per_s, ""),
            fmt(r.write_alone_tx_per_s, ""),
            fmt(r.write_raw_row_tx_per_s, ""),
            fmt(r.raw_write_ratio, ""),
            fmt(r.write_ratio, ""),
        );
    }
    if r.drain_per_s.is_some() {
        let by = match r.relays {
            1 => String::new(),
            n => format!(" by {n} relays at once"),
        };
        s += &format!(
            "| drain to the null sink{by}, msg/s | {} | {} (claim + DELETE loop) | **{}** |\n",
            fmt(r.drain_per_s, ""),
            fmt(r.raw_drain_per_s, ""),
            fmt(r.drain_ratio, ""),
        );
    }
    if r.surface_ratio.is_some() {
        s += &format!(
            "| drain with --listen (metrics, backlog refresh, a scrape a second), msg/s | {} | {} (without) | **{}** |\n",
            fmt(r.surface_on_drain_per_s, ""),
            fmt(r.surface_off_drain_per_s, ""),
            fmt(r.surface_ratio, ""),
        );
    }
    if r.latency_p50_ms.is_some() {
        s += &format!(
            "| commit → sink at {} msg/s, wake-ups | p50 {} · p99 {} · max {} | | |\n",
            r.rate,
            fmt(r.latency_p50_ms, " ms"),
            fmt(r.latency_p99_ms, " ms"),
            fmt(r.latency_max_ms, " ms"),
        );
        s += &format!(
            "| commit → sink at {} msg/s, polling only | p50 {} · p99 {} · max {} | | |\n",
            r.rate,
            fmt(r.polling_latency_p50_ms, " ms"),
            fmt(r.polling_latency_p99_ms, " ms"),
            fmt(r.polling_latency_max_ms, " ms"),
        );
    }
    if r.relay_peak_rss_mib.is_some() {
        s += &format!(
            "| relay peak RSS (drain, latency) | {} | | |\n",
            fmt(r.relay_peak_rss_mib, " MiB")
        );
    }
    s
}

/// One row per key count of the keys scenario, each against the baseline of its ratio.
fn keys_rows(r: &Report) -> String {
    let mut s = String::new();
    // In the order they run: unkeyed, then from many keys to one.
    let mut rates: Vec<_> = r.keys_drain_per_s.iter().collect();
    rates.sort_by_key(|(keys, _)| (**keys != 0, std::cmp::Reverse(**keys)));
    for (keys, rate) in rates {
        let label = match keys {
            0 => "unkeyed".to_owned(),
            1 => "1 key".to_owned(),
            n => format!("{n} keys"),
        };
        let (baseline, ratio) = match ratio_of(&r.keys_ratios, *keys) {
            Some(("raw", v)) => (
                format!("{} (claim + DELETE loop)", fmt(r.keys_raw_drain_per_s, "")),
                Some(v),
            ),
            Some((of, v)) => {
                let base = of.parse().ok().and_then(|k| r.keys_drain_per_s.get(&k));
                let name = if of == "0" {
                    "unkeyed".into()
                } else {
                    format!("with {of} keys")
                };
                (format!("{} {name}", fmt(base.copied(), "")), Some(v))
            }
            None => (String::new(), None),
        };
        s += &format!(
            "| drain, {label}, msg/s | {} | {baseline} | {} |\n",
            fmt(Some(*rate), ""),
            bold(ratio)
        );
    }
    s
}

/// One row per relay count of the relays scenario, each against the single relay.
fn relays_rows(r: &Report) -> String {
    let mut s = String::new();
    let single = r.relays_drain_per_s.get(&1).copied();
    for (n, rate) in &r.relays_drain_per_s {
        let (label, baseline) = match n {
            1 => ("1 relay".to_owned(), String::new()),
            n => (
                format!("{n} relays at once"),
                format!("{} with 1 relay", fmt(single, "")),
            ),
        };
        let ratio = ratio_of(&r.relays_ratios, *n).map(|(_, v)| v);
        s += &format!(
            "| drain by {label} ({} keys, own pools), msg/s | {} | {baseline} | {} |\n",
            r.keys,
            fmt(Some(*rate), ""),
            bold(ratio)
        );
    }
    s
}

fn capture_rows(r: &Report) -> String {
    let mut s = String::new();
    if r.capture_write_tx_per_s.is_some() {
        s += &format!(
            "| capture: business insert + enqueue as a logical message, tx/s | {} | {} alone; \
             {} with enqueue of a row ({}); {} with a plain second row ({}) | **{}** |\n",
            fmt(r.capture_write_tx_per_s, ""),
            fmt(r.capture_write_alone_tx_per_s, ""),
            fmt(r.capture_write_row_tx_per_s, ""),
            fmt(r.capture_row_write_ratio, ""),
            fmt(r.capture_write_raw_row_tx_per_s, ""),
            fmt(r.capture_raw_write_ratio, ""),
            fmt(r.capture_write_ratio, "")
        );
    }
    if r.capture_table_write_tx_per_s.is_some() {
        s += &format!(
            "| capture: business insert + enqueue of a captured row, tx/s | {} | the same \
             rounds | **{}** |\n",
            fmt(r.capture_table_write_tx_per_s, ""),
            fmt(r.capture_table_write_ratio, "")
        );
    }
    if r.capture_drain_per_s.is_some() {
        s += &format!(
            "| capture: drain from the slot ({} keys), msg/s | {} | {} by polling | **{}** |\n",
            r.keys,
            fmt(r.capture_drain_per_s, ""),
            fmt(r.capture_polling_drain_per_s, ""),
            fmt(r.capture_drain_ratio, "")
        );
    }
    if r.capture_table_drain_per_s.is_some() {
        s += &format!(
            "| capture: drain of captured rows from the slot ({} keys), msg/s | {} | {} by \
             polling | **{}** |\n",
            r.keys,
            fmt(r.capture_table_drain_per_s, ""),
            fmt(r.capture_polling_drain_per_s, ""),
            fmt(r.capture_table_drain_ratio, "")
        );
    }
    if r.capture_two_slots_drain_per_s.is_some() {
        s += &format!(
            "| capture: drain from two slots at once (two outboxes, a relay each), msg/s | {} \
             | {} from one slot | **{}** |\n",
            fmt(r.capture_two_slots_drain_per_s, ""),
            fmt(r.capture_drain_per_s, ""),
            fmt(r.capture_two_slots_ratio, "")
        );
    }
    if r.capture_table_latency_p50_ms.is_some() {
        s += &format!(
            "| capture: captured row commit → sink at {} msg/s | p50 {} · p99 {} · max {} | | |\n",
            r.rate,
            fmt(r.capture_table_latency_p50_ms, " ms"),
            fmt(r.capture_table_latency_p99_ms, " ms"),
            fmt(r.capture_table_latency_max_ms, " ms")
        );
    }
    if r.capture_latency_p50_ms.is_some() {
        s += &format!(
            "| capture: commit → sink at {} msg/s | p50 {} · p99 {} · max {} | | |\n",
            r.rate,
            fmt(r.capture_latency_p50_ms, " ms"),
            fmt(r.capture_latency_p99_ms, " ms"),
            fmt(r.capture_latency_max_ms, " ms")
        );
    }
    if r.capture_peak_rss_mib.is_some() {
        s += &format!(
            "| capture: relay peak RSS | {} | | |\n",
            fmt(r.capture_peak_rss_mib, " MiB")
        );
    }
    s
}

/// A ratio cell: bold when there is a ratio, empty when the row is a baseline itself.
fn bold(ratio: Option<f64>) -> String {
    ratio.map_or_else(String::new, |v| format!("**{}**", fmt(Some(v), "")))
}

/// The ratio named `"{numerator}/…"`, with its denominator's name.
fn ratio_of(ratios: &BTreeMap<String, f64>, numerator: usize) -> Option<(&str, f64)> {
    ratios.iter().find_map(|(name, v)| {
        let (a, b) = name.split_once('/')?;
        (a.parse() == Ok(numerator)).then_some((b, *v))
    })
}

type ChartResult = Result<(), Box<dyn std::error::Error>>;

fn latency_chart(path: &Path, r: &Report) -> ChartResult {
    let all = r.series.latency.iter().chain(&r.series.polling_latency);
    let top = all.fold(1.0f64, |m, v| m.max(*v));
    // Log-spaced buckets: wake-up latencies sit at a few ms, polling ones near the interval.
    let buckets = 40;
    let edge = |i: usize| 0.1 * (top / 0.1).powf(i as f64 / buckets as f64);
    let count = |xs: &[f64]| {
        let mut c = vec![0u32; buckets];
        for v in xs {
            let i = ((v.max(0.1) / 0.1).ln() / (top / 0.1).ln() * buckets as f64) as usize;
            c[i.min(buckets - 1)] += 1;
        }
        c
    };
    let (woken, polled) = (count(&r.series.latency), count(&r.series.polling_latency));
    let ymax = woken.iter().chain(&polled).copied().max().unwrap_or(1);
    let root = SVGBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("commit → sink latency, {} ({} msg/s)", r.backend, r.rate),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d((0.1f64..top).log_scale(), 0u32..ymax + ymax / 10 + 1)?;
    chart
        .configure_mesh()
        .x_desc("milliseconds (log scale)")
        .y_desc("messages")
        .draw()?;
    for (counts, color, label) in [(&woken, BLUE, "wake-ups"), (&polled, RED, "polling only")] {
        let points = (0..buckets).map(|i| (edge(i), counts[i]));
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
    }
    chart.configure_series_labels().border_style(BLACK).draw()?;
    root.present()?;
    Ok(())
}

fn drain_chart(path: &Path, r: &Report) -> ChartResult {
    let series = [&r.series.drain, &r.series.raw_drain];
    let xmax = series
        .iter()
        .flat_map(|s| s.last())
        .fold(0.1f64, |m, (t, _)| m.max(*t));
    let root = SVGBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("drain of {} messages, {}", r.messages, r.backend),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(72)
        .build_cartesian_2d(
            0f64..xmax * 1.05,
            0u64..r.messages as u64 + r.messages as u64 / 20,
        )?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("messages drained")
        .draw()?;
    for (s, color, label) in [
        (&r.series.drain, BLUE, "relay → null sink"),
        (&r.series.raw_drain, BLACK, "raw SQL claim + DELETE"),
    ] {
        chart
            .draw_series(LineSeries::new(s.iter().copied(), color.stroke_width(2)))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
    }
    chart.configure_series_labels().border_style(BLACK).draw()?;
    root.present()?;
    Ok(())
}
