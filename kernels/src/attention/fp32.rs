//! The portable kernel: the same flash-style blocking as the bf16 one, in f32 throughout. It
//! runs where AVX512-BF16 is missing or turned off (`V2L_ATTENTION=fp32`), so a low-precision
//! engine still runs on any CPU. Written as plain loops over contiguous rows (K transposed per
//! key block) that the compiler vectorises; on x86-64 it is compiled for AVX2 + FMA when the CPU
//! has them.

use super::head::{Head, BLOCK_KEYS, BLOCK_ROWS};

/// How `a·b + c` is computed: fused where the target has FMA (`mul_add` is a library call
/// without it).
trait MulAdd {
    fn mul_add(a: f32, b: f32, c: f32) -> f32;
}

struct Fused;
impl MulAdd for Fused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

struct Separate;
impl MulAdd for Separate {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// One head of one sample: `out = softmax(q·kᵀ·scale)·v`, scores never held beyond one
/// `BLOCK_ROWS × BLOCK_KEYS` tile.
pub(super) fn head(h: &Head<'_>, out: &mut dyn FnMut(usize, &[f32])) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the features the function is compiled for were detected just above.
        return unsafe { head_avx2(h, out) };
    }
    #[cfg(target_arch = "aarch64")]
    return head_with::<Fused>(h, out);
    #[allow(unreachable_code)]
    head_with::<Separate>(h, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn head_avx2(h: &Head<'_>, out: &mut dyn FnMut(usize, &[f32])) {
    head_with::<Fused>(h, out)
}

#[inline(always)]
fn head_with<M: MulAdd>(h: &Head<'_>, out: &mut dyn FnMut(usize, &[f32])) {
    let dh = h.head_dim;
    let blocks = h.kv_len.div_ceil(BLOCK_KEYS);
    // K transposed per key block, `[block][dim][BLOCK_KEYS]`, padded keys zero; V row-major.
    let mut kt = vec![0f32; blocks * dh * BLOCK_KEYS];
    let mut v = vec![0f32; blocks * BLOCK_KEYS * dh];
    for j in 0..h.kv_len {
        let (b, lane) = (j / BLOCK_KEYS, j % BLOCK_KEYS);
        for (d, &x) in h.k_row(j).iter().enumerate() {
            kt[(b * dh + d) * BLOCK_KEYS + lane] = x;
        }
        v[j * dh..(j + 1) * dh].copy_from_slice(h.v_row(j));
    }
    // Scores in log2 units, so one exp2 per score.
    let qscale = h.scale * std::f32::consts::LOG2_E;
    let mut q = vec![0f32; BLOCK_ROWS * dh];
    let mut scores = vec![0f32; BLOCK_ROWS * BLOCK_KEYS];
    let mut acc = vec![0f32; BLOCK_ROWS * dh];
    let mut max = [f32::NEG_INFINITY; BLOCK_ROWS];
    let mut sum = [0f32; BLOCK_ROWS];
    let mut row_out = vec![0f32; dh];
    for r0 in (0..h.q_len).step_by(BLOCK_ROWS) {
        let rows = BLOCK_ROWS.min(h.q_len - r0);
        for (r, qr) in q.chunks_exact_mut(dh).take(rows).enumerate() {
            for (x, &y) in qr.iter_mut().zip(h.q_row(r0 + r)) {
                *x = y * qscale;
            }
        }
        acc.fill(0.0);
        max.fill(f32::NEG_INFINITY);
        sum.fill(0.0);
        for b in 0..blocks {
            let valid = (h.kv_len - b * BLOCK_KEYS).min(BLOCK_KEYS);
            let kb = &kt[b * dh * BLOCK_KEYS..(b + 1) * dh * BLOCK_KEYS];
            let vb = &v[b * BLOCK_KEYS * dh..(b + 1) * BLOCK_KEYS * dh];
            for r in 0..rows {
                let s = &mut scores[r * BLOCK_KEYS..(r + 1) * BLOCK_KEYS];
                s.fill(0.0);
                for (&qd, kd) in q[r * dh..(r + 1) * dh]
                    .iter()
                    .zip(kb.chunks_exact(BLOCK_KEYS))
                {
                    for (x, &k) in s.iter_mut().zip(kd) {
                        *x = M::mul_add(qd, k, *x);
                    }
                }
                s[valid..].fill(f32::NEG_INFINITY);
                let m = s.iter().fold(max[r], |m, &x| m.max(x));
                let alpha = exp2(max[r] - m);
                max[r] = m;
                let mut l = 0.0;
                for x in s.iter_mut() {
                    *x = exp2(*x - m);
                    l += *x;
                }
                sum[r] = sum[r] * alpha + l;
                let a = &mut acc[r * dh..(r + 1) * dh];
                if alpha != 1.0 {
                    a.iter_mut().for_each(|x| *x *= alpha);
                }
                for (&p, vj) in s.iter().zip(vb.chunks_exact(dh)).take(valid) {
                    for (x, &y) in a.iter_mut().zip(vj) {
                        *x = M::mul_add(p, y, *x);
                    }
                }
            }
        }
        for r in 0..rows {
            let inv = 1.0 / sum[r];
            for (o, a) in row_out.iter_mut().zip(&acc[r * dh..(r + 1) * dh]) {
                *o = a * inv;
            }
            out(r0 + r, &row_out);
        }
    }
}

/// `2^x` for `x ≤ 0` to ~2e-7 relative, in plain arithmetic the compiler vectorises:
/// `2^n · 2^f`, `n = round(x)`, `f ∈ [-½, ½]` by its Taylor series to degree 6.
#[inline(always)]
fn exp2(x: f32) -> f32 {
    let x = x.max(-126.0);
    let n = x.round_ties_even();
    let f = x - n;
    let mut p = 0.000_154_035_3f32;
    for c in [
        0.001_333_355_8,
        0.009_618_129,
        0.055_504_11,
        0.240_226_5,
        std::f32::consts::LN_2,
        1.0,
    ] {
        p = p * f + c;
    }
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}
