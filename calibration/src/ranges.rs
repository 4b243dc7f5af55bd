//! Activation ranges over calibration samples, and the int8 scales they give.

use std::collections::BTreeMap;

/// How a range becomes a scale.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Method {
    /// The largest |x| seen: nothing clips, rare outliers spend the int8 steps.
    MinMax,
    /// The given percentile of |x| (e.g. 99.99): the rare largest values clip, the rest
    /// quantise finer.
    Percentile(f64),
}

impl Method {
    /// `minmax` or `percentile:<p>` (`percentile` alone is 99.99).
    pub fn parse(s: &str) -> Option<Method> {
        match s.split_once(':') {
            None if s == "minmax" => Some(Method::MinMax),
            None if s == "percentile" => Some(Method::Percentile(99.99)),
            Some(("percentile", p)) => p
                .parse::<f64>()
                .ok()
                .filter(|p| *p > 0.0 && *p <= 100.0)
                .map(Method::Percentile),
            _ => None,
        }
    }

    pub fn name(self) -> String {
        match self {
            Method::MinMax => "minmax".into(),
            Method::Percentile(p) => format!("percentile:{p}"),
        }
    }
}

/// |x| values kept per tensor for percentiles: every value of small tensors, an even stride of
/// big ones. 65,536 per tensor bounds memory at ~60 MB for a 42-block DiT's 252 linears.
const KEPT: usize = 1 << 16;

/// What was seen of one tensor.
#[derive(Clone, Debug, Default)]
struct Seen {
    amax: f32,
    kept: Vec<f32>,
    count: u64,
}

/// Ranges of named tensors, accumulated sample by sample.
#[derive(Clone, Debug, Default)]
pub struct Ranges {
    seen: BTreeMap<String, Seen>,
}

impl Ranges {
    /// Records one observation of tensor `name`. Non-finite values are ignored (and counted
    /// nowhere): a NaN in a calibration sample must not become a scale.
    pub fn observe(&mut self, name: &str, values: &[f32]) {
        let s = self.seen.entry(name.to_string()).or_default();
        let per_obs = KEPT / 8;
        let stride = values.len().div_ceil(per_obs).max(1);
        for (i, v) in values.iter().enumerate() {
            if !v.is_finite() {
                continue;
            }
            let a = v.abs();
            s.amax = s.amax.max(a);
            if i % stride == 0 {
                s.kept.push(a);
            }
        }
        s.count += 1;
        if s.kept.len() > KEPT {
            // Thin evenly: keep every other value.
            let mut k = 0;
            s.kept.retain(|_| {
                k += 1;
                k % 2 == 1
            });
        }
    }

    /// Observations of `name` so far.
    pub fn count(&self, name: &str) -> u64 {
        self.seen.get(name).map_or(0, |s| s.count)
    }

    /// The symmetric int8 scale of `name` (`range / 127`; 1 for a tensor that was all zeros
    /// or never seen).
    pub fn scale(&self, name: &str, method: Method) -> f32 {
        let Some(s) = self.seen.get(name) else {
            return 1.0;
        };
        let range = match method {
            Method::MinMax => s.amax,
            Method::Percentile(p) => {
                let mut v = s.kept.clone();
                v.sort_by(f32::total_cmp);
                let at = ((p / 100.0) * (v.len().saturating_sub(1)) as f64).round() as usize;
                v.get(at).copied().unwrap_or(s.amax)
            }
        };
        if range > 0.0 {
            range / 127.0
        } else {
            1.0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minmax_takes_the_largest_magnitude_and_percentile_ignores_rare_outliers() {
        let mut r = Ranges::default();
        let mut v: Vec<f32> = (0..10_000)
            .map(|i| (i % 100) as f32 / 100.0 - 0.5)
            .collect();
        v[17] = -40.0; // one outlier
        r.observe("x", &v);
        r.observe("x", &[f32::NAN, 0.25]);
        assert_eq!(r.count("x"), 2);
        assert_eq!(r.scale("x", Method::MinMax), 40.0 / 127.0);
        let p = r.scale("x", Method::Percentile(99.9));
        assert!((p - 0.5 / 127.0).abs() < 0.02 / 127.0, "{p}");
        assert_eq!(r.scale("unseen", Method::MinMax), 1.0);
    }

    #[test]
    fn methods_parse() {
        assert_eq!(Method::parse("minmax"), Some(Method::MinMax));
        assert_eq!(Method::parse("percentile"), Some(Method::Percentile(99.99)));
        assert_eq!(
            Method::parse("percentile:99.9"),
            Some(Method::Percentile(99.9))
        );
        assert_eq!(Method::parse("percentile:0"), None);
        assert_eq!(Method::parse("entropy"), None);
    }
}
