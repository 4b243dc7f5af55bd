//! The fuse kernel's element types (f32, f16, bf16: up to f32 and rounded back) and one block
//! of rows with its portable inner loop; the AVX2 loops over the same rows are `avx_rows.rs`.

#![allow(clippy::indexing_slicing)]

use half::{bf16, f16};

#[cfg(target_arch = "x86_64")]
use super::avx;

/// Columns per tile for rank > 1 (a 4 KiB f32 tile).
pub const CHUNK: usize = 1024;

/// A storage type: upcast to f32 and round back (round-to-nearest-even).
pub(super) trait Elem: Copy + Send + Sync + 'static {
    fn up(self) -> f32;
    fn down(x: f32) -> Self;

    /// The lane layout of `load16`/`store16`: `false`, elements 0..8 and 8..16; `true`, the
    /// even and the odd elements (bf16: its conversions are then a shift or a mask, no shuffle).
    #[cfg(target_arch = "x86_64")]
    const EVEN_ODD: bool = false;

    /// 16 elements at `p` as two f32x8 (in the `EVEN_ODD` layout).
    ///
    /// # Safety
    /// `p..p+16` readable; AVX2 and F16C available.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> (avx::V, avx::V);

    /// Rounds and stores 16 elements at `p`; with `NT`, a streaming store (`p` 32-byte aligned).
    /// `G`: guard against NaNs with arbitrary payloads (bf16; see `avx::bf16_round8`).
    ///
    /// # Safety
    /// `p..p+16` writable; AVX2 and F16C available; aligned as above.
    #[cfg(target_arch = "x86_64")]
    unsafe fn store16<const NT: bool, const G: bool>(p: *mut Self, lo: avx::V, hi: avx::V);
}

