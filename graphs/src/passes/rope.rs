//! RoPE fusion for ONNX Runtime's CUDA provider: the exported interleaved rotary embedding
//! (`x·cos + (x·R)·sin`, four nodes each writing a tensor the size of `q` or `k`, all in f32
//! in bf16/fp16 engines as diffusers computes it) becomes one `com.microsoft.RotaryEmbedding`,
//! the same sums in one pass over memory. At CogVideoX-5B width and 17,776 tokens each of those
//! passes moves about 0.9 GB per block for `q` and again for `k`.
//!
//! Matches what `v2l_export`'s `apply_rope` emits on `x [B, S, heads, Dh]`, with tables
//! `cos`/`sin` broadcasting as `[S, 1, Dh]` and `R` the constant pair rotation
//! (`x·R = (−x₁, x₀, −x₃, x₂, …)`):
//!
//! ```text
//! Mul(x, cos) ─────────────────┐
//! MatMul(x, R) → Mul(·, sin) ──┴ Add → y
//! ```
//!
//! and writes `y = Reshape(RotaryEmbedding(Reshape(x, [B, S, heads·Dh]), [0], cos[:, ::2],
//! sin[:, ::2], interleaved=1), Shape(x))`. That is exact only for tables whose pairs share a
//! value (`cos[2i] = cos[2i+1]`, likewise `sin`), which every RoPE v2l computes has (one
//! frequency per pair: diffusers' `repeat_interleave(2)`), and that hold one row per token
//! (no batch axis). Only nodes in a `rope` scope are fused, and the new nodes keep it, so they
//! stay f32 below f32. ONNX Runtime's CUDA kernel takes any number of tokens since 1.18 (its
//! pull request 20204 moved the tokens off CUDA's 65,535-high grid axis); its offsets are
//! 32-bit, so a call holds fewer than 2³¹ elements of `q` (Wan-14B at 720p, batch 2: 7.7e8).

use std::collections::{HashMap, HashSet};
use std::path::Path;

use super::edit::{i64_tensor, int_attr, node, Index, MS_DOMAIN};
use crate::proto::{ModelProto, NodeProto, TensorProto};
use crate::DType;

