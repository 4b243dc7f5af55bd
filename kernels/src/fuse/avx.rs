//! The fuse kernel's AVX2 + F16C inner loops (x86_64, chosen at run time): the same
//! arithmetic as the portable loop, 16 elements a step, streaming stores for `fuse_from`.

use super::{delta_tile, Elem, Rows, CHUNK};
use std::arch::x86_64::*;

pub(super) type V = __m256;

/// All rows of a block. `NT`: streaming stores to `dst` (fuse_from).
///
/// # Safety
/// AVX2 and F16C available; `r.src`/`r.dst` cover `r.nrows · r.inp` elements.
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn rows<T: Elem, const NT: bool, const G: bool>(r: &Rows<T>, coef: &mut [f32]) {
    // The block is cut into groups of 16 elements on one flat grid whose destination is
    // 32-byte aligned, so that every store is a whole aligned vector: mixing scalar and
    // streaming stores in one cache line costs a read-for-ownership and a flush (it
    // halved the speed when rows were not multiples of the alignment). Only the unaligned
    // start and the last < 16 elements of the block are scalar.
    //
    // Groups inside a row are computed 16-wide; a group across a row boundary gets its 16
    // deltas element by element.
    let inp = r.inp;
    let total = r.nrows * inp;
    let dst = r.dst;
    let mut tile = [0f32; CHUNK];
    let head = (dst.align_offset(32)).min(total);
    for p in 0..head {
        *dst.add(p) = r.value(p);
    }
    let end = head + (total - head) / 16 * 16;
    // Row i's groups inside the row: `n` columns from flat position `q`.
    let in_row = |i: usize| -> (usize, usize) {
        let q = head + ((i * inp).max(head) - head).div_ceil(16) * 16;
        let row_end = ((i + 1) * inp).min(end);
        (
            q,
            if q + 16 <= row_end {
                (row_end - q) / 16 * 16
            } else {
                0
            },
        )
    };
    // (Column panels across the rows, to keep A in L1 for long rows, were tried: the
    // broken-up W stream cost more than they saved, at every panel width.)
    for i in 0..r.nrows {
        let (q, n) = in_row(i);
        if n > 0 {
            in_row_groups::<T, NT, G>(r, i, q - i * inp, n, coef, &mut tile);
        }
    }
    // The groups across row boundaries: each is the one after some row's in-row groups.
    let mut next = 0;
    for i in 0..r.nrows {
        let (q, n) = in_row(i);
        let q = q + n;
        if q >= next && q + 16 <= end && q / inp != (q + 15) / inp {
            crossing_group::<T, NT, G>(r, q);
            next = q + 16;
        }
    }
    for p in end..total {
        *dst.add(p) = r.value(p);
    }
    if NT {
        // Streaming stores are weakly ordered: make them visible before the caller
        // (or the thread join) hands the weights on.
        _mm_sfence();
    }
}

/// How far ahead of the loads W is prefetched into L2. One core's hardware prefetchers
/// alone kept too few lines in flight (at in = 12288, where A streams from L2 too, bf16
/// ran at 40 % of the copy speed); 16 KiB ahead roughly doubled that.
const PREFETCH_BYTES: usize = 16 << 10;

/// Prefetches the line at `p` into L2 (`p` may be past the end of the buffer: a prefetch
/// never faults).
#[inline(always)]
unsafe fn prefetch_l2<T>(p: *const T) {
    _mm_prefetch::<_MM_HINT_T1>(p as *const i8);
}

