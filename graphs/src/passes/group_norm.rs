//! GroupNorm statistics for a CUDA engine's lowered VAE: each row's mean and variance from one
//! `LayerNormalization` reading the activation in its own (low) type, instead of an f32 copy
//! reduced, squared into a second f32 tensor and reduced again.
//!
//! The exporter (`v2l_export`'s `group_stats`) computes a GroupNorm's statistics in two levels,
//! rows of `H·W` elements then the rows of a group, to keep the CPU's sequential f32 sums
//! within 1e-6 of PyTorch. In a bf16 engine those statistics read the f32 copy of the input
//! (the group-norm island's), write and read its square: 16 of the 56 bytes an element its
//! norm path moves. `LayerNormalization` with `stash_type = 1` returns each row's mean and
//! inverse deviation in f32 from the bf16 input (ONNX Runtime's CUDA kernel: Welford sums in
//! f32), 6 bytes an element with its unused normalized output. The groups then combine their
//! rows exactly as before, in f32: the mean of the row means, and the mean of each row's variance
//! plus its mean's squared distance from the group's (rows of one group are the same length).
//!
//! Matched on the exported form, in a `group_norm` scope:
//!
//! ```text
//! xg = Reshape(x, s)    rows = ReduceMean(xg, [3])   mean = ReduceMean(rows, [2])
//! d = Sub(xg, mean)     sq = ReduceMean(Mul(d, d), [3])   var = ReduceMean(sq, [2])
//! ```
//!
//! becomes `(_, μᵣ, ιᵣ) = LayerNormalization(Reshape(x, s), 1, axis −1)` outside the scope (so it
//! computes in the low type), `mean = ReduceMean(μᵣ, [2])` and
//! `var = ReduceMean(max(1/ιᵣ² − ε, 0) + (μᵣ − mean)², [2])` inside it. The apply,
//! `d·S + H` (`S` and `H` per channel, or the decoder's spatial maps), then scales `x` itself
//! and moves the centring into the shift, `x·S + (H − mean·S)` ([`fold_centring`]), so no
//! centred copy of the activation is written. In a lowered graph, an apply over the decoder's
//! upsampled maps instead scales the rows' normalized output in the low type ([`on_rows`]),
//! so the activation is neither copied to f32 nor the result cast back.

use std::collections::HashMap;

use super::edit::{attr_i, attr_ints, i64_values, int_attr, node, Index};
use super::precision::GROUP_NORM_SCOPE;
use crate::builder::{attr_proto, Attr};
use crate::dtype::DType;
use crate::proto::{ModelProto, NodeProto, TensorProto};

/// `LayerNormalization`'s epsilon, subtracted again from `1/ι²`: a constant row (variance 0;
/// the CUDA kernel's Welford variance is never below it) stays finite, and it is small beside
/// any variance the VAE's groups have (their own epsilon is 1e-6). ONNX Runtime's CPU kernel
/// sums `E[x²] − E[x]²` in one f32 pass, which can cancel below zero: the CPU form of a graph
/// keeps the exported statistics (`v2l_compile`).
const ROW_EPSILON: f32 = 1e-12;

/// How a rewritten GroupNorm applies its statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupNormApply {
    /// `x·S + (H − mean·S)` in f32 ([`fold_centring`]): an f32 graph's, where every form moves
    /// the same bytes.
    Folded,
    /// A lowered graph's: where the apply scales the decoder's upsampled spatial maps, it
    /// scales the rows' normalized output in the low type ([`on_rows`]); elsewhere folded.
    OnRows,
}

