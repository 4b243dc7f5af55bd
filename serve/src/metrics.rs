//! `/metrics` in the Prometheus text format: queue depth, stage latency histograms, LoRA cache
//! hits and bytes, errors by kind. Hand-written (a few counters do not need a metrics crate).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// Histogram bucket bounds in seconds: 1 ms to 10 min.
const BUCKETS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0, 600.0,
];

#[derive(Clone, Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (c, b) in self.counts.iter_mut().zip(BUCKETS) {
            if seconds <= b {
                *c += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }
}

#[derive(Default)]
struct Inner {
    stages: BTreeMap<String, Histogram>,
    errors: BTreeMap<String, u64>,
    requests: BTreeMap<(String, u16), u64>,
}

/// What the server counts.
#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

/// Gauges read at scrape time.
pub struct Gauges {
    pub queue_depth: usize,
    pub running: usize,
    pub cache_entries: usize,
    pub cache_bytes: u64,
    pub cache_capacity: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    /// The workers' kept factor inputs (`--factor-cache-mb`), summed.
    pub factor_cache: v2l_runtime::lora::factors::FactorCacheStats,
    pub jobs: BTreeMap<String, u64>,
    /// Bytes under `--state-dir`.
    pub state_bytes: u64,
    /// Stored LoRAs (`<state>/loras`) and their bytes, against `--keep-loras`/`--keep-lora-mb`.
    pub stored_loras: (usize, u64),
    /// Worker threads still taking jobs.
    pub workers: usize,
}

impl Metrics {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A job's stage timings (milliseconds, as `Generation::timings` has them).
    pub fn stages(&self, timings: &BTreeMap<String, f64>) {
        let mut inner = self.inner();
        for (stage, ms) in timings {
            inner
                .stages
                .entry(stage.clone())
                .or_default()
                .observe(ms / 1e3);
        }
    }

    /// One error of `kind` (a bad field, a failed job, a full queue, ...).
    pub fn error(&self, kind: &str) {
        *self.inner().errors.entry(kind.to_string()).or_default() += 1;
    }

    /// One HTTP response of `route` (the route pattern, not the path) with `status`.
    pub fn request(&self, route: &str, status: u16) {
        *self
            .inner()
            .requests
            .entry((route.to_string(), status))
            .or_default() += 1;
    }

