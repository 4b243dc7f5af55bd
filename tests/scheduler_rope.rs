//! The DDIM scheduler and the RoPE tables compute what diffusers computes
//! (fixtures `scheduler_io`, `dit_io`).

use v2l_runtime::rope::cogvideox_rope;
use v2l_runtime::scheduler::{DdimScheduler, SchedulerConfig};
use v2l_runtime::tensor::Data;
use v2l_runtime::{RuntimeError, Tensor};
use v2l_tests::*;

/// Exactness bound for the float32 scheduler step and the RoPE tables.
const EXACT_REL_L2: f64 = 1e-6;

fn scheduler() -> DdimScheduler {
    DdimScheduler::from_file(tiny().join("scheduler/scheduler_config.json")).unwrap()
}

fn i64s(t: &Tensor) -> &[i64] {
    match &t.data {
        Data::I64(v) => v,
        other => panic!("expected an int64 tensor, got {other:?}"),
    }
}

/// `alphas_cumprod` as stored (float64; `read_safetensors` would narrow it to f32).
fn alphas_cumprod_f64() -> Vec<f64> {
    let bytes = std::fs::read(tiny().join("scheduler_io.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = st.tensor("alphas_cumprod").unwrap();
    assert_eq!(view.dtype(), safetensors::Dtype::F64);
    view.data()
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn timesteps_match_diffusers() {
    let io = load("scheduler_io.safetensors");
    let mut s = scheduler();
    for n in [4usize, 50] {
        s.set_timesteps(n).unwrap();
        assert_eq!(
            s.timesteps(),
            i64s(&io[&format!("timesteps_{n}")]),
            "{n} steps"
        );
    }
}

#[test]
fn alphas_cumprod_match_diffusers() {
    let want = alphas_cumprod_f64();
    let s = scheduler();
    let got = s.alphas_cumprod();
    assert_eq!(got.len(), want.len());
    let mut max_rel = 0f64;
    let mut max_ulps = 0u64;
    let mut differing = 0;
    for (g, w) in got.iter().zip(&want) {
        if g != w {
            differing += 1;
            max_rel = max_rel.max((g - w).abs() / w.abs());
            max_ulps = max_ulps.max(g.to_bits().abs_diff(w.to_bits()));
        }
    }
    eprintln!(
        "alphas_cumprod: {differing}/{} differ, max {max_ulps} ulp, max relative error {max_rel:.3e}",
        want.len()
    );
    assert!(
        max_rel <= 1e-12,
        "alphas_cumprod: relative error {max_rel:.3e}"
    );
    assert_eq!(got[999], 0.0, "zero terminal SNR");
    assert_eq!(got[999], want[999]);
    assert_eq!(got[0], want[0]);
}

#[test]
fn steps_match_diffusers() {
    let io = load("scheduler_io.safetensors");
    let model_output = io["step_model_output"].as_f32("model output").unwrap();
    let sample = &io["step_sample"];
    let mut s = scheduler();
    s.set_timesteps(4).unwrap();
    assert_eq!(s.init_noise_sigma(), 1.0);
    for &t in s.timesteps() {
        let want = &io[&format!("step_prev_sample_t{t}")];
        let got = Tensor::f32(
            sample.shape.clone(),
            s.step(model_output, t, sample.as_f32("sample").unwrap())
                .unwrap(),
        );
        let bitwise = got == *want;
        eprintln!("step t={t}: bitwise equal: {bitwise}");
        assert_close(&format!("step t={t}"), &got, want, EXACT_REL_L2);
    }
}

#[test]
fn rope_matches_diffusers() {
    let io = load("dit_io.safetensors");
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tiny().join("transformer/config.json")).unwrap(),
    )
    .unwrap();
    let u = |k: &str| cfg[k].as_u64().unwrap() as usize;
    // 64x64 px, 17 frames -> latents 5 x 8 x 8.
    let (cos, sin) = cogvideox_rope(
        u("attention_head_dim"),
        5,
        64 / 8,
        64 / 8,
        u("patch_size"),
        u("sample_height"),
        u("sample_width"),
    )
    .unwrap();
    for (name, got) in [("rope_cos", cos), ("rope_sin", sin)] {
        let want = &io[name];
        assert_eq!(want.shape, vec![80, 16]);
        let w = want.as_f32(name).unwrap();
        let differing = got.iter().zip(w).filter(|(g, w)| g != w).count();
        let max_ulps = got
            .iter()
            .zip(w)
            .map(|(g, w)| g.to_bits().abs_diff(w.to_bits()))
            .max()
            .unwrap_or(0);
        eprintln!(
            "{name}: {differing}/{} values differ, max {max_ulps} ulp",
            w.len()
        );
        let got = Tensor::f32(vec![80, 16], got);
        assert_close(name, &got, want, EXACT_REL_L2);
    }
}

#[test]
fn rope_non_square_shape() {
    // 480x720 px, 49 frames on CogVideoX-5B (head 64, patch 2, base 60x90): 13 x 30 x 45 tokens.
    let (cos, sin) = cogvideox_rope(64, 13, 60, 90, 2, 60, 90).unwrap();
    assert_eq!(cos.len(), 13 * 30 * 45 * 64);
    assert_eq!(sin.len(), cos.len());
    // A grid smaller than, and of another aspect than, the base (crop region inside it).
    let (cos, sin) = cogvideox_rope(32, 3, 12, 20, 2, 8, 8).unwrap();
    assert_eq!(cos.len(), 3 * 6 * 10 * 32);
    assert_eq!(sin.len(), cos.len());
    assert!(cos
        .iter()
        .chain(&sin)
        .all(|v| v.is_finite() && v.abs() <= 1.0));
    // cos² + sin² = 1 everywhere.
    let worst = cos
        .iter()
        .zip(&sin)
        .map(|(c, s)| (c * c + s * s - 1.0).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-6, "cos² + sin² − 1 = {worst}");
}

fn config_error(json: &str) -> String {
    let path = std::path::Path::new("some/scheduler_config.json");
    match SchedulerConfig::from_json_str(json, path) {
        Ok(cfg) => panic!("accepted {cfg:?}"),
        Err(e) => {
            let e = RuntimeError::from(e);
            assert!(matches!(e, RuntimeError::BadFile { .. }), "{e:?}");
            e.to_string()
        }
    }
}

#[test]
fn bad_configs_are_rejected() {
    let base: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tiny().join("scheduler/scheduler_config.json")).unwrap(),
    )
    .unwrap();
    let with = |key: &str, value: serde_json::Value| {
        let mut v = base.clone();
        v[key] = value;
        v.to_string()
    };

    let msg = config_error(&with("beta_schedule", "squaredcos_cap_v2".into()));
    eprintln!("{msg}");
    assert!(
        msg.contains("some/scheduler_config.json") && msg.contains("beta_schedule"),
        "{msg}"
    );
    assert!(msg.contains("squaredcos_cap_v2"), "{msg}");

    let msg = config_error(&with("clip_sample", true.into()));
    eprintln!("{msg}");
    assert!(
        msg.contains("some/scheduler_config.json") && msg.contains("clip_sample"),
        "{msg}"
    );

    let msg = config_error(&with("timestep_spacing", "karras".into()));
    assert!(msg.contains("timestep_spacing"), "{msg}");
    let msg = config_error(&with("prediction_type", "flow".into()));
    assert!(msg.contains("prediction_type"), "{msg}");
    let msg = config_error(&with("num_train_timesteps", "many".into()));
    eprintln!("{msg}");
    assert!(msg.contains("num_train_timesteps"), "{msg}");

    // The file itself: a missing file names the path.
    let err = SchedulerConfig::from_file("no/such/scheduler_config.json").unwrap_err();
    assert!(
        err.to_string().contains("no/such/scheduler_config.json"),
        "{err}"
    );

    // Step counts.
    let mut s = scheduler();
    for bad in [0usize, 1001] {
        let msg = s.set_timesteps(bad).unwrap_err().to_string();
        eprintln!("{msg}");
        assert!(msg.contains("num_inference_steps"), "{msg}");
    }
    s.set_timesteps(1000).unwrap();
    assert_eq!(s.timesteps().len(), 1000);

    // DdimScheduler::new checks a config built in code too.
    let cfg = SchedulerConfig {
        beta_schedule: "cosine".into(),
        clip_sample: false,
        ..Default::default()
    };
    let msg = DdimScheduler::new(&cfg).unwrap_err().to_string();
    assert!(msg.contains("beta_schedule"), "{msg}");
}
