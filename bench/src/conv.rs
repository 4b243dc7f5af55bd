//! `v2l-bench conv`: the VAE decoder's 3×3×3 convolutions at the sizes a decode runs them,
//! ONNX Runtime's f32 `Conv` against v2l's `ai.v2l.Conv` (bf16 on AVX512-BF16), each in one
//! session of one node, in ms and GFLOP/s (2·Cin·Cout·27·T·H·W), with the relative L2 of
//! v2l's output against ONNX Runtime's.

use std::collections::BTreeMap;
use std::path::PathBuf;

use v2l_graphs::{passes, read_model, save, write_model, Attr, DType, ExternalData, Graph};
use v2l_runtime::conv::Kernel;
use v2l_runtime::{Model, SessionOptions, Tensor};

use crate::common::{cpu_facts, cpu_line, median_ms};
use crate::Failure;

/// `v2l-bench conv`'s options.
#[derive(clap::Args, Clone, Debug)]
pub struct ConvBench {
    /// Convolutions as CHANNELSxFRAMESxHEIGHTxWIDTH (output frames; the input has two more,
    /// the causal pad), comma-separated. Default: CogVideoX's decoder stages for 9 frames at
    /// 256×384 (a batch of 4 output frames)
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "512x2x32x48,512x4x64x96,256x4x128x192,128x4x256x384"
    )]
    pub cases: Vec<String>,
    /// ONNX Runtime intra-op threads
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Runs per measurement (medians are reported)
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Scratch directory for the graphs
    #[arg(long, default_value = "target/v2l-bench-conv")]
    pub dir: PathBuf,
    #[arg(skip)]
    pub json: bool,
}

fn err(e: impl std::fmt::Display) -> Failure {
    Failure::new(e.to_string())
}

/// `CxTxHxW` → `[C, T, H, W]`.
fn parse_case(s: &str) -> Result<[usize; 4], Failure> {
    let d: Vec<usize> = s
        .split('x')
        .map(|p| p.trim().parse::<usize>().ok().filter(|&v| v > 0))
        .collect::<Option<_>>()
        .ok_or_else(|| {
            Failure::usage(format!(
                "--cases: `{s}` is not CHANNELSxFRAMESxHEIGHTxWIDTH"
            ))
        })?;
    match d[..] {
        [c, t, h, w] if c <= 1024 && t <= 16 && h * w <= 720 * 1280 => Ok([c, t, h, w]),
        _ => Err(Failure::usage(format!(
            "--cases: `{s}`: four positive numbers, up to 1024 channels, 16 frames, 720×1280"
        ))),
    }
}

/// One causal 3×3×3 conv as the VAE export writes it (time already padded), in f32.
fn conv_graph(c: usize) -> Graph {
    let mut g = Graph::new("conv");
    let dims = || {
        vec![
            1.into(),
            (c as i64).into(),
            "t".into(),
            "h".into(),
            "w".into(),
        ]
    };
    let x = g.input("x", DType::F32, dims());
    let w = v2l_runtime::tensor::gaussian_noise(vec![c * c * 27], 7);
    let scale = (1.0 / (c * 27) as f32).sqrt();
    let w: Vec<f32> = w
        .as_f32("w")
        .unwrap_or_default()
        .iter()
        .map(|v| v * scale)
        .collect();
    let w = g.const_f32(&w, &[c as i64, c as i64, 3, 3, 3]);
    let b = g.const_f32(&vec![0.01; c], &[c as i64]);
    let y = g.op(
        "Conv",
        &[&x, &w, &b],
        vec![
            ("kernel_shape", Attr::Ints(vec![3, 3, 3])),
            ("pads", Attr::Ints(vec![0, 1, 1, 0, 1, 1])),
        ],
    );
    g.output(&y, "y", DType::F32, dims());
    g
}