/// Rewrites the statistics of every GroupNorm of the exported form; returns how many.
pub fn group_norm_row_stats(model: &mut ModelProto, apply: GroupNormApply) -> usize {
    let Some(graph) = model.graph.as_mut() else {
        return 0;
    };
    let ix = Index::new(graph);
    let nodes = &graph.node;
    let reads = |name: &str| ix.consumers.get(name).map_or(0, Vec::len);
    let output_names: std::collections::HashSet<&str> =
        graph.output.iter().map(|o| o.name.as_str()).collect();
    // The producer of `name`: a default-domain `op`.
    let made = |name: &str, op: &str| -> Option<(usize, &NodeProto)> {
        let i = *ix.producer.get(name)?;
        let n = nodes.get(i)?;
        (n.op_type == op && n.domain.is_empty()).then_some((i, n))
    };
    // The producer of `name` if it is a ReduceMean over exactly `axis`, keeping dims.
    let mean_over = |name: &str, axis: i64| -> Option<(usize, &NodeProto)> {
        let (i, n) = made(name, "ReduceMean")?;
        let keeps = attr_i(n, "keepdims").unwrap_or(1) == 1;
        (keeps && attr_ints(n, "axes") == Some(&[axis][..]) && n.input.len() == 1).then_some((i, n))
    };
    let in_scope = |n: &NodeProto| {
        n.name
            .rsplit_once('/')
            .is_some_and(|(scope, _)| scope.rsplit('.').next() == Some(GROUP_NORM_SCOPE))
    };
    // Per match: node index → the nodes that take its place (empty: removed).
    let mut plan: HashMap<usize, Vec<NodeProto>> = HashMap::new();
    let mut new_inits: Vec<TensorProto> = Vec::new();
    let mut n = 0;
    for (sub_i, sub) in nodes.iter().enumerate() {
        if sub.op_type != "Sub" || !sub.domain.is_empty() || !in_scope(sub) {
            continue;
        }
        let m = (|| {
            let (xg, mean) = (sub.input.first()?, sub.input.get(1)?);
            let d = sub.output.first()?;
            let (_, reshape) = made(xg, "Reshape")?;
            let (x, shape) = (reshape.input.first()?, reshape.input.get(1)?);
            let (mean_i, mean_n) = mean_over(mean, 2)?;
            let (rows_i, rows_n) = mean_over(mean_n.input.first()?, 3)?;
            if rows_n.input.first() != Some(xg) || reads(rows_n.output.first()?) != 1 {
                return None;
            }
            // d is read by its square (twice, by one Mul) and by the rest of the norm.
            let muls: Vec<usize> = ix.consumers.get(d.as_str())?.clone();
            let (mul_i, mul) = muls.iter().find_map(|&c| {
                let m = nodes.get(c)?;
                (m.op_type == "Mul" && m.input.first() == Some(d) && m.input.get(1) == Some(d))
                    .then_some((c, m))
            })?;
            let squared = mul.output.first()?;
            let (sq_i, sq) = ix
                .consumers
                .get(squared.as_str())
                .and_then(|cs| match cs[..] {
                    [c] => nodes.get(c).map(|n| (c, n)),
                    _ => None,
                })?;
            let sq_out = sq.output.first()?;
            if mean_over(sq_out, 3).map(|(i, _)| i) != Some(sq_i)
                || reads(sq_out) != 1
                || output_names.contains(sq_out.as_str())
            {
                return None;
            }
            let (var_i, var_n) = ix
                .consumers
                .get(sq_out.as_str())
                .and_then(|cs| cs.first())
                .and_then(|&c| Some((c, nodes.get(c)?)))?;
            if mean_over(var_n.output.first()?, 2).map(|(i, _)| i) != Some(var_i) {
                return None;
            }
            let (scope, tail) = sub.name.rsplit_once('/')?;
            let stats_scope = scope.strip_suffix(GROUP_NORM_SCOPE)?;
            let name = |s: &str, what: &str| format!("{s}{what}_{tail}");
            let out = |s: &str, what: &str| format!("{}:0", name(s, what));
            let low = format!("{stats_scope}group_stats/");
            let f32 = format!("{scope}/");
            // The rows' length: the exporter's `Concat([0, G, -1], hw)`.
            let (_, concat) = made(shape, "Concat")?;
            let hw = concat.input.get(1).filter(|_| concat.input.len() == 2)?;
            let mut at_rows = vec![
                // In the activation's type: the rows as the exporter shaped them, ones to scale.
                node(
                    "Reshape",
                    name(&low, "Rows"),
                    &[x, shape],
                    &out(&low, "Rows"),
                    vec![],
                ),
                node(
                    "Expand",
                    name(&low, "Ones"),
                    &[ONE, hw],
                    &out(&low, "Ones"),
                    vec![],
                ),
            ];
            let mut ln = node(
                "LayerNormalization",
                name(&low, "RowStats"),
                &[&out(&low, "Rows"), &out(&low, "Ones")],
                &out(&low, "Normalized"),
                vec![
                    int_attr("axis", -1),
                    int_attr("stash_type", 1),
                    attr_proto("epsilon", Attr::Float(ROW_EPSILON)),
                ],
            );
            let (row_mean, row_inv) = (out(&low, "RowMean"), out(&low, "RowInvStd"));
            ln.output.extend([row_mean.clone(), row_inv.clone()]);
            at_rows.push(ln);
            let mut mean_n = mean_n.clone();
            *mean_n.input.first_mut()? = row_mean.clone();
            // In f32: each row's variance back from its inverse deviation, plus the squared
            // distance of its mean from the group's.
            let f = |what: &str| out(&f32, what);
            // `what = op(inputs)`, named in the group-norm scope; the last writes `sq_out`.
            let step = |op: &str, what: &str, inputs: &[&str]| {
                node(op, name(&f32, what), inputs, &f(what), vec![])
            };
            let (inv_sq, var_eps, var_raw) = (f("RowInvSq"), f("RowVarEps"), f("RowVarRaw"));
            let (var, dev, dev_sq) = (f("RowVar"), f("RowDev"), f("RowDevSq"));
            let mut spread = step("Add", "RowSpread", &[&var, &dev_sq]);
            spread.output = vec![sq_out.clone()];
            let at_square = vec![
                step("Mul", "RowInvSq", &[&row_inv, &row_inv]),
                step("Reciprocal", "RowVarEps", &[&inv_sq]),
                step("Sub", "RowVarRaw", &[&var_eps, EPSILON]),
                step("Max", "RowVar", &[&var_raw, ZERO]),
                step("Sub", "RowDev", &[&row_mean, mean]),
                step("Mul", "RowDevSq", &[&dev, &dev]),
                spread,
            ];
            let mut edits = vec![
                (rows_i, at_rows),
                (mean_i, vec![mean_n]),
                (mul_i, at_square),
                (sq_i, Vec::new()),
            ];
            // The apply, where its form is the exporter's: the centring folded into the shift,
            // or the rows' normalized output scaled.
            let rows = (apply == GroupNormApply::OnRows).then(|| Rows {
                normalized: out(&low, "Normalized"),
                mean: row_mean.clone(),
                inv_std: row_inv.clone(),
                low: low.clone(),
            });
            let at = Apply {
                sub_i,
                square_i: mul_i,
                var_n,
                mean,
                xg,
                scope: &f32,
                tail,
            };
            if let Some((fold, inits)) = fold_centring(&ix, nodes, &at, rows.as_ref()) {
                edits.extend(fold);
                new_inits.extend(inits);
            }
            Some(edits)
        })();
        if let Some(edits) = m {
            n += 1;
            plan.extend(edits);
        }
    }
    if n == 0 {
        return 0;
    }
    let old = std::mem::take(&mut graph.node);
    for (i, node) in old.into_iter().enumerate() {
        match plan.remove(&i) {
            Some(new) => graph.node.extend(new),
            None => graph.node.push(node),
        }
    }
    for (name, v) in [(ONE, 1.0), (EPSILON, ROW_EPSILON), (ZERO, 0.0)] {
        if !graph.initializer.iter().any(|t| t.name == name) {
            graph.initializer.push(scalar(name, v));
        }
    }
    for t in new_inits {
        if !graph.initializer.iter().any(|i| i.name == t.name) {
            graph.initializer.push(t);
        }
    }
    n
}

