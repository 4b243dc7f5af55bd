//! `v2l-bench cache`: what a step the First Block Cache skips costs against one it runs, on a
//! CogVideoX-5B-shaped DiT at real widths (a synthetic checkpoint of `--layers` blocks, as
//! `v2l-bench scale` makes it), in one process:
//!
//! - the DiT whole (one session), the baseline;
//! - the same DiT cut into head, blocks and output sessions, every block run (the cut's cost);
//! - a call whose blocks after the first are skipped (head and output only).
//!
//! From the per-block time (cut − skipped, over the blocks after the first) it derives the
//! DiT time of a 42-block model for a share of skipped calls: the measured part of the real
//! job's estimate with the cache.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use v2l_runtime::engine::Engine;
use v2l_runtime::lora::strategy::DitRunner;
use v2l_runtime::step_cache::FirstBlockState;
use v2l_runtime::Tensor;

use crate::scale::{cogvideox_5b_config, prepare, ScaleBench};
use crate::Failure;

/// `v2l-bench cache`'s options.
#[derive(clap::Args, Clone, Debug)]
pub struct CacheBench {
    /// Transformer blocks of the synthetic DiT (at least 2: the first block and one to skip)
    #[arg(long, default_value_t = 3)]
    pub layers: usize,
    /// Engine precision (`v2l-compile --precision`)
    #[arg(long, default_value = "int8")]
    pub precision: String,
    /// Pixel frames, height and width of the sample
    #[arg(long, value_delimiter = ',', default_value = "9,256,384")]
    pub size: Vec<usize>,
    /// ONNX Runtime intra-op threads
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Calls per measurement (medians are reported)
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Blocks of the model the estimate is for (CogVideoX-5B: 42)
    #[arg(long, default_value_t = 42)]
    pub target_layers: usize,
    /// Scratch directory (checkpoint, export, engine)
    #[arg(long, default_value = "target/v2l-bench-cache")]
    pub dir: PathBuf,
    #[arg(skip)]
    pub json: bool,
}

fn fail(what: impl std::fmt::Display) -> Failure {
    Failure::new(what)
}

/// Median and spread (min, max) of `runs` calls of `f`, in ms.
fn time(
    runs: usize,
    mut f: impl FnMut() -> Result<BTreeMap<String, Tensor>, Failure>,
) -> Result<(f64, f64, f64, Tensor), Failure> {
    let mut ms = Vec::with_capacity(runs);
    let mut last = None;
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        let out = f()?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        last = out.get("sample").cloned();
    }
    ms.sort_by(f64::total_cmp);
    let sample = last.ok_or_else(|| fail("the DiT returned no `sample`"))?;
    Ok((ms[ms.len() / 2], ms[0], ms[ms.len() - 1], sample))
}