    pub fn render(&self, g: &Gauges) -> String {
        let inner = self.inner();
        let mut s = String::new();
        let scalars: [(&str, &str, &str, String); 15] = [
            (
                "v2l_queue_depth",
                "Jobs waiting for a worker.",
                "gauge",
                g.queue_depth.to_string(),
            ),
            (
                "v2l_jobs_running",
                "Jobs running now.",
                "gauge",
                g.running.to_string(),
            ),
            (
                "v2l_workers",
                "Worker threads still taking jobs (0: the server cannot run jobs).",
                "gauge",
                g.workers.to_string(),
            ),
            (
                "v2l_lora_cache_entries",
                "LoRAs held by the cache.",
                "gauge",
                g.cache_entries.to_string(),
            ),
            (
                "v2l_lora_cache_bytes",
                "Bytes of LoRA factors held by the cache.",
                "gauge",
                g.cache_bytes.to_string(),
            ),
            (
                "v2l_lora_cache_capacity_bytes",
                "The cache's bound (--lora-cache-mb).",
                "gauge",
                g.cache_capacity.to_string(),
            ),
            (
                "v2l_state_dir_bytes",
                "Bytes under --state-dir: the job database, results, stored LoRAs.",
                "gauge",
                g.state_bytes.to_string(),
            ),
            (
                "v2l_stored_loras",
                "LoRAs stored under --state-dir (bounded by --keep-loras).",
                "gauge",
                g.stored_loras.0.to_string(),
            ),
            (
                "v2l_stored_lora_bytes",
                "Bytes of stored LoRAs (bounded by --keep-lora-mb).",
                "gauge",
                g.stored_loras.1.to_string(),
            ),
            (
                "v2l_lora_cache_hits_total",
                "LoRA lookups served from the cache.",
                "counter",
                g.cache_hits.to_string(),
            ),
            (
                "v2l_lora_cache_misses_total",
                "LoRA lookups that had to predict or load.",
                "counter",
                g.cache_misses.to_string(),
            ),
            (
                "v2l_factor_cache_entries",
                "LoRA layouts whose DiT factor inputs the workers keep (--factor-cache-mb).",
                "gauge",
                g.factor_cache.entries.to_string(),
            ),
            (
                "v2l_factor_cache_bytes",
                "Bytes of kept DiT factor inputs (device memory on a GPU).",
                "gauge",
                g.factor_cache.bytes.to_string(),
            ),
            (
                "v2l_factor_cache_hits_total",
                "LoRA switches that handed kept factor inputs to the DiT.",
                "counter",
                g.factor_cache.hits.to_string(),
            ),
            (
                "v2l_factor_cache_misses_total",
                "LoRA switches that laid factor inputs out.",
                "counter",
                g.factor_cache.misses.to_string(),
            ),
        ];
        for (name, help, kind, v) in scalars {
            header(&mut s, name, help, kind);
            let _ = writeln!(s, "{name} {v}");
        }
        header(
            &mut s,
            "v2l_jobs",
            "Jobs in the state database by state.",
            "gauge",
        );
        for (state, n) in &g.jobs {
            let _ = writeln!(s, "v2l_jobs{{state=\"{state}\"}} {n}");
        }
        header(&mut s, "v2l_errors_total", "Errors by kind.", "counter");
        for (kind, n) in &inner.errors {
            let _ = writeln!(s, "v2l_errors_total{{kind=\"{kind}\"}} {n}");
        }
        header(
            &mut s,
            "v2l_http_responses_total",
            "HTTP responses by route and status.",
            "counter",
        );
        for ((route, status), n) in &inner.requests {
            let _ = writeln!(
                s,
                "v2l_http_responses_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        header(
            &mut s,
            "v2l_stage_seconds",
            "Job stage latency.",
            "histogram",
        );
        for (stage, h) in &inner.stages {
            for (c, b) in h.counts.iter().zip(BUCKETS) {
                let _ = writeln!(
                    s,
                    "v2l_stage_seconds_bucket{{stage=\"{stage}\",le=\"{b}\"}} {c}"
                );
            }
            let _ = writeln!(
                s,
                "v2l_stage_seconds_bucket{{stage=\"{stage}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(s, "v2l_stage_seconds_sum{{stage=\"{stage}\"}} {}", h.sum);
            let _ = writeln!(
                s,
                "v2l_stage_seconds_count{{stage=\"{stage}\"}} {}",
                h.count
            );
        }
        s
    }
}

/// `# HELP` and `# TYPE` lines of a metric family.
fn header(s: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_errors_counted_by_kind() {
        let m = Metrics::default();
        m.stages(&BTreeMap::from([("denoise".to_string(), 30.0)]));
        m.stages(&BTreeMap::from([("denoise".to_string(), 3000.0)]));
        m.error("bad_field");
        m.error("bad_field");
        m.request("/v1/videos", 202);
        let text = m.render(&Gauges {
            queue_depth: 2,
            running: 1,
            cache_entries: 0,
            cache_bytes: 0,
            cache_capacity: 10,
            cache_hits: 5,
            cache_misses: 1,
            factor_cache: v2l_runtime::lora::factors::FactorCacheStats {
                entries: 2,
                bytes: 1024,
                hits: 7,
                misses: 3,
            },
            jobs: BTreeMap::from([("queued".to_string(), 2)]),
            state_bytes: 4096,
            stored_loras: (3, 300),
            workers: 1,
        });
        for line in [
            "v2l_queue_depth 2",
            "v2l_lora_cache_hits_total 5",
            "v2l_factor_cache_hits_total 7",
            "v2l_factor_cache_bytes 1024",
            "v2l_state_dir_bytes 4096",
            "v2l_stored_loras 3",
            "v2l_stored_lora_bytes 300",
            "v2l_jobs{state=\"queued\"} 2",
            "v2l_errors_total{kind=\"bad_field\"} 2",
            "v2l_http_responses_total{route=\"/v1/videos\",status=\"202\"} 1",
            "v2l_stage_seconds_bucket{stage=\"denoise\",le=\"0.01\"} 0",
            "v2l_stage_seconds_bucket{stage=\"denoise\",le=\"0.05\"} 1",
            "v2l_stage_seconds_bucket{stage=\"denoise\",le=\"5\"} 2",
            "v2l_stage_seconds_bucket{stage=\"denoise\",le=\"+Inf\"} 2",
            "v2l_stage_seconds_count{stage=\"denoise\"} 2",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing `{line}` in\n{text}"
            );
        }
    }
}
