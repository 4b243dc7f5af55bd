//! Shared helpers of the integration tests: fixture paths, tolerances, export-and-load.
//!
//! The fixtures under `tests/fixtures/cogvideox-tiny` were produced by the upstream PyTorch
//! code (diffusers 0.42.1, the Video2LoRA authors' code); see `tests/fixtures/README.md`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use v2l_runtime::Tensor;

/// Held by every test whose sessions take the process's shared arena
/// (`SessionOptions::shared_arena`), so the arena's counts a test reads are its own runs'.
pub static SHARED_ARENA: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Relative L2 bound for float32 parity with PyTorch.
pub const F32_REL_L2: f64 = 1e-4;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

pub fn tiny() -> PathBuf {
    fixtures().join("cogvideox-tiny")
}

pub fn load(name: &str) -> BTreeMap<String, Tensor> {
    v2l_runtime::read_safetensors(&tiny().join(name)).expect("fixture file")
}

/// `m` written to `path`, run on the CPU provider with `feed`: its `sample`.
pub fn sample_of(
    path: &Path,
    m: &v2l_graphs::proto::ModelProto,
    feed: &BTreeMap<String, Tensor>,
) -> Tensor {
    use v2l_runtime::{Model, SessionOptions};
    v2l_graphs::write_model(path, m).unwrap();
    Model::load(path, &SessionOptions::default())
        .unwrap()
        .run(feed)
        .unwrap()
        .remove("sample")
        .unwrap()
}

/// A DiT feed's two samples given different timesteps (the fixtures' share one), so a test
/// sees each sample's modulation reach its own rows.
pub fn two_timesteps(feed: &mut BTreeMap<String, Tensor>) {
    let two = match &feed["timestep"].data {
        v2l_runtime::tensor::Data::I64(t) => {
            assert_eq!(t.len(), 2);
            Tensor::i64(vec![2], vec![t[0], t[1] / 3 + 10])
        }
        v2l_runtime::tensor::Data::F32(t) => {
            assert_eq!(t.len(), 2);
            Tensor::f32(vec![2], vec![t[0], t[1] / 3.0 + 10.0])
        }
        other => panic!("timestep of {other:?}"),
    };
    feed.insert("timestep".into(), two);
}

/// Asserts `got` matches `want` within `tol` relative L2, printing the measured error.
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    assert_eq!(got.shape, want.shape, "{what}: shape");
    let err = got.rel_l2(want);
    eprintln!("{what}: relative L2 error {err:.3e} (bound {tol:.0e})");
    assert!(
        err <= tol,
        "{what}: relative L2 error {err:.3e} > {tol:.0e}"
    );
}

/// Picks the named tensors out of a fixture map.
pub fn pick(m: &BTreeMap<String, Tensor>, names: &[&str]) -> BTreeMap<String, Tensor> {
    names
        .iter()
        .map(|n| (n.to_string(), m[*n].clone()))
        .collect()
}

/// Writes a synthetic CogVideoX transformer checkpoint for `config` (f32 unless `dtype`).
pub fn synthetic_dit(dir: &Path, mut config: serde_json::Value, dtype: v2l_graphs::DType) {
    use v2l_export::cogvideox_dit::{checkpoint_layout, DitConfig, CLASS_NAME};
    config["_class_name"] = CLASS_NAME.into();
    let cfg: DitConfig = serde_json::from_value(config.clone()).unwrap();
    let layout = checkpoint_layout(&cfg);
    v2l_export::synthetic::write_checkpoint(dir, &config, &layout, dtype, 7, &mut |_, _| {})
        .unwrap();
}

/// Deterministic pseudo-random f32 values in (-1, 1), from v2l's one seeded generator.
pub fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = v2l_contracts::noise::SplitMix64::new(seed);
    (0..n).map(|_| rng.symmetric()).collect()
}

/// DiT inputs of the given sizes (latent frames, latent height/width, text length).
pub fn dit_inputs(
    batch: usize,
    frames: usize,
    cin: usize,
    h: usize,
    w: usize,
    text_len: usize,
    text_dim: usize,
    patch: usize,
    head_dim: usize,
) -> BTreeMap<String, Tensor> {
    let s = frames * (h / patch) * (w / patch);
    let mut m = BTreeMap::new();
    let hs = vec![batch, frames, cin, h, w];
    m.insert(
        "hidden_states".into(),
        Tensor::f32(hs.clone(), noise(hs.iter().product(), 1)),
    );
    m.insert(
        "encoder_hidden_states".into(),
        Tensor::f32(
            vec![batch, text_len, text_dim],
            noise(batch * text_len * text_dim, 2),
        ),
    );
    m.insert(
        "timestep".into(),
        Tensor::i64(
            vec![batch],
            (0..batch as i64).map(|i| 999 - 250 * i).collect(),
        ),
    );
    let angles = noise(s * head_dim, 3);
    m.insert(
        "rope_cos".into(),
        Tensor::f32(
            vec![s, head_dim],
            angles.iter().map(|a| (a * 3.0).cos()).collect(),
        ),
    );
    m.insert(
        "rope_sin".into(),
        Tensor::f32(
            vec![s, head_dim],
            angles.iter().map(|a| (a * 3.0).sin()).collect(),
        ),
    );
    m
}