/// Columns `j .. j + len` of row `i` (`len` a multiple of 16, `dst` aligned at `j`).
#[inline(always)]
unsafe fn in_row_groups<T: Elem, const NT: bool, const G: bool>(
    r: &Rows<T>,
    i: usize,
    j: usize,
    len: usize,
    coef: &mut [f32],
    tile: &mut [f32; CHUNK],
) {
    let (inp, a) = (r.inp, r.a);
    for (c, &b) in coef.iter_mut().zip(&r.b[i * r.rank..][..r.rank]) {
        *c = r.scale * b;
    }
    let (src, dst) = (r.src.add(i * inp), r.dst.add(i * inp));
    let end = j + len;
    let mut j0 = j;
    while j0 < end {
        let n = CHUNK.min(end - j0);
        if r.rank == 1 {
            let c = _mm256_set1_ps(coef[0]);
            // The A values of a group's two vectors: contiguous, or (EVEN_ODD) from the
            // even/odd split of A, whose roles swap at odd columns.
            let (mut lo, mut hi, step) = if T::EVEN_ODD {
                let h = r.a_split.len() / 2;
                let (ae, ao) = (r.a_split.as_ptr(), r.a_split.as_ptr().add(h));
                if j0.is_multiple_of(2) {
                    (ae.add(j0 / 2), ao.add(j0 / 2), 8)
                } else {
                    (ao.add(j0 / 2), ae.add(j0 / 2 + 1), 8)
                }
            } else {
                (a.as_ptr().add(j0), a.as_ptr().add(j0 + 8), 16)
            };
            let mut j = j0;
            while j < j0 + n {
                prefetch_l2(src.wrapping_add(j + PREFETCH_BYTES / size_of::<T>()));
                let (w0, w1) = T::load16(src.add(j));
                let d0 = _mm256_mul_ps(c, _mm256_loadu_ps(lo));
                let d1 = _mm256_mul_ps(c, _mm256_loadu_ps(hi));
                T::store16::<NT, G>(dst.add(j), _mm256_add_ps(w0, d0), _mm256_add_ps(w1, d1));
                (lo, hi) = (lo.add(step), hi.add(step));
                j += 16;
            }
        } else {
            delta_tile(&mut tile[..n], coef, a, inp, j0);
            let tp = tile.as_ptr();
            let mut t = 0;
            while t < n {
                prefetch_l2(src.wrapping_add(j0 + t + PREFETCH_BYTES / size_of::<T>()));
                let (w0, w1) = T::load16(src.add(j0 + t));
                let (d0, d1) =
                    layout::<T>(_mm256_loadu_ps(tp.add(t)), _mm256_loadu_ps(tp.add(t + 8)));
                T::store16::<NT, G>(
                    dst.add(j0 + t),
                    _mm256_add_ps(w0, d0),
                    _mm256_add_ps(w1, d1),
                );
                t += 16;
            }
        }
        j0 += n;
    }
}

/// The group at flat position `q`, which crosses a row boundary (maybe several).
#[inline(always)]
unsafe fn crossing_group<T: Elem, const NT: bool, const G: bool>(r: &Rows<T>, q: usize) {
    let mut d = [0f32; 16];
    let (mut i, mut j) = (q / r.inp, q % r.inp);
    for dt in d.iter_mut() {
        *dt = r.delta(i, j);
        j += 1;
        if j == r.inp {
            (i, j) = (i + 1, 0);
        }
    }
    let (w0, w1) = T::load16(r.src.add(q));
    let (d0, d1) = layout::<T>(
        _mm256_loadu_ps(d.as_ptr()),
        _mm256_loadu_ps(d.as_ptr().add(8)),
    );
    T::store16::<NT, G>(r.dst.add(q), _mm256_add_ps(w0, d0), _mm256_add_ps(w1, d1));
}

/// `len` bytes from `src` to `dst` (not overlapping) with streaming stores.
///
/// # Safety
/// AVX2 available; both ranges valid for `len` bytes and disjoint.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn stream_copy(src: *const u8, dst: *mut u8, len: usize) {
    let head = (dst.align_offset(32)).min(len);
    std::ptr::copy_nonoverlapping(src, dst, head);
    let mut i = head;
    while i + 64 <= len {
        prefetch_l2(src.wrapping_add(i + PREFETCH_BYTES));
        let a = _mm256_loadu_si256(src.add(i) as *const __m256i);
        let b = _mm256_loadu_si256(src.add(i + 32) as *const __m256i);
        _mm256_stream_si256(dst.add(i) as *mut __m256i, a);
        _mm256_stream_si256(dst.add(i + 32) as *mut __m256i, b);
        i += 64;
    }
    std::ptr::copy_nonoverlapping(src.add(i), dst.add(i), len - i);
    _mm_sfence();
}

#[inline(always)]
pub(super) unsafe fn load16_f32(p: *const f32) -> (V, V) {
    (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)))
}

