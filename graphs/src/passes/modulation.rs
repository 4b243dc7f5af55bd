//! AdaLN's modulation folded into its layer norm, for CUDA engines.
//!
//! A CogVideoX block normalises text and video, then modulates each per sample:
//! `LayerNorm(x; γ, β) · (1 + scale) + shift`, with `scale` and `shift` of shape
//! `[batch, 1, hidden]` from the timestep embedding. Written out, the `Mul` and the `Add` each
//! read and write the whole activation: 4 of a block's ~100 elementwise passes, per norm, at
//! CogVideoX-5B width. `LayerNormalization` takes a scale and bias that broadcast to its input
//! (ONNX's definition multiplies and adds them with broadcasting; ONNX Runtime's kernels take
//! `[batch, 1, hidden]` since 1.21), so the same result is
//!
//! ```text
//! LayerNorm(x; γ·(1 + scale), β·(1 + scale) + shift)
//! ```
//!
//! whose new scale and bias are computed on `[batch, 1, hidden]` vectors. Below fp32 the
//! typed graph rounds those vectors (`γ·s`, `β·s`, `β·s + shift`) and the norm's output, where
//! torch rounds the norm's output, the product and the sum: the same size of error, in other
//! places.
//!
//! ONNX Runtime's CUDA kernel is right only for a rank-3 input whose scale and bias have one
//! shape among `[H]`, `[1, 1, H]`, `[B, 1, H]`, `[1, S, H]`, `[B, S, H]`: from 1.24 its shared
//! shape check lets any broadcastable pair through, and the CUDA kernel then applies the first
//! row of an unsupported one to every row, silently (the CPU kernel broadcasts them right, so
//! no CPU test would see it). The graph has no shapes, so a fold is made only where the
//! exported AdaLN's structure proves `[B, 1, H]`: `scale` (or `1 + scale`) and `shift` are two
//! parts of one `Split`, either equal parts on the last axis of an `Unsqueeze(·, [1])`
//! (CogVideoX's chunked timestep projection) or parts one row each on the middle axis of
//! `table + m`, a `[1, n, H]` initializer plus a `Reshape` to `[B, n or 1, H]` (Wan's
//! `scale_shift_table + temb`). `v2l-compile` applies it to the DiTs of CUDA engines.
//!
//! Wan computes its block and output norms in f32 with the modulation (diffusers'
//! `norm1(x.float()) · (1 + scale) + shift`, then `.type_as(x)`): folded, a bf16/fp16 engine
//! still rounds once, after the modulation, and the two f32 passes between its norm and that
//! rounding go.

use std::collections::{HashMap, HashSet};

use crate::proto::{ModelProto, NodeProto};

