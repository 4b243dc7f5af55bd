//! The AVX512-BF16 kernel, and the flash loop it shares with the int8 kernel ([`flash`], over
//! a [`Scores`] provider). Per head:
//!
//! 1. K and V are rounded to bf16 once, in the pair-interleaved layouts `vdpbf16ps` reads:
//!    K as `[key/16][dim pair][16 keys][2]`, V as `[key pair][dim/16][16 dims][2]`;
//! 2. for each block of `BLOCK_ROWS` queries (scaled by `scale·log2 e`, rounded to bf16), each
//!    block of `BLOCK_KEYS` keys: scores `q·kᵀ` by `vdpbf16ps` into f32 (4 rows × 64 keys in
//!    registers), then online softmax in f32 (`exp2`, running max and sum), then the
//!    probabilities rounded to bf16 and `p·v` by `vdpbf16ps` into the f32 accumulator;
//! 3. the accumulator divided by the running sum.
//!
//! Scores exist only as one `BLOCK_ROWS × BLOCK_KEYS` tile. Rounding is the only difference
//! from f32 attention: inputs and probabilities carry 8 significant bits, sums are f32.
//!
//! The softmax is a third of the work beside the two products, so it is kept lean: a row's
//! running max moves only when a score passes it by more than [`LAZY`] (probabilities up to
//! `2^LAZY`, exact after the final division), which skips the horizontal max and the rescale
//! on almost every block; `exp2` is a degree-3 polynomial (7.5e-5 relative, below the bf16
//! rounding of the probabilities, 2e-3, that follows).

use std::arch::x86_64::*;

use super::head::{Head, BLOCK_KEYS, BLOCK_ROWS};

/// Dimensions per vector and keys per K tile.
pub(super) const LANES: usize = 16;
/// K tiles (of 16 keys) per key block.
pub(super) const TILES: usize = BLOCK_KEYS / LANES;
/// How far (base 2) a score may rise above its row's running max before the max moves: the
/// probabilities stay below `2^8`, far inside f32 and bf16 range.
const LAZY: f32 = 8.0;

/// Whether this CPU runs the kernel.
pub(super) fn available() -> bool {
    crate::cpu::avx512_bf16()
}

/// One head, as [`super::fp32::head`]; the caller checked [`available`].
pub(super) fn head(h: &Head<'_>, out: &mut dyn FnMut(usize, &[f32])) {
    // SAFETY: `available()` was checked by the caller (`Kernel::detect`).
    unsafe { flash(h, out, Bf16Scores::new(h)) }
}

/// Head dims padded to whole vectors (zero pads change no dot product), and keys to whole
/// blocks.
pub(super) fn padded(h: &Head<'_>) -> (usize, usize) {
    (
        h.head_dim.div_ceil(LANES) * LANES,
        h.kv_len.div_ceil(BLOCK_KEYS) * BLOCK_KEYS,
    )
}

/// Dims `16c..16c + 16` of a row as a vector, zeros past its end.
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) unsafe fn row_vec(row: &[f32], c: usize) -> __m512 {
    let n = row.len().saturating_sub(c * LANES).min(LANES);
    // Lanes past `n` are neither read nor faulted on.
    _mm512_maskz_loadu_ps(lane_mask(n), row.as_ptr().wrapping_add(c * LANES))
}

/// The first `n` (≤ 16) lanes.
#[inline(always)]
pub(super) fn lane_mask(n: usize) -> __mmask16 {
    ((1u32 << n) - 1) as __mmask16
}

/// 16 f32 rounded to bf16 (nearest even), as 16 `u16` zero-extended into `u32` lanes.
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
unsafe fn bf16_lanes(x: __m512) -> __m512i {
    _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(
        _mm512_cvtneps_pbh(x),
    ))
}

/// Two rows' bf16 values side by side per lane: `lo | hi << 16` (a `vdpbf16ps` pair).
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
unsafe fn bf16_pairs(lo: __m512, hi: __m512) -> __m512i {
    _mm512_or_si512(bf16_lanes(lo), _mm512_slli_epi32::<16>(bf16_lanes(hi)))
}

/// 32 consecutive dims (`lo`, then `hi`) rounded to bf16, as 16 `u32` pairs of neighbours.
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
unsafe fn bf16_run(lo: __m512, hi: __m512) -> __m512i {
    std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo))
}

