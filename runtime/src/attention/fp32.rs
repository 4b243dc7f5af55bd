//! The portable kernel: the same flash-style blocking as the bf16 one, in f32 throughout. It
//! runs where AVX512-BF16 is missing or turned off (`V2L_ATTENTION=fp32`), so a low-precision
//! engine still runs on any x86-64 or ARM CPU.

use super::{Head, BLOCK_KEYS, BLOCK_ROWS};

/// One head of one sample: `out = softmax(q·kᵀ·scale)·v`, scores never held beyond one
/// `BLOCK_ROWS × BLOCK_KEYS` tile.
pub(super) fn head(h: &Head<'_>, out: &mut dyn FnMut(usize, &[f32])) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the features the function is compiled for were detected just above.
        return unsafe { head_avx2(h, out) };
    }
    head_portable(h, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn head_avx2(h: &Head<'_>, out: &mut dyn FnMut(usize, &[f32])) {
    head_portable(h, out)
}

#[inline(always)]
fn head_portable(h: &Head<'_>, out: &mut dyn FnMut(usize, &[f32])) {
    let dh = h.head_dim;
    let mut scores = vec![0f32; BLOCK_ROWS * BLOCK_KEYS];
    let mut acc = vec![0f32; BLOCK_ROWS * dh];
    let mut max = [f32::NEG_INFINITY; BLOCK_ROWS];
    let mut sum = [0f32; BLOCK_ROWS];
    let mut q = vec![0f32; BLOCK_ROWS * dh];
    let mut row_out = vec![0f32; dh];
    for r0 in (0..h.q_len).step_by(BLOCK_ROWS) {
        let rows = BLOCK_ROWS.min(h.q_len - r0);
        for (r, qr) in q.chunks_exact_mut(dh).take(rows).enumerate() {
            for (d, x) in h.q_row(r0 + r).iter().zip(qr.iter_mut()) {
                *x = d * h.scale;
            }
        }
        acc.fill(0.0);
        max.fill(f32::NEG_INFINITY);
        sum.fill(0.0);
        for k0 in (0..h.kv_len).step_by(BLOCK_KEYS) {
            let keys = BLOCK_KEYS.min(h.kv_len - k0);
            for (r, qr) in q.chunks_exact(dh).take(rows).enumerate() {
                let s = &mut scores[r * BLOCK_KEYS..r * BLOCK_KEYS + keys];
                for (j, sj) in s.iter_mut().enumerate() {
                    *sj = dot(qr, h.k_row(k0 + j));
                }
                let m = s.iter().fold(max[r], |m, &x| m.max(x));
                let alpha = (max[r] - m).exp();
                max[r] = m;
                let mut l = 0.0;
                for sj in s.iter_mut() {
                    *sj = (*sj - m).exp();
                    l += *sj;
                }
                sum[r] = sum[r] * alpha + l;
                let a = &mut acc[r * dh..(r + 1) * dh];
                if alpha != 1.0 {
                    a.iter_mut().for_each(|x| *x *= alpha);
                }
                for (j, &p) in s.iter().enumerate() {
                    for (x, v) in a.iter_mut().zip(h.v_row(k0 + j)) {
                        *x += p * v;
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

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight partial sums so the compiler vectorises without reassociating on its own.
    let mut s = [0f32; 8];
    let (ac, ar) = a.split_at(a.len() - a.len() % 8);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(8).zip(bc.chunks_exact(8)) {
        for i in 0..8 {
            s[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ar.iter().zip(br).map(|(x, y)| x * y).sum();
    s.iter().sum::<f32>() + tail
}