/// Rewrites every interleaved RoPE of the exported form in `model` (read from `source`, where
/// the rotation matrix's bytes may live in external data); returns how many were fused.
pub fn fuse_rope(model: &mut ModelProto, source: &Path) -> usize {
    let Some(graph) = model.graph.as_mut() else {
        return 0;
    };
    let ix = Index::new(graph);
    let outputs: HashSet<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
    // A graph output counts as a reader: the nodes a fusion removes must have no other.
    let reads = |name: &str| {
        ix.consumers.get(name).map_or(0, Vec::len) + usize::from(outputs.contains(name))
    };
    let nodes = &graph.node;
    // The producer of `name` if it is a default-domain `op` whose output nothing else reads.
    let inner = |name: &str, op: &str| -> Option<(usize, &NodeProto)> {
        let i = *ix.producer.get(name)?;
        let n = nodes.get(i)?;
        (n.op_type == op && n.domain.is_empty() && reads(name) == 1 && n.input.len() == 2)
            .then_some((i, n))
    };
    let mut rotations: HashMap<String, Option<i64>> = HashMap::new();
    let mut fused: Vec<Match> = Vec::new();
    for (yi, y) in nodes.iter().enumerate() {
        // Only the exporter's `rope` scope: the new nodes keep it, so they stay f32 below f32.
        let in_rope_scope = y
            .name
            .rsplit_once('/')
            .is_some_and(|(scope, _)| scope.rsplit('.').next() == Some("rope"));
        if y.op_type != "Add" || !y.domain.is_empty() || y.input.len() != 2 || !in_rope_scope {
            continue;
        }
        let m = (|| {
            let (a, b) = (
                inner(y.input.first()?, "Mul")?,
                inner(y.input.get(1)?, "Mul")?,
            );
            // One Mul multiplies the rotated x by sin, the other x by cos.
            let rotated = |m: &NodeProto| {
                m.input
                    .iter()
                    .enumerate()
                    .find_map(|(k, v)| inner(v, "MatMul").map(|mm| (k, mm)))
            };
            let (sin_mul, cos_mul, (k, (mi, mm))) = match (rotated(a.1), rotated(b.1)) {
                (Some(r), None) => (a, b, r),
                (None, Some(r)) => (b, a, r),
                _ => return None,
            };
            let sin = sin_mul.1.input.get(1 - k)?.clone();
            let (x, r) = (mm.input.first()?.clone(), mm.input.get(1)?);
            let dh = *rotations.entry(r.clone()).or_insert_with(|| {
                ix.inits
                    .get(r.as_str())
                    .and_then(|t| pair_rotation(t, source))
            });
            let dh = dh?;
            let (c0, c1) = (cos_mul.1.input.first()?, cos_mul.1.input.get(1)?);
            let cos = match (c0.as_str(), c1.as_str()) {
                (p, c) if p == x => c.to_string(),
                (c, p) if p == x => c.to_string(),
                _ => return None,
            };
            if cos == sin || ix.inits.contains_key(cos.as_str()) {
                return None;
            }
            Some(Match {
                add: yi,
                gone: vec![sin_mul.0, cos_mul.0, mi],
                x,
                cos,
                sin,
                dh,
                out: y.output.first()?.clone(),
            })
        })();
        fused.extend(m);
    }
    if fused.is_empty() {
        return 0;
    }
    let count = fused.len();
    let removed: HashSet<usize> = fused.iter().flat_map(|f| f.gone.iter().copied()).collect();
    let mut replace: HashMap<usize, Vec<NodeProto>> = HashMap::new();
    let mut inits: Vec<TensorProto> = Vec::new();
    // One half-width table per (table, Dh), made before its first use.
    let mut halves: HashMap<(String, i64), String> = HashMap::new();
    let position = "rope_fused.position_offset".to_string();
    inits.push(i64_tensor(position.clone(), &[0]));
    for (n, f) in fused.into_iter().enumerate() {
        let name = graph.node.get(f.add).map_or("rope/", |n| n.name.as_str());
        let scope = name.rsplit_once('/').map_or("rope", |(p, _)| p).to_string();
        let mut new = Vec::new();
        let mut half = |table: &str, new: &mut Vec<NodeProto>, inits: &mut Vec<TensorProto>| {
            let k = halves.len();
            halves
                .entry((table.to_string(), f.dh))
                .or_insert_with(|| {
                    let base = format!("rope_fused.table{k}");
                    let rows = format!("{base}.rows_shape");
                    inits.push(i64_tensor(rows.clone(), &[-1, f.dh]));
                    let (starts, ends, axes, steps) = (
                        format!("{base}.starts"),
                        format!("{base}.ends"),
                        format!("{base}.axes"),
                        format!("{base}.steps"),
                    );
                    inits.push(i64_tensor(starts.clone(), &[0]));
                    inits.push(i64_tensor(ends.clone(), &[i64::MAX]));
                    inits.push(i64_tensor(axes.clone(), &[1]));
                    inits.push(i64_tensor(steps.clone(), &[2]));
                    let rows_out = format!("{base}.rows");
                    let out = format!("{base}.half");
                    new.push(node(
                        "Reshape",
                        format!("{scope}/RopeTableRows_{k}"),
                        &[table, &rows],
                        &rows_out,
                        vec![],
                    ));
                    new.push(node(
                        "Slice",
                        format!("{scope}/RopeTableHalf_{k}"),
                        &[&rows_out, &starts, &ends, &axes, &steps],
                        &out,
                        vec![],
                    ));
                    out
                })
                .clone()
        };
        let cos = half(&f.cos, &mut new, &mut inits);
        let sin = half(&f.sin, &mut new, &mut inits);
        let base = format!("rope_fused.{n}");
        let flat_shape = format!("{base}.flat_shape");
        inits.push(i64_tensor(flat_shape.clone(), &[0, 0, -1]));
        let (flat, rotated, shape) = (
            format!("{base}.flat"),
            format!("{base}.rotated"),
            format!("{base}.shape"),
        );
        new.push(node(
            "Reshape",
            format!("{scope}/RopeFlatten_{n}"),
            &[&f.x, &flat_shape],
            &flat,
            vec![],
        ));
        new.push(NodeProto {
            input: vec![flat, position.clone(), cos, sin],
            output: vec![rotated.clone()],
            name: format!("{scope}/RotaryEmbedding_{n}"),
            op_type: "RotaryEmbedding".into(),
            domain: MS_DOMAIN.into(),
            attribute: vec![int_attr("interleaved", 1)],
            ..Default::default()
        });
        new.push(node(
            "Shape",
            format!("{scope}/RopeShape_{n}"),
            &[&f.x],
            &shape,
            vec![],
        ));
        new.push(node(
            "Reshape",
            format!("{scope}/RopeUnflatten_{n}"),
            &[&rotated, &shape],
            &f.out,
            vec![],
        ));
        replace.insert(f.add, new);
    }
    graph.initializer.extend(inits);
    super::edit::splice(model, &removed, replace);
    count
}

/// One RoPE of the exported form: the `Add` it ends in, the nodes it replaces, its input, its
/// tables, the head width and its output.
struct Match {
    add: usize,
    gone: Vec<usize>,
    x: String,
    cos: String,
    sin: String,
    dh: i64,
    out: String,
}

