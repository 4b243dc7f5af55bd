//! Measuring LoRAs against each other, for fusing several: each layer's update norm
//! `‖s·B·A‖_F`, per-layer norm equalisation, and how much two LoRAs' column spaces overlap.
//!
//! Everything is computed from the thin factors (`r×r` Gram matrices, a QR of `B`), never from
//! the `out×in` update, so a report over a 14B model's layers costs what its factors cost to
//! read. Arithmetic is f64.
//!
//! The overlap is `‖Q_aᵀ·Q_b‖₂`, `Q` an orthonormal basis of `B`'s columns: the cosine of the
//! smallest principal angle between the two LoRAs' output subspaces. 0 means the updates write
//! to orthogonal directions (fusing them cannot interfere in the output), 1 that they share a
//! direction.

use v2l_runtime::error::{Result, RuntimeError};
use v2l_runtime::lora::format::{Lora, LoraLayer};

/// `‖s·B·A‖_F` of one layer at `multiplier` (`s = multiplier·alpha/rank`), from
/// `‖BA‖²_F = Σ (BᵀB) ∘ (AAᵀ)`.
pub fn update_norm(l: &LoraLayer, multiplier: f32) -> f64 {
    (l.scale(multiplier) as f64).abs() * product_norm(l)
}

/// `‖B·A‖_F`.
fn product_norm(l: &LoraLayer) -> f64 {
    let (a, b) = (l.a.to_f32(), l.b.to_f32());
    let (r, out, inp) = (l.rank(), l.b.shape[0], l.a.shape[1]);
    let gb = gram_cols(&b, out, r);
    let ga = gram_rows(&a, r, inp);
    let sq: f64 = gb.iter().zip(&ga).map(|(x, y)| x * y).sum();
    sq.max(0.0).sqrt()
}

/// The Frobenius inner product `⟨ΔW_x, ΔW_y⟩ / (‖ΔW_x‖·‖ΔW_y‖)` of two layers' updates as
/// applied (`s·B·A`; the cosine of the angle between them as vectors), from
/// `Σ (B_xᵀB_y) ∘ (A_x·A_yᵀ)`.
pub fn update_cosine(x: &LoraLayer, y: &LoraLayer) -> f64 {
    let (ax, bx, ay, by) = (x.a.to_f32(), x.b.to_f32(), y.a.to_f32(), y.b.to_f32());
    let (rx, ry, inp) = (x.rank(), y.rank(), x.a.shape[1]);
    // B_xᵀB_y [rx, ry] (sum over output rows) and A_x·A_yᵀ [rx, ry] (dot products of rows).
    let mut bb = vec![0f64; rx * ry];
    for (row_x, row_y) in bx.chunks_exact(rx.max(1)).zip(by.chunks_exact(ry.max(1))) {
        for (cell, (p, q)) in bb.iter_mut().zip(outer(row_x, row_y)) {
            *cell += p * q;
        }
    }
    let rows_y: Vec<&[f32]> = ay.chunks_exact(inp.max(1)).collect();
    let aa = ax
        .chunks_exact(inp.max(1))
        .flat_map(|p| rows_y.iter().map(move |q| dot32(p, q)));
    let dot: f64 = bb.iter().zip(aa).map(|(b, a)| b * a).sum();
    let n = product_norm(x) * product_norm(y);
    let sign = (x.scale(1.0) as f64 * y.scale(1.0) as f64).signum();
    if n > 0.0 {
        sign * dot / n
    } else {
        0.0
    }
}

/// The pairs `(p_i, q_j)` of two rows in row-major `[i, j]` order, widened to f64.
fn outer<'a>(p: &'a [f32], q: &'a [f32]) -> impl Iterator<Item = (f64, f64)> + 'a {
    p.iter()
        .flat_map(move |&a| q.iter().map(move |&b| (a as f64, b as f64)))
}

fn dot32(p: &[f32], q: &[f32]) -> f64 {
    p.iter().zip(q).map(|(a, b)| *a as f64 * *b as f64).sum()
}

/// `‖Q_xᵀ·Q_y‖₂` of the column spaces of `B_x` and `B_y` (module docs).
pub fn subspace_overlap(x: &LoraLayer, y: &LoraLayer) -> f64 {
    let out = x.b.shape[0];
    let qx = orthonormal_columns(&x.b.to_f32(), out, x.rank());
    let qy = orthonormal_columns(&y.b.to_f32(), out, y.rank());
    if qx.is_empty() || qy.is_empty() {
        return 0.0;
    }
    // M = Q_xᵀ Q_y [kx, ky]; ‖M‖₂² is the largest eigenvalue of MᵀM [ky, ky].
    let m: Vec<Vec<f64>> = qx
        .iter()
        .map(|u| qy.iter().map(|v| dot(u, v)).collect())
        .collect();
    let ky = qy.len();
    let mut mtm = vec![0f64; ky * ky];
    for row in &m {
        for (cell, (p, q)) in mtm
            .iter_mut()
            .zip(row.iter().flat_map(|&a| row.iter().map(move |&b| (a, b))))
        {
            *cell += p * q;
        }
    }
    largest_eigenvalue(&mut mtm, ky).max(0.0).sqrt().min(1.0)
}

