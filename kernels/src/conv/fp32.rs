//! The portable f32 kernel: what runs where AVX512-BF16 is missing or turned off
//! (`V2L_CONV=fp32`). The input is copied once into zero-padded rows
//! (`[sample][frame][padded row][channel][padded column]`); each output row is then, per output
//! channel, the bias plus one scaled input row per (tap, input channel), a loop the compiler
//! vectorises on any CPU. Exact to f32 rounding; not tuned (engines load the export's f32
//! graphs on such CPUs, `Engine::vae_graphs`).

use super::geometry::{pack_rows, Shape};
use crate::attention::ParFor;

/// The output pointer shared by tasks that write disjoint output rows: each task writes only
/// the rows of its own (sample, frame, row).
type Out = crate::attention::Out<f32>;

/// The convolution; the caller checked the lengths.
pub(super) fn conv(shape: &Shape, x: &[f32], w: &[f32], bias: &[f32], out: Out, par: ParFor<'_>) {
    let fill = |lo: &[f32], _: Option<&[f32]>, dst: &mut [f32]| dst.copy_from_slice(lo);
    let packed = pack_rows(shape, x, 1, par, &fill);
    let [t, _, _] = shape.input;
    let [to, ho, wo] = shape.output().unwrap_or([0; 3]);
    let [kt, kh, kw] = shape.kernel;
    let (hp, ws) = shape.padded_rows();
    let (cin, taps) = (shape.cin, shape.taps());
    par(shape.batch * to * ho, &|i| {
        // The whole `Out` (Sync), not its raw pointer field, is what the closure borrows.
        let dst = &out;
        let (b, r) = (i / (to * ho), i % (to * ho));
        let (ti, hi) = (r / ho, r % ho);
        let mut acc = vec![0f32; wo];
        for co in 0..shape.cout {
            acc.fill(bias[co]);
            let mut tap = 0;
            for dt in 0..kt {
                for dh in 0..kh {
                    let row = (((b * t + ti + dt) * hp + hi + dh) * cin) * ws;
                    for dw in 0..kw {
                        for ci in 0..cin {
                            let wv = w[(co * cin + ci) * taps + tap];
                            let src = &packed[row + ci * ws + dw..][..wo];
                            for (a, s) in acc.iter_mut().zip(src) {
                                *a += wv * s;
                            }
                        }
                        tap += 1;
                    }
                }
            }
            let at = (((b * shape.cout + co) * to + ti) * ho + hi) * wo;
            // SAFETY: `at..at + wo` is output row (b, co, ti, hi), in bounds by the caller's
            // length check and written by this task alone.
            unsafe { std::ptr::copy_nonoverlapping(acc.as_ptr(), dst.0.add(at), wo) };
        }
    });
}
