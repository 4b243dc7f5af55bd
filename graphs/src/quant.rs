//! Weight quantisation: symmetric int8 with one scale per output channel, and symmetric 4- or
//! 8-bit codes in blocks along the input axis.
//!
//! One function for each, used at compile time (the engine's weights) and at run time (a LoRA
//! fused into a quantised engine is re-quantised from the f32 base the same way), so a weight
//! quantised twice from the same values is bitwise the same.

/// Largest magnitude of a quantised value: symmetric, so `-128` is never used and `q·scale`
/// is the same distance from zero either side.
pub const INT8_MAX: f32 = 127.0;

/// The symmetric int8 scale of each output channel of `w [out, inp]`: `max_i |w[o][i]| / 127`,
/// 1 for an all-zero row; `None` for a size mismatch or a value that is not finite. Shared by
/// the int8 weights and the Q/DQ weight scales (`v2l-calibration`).
pub fn int8_scales_per_output(w: &[f32], out: usize, inp: usize) -> Option<Vec<f32>> {
    if w.len() != out.checked_mul(inp)? {
        return None;
    }
    w.chunks_exact(inp.max(1))
        .take(out)
        .map(|row| {
            let mut max = 0f32;
            for x in row {
                if !x.is_finite() {
                    return None;
                }
                max = max.max(x.abs());
            }
            Some(if max > 0.0 { max / INT8_MAX } else { 1.0 })
        })
        .collect()
}

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
    scale.copy_from_slice(&int8_scales_per_output(w, out, inp)?);
    // An all-zero row has scale 1 and quantises to zeros.
    let inv: Vec<f32> = w
        .chunks_exact(inp.max(1))
        .zip(scale.iter())
        .map(|(row, s)| {
            if row.iter().any(|x| *x != 0.0) {
                1.0 / s
            } else {
                0.0
            }
        })
        .collect();
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

/// Input-axis block of the block-wise weights (ONNX Runtime's `MatMulNBits` `block_size`): 32,
/// the block llama.cpp's Q4_0/Q8_0 and ONNX Runtime's own quantiser default to.
pub const BLOCK: usize = 32;

/// Quantises a linear weight `w [out, inp]` to `bits`-bit codes (4 or 8) in blocks of [`BLOCK`]
/// along `inp`, laid out as `MatMulNBits` reads them: `codes [out, blocks, BLOCK·bits/8]`
/// (4-bit: two codes a byte, the even element in the low nibble), `scale [out, blocks]`.
/// Symmetric: `w ≈ (code − z)·scale` with `z = 2^(bits−1)` (the op's default zero point) and
/// `scale = max |w| / (z − 1)` over the block, so codes are `1..2z` and `−z` is never used.
/// A short last block is padded with code `z` (zero).
///
/// Returns `(codes, scales)`, or `None` when `bits` is not 4 or 8 or `w` is not `out × inp`
/// finite values.
pub fn quantize_blockwise(
    w: &[f32],
    out: usize,
    inp: usize,
    bits: u32,
) -> Option<(Vec<u8>, Vec<f32>)> {
    if !matches!(bits, 4 | 8)
        || w.len() != out.checked_mul(inp)?
        || w.iter().any(|x| !x.is_finite())
    {
        return None;
    }
    let zero = 1u8 << (bits - 1);
    let max_code = f32::from(zero - 1);
    let blob = BLOCK * bits as usize / 8;
    let blocks = inp.div_ceil(BLOCK);
    // Every code starts at the zero point: the padding of a short last block stays zero.
    let pad = if bits == 4 { zero | zero << 4 } else { zero };
    let mut codes = vec![pad; out * blocks * blob];
    let mut scales = vec![0f32; out * blocks];
    for (o, row) in w.chunks_exact(inp.max(1)).enumerate().take(out) {
        for (b, block) in row.chunks(BLOCK).enumerate() {
            let max = block.iter().fold(0f32, |m, x| m.max(x.abs()));
            let (scale, inv) = if max > 0.0 {
                (max / max_code, max_code / max)
            } else {
                (1.0, 0.0)
            };
            *scales.get_mut(o * blocks + b)? = scale;
            let bytes = codes.get_mut((o * blocks + b) * blob..)?;
            for (j, x) in block.iter().enumerate() {
                let q = (x * inv).round_ties_even().clamp(-max_code, max_code) as i16;
                let code = (q + i16::from(zero)) as u8;
                if bits == 8 {
                    *bytes.get_mut(j)? = code;
                } else {
                    let byte = bytes.get_mut(j / 2)?;
                    *byte = if j % 2 == 0 {
                        (*byte & 0xf0) | code
                    } else {
                        (*byte & 0x0f) | (code << 4)
                    };
                }
            }
        }
    }
    Some((codes, scales))
}

