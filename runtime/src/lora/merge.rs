//! Several LoRAs as one, exactly: per layer the rank concatenation
//! `ΔW = Σᵢ sᵢ·Bᵢ·Aᵢ = [s₁B₁ | … | s_kB_k] · [A₁; …; A_k]` with `sᵢ = multiplierᵢ·alphaᵢ/rᵢ` folded
//! into the B columns and alpha set to the total rank (fuse scale 1 at multiplier 1). Strength is
//! linear in each multiplier; nothing is truncated, so the merge is exact up to f32 rounding.

use std::collections::BTreeMap;

use super::format::{Factor, Lora, LoraFormat, LoraLayer};
use crate::error::{Result, RuntimeError};

/// Merges `loras` (each with its multiplier) into one LoRA whose layers are the union of theirs.
pub fn merge(loras: &[(&Lora, f32)]) -> Result<Lora> {
    merge_scaled(loras, |_, _| 1.0)
}

/// [`merge`] with LoRA `i`'s update in layer `module` further multiplied by `factor(module, i)`
/// (per-layer norm equalisation, `v2l_tools::lora_compare::equalize_norms`).
pub fn merge_scaled(loras: &[(&Lora, f32)], factor: impl Fn(&str, usize) -> f64) -> Result<Lora> {
    let mut by_module: BTreeMap<&str, Vec<(&LoraLayer, f32)>> = BTreeMap::new();
    for (i, (lora, multiplier)) in loras.iter().enumerate() {
        crate::limits::finite("LoRA multiplier", *multiplier)?;
        for l in &lora.layers {
            let m = (*multiplier as f64 * factor(&l.module, i)) as f32;
            crate::limits::finite("LoRA multiplier", m)?;
            by_module.entry(l.module.as_str()).or_default().push((l, m));
        }
    }
    let mut layers = Vec::with_capacity(by_module.len());
    for (module, parts) in by_module {
        let Some(&(first, _)) = parts.first() else {
            continue;
        };
        let (out, inp) = (first.b.shape[0], first.a.shape[1]);
        let rank: usize = parts.iter().map(|(l, _)| l.rank()).sum();
        let mut a = Vec::with_capacity(rank * inp);
        let mut b = vec![0f32; out * rank];
        let mut col = 0;
        for (l, multiplier) in &parts {
            if l.b.shape[0] != out || l.a.shape[1] != inp {
                return Err(RuntimeError::LoraLayer {
                    layer: format!("LoRA merge, layer `{module}`"),
                    message: format!(
                        "the LoRAs disagree on its shape: [{out}, {inp}] and [{}, {}]",
                        l.b.shape[0], l.a.shape[1]
                    ),
                });
            }
            let (r, s) = (l.rank(), l.scale(*multiplier));
            a.extend_from_slice(&l.a.to_f32());
            let lb = l.b.to_f32();
            for (row, src) in b
                .chunks_exact_mut(rank.max(1))
                .zip(lb.chunks_exact(r.max(1)))
            {
                for (o, v) in row.iter_mut().skip(col).take(r).zip(src) {
                    *o = v * s;
                }
            }
            col += r;
        }
        layers.push(LoraLayer {
            module: module.to_string(),
            a: Factor::from_f32([rank, inp], &a),
            b: Factor::from_f32([out, rank], &b),
            alpha: rank as f32,
        });
    }
    Ok(Lora {
        format: LoraFormat::Diffusers,
        layers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(module: &str, out: usize, inp: usize, r: usize, alpha: f32, seed: f32) -> LoraLayer {
        let a: Vec<f32> = (0..r * inp)
            .map(|i| ((i as f32 + seed) * 0.37).sin())
            .collect();
        let b: Vec<f32> = (0..out * r)
            .map(|i| ((i as f32 - seed) * 0.91).cos())
            .collect();
        LoraLayer {
            module: module.into(),
            a: Factor::from_f32([r, inp], &a),
            b: Factor::from_f32([out, r], &b),
            alpha,
        }
    }

    /// `s·B·A` of one layer, `[out, in]`, in f64.
    fn delta(l: &LoraLayer, multiplier: f32) -> Vec<f64> {
        let (a, b, r) = (l.a.to_f32(), l.b.to_f32(), l.rank());
        let (out, inp) = (l.b.shape[0], l.a.shape[1]);
        let s = l.scale(multiplier) as f64;
        let mut d = vec![0f64; out * inp];
        for o in 0..out {
            for i in 0..inp {
                d[o * inp + i] = s
                    * (0..r)
                        .map(|k| b[o * r + k] as f64 * a[k * inp + i] as f64)
                        .sum::<f64>();
            }
        }
        d
    }

    #[test]
    fn merge_is_the_weighted_sum_of_the_updates() {
        let x = Lora {
            format: LoraFormat::Diffusers,
            layers: vec![layer("q", 6, 5, 2, 4.0, 1.0), layer("k", 3, 5, 1, 1.0, 2.0)],
        };
        let y = Lora {
            format: LoraFormat::Kohya,
            layers: vec![layer("q", 6, 5, 3, 3.0, 7.0)],
        };
        let m = merge(&[(&x, 0.6), (&y, -0.4)]).unwrap();
        assert_eq!(m.layers.len(), 2);
        let q = m.layers.iter().find(|l| l.module == "q").unwrap();
        assert_eq!(q.rank(), 5);
        let want: Vec<f64> = delta(&x.layers[0], 0.6)
            .iter()
            .zip(delta(&y.layers[0], -0.4))
            .map(|(a, b)| a + b)
            .collect();
        let got = delta(q, 1.0);
        let err = want
            .iter()
            .zip(&got)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(err < 1e-6, "{err}");
        // A layer only one LoRA has keeps its update, scaled by its multiplier.
        let k = m.layers.iter().find(|l| l.module == "k").unwrap();
        let (want, got) = (delta(&x.layers[1], 0.6), delta(k, 1.0));
        assert!(want.iter().zip(&got).all(|(a, b)| (a - b).abs() < 1e-6));
        // Strength is linear in each multiplier: doubling y's doubles its part.
        let m2 = merge(&[(&y, -0.8)]).unwrap();
        let (one, two) = (
            delta(&merge(&[(&y, -0.4)]).unwrap().layers[0], 1.0),
            delta(&m2.layers[0], 1.0),
        );
        assert!(one
            .iter()
            .zip(&two)
            .all(|(a, b)| (2.0 * a - b).abs() < 1e-6));
    }

    #[test]
    fn disagreeing_shapes_and_nan_multipliers_are_refused() {
        let x = Lora {
            format: LoraFormat::Diffusers,
            layers: vec![layer("q", 6, 5, 2, 2.0, 1.0)],
        };
        let y = Lora {
            format: LoraFormat::Diffusers,
            layers: vec![layer("q", 6, 4, 2, 2.0, 1.0)],
        };
        let e = merge(&[(&x, 1.0), (&y, 1.0)]).unwrap_err().to_string();
        assert!(e.contains("disagree on its shape"), "{e}");
        assert!(merge(&[(&x, f32::NAN)]).is_err());
    }
}
