//! Peak resident memory of this process, from Linux's `/proc`: the high-water mark can be
//! reset, so each scenario reports its own peak.

/// Resets the peak so that [`peak_mib`] covers only what runs from now on. Best effort: on a
/// system without `/proc/self/clear_refs` the peak covers the whole process.
pub fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The peak resident set size since the last reset, in MiB; `None` where `/proc` is missing.
pub fn peak_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_peak_grows_with_what_the_process_touches() {
        super::reset_peak();
        let before = super::peak_mib().expect("Linux /proc");
        let block = std::hint::black_box(vec![1u8; 64 << 20]);
        let after = super::peak_mib().expect("Linux /proc");
        assert!(after >= before + 32.0, "{before} MiB → {after} MiB");
        drop(block);
    }
}