/// How a kernel computes its scores: q·kᵀ for 4 query rows against one block of keys, as f32
/// that become base-2 logits once multiplied by their row's scale (the softmax runs in base 2
/// and folds that multiply into its subtraction of the max). The rest of the flash loop
/// (softmax, p·v in bf16) is [`flash`]'s, shared by the kernels.
///
/// A provider is only made where its kernel runs (its constructor's safety condition).
pub(super) trait Scores {
    /// Prepares query rows `r0..r0 + rows` (the rest of the block are zero queries).
    fn load_queries(&mut self, h: &Head<'_>, r0: usize, rows: usize);
    /// Each loaded row's factor from the tile's values to base-2 logits (positive; zero for
    /// rows past those loaded is allowed).
    fn row_scales(&self) -> &[f32; BLOCK_ROWS];
    /// Writes the scores of query rows `4g..4g + 4` of the loaded block against key block `kb`
    /// to `s` (4 rows of `BLOCK_KEYS`).
    ///
    /// # Safety
    /// `s` has room for `4 · BLOCK_KEYS` values.
    unsafe fn tile(&self, g: usize, kb: usize, s: *mut f32);
}

/// The bf16 kernel's scores: K rounded to bf16 once, in the pair-interleaved layout
/// `vdpbf16ps` reads (`[key/16][dim pair][16 keys][2]`), queries scaled (by `scale · log2 e`,
/// so the row scales are 1) then rounded.
struct Bf16Scores {
    kp: Vec<u32>,
    q: Vec<u32>,
    pairs: usize,
    qscale: f32,
    ones: [f32; BLOCK_ROWS],
}

impl Bf16Scores {
    /// # Safety
    /// The CPU has AVX512-BF16 ([`available`]).
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn new(h: &Head<'_>) -> Bf16Scores {
        let (dp, kv_pad) = padded(h);
        let pairs = dp / 2;
        let mut kp = vec![0u32; kv_pad * pairs];
        // Key `j`'s pair `p` goes to `[j / 16][p][j % 16]`: 16 pairs at a time, 16 apart.
        let stride = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(LANES as i32),
        );
        for j in 0..h.kv_len {
            let (tile, lane) = (j / LANES, j % LANES);
            let row = h.k_row(j);
            for c in 0..pairs.div_ceil(LANES) {
                let words = bf16_run(row_vec(row, 2 * c), row_vec(row, 2 * c + 1));
                let first = (tile * pairs + c * LANES) * LANES + lane;
                let n = (pairs - c * LANES).min(LANES);
                _mm512_mask_i32scatter_epi32::<4>(
                    kp.as_mut_ptr().add(first).cast(),
                    lane_mask(n),
                    stride,
                    words,
                );
            }
        }
        Bf16Scores {
            kp,
            q: vec![0u32; BLOCK_ROWS * pairs],
            pairs,
            qscale: h.scale * std::f32::consts::LOG2_E,
            ones: [1.0; BLOCK_ROWS],
        }
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn load(&mut self, h: &Head<'_>, r0: usize, rows: usize) {
        let pairs = self.pairs;
        let scale = _mm512_set1_ps(self.qscale);
        self.q.fill(0);
        for r in 0..rows {
            let qr = h.q_row(r0 + r);
            for c in 0..pairs.div_ceil(LANES) {
                let words = bf16_run(
                    _mm512_mul_ps(row_vec(qr, 2 * c), scale),
                    _mm512_mul_ps(row_vec(qr, 2 * c + 1), scale),
                );
                let n = (pairs - c * LANES).min(LANES);
                _mm512_mask_storeu_epi32(
                    self.q.as_mut_ptr().add(r * pairs + c * LANES).cast(),
                    lane_mask(n),
                    words,
                );
            }
        }
    }
}

impl Scores for Bf16Scores {
    fn load_queries(&mut self, h: &Head<'_>, r0: usize, rows: usize) {
        // SAFETY: made by `new`, whose condition is that the CPU has AVX512-BF16.
        unsafe { self.load(h, r0, rows) }
    }

