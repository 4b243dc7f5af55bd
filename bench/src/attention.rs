//! `v2l-bench attention`: the DiT's attention at CogVideoX-5B shapes (48 heads × 64, batch 2
//! as guidance runs it), ONNX Runtime's f32 `MultiHeadAttention` against v2l's
//! `ai.v2l.Attention` in a session, and v2l's kernels (bf16, int8, f32) called directly, with
//! the int8 kernel's relative L2 against ONNX Runtime's f32 and its time over bf16's. Each in ms and
//! GFLOP/s (4·B·H·S²·Dh), beside this CPU's ceilings: its bf16 `vdpbf16ps` and int8
//! `vpdpbusd` peaks, the AVX2 cells an AVX2-only CPU multiplies with ([`crate::peaks`]) and
//! ONNX Runtime's f32 GEMM rate.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use v2l_graphs::{passes, read_model, save, write_model, ExternalData};
use v2l_runtime::attention::{attend, Kernel, Qkv, Shape};
use v2l_runtime::{Model, SessionOptions, Tensor};

use crate::common::{cpu_facts, cpu_line, median_ms};
use crate::peaks::{self, Cell};
use crate::Failure;

const HEADS: usize = 48;
const HEAD_DIM: usize = 64;

/// `v2l-bench attention`'s options.
#[derive(clap::Args, Clone, Debug)]
pub struct AttentionBench {
    /// Token counts (text + video) to measure, comma-separated (1,378: 9 frames at 256×384;
    /// 5,626: 49 frames at 240×360 or 13 frames at 480×720 with 226 text tokens)
    #[arg(long, value_delimiter = ',', default_value = "1378,5626")]
    pub tokens: Vec<usize>,
    /// Batch (2: one request under classifier-free guidance)
    #[arg(long, default_value_t = 2)]
    pub batch: usize,
    /// ONNX Runtime intra-op threads, and threads of the direct kernel calls
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Runs per measurement (medians are reported)
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Scratch directory for the two graphs
    #[arg(long, default_value = "target/v2l-bench-attention")]
    pub dir: PathBuf,
    /// Skip the portable f32 kernel (the fallback of CPUs without AVX512-BF16, about 60
    /// GFLOP/s here: two minutes a call at 17,776 tokens)
    #[arg(long)]
    pub no_f32_kernel: bool,
    #[arg(skip)]
    pub json: bool,
}

/// Runs `f(0..n)` on `threads` scoped threads.
fn pool(threads: usize) -> impl Fn(usize, &(dyn Fn(usize) + Sync)) {
    move |n, f| {
        let next = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..threads.max(1) {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    f(i);
                });
            }
        });
    }
}

fn err(e: impl std::fmt::Display) -> Failure {
    Failure::new(e.to_string())
}

/// ONNX Runtime's f32 GEMM rate: `[tokens, 3072] × [3072, 3072]` MatMul (a DiT projection).
fn ort_gemm_gflops(
    dir: &std::path::Path,
    tokens: usize,
    opts: &SessionOptions,
    repeat: usize,
) -> Result<f64, Failure> {
    let d = HEADS * HEAD_DIM;
    let mut g = v2l_graphs::Graph::new("gemm");
    let x = g.input(
        "x",
        v2l_graphs::DType::F32,
        vec!["tokens".into(), (d as i64).into()],
    );
    let w = v2l_runtime::tensor::gaussian_noise(vec![d * d], 9);
    let w = g.const_f32(w.as_f32("w").map_err(err)?, &[d as i64, d as i64]);
    let y = g.matmul(&x, &w);
    g.output(
        &y,
        "y",
        v2l_graphs::DType::F32,
        vec!["tokens".into(), (d as i64).into()],
    );
    let path = dir.join("gemm.onnx");
    save(&g, &path, ExternalData::Auto).map_err(err)?;
    let mut m = Model::load(&path, opts).map_err(err)?;
    let input: BTreeMap<String, Tensor> = [(
        "x".to_string(),
        v2l_runtime::tensor::gaussian_noise(vec![tokens, d], 1),
    )]
    .into();
    m.run(&input).map_err(err)?;
    let ms = median_ms(repeat, || m.run(&input).map(drop).map_err(err))?;
    Ok(2.0 * (tokens * d * d) as f64 / (ms / 1e3) / 1e9)
}

