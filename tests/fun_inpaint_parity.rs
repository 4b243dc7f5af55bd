//! VideoX-Fun's `CogVideoXFunInpaintPipeline` parts (the Video2LoRA release's backbone) against
//! the authors' own classes (fixture `cogvideox-fun-inp-tiny`): the plain DDIM sampler
//! (`DDIM_Origin`), the numpy RoPE grid, the Fun VAE's decode batching and the 33-channel DiT.

use std::path::PathBuf;

use v2l_runtime::scheduler::{DdimScheduler, Sampler, SchedulerConfig};
use v2l_runtime::tensor::Data;
use v2l_runtime::Tensor;
use v2l_tests::*;

/// Exactness bound for the float32 scheduler step (the issue's ≤ 1e-6).
const EXACT_REL_L2: f64 = 1e-6;

pub fn fun() -> PathBuf {
    fixtures().join("cogvideox-fun-inp-tiny")
}

fn fun_io(name: &str) -> std::collections::BTreeMap<String, Tensor> {
    v2l_runtime::read_safetensors(&fun().join(name)).expect("fixture file")
}

fn plain_ddim() -> DdimScheduler {
    let cfg = SchedulerConfig::from_file(fun().join("scheduler/scheduler_config.json")).unwrap();
    DdimScheduler::with_sampler(&cfg, Sampler::Ddim).unwrap()
}

#[test]
fn plain_ddim_matches_diffusers_ddim_scheduler() {
    let io = fun_io("scheduler_io.safetensors");
    let mut s = plain_ddim();
    for n in [4usize, 50] {
        s.set_timesteps(n).unwrap();
        let Data::I64(want) = &io[&format!("timesteps_{n}")].data else {
            panic!("timesteps are int64")
        };
        assert_eq!(s.timesteps(), &want[..], "{n} steps");
    }
    let ac: Vec<f32> = s.alphas_cumprod().iter().map(|&a| a as f32).collect();
    let want = io["alphas_cumprod"].as_f32("alphas_cumprod").unwrap();
    assert_close(
        "DDIMScheduler alphas_cumprod",
        &Tensor::f32(vec![ac.len()], ac),
        &Tensor::f32(vec![want.len()], want.to_vec()),
        EXACT_REL_L2,
    );
    s.set_timesteps(4).unwrap();
    let (x, m) = (&io["step_sample"], &io["step_model_output"]);
    let (xs, ms) = (x.as_f32("x").unwrap(), m.as_f32("m").unwrap());
    for &t in s.timesteps() {
        let got = Tensor::f32(x.shape.clone(), s.step(ms, t, xs).unwrap());
        assert_close(
            &format!("DDIMScheduler step at t={t}"),
            &got,
            &io[&format!("step_prev_sample_t{t}")],
            EXACT_REL_L2,
        );
    }
    // `DDIMScheduler` has no `snr_shift_scale`: a shifted config gives it the same schedule,
    // while `CogVideoXDDIMScheduler` moves (CogVideoX-2B's configs set 3.0).
    let mut cfg =
        SchedulerConfig::from_file(fun().join("scheduler/scheduler_config.json")).unwrap();
    cfg.snr_shift_scale = 3.0;
    let shifted = DdimScheduler::with_sampler(&cfg, Sampler::Ddim).unwrap();
    assert_eq!(shifted.alphas_cumprod(), s.alphas_cumprod());
    let cog = DdimScheduler::new(&cfg).unwrap();
    let moved = cog.alphas_cumprod()[500] / s.alphas_cumprod()[500];
    eprintln!("CogVideoXDDIMScheduler with snr_shift_scale 3: alphas_cumprod[500] × {moved:.3}");
    assert!((moved - 1.0).abs() > 0.1);
}
