//! `CogVideoXDDIMScheduler` (diffusers 0.42.1) for inference: the noise schedule, the inference
//! timesteps and the deterministic (eta = 0) DDIM update, with the same arithmetic as diffusers.
//! The same type also runs diffusers' plain `DDIMScheduler` on that config ([`Sampler::Ddim`],
//! VideoX-Fun's `DDIM_Origin`): a float32 schedule, the zero-SNR rescale on the betas, no SNR
//! shift, and the textbook update through `pred_original_sample` and `pred_epsilon`.
//!
//! Precision follows what diffusers' torch code does:
//! - `scaled_linear` betas come from a float64 `torch.linspace` (squared), so `alphas_cumprod` and
//!   every per-step coefficient are float64; `linear` betas are a float32 `torch.linspace`, so the
//!   whole schedule and the coefficients are float32 (the cumulative product accumulates in
//!   float64 and rounds each element, as torch's CPU `cumprod` does).
//! - In `step`, the 0-dim coefficient tensors are cast to float32 when they meet the float32
//!   sample, and the update is evaluated as separate float32 multiplies/adds (no fused ops).
//! - Timesteps are computed the way numpy does (`np.arange` with a float step fills
//!   `start + i * delta`, `np.round` rounds half to even, `//` is integer division).
//!
//! One known last-bit difference: torch's `sqrt` runs through MKL's vector sqrt, which is not
//! always correctly rounded. Where it is one ulp off (4 of the 1000 square roots of the fixture's
//! zero-SNR schedule) this module's correctly rounded `sqrt` gives an `alphas_cumprod` entry a
//! few f64 ulps (≤ 4e-16 relative) away from diffusers'; the float32 step coefficients derived
//! from them are unaffected in practice.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{Result, SamplingError};
pub use v2l_contracts::Sampler;

/// `scheduler_config.json` of a diffusers `CogVideoXDDIMScheduler` (missing fields take diffusers'
/// defaults; fields this inference path does not use are ignored).
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    /// `"scaled_linear"` or `"linear"`.
    pub beta_schedule: String,
    /// Must be null: explicit betas are not supported.
    pub trained_betas: Option<serde_json::Value>,
    /// Must be false.
    pub clip_sample: bool,
    pub set_alpha_to_one: bool,
    pub steps_offset: i64,
    /// `"epsilon"`, `"v_prediction"` or `"sample"`.
    pub prediction_type: String,
    /// `"leading"`, `"trailing"` or `"linspace"`.
    pub timestep_spacing: String,
    pub rescale_betas_zero_snr: bool,
    pub snr_shift_scale: f64,
}

impl Default for SchedulerConfig {
    /// diffusers' `CogVideoXDDIMScheduler.__init__` defaults.
    fn default() -> Self {
        SchedulerConfig {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.0120,
            beta_schedule: "scaled_linear".into(),
            trained_betas: None,
            clip_sample: true,
            set_alpha_to_one: true,
            steps_offset: 0,
            prediction_type: "epsilon".into(),
            timestep_spacing: "leading".into(),
            rescale_betas_zero_snr: false,
            snr_shift_scale: 3.0,
        }
    }
}