/// One layer of a norm equalisation: each LoRA's `‖wᵢ·ΔWᵢ‖_F` before, the target, and the
/// factor each LoRA's update is multiplied by to reach it.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerNorms {
    pub module: String,
    /// `None` where a LoRA has no such layer.
    pub norms: Vec<Option<f64>>,
    pub target: f64,
    pub factors: Vec<Option<f64>>,
}

/// Per-layer norm equalisation of weighted LoRAs: in each layer, LoRA `i`'s update
/// `wᵢ·ΔWᵢ` is scaled to the norm `target` (a given value, or `None` for the mean over the
/// LoRAs that have the layer). A zero update stays zero. The factors are returned per layer
/// for [`v2l_runtime::lora::merge::merge_scaled`].
pub fn equalize_norms(loras: &[(&Lora, f32)], target: Option<f64>) -> Result<Vec<LayerNorms>> {
    if let Some(t) = target {
        if !(t.is_finite() && t >= 0.0) {
            return Err(RuntimeError::Invalid {
                what: "norm target".into(),
                message: format!("{t} is not a finite norm ≥ 0"),
            });
        }
    }
    let mut modules: Vec<&str> = loras
        .iter()
        .flat_map(|(l, _)| l.layers.iter().map(|x| x.module.as_str()))
        .collect();
    modules.sort_unstable();
    modules.dedup();
    Ok(modules
        .into_iter()
        .map(|module| {
            let norms: Vec<Option<f64>> = loras
                .iter()
                .map(|(l, w)| {
                    l.layers
                        .iter()
                        .find(|x| x.module == module)
                        .map(|x| update_norm(x, *w))
                })
                .collect();
            let present: Vec<f64> = norms.iter().flatten().copied().collect();
            let mean = present.iter().sum::<f64>() / present.len().max(1) as f64;
            let t = target.unwrap_or(mean);
            let factors = norms
                .iter()
                .map(|n| n.map(|n| if n > 0.0 { t / n } else { 1.0 }))
                .collect();
            LayerNorms {
                module: module.to_string(),
                norms,
                target: t,
                factors,
            }
        })
        .collect())
}

/// `BᵀB` of a row-major `[rows, cols]` matrix, `[cols, cols]`.
fn gram_cols(m: &[f32], rows: usize, cols: usize) -> Vec<f64> {
    let mut g = vec![0f64; cols * cols];
    for row in m.chunks_exact(cols.max(1)).take(rows) {
        for (cell, (p, q)) in g.iter_mut().zip(outer(row, row)) {
            *cell += p * q;
        }
    }
    g
}

