//! `v2l-bench lora-batch`: LoRA factors as DiT inputs at real width, on the CPU.
//!
//! One CogVideoX-5B-width block (the `v2l-bench scale` checkpoint, fp32), one DiT call at the
//! guided batch of two requests (B = 4, 1,378 tokens by default) with two different rank-64
//! LoRAs on every targeted layer:
//! - `unfused`, both LoRAs in one call (factors per sample) — what batching serves;
//! - `fused`, which needs one call per LoRA (B = 2 each) since its weights hold one LoRA;
//! - the base weights at B = 4 (no branches), for the LoRA branches' share of the step.
//!
//! And the switch: `unfused` (copying factors into input buffers, which must not grow with the
//! model beyond the factors) against `fused` (a session build). Medians of `repeat`, with the
//! CPU model and its ISA features beside the figures.

use std::path::PathBuf;
use std::time::Instant;

use v2l_runtime::engine::Engine;
use v2l_runtime::lora::strategy::{DitRunner, Strategy};
use v2l_runtime::Tensor;

use crate::common::{cpu_facts, cpu_line, generated_lora, median_ms};
use crate::pipeline::stats;
use crate::Failure;

/// `v2l-bench lora-batch`'s options.
#[derive(clap::Args, Clone, Debug)]
pub struct LoraBatchBench {
    /// Pixel frames, height and width of the step (9x256x384: 1,378 tokens with the prompt)
    #[arg(long, default_value = "9x256x384")]
    pub size: String,
    /// LoRA rank on every targeted layer
    #[arg(long, default_value_t = 64)]
    pub rank: usize,
    /// ONNX Runtime intra-op threads
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Runs per measurement (medians are reported)
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Scratch directory (shared with `v2l-bench scale`: its one-block checkpoint is reused)
    #[arg(long, default_value = "target/v2l-bench-scale")]
    pub dir: PathBuf,
    #[arg(skip)]
    pub json: bool,
}

/// The batch-2 sample inputs stacked `times` along the batch axis (RoPE tables shared).
fn repeat_batch(
    feed: &[(String, Tensor)],
    times: usize,
) -> Result<std::collections::BTreeMap<String, Tensor>, Failure> {
    use v2l_contracts::io::dit as io;
    let mut out = std::collections::BTreeMap::new();
    for (name, t) in feed {
        let batched =
            [io::HIDDEN_STATES, io::ENCODER_HIDDEN_STATES, io::TIMESTEP].contains(&name.as_str());
        let v = match (&t.data, batched) {
            (_, false) => t.clone(),
            (v2l_runtime::tensor::Data::I64(v), true) => {
                let mut shape = t.shape.clone();
                shape[0] *= times;
                Tensor::i64(shape, v.repeat(times))
            }
            (_, true) => {
                let parts: Vec<Tensor> = std::iter::repeat_n(t.clone(), times).collect();
                Tensor::concat(&parts, 0)?
            }
        };
        out.insert(name.clone(), v);
    }
    Ok(out)
}

