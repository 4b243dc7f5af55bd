//! The fuse kernel's AVX2 + F16C inner loops (x86_64, chosen at run time): the same
//! arithmetic as the portable loop, 16 elements a step, streaming stores for `fuse_from`.

use super::avx::{prefetch_l2, PREFETCH_BYTES, V};
use super::elem::{delta_tile, Elem, Rows, CHUNK};
use std::arch::x86_64::*;

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