impl Elem for f32 {
    #[inline(always)]
    fn up(self) -> f32 {
        self
    }
    #[inline(always)]
    fn down(x: f32) -> f32 {
        x
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> (avx::V, avx::V) {
        avx::load16_f32(p)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn store16<const NT: bool, const G: bool>(p: *mut f32, lo: avx::V, hi: avx::V) {
        avx::store16_f32::<NT>(p, lo, hi)
    }
}

impl Elem for f16 {
    #[inline(always)]
    fn up(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn down(x: f32) -> f16 {
        f16::from_f32(x)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f16) -> (avx::V, avx::V) {
        avx::load16_f16(p as *const u16)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn store16<const NT: bool, const G: bool>(p: *mut f16, lo: avx::V, hi: avx::V) {
        avx::store16_f16::<NT>(p as *mut u16, lo, hi)
    }
}

/// f32 → bf16 bits, round-to-nearest-even; NaN stays (quiet) NaN.
#[inline(always)]
pub(super) fn bf16_round(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        ((b >> 16) | 0x0040) as u16
    } else {
        (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16
    }
}

impl Elem for bf16 {
    #[inline(always)]
    fn up(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    fn down(x: f32) -> bf16 {
        bf16::from_bits(bf16_round(x))
    }
    #[cfg(target_arch = "x86_64")]
    const EVEN_ODD: bool = true;
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const bf16) -> (avx::V, avx::V) {
        avx::load16_bf16(p as *const u16)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn store16<const NT: bool, const G: bool>(p: *mut bf16, lo: avx::V, hi: avx::V) {
        avx::store16_bf16::<NT, G>(p as *mut u16, lo, hi)
    }
}

/// `tile[t] = d` for columns `j0 .. j0 + tile.len()` of the row whose `coef[k] = s·B[i,k]`,
/// in the documented order (the same as `Rows::value`).
#[inline(always)]
pub(super) fn delta_tile(tile: &mut [f32], coef: &[f32], a: &[f32], inp: usize, j0: usize) {
    let n = tile.len();
    let c = coef[0];
    for (t, &x) in tile.iter_mut().zip(&a[j0..j0 + n]) {
        *t = c * x;
    }
    let mut k = 1;
    // Four terms per pass over the tile (fewer tile loads/stores), still added one at a time.
    while k + 4 <= coef.len() {
        let (c0, c1, c2, c3) = (coef[k], coef[k + 1], coef[k + 2], coef[k + 3]);
        let a0 = &a[k * inp + j0..][..n];
        let a1 = &a[(k + 1) * inp + j0..][..n];
        let a2 = &a[(k + 2) * inp + j0..][..n];
        let a3 = &a[(k + 3) * inp + j0..][..n];
        for t in 0..n {
            tile[t] = (((tile[t] + c0 * a0[t]) + c1 * a1[t]) + c2 * a2[t]) + c3 * a3[t];
        }
        k += 4;
    }
    while k < coef.len() {
        let c = coef[k];
        for (t, &x) in tile.iter_mut().zip(&a[k * inp + j0..][..n]) {
            *t += c * x;
        }
        k += 1;
    }
}

/// One element: `dst[j] = round(up(src[j]) + d)`.
///
/// # Safety
/// `src.add(j)` readable, `dst.add(j)` writable (they may be the same pointer).
#[inline(always)]
pub(super) unsafe fn scalar_elem<T: Elem>(src: *const T, dst: *mut T, j: usize, d: f32) {
    let w = (*src.add(j)).up();
    *dst.add(j) = T::down(w + d);
}

/// A contiguous block of rows for one thread. `src == dst` for in-place.
pub(super) struct Rows<'a, T> {
    pub(super) src: *const T,
    pub(super) dst: *mut T,
    pub(super) nrows: usize,
    pub(super) inp: usize,
    /// `B` rows of this block, `[nrows, rank]`.
    pub(super) b: &'a [f32],
    pub(super) a: &'a [f32],
    /// For rank 1 and an `EVEN_ODD` type on the AVX2 path: A's even elements then its odd
    /// elements, each padded to `inp / 2 + 9` (see [`split_even_odd`]); else empty.
    pub(super) a_split: &'a [f32],
    pub(super) rank: usize,
    pub(super) scale: f32,
    /// Some factor (or the scale) is not finite: the bf16 AVX2 path must guard against NaN
    /// payloads (see `avx::bf16_round8`).
    pub(super) nan_guard: bool,
}

impl<T: Elem> Rows<'_, T> {
    /// The fused value at flat index `p` of the block (row `p / inp`, column `p % inp`),
    /// computed element-wise in the documented order (bitwise the same as the vector paths).
    ///
    /// # Safety
    /// `p < nrows · inp`.
    #[inline(always)]
    pub(super) unsafe fn value(&self, p: usize) -> T {
        let d = self.delta(p / self.inp, p % self.inp);
        T::down((*self.src.add(p)).up() + d)
    }

    /// `d` for row `i` (of the block), column `j`, in the documented order.
    #[inline(always)]
    pub(super) fn delta(&self, i: usize, j: usize) -> f32 {
        let b = &self.b[i * self.rank..][..self.rank];
        let mut d = (self.scale * b[0]) * self.a[j];
        for (k, &bk) in b.iter().enumerate().skip(1) {
            d += (self.scale * bk) * self.a[k * self.inp + j];
        }
        d
    }

    /// The portable inner loop (auto-vectorised where the compiler can).
    pub(super) unsafe fn rows_portable(&self, coef: &mut [f32]) {
        let inp = self.inp;
        let mut tile = [0f32; CHUNK];
        for i in 0..self.nrows {
            for (c, &b) in coef.iter_mut().zip(&self.b[i * self.rank..][..self.rank]) {
                *c = self.scale * b;
            }
            let src = self.src.add(i * inp);
            let dst = self.dst.add(i * inp);
            let mut j0 = 0;
            while j0 < inp {
                let n = CHUNK.min(inp - j0);
                if self.rank == 1 {
                    let c = coef[0];
                    let a = &self.a[j0..j0 + n];
                    for (t, &x) in a.iter().enumerate() {
                        scalar_elem(src, dst, j0 + t, c * x);
                    }
                } else {
                    delta_tile(&mut tile[..n], coef, self.a, inp, j0);
                    for (t, &d) in tile[..n].iter().enumerate() {
                        scalar_elem(src, dst, j0 + t, d);
                    }
                }
                j0 += n;
            }
        }
    }
}