pub fn bench_lora_batch(b: &LoraBatchBench) -> Result<(), Failure> {
    let dims: Vec<usize> = b.size.split('x').filter_map(|p| p.parse().ok()).collect();
    let [frames, height, width] = dims[..] else {
        return Err(Failure::usage(format!(
            "--size {}: expected FRAMESxHEIGHTxWIDTH",
            b.size
        )));
    };
    let log = |m: &str| {
        if !b.json {
            eprintln!("{m}");
        }
    };
    let scale = crate::scale::ScaleBench {
        layers: 1,
        precision: "fp32".into(),
        attention: None,
        int8_linears: None,
        calibration_samples: None,
        cases: vec![],
        torch_python: None,
        threads: b.threads,
        repeat: b.repeat,
        dir: b.dir.clone(),
        json: b.json,
        vae_cases: vec![],
        lora_strategies: Vec::new(),
    };
    let (_, engine_dir, _) = crate::scale::prepare(&scale, &log)?;
    let engine = Engine::open(&engine_dir)?;
    let config = crate::scale::cogvideox_5b_config(1)?;
    let feed = v2l_compile::accuracy::dit_sample_inputs(&config, frames, height, width, 226)?;
    let b4 = repeat_batch(&feed, 2)?;
    let b2 = repeat_batch(&feed, 1)?;
    let tokens = 226 + feed[3].1.shape[0];
    let (x, y) = (
        generated_lora(&engine, b.rank, 1)?,
        generated_lora(&engine, b.rank, 2)?,
    );
    let opts = engine.session_options(b.threads);

    log("unfused: X and Y in one call (B = 4)");
    let mut unfused = DitRunner::load(&engine, &opts, Strategy::Unfused)?;
    let samples = [Some(&x), Some(&x), Some(&y), Some(&y)];
    unfused.set_sample_loras(&engine, &samples)?;
    unfused.run(&b4)?; // warm
    let unfused_mixed = median_ms(b.repeat, || {
        unfused.run(&b4).map(drop).map_err(Failure::from)
    })?;
    // The request's constants (text, RoPE) set once as fixed inputs (on a GPU: device-resident,
    // IoBinding's purpose) against passing them with every run, as before.
    type Inputs = std::collections::BTreeMap<String, Tensor>;
    let (constants, per_step): (Inputs, Inputs) = b4.clone().into_iter().partition(|(n, _)| {
        n != v2l_contracts::io::dit::HIDDEN_STATES && n != v2l_contracts::io::dit::TIMESTEP
    });
    unfused.set_constant_inputs(constants)?;
    unfused.run(&per_step)?;
    let unfused_constants = median_ms(b.repeat, || {
        unfused.run(&per_step).map(drop).map_err(Failure::from)
    })?;
    let switch_unfused = median_ms(b.repeat, || {
        unfused
            .set_sample_loras(&engine, &[Some(&y), Some(&y), Some(&x), Some(&x)])
            .map_err(Failure::from)
    })?;
    unfused.set_sample_loras(&engine, &[None])?;
    unfused.run(&b4)?;
    let unfused_none = median_ms(b.repeat, || {
        unfused.run(&b4).map(drop).map_err(Failure::from)
    })?;
    drop(unfused);

    log("fused: one call per LoRA (B = 2 each), and the base at B = 4");
    let mut fused = DitRunner::load(&engine, &opts, Strategy::Fused)?;
    fused.run(&b4)?;
    let base_b4 = median_ms(b.repeat, || fused.run(&b4).map(drop).map_err(Failure::from))?;
    let mut two_calls = Vec::new();
    let mut switch_fused = Vec::new();
    for _ in 0..b.repeat.max(1) {
        let mut total = 0.0;
        for l in [&x, &y] {
            let s = Instant::now();
            fused.set_lora(&engine, Some(l))?;
            switch_fused.push(s.elapsed().as_secs_f64() * 1e3);
            fused.run(&b2)?; // first run after a session build is cold: not the step
            let s = Instant::now();
            fused.run(&b2)?;
            total += s.elapsed().as_secs_f64() * 1e3;
        }
        two_calls.push(total);
    }
    let fused_two = stats(two_calls).0;
    let switch_fused = stats(switch_fused).0;
    let share = (unfused_mixed - base_b4) / unfused_mixed;
    let v = serde_json::json!({
        "cpu": cpu_facts(),
        "threads": b.threads,
        "tokens": tokens,
        "rank": b.rank,
        "batch": 4,
        "unfused_mixed_step_ms": unfused_mixed,
        "unfused_mixed_constants_fixed_ms": unfused_constants,
        "unfused_no_lora_step_ms": unfused_none,
        "fused_two_calls_ms": fused_two,
        "base_step_ms": base_b4,
        "lora_branch_share": share,
        "switch_unfused_ms": switch_unfused,
        "switch_fused_ms": switch_fused,
    });
    if b.json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    let cpu = &v["cpu"];
    println!("{}", cpu_line(cpu, b.threads));
    println!(
        "one 5B-width block, {tokens} tokens, two requests x guidance (B = 4), two rank-{} LoRAs, medians of {}:",
        b.rank, b.repeat
    );
    println!("  unfused, both LoRAs in one call        {unfused_mixed:>9.1} ms");
    println!("  the same, constants set once per request {unfused_constants:>7.1} ms");
    println!("  fused, one call per LoRA (2 x B = 2)   {fused_two:>9.1} ms");
    println!("  base weights, B = 4 (no branches)      {base_b4:>9.1} ms");
    println!("  unfused, zero factors, B = 4           {unfused_none:>9.1} ms");
    println!(
        "  LoRA branches' share of the mixed step {:>9.1} %",
        share * 100.0
    );
    println!("  switch: unfused (factor copy)          {switch_unfused:>9.2} ms");
    println!("  switch: fused (session build)          {switch_fused:>9.1} ms");
    Ok(())
}
