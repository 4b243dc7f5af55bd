//! Step caching (`--cache first-block:T`) against diffusers' First Block Cache on the embedded
//! demo model: fixture `tests/fixtures/cogvideox-effects/fbc_io.safetensors`, made by
//! `tests/fixtures/gen/cogvideox_fbc.py` with `FirstBlockCacheConfig(threshold=T)` on
//! diffusers' CogVideoX I2V pipeline at the demo's settings (17 frames 64×64, 20 DDIM steps,
//! guidance 1), with the base weights and with a reference clip's LiLoRA.

use std::collections::BTreeMap;

use v2l_runtime::engine::Engine;
use v2l_runtime::lora::strategy::Strategy;
use v2l_runtime::pipeline::{Pipeline, RequestLora, RequestParts};
use v2l_runtime::step_cache::StepCache;
use v2l_runtime::{read_safetensors, SessionOptions, Tensor};

use crate::common::CheckOn;
use crate::common::{cogvideox_request, effects_model, engine_of, frames_of};

fn fixture() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/cogvideox-effects")
}

/// diffusers' relative change and v2l's agree to this (both are f32 sums over the first
/// block's residual; the latents they come from agree to ~1e-6).
const CHANGE_REL: f64 = 1e-4;

/// The demo's request (`e2e_io`'s inputs, guidance 1, base weights) over `steps` steps.
fn request(io: &BTreeMap<String, Tensor>, steps: usize) -> RequestParts {
    RequestParts {
        steps,
        guidance: 1.0,
        lora: RequestLora::Base,
        ..cogvideox_request(io)
    }
}

#[test]
fn first_block_cache_skips_and_steps_as_diffusers_does() {
    let d = tempfile::tempdir().unwrap();
    let eng = engine_of(&effects_model(), d.path(), &[]);
    let io = read_safetensors(&fixture().join("e2e_io.safetensors")).unwrap();
    let fbc = read_safetensors(&fixture().join("fbc_io.safetensors")).unwrap();
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture().join("fbc.json")).unwrap()).unwrap();
    let steps = summary["steps"].as_u64().unwrap() as usize;
    // Each run of the fixture: `{run}_t{T}`, at guidance 1 but for the guided run.
    let guided = summary["guided"][0].as_str().unwrap().to_string();
    let guided_scale = summary["guided"][1].as_f64().unwrap() as f32;
    let keys: Vec<(String, String, f64)> = summary["runs"]
        .as_object()
        .unwrap()
        .keys()
        .map(|k| {
            let (run, t) = k.rsplit_once("_t").unwrap();
            (k.clone(), run.to_string(), t.parse().unwrap())
        })
        .collect();
    assert!(
        keys.len() >= 5 && keys.iter().any(|(_, r, _)| *r == guided),
        "{keys:?}"
    );

    // Every LoRA strategy: factors as inputs of the cut graphs (`unfused`), live weights
    // borrowed by them (`bound`), the LoRA fused into the weights each cut graph takes (`fused`).
    for strategy in [Strategy::Unfused, Strategy::Bound, Strategy::Fused] {
        let engine = Engine::open(&eng).unwrap();
        let opts = SessionOptions::default();
        let mut p = Pipeline::load_with_strategy(engine, &opts, strategy).unwrap();
        let label = strategy.name();
        for (key, run, t) in &keys {
            {
                let mut req = request(&io, steps);
                req.cache = Some(StepCache::FirstBlock { threshold: *t });
                if *run == guided {
                    req.guidance = guided_scale;
                } else if run != "base" {
                    req.lora =
                        RequestLora::Reference(frames_of(&io[&format!("{run}_reference_u8")]), 1.0);
                }
                let g = p.generate(&req.on(&p), &mut |_, _| true).unwrap();
                assert_eq!(g.dit_calls, steps);
                let ran: Vec<u8> = g.cache_calls.iter().map(|c| c.ran_blocks as u8).collect();
                let want = fbc[&format!("{key}_computed")].data.le_bytes().to_vec();
                eprintln!(
                    "{label} {key}: {} of {steps} DiT calls skipped (diffusers {})",
                    g.cache_skips(),
                    want.iter().filter(|&&c| c == 0).count()
                );
                assert_eq!(
                    ran, want,
                    "{label} {key}: blocks ran at other steps than diffusers'"
                );
                let change = fbc[&format!("{key}_change")].as_f32("change").unwrap();
                let mut worst = 0f64;
                for (i, (c, &w)) in g.cache_calls.iter().zip(change).enumerate() {
                    match c.change {
                        None => assert_eq!(w, -1.0, "{key}: call {i} had nothing to compare"),
                        Some(ours) => worst = worst.max((ours - w as f64).abs() / w as f64),
                    }
                }
                eprintln!("{label} {key}: relative change within {worst:.2e} of diffusers'");
                assert!(worst <= CHANGE_REL, "{label} {key}: {worst:.2e}");
                let mut worst = 0f64;
                for (i, l) in g.latents_steps.iter().enumerate() {
                    let name = format!("{key}_latents_step{i}");
                    let err = l.rel_l2(&fbc[&name]);
                    assert!(err <= 1e-4, "{label} {name}: relative L2 {err:.3e}");
                    worst = worst.max(err);
                }
                eprintln!("{label} {key}: latents within {worst:.2e} relative L2 at every step");
            }
        }
        // The DiT stays cut; a request without the cache runs every block: diffusers'
        // uncached latents (e2e_io).
        let g = p
            .generate(&request(&io, steps).on(&p), &mut |_, _| true)
            .unwrap();
        assert!(g.cache_calls.is_empty() && g.cache_skips() == 0);
        for (i, l) in g.latents_steps.iter().enumerate() {
            let err = l.rel_l2(&io[&format!("base_latents_step{i}")]);
            assert!(
                err <= 1e-4,
                "{label} uncached step {i}: relative L2 {err:.3e}"
            );
        }
    }
}