pub fn bench_attention(b: &AttentionBench) -> Result<(), Failure> {
    if b.tokens.is_empty() || b.tokens.iter().any(|&t| t == 0 || t > 20_000) {
        return Err(Failure::usage("--tokens: give counts from 1 to 20000"));
    }
    if !(1..=8).contains(&b.batch) {
        return Err(Failure::usage("--batch: 1 to 8"));
    }
    std::fs::create_dir_all(&b.dir)
        .map_err(|e| Failure::new(format!("{}: {e}", b.dir.display())))?;
    // Before any session exists: ONNX Runtime's pool threads spin after a run and took a core
    // from the loop (it read half the peak when measured last).
    let peak = |cell| peaks::peak(cell, b.threads);
    let (bf16_peak, int8_peak) = (peak(Cell::Bf16Dp), peak(Cell::Int8Vnni));
    let avx2 = [Cell::F32FmaYmm, Cell::U8U8Ymm, Cell::U8S8Ymm, Cell::S8S8Ymm].map(peak);
    let plain = b.dir.join("plain.onnx");
    save(
        &v2l_export::sdpa_graph(HEADS as i64, HEAD_DIM as i64),
        &plain,
        ExternalData::Never,
    )
    .map_err(err)?;
    let mut mha = read_model(&plain).map_err(err)?;
    passes::fuse_attention(&mut mha, HEADS as i64);
    let mut ours = mha.clone();
    passes::v2l_attention(&mut ours, false);
    let (mha_path, ours_path) = (b.dir.join("mha.onnx"), b.dir.join("ours.onnx"));
    write_model(&mha_path, &mha).map_err(err)?;
    write_model(&ours_path, &ours).map_err(err)?;
    let opts = SessionOptions {
        threads: b.threads,
        ..Default::default()
    };
    let mut ort_mha = Model::load(&mha_path, &opts).map_err(err)?;
    let mut v2l = Model::load(&ours_path, &opts).map_err(err)?;
    let par = pool(b.threads);
    let kernel = Kernel::detect();

    let mut rows = Vec::new();
    for &tokens in &b.tokens {
        let shape = vec![b.batch, tokens, HEADS, HEAD_DIM];
        let n = shape.iter().product();
        let x: BTreeMap<String, Tensor> = ["q", "k", "v"]
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let t = v2l_runtime::tensor::gaussian_noise(vec![n], i as u64 + 1);
                (
                    name.to_string(),
                    Tensor::f32(
                        shape.clone(),
                        t.as_f32(name).map(<[f32]>::to_vec).unwrap_or_default(),
                    ),
                )
            })
            .collect();
        let flops = 4.0 * (b.batch * HEADS * tokens * tokens * HEAD_DIM) as f64;
        let gflops = |ms: f64| flops / (ms / 1e3) / 1e9;
        let time_session = |m: &mut Model| -> Result<(f64, Tensor), Failure> {
            let out = m
                .run(&x)
                .map_err(err)?
                .remove("out")
                .ok_or_else(|| Failure::new("no output"))?;
            let ms = median_ms(b.repeat, || m.run(&x).map(drop).map_err(err))?;
            Ok((ms, out))
        };
        let (mha_ms, want) = time_session(&mut ort_mha)?;
        let (v2l_ms, got) = time_session(&mut v2l)?;
        let rel = v2l_runtime::rel_l2(
            got.as_f32("ai.v2l.Attention").map_err(err)?,
            want.as_f32("MultiHeadAttention").map_err(err)?,
        );
        let s = Shape {
            batch: b.batch,
            q_len: tokens,
            kv_len: tokens,
            heads: HEADS,
            head_dim: HEAD_DIM,
        };
        let get = |k: &str| x.get(k).and_then(|t| t.as_f32(k).ok()).unwrap_or_default();
        let (q, k, v) = (get("q"), get("k"), get("v"));
        let mut out = vec![0f32; q.len()];
        let scale = 1.0 / (HEAD_DIM as f32).sqrt();
        let mut direct = |kernel: Kernel| {
            median_ms(b.repeat, || {
                attend(kernel, s, scale, Qkv { q, k, v }, &mut out, &par).map_err(err)
            })
        };
        let bf16_ms = if kernel == Kernel::Bf16 {
            Some(direct(Kernel::Bf16)?)
        } else {
            None
        };
        let fp32_ms = if b.no_f32_kernel {
            None
        } else {
            Some(direct(Kernel::Fp32)?)
        };
        // Last, so that `out` holds its output: the int8 kernel against ONNX Runtime's f32.
        let int8_ms = if v2l_runtime::attention::int8_available() {
            Some(direct(Kernel::Int8)?)
        } else {
            None
        };
        let int8_rel = match int8_ms {
            Some(_) => Some(v2l_runtime::rel_l2(
                &out,
                want.as_f32("MultiHeadAttention").map_err(err)?,
            )),
            None => None,
        };
        rows.push(serde_json::json!({
            "tokens": tokens, "batch": b.batch,
            "ort_mha_f32_ms": mha_ms, "ort_mha_f32_gflops": gflops(mha_ms),
            "v2l_op_ms": v2l_ms, "v2l_op_gflops": gflops(v2l_ms), "v2l_op_kernel": kernel.describe(),
            "v2l_op_rel_l2": rel,
            "kernel_bf16_ms": bf16_ms, "kernel_bf16_gflops": bf16_ms.map(gflops),
            "kernel_int8_ms": int8_ms, "kernel_int8_gflops": int8_ms.map(gflops),
            "kernel_int8_rel_l2": int8_rel,
            "int8_over_bf16": int8_ms.zip(bf16_ms).map(|(a, b)| a / b),
            "kernel_fp32_ms": fp32_ms, "kernel_fp32_gflops": fp32_ms.map(gflops),
        }));
    }
    let gemm_tokens = b.tokens.first().copied().unwrap_or(1378);
    let roof = serde_json::json!({
        "bf16_dpbf16_peak_gflops": bf16_peak,
        "int8_vnni_peak_gops": int8_peak,
        "ort_f32_gemm_gflops": ort_gemm_gflops(&b.dir, gemm_tokens, &opts, b.repeat)?,
        "avx2_f32_fma_peak_gflops": avx2[0],
        "avx2_u8u8_peak_gops": avx2[1],
        "avx2_u8s8_peak_gops": avx2[2],
        "avx2_s8s8_peak_gops": avx2[3],
    });
    let report = serde_json::json!({
        "cpu": cpu_facts(), "threads": b.threads, "repeat": b.repeat, "heads": HEADS,
        "head_dim": HEAD_DIM, "rows": rows, "roofline": roof,
    });
    if b.json {
        println!("{report}");
        return Ok(());
    }
    println!("{}", cpu_line(&report["cpu"], b.threads));
    println!(
        "medians of {}; {HEADS} heads × {HEAD_DIM}, batch {}",
        b.repeat, b.batch
    );
    println!(
        "{:>7} {:>16} {:>16} {:>16} {:>16} {:>16} {:>9} {:>9} {:>9}",
        "tokens",
        "ORT MHA f32",
        "ai.v2l op",
        "bf16 kernel",
        "int8 kernel",
        "f32 kernel",
        "rel L2",
        "int8 L2",
        "int8/bf16"
    );
    let cell = |ms: &serde_json::Value, gf: &serde_json::Value| match (ms.as_f64(), gf.as_f64()) {
        (Some(ms), Some(gf)) => format!("{ms:.0} ms {gf:.0} GF/s"),
        _ => "–".into(),
    };
    for r in &rows {
        let opt =
            |v: &serde_json::Value, f: &dyn Fn(f64) -> String| v.as_f64().map_or("–".into(), f);
        println!(
            "{:>7} {:>16} {:>16} {:>16} {:>16} {:>16} {:>9.2e} {:>9} {:>9}",
            r["tokens"],
            cell(&r["ort_mha_f32_ms"], &r["ort_mha_f32_gflops"]),
            cell(&r["v2l_op_ms"], &r["v2l_op_gflops"]),
            cell(&r["kernel_bf16_ms"], &r["kernel_bf16_gflops"]),
            cell(&r["kernel_int8_ms"], &r["kernel_int8_gflops"]),
            cell(&r["kernel_fp32_ms"], &r["kernel_fp32_gflops"]),
            r["v2l_op_rel_l2"].as_f64().unwrap_or(f64::NAN),
            opt(&r["kernel_int8_rel_l2"], &|x| format!("{x:.2e}")),
            opt(&r["int8_over_bf16"], &|x| format!("{x:.2}×")),
        );
    }
    println!("ai.v2l op kernel: {}", kernel.describe());
    let f = |v: &serde_json::Value| v.as_f64().map_or("–".into(), |x| format!("{x:.0}"));
    println!(
        "roofline: bf16 vdpbf16ps peak {} GFLOP/s, int8 vpdpbusd peak {} GOP/s, ONNX Runtime f32 GEMM {} GFLOP/s",
        f(&roof["bf16_dpbf16_peak_gflops"]),
        f(&roof["int8_vnni_peak_gops"]),
        f(&roof["ort_f32_gemm_gflops"])
    );
    println!(
        "AVX2 (ymm) cells: f32 FMA {} GFLOP/s, u8·u8 {} GOP/s, u8·s8 {} GOP/s (saturates), s8·s8 by vpsignb {} GOP/s",
        f(&roof["avx2_f32_fma_peak_gflops"]),
        f(&roof["avx2_u8u8_peak_gops"]),
        f(&roof["avx2_u8s8_peak_gops"]),
        f(&roof["avx2_s8s8_peak_gops"])
    );
    Ok(())
}