pub fn bench_cache(b: &CacheBench) -> Result<(), Failure> {
    let [frames, h, w] = b.size[..] else {
        return Err(fail("--size takes frames,height,width"));
    };
    if b.layers < 2 {
        return Err(fail(
            "--layers: at least 2 (the first block and one to skip)",
        ));
    }
    let log = |m: &str| {
        if !b.json {
            eprintln!("cache: {m}");
        }
    };
    std::fs::create_dir_all(&b.dir).map_err(|e| fail(format!("{}: {e}", b.dir.display())))?;
    let cpu = crate::common::cpu_facts();
    if !b.json {
        println!("{}", crate::common::cpu_line(&cpu, b.threads));
    }
    let scale = ScaleBench {
        layers: b.layers,
        precision: b.precision.clone(),
        attention: None,
        int8_linears: None,
        calibration_samples: None,
        cases: vec![(frames, h, w)],
        torch_python: None,
        threads: b.threads,
        repeat: b.repeat,
        dir: b.dir.clone(),
        json: b.json,
        vae_cases: Vec::new(),
        lora_strategies: Vec::new(),
    };
    let (_, engine_dir, _) = prepare(&scale, &log)?;
    let config = cogvideox_5b_config(b.layers)?;
    let feed = v2l_compile::accuracy::dit_sample_inputs(&config, frames, h, w, 226)?;
    let tokens = 226 + feed[3].1.shape[0];
    let inputs: BTreeMap<String, Tensor> = feed.into_iter().collect();
    let engine = Engine::open(&engine_dir)?;
    let opts = engine.session_options(b.threads);
    let strategy = engine
        .bundle
        .as_ref()
        .map(|x| x.lora_strategy)
        .unwrap_or_default();
    log(&format!(
        "{frames}x{h}x{w} ({tokens} tokens), {} blocks, {} engine, {} strategy",
        b.layers,
        b.precision,
        strategy.name()
    ));
    let mut dit = DitRunner::load(&engine, &opts, strategy)?;
    dit.run(&inputs)?; // warm-up
    let (whole, whole_lo, whole_hi, whole_out) = time(b.repeat, || Ok(dit.run(&inputs)?))?;
    log("cutting into head, blocks and output");
    let t = Instant::now();
    dit.cut_for_caching(&engine)?;
    let cut_s = t.elapsed().as_secs_f64();
    dit.run(&inputs)?;
    let (cut, cut_lo, cut_hi, cut_out) = time(b.repeat, || Ok(dit.run(&inputs)?))?;
    // A threshold no change reaches: the first call runs the blocks, every later one skips.
    let mut state = FirstBlockState::new(f64::MAX);
    dit.run_cached(&inputs, &mut state)?;
    let (skip, skip_lo, skip_hi, _) = time(b.repeat, || Ok(dit.run_cached(&inputs, &mut state)?))?;
    let skipped = state.skips();
    if skipped != b.repeat.max(1) {
        return Err(fail(format!(
            "{skipped} of {} cached calls skipped",
            b.repeat.max(1)
        )));
    }
    let same = cut_out.rel_l2(&whole_out);
    let per_block = (cut - skip) / (b.layers - 1) as f64;
    let n = b.target_layers.max(2);
    let full_n = skip + per_block * (n - 1) as f64;
    let shares = [0.0, 0.25, 0.4, 0.45, 0.65];
    if b.json {
        println!(
            "{}",
            serde_json::json!({
                "cpu": cpu, "threads": b.threads, "layers": b.layers, "precision": b.precision,
                "strategy": strategy.name(), "frames": frames, "height": h, "width": w,
                "tokens": tokens, "whole_ms": whole, "cut_ms": cut, "skipped_ms": skip,
                "cut_load_s": cut_s, "cut_vs_whole_rel_l2": same, "per_block_ms": per_block,
                "target_layers": n, "target_call_ms": full_n, "target_skipped_call_ms": skip,
            })
        );
        return Ok(());
    }
    println!(
        "{frames}x{h}x{w} ({tokens} tokens, batch 2), {} blocks, {} engine, {} strategy; medians of {} calls (min–max)",
        b.layers,
        b.precision,
        strategy.name(),
        b.repeat.max(1)
    );
    println!("  DiT whole (one session):            {whole:9.1} ms ({whole_lo:.1}–{whole_hi:.1})");
    println!("  DiT cut, every block run:           {cut:9.1} ms ({cut_lo:.1}–{cut_hi:.1}); output vs whole: relative L2 {same:.1e}; cutting took {cut_s:.1} s");
    println!(
        "  DiT cut, blocks after the first skipped: {skip:6.1} ms ({skip_lo:.1}–{skip_hi:.1})"
    );
    println!(
        "  one block: {per_block:.1} ms (cut − skipped, over {} blocks)",
        b.layers - 1
    );
    println!(
        "  at {n} blocks: a call {full_n:.0} ms, a skipped call {skip:.0} ms ({:.1} %)",
        100.0 * skip / full_n
    );
    for s in shares {
        println!(
            "    {:>3.0} % of calls skipped: DiT time × {:.3}",
            100.0 * s,
            1.0 - s + s * skip / full_n
        );
    }
    Ok(())
}