/// `AAᵀ` of a row-major `[rows, cols]` matrix, `[rows, rows]`.
fn gram_rows(m: &[f32], rows: usize, cols: usize) -> Vec<f64> {
    let r: Vec<&[f32]> = m.chunks_exact(cols.max(1)).take(rows).collect();
    r.iter()
        .flat_map(|p| r.iter().map(move |q| dot32(p, q)))
        .collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// An orthonormal basis of the columns of a row-major `[rows, cols]` matrix (modified
/// Gram–Schmidt, twice for stability); columns dependent on earlier ones are dropped.
fn orthonormal_columns(m: &[f32], rows: usize, cols: usize) -> Vec<Vec<f64>> {
    let col = |c: usize| -> Vec<f64> {
        m.iter()
            .skip(c)
            .step_by(cols.max(1))
            .take(rows)
            .map(|&v| v as f64)
            .collect()
    };
    let scale = (0..cols)
        .map(|c| dot(&col(c), &col(c)).sqrt())
        .fold(0.0, f64::max);
    let mut q: Vec<Vec<f64>> = Vec::with_capacity(cols);
    for c in 0..cols {
        let mut v = col(c);
        for _ in 0..2 {
            for u in &q {
                let p = dot(u, &v);
                v.iter_mut().zip(u).for_each(|(x, y)| *x -= p * y);
            }
        }
        let n = dot(&v, &v).sqrt();
        if n > 1e-10 * scale && n > 0.0 {
            v.iter_mut().for_each(|x| *x /= n);
            q.push(v);
        }
    }
    q
}

/// The largest eigenvalue of a symmetric `[n, n]` matrix (cyclic Jacobi; `a` is overwritten).
#[allow(clippy::indexing_slicing)] // `a` is n × n, built by this module; all indices are < n
fn largest_eigenvalue(a: &mut [f64], n: usize) -> f64 {
    for _sweep in 0..64 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * n + j] * a[i * n + j])
            .sum();
        if off < 1e-30 {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq.abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let (c, s) = (1.0 / (t * t + 1.0).sqrt(), 0.0);
                let s = s + t * c;
                for k in 0..n {
                    let (akp, akq) = (a[k * n + p], a[k * n + q]);
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[p * n + k], a[q * n + k]);
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
            }
        }
    }
    (0..n).map(|i| a[i * n + i]).fold(f64::MIN, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use v2l_runtime::lora::format::{Factor, LoraFormat};

    fn layer(out: usize, inp: usize, r: usize, alpha: f32, b: &[f32], a: &[f32]) -> LoraLayer {
        LoraLayer {
            module: "q".into(),
            a: Factor::from_f32([r, inp], a),
            b: Factor::from_f32([out, r], b),
            alpha,
        }
    }

    fn wave(n: usize, k: f32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32 + 1.0) * k).sin()).collect()
    }

    /// `s·B·A` in f64, `[out, in]`.
    fn dense(l: &LoraLayer, multiplier: f32) -> Vec<f64> {
        let (a, b, r) = (l.a.to_f32(), l.b.to_f32(), l.rank());
        let (out, inp) = (l.b.shape[0], l.a.shape[1]);
        let s = l.scale(multiplier) as f64;
        (0..out * inp)
            .map(|k| {
                let (o, i) = (k / inp, k % inp);
                s * (0..r)
                    .map(|j| b[o * r + j] as f64 * a[j * inp + i] as f64)
                    .sum::<f64>()
            })
            .collect()
    }

    #[test]
    fn norms_and_cosines_match_the_dense_update() {
        let x = layer(7, 5, 3, 6.0, &wave(21, 0.37), &wave(15, 0.91));
        let y = layer(7, 5, 2, 1.0, &wave(14, 1.3), &wave(10, 0.23));
        let (dx, dy) = (dense(&x, 0.7), dense(&y, 1.0));
        let n = |d: &[f64]| d.iter().map(|v| v * v).sum::<f64>().sqrt();
        assert!((update_norm(&x, 0.7) - n(&dx)).abs() < 1e-9 * n(&dx));
        assert!((update_norm(&x, -0.7) - n(&dx)).abs() < 1e-9 * n(&dx));
        let cos = dx.iter().zip(&dy).map(|(p, q)| p * q).sum::<f64>() / (n(&dx) * n(&dy));
        assert!((update_cosine(&x, &y) - cos).abs() < 1e-9, "{cos}");
    }

    #[test]
    fn overlap_is_one_for_shared_columns_and_zero_for_orthogonal_ones() {
        // B_x spans e0, e1; B_y spans e2 (orthogonal), then e1 + e2 (45° to the plane).
        let bx = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0];
        let x = layer(4, 3, 2, 2.0, &bx, &wave(6, 0.5));
        let y = layer(4, 3, 1, 1.0, &[0.0, 0.0, 2.0, 0.0], &wave(3, 0.2));
        assert!(subspace_overlap(&x, &y) < 1e-12);
        let z = layer(4, 3, 1, 1.0, &[0.0, 1.0, 1.0, 0.0], &wave(3, 0.2));
        let want = std::f64::consts::FRAC_1_SQRT_2;
        assert!((subspace_overlap(&x, &z) - want).abs() < 1e-12);
        assert!((subspace_overlap(&x, &x) - 1.0).abs() < 1e-12);
        // Symmetric, and a dependent column does not count twice.
        let w = layer(
            4,
            3,
            2,
            1.0,
            &[1.0, 2.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0],
            &wave(6, 0.3),
        );
        let (a, b) = (subspace_overlap(&x, &w), subspace_overlap(&w, &x));
        assert!((a - b).abs() < 1e-12 && (a - 1.0).abs() < 1e-12, "{a} {b}");
    }

    #[test]
    fn equalised_layers_reach_the_target_norm() {
        let lora = |k: f32, alpha: f32| Lora {
            format: LoraFormat::Diffusers,
            layers: vec![layer(6, 4, 2, alpha, &wave(12, k), &wave(8, k + 0.1))],
        };
        let (x, y) = (lora(0.3, 2.0), lora(1.1, 8.0));
        let eq = equalize_norms(&[(&x, 0.5), (&y, 2.0)], None).unwrap();
        let l = &eq[0];
        let (nx, ny) = (l.norms[0].unwrap(), l.norms[1].unwrap());
        assert!((l.target - (nx + ny) / 2.0).abs() < 1e-12);
        for (n, f) in l.norms.iter().zip(&l.factors) {
            assert!((n.unwrap() * f.unwrap() - l.target).abs() < 1e-9);
        }
        let given = equalize_norms(&[(&x, 0.5)], Some(3.0)).unwrap();
        assert!((given[0].norms[0].unwrap() * given[0].factors[0].unwrap() - 3.0).abs() < 1e-9);
        assert!(equalize_norms(&[(&x, 0.5)], Some(f64::NAN)).is_err());
    }
}