impl SchedulerConfig {
    /// Reads and checks a diffusers `scheduler_config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = v2l_contracts::input::read_text(path, v2l_contracts::input::InputKind::Record)
            .map_err(|source| SamplingError::Io {
            path: path.into(),
            source,
        })?;
        Self::from_json_str(&text, path)
    }

    /// Parses and checks the JSON text of a scheduler config; `path` only names it in errors.
    pub fn from_json_str(text: &str, path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        let bad = |message: String| SamplingError::BadFile {
            path: path.clone(),
            message,
        };
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| bad(format!("not a valid JSON scheduler config: {e}")))?;
        let serde_json::Value::Object(map) = &value else {
            return Err(bad("expected a JSON object".into()));
        };
        let cfg = match SchedulerConfig::deserialize(&value) {
            Ok(cfg) => cfg,
            Err(e) => {
                // Name the field at fault: deserialize each entry alone (the others default).
                let culprit = map.iter().find_map(|(k, v)| {
                    let one =
                        serde_json::Value::Object([(k.clone(), v.clone())].into_iter().collect());
                    SchedulerConfig::deserialize(&one)
                        .err()
                        .map(|e| format!("field `{k}`: {e}"))
                });
                return Err(bad(culprit.unwrap_or_else(|| e.to_string())));
            }
        };
        cfg.check().map_err(bad)?;
        Ok(cfg)
    }

    /// The first unsupported setting, as "field `name`: why".
    fn check(&self) -> std::result::Result<Parsed, String> {
        let field = |name: &str, why: String| format!("field `{name}`: {why}");
        if self.num_train_timesteps == 0 {
            return Err(field("num_train_timesteps", "must be at least 1".into()));
        }
        if self.trained_betas.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(field(
                "trained_betas",
                "explicit betas are not supported (use beta_start/beta_end/beta_schedule)".into(),
            ));
        }
        let schedule = match self.beta_schedule.as_str() {
            "scaled_linear" => BetaSchedule::ScaledLinear,
            "linear" => BetaSchedule::Linear,
            other => {
                return Err(field(
                    "beta_schedule",
                    format!(
                        "unsupported value {other:?} (supported: \"scaled_linear\", \"linear\")"
                    ),
                ))
            }
        };
        if self.clip_sample {
            return Err(field(
                "clip_sample",
                "only `false` is supported (CogVideoX configs set it to false)".into(),
            ));
        }
        let prediction = match self.prediction_type.as_str() {
            "epsilon" => Prediction::Epsilon,
            "v_prediction" => Prediction::VPrediction,
            "sample" => Prediction::Sample,
            other => {
                return Err(field(
                    "prediction_type",
                    format!(
                        "unsupported value {other:?} (supported: \"v_prediction\", \"epsilon\", \"sample\")"
                    ),
                ))
            }
        };
        let spacing = match self.timestep_spacing.as_str() {
            "trailing" => Spacing::Trailing,
            "leading" => Spacing::Leading,
            "linspace" => Spacing::Linspace,
            other => {
                return Err(field(
                    "timestep_spacing",
                    format!(
                        "unsupported value {other:?} (supported: \"trailing\", \"leading\", \"linspace\")"
                    ),
                ))
            }
        };
        for (name, v) in [
            ("beta_start", self.beta_start),
            ("beta_end", self.beta_end),
            ("snr_shift_scale", self.snr_shift_scale),
        ] {
            if !v.is_finite() {
                return Err(field(name, format!("must be finite, got {v}")));
            }
        }
        Ok(Parsed {
            schedule,
            prediction,
            spacing,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BetaSchedule {
    ScaledLinear,
    Linear,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Prediction {
    Epsilon,
    VPrediction,
    Sample,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Spacing {
    Trailing,
    Leading,
    Linspace,
}

struct Parsed {
    schedule: BetaSchedule,
    prediction: Prediction,
    spacing: Spacing,
}

/// The deterministic DDIM sampler of `CogVideoXDDIMScheduler`.
#[derive(Clone, Debug)]
pub struct DdimScheduler {
    /// After the SNR shift and (optionally) the zero-terminal-SNR rescale. For a `linear`
    /// schedule these are float32 values held in f64.
    alphas_cumprod: Vec<f64>,
    final_alpha_cumprod: f64,
    timesteps: Vec<i64>,
    num_train_timesteps: usize,
    num_inference_steps: Option<usize>,
    /// True when diffusers holds the schedule in float32 (`linear` betas).
    f32_schedule: bool,
    prediction: Prediction,
    spacing: Spacing,
    steps_offset: i64,
    /// Which diffusers class this reproduces.
    sampler: Sampler,
}

impl DdimScheduler {
    /// `CogVideoXDDIMScheduler` on `cfg`.
    pub fn new(cfg: &SchedulerConfig) -> Result<Self> {
        Self::with_sampler(cfg, Sampler::CogvideoxDdim)
    }

    /// The diffusers class `sampler` names, built from `cfg` as `from_pretrained` does.
    pub fn with_sampler(cfg: &SchedulerConfig, sampler: Sampler) -> Result<Self> {
        let mut s = Self::cogvideox(cfg)?;
        // `CogVideoXDPMScheduler` builds the same schedule as `CogVideoXDDIMScheduler`.
        s.sampler = sampler;
        if sampler == Sampler::Ddim {
            let ac = plain_alphas_cumprod(cfg);
            s.final_alpha_cumprod = if cfg.set_alpha_to_one {
                1.0
            } else {
                ac.first().copied().map_or(1.0, f64::from)
            };
            s.alphas_cumprod = ac.into_iter().map(f64::from).collect();
            s.f32_schedule = true;
            s.sampler = sampler;
        }
        Ok(s)
    }

    fn cogvideox(cfg: &SchedulerConfig) -> Result<Self> {
        let parsed = cfg.check().map_err(|message| SamplingError::Invalid {
            what: "scheduler config".into(),
            message,
        })?;
        let n = cfg.num_train_timesteps;
        let f32_schedule = parsed.schedule == BetaSchedule::Linear;
        let alphas_cumprod: Vec<f64> = match parsed.schedule {
            BetaSchedule::ScaledLinear => {
                // torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=float64) ** 2
                // (Python's `x ** 0.5` is C `pow`; torch's `** 2` is `x * x`).
                let betas: Vec<f64> =
                    linspace_f64(cfg.beta_start.powf(0.5), cfg.beta_end.powf(0.5), n)
                        .into_iter()
                        .map(|b| b * b)
                        .collect();
                let mut acc = 1.0f64;
                let mut ac: Vec<f64> = betas
                    .iter()
                    .map(|b| {
                        acc *= 1.0 - b;
                        acc
                    })
                    .collect();
                // SNR shift: ac / (s + (1 - s) * ac)
                let s = cfg.snr_shift_scale;
                let k = 1.0 - s;
                for a in ac.iter_mut() {
                    *a /= s + k * *a;
                }
                if cfg.rescale_betas_zero_snr {
                    rescale_zero_terminal_snr_f64(&mut ac);
                }
                ac
            }
            BetaSchedule::Linear => {
                // torch.linspace(beta_start, beta_end, n, dtype=float32)
                let betas = linspace_f32(cfg.beta_start as f32, cfg.beta_end as f32, n);
                // cumprod of float32 accumulates in float64 (at::acc_type<float, false>).
                let mut acc = 1.0f64;
                let mut ac: Vec<f32> = betas
                    .iter()
                    .map(|b| {
                        acc *= (1.0f32 - b) as f64;
                        acc as f32
                    })
                    .collect();
                // The Python-float scalars meet a float32 tensor: they are cast to float32.
                let s = cfg.snr_shift_scale as f32;
                let k = (1.0 - cfg.snr_shift_scale) as f32;
                for a in ac.iter_mut() {
                    *a /= k * *a + s;
                }
                if cfg.rescale_betas_zero_snr {
                    rescale_zero_terminal_snr_f32(&mut ac);
                }
                ac.into_iter().map(f64::from).collect()
            }
        };
        let final_alpha_cumprod = if cfg.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod.first().copied().unwrap_or(1.0)
        };
        Ok(DdimScheduler {
            alphas_cumprod,
            final_alpha_cumprod,
            // diffusers' initial value: arange(0, n)[::-1]
            timesteps: (0..n as i64).rev().collect(),
            num_train_timesteps: n,
            num_inference_steps: None,
            f32_schedule,
            prediction: parsed.prediction,
            spacing: parsed.spacing,
            steps_offset: cfg.steps_offset,
            sampler: Sampler::CogvideoxDdim,
        })
    }

    /// Which diffusers class this scheduler reproduces.
    pub fn sampler(&self) -> Sampler {
        self.sampler
    }

    /// Reads `scheduler_config.json` and builds the scheduler.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        Self::new(&SchedulerConfig::from_file(path)?)
    }

    /// Sets the inference timesteps (`scheduler.set_timesteps(steps)`).
    ///
    /// Like diffusers, `trailing` spacing uses numpy's float `arange`, which for a few step counts
    /// (61, 103, 121, …) yields one extra, final timestep of `-1`; it is reproduced as is.
    pub fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        if steps == 0 || steps > self.num_train_timesteps {
            return Err(SamplingError::Invalid {
                what: "num_inference_steps".into(),
                message: format!(
                    "must be between 1 and num_train_timesteps = {}, got {steps}",
                    self.num_train_timesteps
                ),
            });
        }
        self.timesteps = spaced_timesteps(
            self.spacing,
            self.num_train_timesteps,
            steps,
            self.steps_offset,
        );
        self.num_inference_steps = Some(steps);
        Ok(())
    }

    pub fn timesteps(&self) -> &[i64] {
        &self.timesteps
    }

    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    pub fn final_alpha_cumprod(&self) -> f64 {
        self.final_alpha_cumprod
    }

    pub fn num_inference_steps(&self) -> Option<usize> {
        self.num_inference_steps
    }

    /// Standard deviation of the initial noise.
    pub fn init_noise_sigma(&self) -> f32 {
        1.0
    }

    /// `alphas_cumprod[i]` as torch indexes it: a negative index counts from the end, one out
    /// of range is torch's IndexError (here an error naming `what`).
    fn alpha_at(&self, i: i64, what: &str) -> Result<f64> {
        let n = self.num_train_timesteps as i64;
        let k = if i < 0 { i + n } else { i };
        usize::try_from(k)
            .ok()
            .and_then(|k| self.alphas_cumprod.get(k).copied())
            .ok_or_else(|| SamplingError::Invalid {
                what: what.into(),
                message: format!("timestep {i} is out of range for {n} training timesteps"),
            })
    }

    /// What every sampler's step at `t` starts from: `(ᾱ_t, ᾱ_prev, prev_t)` with
    /// `prev_t = t − num_train_timesteps / steps` and `ᾱ_prev = final_alpha_cumprod` before 0.
    fn step_alphas(&self, t: i64, what: &str) -> Result<(f64, f64, i64)> {
        let steps = self
            .num_inference_steps
            .ok_or_else(|| SamplingError::Internal {
                what: what.into(),
                message: "set_timesteps was not called".into(),
            })?;
        let alpha_t = self.alpha_at(t, what)?;
        let prev_t = t - (self.num_train_timesteps / steps) as i64;
        let alpha_prev = if prev_t >= 0 {
            self.alpha_at(prev_t, what)?
        } else {
            self.final_alpha_cumprod
        };
        Ok((alpha_t, alpha_prev, prev_t))
    }

    /// The float32 coefficients `[sqrt(alpha_t), sqrt(1 - alpha_t), a_t, b_t]` at timestep `t`,
    /// computed in the schedule's precision and then rounded, as torch does when the 0-dim
    /// coefficient tensors meet the float32 sample.
    fn coefficients(&self, t: i64) -> Result<[f32; 4]> {
        let (alpha_t, alpha_prev, _) = self.step_alphas(t, "DDIM step")?;
        if self.f32_schedule {
            let (a, ap) = (alpha_t as f32, alpha_prev as f32);
            let beta = 1.0 - a;
            let a_t = ((1.0 - ap) / (1.0 - a)).sqrt();
            let b_t = ap.sqrt() - a.sqrt() * a_t;
            Ok([a.sqrt(), beta.sqrt(), a_t, b_t])
        } else {
            let (a, ap) = (alpha_t, alpha_prev);
            let beta = 1.0 - a;
            let a_t = ((1.0 - ap) / (1.0 - a)).sqrt();
            let b_t = ap.sqrt() - a.sqrt() * a_t;
            Ok([a.sqrt() as f32, beta.sqrt() as f32, a_t as f32, b_t as f32])
        }
    }

    /// One DDIM step with eta = 0: `scheduler.step(model_output, t, sample).prev_sample`.
    ///
    /// An error if `set_timesteps` was not called, if the slices differ in length, or if `t` is
    /// outside `[-num_train_timesteps, num_train_timesteps)` (torch would raise an IndexError).
    pub fn step(&self, model_output: &[f32], t: i64, sample: &[f32]) -> Result<Vec<f32>> {
        if model_output.len() != sample.len() {
            return Err(SamplingError::Invalid {
                what: "DDIM step".into(),
                message: format!(
                    "model_output has {} values, sample {}",
                    model_output.len(),
                    sample.len()
                ),
            });
        }
        match self.sampler {
            Sampler::Ddim => return self.step_plain(model_output, t, sample),
            Sampler::Dpm => {
                return Err(SamplingError::Invalid {
                    what: "DPM step".into(),
                    message:
                        "the dpm sampler steps with `step_dpm` (it needs the previous x̂₀ and noise)"
                            .into(),
                })
            }
            Sampler::CogvideoxDdim => {}
        }
        let [sqrt_a, sqrt_b, a_t, b_t] = self.coefficients(t)?;
        let prediction = self.prediction;
        Ok(model_output
            .iter()
            .zip(sample)
            .map(|(&m, &x)| {
                // Each product/sum rounds to float32 separately, as torch's elementwise ops do.
                let x0 = match prediction {
                    Prediction::Epsilon => (x - sqrt_b * m) / sqrt_a,
                    Prediction::VPrediction => sqrt_a * x - sqrt_b * m,
                    Prediction::Sample => m,
                };
                a_t * x + b_t * x0
            })
            .collect())
    }
}

impl DdimScheduler {
    /// `DDIMScheduler.step` with eta = 0, every 0-dim coefficient a float32 tensor:
    /// `prev = √ᾱ_prev · x̂₀ + √(1 − ᾱ_prev) · ε̂`.
    fn step_plain(&self, model_output: &[f32], t: i64, sample: &[f32]) -> Result<Vec<f32>> {
        let (a, ap, _) = self.step_alphas(t, "DDIM step")?;
        let (a, ap) = (a as f32, ap as f32);
        let (sa, sb) = (a.sqrt(), (1.0 - a).sqrt());
        // std_dev_t = eta · √variance = 0, so the direction's coefficient is √(1 − ᾱ_prev − 0).
        let (sap, dir) = (ap.sqrt(), (1.0 - ap - 0.0).sqrt());
        let prediction = self.prediction;
        Ok(model_output
            .iter()
            .zip(sample)
            .map(|(&m, &x)| {
                let (x0, eps) = match prediction {
                    Prediction::Epsilon => ((x - sb * m) / sa, m),
                    Prediction::VPrediction => (sa * x - sb * m, sa * m + sb * x),
                    Prediction::Sample => (m, (x - sa * m) / sb),
                };
                sap * x0 + dir * eps
            })
            .collect())
    }
}

/// One step of `CogVideoXDPMScheduler` and what the next step needs.
pub struct DpmStep {
    /// `prev_sample`.
    pub prev_sample: Vec<f32>,
    /// `pred_original_sample` (x̂₀), the next step's `old_pred_original_sample`.
    pub pred_original: Vec<f32>,
}

impl DdimScheduler {
    /// `CogVideoXDPMScheduler.step(model_output, old_pred_original_sample, t, t_back, sample)`:
    /// DPM-Solver++ in λ = log √(ᾱ / (1 − ᾱ)), first order on the first and the last step,
    /// second order (with `old_x0` from the step at `t_back`) between. It draws one noise tensor
    /// per step, a second one on second-order steps (the first is then unused, as in diffusers):
    /// `noise(k)` gives draw `k` of this step, `sample.len()` standard normal values.
    ///
    /// The coefficients are computed in float64 (diffusers' `scaled_linear` schedule is float64)
    /// and meet the float32 tensors as float32, one rounding per elementwise operation.
    pub fn step_dpm(
        &self,
        model_output: &[f32],
        t: i64,
        t_back: Option<i64>,
        sample: &[f32],
        old_x0: Option<&[f32]>,
        noise: &mut dyn FnMut(usize) -> Vec<f32>,
    ) -> Result<DpmStep> {
        let bad = |message: String| SamplingError::Invalid {
            what: "DPM step".into(),
            message,
        };
        if model_output.len() != sample.len() || old_x0.is_some_and(|o| o.len() != sample.len()) {
            return Err(bad(format!(
                "model_output has {} values, sample {}",
                model_output.len(),
                sample.len()
            )));
        }
        let (a, ap, prev_t) = self.step_alphas(t, "DPM step")?;
        let back = t_back.map(|tb| self.alpha_at(tb, "DPM step")).transpose()?;
        let lambda = |x: f64| (x / (1.0 - x)).sqrt().ln();
        let h = lambda(ap) - lambda(a);
        let m0 = (((1.0 - ap) / (1.0 - a)).sqrt() * (-h).exp()) as f32;
        let m1 = ((-2.0 * h).exp_m1() * ap.sqrt()) as f32;
        let mn = ((1.0 - ap).sqrt() * (1.0 - (-2.0 * h).exp()).sqrt()) as f32;
        let (sa, sb) = (a.sqrt() as f32, (1.0 - a).sqrt() as f32);
        let x0: Vec<f32> = model_output
            .iter()
            .zip(sample)
            .map(|(&m, &x)| match self.prediction {
                Prediction::Epsilon => (x - sb * m) / sa,
                Prediction::VPrediction => sa * x - sb * m,
                Prediction::Sample => m,
            })
            .collect();
        let advance = |d: &[f32], z: &[f32]| -> Vec<f32> {
            sample
                .iter()
                .zip(d)
                .zip(z)
                .map(|((&x, &d), &z)| (m0 * x - m1 * d) + mn * z)
                .collect()
        };
        let checked = |z: Vec<f32>| -> Result<Vec<f32>> {
            if z.len() == sample.len() {
                Ok(z)
            } else {
                Err(bad(format!(
                    "the step noise has {} values, sample {}",
                    z.len(),
                    sample.len()
                )))
            }
        };
        let first = checked(noise(0))?;
        let prev_sample = match (old_x0, back) {
            (Some(old), Some(ab)) if prev_t >= 0 => {
                let r = (lambda(a) - lambda(ab)) / h;
                let (m2, m3) = ((1.0 + 1.0 / (2.0 * r)) as f32, (1.0 / (2.0 * r)) as f32);
                let d: Vec<f32> = x0.iter().zip(old).map(|(&x, &o)| m2 * x - m3 * o).collect();
                advance(&d, &checked(noise(1))?)
            }
            _ => advance(&x0, &first),
        };
        Ok(DpmStep {
            prev_sample,
            pred_original: x0,
        })
    }
}

/// `DDIMScheduler.__init__`'s `alphas_cumprod` (float32): betas from a float32 `linspace`
/// (squared for `scaled_linear`), the zero-SNR rescale applied to the betas, then the
/// cumulative product of `1 − β` (accumulated in float64, each element rounded, as torch's CPU
/// `cumprod` does). `snr_shift_scale` is not a `DDIMScheduler` field: it is ignored.
fn plain_alphas_cumprod(cfg: &SchedulerConfig) -> Vec<f32> {
    let n = cfg.num_train_timesteps;
    let mut betas: Vec<f32> = if cfg.beta_schedule == "linear" {
        linspace_f32(cfg.beta_start as f32, cfg.beta_end as f32, n)
    } else {
        linspace_f32(
            cfg.beta_start.powf(0.5) as f32,
            cfg.beta_end.powf(0.5) as f32,
            n,
        )
        .into_iter()
        .map(|b| b * b)
        .collect()
    };
    let cumprod = |alphas: &[f32]| -> Vec<f32> {
        let mut acc = 1.0f64;
        alphas
            .iter()
            .map(|&a| {
                acc *= f64::from(a);
                acc as f32
            })
            .collect()
    };
    if cfg.rescale_betas_zero_snr {
        let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
        let mut bar = cumprod(&alphas);
        rescale_zero_terminal_snr_f32(&mut bar);
        // alphas = ᾱ[i] / ᾱ[i-1], the first ᾱ[0]; betas = 1 − alphas.
        betas = bar
            .iter()
            .enumerate()
            .map(|(i, &b)| match i.checked_sub(1).and_then(|j| bar.get(j)) {
                Some(&prev) => 1.0 - b / prev,
                None => 1.0 - b,
            })
            .collect();
    }
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    cumprod(&alphas)
}

/// `rescale_zero_terminal_snr` on float64 `alphas_cumprod`.
fn rescale_zero_terminal_snr_f64(ac: &mut [f64]) {
    let mut s: Vec<f64> = ac.iter().map(|a| a.sqrt()).collect();
    let (Some(&s0), Some(&st)) = (s.first(), s.last()) else {
        return;
    };
    let r = s0 / (s0 - st);
    for v in s.iter_mut() {
        *v -= st;
        *v *= r;
    }
    for (a, v) in ac.iter_mut().zip(s) {
        *a = v * v;
    }
}

/// `rescale_zero_terminal_snr` on float32 `alphas_cumprod`.
fn rescale_zero_terminal_snr_f32(ac: &mut [f32]) {
    let mut s: Vec<f32> = ac.iter().map(|a| a.sqrt()).collect();
    let (Some(&s0), Some(&st)) = (s.first(), s.last()) else {
        return;
    };
    let r = s0 / (s0 - st);
    for v in s.iter_mut() {
        *v -= st;
        *v *= r;
    }
    for (a, v) in ac.iter_mut().zip(s) {
        *a = v * v;
    }
}

/// torch's CPU `linspace` in float64: the first half counts up from `start`, the second half
/// down from `end`.
fn linspace_f64(start: f64, end: f64, steps: usize) -> Vec<f64> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f64;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                start + step * i as f64
            } else {
                end - step * (steps - i - 1) as f64
            }
        })
        .collect()
}

