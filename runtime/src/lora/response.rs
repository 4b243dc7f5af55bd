//! LoFA's response map and a fuse restricted to it: the entries a LoRA changes by more than a
//! fraction τ of the base weight, `R = 1[|ΔW| > τ·|W|]` (the paper's `|ΔW/W| > τ`, written so a
//! zero base entry is selected whenever the LoRA changes it), and `W ← W + R∘ΔW`.
//!
//! LoFA uses the map as a training signal (stage 1 predicts it); at inference the authors fuse
//! the whole update. The masked fuse is a tool to see how much of an update carries its effect:
//! `v2l-lora fuse --response-tau τ` reports the share of entries touched, and the output change
//! against the full fuse is measured in `bin/tests/cli.rs`. The update is no longer low-rank, so
//! the result is a fused checkpoint, not a LoRA.

use super::format::LoraLayer;
use crate::error::{Result, RuntimeError};

/// `W ← W + R∘ΔW` for one layer, `w` row-major `[out, in]` in f32, `ΔW = s·B·A` at
/// `multiplier`. Returns the number of entries changed (`R`'s ones).
pub fn fuse_masked(w: &mut [f32], l: &LoraLayer, multiplier: f32, tau: f32) -> Result<usize> {
    let (out, inp, r) = (l.b.shape[0], l.a.shape[1], l.rank());
    if w.len() != out * inp {
        return Err(RuntimeError::LoraLayer {
            layer: l.module.clone(),
            message: format!("weight of {} values for a [{out}, {inp}] LoRA", w.len()),
        });
    }
    if !(tau >= 0.0) {
        return Err(RuntimeError::Invalid {
            what: "response threshold".into(),
            message: format!("{tau} is not a number ≥ 0"),
        });
    }
    let (a, b, s) = (l.a.to_f32(), l.b.to_f32(), l.scale(multiplier));
    let mut touched = 0;
    let mut delta = vec![0f32; inp];
    for (row, brow) in w.chunks_exact_mut(inp.max(1)).zip(b.chunks_exact(r.max(1))) {
        delta.iter_mut().for_each(|d| *d = 0.0);
        for (bk, arow) in brow.iter().zip(a.chunks_exact(inp.max(1))) {
            for (d, ak) in delta.iter_mut().zip(arow) {
                *d += bk * ak;
            }
        }
        for (x, d) in row.iter_mut().zip(&delta) {
            let d = s * d;
            if d != 0.0 && d.abs() > tau * x.abs() {
                *x += d;
                touched += 1;
            }
        }
    }
    Ok(touched)
}

#[cfg(test)]
mod tests {
    use super::super::format::Factor;
    use super::*;

    #[test]
    fn the_mask_selects_large_relative_changes() {
        // ΔW = B·A = [[1, 2], [3, 4]] · scale 1 (alpha = rank = 1).
        let l = LoraLayer {
            module: "q".into(),
            a: Factor::from_f32([1, 2], &[1.0, 2.0]),
            b: Factor::from_f32([2, 1], &[1.0, 2.0]),
            alpha: 1.0,
        };
        let base = [10.0, 10.0, 0.0, 100.0];
        // |ΔW/W| = [0.1, 0.2, ∞, 0.04]: τ 0.15 keeps the 2nd and the 3rd.
        let mut w = base;
        assert_eq!(fuse_masked(&mut w, &l, 1.0, 0.15).unwrap(), 2);
        assert_eq!(w, [10.0, 12.0, 2.0, 100.0]);
        // τ 0 is the whole update; a huge τ touches only zero base entries.
        let mut w = base;
        assert_eq!(fuse_masked(&mut w, &l, 1.0, 0.0).unwrap(), 4);
        assert_eq!(w, [11.0, 12.0, 2.0, 104.0]);
        let mut w = base;
        assert_eq!(fuse_masked(&mut w, &l, 1.0, 1e30).unwrap(), 1);
        assert!(fuse_masked(&mut w, &l, 1.0, f32::NAN).is_err());
        assert!(fuse_masked(&mut [0.0; 3], &l, 1.0, 0.1).is_err());
    }
}
