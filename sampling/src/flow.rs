//! The flow-matching samplers of diffusers' Wan pipelines (diffusers 0.42.1), for inference:
//! `FlowMatchEulerDiscreteScheduler` (static `shift`) and `UniPCMultistepScheduler` in its flow
//! mode (`prediction_type: flow_prediction`, `use_flow_sigmas`, `flow_shift`; Wan2.1's own
//! `scheduler_config.json`), with the same arithmetic as diffusers.
//!
//! Precision follows diffusers' code: schedules are computed in float64 numpy and rounded to
//! float32 (`torch.from_numpy(...).to(float32)`, `astype(np.float32)`), except that the Euler
//! scheduler's `sigma_min` comes from its float32 training schedule; every per-step coefficient
//! is a float32 0-dim tensor op (`log`, `expm1`, products in Python's left-to-right order), and
//! updates are float32 element-wise in the same order. The one place the libraries may differ by
//! an ulp is `ln`/`expm1` of those scalars (torch's vectorised math vs Rust's libm).

use std::path::Path;

use serde::Deserialize;

use crate::{Result, SamplingError};

/// The `scheduler_config.json` fields these samplers read (others are ignored; the unsupported
/// settings that change the arithmetic are refused by name).
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct FlowConfig {
    #[serde(rename = "_class_name")]
    pub class_name: String,
    pub num_train_timesteps: usize,
    /// Euler: `shift`; UniPC: `flow_shift`.
    pub shift: Option<f64>,
    pub flow_shift: Option<f64>,
    pub use_dynamic_shifting: bool,
    pub use_flow_sigmas: bool,
    pub prediction_type: String,
    pub solver_order: usize,
    pub solver_type: String,
    pub predict_x0: bool,
    pub lower_order_final: bool,
    pub final_sigmas_type: String,
    pub disable_corrector: Vec<usize>,
    pub thresholding: bool,
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    pub use_beta_sigmas: bool,
    pub shift_terminal: Option<f64>,
    pub invert_sigmas: bool,
    pub stochastic_sampling: bool,
}

impl Default for FlowConfig {
    fn default() -> Self {
        FlowConfig {
            class_name: String::new(),
            num_train_timesteps: 1000,
            shift: None,
            flow_shift: None,
            use_dynamic_shifting: false,
            use_flow_sigmas: false,
            prediction_type: "epsilon".into(),
            solver_order: 2,
            solver_type: "bh2".into(),
            predict_x0: true,
            lower_order_final: true,
            final_sigmas_type: "zero".into(),
            disable_corrector: Vec::new(),
            thresholding: false,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            shift_terminal: None,
            invert_sigmas: false,
            stochastic_sampling: false,
        }
    }
}

/// A flow-matching sampler: `set_timesteps`, then `step` once per timestep in order.
#[derive(Clone, Debug)]
pub enum FlowScheduler {
    Euler(FlowEuler),
    UniPc(UniPc),
}

impl FlowScheduler {
    /// The length of the training schedule (`num_train_timesteps`): the most steps it takes.
    pub fn train_timesteps(&self) -> usize {
        match self {
            FlowScheduler::Euler(e) => e.train,
            FlowScheduler::UniPc(u) => u.train,
        }
    }

    /// From a diffusers `scheduler_config.json` (`_class_name` picks the sampler).
    pub fn from_file(path: &Path) -> Result<FlowScheduler> {
        let text = v2l_contracts::input::read_text(path, v2l_contracts::input::InputKind::Record)
            .map_err(|e| SamplingError::io(path, e))?;
        let cfg: FlowConfig = serde_json::from_str(&text).map_err(|e| SamplingError::BadFile {
            path: path.into(),
            message: e.to_string(),
        })?;
        Self::new(&cfg).map_err(|message| SamplingError::BadFile {
            path: path.into(),
            message,
        })
    }

