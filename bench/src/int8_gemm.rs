//! `v2l-bench int8-gemm`: an int8 engine's linear at the DiT's shapes, ONNX Runtime's
//! `com.microsoft.DynamicQuantizeMatMul` against v2l's `ai.v2l.QMatMul`, in one process: the
//! same graph (a linear quantised by the compile's own pass, s8 weights per output channel),
//! before and after the pass `v2l-compile` applies. Each in ms and GOP/s (2·M·K·N) beside this
//! CPU's `vpdpbusd` peak, with how far apart the two outputs are.

use std::collections::BTreeMap;
use std::path::PathBuf;

use v2l_graphs::{passes, read_model, save, write_model, DType, ExternalData, Graph, TensorData};
use v2l_runtime::{Model, SessionOptions, Tensor};

use crate::common::{cpu_facts, cpu_line, median_ms};
use crate::peaks::{self, Cell};
use crate::Failure;

/// `v2l-bench int8-gemm`'s options.
#[derive(clap::Args, Clone, Debug)]
pub struct Int8GemmBench {
    /// Rows (tokens × batch; 11,252: 5,626 tokens under guidance)
    #[arg(long, default_value_t = 11_252)]
    pub rows: usize,
    /// Linears as IN:OUT, comma-separated (CogVideoX-5B: the attention projections 3072:3072,
    /// the feed-forward's 3072:12288 and 12288:3072)
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "3072:3072,3072:12288,12288:3072"
    )]
    pub shapes: Vec<String>,
    /// ONNX Runtime intra-op threads
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Runs per measurement (medians are reported)
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Scratch directory for the graphs
    #[arg(long, default_value = "target/v2l-bench-int8-gemm")]
    pub dir: PathBuf,
    #[arg(skip)]
    pub json: bool,
}

fn err(e: impl std::fmt::Display) -> Failure {
    Failure::new(e.to_string())
}

/// The two graphs of one linear `[rows, k] → [rows, n]`: ONNX Runtime's and v2l's.
fn graphs(dir: &std::path::Path, k: usize, n: usize) -> Result<[PathBuf; 2], Failure> {
    let mut g = Graph::new("linear");
    let x = g.input("x", DType::F32, vec!["rows".into(), (k as i64).into()]);
    // Trained-like weights: Gaussian with a few large ones, so the scales differ by channel.
    let w = v2l_runtime::tensor::gaussian_noise(vec![n * k], 3);
    let w: Vec<f32> = w
        .as_f32("w")
        .map_err(err)?
        .iter()
        .enumerate()
        .map(|(i, v)| if i % 997 == 0 { v * 0.2 } else { v * 0.02 })
        .collect();
    let b: Vec<f32> = (0..n).map(|i| (i % 7) as f32 * 0.01).collect();
    let bytes = |v: &[f32]| TensorData::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect());
    let wv = g.initializer("w", DType::F32, vec![n as i64, k as i64], bytes(&w));
    let bv = g.initializer("b", DType::F32, vec![n as i64], bytes(&b));
    let y = g.linear(&x, &wv, Some(&bv), n as i64);
    g.output(&y, "y", DType::F32, vec!["rows".into(), (n as i64).into()]);
    let src = dir.join(format!("f32_{k}x{n}.onnx"));
    save(&g, &src, ExternalData::Auto).map_err(err)?;
    let mut model = read_model(&src).map_err(err)?;
    passes::quantize_linears(
        &mut model,
        &src,
        &[("w".into(), passes::WeightQuant::Int8)],
        &dir.join(format!("int8_{k}x{n}.bin")),
    )
    .map_err(err)?;
    let ort = dir.join(format!("ort_{k}x{n}.onnx"));
    write_model(&ort, &model).map_err(err)?;
    if passes::v2l_qmatmul(&mut model) != 1 {
        return Err(Failure::new("the linear did not move onto ai.v2l.QMatMul"));
    }
    let ours = dir.join(format!("v2l_{k}x{n}.onnx"));
    write_model(&ours, &model).map_err(err)?;
    Ok([ort, ours])
}

