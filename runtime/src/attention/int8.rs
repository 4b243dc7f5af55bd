//! The int8 kernel, after SageAttention: q·kᵀ in int8 by `vpdpbusd` (AVX512-VNNI), softmax in
//! f32 and p·v in bf16 by the flash loop it shares with the bf16 kernel ([`super::bf16::flash`]).
//!
//! 1. K is smoothed: its mean over the head's tokens is subtracted from every key. Each score of
//!    a query row then changes by the same `q·k̄`, which softmax cancels exactly; what is left
//!    has no common offset to spend int8's range on (RoPE-rotated keys carry a large one).
//! 2. K and Q are quantised to int8 with one scale per key and per query (max |x| / 127 over
//!    its head dims, rounded to nearest): finer than SageAttention's per-block scales, for the
//!    same cost here (one multiply per score), and 1.5× more accurate on Gaussian inputs.
//! 3. `vpdpbusd` multiplies unsigned by signed bytes: queries are stored as `q + 128`, and the
//!    extra `128 · Σk` of each key (summed once per head) is taken off each score.
//! 4. The i32 sums times the two scales and `scale · log2 e` are the f32 scores the shared loop
//!    takes from there.

use std::arch::x86_64::*;

use super::bf16::{flash, padded, Scores, LANES, TILES};
use super::{Head, BLOCK_KEYS, BLOCK_ROWS};

/// Whether this CPU runs the kernel: VNNI for the scores, BF16 for the shared loop's p·v.
pub(super) fn available() -> bool {
    super::bf16::available() && std::arch::is_x86_feature_detected!("avx512vnni")
}

/// One head, as [`super::fp32::head`]; the caller checked [`available`].
pub(super) fn head(h: &Head<'_>, out: &mut dyn FnMut(usize, &[f32])) {
    // SAFETY: `available()` was checked by the caller (`Kernel::detect`).
    unsafe { flash(h, out, Int8Scores::new(h)) }
}

/// Symmetric int8 codes of `x` at `scale` (`x / scale`, rounded, within ±127).
fn quantise(x: f32, inv_scale: f32) -> i8 {
    (x * inv_scale).round().clamp(-127.0, 127.0) as i8
}

/// The scale that maps the largest |x| to 127 (1 for an all-zero block).
fn scale_of(max_abs: f32) -> f32 {
    if max_abs > 0.0 {
        max_abs / 127.0
    } else {
        1.0
    }
}

/// Smoothed, quantised keys in the layout `vpdpbusd` reads (`[key/16][dim quad][16 keys][4]`),
/// each key's code sum and scale; the loaded query block as `q + 128` quads and their scales.
struct Int8Scores {
    kp: Vec<i8>,
    /// `128 · Σ_d k[j][d]` per key: what the `+ 128` of the query codes adds to its score.
    kbias: Vec<i32>,
    kscale: Vec<f32>,
    q: Vec<u32>,
    /// Each loaded query's scale times `scale · log2 e`.
    qscale: [f32; BLOCK_ROWS],
    quads: usize,
    softmax_scale: f32,
}

impl Int8Scores {
    fn new(h: &Head<'_>) -> Int8Scores {
        let (dp, kv_pad) = padded(h);
        let dh = h.head_dim;
        let quads = dp / 4;
        // 1. The keys' mean over tokens.
        let mut mean = vec![0f64; dh];
        for j in 0..h.kv_len {
            for (m, &x) in mean.iter_mut().zip(h.k_row(j)) {
                *m += f64::from(x);
            }
        }
        let mean: Vec<f32> = mean.iter().map(|m| (m / h.kv_len as f64) as f32).collect();
        // 2. One scale per key, codes in the VNNI layout, and each key's code sum.
        let mut kscale = vec![1f32; kv_pad];
        let mut kp = vec![0i8; kv_pad * dp];
        let mut kbias = vec![0i32; kv_pad];
        let mut row = vec![0f32; dh];
        for j in 0..h.kv_len {
            for ((r, &x), &k) in row.iter_mut().zip(h.k_row(j)).zip(&mean) {
                *r = x - k;
            }
            kscale[j] = scale_of(row.iter().fold(0f32, |m, x| m.max(x.abs())));
            let inv = 1.0 / kscale[j];
            let (tile, lane) = (j / LANES, j % LANES);
            let mut sum = 0i32;
            for (d, &x) in row.iter().enumerate() {
                let c = quantise(x, inv);
                sum += i32::from(c);
                kp[((tile * quads + d / 4) * LANES + lane) * 4 + d % 4] = c;
            }
            kbias[j] = 128 * sum;
        }
        Int8Scores {
            kp,
            kbias,
            kscale,
            q: vec![0u32; BLOCK_ROWS * quads],
            qscale: [0.0; BLOCK_ROWS],
            quads,
            softmax_scale: h.scale * std::f32::consts::LOG2_E,
        }
    }
}

impl Scores for Int8Scores {
    fn load_queries(&mut self, h: &Head<'_>, r0: usize, rows: usize) {
        let quads = self.quads;
        // Zero queries (`128` codes) past `rows`, and zero pads past the head dim.
        self.q.fill(0x8080_8080);
        self.qscale.fill(0.0);
        for r in 0..rows {
            let qr = h.q_row(r0 + r);
            let scale = scale_of(qr.iter().fold(0f32, |m, x| m.max(x.abs())));
            let inv = 1.0 / scale;
            self.qscale[r] = scale * self.softmax_scale;
            for p in 0..quads {
                let mut word = 0u32;
                for i in 0..4 {
                    let c = qr.get(4 * p + i).map_or(0, |&x| quantise(x, inv));
                    word |= u32::from((i32::from(c) + 128) as u8) << (8 * i);
                }
                self.q[r * quads + p] = word;
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512vnni")]
    unsafe fn tile(&self, g: usize, kb: usize, s: *mut f32) {
        let quads = self.quads;
        let q = self.q.as_ptr().add(g * 4 * quads);
        let k = self.kp.as_ptr().add(kb * TILES * quads * LANES * 4);
        let mut acc = [[_mm512_setzero_si512(); TILES]; 4];
        for p in 0..quads {
            let mut kv = [_mm512_setzero_si512(); TILES];
            for (t, x) in kv.iter_mut().enumerate() {
                *x = _mm512_loadu_si512(k.add((t * quads + p) * LANES * 4).cast());
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let qb = _mm512_set1_epi32(*q.add(r * quads + p) as i32);
                for (t, a) in row.iter_mut().enumerate() {
                    *a = _mm512_dpbusd_epi32(*a, qb, kv[t]);
                }
            }
        }
        let bias = self.kbias.as_ptr().add(kb * BLOCK_KEYS);
        let kscale = self.kscale.as_ptr().add(kb * BLOCK_KEYS);
        for (r, row) in acc.iter().enumerate() {
            let qs = _mm512_set1_ps(self.qscale[g * 4 + r]);
            for (t, a) in row.iter().enumerate() {
                let b = _mm512_loadu_si512(bias.add(t * LANES).cast());
                let ks = _mm512_mul_ps(qs, _mm512_loadu_ps(kscale.add(t * LANES)));
                let exact = _mm512_sub_epi32(*a, b);
                _mm512_storeu_ps(
                    s.add(r * BLOCK_KEYS + t * LANES),
                    _mm512_mul_ps(_mm512_cvtepi32_ps(exact), ks),
                );
            }
        }
    }
}