    /// The sampler `cfg` describes, or the first setting it does not support.
    pub fn new(cfg: &FlowConfig) -> std::result::Result<FlowScheduler, String> {
        let refuse = |name: &str, on: bool| match on {
            true => Err(format!(
                "field `{name}` is not supported by v2l's flow samplers"
            )),
            false => Ok(()),
        };
        refuse("use_dynamic_shifting", cfg.use_dynamic_shifting)?;
        refuse("use_karras_sigmas", cfg.use_karras_sigmas)?;
        refuse("use_exponential_sigmas", cfg.use_exponential_sigmas)?;
        refuse("use_beta_sigmas", cfg.use_beta_sigmas)?;
        refuse(
            "shift_terminal",
            cfg.shift_terminal.is_some_and(|s| s != 0.0),
        )?;
        refuse("thresholding", cfg.thresholding)?;
        if cfg.num_train_timesteps == 0 {
            return Err("field `num_train_timesteps`: must be at least 1".into());
        }
        match cfg.class_name.as_str() {
            "FlowMatchEulerDiscreteScheduler" => {
                refuse("invert_sigmas", cfg.invert_sigmas)?;
                refuse("stochastic_sampling", cfg.stochastic_sampling)?;
                Ok(FlowScheduler::Euler(FlowEuler::new(
                    cfg.num_train_timesteps,
                    cfg.shift.unwrap_or(1.0),
                )))
            }
            "UniPCMultistepScheduler" => {
                if !cfg.use_flow_sigmas || cfg.prediction_type != "flow_prediction" {
                    return Err("UniPCMultistepScheduler is supported in its flow mode only \
                         (`use_flow_sigmas: true`, `prediction_type: flow_prediction`), as Wan ships it"
                        .into());
                }
                if !cfg.predict_x0 || !(1..=3).contains(&cfg.solver_order) {
                    return Err("field `predict_x0` must be true and `solver_order` 1 to 3".into());
                }
                let bh2 = match cfg.solver_type.as_str() {
                    "bh2" | "midpoint" | "heun" | "logrho" => true,
                    "bh1" => false,
                    other => return Err(format!("field `solver_type`: `{other}` is not bh1 or bh2")),
                };
                let zero_final = match cfg.final_sigmas_type.as_str() {
                    "zero" => true,
                    "sigma_min" => false,
                    other => return Err(format!("field `final_sigmas_type`: `{other}`")),
                };
                Ok(FlowScheduler::UniPc(UniPc {
                    train: cfg.num_train_timesteps,
                    shift: cfg.flow_shift.unwrap_or(1.0),
                    order: cfg.solver_order,
                    bh2,
                    lower_order_final: cfg.lower_order_final,
                    zero_final,
                    disable_corrector: cfg.disable_corrector.clone(),
                    ..UniPc::default()
                }))
            }
            other => Err(format!(
                "`_class_name` `{other}`: expected FlowMatchEulerDiscreteScheduler or UniPCMultistepScheduler"
            )),
        }
    }

    pub fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        if steps == 0 {
            return Err(SamplingError::Invalid {
                what: "steps".into(),
                message: "must be at least 1".into(),
            });
        }
        match self {
            FlowScheduler::Euler(s) => s.set_timesteps(steps),
            FlowScheduler::UniPc(s) => s.set_timesteps(steps),
        }
        Ok(())
    }

    /// The DiT's timestep at each step (UniPC's are whole numbers, as diffusers truncates them).
    pub fn timesteps(&self) -> Vec<f32> {
        match self {
            FlowScheduler::Euler(s) => s.timesteps.clone(),
            FlowScheduler::UniPc(s) => s.timesteps.iter().map(|&t| t as f32).collect(),
        }
    }

    /// `num_inference_steps + 1` sigmas, the last the final one.
    pub fn sigmas(&self) -> &[f32] {
        match self {
            FlowScheduler::Euler(s) => &s.sigmas,
            FlowScheduler::UniPc(s) => &s.sigmas,
        }
    }

    /// One step from the model's flow prediction at the current step; steps go in order.
    pub fn step(&mut self, model_output: &[f32], sample: &[f32]) -> Result<Vec<f32>> {
        if model_output.len() != sample.len() {
            return Err(SamplingError::Invalid {
                what: "model_output".into(),
                message: format!(
                    "{} values for a sample of {}",
                    model_output.len(),
                    sample.len()
                ),
            });
        }
        let over = || SamplingError::Internal {
            what: "scheduler".into(),
            message: "stepped past the last timestep (call set_timesteps again)".into(),
        };
        match self {
            FlowScheduler::Euler(s) => s.step(model_output, sample).ok_or_else(over),
            FlowScheduler::UniPc(s) => s.step(model_output, sample).ok_or_else(over),
        }
    }
}