    fn row_scales(&self) -> &[f32; BLOCK_ROWS] {
        &self.ones
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn tile(&self, g: usize, kb: usize, s: *mut f32) {
        let pairs = self.pairs;
        scores_4x64(
            self.q.as_ptr().add(g * 4 * pairs),
            pairs,
            self.kp.as_ptr().add(kb * TILES * pairs * LANES).cast(),
            s,
        );
    }
}

/// The flash loop over one head with `scores`' q·kᵀ: for each block of `BLOCK_ROWS` queries
/// and each block of `BLOCK_KEYS` keys, the scores tile, online softmax in f32 (`exp2`,
/// running max and sum), the probabilities rounded to bf16 and `p·v` by `vdpbf16ps` into the
/// f32 accumulator; finally the accumulator divided by the running sum.
#[target_feature(enable = "avx512f,avx512bf16")]
pub(super) unsafe fn flash(
    h: &Head<'_>,
    out: &mut dyn FnMut(usize, &[f32]),
    mut scores_of: impl Scores,
) {
    let dh = h.head_dim;
    let (dp, kv_pad) = padded(h);
    let dtiles = dp / LANES;
    // V in the layout `vdpbf16ps` reads for p·v: `[key pair][dim/16][16 dims][2]`.
    let mut vp = vec![0u32; kv_pad / 2 * dp];
    let none: &[f32] = &[];
    for t in 0..h.kv_len.div_ceil(2) {
        let (even, odd) = (
            h.v_row(2 * t),
            if 2 * t + 1 < h.kv_len {
                h.v_row(2 * t + 1)
            } else {
                none
            },
        );
        for d in 0..dtiles {
            let words = bf16_pairs(row_vec(even, d), row_vec(odd, d));
            _mm512_storeu_si512(vp.as_mut_ptr().add((t * dtiles + d) * LANES).cast(), words);
        }
    }
    let mut scores = vec![0f32; BLOCK_ROWS * BLOCK_KEYS];
    let mut probs = vec![0u16; BLOCK_ROWS * BLOCK_KEYS];
    let mut acc = vec![0f32; BLOCK_ROWS * dp];
    let mut max = [f32::NEG_INFINITY; BLOCK_ROWS];
    // Running sums kept as 16 lanes per row, added across lanes once at the end.
    let mut sum = [_mm512_setzero_ps(); BLOCK_ROWS];
    let mut row_out = vec![0f32; dh];

    for r0 in (0..h.q_len).step_by(BLOCK_ROWS) {
        let rows = BLOCK_ROWS.min(h.q_len - r0);
        scores_of.load_queries(h, r0, rows);
        acc.fill(0.0);
        max.fill(f32::NEG_INFINITY);
        sum.fill(_mm512_setzero_ps());
        // Row groups of 4; rows past `rows` are zero queries whose results are dropped.
        let groups = rows.div_ceil(4);
        for kb in 0..kv_pad / BLOCK_KEYS {
            let valid = (h.kv_len - kb * BLOCK_KEYS).min(BLOCK_KEYS);
            // Padded keys: out of the max, zero probability.
            let keep: [__mmask16; TILES] =
                std::array::from_fn(|t| lane_mask(valid.saturating_sub(t * LANES).min(LANES)));
            for g in 0..groups {
                scores_of.tile(g, kb, scores.as_mut_ptr().add(g * 4 * BLOCK_KEYS));
            }
            let row_scales = scores_of.row_scales();
            for r in 0..rows {
                let s = scores.as_ptr().add(r * BLOCK_KEYS);
                let x: [__m512; TILES] = std::array::from_fn(|t| {
                    _mm512_mask_loadu_ps(
                        _mm512_set1_ps(f32::NEG_INFINITY),
                        keep[t],
                        s.add(t * LANES),
                    )
                });
                let top = x[1..].iter().fold(x[0], |m, &y| _mm512_max_ps(m, y));
                let qs = row_scales[r];
                let over = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(
                    _mm512_mul_ps(top, _mm512_set1_ps(qs)),
                    _mm512_set1_ps(max[r] + LAZY),
                );
                if over != 0 {
                    // The max moves to this block's (0 for the first block's alpha).
                    let m_new = max[r].max(_mm512_reduce_max_ps(top) * qs);
                    let alpha = (max[r] - m_new).exp2();
                    max[r] = m_new;
                    let a = _mm512_set1_ps(alpha);
                    sum[r] = _mm512_mul_ps(sum[r], a);
                    let row = acc.as_mut_ptr().add(r * dp);
                    for d in 0..dtiles {
                        let x = row.add(d * LANES);
                        _mm512_storeu_ps(x, _mm512_mul_ps(_mm512_loadu_ps(x), a));
                    }
                }
                let (mv, qv) = (_mm512_set1_ps(max[r]), _mm512_set1_ps(qs));
                let mut l = sum[r];
                for (t, &xt) in x.iter().enumerate() {
                    let p = exp2(_mm512_fmsub_ps(xt, qv, mv), keep[t]);
                    l = _mm512_add_ps(l, p);
                    let pb: __m256bh = _mm512_cvtneps_pbh(p);
                    _mm256_storeu_si256(
                        probs.as_mut_ptr().add(r * BLOCK_KEYS + t * LANES).cast(),
                        std::mem::transmute::<__m256bh, __m256i>(pb),
                    );
                }
                sum[r] = l;
            }
            for r in rows..groups * 4 {
                probs[r * BLOCK_KEYS..(r + 1) * BLOCK_KEYS].fill(0);
            }
            let v_block = vp
                .as_ptr()
                .add(kb * (BLOCK_KEYS / 2) * dtiles * LANES)
                .cast::<u16>();
            for g in 0..groups {
                let (p, a) = (
                    probs.as_ptr().add(g * 4 * BLOCK_KEYS),
                    acc.as_mut_ptr().add(g * 4 * dp),
                );
                // Four dim tiles at a time (head dims 64, 128), then one at a time.
                let wide = dtiles / 4 * 4;
                for d in (0..wide).step_by(4) {
                    pv_4rows::<4>(p, v_block, dtiles, d, a, dp);
                }
                for d in wide..dtiles {
                    pv_4rows::<1>(p, v_block, dtiles, d, a, dp);
                }
            }
        }
        for r in 0..rows {
            let inv = 1.0 / _mm512_reduce_add_ps(sum[r]);
            for (o, a) in row_out.iter_mut().zip(&acc[r * dp..r * dp + dh]) {
                *o = a * inv;
            }
            out(r0 + r, &row_out);
        }
    }
}

/// Scores of 4 query rows (`pairs` bf16 pairs each, row stride `pairs`) against one key block
/// (`TILES` tiles of 16 keys), written as 4 rows of `BLOCK_KEYS` f32.
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
unsafe fn scores_4x64(q: *const u32, pairs: usize, k: *const u16, s: *mut f32) {
    let mut acc = [[_mm512_setzero_ps(); TILES]; 4];
    for p in 0..pairs {
        let mut kv = [_mm512_setzero_si512(); TILES];
        for (t, x) in kv.iter_mut().enumerate() {
            *x = _mm512_loadu_si512(k.add((t * pairs + p) * LANES * 2).cast());
        }
        for (r, row) in acc.iter_mut().enumerate() {
            let qb = _mm512_set1_epi32(*q.add(r * pairs + p) as i32);
            for (t, a) in row.iter_mut().enumerate() {
                *a = _mm512_dpbf16_ps(*a, bh(qb), bh(kv[t]));
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (t, a) in row.iter().enumerate() {
            _mm512_storeu_ps(s.add(r * BLOCK_KEYS + t * LANES), *a);
        }
    }
}

/// `acc[4 rows][ND dim tiles from d0] += p[4 rows][BLOCK_KEYS] · v_block`.
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
unsafe fn pv_4rows<const ND: usize>(
    p: *const u16,
    v: *const u16,
    dtiles: usize,
    d0: usize,
    acc: *mut f32,
    dp: usize,
) {
    let mut a = [[_mm512_setzero_ps(); ND]; 4];
    for (r, row) in a.iter_mut().enumerate() {
        for (d, x) in row.iter_mut().enumerate() {
            *x = _mm512_loadu_ps(acc.add(r * dp + (d0 + d) * LANES));
        }
    }
    let p32 = p.cast::<u32>();
    for t in 0..BLOCK_KEYS / 2 {
        let mut vv = [_mm512_setzero_si512(); ND];
        for (d, x) in vv.iter_mut().enumerate() {
            *x = _mm512_loadu_si512(v.add((t * dtiles + d0 + d) * LANES * 2).cast());
        }
        for (r, row) in a.iter_mut().enumerate() {
            let pb = _mm512_set1_epi32(p32.add(r * BLOCK_KEYS / 2 + t).read_unaligned() as i32);
            for (d, x) in row.iter_mut().enumerate() {
                *x = _mm512_dpbf16_ps(*x, bh(pb), bh(vv[d]));
            }
        }
    }
    for (r, row) in a.iter().enumerate() {
        for (d, x) in row.iter().enumerate() {
            _mm512_storeu_ps(acc.add(r * dp + (d0 + d) * LANES), *x);
        }
    }
}

#[inline(always)]
fn bh(x: __m512i) -> __m512bh {
    // SAFETY: both are 512 bits of plain data.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(x) }
}

/// `2^x` in the lanes of `keep` (zero elsewhere), for `x ≤ LAZY` (scores minus their row's
/// max): `2^n · 2^f` with `n = round(x)`, `f ∈ [-½, ½]` by a degree-3 polynomial fitted for
/// relative error (7.5e-5 at most; the result is rounded to bf16, 2e-3, next). Far below the
/// max, `2^n` underflows to zero by `vscalefps`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn exp2(x: __m512, keep: __mmask16) -> __m512 {
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
    let f = _mm512_sub_ps(x, n);
    const C: [f32; 4] = [0.999_928_1, 0.693_260_97, 0.242_610_54, 0.055_171_32];
    let mut p = _mm512_set1_ps(C[3]);
    for c in C[..3].iter().rev() {
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(*c));
    }
    _mm512_maskz_scalef_ps(keep, p, n)
}