pub fn bench_int8_gemm(b: &Int8GemmBench) -> Result<(), Failure> {
    let shapes: Vec<(usize, usize)> = b
        .shapes
        .iter()
        .map(|s| {
            let (k, n) = s.split_once(':')?;
            Some((k.parse().ok()?, n.parse().ok()?))
        })
        .collect::<Option<_>>()
        .filter(|v: &Vec<(usize, usize)>| {
            !v.is_empty()
                && v.iter()
                    .all(|&(k, n)| (1..=65_536).contains(&k) && (1..=65_536).contains(&n))
        })
        .ok_or_else(|| Failure::usage("--shapes: IN:OUT pairs from 1 to 65536, e.g. 3072:3072"))?;
    if !(1..=1_000_000).contains(&b.rows) {
        return Err(Failure::usage("--rows: 1 to 1000000"));
    }
    std::fs::create_dir_all(&b.dir)
        .map_err(|e| Failure::new(format!("{}: {e}", b.dir.display())))?;
    // Before any session exists (ONNX Runtime's pool threads spin after a run).
    let vnni_peak = peaks::peak(Cell::Int8Vnni, b.threads);
    let opts = SessionOptions {
        threads: b.threads,
        ..Default::default()
    };
    let mut rows = Vec::new();
    for &(k, n) in &shapes {
        let [ort_path, ours_path] = graphs(&b.dir, k, n)?;
        let x: BTreeMap<String, Tensor> = [(
            "x".to_string(),
            v2l_runtime::tensor::gaussian_noise(vec![b.rows, k], 1),
        )]
        .into();
        let ops = 2.0 * (b.rows * k * n) as f64;
        let time = |path: &std::path::Path| -> Result<(f64, Tensor), Failure> {
            let mut m = Model::load(path, &opts).map_err(err)?;
            let out = m
                .run(&x)
                .map_err(err)?
                .remove("y")
                .ok_or_else(|| Failure::new("no output"))?;
            // Timed without copying the output out of ONNX Runtime (up to 550 MB here): it is
            // held as ONNX Runtime wrote it, under a name no input has, and dropped.
            let held = [("held".to_string(), "y".to_string())];
            let ms = median_ms(b.repeat, || {
                let mut carry = v2l_runtime::session::Carry::default();
                m.run_carrying(&x, &mut carry, &held, &[], true)
                    .map(drop)
                    .map_err(err)
            })?;
            Ok((ms, out))
        };
        let (ort_ms, want) = time(&ort_path)?;
        let (v2l_ms, got) = time(&ours_path)?;
        let (want, got) = (
            want.as_f32("ort").map_err(err)?,
            got.as_f32("v2l").map_err(err)?,
        );
        let gops = |ms: f64| ops / (ms / 1e3) / 1e9;
        rows.push(serde_json::json!({
            "rows": b.rows, "in": k, "out": n,
            "ort_ms": ort_ms, "ort_gops": gops(ort_ms),
            "v2l_ms": v2l_ms, "v2l_gops": gops(v2l_ms),
            "v2l_over_ort": v2l_ms / ort_ms,
            "rel_l2": v2l_runtime::rel_l2(got, want),
            "bitwise_equal": got == want,
        }));
    }
    let report = serde_json::json!({
        "cpu": cpu_facts(), "threads": b.threads, "repeat": b.repeat,
        "int8_vnni_peak_gops": vnni_peak, "v2l_kernel": v2l_runtime::qgemm::available(),
        "rows": rows,
    });
    if b.json {
        println!("{report}");
        return Ok(());
    }
    println!("{}", cpu_line(&report["cpu"], b.threads));
    println!(
        "medians of {}; {} rows; s8 weights per output channel, u8 activations per tensor",
        b.repeat, b.rows
    );
    println!(
        "{:>13} {:>22} {:>22} {:>9} {:>9}",
        "in:out", "ONNX Runtime", "ai.v2l.QMatMul", "v2l/ort", "rel L2"
    );
    for r in &rows {
        let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "{:>13} {:>22} {:>22} {:>8.2}× {:>9}",
            format!("{}:{}", r["in"], r["out"]),
            format!("{:.1} ms {:.0} GOP/s", f("ort_ms"), f("ort_gops")),
            format!("{:.1} ms {:.0} GOP/s", f("v2l_ms"), f("v2l_gops")),
            f("v2l_over_ort"),
            if r["bitwise_equal"] == true {
                "bitwise".to_string()
            } else {
                format!("{:.2e}", f("rel_l2"))
            }
        );
    }
    let peak = report["int8_vnni_peak_gops"]
        .as_f64()
        .map_or("–".into(), |p| format!("{p:.0}"));
    println!("roofline: int8 vpdpbusd peak {peak} GOP/s");
    Ok(())
}
