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
//! folded scale is rounded once to the engine's type where torch rounds the norm's output and
//! then the product: the same size of error, in another place.

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
    let only_reader = |name: &str| -> Option<usize> {
        match ix.consumers.get(name).map(Vec::as_slice) {
            Some([i]) => Some(*i),
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
