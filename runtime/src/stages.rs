//! What each stage of a request cost: wall milliseconds always, and, when asked for, the
//! stage's own peak RSS.
//!
//! Linux keeps one high-water mark per process (`VmHWM`). To give each stage its own peak, the
//! mark is read at the end of every stage and reset (`/proc/self/clear_refs` ← `5`), so the
//! next stage starts from what is resident then. The largest mark read is kept, so
//! [`process_peak_rss_mb`] stays the whole process's peak after resets. Resetting is
//! process-wide, hence opt-in ([`Timings::with_memory`]): benchmarks turn it on, a server
//! that watches its own peak leaves it off.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

/// The largest high-water mark read before a reset, in kB.
static HIGHEST_KB: AtomicU64 = AtomicU64::new(0);

fn hwm_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0)
}

fn mb(kb: u64) -> f64 {
    kb as f64 * 1024.0 / 1e6
}

/// This process's peak RSS in MB since its `exec`, resets by [`take_stage_peak_mb`]
/// included; 0 where `/proc` is missing.
pub fn process_peak_rss_mb() -> f64 {
    mb(hwm_kb().max(HIGHEST_KB.load(Ordering::Relaxed)))
}

/// The peak RSS in MB since the last call (or `exec`), then a reset of the kernel's mark.
pub fn take_stage_peak_mb() -> f64 {
    let kb = hwm_kb();
    HIGHEST_KB.fetch_max(kb, Ordering::Relaxed);
    // Best effort: where the reset is refused, later stages report the running peak.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    mb(kb)
}

/// Stage name → milliseconds, and → peak RSS in MB when measured.
#[derive(Clone, Debug, Default)]
pub struct Timings {
    pub ms: BTreeMap<String, f64>,
    /// `Some` when each stage's peak is measured.
    pub peak_rss_mb: Option<BTreeMap<String, f64>>,
    /// Each denoising step's milliseconds and, when measured, peak RSS.
    pub steps_ms: Vec<f64>,
    pub steps_peak_rss_mb: Vec<f64>,
}

impl Timings {
    /// Timings that also take each stage's peak RSS (see the module doc).
    pub fn with_memory(memory: bool) -> Timings {
        if memory {
            take_stage_peak_mb();
        }
        Timings {
            peak_rss_mb: memory.then(BTreeMap::new),
            ..Timings::default()
        }
    }

    /// Records the stage that just ended.
    /// Adds `other`'s stages (a front end's own, such as loading and text encoding) to these.
    pub fn merge(&mut self, other: Timings) {
        self.ms.extend(other.ms);
        if let (Some(all), Some(theirs)) = (&mut self.peak_rss_mb, other.peak_rss_mb) {
            all.extend(theirs);
        }
    }

    pub fn insert(&mut self, stage: String, ms: f64) {
        if let Some(p) = &mut self.peak_rss_mb {
            p.insert(stage.clone(), take_stage_peak_mb());
        }
        self.ms.insert(stage, ms);
    }

    /// Marks the end of a denoising step (its peak, when measured).
    pub fn end_step(&mut self) {
        if self.peak_rss_mb.is_some() {
            self.steps_peak_rss_mb.push(take_stage_peak_mb());
        }
    }

    /// Records the denoising loop: each step's milliseconds, `dit_step` as their median, and
    /// as its peak the largest step's.
    pub fn steps(&mut self, ms: Vec<f64>) {
        if let Some(m) = median(ms.clone()) {
            self.ms.insert("dit_step".into(), m);
            if let Some(p) = self
                .peak_rss_mb
                .as_mut()
                .filter(|_| !self.steps_peak_rss_mb.is_empty())
            {
                let top = self.steps_peak_rss_mb.iter().copied().fold(0.0, f64::max);
                p.insert("dit_step".into(), top);
            }
        }
        self.steps_ms = ms;
    }
}

/// The middle value (the upper one of an even count).
/// Milliseconds since `t`, as every stage is recorded.
pub fn ms_since(t: std::time::Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

pub(crate) fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stage_peak_is_its_own_and_the_process_peak_survives_resets() {
        let mut t = Timings::with_memory(true);
        let big = vec![1u8; 300 << 20];
        // Touch every page so the block is resident.
        let touched: u64 = big.iter().step_by(4096).map(|&b| b as u64).sum();
        assert!(touched > 0);
        drop(big);
        t.insert("big".into(), 1.0);
        t.insert("small".into(), 1.0);
        let p = t.peak_rss_mb.as_ref().unwrap();
        if hwm_kb() > 0 {
            assert!(p["big"] > p["small"] + 200.0, "{p:?}");
            assert!(process_peak_rss_mb() >= p["big"]);
        }
    }
}
