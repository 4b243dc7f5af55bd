//! `v2l-bench hypernet`: the effect hypernetworks at their real sizes, with generated weights.
//!
//! Prompt2Effect at the paper's size (d 2048, 14 block pairs, 256 latents, rank 128, 1.54 B
//! parameters) over Wan2.1-I2V-14B's 400 attention layers of 5120×5120, and LoFA's released
//! stages (199 M + 214 M) over Wan2.1-T2V-1.3B's 240 layers of 1536×1536. The checkpoints are
//! generated (random f32, real shapes), exported as `v2l-export` does, and run on random base
//! weights and a random 512-token umT5-XXL-wide prompt in chunks, as `v2l-lora predict`
//! streams them. Reported: seconds per layer (median over chunks), the whole model's layers
//! at that rate, and the process's peak memory while predicting.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;
use v2l_contracts::io::effect as effect_io;

use v2l_export::{lofa, prompt2effect, synthetic, Checkpoint};
use v2l_graphs::{DType, ExternalData};
use v2l_runtime::{Model, SessionOptions, Tensor};

use crate::Failure;

/// Which hypernetwork.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum HypernetModel {
    /// Prompt2Effect, paper size, over Wan2.1-I2V-14B's 400 attention layers
    Prompt2effect,
    /// LoFA's two released stages over Wan2.1-T2V-1.3B's 240 attention layers
    Lofa,
}

/// What the bench is asked to do.
pub struct HypernetBench<'a> {
    pub model: HypernetModel,
    /// Layers to run (at most the model's); the rest is extrapolated at the measured rate.
    pub layers: usize,
    pub chunk: usize,
    pub threads: usize,
    pub dir: &'a Path,
    pub keep: bool,
    pub json: bool,
}

/// The paper's figure for the whole prediction on an A100, for the side-by-side line.
fn paper_seconds(m: HypernetModel) -> f64 {
    match m {
        HypernetModel::Prompt2effect => 3.3,
        HypernetModel::Lofa => 3.7,
    }
}

fn fail(e: impl std::fmt::Display) -> Failure {
    Failure::new(e)
}

