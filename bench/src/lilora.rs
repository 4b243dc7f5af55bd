//! `v2l-bench lilora`: Video2LoRA's LiLoRA expansion, the predicted rows turned into LoRA
//! factors (`LiLora::to_lora`), on the real linears of CogVideoX-Fun-5B-InP.
//!
//! Every predicted LoRA goes through it on the host, GPU engines included, between the
//! hypernetwork and the DiT: per layer `A = down_w · down_aux` and `B = up_aux · up_w`, which
//! reads every auxiliary once (about 2 GB in f32 at 5B with upstream's `a` 200, `b` 100). The
//! auxiliaries and rows are generated (their values do not change the work). Reported: the
//! median over `--repeat` expansions and the auxiliaries' bytes read per second.

use crate::common::{cpu_facts, cpu_line, median_ms};
use crate::fuse::{layers, FuseModel};
use crate::Failure;
use v2l_runtime::lora::lilora::{AuxLayer, LiLora};

/// What the bench is asked to do.
pub struct LiLoraBench {
    /// Rows of each `down_aux` (upstream's `--lora_down_dim`).
    pub down_dim: usize,
    /// Columns of each `up_aux` (upstream's `--lora_up_dim`).
    pub up_dim: usize,
    pub rank: usize,
    pub repeat: usize,
    pub json: bool,
}

pub fn bench_lilora(b: &LiLoraBench) -> Result<(), Failure> {
    let (a, u, r) = (b.down_dim, b.up_dim, b.rank.max(1));
    // Small values that vary; a cheap generator, the same every run.
    let fill = |n: usize, salt: usize| -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 2_654_435_761 + salt) % 1999) as f32 - 999.0) * 1e-5)
            .collect()
    };
    let shapes = layers(FuseModel::CogVideoX5b)?;
    let aux: Vec<AuxLayer> = shapes
        .iter()
        .enumerate()
        .map(|(k, (name, l))| {
            AuxLayer::new(
                name.clone(),
                l.out,
                l.inp,
                fill(a * l.inp, 2 * k),
                fill(l.out * u, 2 * k + 1),
            )
        })
        .collect();
    let aux_bytes: usize = aux
        .iter()
        .map(|l| 4 * (a * l.in_features + l.out_features * u))
        .sum();
    let n = aux.len();
    let lilora = LiLora {
        path: "generated".into(),
        a,
        b: u,
        layers: aux,
    };
    let width = (a + u) * r;
    let rows = fill(n * width, 7);
    let mut factors = 0usize;
    let ms = median_ms(b.repeat, || {
        let lora = lilora
            .to_lora(&rows, width, 1.0, 1.0)
            .map_err(|e| Failure::new(e.to_string()))?;
        factors = lora.layers.len();
        Ok(())
    })?;
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let report = serde_json::json!({
        "cpu": cpu_facts(), "threads": threads, "layers": n, "factors": factors,
        "down_dim": a, "up_dim": u, "rank": r, "repeat": b.repeat,
        "aux_bytes": aux_bytes, "ms": ms, "aux_gb_per_s": aux_bytes as f64 / ms / 1e6,
    });
    if b.json {
        println!("{report}");
    } else {
        println!("{}", cpu_line(&report["cpu"], threads));
        println!(
            "LiLoRA expansion, CogVideoX-Fun-5B-InP's {n} linears (a {a}, b {u}, rank {r}; {:.2} GB of auxiliaries): {ms:.1} ms, {:.1} GB/s",
            aux_bytes as f64 / 1e9,
            aux_bytes as f64 / ms / 1e6
        );
    }
    Ok(())
}