/// torch's CPU `linspace` in float32 (same scheme as [`linspace_f64`]).
pub(crate) fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                start + step * i as f32
            } else {
                end - step * (steps - i - 1) as f32
            }
        })
        .collect()
}

/// `np.arange(start, stop, step)` for float64: length `ceil((stop - start) / step)`, then
/// `start`, `start + step`, and `start + i * delta` with `delta = (start + step) - start`.
fn np_arange_f64(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    let len = if len.is_finite() && len > 0.0 {
        len as usize
    } else {
        0
    };
    let mut out = Vec::with_capacity(len);
    if len >= 1 {
        out.push(start);
    }
    if len >= 2 {
        out.push(start + step);
    }
    let delta = (start + step) - start;
    for i in 2..len {
        out.push(start + i as f64 * delta);
    }
    out
}

/// `np.linspace(start, stop, num)` (endpoint=True) for float64.
pub(crate) fn np_linspace_f64(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut y: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    if let Some(last) = y.last_mut() {
        *last = stop;
    }
    y
}

/// diffusers' `set_timesteps` arithmetic (numpy semantics; `np.round` is half-to-even).
fn spaced_timesteps(spacing: Spacing, train: usize, steps: usize, offset: i64) -> Vec<i64> {
    match spacing {
        Spacing::Linspace => np_linspace_f64(0.0, (train - 1) as f64, steps)
            .into_iter()
            .rev()
            .map(|v| v.round_ties_even() as i64)
            .collect(),
        Spacing::Leading => {
            let ratio = (train / steps) as i64; // integer division
            (0..steps as i64)
                .rev()
                .map(|i| i * ratio + offset)
                .collect()
        }
        Spacing::Trailing => {
            let ratio = train as f64 / steps as f64; // true division
            np_arange_f64(train as f64, 0.0, -ratio)
                .into_iter()
                .map(|v| v.round_ties_even() as i64 - 1)
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn trailing_spacing() {
        let t = |n| spaced_timesteps(Spacing::Trailing, 1000, n, 0);
        assert_eq!(t(4), vec![999, 749, 499, 249]);
        assert_eq!(t(1), vec![999]);
        // 1000 / 3 is not exact: numpy fills 1000, 666.67, 333.33 -> rounded, minus one.
        assert_eq!(t(3), vec![999, 666, 332]);
        let t50 = t(50);
        assert_eq!(t50.len(), 50);
        assert_eq!(t50[0], 999);
        assert_eq!(t50[49], 19);
        assert!(t50.windows(2).all(|w| w[0] - w[1] == 20));
        // np.arange(1000, 0, -1000/61) has 62 elements (ceil(61.000000000000007)): diffusers
        // ends this schedule with a timestep of -1, reproduced here.
        let t61 = t(61);
        assert_eq!(t61.len(), 62);
        assert_eq!(t61[0], 999);
        assert_eq!(t61[61], -1);
        // steps == num_train_timesteps: every timestep.
        assert_eq!(t(1000), (0..1000).rev().collect::<Vec<i64>>());
        // 7 steps: 1000/7 = 142.857...; rounding 857.14, 714.29, ... (half-to-even irrelevant).
        assert_eq!(t(7), vec![999, 856, 713, 570, 428, 285, 142]);
    }

    #[test]
    fn leading_spacing_uses_integer_division() {
        // 1000 // 3 = 333 (not 333.33): 0, 333, 666 reversed, plus the offset.
        assert_eq!(
            spaced_timesteps(Spacing::Leading, 1000, 3, 1),
            vec![667, 334, 1]
        );
        assert_eq!(
            spaced_timesteps(Spacing::Leading, 1000, 4, 0),
            vec![750, 500, 250, 0]
        );
        let t = spaced_timesteps(Spacing::Leading, 1000, 50, 0);
        assert_eq!((t[0], t[49], t.len()), (980, 0, 50));
    }

    #[test]
    fn linspace_spacing_rounds_half_to_even() {
        // np.linspace(0, 999, 7) = 0, 166.5, 333, 499.5, 666, 832.5, 999 -> round half to even.
        assert_eq!(
            spaced_timesteps(Spacing::Linspace, 1000, 7, 0),
            vec![999, 832, 666, 500, 333, 166, 0]
        );
        assert_eq!(
            spaced_timesteps(Spacing::Linspace, 1000, 4, 0),
            vec![999, 666, 333, 0]
        );
        assert_eq!(spaced_timesteps(Spacing::Linspace, 1000, 1, 0), vec![0]);
    }

    #[test]
    fn numpy_arange_length_and_fill() {
        assert_eq!(
            np_arange_f64(1000.0, 0.0, -250.0),
            vec![1000.0, 750.0, 500.0, 250.0]
        );
        let r = 1000.0 / 3.0;
        let v = np_arange_f64(1000.0, 0.0, -r);
        assert_eq!(v.len(), 3);
        let delta = (1000.0 - r) - 1000.0;
        assert_eq!(v[2], 1000.0 + 2.0 * delta);
        assert!(np_arange_f64(0.0, 10.0, -1.0).is_empty());
    }

    #[test]
    fn prev_timestep_uses_integer_division() {
        let cfg = SchedulerConfig {
            clip_sample: false,
            timestep_spacing: "trailing".into(),
            prediction_type: "v_prediction".into(),
            ..Default::default()
        };
        let mut s = DdimScheduler::new(&cfg).unwrap();
        s.set_timesteps(3).unwrap();
        // prev = t - 1000 // 3 = t - 333: with sample = model_output = 0 the output is 0, so
        // check the coefficients directly against the formula.
        let [_, _, a_t, _] = s.coefficients(999).unwrap();
        let (a, ap) = (s.alphas_cumprod[999], s.alphas_cumprod[666]);
        assert_eq!(a_t, ((1.0 - ap) / (1.0 - a)).sqrt() as f32);
        // t = 332: prev = -1 -> final alpha (1.0) -> a_t = 0, b_t = 1.
        let [_, _, a_t, b_t] = s.coefficients(332).unwrap();
        assert_eq!(a_t, 0.0);
        assert_eq!(b_t, 1.0);
    }

    #[test]
    fn misuse_is_an_error_not_a_panic() {
        let cfg = SchedulerConfig {
            clip_sample: false,
            ..Default::default()
        };
        let mut s = DdimScheduler::new(&cfg).unwrap();
        let e = s.step(&[0.0], 999, &[0.0]).unwrap_err().to_string();
        assert!(e.contains("set_timesteps was not called"), "{e}");
        s.set_timesteps(4).unwrap();
        let e = s.step(&[0.0], 1_000_000, &[0.0]).unwrap_err().to_string();
        assert!(e.contains("timestep 1000000 is out of range"), "{e}");
        let e = s.step(&[0.0, 1.0], 999, &[0.0]).unwrap_err().to_string();
        assert!(e.contains("model_output has 2 values, sample 1"), "{e}");
        assert!(
            s.step(&[0.0], -1, &[0.0]).is_ok(),
            "torch indexing: -1 is the last"
        );
    }

    #[test]
    fn scaled_linear_is_f64_linear_is_f32() {
        let base = SchedulerConfig {
            clip_sample: false,
            ..Default::default()
        };
        let s = DdimScheduler::new(&base).unwrap();
        assert!(!s.f32_schedule);
        // Default snr_shift_scale 3: alpha_bar' = a / (3 - 2a) < a.
        assert!(s.alphas_cumprod[500] < 0.5);
        let lin = DdimScheduler::new(&SchedulerConfig {
            beta_schedule: "linear".into(),
            beta_start: 0.0001,
            beta_end: 0.02,
            ..base
        })
        .unwrap();
        assert!(lin.f32_schedule);
        assert!(lin.alphas_cumprod.iter().all(|&a| a == (a as f32) as f64));
    }

    #[test]
    fn torch_linspace_scheme() {
        assert_eq!(linspace_f32(0.0, 3.0, 4), vec![0.0, 1.0, 2.0, 3.0]);
        assert_eq!(linspace_f32(2.0, 5.0, 1), vec![2.0]);
        let v = linspace_f64(0.1, 0.7, 5);
        let step = (0.7 - 0.1) / 4.0;
        assert_eq!(v, vec![0.1, 0.1 + step, 0.7 - step * 2.0, 0.7 - step, 0.7]);
    }
}
