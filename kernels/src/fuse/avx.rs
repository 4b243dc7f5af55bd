//! The fuse kernel's AVX2 + F16C primitives (x86_64): 16 elements of each storage type in
//! and out of two f32x8, and streaming copies. The row loops built on them are `avx_rows.rs`.

use std::arch::x86_64::*;

pub(super) type V = __m256;

/// How far ahead of the loads W is prefetched into L2. One core's hardware prefetchers
/// alone kept too few lines in flight (at in = 12288, where A streams from L2 too, bf16
/// ran at 40 % of the copy speed); 16 KiB ahead roughly doubled that.
pub(super) const PREFETCH_BYTES: usize = 16 << 10;

/// Prefetches the line at `p` into L2 (`p` may be past the end of the buffer: a prefetch
/// never faults).
#[inline(always)]
pub(super) unsafe fn prefetch_l2<T>(p: *const T) {
    _mm_prefetch::<_MM_HINT_T1>(p as *const i8);
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

#[inline(always)]
unsafe fn store256<const NT: bool>(p: *mut u16, v: __m256i) {
    if NT {
        _mm256_stream_si256(p as *mut __m256i, v);
    } else {
        _mm256_storeu_si256(p as *mut __m256i, v);
    }
}
