//! v2l's CPU attention operator (`ai.v2l.Attention`) against ONNX Runtime's f32
//! `MultiHeadAttention` at CogVideoX-5B's real shapes: 48 heads × 64, 1,378 and 5,626 tokens,
//! q and k rotated by RoPE, k with the per-channel offset video DiTs' keys carry. Both graphs
//! come from the same exported attention pattern through `v2l-compile`'s passes.

use std::collections::BTreeMap;

use v2l_export::sdpa_graph;
use v2l_graphs::{passes, read_model, save, write_model, ExternalData};
use v2l_runtime::attention::Kernel;
use v2l_runtime::{Model, SessionOptions, Tensor};

const HEADS: i64 = 48;
const HEAD_DIM: i64 = 64;

/// The exporter's attention pattern over `q, k, v [1, S, H, Dh]`, saved at `path`.
fn attention_graph(path: &std::path::Path) {
    save(&sdpa_graph(HEADS, HEAD_DIM), path, ExternalData::Never).unwrap();
}

/// Seeded standard normal values.
fn normal(n: usize, seed: u64) -> Vec<f32> {
    let t = v2l_runtime::tensor::gaussian_noise(vec![n], seed);
    t.as_f32("noise").unwrap().to_vec()
}

/// `[1, S, H, Dh]` q, k, v: k offset per channel, q and k rotated by 1-D RoPE over the tokens.
fn inputs(tokens: usize) -> BTreeMap<String, Tensor> {
    let (h, d) = (HEADS as usize, HEAD_DIM as usize);
    let n = tokens * h * d;
    let mut q = normal(n, 1);
    let mut k = normal(n, 2);
    let v = normal(n, 3);
    let offset = normal(h * d, 4);
    for (i, x) in k.iter_mut().enumerate() {
        *x += 2.0 * offset[i % (h * d)];
    }
    for x in [&mut q, &mut k] {
        for t in 0..tokens {
            for head in 0..h {
                let row = &mut x[(t * h + head) * d..][..d];
                for i in 0..d / 2 {
                    let theta = t as f32 * 10000f32.powf(-2.0 * i as f32 / d as f32);
                    let (s, c) = theta.sin_cos();
                    let (a, b) = (row[i], row[i + d / 2]);
                    row[i] = a * c - b * s;
                    row[i + d / 2] = a * s + b * c;
                }
            }
        }
    }
    let shape = vec![1, tokens, h, d];
    [("q", q), ("k", k), ("v", v)]
        .into_iter()
        .map(|(name, x)| (name.to_string(), Tensor::f32(shape.clone(), x)))
        .collect()
}

/// Largest per-head relative L2 of `got` from `want`, both `[1, S, H·Dh]`.
fn worst_head(got: &Tensor, want: &Tensor) -> f64 {
    let (g, w) = (got.as_f32("got").unwrap(), want.as_f32("want").unwrap());
    let d = HEAD_DIM as usize;
    (0..HEADS as usize)
        .map(|head| {
            let (mut num, mut den) = (0f64, 0f64);
            for (gr, wr) in g
                .chunks_exact(d * HEADS as usize)
                .zip(w.chunks_exact(d * HEADS as usize))
            {
                for (a, b) in gr[head * d..][..d].iter().zip(&wr[head * d..][..d]) {
                    num += (*a as f64 - *b as f64).powi(2);
                    den += (*b as f64).powi(2);
                }
            }
            (num / den).sqrt()
        })
        .fold(0.0, f64::max)
}

#[test]
fn v2l_attention_tracks_ort_multi_head_attention_at_5b_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain.onnx");
    attention_graph(&plain);
    let mut mha = read_model(&plain).unwrap();
    assert_eq!(passes::fuse_attention(&mut mha, HEADS), 1);
    let mut ours = mha.clone();
    assert_eq!(passes::v2l_attention(&mut ours, false), 1);
    let (mha_path, ours_path) = (dir.path().join("mha.onnx"), dir.path().join("ours.onnx"));
    write_model(&mha_path, &mha).unwrap();
    write_model(&ours_path, &ours).unwrap();
    let opts = SessionOptions::default();
    let mut reference = Model::load(&mha_path, &opts).unwrap();
    let mut v2l = Model::load(&ours_path, &opts).unwrap();
    let kernel = Kernel::detect();
    // The f32 kernel is f32 attention; the bf16 one carries bf16's rounding.
    let bound = match kernel {
        Kernel::Bf16 | Kernel::Int8 => 1e-2,
        Kernel::Fp32 => 1e-5,
    };
    for tokens in [1378, 5626] {
        let x = inputs(tokens);
        let want = reference.run(&x).unwrap().remove("out").unwrap();
        let got = v2l.run(&x).unwrap().remove("out").unwrap();
        assert_eq!(got.shape, want.shape);
        let e = worst_head(&got, &want);
        eprintln!("{tokens} tokens, {}: worst head {e:.2e}", kernel.describe());
        assert!(
            e <= bound,
            "{tokens} tokens: worst head {e:.2e} > {bound:.0e}"
        );
        if kernel == Kernel::Bf16 {
            assert!(
                e > 1e-6,
                "bf16 kernel output is f32-exact ({e:.2e}): did it run?"
            );
        }
    }
}

/// A stop reaches inside v2l's attention node: ONNX Runtime checks its terminate flag between
/// nodes only, and this graph is one attention over 1,024 tokens (48 heads): the kernel skips
/// its remaining work items once the runtime's interrupt is set, and the call returns
/// `Cancelled` long before the node would end.
#[test]
fn a_stop_reaches_inside_the_attention_node() {
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain.onnx");
    attention_graph(&plain);
    let mut ours = read_model(&plain).unwrap();
    assert_eq!(passes::fuse_attention(&mut ours, HEADS), 1);
    assert_eq!(passes::v2l_attention(&mut ours, false), 1);
    let path = dir.path().join("ours.onnx");
    write_model(&path, &ours).unwrap();
    let mut m = Model::load(&path, &SessionOptions::default()).unwrap();
    let x = inputs(1024);
    let t = std::time::Instant::now();
    let whole = m.run(&x).unwrap().remove("out").unwrap();
    let took = t.elapsed();

    let start = std::time::Instant::now();
    let stop = || start.elapsed() > std::time::Duration::from_millis(100);
    let stopped = v2l_runtime::session::interruptible(stop, || m.run(&x).map(drop));
    let returned = start.elapsed();
    assert!(
        matches!(stopped, Err(v2l_runtime::RuntimeError::Cancelled)),
        "{stopped:?}"
    );
    assert!(
        returned < took / 2,
        "returned {returned:?} after the start; the node takes {took:?} ({})",
        Kernel::detect().describe()
    );
    // Nothing left behind: the next run is whole and the same.
    assert_eq!(m.run(&x).unwrap().remove("out").unwrap(), whole);
}