/// Asserts every value of `t` is finite.
pub fn assert_finite(what: &str, t: &Tensor) {
    let v = t.as_f32(what).unwrap();
    assert!(v.iter().all(|x| x.is_finite()), "{what}: non-finite values");
}

/// The VAE graphs `graphs` in `dir` read no `cache_in.*` on a clip's first batch: caches full
/// of NaN give bitwise the outputs (caches out included) that caches of zeros give. The runtime
/// relies on it where it carries caches in session memory (a GPU's): the first batch's caches
/// start there unwritten (`Model::unwritten_carry`).
pub fn assert_first_batch_ignores_caches(
    dir: &Path,
    entry: &v2l_contracts::manifest::VaeEntry,
    graphs: &v2l_contracts::bundle::VaeGraphs,
    video: &Tensor,
    latents: &Tensor,
) {
    use v2l_runtime::session::Model;
    let cases = [
        (
            &graphs.encoder,
            &entry.encoder_caches,
            "video",
            video,
            entry.encoder_batches(video.shape[2]).unwrap(),
        ),
        (
            &graphs.decoder,
            &entry.decoder_caches,
            "latents",
            latents,
            entry.decoder_batches(latents.shape[2]).unwrap(),
        ),
    ];
    for (graph, caches, input, x, batches) in cases {
        assert!(!caches.is_empty(), "{graph}: no caches to test");
        let mut m = Model::load(&dir.join(graph), &v2l_runtime::SessionOptions::default()).unwrap();
        let (b, h, w) = (x.shape[0], x.shape[3], x.shape[4]);
        let (start, end) = batches[0];
        let mut run = |fill: f32| {
            let mut feed = BTreeMap::new();
            feed.insert(input.to_string(), x.slice_axis(2, start, end).unwrap());
            feed.insert("first_batch".to_string(), Tensor::f32(vec![1], vec![1.0]));
            for c in caches {
                let shape = c.shape(b, h, w).to_vec();
                let n = shape.iter().product();
                feed.insert(c.name.clone(), Tensor::f32(shape, vec![fill; n]));
            }
            m.run(&feed).unwrap()
        };
        let zeros = run(0.0);
        let nan = run(f32::NAN);
        assert_eq!(zeros.len(), nan.len(), "{graph}");
        for (name, z) in &zeros {
            let n = &nan[name];
            let (z, n) = (z.as_f32(name).unwrap(), n.as_f32(name).unwrap());
            assert!(
                z.iter().all(|v| v.is_finite()),
                "{graph}: `{name}` not finite"
            );
            let same = z.iter().zip(n).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{graph}: `{name}` read the first batch's caches");
        }
    }
}

/// The DiT graph at `path` with its RoPE fused (`v2l_graphs::passes::fuse_rope`, what
/// `v2l-compile` writes for CUDA): `expected` fusions (q and k of every block), no rotation
/// product left, and on `feed` the unfused graph's `sample` within 1e-6 and `want` within
/// `tol`. Returns the fused graph's `sample`.
pub fn assert_rope_fuses(
    path: &Path,
    feed: &BTreeMap<String, Tensor>,
    expected: usize,
    want: &Tensor,
    tol: f64,
) -> Tensor {
    use v2l_runtime::{Model, SessionOptions};
    let mut m = v2l_graphs::read_model(path).unwrap();
    let matmuls = |m: &v2l_graphs::proto::ModelProto| {
        let g = m.graph.as_ref().unwrap();
        g.node.iter().filter(|n| n.op_type == "MatMul").count()
    };
    let before = matmuls(&m);
    assert_eq!(v2l_graphs::passes::fuse_rope(&mut m, path), expected);
    assert_eq!(
        matmuls(&m),
        before - expected,
        "one rotation product per RoPE"
    );
    assert_eq!(
        v2l_graphs::passes::fuse_rope(&mut m, path),
        0,
        "nothing left"
    );
    let fused_path = path.with_file_name("dit_rope_fused.onnx");
    v2l_graphs::write_model(&fused_path, &m).unwrap();
    let plain = Model::load(path, &SessionOptions::default())
        .unwrap()
        .run(feed)
        .unwrap();
    let fused = Model::load(&fused_path, &SessionOptions::default())
        .unwrap()
        .run(feed)
        .unwrap();
    let (p, f) = (&plain["sample"], &fused["sample"]);
    let err = f.rel_l2(p);
    eprintln!("fused RoPE: {err:.2e} from the exported form");
    assert!(err <= 1e-6, "fused RoPE: {err:e} from the exported form");
    assert_close("fused RoPE sample", f, want, tol);
    f.clone()
}
