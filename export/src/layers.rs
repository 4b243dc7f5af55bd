//! Building blocks several architectures share, each as diffusers computes it.

use v2l_contracts::io::effect as effect_io;
use v2l_graphs::{DType, Dim, Graph, Value};

/// diffusers' `get_timestep_embedding` (`Timesteps`): `[B]` float timesteps → `[B, dim]`
/// `[sin, cos]` (or `[cos, sin]` with `flip`), frequencies `exp(-ln(10000)·i / (dim/2 − shift))`
/// in diffusers' float32 arithmetic.
pub(crate) fn sinusoid(g: &mut Graph, t: &Value, dim: usize, flip: bool, shift: i64) -> Value {
    let half = dim / 2;
    let c = -(10000f64.ln()) as f32;
    let denom = (half as i64 - shift) as f32;
    let freqs: Vec<f32> = (0..half).map(|i| ((c * i as f32) / denom).exp()).collect();
    let f = g.const_f32(&freqs, &[1, half as i64]);
    let t = g.unsqueeze(t, &[1]);
    let arg = g.mul(&t, &f);
    let (s, c) = (g.sin(&arg), g.cos(&arg));
    if flip {
        g.concat(&[&c, &s], 1)
    } else {
        g.concat(&[&s, &c], 1)
    }
}

/// `[Dh, Dh]` matrix with `x·R = (−x₁, x₀, −x₃, x₂, …)`: the pair rotation of interleaved RoPE
/// as one exact matrix product (one ±1 per column).
pub(crate) fn rotate_pairs(g: &mut Graph, dh: i64) -> Value {
    let n = dh as usize;
    let mut r = vec![0f32; n * n];
    for (row, line) in r.chunks_exact_mut(n.max(1)).enumerate() {
        let (col, v) = if row % 2 == 0 {
            (row + 1, 1.0)
        } else {
            (row - 1, -1.0)
        };
        if let Some(x) = line.get_mut(col) {
            *x = v;
        }
    }
    g.const_f32(&r, &[dh, dh])
}

/// Interleaved RoPE `x·cos + rotate(x)·sin` on `x [B, S, heads, Dh]` with `cos`/`sin`
/// broadcasting as `[S, 1, Dh]`: the same sums as diffusers' `apply_rotary_emb` (even
/// `x₀·cos − x₁·sin`, odd `x₁·cos + x₀·sin`).
pub(crate) fn apply_rope(
    g: &mut Graph,
    x: &Value,
    cos: &Value,
    sin: &Value,
    rotate: &Value,
) -> Value {
    let xr = g.matmul(x, rotate);
    let a = g.mul(x, cos);
    let b = g.mul(&xr, sin);
    g.add(&a, &b)
}

/// `x·(1 + scale) + shift`, in diffusers' order of operations.
pub(crate) fn modulate(g: &mut Graph, x: &Value, scale: &Value, shift: &Value) -> Value {
    let one = g.scalar(1.0);
    let s = g.add(&one, scale);
    let y = g.mul(x, &s);
    g.add(&y, shift)
}

/// Scaled dot-product attention on `[B, S, heads, Dh]` tensors → `[B, S, heads·Dh]`:
/// `softmax(q·kᵀ / √Dh)·v` per head, the pattern `v2l-compile` fuses into ONNX Runtime's
/// attention kernel.
pub(crate) fn sdpa(g: &mut Graph, q: &Value, k: &Value, v: &Value, dh: i64, d: usize) -> Value {
    let q = g.transpose(q, &[0, 2, 1, 3]);
    let kt = g.transpose(k, &[0, 2, 3, 1]);
    let v = g.transpose(v, &[0, 2, 1, 3]);
    let scores = g.matmul(&q, &kt);
    let scale = g.scalar(1.0 / (dh as f32).sqrt());
    let scores = g.mul(&scores, &scale);
    let p = g.softmax(&scores, -1);
    let o = g.matmul(&p, &v);
    let o = g.transpose(&o, &[0, 2, 1, 3]);
    g.reshape_to(&o, &[0, 0, d as i64])
}

/// The exporter's attention alone: `q, k, v [batch, tokens, heads, head_dim]` → `out [batch, tokens,
/// heads·head_dim]` through [`sdpa`], for the attention kernels' benchmark and tests.
pub fn sdpa_graph(heads: i64, head_dim: i64) -> Graph {
    let mut g = Graph::new("attention");
    let dims = || {
        vec![
            "batch".into(),
            "tokens".into(),
            Dim::Fixed(heads),
            Dim::Fixed(head_dim),
        ]
    };
    let q = g.input("q", DType::F32, dims());
    let k = g.input("k", DType::F32, dims());
    let v = g.input("v", DType::F32, dims());
    let o = sdpa(&mut g, &q, &k, &v, head_dim, (heads * head_dim) as usize);
    let out = vec![
        "batch".into(),
        "tokens".into(),
        Dim::Fixed(heads * head_dim),
    ];
    g.output(&o, "out", DType::F32, out);
    g
}

/// `[batch, channels, frames, height, width]`: a channels-first video or latent input (Wan,
/// diffusers' VAEs and the hypernetwork), only the channels fixed.
pub(crate) fn video_dims(channels: usize) -> Vec<Dim> {
    vec![
        "batch".into(),
        Dim::Fixed(channels as i64),
        "frames".into(),
        "height".into(),
        "width".into(),
    ]
}

/// The inputs of a hypernetwork that reads base weights (Prompt2Effect, LoFA): one prompt's
/// `text [1, T, text_width]`, `base_weight [N, side, side]` (N layers, T tokens dynamic) and two
/// int64 `[N]` indices named `ids` (the layer's block and its type).
pub(crate) fn weight_hypernet_inputs(
    g: &mut Graph,
    text_width: usize,
    side: usize,
    ids: [&str; 2],
) -> (Value, Value, Value, Value) {
    let text = g.input(
        effect_io::TEXT,
        v2l_graphs::DType::F32,
        vec![
            Dim::Fixed(1),
            "text_len".into(),
            Dim::Fixed(text_width as i64),
        ],
    );
    let s = Dim::Fixed(side as i64);
    let w = g.input(
        effect_io::BASE_WEIGHT,
        v2l_graphs::DType::F32,
        vec!["layers".into(), s.clone(), s],
    );
    let [a, b] = ids.map(|n| g.input(n, v2l_graphs::DType::I64, vec!["layers".into()]));
    (text, w, a, b)
}
