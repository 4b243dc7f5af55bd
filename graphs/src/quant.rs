//! Weight quantisation: symmetric int8, one scale per output channel.
//!
//! One function for the one idea, used at compile time (the int8 engine's weights) and at run
//! time (a LoRA fused into an int8 engine is re-quantised from the f32 base the same way), so a
//! weight quantised twice from the same values is bitwise the same.

/// Largest magnitude of a quantised value: symmetric, so `-128` is never used and `q·scale`
/// is the same distance from zero either side.
pub const INT8_MAX: f32 = 127.0;

/// Quantises a linear weight `w` stored `[out, inp]` row-major (the `B` of `Gemm(transB=1)`)
/// into `q` laid out `[inp, out]` (the `B` of `com.microsoft.DynamicQuantizeMatMul`, which
/// multiplies without transposing) and one scale per output channel: `w[o][i] ≈ q[i][o]·scale[o]`
/// with `scale[o] = max_i |w[o][i]| / 127`, rounding half to even. An all-zero row gets scale 1.
///
/// Returns `None` when the buffer sizes do not match `out × inp` or a value is not finite.
pub fn quantize_int8_per_output(
    w: &[f32],
    out: usize,
    inp: usize,
    q: &mut [i8],
    scale: &mut [f32],
) -> Option<()> {
    let n = out.checked_mul(inp)?;
    if w.len() != n || q.len() != n || scale.len() != out {
        return None;
    }
    let mut inv = vec![0f32; out];
    for ((row, s), v) in w
        .chunks_exact(inp.max(1))
        .zip(scale.iter_mut())
        .zip(&mut inv)
    {
        let mut max = 0f32;
        for x in row {
            if !x.is_finite() {
                return None;
            }
            max = max.max(x.abs());
        }
        *s = if max > 0.0 { max / INT8_MAX } else { 1.0 };
        *v = if max > 0.0 { INT8_MAX / max } else { 0.0 };
    }
    // Transposing write in tiles, so both sides stay in cache on multi-MB layers.
    const TILE: usize = 64;
    for o0 in (0..out).step_by(TILE) {
        let o1 = (o0 + TILE).min(out);
        for i0 in (0..inp).step_by(TILE) {
            let i1 = (i0 + TILE).min(inp);
            for o in o0..o1 {
                let row = w.get(o * inp + i0..o * inp + i1)?;
                let k = *inv.get(o)?;
                for (di, x) in row.iter().enumerate() {
                    let v = (x * k).round_ties_even().clamp(-INT8_MAX, INT8_MAX);
                    *q.get_mut((i0 + di) * out + o)? = v as i8;
                }
            }
        }
    }
    Some(())
}

/// The f32 weight `[out, inp]` an int8 weight stands for (`q[i][o]·scale[o]`); for tests and
/// accuracy reports.
pub fn dequantize_int8_per_output(q: &[i8], scale: &[f32], out: usize, inp: usize) -> Vec<f32> {
    let mut w = vec![0f32; out * inp];
    for (o, row) in w.chunks_exact_mut(inp.max(1)).enumerate() {
        let s = scale.get(o).copied().unwrap_or(0.0);
        for (i, x) in row.iter_mut().enumerate() {
            *x = f32::from(q.get(i * out + o).copied().unwrap_or(0)) * s;
        }
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int8_round_trip_is_within_half_a_step_per_channel() {
        let (out, inp) = (70, 130); // not multiples of the tile
        let w: Vec<f32> = (0..out * inp)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-3 * (1 + i / inp) as f32)
            .collect();
        let mut q = vec![0i8; out * inp];
        let mut s = vec![0f32; out];
        quantize_int8_per_output(&w, out, inp, &mut q, &mut s).unwrap();
        let back = dequantize_int8_per_output(&q, &s, out, inp);
        for o in 0..out {
            let row = &w[o * inp..(o + 1) * inp];
            let max = row.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert!((s[o] - max / 127.0).abs() <= f32::EPSILON * max);
            for i in 0..inp {
                let err = (back[o * inp + i] - row[i]).abs();
                assert!(
                    err <= 0.5 * s[o] * (1.0 + 1e-5),
                    "[{o}][{i}]: {err} > {}",
                    0.5 * s[o]
                );
            }
            // The largest value of the row maps to ±127 exactly.
            assert!((0..inp).any(|i| q[i * out + o].unsigned_abs() == 127));
        }
    }

    #[test]
    fn int8_is_transposed_rounds_half_to_even_and_handles_zero_rows() {
        // Row 0 has max 127, so scale 1 and values quantise to themselves rounded.
        let w = [127.0, 2.5, -3.5, 0.0, 0.0, 0.0];
        let mut q = [0i8; 6];
        let mut s = [0f32; 2];
        quantize_int8_per_output(&w, 2, 3, &mut q, &mut s).unwrap();
        assert_eq!(s, [1.0, 1.0]);
        // [inp, out]: q[i][o]
        assert_eq!(q, [127, 0, 2, 0, -4, 0]);
        assert!(quantize_int8_per_output(&[f32::NAN], 1, 1, &mut [0], &mut [0.0]).is_none());
        assert!(quantize_int8_per_output(&w, 3, 3, &mut q, &mut s).is_none());
    }
}