/// `FlowMatchEulerDiscreteScheduler` with a static shift: `x ← x + (σ_next − σ)·v`.
#[derive(Clone, Debug)]
pub struct FlowEuler {
    train: usize,
    shift: f64,
    /// The end of the float32 training schedule, as diffusers keeps it (`sigmas[-1].item()`).
    sigma_min: f64,
    pub timesteps: Vec<f32>,
    pub sigmas: Vec<f32>,
    index: usize,
}

impl FlowEuler {
    fn new(train: usize, shift: f64) -> FlowEuler {
        // __init__: sigmas = linspace(1, T, T)[::-1] / T in float32, shifted in float32.
        let s = shift as f32;
        let last = 1.0f32 / train as f32;
        let shifted = s * last / (1.0 + (s - 1.0) * last);
        FlowEuler {
            train,
            shift,
            sigma_min: f64::from(shifted),
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            index: 0,
        }
    }

    fn set_timesteps(&mut self, steps: usize) {
        let t = self.train as f64;
        // sigma_max is 1 (shift(1) = 1); both ends go through the shift again, as in diffusers.
        let ts = crate::scheduler::np_linspace_f64(t, self.sigma_min * t, steps);
        let k = self.shift;
        self.sigmas = ts
            .iter()
            .map(|&x| {
                let s = x / t;
                (k * s / (1.0 + (k - 1.0) * s)) as f32
            })
            .collect();
        self.timesteps = self.sigmas.iter().map(|&s| s * self.train as f32).collect();
        self.sigmas.push(0.0);
        self.index = 0;
    }

    fn step(&mut self, v: &[f32], x: &[f32]) -> Option<Vec<f32>> {
        let (s, next) = (
            *self.sigmas.get(self.index)?,
            *self.sigmas.get(self.index + 1)?,
        );
        let dt = next - s;
        self.index += 1;
        Some(x.iter().zip(v).map(|(x, v)| x + dt * v).collect())
    }
}

/// `UniPCMultistepScheduler` in flow mode (`predict_x0`): the UniP predictor with the UniC
/// corrector, `solver_order` previous data predictions, B(h) = e^h − 1 (bh2) or h (bh1).
#[derive(Clone, Debug, Default)]
pub struct UniPc {
    train: usize,
    shift: f64,
    order: usize,
    bh2: bool,
    lower_order_final: bool,
    zero_final: bool,
    disable_corrector: Vec<usize>,
    pub timesteps: Vec<i64>,
    pub sigmas: Vec<f32>,
    index: usize,
    /// Data predictions x0 of the last `order` steps, oldest first.
    outputs: Vec<Vec<f32>>,
    last_sample: Option<Vec<f32>>,
    this_order: usize,
    lower_order_nums: usize,
}

/// λ(σ) = ln(1 − σ) − ln σ in float32, as torch computes it on 0-dim tensors.
fn lambda(sigma: f32) -> f32 {
    (1.0 - sigma).ln() - sigma.ln()
}

