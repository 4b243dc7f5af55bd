//! The int8 kernel, after SageAttention: q·kᵀ in int8 by `vpdpbusd` (AVX512-VNNI), softmax in
//! f32 and p·v in bf16 by the flash loop it shares with the bf16 kernel ([`super::bf16::flash`]).
//!
//! 1. K is smoothed: its mean over the head's tokens is subtracted from every key. Each score of
//!    a query row then changes by the same `q·k̄`, which softmax cancels exactly; what is left
//!    has no common offset to spend int8's range on (RoPE-rotated keys carry a large one).
//! 2. K and Q are quantised to int8 with one scale per key and per query (max |x| / 127 over
//!    its head dims, rounded to nearest): finer than SageAttention's per-block scales, for the
//!    same cost here (one multiply per score), and 1.5× more accurate on Gaussian inputs.
//! 3. `vpdpbusd` multiplies unsigned by signed bytes: queries are stored as `q + 128`, and each
//!    score's sum starts at `-128 · Σk` of its key (summed once per head), which takes that off.
//! 4. The i32 sums times the key's scale are the f32 scores the shared loop takes from there;
//!    the query's scale times `scale · log2 e` is its row scale, which the softmax folds into
//!    its subtraction of the max.

use std::arch::x86_64::*;

use super::bf16::{flash, lane_mask, padded, row_vec, Scores, LANES, TILES};
use super::head::{Head, BLOCK_KEYS, BLOCK_ROWS};

/// Whether this CPU runs the kernel: VNNI for the scores, BF16 for the shared loop's p·v.
pub(super) fn available() -> bool {
    super::bf16::available() && std::arch::is_x86_feature_detected!("avx512vnni")
}

/// One head, as [`super::fp32::head`]; the caller checked [`available`].
pub(super) fn head(h: &Head<'_>, out: &mut dyn FnMut(usize, &[f32])) {
    // SAFETY: `available()` was checked by the caller (`Kernel::detect`).
    unsafe { flash(h, out, Int8Scores::new(h)) }
}

/// A row's symmetric int8 codes, 16 dims per vector: the largest |x| maps to 127 (scale 1
/// for an all-zero row), rounded to nearest. Returns the scale; `code(c)` gets chunk `c`'s 16
/// codes as i32 lanes (zeros past the row's end).
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn quantise(x: &[__m512], mut code: impl FnMut(usize, __m512i)) -> f32 {
    let top = x.iter().fold(_mm512_setzero_ps(), |m, &v| {
        _mm512_max_ps(m, _mm512_abs_ps(v))
    });
    let max_abs = _mm512_reduce_max_ps(top);
    let scale = if max_abs > 0.0 { max_abs / 127.0 } else { 1.0 };
    let inv = _mm512_set1_ps(1.0 / scale);
    let (lo, hi) = (_mm512_set1_epi32(-127), _mm512_set1_epi32(127));
    for (c, &v) in x.iter().enumerate() {
        // `vcvtps2dq` rounds to nearest even (the default MXCSR mode).
        let q = _mm512_cvtps_epi32(_mm512_mul_ps(v, inv));
        code(c, _mm512_min_epi32(_mm512_max_epi32(q, lo), hi));
    }
    scale
}

/// 16 i32 lanes within ±127 (plus `add`) as 16 bytes: 4 quads of consecutive dims.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn bytes(codes: __m512i, add: i32) -> __m128i {
    _mm512_cvtepi32_epi8(_mm512_add_epi32(codes, _mm512_set1_epi32(add)))
}

/// Smoothed, quantised keys in the layout `vpdpbusd` reads (`[key/16][dim quad][16 keys][4]`),
/// each key's code sum and scale; the loaded query block as `q + 128` quads and their scales.
struct Int8Scores {
    kp: Vec<u32>,
    /// `-128 · Σ_d k[j][d]` per key: what the `+ 128` of the query codes adds to its score,
    /// taken off by starting each score's sum there.
    kbias: Vec<i32>,
    kscale: Vec<f32>,
    q: Vec<u32>,
    /// Each loaded query's scale times `scale · log2 e`.
    qscale: [f32; BLOCK_ROWS],
    quads: usize,
    softmax_scale: f32,
}