pub fn bench_conv(b: &ConvBench) -> Result<(), Failure> {
    let cases = b
        .cases
        .iter()
        .map(|s| parse_case(s))
        .collect::<Result<Vec<_>, _>>()?;
    if cases.is_empty() {
        return Err(Failure::usage("--cases: give at least one"));
    }
    std::fs::create_dir_all(&b.dir)
        .map_err(|e| Failure::new(format!("{}: {e}", b.dir.display())))?;
    let opts = SessionOptions {
        threads: b.threads,
        ..Default::default()
    };
    let kernel = Kernel::detect();
    let mut rows = Vec::new();
    for [c, t, h, w] in cases {
        let plain = b.dir.join(format!("conv{c}.onnx"));
        save(&conv_graph(c), &plain, ExternalData::Never).map_err(err)?;
        let mut ours = read_model(&plain).map_err(err)?;
        if passes::v2l_conv(&mut ours) != 1 {
            return Err(Failure::new("the conv did not move onto ai.v2l.Conv"));
        }
        let ours_path = b.dir.join(format!("conv{c}_v2l.onnx"));
        write_model(&ours_path, &ours).map_err(err)?;
        let x = v2l_runtime::tensor::gaussian_noise(vec![c * (t + 2) * h * w], 1);
        let x = Tensor::f32(
            vec![1, c, t + 2, h, w],
            x.as_f32("x").map(<[f32]>::to_vec).unwrap_or_default(),
        );
        let input: BTreeMap<String, Tensor> = [("x".to_string(), x)].into();
        let time = |path: &std::path::Path| -> Result<(f64, Tensor), Failure> {
            let mut m = Model::load(path, &opts).map_err(err)?;
            let out = m
                .run(&input)
                .map_err(err)?
                .remove("y")
                .ok_or_else(|| Failure::new("no output"))?;
            let ms = median_ms(b.repeat, || m.run(&input).map(drop).map_err(err))?;
            Ok((ms, out))
        };
        let (ort_ms, want) = time(&plain)?;
        let (v2l_ms, got) = time(&ours_path)?;
        let rel = v2l_runtime::rel_l2(
            got.as_f32("ai.v2l.Conv").map_err(err)?,
            want.as_f32("Conv").map_err(err)?,
        );
        let flops = 2.0 * (c * c * 27 * t * h * w) as f64;
        let gflops = |ms: f64| flops / (ms / 1e3) / 1e9;
        rows.push(serde_json::json!({
            "case": format!("{c}x{t}x{h}x{w}"),
            "ort_f32_ms": ort_ms, "ort_f32_gflops": gflops(ort_ms),
            "v2l_ms": v2l_ms, "v2l_gflops": gflops(v2l_ms),
            "v2l_over_ort": v2l_ms / ort_ms, "v2l_rel_l2": rel,
        }));
    }
    let report = serde_json::json!({
        "cpu": cpu_facts(), "threads": b.threads, "repeat": b.repeat,
        "kernel": kernel.name(), "kernel_reason": kernel.reason(), "rows": rows,
    });
    if b.json {
        println!("{report}");
        return Ok(());
    }
    println!("{}", cpu_line(&report["cpu"], b.threads));
    println!(
        "medians of {}; 3×3×3 convs, input frames = output frames + 2; ai.v2l.Conv kernel: {} ({})",
        b.repeat,
        kernel.name(),
        kernel.reason()
    );
    println!(
        "{:>16} {:>20} {:>20} {:>9} {:>9}",
        "C×T×H×W", "ONNX Runtime f32", "ai.v2l.Conv", "v2l/ORT", "rel L2"
    );
    for r in &rows {
        let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "{:>16} {:>20} {:>20} {:>8.2}× {:>9.2e}",
            r["case"].as_str().unwrap_or(""),
            format!("{:.0} ms {:.0} GF/s", f("ort_f32_ms"), f("ort_f32_gflops")),
            format!("{:.0} ms {:.0} GF/s", f("v2l_ms"), f("v2l_gflops")),
            f("v2l_over_ort"),
            f("v2l_rel_l2"),
        );
    }
    Ok(())
}
