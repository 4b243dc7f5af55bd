//! The AVX512-BF16 kernel.
//!
//! 1. The input is rounded to bf16 once per call into zero-padded rows
//!    (`[sample][frame][padded row][channel pair][padded column]`, each u32 two channels of
//!    one pixel), so 16 neighbouring pixels of a channel pair are one vector;
//! 2. the weights were rounded once per node (`[cout][tap][channel pair]`, [`pack_weights`]);
//! 3. each output row is cut into tiles of 6 output channels × 64 pixels, 24 f32 accumulators:
//!    for every tap and channel pair, 4 vectors of pixels meet 6 broadcast weight pairs in
//!    `vdpbf16ps`. The tile is written straight into the `[N, M, T, H, W]` output.
//!
//! Rounding inputs and weights to bf16 is the only difference from an f32 convolution: every
//! product of two bf16 values is exact in f32, and the sums are f32.

use std::arch::x86_64::*;

use super::geometry::{pack_rows, Shape};
use crate::attention::ParFor;

/// The output pointer shared by tasks that write disjoint output rows: each task writes only
/// the rows of its own (sample, frame, row).
type Out = crate::attention::Out<f32>;

/// Pixels per vector.
const LANES: usize = 16;
/// Output channels per tile.
const CO_TILE: usize = 6;
/// Pixel vectors per tile.
const PX_VECS: usize = 4;

/// Whether this CPU runs the kernel.
pub(super) fn available() -> bool {
    crate::cpu::avx512_bf16()
}

/// Round-to-nearest-even bf16 bits of an f32 (NaN stays NaN), as `vcvtneps2bf16` rounds.
#[inline(always)]
fn bf16(x: f32) -> u32 {
    u32::from(half::bf16::from_f32(x).to_bits())
}

/// Two channels' bf16 values as one `vdpbf16ps` pair.
#[inline(always)]
fn pair(lo: f32, hi: f32) -> u32 {
    bf16(lo) | bf16(hi) << 16
}

/// `w [cout][cin][tap]` as bf16 channel pairs `[cout][tap][cin pair]` (an odd last channel is
/// paired with zero).
pub(super) fn pack_weights(shape: &Shape, w: &[f32]) -> Vec<u32> {
    let (taps, pairs, cin) = (shape.taps(), shape.cin.div_ceil(2), shape.cin);
    let mut out = vec![0u32; shape.cout * taps * pairs];
    for co in 0..shape.cout {
        let at = |ci: usize, tap: usize| {
            if ci < cin {
                w[(co * cin + ci) * taps + tap]
            } else {
                0.0
            }
        };
        for tap in 0..taps {
            for p in 0..pairs {
                out[(co * taps + tap) * pairs + p] = pair(at(2 * p, tap), at(2 * p + 1, tap));
            }
        }
    }
    out
}

/// Strides of the packed input, in u32.
struct Geometry {
    pairs: usize,
    /// One padded row of one channel pair.
    ws: usize,
    /// One padded row of every pair.
    row: usize,
    /// One frame.
    frame: usize,
    kernel: [usize; 3],
    /// One output channel's weights.
    wstride: usize,
}

/// One tile's pointers: the packed input at its first pixel (tap 0), the weights and biases of
/// its first output channel, its output at the first channel and pixel.
struct Tile<'g> {
    x: *const u32,
    w: *const u32,
    bias: *const f32,
    out: *mut f32,
    /// Output elements between two output channels.
    co_stride: usize,
    /// Output pixels from this tile's first to the row's end.
    valid: usize,
    geo: &'g Geometry,
}

