//! What every `v2l-bench` command shares: the machine line printed beside every figure, the
//! median of repeated runs, and a generated LoRA to time with.

use std::time::Instant;

use v2l_runtime::engine::Engine;
use v2l_runtime::lora::format::{Factor, Lora, LoraFormat, LoraLayer};
use v2l_runtime::lora::AppliedLora;

use crate::pipeline::stats;
use crate::Failure;

/// The CPU model and the ISA features that decide which kernels run (`v2l_runtime::cpu`, the
/// same record `bundle.json` and `v2l-run --json` carry), and the core count.
pub fn cpu_facts() -> serde_json::Value {
    let m = v2l_runtime::cpu::this();
    serde_json::json!({
        "model": m.cpu,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "features": m.isa,
    })
}

/// [`cpu_facts`] as the line every bench table starts with.
pub fn cpu_line(cpu: &serde_json::Value, threads: usize) -> String {
    let features: Vec<&str> = cpu["features"]
        .as_array()
        .map(|f| f.iter().filter_map(|x| x.as_str()).collect())
        .unwrap_or_default();
    format!(
        "CPU: {} ({} cores; {}), {threads} threads",
        cpu["model"].as_str().unwrap_or("?"),
        cpu["cores"],
        features.join(", ")
    )
}

/// The median wall time of `repeat` runs of `f`, in ms.
pub(crate) fn median_ms(
    repeat: usize,
    mut f: impl FnMut() -> Result<(), Failure>,
) -> Result<f64, Failure> {
    let mut t = Vec::new();
    for _ in 0..repeat.max(1) {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64() * 1e3);
    }
    Ok(stats(t).0)
}

/// A generated LoRA of `rank` on every targeted layer of `engine`'s DiT (small Gaussian
/// factors, seeded by `seed`).
pub(crate) fn generated_lora(
    engine: &Engine,
    rank: usize,
    seed: u64,
) -> Result<AppliedLora, Failure> {
    let layers = engine
        .dit_targets()?
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let s = seed * 1000 + 2 * i as u64;
            let a = v2l_runtime::tensor::gaussian_noise(vec![rank * t.in_features], s);
            let b = v2l_runtime::tensor::gaussian_noise(vec![t.out_features * rank], s + 1);
            let small = |v: &[f32]| v.iter().map(|x| x * 0.01).collect::<Vec<f32>>();
            Ok(LoraLayer {
                module: t.name.clone(),
                a: Factor::from_f32([rank, t.in_features], &small(a.as_f32("a")?)),
                b: Factor::from_f32([t.out_features, rank], &small(b.as_f32("b")?)),
                alpha: rank as f32,
            })
        })
        .collect::<Result<Vec<_>, v2l_runtime::RuntimeError>>()?;
    Ok(AppliedLora {
        lora: Lora {
            format: LoraFormat::Diffusers,
            layers,
        }
        .into(),
        source: format!("<generated {seed}>").into(),
        multiplier: 1.0,
    })
}