impl Int8Scores {
    /// # Safety
    /// The CPU runs the kernel ([`available`]).
    #[target_feature(enable = "avx512f,avx512vnni")]
    unsafe fn new(h: &Head<'_>) -> Int8Scores {
        let (dp, kv_pad) = padded(h);
        let chunks = dp / LANES;
        let quads = dp / 4;
        // 1. The keys' mean over tokens (its precision only sets the codes' range: any
        //    common offset cancels in softmax).
        let mut mean = vec![_mm512_setzero_ps(); chunks];
        for j in 0..h.kv_len {
            let row = h.k_row(j);
            for (c, m) in mean.iter_mut().enumerate() {
                *m = _mm512_add_ps(*m, row_vec(row, c));
            }
        }
        let inv_n = _mm512_set1_ps(1.0 / h.kv_len as f32);
        for m in &mut mean {
            *m = _mm512_mul_ps(*m, inv_n);
        }
        // 2. One scale per key, codes in the VNNI layout, and each key's code sum.
        let mut kscale = vec![1f32; kv_pad];
        let mut kp = vec![0u32; kv_pad * quads];
        let mut kbias = vec![0i32; kv_pad];
        let mut row = vec![_mm512_setzero_ps(); chunks];
        let mut words = vec![0u32; quads];
        for j in 0..h.kv_len {
            let k = h.k_row(j);
            for (c, (r, &m)) in row.iter_mut().zip(&mean).enumerate() {
                // The mean only where the row has dims: pads stay zero.
                let n = h.head_dim.saturating_sub(c * LANES).min(LANES);
                *r = _mm512_maskz_sub_ps(lane_mask(n), row_vec(k, c), m);
            }
            let mut sum = 0i32;
            kscale[j] = quantise(&row, |c, codes| {
                sum += _mm512_reduce_add_epi32(codes);
                _mm_storeu_si128(words.as_mut_ptr().add(4 * c).cast(), bytes(codes, 0));
            });
            kbias[j] = -128 * sum;
            let (tile, lane) = (j / LANES, j % LANES);
            for (p, &w) in words.iter().enumerate() {
                kp[(tile * quads + p) * LANES + lane] = w;
            }
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

    #[target_feature(enable = "avx512f")]
    unsafe fn load(&mut self, h: &Head<'_>, r0: usize, rows: usize) {
        let quads = self.quads;
        // Zero queries (`128` codes) past `rows`.
        self.q.fill(0x8080_8080);
        self.qscale.fill(0.0);
        let mut x = vec![_mm512_setzero_ps(); quads / 4];
        for r in 0..rows {
            let qr = h.q_row(r0 + r);
            for (c, v) in x.iter_mut().enumerate() {
                *v = row_vec(qr, c);
            }
            let words = self.q.as_mut_ptr().add(r * quads);
            let scale = quantise(&x, |c, codes| {
                _mm_storeu_si128(words.add(4 * c).cast(), bytes(codes, 128));
            });
            self.qscale[r] = scale * self.softmax_scale;
        }
    }
}

impl Scores for Int8Scores {
    fn load_queries(&mut self, h: &Head<'_>, r0: usize, rows: usize) {
        // SAFETY: made by `new`, whose condition is that the CPU runs the kernel.
        unsafe { self.load(h, r0, rows) }
    }

    fn row_scales(&self) -> &[f32; BLOCK_ROWS] {
        &self.qscale
    }

    #[target_feature(enable = "avx512f,avx512vnni")]
    unsafe fn tile(&self, g: usize, kb: usize, s: *mut f32) {
        let quads = self.quads;
        let q = self.q.as_ptr().add(g * 4 * quads);
        let k = self.kp.as_ptr().add(kb * TILES * quads * LANES);
        let bias = self.kbias.as_ptr().add(kb * BLOCK_KEYS);
        let start: [__m512i; TILES] =
            std::array::from_fn(|t| _mm512_loadu_si512(bias.add(t * LANES).cast()));
        let mut acc = [start; 4];
        for p in 0..quads {
            let mut kv = [_mm512_setzero_si512(); TILES];
            for (t, x) in kv.iter_mut().enumerate() {
                *x = _mm512_loadu_si512(k.add((t * quads + p) * LANES).cast());
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let qb = _mm512_set1_epi32(*q.add(r * quads + p) as i32);
                for (t, a) in row.iter_mut().enumerate() {
                    *a = _mm512_dpbusd_epi32(*a, qb, kv[t]);
                }
            }
        }
        // The query's scale is its row scale, applied by the softmax.
        let kscale = self.kscale.as_ptr().add(kb * BLOCK_KEYS);
        let ks: [__m512; TILES] = std::array::from_fn(|t| _mm512_loadu_ps(kscale.add(t * LANES)));
        for (r, row) in acc.iter().enumerate() {
            for (t, a) in row.iter().enumerate() {
                _mm512_storeu_ps(
                    s.add(r * BLOCK_KEYS + t * LANES),
                    _mm512_mul_ps(_mm512_cvtepi32_ps(*a), ks[t]),
                );
            }
        }
    }
}