/// Folds every `LayerNormalization → Mul → Add` whose multiplier and addend do not depend on
/// the normalised tensor; returns how many.
pub fn fold_modulation(model: &mut ModelProto) -> usize {
    let Some(graph) = model.graph.as_ref() else {
        return 0;
    };
    let ix = super::edit::Index::new(graph);
    let nodes = &graph.node;
    let outputs: HashSet<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
    // The one node reading `name`, which no graph output is.
    let only_reader = |name: &str| -> Option<usize> {
        match ix.consumers.get(name).map(Vec::as_slice) {
            Some([i]) if !outputs.contains(name) => Some(*i),
            _ => None,
        }
    };
    // Whether `v` is computed from `x` (a modulation from the activation it scales would be
    // as large as the activation: nothing to gain).
    let depends_on = |v: &str, x: &str| -> bool {
        let mut seen: HashSet<&str> = HashSet::new();
        let mut todo = vec![v];
        while let Some(t) = todo.pop() {
            if t == x {
                return true;
            }
            if !seen.insert(t) {
                continue;
            }
            if let Some(n) = ix.producer.get(t).and_then(|&i| nodes.get(i)) {
                todo.extend(n.input.iter().map(String::as_str));
            }
        }
        false
    };
    // Whether `v` is `[B, n, H]` for a table `[1, n, H]` (Wan's `table + temb`, module doc):
    // the table's sum with a `Reshape` to three dimensions, the last `H` and the middle `n`
    // or 1.
    let tabled = |v: &str, n: usize| -> bool {
        let sum = (|| {
            let add = nodes.get(*ix.producer.get(v)?)?;
            if add.op_type != "Add" || !add.domain.is_empty() || add.input.len() != 2 {
                return None;
            }
            let (a, b) = (add.input.first()?.as_str(), add.input.get(1)?.as_str());
            let (table, other) = match (ix.inits.get(a), ix.inits.get(b)) {
                (Some(t), None) => (*t, b),
                (None, Some(t)) => (*t, a),
                _ => return None,
            };
            let h = match table.dims.as_slice() {
                [1, rows, h] if *rows == n as i64 && *h > 1 => *h,
                _ => return None,
            };
            let reshape = nodes.get(*ix.producer.get(other)?)?;
            if reshape.op_type != "Reshape" || !reshape.domain.is_empty() {
                return None;
            }
            let shape = super::edit::i64_values(ix.inits.get(reshape.input.get(1)?.as_str())?);
            Some(
                matches!(shape.as_slice(), [_, m, last] if *last == h && (*m == n as i64 || *m == 1)),
            )
        })();
        sum == Some(true)
    };
    // The `Split` of which `v` is a part, when that proves `v` is `[B, 1, H]` (module doc):
    // equal parts on the last axis of a rank-3 `Unsqueeze(·, [1])` (CogVideoX), or parts one
    // row each on the middle axis of a table's sum (Wan).
    let per_sample_part = |v: &str| -> Option<usize> {
        let si = *ix.producer.get(v)?;
        let split = nodes.get(si)?;
        let axis = super::edit::attr_i(split, "axis").unwrap_or(0);
        if split.op_type == "Split" && split.domain.is_empty() && (axis == 1 || axis == -2) {
            let rows = split.output.len();
            let sizes = match split.input.get(1).filter(|s| !s.is_empty()) {
                Some(s) => super::edit::i64_values(ix.inits.get(s.as_str())?),
                None => vec![1; rows],
            };
            let one_row_each = sizes.len() == rows && sizes.iter().all(|&s| s == 1);
            return (one_row_each && tabled(split.input.first()?, rows)).then_some(si);
        }
        let equal = match split.input.get(1).filter(|s| !s.is_empty()) {
            None => true,
            Some(sizes) => {
                let sizes = super::edit::i64_values(ix.inits.get(sizes.as_str())?);
                // Parts one wide would be `[B, 1, 1]`, no shape the CUDA kernel takes.
                sizes.windows(2).all(|w| w.first() == w.get(1))
                    && sizes.first().is_some_and(|&s| s > 1)
            }
        };
        let source = nodes.get(*ix.producer.get(split.input.first()?.as_str())?)?;
        let axes = source
            .input
            .get(1)
            .and_then(|a| ix.inits.get(a.as_str()))
            .map(|t| super::edit::i64_values(t));
        let unsqueezed = source.op_type == "Unsqueeze"
            && source.domain.is_empty()
            && axes.as_deref() == Some(&[1][..]);
        (split.op_type == "Split"
            && split.domain.is_empty()
            && (axis == 2 || axis == -1)
            && equal
            && unsqueezed)
            .then_some(si)
    };
    // `scale` itself or, as exported, `1 + scale`.
    let scale_part = |v: &str| -> Option<usize> {
        if let Some(si) = per_sample_part(v) {
            return Some(si);
        }
        let add = nodes.get(*ix.producer.get(v)?)?;
        if add.op_type != "Add" || !add.domain.is_empty() {
            return None;
        }
        let is_scalar = |n: &str| {
            ix.inits
                .get(n)
                .is_some_and(|t| t.dims.len() <= 1 && t.dims.iter().product::<i64>() == 1)
        };
        match (add.input.first()?.as_str(), add.input.get(1)?.as_str()) {
            (c, part) | (part, c) if is_scalar(c) => per_sample_part(part),
            _ => None,
        }
    };
    let binary = |i: usize, op: &str, operand: &str| -> Option<(usize, String)> {
        let n = nodes.get(i)?;
        if n.op_type != op || !n.domain.is_empty() || n.input.len() != 2 {
            return None;
        }
        let other = match (n.input.first()?, n.input.get(1)?) {
            (a, b) if a == operand => b,
            (a, b) if b == operand => a,
            _ => return None,
        };
        Some((i, other.clone()))
    };
    // (norm, mul, add, scale, shift)
    let mut folds: Vec<(usize, usize, usize, String, String)> = Vec::new();
    for (li, ln) in nodes.iter().enumerate() {
        let m = (|| {
            if ln.op_type != "LayerNormalization" || !ln.domain.is_empty() {
                return None;
            }
            let axis = super::edit::attr_i(ln, "axis").unwrap_or(-1);
            let extra_outputs = ln.output.iter().skip(1).any(|o| !o.is_empty());
            if axis != -1 || extra_outputs || ln.input.len() < 2 {
                return None;
            }
            let (x, y) = (ln.input.first()?, ln.output.first()?);
            let (mi, scale) = binary(only_reader(y)?, "Mul", y)?;
            let product = nodes.get(mi)?.output.first()?;
            let (ai, shift) = binary(only_reader(product)?, "Add", product)?;
            if depends_on(&scale, x) || depends_on(&shift, x) {
                return None;
            }
            let split = per_sample_part(&shift)?;
            if scale_part(&scale)? != split {
                return None;
            }
            Some((li, mi, ai, scale, shift))
        })();
        folds.extend(m);
    }
    let count = folds.len();
    let mut removed = HashSet::new();
    let mut replace: HashMap<usize, Vec<NodeProto>> = HashMap::new();
    for (li, mi, ai, scale, shift) in folds {
        let (Some(ln), Some(mul), Some(add)) = (nodes.get(li), nodes.get(mi), nodes.get(ai)) else {
            continue;
        };
        let (Some(y), Some(out)) = (ln.output.first(), add.output.first()) else {
            continue;
        };
        let node = |op: &str, what: &str, input: &[&str]| {
            let name = format!("{}/Folded{what}", mul.name);
            let out = format!("{y}.{}", what.to_lowercase());
            (super::edit::node(op, name, input, &out, vec![]), out)
        };
        let mut new = Vec::new();
        let (gamma, beta) = (ln.input.get(1), ln.input.get(2).filter(|b| !b.is_empty()));
        let Some(gamma) = gamma else { continue };
        let (n, folded_gamma) = node("Mul", "Scale", &[gamma, &scale]);
        new.push(n);
        let folded_beta = match beta {
            Some(beta) => {
                let (n, scaled) = node("Mul", "ScaledBias", &[beta, &scale]);
                new.push(n);
                let (n, b) = node("Add", "Bias", &[&scaled, &shift]);
                new.push(n);
                b
            }
            None => shift,
        };
        // After the Add's place: `scale` and `shift` may be computed after the norm was.
        let Some(x) = ln.input.first() else { continue };
        let mut norm = ln.clone();
        norm.input = vec![x.clone(), folded_gamma, folded_beta];
        norm.output = vec![out.clone()];
        new.push(norm);
        removed.extend([li, mi]);
        replace.insert(ai, new);
    }
    super::edit::splice(model, &removed, replace);
    count
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Attr, DType, Graph};

    use crate::saved_model as model;

    /// `[b, n, 4]`: a batch of token rows.
    fn tokens() -> Vec<crate::Dim> {
        vec!["b".into(), "n".into(), 4.into()]
    }

    /// Where a test's modulation comes from.
    #[derive(Clone, Copy, Debug)]
    enum Modulation {
        /// As exported: `t, s = Split(Unsqueeze(m, [1]), axis 2)`, the multiplier `1 + s`.
        Exported,
        /// The multiplier `s` itself, from the same split.
        Bare,
        /// `s` and `t` given as graph inputs: no structure proves their shapes.
        Inputs,
    }

    /// `LayerNorm(x) · s' + t` with per-sample `s'` (`s` or `1 + s`) and `t`; `bias`: the norm
    /// has one; `swap`: the operands in the other order.
    fn adaln(bias: bool, swap: bool, how: Modulation) -> (Graph, crate::Value) {
        let mut g = Graph::new("t");
        let x = g.input("x", DType::F32, tokens());
        let (t, s) = match how {
            Modulation::Inputs => (
                g.input("t", DType::F32, vec!["b".into(), 1.into(), 4.into()]),
                g.input("s", DType::F32, vec!["b".into(), 1.into(), 4.into()]),
            ),
            Modulation::Exported | Modulation::Bare => {
                let m = g.input("m", DType::F32, vec!["b".into(), 8.into()]);
                let m = g.unsqueeze(&m, &[1]);
                let [t, s] = g.chunk::<2>(&m, 4, 2);
                match how {
                    Modulation::Exported => {
                        let one = g.scalar(1.0);
                        let s = g.add(&one, &s);
                        (t, s)
                    }
                    _ => (t, s),
                }
            }
        };
        let w = g.const_f32(&[1.0, 2.0, 0.5, 1.5], &[4]);
        let y = match bias {
            true => {
                let b = g.const_f32(&[0.1, 0.0, -0.1, 0.2], &[4]);
                g.layer_norm(&x, &w, &b, 1e-6)
            }
            false => g.op(
                "LayerNormalization",
                &[&x, &w],
                vec![("axis", Attr::Int(-1)), ("epsilon", Attr::Float(1e-6))],
            ),
        };
        let z = g.scoped("norm1", |g| match swap {
            true => {
                let p = g.mul(&s, &y);
                g.add(&t, &p)
            }
            false => {
                let p = g.mul(&y, &s);
                g.add(&p, &t)
            }
        });
        g.output(&z, "out", DType::F32, tokens());
        (g, y)
    }

    fn norms(m: &ModelProto) -> Vec<&NodeProto> {
        let g = m.graph.as_ref().unwrap();
        g.node
            .iter()
            .filter(|n| n.op_type == "LayerNormalization")
            .collect()
    }

    #[test]
    fn folds_with_or_without_a_bias_and_in_either_operand_order() {
        for how in [Modulation::Exported, Modulation::Bare] {
            for (bias, swap) in [(true, false), (true, true), (false, false), (false, true)] {
                let (g, _) = adaln(bias, swap, how);
                let mut m = model(&g);
                let what = format!("bias {bias}, swap {swap}, {how:?}");
                assert_eq!(fold_modulation(&mut m), 1, "{what}");
                let g = m.graph.as_ref().unwrap();
                // The norm now writes the output; no Mul or Add reads the activation.
                let n = norms(&m);
                assert_eq!(n.len(), 1);
                let y = &n[0].output[0];
                let reads_y = |op: &str| {
                    g.node
                        .iter()
                        .any(|m| m.op_type == op && m.input.contains(y))
                };
                assert!(!reads_y("Mul") && !reads_y("Add"), "{what}: {:?}", g.node);
                assert!(n[0].input[1].ends_with(".scale"), "{:?}", n[0].input);
                // Without a bias of its own the shift, the split's first part, is the bias.
                let want_bias = if bias {
                    n[0].input[2].ends_with(".bias")
                } else {
                    n[0].input[2].ends_with(":0")
                };
                assert!(want_bias, "{what}: {:?}", n[0].input);
                // Every node comes after what it reads.
                let mut known: HashSet<&str> = ["x", "m"].into();
                known.extend(g.initializer.iter().map(|t| t.name.as_str()));
                for node in &g.node {
                    assert!(
                        node.input.iter().all(|i| known.contains(i.as_str())),
                        "{}",
                        node.name
                    );
                    known.extend(node.output.iter().map(String::as_str));
                }
            }
        }
    }

    /// Wan's form: `shift, scale = Split(table + Reshape(m, [0, n, H]), axis 1)`, one row each
    /// (`[B, 1, H]`), the multiplier `1 + scale`; `rows`: the reshape's middle dimension, `n`
    /// (a block's table) or 1 (the output norm's, broadcast over the table's rows).
    fn tabled(rows: i64, table: &[i64], split_axis: i64) -> Graph {
        let mut g = Graph::new("t");
        let x = g.input("x", DType::F32, tokens());
        let m = g.input("m", DType::F32, vec!["b".into(), (rows * 4).into()]);
        let m = g.reshape_to(&m, &[0, rows, 4]);
        let n = table.iter().product::<i64>() as usize;
        let t = g.const_f32(&vec![0.25; n], table);
        let sum = g.add(&t, &m);
        let size = if split_axis == 2 { 2 } else { 1 };
        let [shift, scale] = g.chunk::<2>(&sum, size, split_axis);
        let one = g.scalar(1.0);
        let s = g.add(&one, &scale);
        let w = g.const_f32(&[1.0; 4], &[4]);
        let b = g.const_f32(&[0.0; 4], &[4]);
        let y = g.layer_norm(&x, &w, &b, 1e-6);
        let p = g.mul(&y, &s);
        let z = g.add(&p, &shift);
        g.output(&z, "out", DType::F32, tokens());
        g
    }

    #[test]
    fn folds_wans_table_modulation() {
        for rows in [2, 1] {
            let mut m = model(&tabled(rows, &[1, 2, 4], 1));
            assert_eq!(fold_modulation(&mut m), 1, "reshaped to {rows} rows");
            assert!(norms(&m)[0].input[1].ends_with(".scale"));
        }
        // Split on the middle axis counted from the end.
        assert_eq!(fold_modulation(&mut model(&tabled(2, &[1, 2, 4], -2))), 1);
    }

    #[test]
    fn leaves_a_table_modulation_whose_rows_are_not_one_sample_each() {
        // A table with a batch of its own, or of another width than the reshape's: the parts
        // need not be `[B, 1, H]`.
        assert_eq!(fold_modulation(&mut model(&tabled(2, &[2, 2, 4], 1))), 0);
        assert_eq!(fold_modulation(&mut model(&tabled(2, &[1, 2, 1], 1))), 0);
        // Split on the last axis: parts `[B, 2, 2]`.
        assert_eq!(fold_modulation(&mut model(&tabled(2, &[1, 2, 4], 2))), 0);
    }

    #[test]
    fn leaves_a_modulation_whose_shape_no_structure_proves() {
        // ONNX Runtime's CUDA kernel would apply an unsupported broadcast's first row to
        // every row, so operands of unknown shape are left as they are.
        for (bias, swap) in [(true, false), (false, true)] {
            let (g, _) = adaln(bias, swap, Modulation::Inputs);
            assert_eq!(fold_modulation(&mut model(&g)), 0);
        }
    }

    #[test]
    fn leaves_a_norm_whose_output_is_read_elsewhere_or_whose_scale_reads_it() {
        // The norm's output is also a graph output.
        let (mut g, y) = adaln(true, false, Modulation::Exported);
        g.output(&y, "normed", DType::F32, tokens());
        assert_eq!(fold_modulation(&mut model(&g)), 0);
        // The multiplier is computed from the normalised tensor itself.
        let mut g = Graph::new("t");
        let x = g.input("x", DType::F32, tokens());
        let t = g.input("t", DType::F32, vec!["b".into(), 1.into(), 4.into()]);
        let w = g.const_f32(&[1.0; 4], &[4]);
        let b = g.const_f32(&[0.0; 4], &[4]);
        let y = g.layer_norm(&x, &w, &b, 1e-6);
        let s = g.op(
            "ReduceMean",
            &[&x],
            vec![("axes", Attr::Ints(vec![1])), ("keepdims", Attr::Int(1))],
        );
        let p = g.mul(&y, &s);
        let z = g.add(&p, &t);
        g.output(&z, "out", DType::F32, tokens());
        assert_eq!(fold_modulation(&mut model(&g)), 0);
    }
}
