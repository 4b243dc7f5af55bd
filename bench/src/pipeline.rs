//! `v2l-bench pipeline`: latency per stage of the image-to-video pipeline with Video2LoRA.
//!
//! Stages at the model's default sample size (frames, height, width from its configs): VAE
//! encode of the reference clip, hypernetwork, LoRA switch for each strategy (fused: session
//! rebuild; bound: fuse + rebind; unfused: factor upload), one DiT step at batch 2 (as
//! classifier-free guidance runs it), VAE decode, and a whole run. Medians over `repeat` runs,
//! with min and max to show the machine's noise.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use v2l_runtime::engine::Engine;
use v2l_runtime::lora::strategy::Strategy;
use v2l_runtime::lora::AppliedLora;
use v2l_runtime::pipeline::{gaussian_noise, Pipeline, RequestParts};
use v2l_runtime::video::Frames;
use v2l_runtime::Tensor;

use crate::Failure;

/// (median, min, max) in milliseconds.
pub(crate) fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

/// `f`'s result and its wall time in milliseconds.
pub(crate) fn time<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let t = Instant::now();
    let r = f();
    (r, t.elapsed().as_secs_f64() * 1e3)
}

pub fn bench_pipeline(
    engine: &Path,
    repeat: usize,
    steps: usize,
    threads: usize,
    json: bool,
) -> Result<(), Failure> {
    let repeat = repeat.max(1);
    let open = || Engine::open(engine).map_err(Failure::from);
    let dir = open()?;
    let opts = dir.session_options(threads);
    let cfg = |from_dit: bool, key: &str| -> Result<usize, Failure> {
        let c = if from_dit {
            dir.manifest.dit.as_ref().map(|d| &d.config)
        } else {
            dir.manifest.vae.as_ref().map(|v| &v.config)
        };
        c.and_then(|c| c.get(key))
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .ok_or_else(|| Failure::new(format!("engine config has no {key}")))
    };
    let (frames, height, width) = (
        cfg(true, "sample_frames")?,
        cfg(false, "sample_height")?,
        cfg(false, "sample_width")?,
    );
    let text_dim = dir
        .manifest
        .dit
        .as_ref()
        .map(|d| d.text_embed_dim)
        .unwrap_or(4096);
    let text_len = cfg(true, "max_text_seq_length").unwrap_or(226);
    let channels = dir
        .manifest
        .dit
        .as_ref()
        .map(|d| d.in_channels / 2)
        .unwrap_or(16);
    // `bound` feeds f32 weights by reference from the host (fp32 engines), or merges the LoRA
    // on the device (cuda engines at any float precision).
    let merges = dir
        .dit_variant(v2l_contracts::bundle::VariantGraph::LoraMerge)
        .is_some();
    let run: Vec<Strategy> = [Strategy::Fused, Strategy::Bound, Strategy::Unfused]
        .into_iter()
        .filter(|s| {
            *s != Strategy::Bound
                || merges
                || dir.precision() == v2l_runtime::backend::Precision::Fp32
        })
        .collect();

    // Deterministic synthetic inputs of the default size.
    let rgb = |n: usize, seed: u64| -> Frames {
        let noise = gaussian_noise(vec![n * height * width * 3], seed);
        let v = noise
            .as_f32("noise")
            .map(|v| {
                v.iter()
                    .map(|x| ((x * 40.0) + 128.0).clamp(0.0, 255.0) as u8)
                    .collect()
            })
            .unwrap_or_default();
        Frames {
            frames: n,
            height,
            width,
            rgb: v,
        }
    };
    let clip = rgb(frames, 1);
    let (lf, lh, lw) = v2l_contracts::LatentGrid::of_video(frames, height, width).dims();
    let req = RequestParts {
        image: Some(rgb(1, 2)),
        image_embeds: None,
        prompt_embeds: gaussian_noise(vec![1, text_len, text_dim], 3),
        negative_prompt_embeds: gaussian_noise(vec![1, text_len, text_dim], 4),
        frames,
        steps,
        guidance: 6.0,
        noise: gaussian_noise(vec![1, lf, channels, lh, lw], 5),
        lora: v2l_runtime::pipeline::RequestLora::Resident,
        sampler: None,
        inpaint_noise: None,
        seed: None,
        cache: None,
    }
    .check(&dir)?;
    drop(dir);

    let mut stages: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut strategies = BTreeMap::new();
    for strategy in run {
        let (p, load_ms) =
            time(|| Pipeline::load_with_strategy(open()?, &opts, strategy).map_err(Failure::from));
        let mut p = p?;
        stages.entry("load".into()).or_default().push(load_ms);
        // Predict twice to have two LoRAs to switch between.
        let mut loras = Vec::new();
        for seed in [1u64, 9] {
            let c = if seed == 1 {
                clip.clone()
            } else {
                rgb(frames, seed)
            };
            let t = Instant::now();
            let pred = p.predict(&c, 1.0)?;
            let total = t.elapsed().as_secs_f64() * 1e3;
            loras.push(AppliedLora {
                lora: pred.lora.into(),
                source: "bench".into(),
                multiplier: 1.0,
            });
            if strategy == Strategy::Fused {
                stages.entry("predict_lora".into()).or_default().push(total);
            }
        }
        let mut switch = Vec::new();
        for i in 0..repeat.max(2) {
            let (r, ms) = time(|| p.set_lora(Some(&loras[i % 2])));
            r?;
            switch.push(ms);
        }
        let mut totals = Vec::new();
        let mut gens = Vec::new();
        for _ in 0..repeat {
            let (g, ms) = time(|| p.generate(&req, &mut |_, _| true));
            let g = g?;
            totals.push(ms);
            gens.push(g.timings.ms);
        }
        let col = |k: &str| {
            gens.iter()
                .filter_map(|t| t.get(k).copied())
                .collect::<Vec<_>>()
        };
        strategies.insert(
            strategy.name(),
            (stats(switch), stats(col("dit_step")), stats(totals.clone())),
        );
        if strategy == Strategy::Fused {
            for k in ["vae_encode", "dit_step", "vae_decode"] {
                stages.insert(
                    if k == "vae_encode" {
                        "vae_encode_first_frame".into()
                    } else {
                        k.to_string()
                    },
                    col(k),
                );
            }
            stages.insert("total".into(), totals);
        }
    }

    // Reference-clip VAE encode and hypernetwork alone.
    let mut p = Pipeline::load(open()?, &opts)?;
    let mut enc = Vec::new();
    let mut hyp = Vec::new();
    for _ in 0..repeat {
        let (pred, ms) = time(|| p.predict(&clip, 1.0));
        let pred = pred?;
        let mut vae = v2l_runtime::vae::Vae::load(p.engine(), &opts)?;
        let (_, e) = time(|| vae.encode(&clip.to_unit_video()?));
        enc.push(e);
        hyp.push((ms - e).max(0.0));
        let _: &Tensor = &pred.hyper_weights;
    }
    stages.insert("vae_encode".into(), enc);
    stages.insert("hypernet".into(), hyp);

    let med: BTreeMap<String, f64> = stages
        .iter()
        .map(|(k, v)| (k.clone(), stats(v.clone()).0))
        .collect();
    if json {
        let mut s = serde_json::Map::new();
        for (k, v) in &med {
            s.insert(k.clone(), serde_json::json!(v));
        }
        if let Some((sw, _, _)) = strategies.get("fused") {
            s.insert("lora_fuse".into(), serde_json::json!(sw.0));
        }
        let strat: serde_json::Map<String, serde_json::Value> = strategies
            .iter()
            .map(|(k, (sw, step, tot))| (k.to_string(), serde_json::json!({"lora_switch_ms": sw.0, "dit_step_ms": step.0, "total_ms": tot.0})))
            .collect();
        println!(
            "{}",
            serde_json::json!({"stages_ms": s, "strategies": strat, "peak_rss_mb": crate::own_peak_rss_mb(),
                "size": {"frames": frames, "height": height, "width": width, "steps": steps}, "repeat": repeat})
        );
        return Ok(());
    }
    println!("pipeline latency, {frames} frames {width}x{height}, {steps} steps, median of {repeat} (min..max)");
    for (k, v) in &stages {
        let (m, lo, hi) = stats(v.clone());
        println!("  {k:<24} {m:>10.2} ms   ({lo:.2}..{hi:.2})");
    }
    println!("LoRA strategies:               switch          DiT step (batch 2)     whole run");
    for (k, (sw, step, tot)) in &strategies {
        println!(
            "  {k:<10} {:>12.2} ms ({:.2}..{:.2}) {:>9.2} ms ({:.2}..{:.2}) {:>9.1} ms",
            sw.0, sw.1, sw.2, step.0, step.1, step.2, tot.0
        );
    }
    println!("  peak RSS {:.0} MB", crate::own_peak_rss_mb());
    Ok(())
}
