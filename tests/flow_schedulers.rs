//! The flow-matching samplers of diffusers' Wan pipelines step as diffusers 0.42.1 does (fixture
//! `wan-tiny/flow_schedulers_io`, made by `tests/fixtures/gen/flow_schedulers.py`): Wan2.1's
//! `UniPCMultistepScheduler` (flow_shift 3, order 2, bh2) and `FlowMatchEulerDiscreteScheduler`
//! (shift 5), 10 steps each on random model outputs.

use v2l_runtime::flow::FlowScheduler;
use v2l_runtime::tensor::Data;
use v2l_runtime::{read_safetensors, Tensor};
use v2l_tests::*;

/// Each step's sample against diffusers'. The schedules are compared exactly; the per-step
/// coefficients go through `ln`/`expm1` of float32 scalars, where torch and Rust's libm may
/// round an ulp apart.
const STEP_REL_L2: f64 = 1e-6;

fn check(prefix: &str, config: &str) {
    let io = read_safetensors(&fixtures().join("wan-tiny/flow_schedulers_io.safetensors")).unwrap();
    let path = fixtures()
        .join("wan-tiny")
        .join(config)
        .join("scheduler_config.json");
    let mut s = FlowScheduler::from_file(&path).unwrap();
    s.set_timesteps(10).unwrap();
    let want_t: Vec<f32> = match &io[&format!("{prefix}_timesteps")].data {
        Data::I64(v) => v.iter().map(|&t| t as f32).collect(),
        Data::F32(v) => v.clone(),
        _ => panic!("timesteps dtype"),
    };
    assert_eq!(s.timesteps(), want_t, "{prefix} timesteps");
    let want_sigmas = io[&format!("{prefix}_sigmas")].as_f32("sigmas").unwrap();
    assert_eq!(s.sigmas(), want_sigmas, "{prefix} sigmas");
    let shape = io["sample"].shape.clone();
    let mut x = io["sample"].as_f32("sample").unwrap().to_vec();
    for i in 0..10 {
        let v = io[&format!("model_output{i}")].as_f32("v").unwrap();
        x = s.step(v, &x).unwrap();
        let got = Tensor::f32(shape.clone(), x.clone());
        assert_close(
            &format!("{prefix}_step{i}"),
            &got,
            &io[&format!("{prefix}_step{i}")],
            STEP_REL_L2,
        );
    }
    assert!(
        s.step(&x, &x).is_err(),
        "{prefix}: a step past the end is an error"
    );
}

#[test]
fn unipc_flow_steps_match_diffusers() {
    check("unipc", "scheduler_unipc");
}

#[test]
fn flow_match_euler_steps_match_diffusers() {
    check("euler", "scheduler_flow_euler");
}