/// The f32 weight `[out, inp]` that [`quantize_blockwise`]'s codes stand for; for tests and
/// accuracy reports.
pub fn dequantize_blockwise(
    codes: &[u8],
    scales: &[f32],
    out: usize,
    inp: usize,
    bits: u32,
) -> Vec<f32> {
    let zero = 1u8 << (bits.clamp(4, 8) - 1);
    let blob = BLOCK * bits as usize / 8;
    let blocks = inp.div_ceil(BLOCK);
    let mut w = vec![0f32; out * inp];
    for (o, row) in w.chunks_exact_mut(inp.max(1)).enumerate() {
        for (i, x) in row.iter_mut().enumerate() {
            let (b, j) = (i / BLOCK, i % BLOCK);
            let at = (o * blocks + b) * blob;
            let code = if bits == 8 {
                codes.get(at + j).copied().unwrap_or(zero)
            } else {
                let byte = codes.get(at + j / 2).copied().unwrap_or(0x88);
                if j % 2 == 0 {
                    byte & 0x0f
                } else {
                    byte >> 4
                }
            };
            *x = (f32::from(code) - f32::from(zero))
                * scales.get(o * blocks + b).copied().unwrap_or(0.0);
        }
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blockwise_round_trip_is_within_half_a_step_per_block() {
        let (out, inp) = (5, 70); // a short last block
        let w: Vec<f32> = (0..out * inp)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-3 * (1 + i % 3) as f32)
            .collect();
        for (bits, blob) in [(4, 16), (8, 32)] {
            let (codes, scales) = quantize_blockwise(&w, out, inp, bits).unwrap();
            assert_eq!(codes.len(), out * 3 * blob);
            assert_eq!(scales.len(), out * 3);
            let back = dequantize_blockwise(&codes, &scales, out, inp, bits);
            for o in 0..out {
                for i in 0..inp {
                    let s = scales[o * 3 + i / 32];
                    let err = (back[o * inp + i] - w[o * inp + i]).abs();
                    assert!(
                        err <= 0.5 * s * (1.0 + 1e-5),
                        "{bits} bits [{o}][{i}]: {err}"
                    );
                }
            }
        }
        // 4-bit codes stay in 1..=15; the padding of the short block is 8 (zero).
        let (codes, _) = quantize_blockwise(&w, out, inp, 4).unwrap();
        assert!(codes.iter().all(|b| b & 0x0f != 0 && b >> 4 != 0));
        assert_eq!(codes[(3 - 1) * 16 + 15], 0x88);
        // 8-bit codes stay in 1..=255, padding 128.
        let (codes, _) = quantize_blockwise(&w, out, inp, 8).unwrap();
        assert!(codes.iter().all(|&b| b != 0));
        assert_eq!(codes[(3 - 1) * 32 + 31], 128);
        // Low nibble first: w = [7, -7] with scale 1 packs as 15 | 1 << 4.
        let (c, s) = quantize_blockwise(&[7.0, -7.0], 1, 2, 4).unwrap();
        assert_eq!((c[0], s[0]), (0x1f, 1.0));
        // 8 bits: ±127 with scale 1 are codes 255 and 1.
        let (c, s) = quantize_blockwise(&[127.0, -127.0, 0.5], 1, 3, 8).unwrap();
        assert_eq!((&c[..3], s[0]), (&[255u8, 1, 128][..], 1.0));
        assert!(quantize_blockwise(&[f32::NAN], 1, 1, 4).is_none());
        assert!(quantize_blockwise(&[1.0], 1, 1, 6).is_none());
    }

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