/// `/proc/self/status` field in bytes.
fn status_bytes(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

fn noise(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let t = v2l_runtime::tensor::gaussian_noise(vec![n], seed);
    match t.data {
        v2l_runtime::tensor::Data::F32(v) => v.into_iter().map(|x| x * scale).collect(),
        _ => vec![0.0; n],
    }
}

pub fn bench_hypernet(b: &HypernetBench) -> Result<(), Failure> {
    let dir = b.dir;
    std::fs::create_dir_all(dir).map_err(|e| fail(format!("{}: {e}", dir.display())))?;
    let say = |m: String| {
        if !b.json {
            eprintln!("{m}");
        }
    };
    // Generate and export.
    let t0 = Instant::now();
    let mut graphs = Vec::new();
    let (total_layers, side, text_dim, params) = match b.model {
        HypernetModel::Prompt2effect => {
            let config = prompt2effect::paper_config();
            let cfg: prompt2effect::Prompt2EffectConfig =
                serde_json::from_value(config.clone()).map_err(fail)?;
            let layout = prompt2effect::checkpoint_layout(&cfg);
            let ck = dir.join("prompt2effect");
            synthetic::write_checkpoint(&ck, &config, &layout, DType::F32, 7, &mut |_, _| {})?;
            let ex = prompt2effect::export(&Checkpoint::open_dir(&ck)?)?;
            let path = dir.join("prompt2effect.onnx");
            v2l_graphs::save(&ex.graph, &path, ExternalData::Always)?;
            graphs.push(path);
            let params: usize = layout
                .iter()
                .map(|(_, s)| s.iter().product::<usize>())
                .sum();
            (400, cfg.weight_dim, cfg.text_dim, params)
        }
        HypernetModel::Lofa => {
            let mut params = 0;
            let mut side = (0, 0);
            for (stage, name) in [
                (lofa::Stage::One, "lofa_stage1"),
                (lofa::Stage::Two, "lofa_stage2"),
            ] {
                let config = lofa::released_config(stage);
                let cfg: lofa::LofaConfig = serde_json::from_value(config.clone()).map_err(fail)?;
                let layout = lofa::checkpoint_layout(&cfg, stage);
                params += layout
                    .iter()
                    .map(|(_, s)| s.iter().product::<usize>())
                    .sum::<usize>();
                let ck = dir.join(name);
                synthetic::write_checkpoint(&ck, &config, &layout, DType::F32, 7, &mut |_, _| {})?;
                let ex = lofa::export(&Checkpoint::open_dir(&ck)?, stage)?;
                let path = dir.join(format!("{name}.onnx"));
                v2l_graphs::save(&ex.graph, &path, ExternalData::Always)?;
                graphs.push(path);
                side = (cfg.in_dim, cfg.context_dim);
            }
            (240, side.0, side.1, params)
        }
    };
    say(format!(
        "generated and exported {params} parameters (f32) in {:.1} s",
        t0.elapsed().as_secs_f64()
    ));

    // Sessions, then predict in chunks; peak memory from here on.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let opts = SessionOptions {
        threads: b.threads,
        ..Default::default()
    };
    let t1 = Instant::now();
    let mut models = graphs
        .iter()
        .map(|p| Model::load(p, &opts))
        .collect::<Result<Vec<_>, _>>()?;
    let load_s = t1.elapsed().as_secs_f64();
    let layers = b.layers.clamp(1, total_layers);
    let chunk = b.chunk.clamp(1, layers);
    let text = Tensor::f32(vec![1, 512, text_dim], noise(512 * text_dim, 1, 1.0));
    let w = noise(chunk * side * side, 2, 0.02);
    let mut per_layer = Vec::new();
    let mut done = 0;
    while done < layers {
        let n = chunk.min(layers - done);
        let mut feed = BTreeMap::from([
            (effect_io::TEXT.to_string(), text.clone()),
            (
                effect_io::BASE_WEIGHT.to_string(),
                Tensor::f32(vec![n, side, side], w[..n * side * side].to_vec()),
            ),
        ]);
        let ids = |k: i64| Tensor::i64(vec![n], vec![k; n]);
        let t = Instant::now();
        match b.model {
            HypernetModel::Prompt2effect => {
                feed.insert(effect_io::LAYER_INDEX.into(), ids(3));
                feed.insert(effect_io::MODULE_INDEX.into(), ids(7));
                models[0].run(&feed)?;
            }
            HypernetModel::Lofa => {
                feed.insert(effect_io::DEPTH_INDEX.into(), ids(3));
                feed.insert(effect_io::TYPE_INDEX.into(), ids(5));
                let hidden = models[0]
                    .run(&feed)?
                    .remove(effect_io::HIDDEN)
                    .ok_or_else(|| fail("stage 1 gave no hidden states"))?;
                feed.insert(effect_io::PRIOR.into(), hidden);
                models[1].run(&feed)?;
            }
        }
        per_layer.push(t.elapsed().as_secs_f64() / n as f64);
        done += n;
        say(format!(
            "  {done}/{layers} layers: {:.2} s per layer",
            per_layer.last().copied().unwrap_or(0.0)
        ));
    }
    let ran_s: f64 = per_layer.iter().sum::<f64>() * chunk as f64;
    let peak = status_bytes("VmHWM:");
    drop(models);
    let mut sorted = per_layer.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
    let whole = median * total_layers as f64;
    let name = match b.model {
        HypernetModel::Prompt2effect => "prompt2effect",
        HypernetModel::Lofa => "lofa",
    };
    if b.json {
        println!(
            "{}",
            serde_json::json!({"model": name, "parameters": params, "session_load_s": load_s,
                "layers_run": layers, "chunk": chunk, "s_per_layer": per_layer,
                "median_s_per_layer": median, "ran_s": ran_s, "model_layers": total_layers,
                "whole_model_s": whole, "peak_rss_bytes": peak,
                "paper_a100_s": paper_seconds(b.model)})
        );
    } else {
        println!("{name}: {params} parameters, sessions built in {load_s:.1} s");
        println!(
            "  {layers} of {total_layers} layers in chunks of {chunk}: {ran_s:.0} s, median {median:.2} s per layer"
        );
        println!(
            "  all {total_layers} layers at that rate: {whole:.0} s here (paper, A100: {} s); peak RSS {}",
            paper_seconds(b.model),
            crate::bytes(peak)
        );
    }
    if !b.keep {
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok(())
}