/// An apply's rewrite: node index → the nodes that take its place, and new initializers.
type Rewrite = (Vec<(usize, Vec<NodeProto>)>, Vec<TensorProto>);

/// One matched GroupNorm's apply: the centring `Sub` (`d = xg − mean`), the square its
/// statistics no longer compute, the group variance's reduction, and where new nodes go.
struct Apply<'a> {
    sub_i: usize,
    square_i: usize,
    var_n: &'a NodeProto,
    mean: &'a str,
    xg: &'a str,
    scope: &'a str,
    tail: &'a str,
}

/// The row statistics' outputs, for [`on_rows`]: the normalized rows (the low type in a
/// lowered graph), each row's f32 mean and inverse deviation, and the low-type scope.
struct Rows {
    normalized: String,
    mean: String,
    inv_std: String,
    low: String,
}

const ONE: &str = "v2l.group_stats.one";
const EPSILON: &str = "v2l.group_stats.row_epsilon";
const ZERO: &str = "v2l.group_stats.zero";

fn scalar(name: &str, v: f32) -> TensorProto {
    TensorProto {
        dims: vec![],
        data_type: DType::F32.onnx_code(),
        name: name.into(),
        raw_data: v.to_le_bytes().to_vec(),
        ..Default::default()
    }
}

/// The exporter's apply of the GroupNorm centred by Sub `sub_i`, `y = d·S + H` with
/// `d = x − μ` (seen through a reshape to `x`'s shape and, for the decoder's upsampled spatial
/// maps, a second one to 7 dimensions), as `y = x·S + (H − μ·S)`: the edits that make it, or
/// None where the graph has another form. Once the row statistics no longer square `d`, its
/// only reader is this apply, and the folded form writes and reads no centred copy of the
/// activation (8 of the ~46 bytes an element a bf16 norm path moves). `μ·S` and the new
/// shift are computed at `S`'s size (per channel, or the decoder's maps at the latents' size).
/// It is PyTorch's own order (`group_norm`'s kernels scale and shift `x` by per-channel
/// `γ/σ` and `β − μ·γ/σ`). The reshapes and the apply are in the group-norm scope, so they
/// stay f32 in a lowered graph; the cancellation `x·S − μ·S` costs f32 digits only where
/// `|μ|` is many times the group's deviation.
fn fold_centring(
    ix: &Index,
    nodes: &[NodeProto],
    at: &Apply,
    rows: Option<&Rows>,
) -> Option<Rewrite> {
    let Apply {
        sub_i,
        square_i,
        var_n,
        mean,
        xg,
        scope,
        tail,
    } = *at;
    // The sole reader of `name`, if it is a default-domain `op`.
    let only = |name: &str, op: &str| -> Option<(usize, &NodeProto)> {
        match ix.consumers.get(name)?.as_slice() {
            [c] => nodes
                .get(*c)
                .filter(|n| n.op_type == op && n.domain.is_empty())
                .map(|n| (*c, n)),
            _ => None,
        }
    };
    let d = nodes.get(sub_i)?.output.first()?;
    // `d`'s readers: its square (which the row statistics replace) and one reshape.
    let readers = ix.consumers.get(d.as_str())?;
    let others: Vec<usize> = readers.iter().copied().filter(|&c| c != square_i).collect();
    let [r_i] = others[..] else {
        return None;
    };
    let r = nodes.get(r_i)?;
    if r.op_type != "Reshape" || !r.domain.is_empty() || r.input.first() != Some(d) {
        return None;
    }
    let d5 = r.output.first()?;
    // `d·S`, `d` as x's shape or (the decoder's upsampled maps) viewed in 7 dimensions; its
    // `Shape`s read only its shape, which is x's.
    let values: Vec<&NodeProto> = ix
        .consumers
        .get(d5.as_str())?
        .iter()
        .filter_map(|&c| nodes.get(c))
        .filter(|n| !(n.op_type == "Shape" && n.domain.is_empty()))
        .collect();
    let (mul, viewed, seven) = match values[..] {
        [m] if m.op_type == "Mul" && m.domain.is_empty() => (m, d5, false),
        [r7] if r7.op_type == "Reshape" && r7.domain.is_empty() => {
            let d7 = r7.output.first().filter(|_| r7.input.first() == Some(d5))?;
            (only(d7, "Mul")?.1, d7, true)
        }
        _ => return None,
    };
    if mul.input.first() != Some(viewed) {
        return None;
    }
    let mul_out = mul.output.first()?;
    let (add_i, add) = only(mul_out, "Add")?;
    if add.input.first() != Some(mul_out) {
        return None;
    }
    let (scale, shift) = (mul.input.get(1)?, add.input.get(1)?);
    // The 7-dimensional case: both maps are one `Unsqueeze` of their 5-dimensional forms.
    let unsqueezed = |name: &str| {
        let n = nodes.get(*ix.producer.get(name)?)?;
        (n.op_type == "Unsqueeze" && n.domain.is_empty()).then_some(n)
    };
    let (s5, h5, up) = match seven {
        false => (scale.as_str(), shift.as_str(), None),
        true => {
            let (us, uh) = (unsqueezed(scale)?, unsqueezed(shift)?);
            // The same axes: one input, or two constants of equal values.
            let axes = |n: &NodeProto| -> Option<Result<Vec<i64>, String>> {
                let a = n.input.get(1)?;
                Some(
                    ix.inits
                        .get(a.as_str())
                        .map(|t| i64_values(t))
                        .ok_or(a.clone()),
                )
            };
            let same = axes(us) == axes(uh) && us.attribute == uh.attribute;
            if !same {
                return None;
            }
            (
                us.input.first()?.as_str(),
                uh.input.first()?.as_str(),
                Some(uh),
            )
        }
    };
    // The group's mean per channel, shaped as the exporter shapes its inverse deviation:
    // var → Add ε → Sqrt → Reciprocal → Expand(·, per) → Reshape(·, [0, C, 1, 1, 1]).
    let (_, eps) = only(var_n.output.first()?, "Add")?;
    let (_, sqrt) = only(eps.output.first()?, "Sqrt")?;
    let (_, inv) = only(sqrt.output.first()?, "Reciprocal")?;
    let (_, expand) = only(inv.output.first()?, "Expand")?;
    let (_, per_channel) = only(expand.output.first()?, "Reshape")?;
    let (per, c5) = (expand.input.get(1)?, per_channel.input.get(1)?);
    let name = |what: &str| format!("{scope}{what}_{tail}");
    let out = |what: &str| format!("{}:0", name(what));
    let step =
        |op: &str, what: &str, inputs: &[&str]| node(op, name(what), inputs, &out(what), vec![]);
    let mean_channel = vec![
        step("Expand", "MeanPer", &[mean, per]),
        step("Reshape", "MeanChannel", &[&out("MeanPer"), c5]),
    ];
    if let (Some(rows), Some(uh)) = (rows, up) {
        let r7_i = *ix.producer.get(viewed.as_str())?;
        let (back_i, back) = only(add.output.first()?, "Reshape")?;
        let on = OnRowsAt {
            back_i,
            back,
            r_i,
            r,
            r7_i,
            r7: nodes.get(r7_i)?,
            mul_i: *ix.producer.get(mul_out.as_str())?,
            mul,
            add_i,
            add,
            s5,
            h5,
            c5,
            unsqueeze: uh,
        };
        if let Some(done) = on_rows(ix, &on, rows, mean_channel.clone(), &name, sub_i) {
            return Some(done);
        }
    }
    let mut at_add = mean_channel;
    at_add.extend([
        step("Mul", "MeanScaled", &[&out("MeanChannel"), s5]),
        step("Sub", "Shift", &[h5, &out("MeanScaled")]),
    ]);
    let new_shift = match up {
        None => out("Shift"),
        Some(uh) => {
            let mut u = uh.clone();
            u.name = name("ShiftUp");
            *u.input.first_mut()? = out("Shift");
            u.output = vec![out("ShiftUp")];
            at_add.push(u);
            out("ShiftUp")
        }
    };
    let mut add = add.clone();
    *add.input.get_mut(1)? = new_shift;
    at_add.push(add);
    let mut r = r.clone();
    *r.input.first_mut()? = xg.to_string();
    Some((
        vec![(sub_i, Vec::new()), (r_i, vec![r]), (add_i, at_add)],
        Vec::new(),
    ))
}