/// Wan: diffusers' `WanPipeline` calls the transformer once per guidance branch, each call in
/// its own cache context, so each branch decides on its own (fixture
/// `tests/fixtures/wan-tiny/fbc_io.safetensors`, made by `tests/fixtures/gen/wan_fbc.py`: the
/// tiny T2V pipeline, 10 UniPC steps, guided and unguided, with and without a PEFT LoRA; at
/// T = 0.3476 the two branches decide differently at step 1).
#[test]
fn wan_first_block_cache_decides_per_guidance_branch_as_diffusers_does() {
    use v2l_runtime::lora::{format, AppliedLora};
    let wan = fixture().join("../wan-tiny");
    let d = tempfile::tempdir().unwrap();
    let eng = crate::common::wan_engine(
        d.path(),
        &[
            ("transformer", "transformer"),
            ("vae", "vae"),
            ("scheduler_unipc", "scheduler"),
        ],
    );
    let io = read_safetensors(&wan.join("e2e_io.safetensors")).unwrap();
    let fbc = read_safetensors(&wan.join("fbc_io.safetensors")).unwrap();
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(wan.join("fbc.json")).unwrap()).unwrap();
    let steps = summary["steps"].as_u64().unwrap() as usize;
    let runs = summary["runs"].as_object().unwrap();
    assert!(runs.len() >= 4, "{runs:?}");
    let lora_path = wan.join("lora/pytorch_lora_weights.safetensors");
    let lora = AppliedLora {
        lora: format::read(&lora_path, None).unwrap().into(),
        source: lora_path.clone(),
        multiplier: 1.0,
    };
    let mut split = false;
    for strategy in [Strategy::Unfused, Strategy::Bound, Strategy::Fused] {
        let engine = Engine::open(&eng).unwrap();
        let mut p =
            Pipeline::load_with_strategy(engine, &SessionOptions::default(), strategy).unwrap();
        let label = strategy.name();
        for (key, run) in runs {
            let t: f64 = key.rsplit_once("_t").unwrap().1.parse().unwrap();
            let mut req = crate::common::wan_t2v_request(&io, steps);
            req.guidance = run["guidance"].as_f64().unwrap() as f32;
            req.cache = Some(StepCache::FirstBlock { threshold: t });
            if run["lora"].as_bool().unwrap() {
                req.lora = RequestLora::Loras(vec![lora.clone()]);
            }
            let g = p.generate(&req.on(&p), &mut |_, _| true).unwrap();
            let branches = run["branches"].as_array().unwrap().len();
            assert_eq!(g.dit_calls, steps);
            assert_eq!(g.cache_calls.len(), steps * branches, "{label} {key}");
            let ran: Vec<u8> = g.cache_calls.iter().map(|c| c.ran_blocks as u8).collect();
            let want = fbc[&format!("{key}_computed")].data.le_bytes().to_vec();
            assert_eq!(
                ran, want,
                "{label} {key}: blocks ran at other calls than diffusers'"
            );
            // Some branch-step skipped where the other ran: the per-branch path is exercised.
            split |= want.chunks(branches).any(|s| s.iter().any(|&c| c != s[0]));
            let change = fbc[&format!("{key}_change")].as_f32("change").unwrap();
            let mut worst = 0f64;
            for (c, &w) in g.cache_calls.iter().zip(change) {
                match c.change {
                    None => assert_eq!(w, -1.0, "{label} {key}: nothing to compare"),
                    Some(ours) => worst = worst.max((ours - w as f64).abs() / w as f64),
                }
            }
            assert!(worst <= CHANGE_REL, "{label} {key}: change {worst:.2e}");
            let mut worst_latents = 0f64;
            for (i, l) in g.latents_steps.iter().enumerate() {
                let err = l.rel_l2(&fbc[&format!("{key}_latents_step{i}")]);
                assert!(err <= 1e-4, "{label} {key} step {i}: relative L2 {err:.3e}");
                worst_latents = worst_latents.max(err);
            }
            eprintln!(
                "{label} {key}: {} of {} decisions skipped, as diffusers; change within {worst:.2e}, latents within {worst_latents:.2e}",
                g.cache_skips(),
                g.cache_calls.len()
            );
        }
    }
    assert!(split, "no run had its guidance branches decide differently");
}