/// `Dh` when `t` is the `[Dh, Dh]` f32 pair rotation `x·R = (−x₁, x₀, −x₃, x₂, …)` exactly
/// (inline, or in the external data beside `source`).
fn pair_rotation(t: &TensorProto, source: &Path) -> Option<i64> {
    let [n, m] = t.dims[..] else { return None };
    // A head is at most 1,024 wide: nothing larger is read from the weight file.
    if n != m || !(2..=1024).contains(&n) || n % 2 != 0 || t.data_type != DType::F32.onnx_code() {
        return None;
    }
    let bytes = if t.raw_data.is_empty() {
        let read = crate::write::read_initializers(source, std::slice::from_ref(&t.name)).ok()?;
        read.into_iter().next()?.3
    } else {
        t.raw_data.clone()
    };
    let n = n as usize;
    if bytes.len() != n * n * 4 {
        return None;
    }
    let at = |row: usize, col: usize| {
        let i = (row * n + col) * 4;
        let b: [u8; 4] = bytes.get(i..i + 4)?.try_into().ok()?;
        Some(f32::from_le_bytes(b))
    };
    let exact = (0..n).all(|row| {
        (0..n).all(|col| {
            let want = match (row % 2, col) {
                (0, c) if c == row + 1 => 1.0,
                (1, c) if c + 1 == row => -1.0,
                _ => 0.0,
            };
            at(row, col) == Some(want)
        })
    });
    exact.then_some(n as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::Graph;
    use crate::{save, ExternalData};

    /// `x·cos + (x·R)·sin` on `x [1, S, 2, 4]` with `R` as given, written with its weights
    /// inline or external.
    fn rope_graph(r: &[f32], external: ExternalData) -> (tempfile::TempDir, std::path::PathBuf) {
        let mut g = Graph::new("rope");
        let x = g.input(
            "x",
            DType::F32,
            vec![1.into(), "s".into(), 2.into(), 4.into()],
        );
        let cos = g.input("cos", DType::F32, vec!["s".into(), 1.into(), 4.into()]);
        let sin = g.input("sin", DType::F32, vec!["s".into(), 1.into(), 4.into()]);
        let r = g.const_f32(r, &[4, 4]);
        let y = g.scoped("blk.rope", |g| {
            let xr = g.matmul(&x, &r);
            let a = g.mul(&x, &cos);
            let b = g.mul(&xr, &sin);
            g.add(&a, &b)
        });
        g.output(
            &y,
            "y",
            DType::F32,
            vec![1.into(), "s".into(), 2.into(), 4.into()],
        );
        let d = tempfile::tempdir().expect("a temporary directory");
        let p = d.path().join("m.onnx");
        save(&g, &p, external).expect("written");
        (d, p)
    }

    const ROTATE: [f32; 16] = [
        0., 1., 0., 0., //
        -1., 0., 0., 0., //
        0., 0., 0., 1., //
        0., 0., -1., 0.,
    ];

    #[test]
    fn fuses_the_pair_rotation_only() {
        for external in [ExternalData::Never, ExternalData::Always] {
            let (_d, p) = rope_graph(&ROTATE, external);
            let mut m = crate::read_model(&p).expect("read back");
            assert_eq!(fuse_rope(&mut m, &p), 1);
            let g = m.graph.as_ref().expect("a graph");
            let ops: Vec<&str> = g.node.iter().map(|n| n.op_type.as_str()).collect();
            assert!(
                ops.contains(&"RotaryEmbedding") && !ops.contains(&"MatMul"),
                "{ops:?}"
            );
            // The new nodes keep the `rope` scope (f32 in low-precision engines); the builder's
            // output `Identity` is outside it.
            let scoped = g.node.iter().filter(|n| n.op_type != "Identity");
            assert!(scoped.clone().count() == 8, "{ops:?}");
            assert!(
                scoped.into_iter().all(|n| n.name.starts_with("blk.rope/")),
                "{ops:?}"
            );
            assert!(m.opset_import.iter().any(|o| o.domain == MS_DOMAIN));
        }
        // Any other matrix (a sign flipped: the other rotation direction) is left alone.
        let mut other = ROTATE;
        other[1] = -1.0;
        other[4] = 1.0;
        let (_d, p) = rope_graph(&other, ExternalData::Never);
        let mut m = crate::read_model(&p).expect("read back");
        assert_eq!(fuse_rope(&mut m, &p), 0);
        // Outside a `rope` scope (where lowering would not keep it f32) it is left alone too.
        let (_d, p) = rope_graph(&ROTATE, ExternalData::Never);
        let mut m = crate::read_model(&p).expect("read back");
        for n in &mut m.graph.as_mut().expect("a graph").node {
            n.name = n.name.replace("blk.rope/", "blk.attn/");
        }
        assert_eq!(fuse_rope(&mut m, &p), 0);
    }
}
