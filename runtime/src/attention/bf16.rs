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

use std::arch::x86_64::*;

use super::{Head, BLOCK_KEYS, BLOCK_ROWS};

/// Dimensions per vector and keys per K tile.
pub(super) const LANES: usize = 16;
/// K tiles (of 16 keys) per key block.
pub(super) const TILES: usize = BLOCK_KEYS / LANES;

/// Whether this CPU runs the kernel.
pub(super) fn available() -> bool {
    crate::cpu::avx512_bf16()
}

/// Round-to-nearest-even bf16 bits of a finite f32.
#[inline(always)]
pub(super) fn bf16(x: f32) -> u16 {
    let b = x.to_bits();
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
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

/// How a kernel computes its scores: q·kᵀ for 4 query rows against one block of keys, as f32
/// already multiplied by `scale · log2 e` (the softmax runs in base 2). The rest of the flash
/// loop (softmax, p·v in bf16) is [`flash`]'s, shared by the kernels.
pub(super) trait Scores {
    /// Prepares query rows `r0..r0 + rows` (the rest of the block are zero queries).
    fn load_queries(&mut self, h: &Head<'_>, r0: usize, rows: usize);
    /// Writes the scores of query rows `4g..4g + 4` of the loaded block against key block `kb`
    /// to `s` (4 rows of `BLOCK_KEYS`).
    ///
    /// # Safety
    /// The CPU has the kernel's features; `s` has room for `4 · BLOCK_KEYS` values.
    unsafe fn tile(&self, g: usize, kb: usize, s: *mut f32);
}

/// The bf16 kernel's scores: K rounded to bf16 once, in the pair-interleaved layout
/// `vdpbf16ps` reads (`[key/16][dim pair][16 keys][2]`), queries scaled then rounded.
struct Bf16Scores {
    kp: Vec<u16>,
    q: Vec<u32>,
    pairs: usize,
    qscale: f32,
}

impl Bf16Scores {
    fn new(h: &Head<'_>) -> Bf16Scores {
        let (dp, kv_pad) = padded(h);
        let pairs = dp / 2;
        let mut kp = vec![0u16; kv_pad * dp];
        for j in 0..h.kv_len {
            let (tile, lane) = (j / LANES, j % LANES);
            for (d, &x) in h.k_row(j).iter().enumerate() {
                kp[((tile * pairs + d / 2) * LANES + lane) * 2 + d % 2] = bf16(x);
            }
        }
        Bf16Scores {
            kp,
            q: vec![0u32; BLOCK_ROWS * pairs],
            pairs,
            qscale: h.scale * std::f32::consts::LOG2_E,
        }
    }
}

impl Scores for Bf16Scores {
    fn load_queries(&mut self, h: &Head<'_>, r0: usize, rows: usize) {
        let pairs = self.pairs;
        self.q.fill(0);
        for r in 0..rows {
            let qr = h.q_row(r0 + r);
            for p in 0..pairs {
                let lo = qr.get(2 * p).map_or(0, |&x| bf16(x * self.qscale));
                let hi = qr.get(2 * p + 1).map_or(0, |&x| bf16(x * self.qscale));
                self.q[r * pairs + p] = lo as u32 | (hi as u32) << 16;
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn tile(&self, g: usize, kb: usize, s: *mut f32) {
        let pairs = self.pairs;
        scores_4x64(
            self.q.as_ptr().add(g * 4 * pairs),
            pairs,
            self.kp.as_ptr().add(kb * TILES * pairs * LANES * 2),
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
    let mut vp = vec![0u16; kv_pad * dp];
    for j in 0..h.kv_len {
        let t = j / 2;
        for (d, &x) in h.v_row(j).iter().enumerate() {
            vp[((t * dtiles + d / LANES) * LANES + d % LANES) * 2 + j % 2] = bf16(x);
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
            for g in 0..groups {
                scores_of.tile(g, kb, scores.as_mut_ptr().add(g * 4 * BLOCK_KEYS));
            }
            for r in 0..rows {
                let s = scores.as_mut_ptr().add(r * BLOCK_KEYS);
                // Padded keys score -inf.
                for j in valid..BLOCK_KEYS {
                    *s.add(j) = f32::NEG_INFINITY;
                }
                let mut m = _mm512_loadu_ps(s);
                for t in 1..TILES {
                    m = _mm512_max_ps(m, _mm512_loadu_ps(s.add(t * LANES)));
                }
                let m_new = max[r].max(_mm512_reduce_max_ps(m));
                let alpha = (max[r] - m_new).exp2();
                max[r] = m_new;
                let mv = _mm512_set1_ps(m_new);
                let mut l = _mm512_setzero_ps();
                for t in 0..TILES {
                    let p = exp2(_mm512_sub_ps(_mm512_loadu_ps(s.add(t * LANES)), mv));
                    l = _mm512_add_ps(l, p);
                    let pb: __m256bh = _mm512_cvtneps_pbh(p);
                    _mm256_storeu_si256(
                        probs.as_mut_ptr().add(r * BLOCK_KEYS + t * LANES).cast(),
                        std::mem::transmute::<__m256bh, __m256i>(pb),
                    );
                }
                sum[r] = _mm512_fmadd_ps(sum[r], _mm512_set1_ps(alpha), l);
                if alpha != 1.0 {
                    let a = _mm512_set1_ps(alpha);
                    let row = acc.as_mut_ptr().add(r * dp);
                    for d in 0..dtiles {
                        let x = row.add(d * LANES);
                        _mm512_storeu_ps(x, _mm512_mul_ps(_mm512_loadu_ps(x), a));
                    }
                }
            }
            for r in rows..groups * 4 {
                probs[r * BLOCK_KEYS..(r + 1) * BLOCK_KEYS].fill(0);
            }
            let v_block = vp.as_ptr().add(kb * (BLOCK_KEYS / 2) * dtiles * LANES * 2);
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

/// `2^x` for `x ≤ 0` (scores minus their running max), to ~3e-6 relative (the result is
/// rounded to bf16, 4e-3, next): `2^n · 2^f` with `n = round(x)`, `f ∈ [-½, ½]` by its Taylor
/// series to degree 5.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn exp2(x: __m512) -> __m512 {
    let x = _mm512_max_ps(x, _mm512_set1_ps(-126.0));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
    let f = _mm512_sub_ps(x, n);
    const C: [f32; 6] = [
        1.0,
        std::f32::consts::LN_2,
        0.240_226_5,
        0.055_504_11,
        0.009_618_129,
        0.001_333_355_8,
    ];
    let mut p = _mm512_set1_ps(C[5]);
    for c in C[..5].iter().rev() {
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(*c));
    }
    _mm512_scalef_ps(p, n)
}
