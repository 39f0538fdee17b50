//! Resource guards: a size that would need more memory than the machine has is refused before
//! anything is allocated, with the estimate in the message (instead of an abort deep inside an
//! allocation).

use crate::{Error, Result};

/// Memory available to a new allocation, in bytes (Linux `MemAvailable`; `None` elsewhere, where
/// nothing is refused).
pub fn available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// Refuses `what` when its estimated `bytes` exceed the memory available; `how` says what the
/// estimate counts and `fix` what to change.
pub fn ensure_fits(what: &str, bytes: u128, how: &str, fix: &str) -> Result<()> {
    // Below this, no machine is short of memory: skip reading /proc/meminfo, so that guards on
    // hot paths (every attention call) cost nothing at ordinary sizes.
    const ALWAYS_FITS: u128 = 256 << 20;
    if bytes < ALWAYS_FITS {
        return Ok(());
    }
    match available_bytes() {
        Some(avail) if bytes > avail as u128 => Err(Error::Config(format!(
            "{what} needs about {} ({how}), but {} of memory is available; {fix}",
            human(bytes),
            human(avail as u128)
        ))),
        _ => Ok(()),
    }
}

/// `bytes` as GB/MB with one decimal.
pub fn human(bytes: u128) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.1} GB", b / 1e9)
    } else {
        format!("{:.1} MB", b / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_impossible_size_is_refused_with_the_estimate() {
        if available_bytes().is_none() {
            return; // not Linux: nothing is refused
        }
        let e = ensure_fits("a test buffer", 1u128 << 80, "2^80 bytes", "ask for less")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("a test buffer needs about") && e.contains("ask for less"),
            "{e}"
        );
        assert!(ensure_fits("a small buffer", 1024, "1 KB", "").is_ok());
    }
}