/// The convolution; the caller checked [`available`] and the lengths.
pub(super) fn conv(shape: &Shape, x: &[f32], w: &[u32], bias: &[f32], out: Out, par: ParFor<'_>) {
    let fill = |lo: &[f32], hi: Option<&[f32]>, dst: &mut [u32]| {
        // SAFETY: the caller checked `available()`; the slices have equal lengths.
        unsafe { round_row(lo, hi, dst) }
    };
    let packed = pack_rows(shape, x, 2, par, &fill);
    let [t, _, _] = shape.input;
    let [to, ho, wo] = shape.output().unwrap_or([0; 3]);
    let (hp, ws) = shape.padded_rows();
    let pairs = shape.cin.div_ceil(2);
    let geo = Geometry {
        pairs,
        ws,
        row: pairs * ws,
        frame: hp * pairs * ws,
        kernel: shape.kernel,
        wstride: shape.taps() * pairs,
    };
    let co_stride = to * ho * wo;
    par(shape.batch * to * ho, &|i| {
        // The whole `Out` (Sync), not its raw pointer field, is what the closure borrows.
        let dst = &out;
        let (b, r) = (i / (to * ho), i % (to * ho));
        let (ti, hi) = (r / ho, r % ho);
        for w0 in (0..wo).step_by(LANES * PX_VECS) {
            let mut c0 = 0;
            while c0 < shape.cout {
                let rows = if shape.cout - c0 >= CO_TILE {
                    CO_TILE
                } else {
                    1
                };
                // SAFETY: every offset lies in its buffer: the packed input holds `t` frames
                // of `hp` rows of `ws ≥ w0 + 64 + kw - 1` columns per pair (loads past `wo`
                // read padding), `w`/`bias` hold `cout` channels, and the output row
                // `(b, c0.., ti, hi)` has `wo` pixels, of which the tile writes `valid`; no
                // other task writes this (sample, frame, row).
                unsafe {
                    let tile = Tile {
                        x: packed
                            .as_ptr()
                            .add((b * t + ti) * geo.frame + hi * geo.row + w0),
                        w: w.as_ptr().add(c0 * geo.wstride),
                        bias: bias.as_ptr().add(c0),
                        out: dst
                            .0
                            .add(((b * shape.cout + c0) * to + ti) * ho * wo + hi * wo + w0),
                        co_stride,
                        valid: wo - w0,
                        geo: &geo,
                    };
                    let vecs = (wo - w0).div_ceil(LANES).min(PX_VECS);
                    if rows == CO_TILE {
                        tile_any::<CO_TILE>(&tile, vecs);
                    } else {
                        tile_any::<1>(&tile, vecs);
                    }
                }
                c0 += rows;
            }
        }
    });
}

/// [`tile`] with `vecs` (1 to 4) pixel vectors.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile_any<const R: usize>(t: &Tile<'_>, vecs: usize) {
    match vecs {
        4 => tile::<R, 4>(t),
        3 => tile::<R, 3>(t),
        2 => tile::<R, 2>(t),
        _ => tile::<R, 1>(t),
    }
}

/// `R` output channels × `V` vectors of pixels: bias, then every tap and channel pair.
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
unsafe fn tile<const R: usize, const V: usize>(a: &Tile<'_>) {
    let g = a.geo;
    let mut acc = [[_mm512_setzero_ps(); V]; R];
    for (r, row) in acc.iter_mut().enumerate() {
        let b = _mm512_set1_ps(*a.bias.add(r));
        row.fill(b);
    }
    let [kt, kh, kw] = g.kernel;
    let mut tap = 0;
    for dt in 0..kt {
        for dh in 0..kh {
            let base = a.x.add(dt * g.frame + dh * g.row);
            for dw in 0..kw {
                let wt = a.w.add(tap * g.pairs);
                for p in 0..g.pairs {
                    let xp = base.add(p * g.ws + dw);
                    let mut xv = [_mm512_setzero_si512(); V];
                    for (v, x) in xv.iter_mut().enumerate() {
                        *x = _mm512_loadu_si512(xp.add(v * LANES).cast());
                    }
                    for (r, row) in acc.iter_mut().enumerate() {
                        let wb = bh(_mm512_set1_epi32(*wt.add(r * g.wstride + p) as i32));
                        for (v, x) in row.iter_mut().enumerate() {
                            *x = _mm512_dpbf16_ps(*x, bh(xv[v]), wb);
                        }
                    }
                }
                tap += 1;
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        let o = a.out.add(r * a.co_stride);
        for (v, x) in row.iter().enumerate() {
            let n = a.valid.saturating_sub(v * LANES).min(LANES);
            if n == LANES {
                _mm512_storeu_ps(o.add(v * LANES), *x);
            } else if n > 0 {
                _mm512_mask_storeu_ps(o.add(v * LANES), ((1u32 << n) - 1) as u16, *x);
            }
        }
    }
}

/// One row of two channels (`hi` absent: zeros) as bf16 pairs.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn round_row(lo: &[f32], hi: Option<&[f32]>, dst: &mut [u32]) {
    let n = dst.len().min(lo.len());
    let full = n / LANES * LANES;
    for i in (0..full).step_by(LANES) {
        let a = _mm512_loadu_ps(lo.as_ptr().add(i));
        let b = hi.map_or(_mm512_setzero_ps(), |h| _mm512_loadu_ps(h.as_ptr().add(i)));
        let a16 = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(a));
        let b16 = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(b));
        let v = _mm512_or_si512(
            _mm512_cvtepu16_epi32(a16),
            _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(b16)),
        );
        _mm512_storeu_si512(dst.as_mut_ptr().add(i).cast(), v);
    }
    for i in full..n {
        dst[i] = pair(lo[i], hi.map_or(0.0, |h| h[i]));
    }
}

#[inline(always)]
fn bh(x: __m512i) -> __m512bh {
    // SAFETY: both are 512 bits of plain data.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(x) }
}