#[inline(always)]
pub(super) unsafe fn store16_f32<const NT: bool>(p: *mut f32, lo: V, hi: V) {
    if NT {
        _mm256_stream_ps(p, lo);
        _mm256_stream_ps(p.add(8), hi);
    } else {
        _mm256_storeu_ps(p, lo);
        _mm256_storeu_ps(p.add(8), hi);
    }
}

#[inline(always)]
pub(super) unsafe fn load16_f16(p: *const u16) -> (V, V) {
    let lo = _mm_loadu_si128(p as *const __m128i);
    let hi = _mm_loadu_si128(p.add(8) as *const __m128i);
    (_mm256_cvtph_ps(lo), _mm256_cvtph_ps(hi))
}

#[inline(always)]
pub(super) unsafe fn store16_f16<const NT: bool>(p: *mut u16, lo: V, hi: V) {
    let l = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(lo);
    let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(hi);
    store256::<NT>(p, _mm256_set_m128i(h, l));
}

#[inline(always)]
pub(super) unsafe fn load16_bf16(p: *const u16) -> (V, V) {
    // bf16 → f32 is `bits << 16`: the even elements are the low halves of the u32 lanes
    // shifted up, the odd ones the high halves in place.
    let v = _mm256_loadu_si256(p as *const __m256i);
    let even = _mm256_slli_epi32::<16>(v);
    let odd = _mm256_and_si256(v, _mm256_set1_epi32(0xFFFF_0000_u32 as i32));
    (_mm256_castsi256_ps(even), _mm256_castsi256_ps(odd))
}

/// f32x8 → bf16 bits (round-to-nearest-even) in the high half of each u32 lane.
///
/// `x` always comes out of an add, so a NaN `x` is quiet (bit 22 set) and truncating it
/// gives `bf16_round`'s bits. With `G`, NaN lanes get no rounding bias (are truncated).
/// Without, a NaN is rounded like a number, which is the same as truncating when its low
/// 16 bits are zero: true of every NaN the kernel can produce from finite factors (a NaN
/// weight is a widened bf16, and inf − inf or 0·inf give the default NaN `0xFFC00000`).
/// A NaN payload from the factors themselves could carry into the exponent, so callers
/// pass `G` unless the factors are all finite (`Rows::nan_guard`); it costs ~25 %.
#[inline(always)]
unsafe fn bf16_round8<const G: bool>(x: V) -> __m256i {
    let b = _mm256_castps_si256(x);
    let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(b), _mm256_set1_epi32(1));
    let bias = _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF));
    if G {
        let ordered = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_ORD_Q>(x, x));
        _mm256_add_epi32(b, _mm256_and_si256(bias, ordered))
    } else {
        _mm256_add_epi32(b, bias)
    }
}

#[inline(always)]
pub(super) unsafe fn store16_bf16<const NT: bool, const G: bool>(p: *mut u16, even: V, odd: V) {
    let e = _mm256_srli_epi32::<16>(bf16_round8::<G>(even));
    let o = _mm256_and_si256(
        bf16_round8::<G>(odd),
        _mm256_set1_epi32(0xFFFF_0000_u32 as i32),
    );
    store256::<NT>(p, _mm256_or_si256(e, o));
}

/// Natural-order deltas (elements 0..8, 8..16) in `T`'s lane layout.
#[inline(always)]
unsafe fn layout<T: Elem>(d0: V, d1: V) -> (V, V) {
    if T::EVEN_ODD {
        // shuffle_ps gives [0 2 8 10 | 4 6 12 14]; the 64-bit permute sorts it.
        let e = _mm256_shuffle_ps::<0x88>(d0, d1);
        let o = _mm256_shuffle_ps::<0xDD>(d0, d1);
        (
            _mm256_castpd_ps(_mm256_permute4x64_pd::<0xD8>(_mm256_castps_pd(e))),
            _mm256_castpd_ps(_mm256_permute4x64_pd::<0xD8>(_mm256_castps_pd(o))),
        )
    } else {
        (d0, d1)
    }
}

#[inline(always)]
unsafe fn store256<const NT: bool>(p: *mut u16, v: __m256i) {
    if NT {
        _mm256_stream_si256(p as *mut __m256i, v);
    } else {
        _mm256_storeu_si256(p as *mut __m256i, v);
    }
}