/// Solves `a · x = b` (n ≤ 3) by Gaussian elimination with partial pivoting, as LAPACK's
/// `sgesv` does for `torch.linalg.solve`.
#[allow(clippy::indexing_slicing)] // `a` is n × n and `b` n long, both built by this module
fn solve(mut a: Vec<Vec<f32>>, mut b: Vec<f32>) -> Vec<f32> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&i, &j| {
                let at = |r: usize| {
                    a.get(r)
                        .and_then(|row| row.get(col))
                        .map_or(0.0, |v| v.abs())
                };
                at(i).total_cmp(&at(j))
            })
            .unwrap_or(col);
        a.swap(col, pivot);
        b.swap(col, pivot);
        for row in col + 1..n {
            let f = a[row][col] / a[col][col];
            for k in col..n {
                a[row][k] -= f * a[col][k];
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = vec![0.0f32; n];
    for row in (0..n).rev() {
        let mut s = b[row];
        for k in row + 1..n {
            s -= a[row][k] * x[k];
        }
        x[row] = s / a[row][row];
    }
    x
}

/// The UniP/UniC coefficients shared by predictor and corrector: `(h_phi_1, B_h, R, b)`.
#[allow(clippy::type_complexity)]
fn coefficients(h: f32, rks: &[f32], bh2: bool) -> (f32, f32, Vec<Vec<f32>>, Vec<f32>) {
    let order = rks.len();
    let hh = -h;
    let h_phi_1 = hh.exp_m1();
    let mut h_phi_k = h_phi_1 / hh - 1.0;
    let mut factorial = 1.0f32;
    let b_h = if bh2 { hh.exp_m1() } else { hh };
    let (mut r, mut b) = (Vec::new(), Vec::new());
    for i in 1..=order {
        r.push(rks.iter().map(|rk| rk.powi(i as i32 - 1)).collect());
        b.push(h_phi_k * factorial / b_h);
        factorial *= (i + 1) as f32;
        h_phi_k = h_phi_k / hh - 1.0 / factorial;
    }
    (h_phi_1, b_h, r, b)
}

#[allow(clippy::indexing_slicing)] // indices are the step counter, within `sigmas`
impl UniPc {
    fn set_timesteps(&mut self, steps: usize) {
        let t = self.train as f64;
        let mut sigmas: Vec<f64> = crate::scheduler::np_linspace_f64(1.0, 1.0 / t, steps + 1);
        sigmas.pop();
        let k = self.shift;
        for s in &mut sigmas {
            *s = k * *s / (1.0 + (k - 1.0) * *s);
        }
        if let Some(first) = sigmas.first_mut() {
            if (*first - 1.0).abs() < 1e-6 {
                *first -= 1e-6;
            }
        }
        self.timesteps = sigmas.iter().map(|s| (s * t) as i64).collect();
        let last = if self.zero_final {
            0.0
        } else {
            sigmas.last().copied().unwrap_or(0.0)
        };
        self.sigmas = sigmas.iter().chain([&last]).map(|&s| s as f32).collect();
        self.index = 0;
        self.outputs.clear();
        self.last_sample = None;
        self.this_order = 0;
        self.lower_order_nums = 0;
    }

    fn step(&mut self, v: &[f32], x: &[f32]) -> Option<Vec<f32>> {
        let i = self.index;
        if i + 1 >= self.sigmas.len() {
            return None;
        }
        // Data prediction x0 = x − σ·v.
        let s = self.sigmas[i];
        let x0: Vec<f32> = x.iter().zip(v).map(|(x, v)| x - s * v).collect();
        let use_corrector =
            i > 0 && !self.disable_corrector.contains(&(i - 1)) && self.last_sample.is_some();
        let sample = match (&self.last_sample, use_corrector) {
            (Some(last), true) => self.corrector(&x0, last, x),
            _ => x.to_vec(),
        };
        self.outputs.push(x0);
        if self.outputs.len() > self.order {
            self.outputs.remove(0);
        }
        let remaining = self.timesteps.len() - i;
        let order = if self.lower_order_final {
            self.order.min(remaining)
        } else {
            self.order
        };
        self.this_order = order.min(self.lower_order_nums + 1);
        let next = self.predictor(&sample);
        self.last_sample = Some(sample);
        if self.lower_order_nums < self.order {
            self.lower_order_nums += 1;
        }
        self.index += 1;
        Some(next)
    }

    /// The flow-mode (α = 1 − σ) λ of sigma index `k`, and its α and σ.
    fn at(&self, k: usize) -> (f32, f32, f32) {
        let s = self.sigmas[k];
        (lambda(s), 1.0 - s, s)
    }

    /// Differences `(m_i − m0) / r_i` of earlier predictions and their ratios `r_i`, for
    /// `order − 1` earlier steps; sigma indices `base − i`.
    fn history(
        &self,
        order: usize,
        base: usize,
        lambda_s0: f32,
        h: f32,
    ) -> (Vec<f32>, Vec<Vec<f32>>) {
        let m0 = &self.outputs[self.outputs.len() - 1];
        let (mut rks, mut d1s) = (Vec::new(), Vec::new());
        for k in 1..order {
            let mi = &self.outputs[self.outputs.len() - 1 - k];
            let (lambda_si, _, _) = self.at(base - k);
            let rk = (lambda_si - lambda_s0) / h;
            rks.push(rk);
            d1s.push(mi.iter().zip(m0).map(|(m, m0)| (m - m0) / rk).collect());
        }
        rks.push(1.0);
        (rks, d1s)
    }

    fn predictor(&self, x: &[f32]) -> Vec<f32> {
        let order = self.this_order;
        let i = self.index;
        let (lambda_t, alpha_t, sigma_t) = self.at(i + 1);
        let (lambda_s0, _, sigma_s0) = self.at(i);
        let h = lambda_t - lambda_s0;
        let (rks, d1s) = self.history(order, i, lambda_s0, h);
        let (h_phi_1, b_h, r, b) = coefficients(h, &rks, self.bh2);
        let rhos: Vec<f32> = match d1s.len() {
            0 => Vec::new(),
            1 => vec![0.5],
            n => solve(
                r[..n].iter().map(|row| row[..n].to_vec()).collect(),
                b[..n].to_vec(),
            ),
        };
        let m0 = &self.outputs[self.outputs.len() - 1];
        let (ratio, a_phi, a_b) = (sigma_t / sigma_s0, alpha_t * h_phi_1, alpha_t * b_h);
        (0..x.len())
            .map(|e| {
                let x_t_ = ratio * x[e] - a_phi * m0[e];
                match d1s.is_empty() {
                    true => x_t_,
                    false => {
                        let res = weighted(&rhos, &d1s, e);
                        x_t_ - a_b * res
                    }
                }
            })
            .collect()
    }

    fn corrector(&self, model_t: &[f32], last: &[f32], _this: &[f32]) -> Vec<f32> {
        let order = self.this_order;
        let i = self.index;
        let (lambda_t, alpha_t, sigma_t) = self.at(i);
        let (lambda_s0, _, sigma_s0) = self.at(i - 1);
        let h = lambda_t - lambda_s0;
        let (rks, d1s) = self.history(order, i - 1, lambda_s0, h);
        let (h_phi_1, b_h, r, b) = coefficients(h, &rks, self.bh2);
        let rhos = match order {
            1 => vec![0.5],
            _ => solve(r, b),
        };
        let m0 = &self.outputs[self.outputs.len() - 1];
        let rho_last = rhos.last().copied().unwrap_or(0.5);
        let (ratio, a_phi, a_b) = (sigma_t / sigma_s0, alpha_t * h_phi_1, alpha_t * b_h);
        (0..last.len())
            .map(|e| {
                let x_t_ = ratio * last[e] - a_phi * m0[e];
                let d1_t = model_t[e] - m0[e];
                let corr = match d1s.is_empty() {
                    true => rho_last * d1_t,
                    false => weighted(&rhos[..rhos.len() - 1], &d1s, e) + rho_last * d1_t,
                };
                x_t_ - a_b * corr
            })
            .collect()
    }
}

/// `einsum("k,bkc...->bc...", rhos, D1s)` at element `e`: Σ_k rhos[k]·D1s[k][e], k in order.
#[allow(clippy::indexing_slicing)]
fn weighted(rhos: &[f32], d1s: &[Vec<f32>], e: usize) -> f32 {
    let mut acc = rhos[0] * d1s[0][e];
    for k in 1..rhos.len().min(d1s.len()) {
        acc += rhos[k] * d1s[k][e];
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solve_matches_a_hand_solution_with_pivoting() {
        // [[1, 1], [3, 1]] x = [3, 5] → x = [1, 2]; the pivot is the 3.
        let x = solve(vec![vec![1.0, 1.0], vec![3.0, 1.0]], vec![3.0, 5.0]);
        assert!(
            (x[0] - 1.0).abs() < 1e-6 && (x[1] - 2.0).abs() < 1e-6,
            "{x:?}"
        );
    }

    #[test]
    fn unsupported_settings_are_refused_by_name() {
        let cfg = FlowConfig {
            class_name: "UniPCMultistepScheduler".into(),
            use_flow_sigmas: true,
            prediction_type: "flow_prediction".into(),
            use_karras_sigmas: true,
            ..FlowConfig::default()
        };
        let e = FlowScheduler::new(&cfg).unwrap_err();
        assert!(e.contains("use_karras_sigmas"), "{e}");
        let cfg = FlowConfig {
            class_name: "UniPCMultistepScheduler".into(),
            ..FlowConfig::default()
        };
        assert!(FlowScheduler::new(&cfg).unwrap_err().contains("flow mode"));
    }
}