/// The nodes of an exported apply over upsampled spatial maps that [`on_rows`] rewrites.
struct OnRowsAt<'a> {
    /// The reshape of the centred rows to the activation's shape, and its index.
    r_i: usize,
    r: &'a NodeProto,
    /// Its view in 7 dimensions.
    r7_i: usize,
    r7: &'a NodeProto,
    /// `d·S` in 7 dimensions, and `· + H`.
    mul_i: usize,
    mul: &'a NodeProto,
    add_i: usize,
    add: &'a NodeProto,
    /// The sum's view back in 5 dimensions, its sole reader.
    back_i: usize,
    back: &'a NodeProto,
    /// `S` and `H` in 5 dimensions (at the latents' size), and the per-channel shape
    /// `[0, C, 1, 1, 1]`.
    s5: &'a str,
    h5: &'a str,
    c5: &'a str,
    /// The `Unsqueeze` that views `H` in 7 dimensions (`S`'s has the same axes).
    unsqueeze: &'a NodeProto,
}

/// A lowered graph's apply over the decoder's upsampled spatial maps, on the rows' normalized
/// output `y = (x − μᵣ)·ιᵣ` (one rounding to the low type, in `LayerNormalization`'s one pass):
/// `d·S + H = y·(S/ιᵣ) + (H + (μᵣ − mean)·S)`, the new scale and shift computed in f32 at the
/// maps' size (each row, a channel's frame, has its own), the product and sum in the low type.
/// The folded form's f32 apply read an f32 copy of the activation and wrote an f32 result
/// cast down after (about 20 of its 38 bytes an element in a bf16 graph); here the apply
/// reads and writes the low type, as PyTorch's bf16 `CogVideoXSpatialNorm3D` does (its
/// GroupNorm's output, the product with the map and the sum each rounded to bf16). No term
/// cancels: `y` and `(μᵣ − mean)·ιg` are the row's values in units of deviations. None where
/// the per-channel shape is not a constant.
fn on_rows(
    ix: &Index,
    at: &OnRowsAt,
    rows: &Rows,
    mean_channel: Vec<NodeProto>,
    name: &dyn Fn(&str) -> String,
    sub_i: usize,
) -> Option<Rewrite> {
    // `[0, C, 1, 1, 1]` → `[0, C, −1, 1, 1]`: the rows (a channel's frames) as `[N, C, T, 1, 1]`.
    let c5 = i64_values(ix.inits.get(at.c5)?);
    let [0, c, 1, 1, 1] = c5[..] else {
        return None;
    };
    let out = |what: &str| format!("{}:0", name(what));
    let step =
        |op: &str, what: &str, inputs: &[&str]| node(op, name(what), inputs, &out(what), vec![]);
    let shape = TensorProto {
        dims: vec![5],
        data_type: DType::I64.onnx_code(),
        name: format!("v2l.group_stats.rows_of_{c}"),
        raw_data: [0i64, c, -1, 1, 1]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        ..Default::default()
    };
    let up = |what: &str, from: &str| {
        let mut u = at.unsqueeze.clone();
        u.name = name(what);
        *u.input.first_mut()? = out(from);
        u.output = vec![out(what)];
        Some(u)
    };
    // In f32, at the maps' size.
    let mut at_mul = mean_channel;
    at_mul.extend([
        step("Reciprocal", "RowStd", &[&rows.inv_std]),
        step("Reshape", "RowStd5", &[&out("RowStd"), &shape.name]),
        step("Mul", "RowScale", &[at.s5, &out("RowStd5")]),
        step("Reshape", "RowMean5", &[&rows.mean, &shape.name]),
        step("Sub", "RowOffset", &[&out("RowMean5"), &out("MeanChannel")]),
        step("Mul", "RowOffsetScaled", &[&out("RowOffset"), at.s5]),
        step("Add", "RowShift", &[at.h5, &out("RowOffsetScaled")]),
        up("RowScaleUp", "RowScale")?,
        up("RowShiftUp", "RowShift")?,
    ]);
    // In the low type: the normalized rows viewed as the activation, scaled and shifted.
    let low = |n: &NodeProto| -> Option<NodeProto> {
        let mut n = n.clone();
        let (_, tail) = n.name.rsplit_once('/')?;
        n.name = format!("{}{tail}", rows.low);
        Some(n)
    };
    let mut r = low(at.r)?;
    *r.input.first_mut()? = rows.normalized.clone();
    let mut mul = low(at.mul)?;
    *mul.input.get_mut(1)? = out("RowScaleUp");
    at_mul.push(mul);
    let mut add = low(at.add)?;
    *add.input.get_mut(1)? = out("RowShiftUp");
    let mut edits = vec![
        (sub_i, Vec::new()),
        (at.r_i, vec![r]),
        (at.mul_i, at_mul),
        (at.add_i, vec![add]),
    ];
    // The 7-dimensional view of the rows, between `r` and the product, and the view of the
    // sum back in 5, compute low too.
    edits.push((at.r7_i, vec![low(at.r7)?]));
    edits.push((at.back_i, vec![low(at.back)?]));
    Some((edits, vec![shape]))
}
