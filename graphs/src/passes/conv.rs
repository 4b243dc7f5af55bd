//! The VAE decoder's convolutions moved onto v2l's bf16 operator `ai.v2l.Conv`
//! (`v2l_runtime::conv`), for CPU engines below fp32: ONNX Runtime runs `Conv` in f32 only.

use super::edit::V2L_DOMAIN;
use super::edit::{attr_i, attr_ints};
use crate::dtype::DType;
use crate::proto::{ModelProto, NodeProto};

/// The operator's name in the `ai.v2l` domain.
pub const V2L_CONV: &str = "Conv";

/// The geometry `ai.v2l.Conv` runs, read from a `Conv`'s `kernel_shape` and `pads`: the kernel
/// as `[frames, height, width]` (a 2-D kernel has one frame) and the zeros on both sides of
/// height and of width. Refused: other ranks, kernels below 1, unequal pads, pads not below the
/// kernel's size, and padded time (the VAE pads time itself, with its frame caches).
pub fn conv_geometry(
    kernel_shape: &[i64],
    pads: Option<&[i64]>,
) -> Result<([usize; 3], [usize; 2]), String> {
    let k: Vec<usize> = kernel_shape
        .iter()
        .map(|&d| usize::try_from(d).ok().filter(|&d| d > 0))
        .collect::<Option<_>>()
        .ok_or_else(|| format!("kernel_shape {kernel_shape:?} has a dimension below 1"))?;
    let kernel = match k[..] {
        [kh, kw] => [1, kh, kw],
        [kt, kh, kw] => [kt, kh, kw],
        _ => return Err(format!("kernel_shape {kernel_shape:?}: 2-D or 3-D only")),
    };
    let zeros = vec![0; 2 * k.len()];
    let p = pads.unwrap_or(&zeros);
    let (ph, pw) = match (k.len(), p) {
        (2, [t, l, b, r]) if t == b && l == r => (*t, *l),
        (3, [0, t, l, 0, b, r]) if t == b && l == r => (*t, *l),
        _ => {
            return Err(format!(
                "pads {p:?}: only equal height and width pads (no time pads) for kernel {kernel_shape:?}"
            ))
        }
    };
    // A pad of the kernel's size or more adds only bias rows; refusing it also bounds the
    // padded sizes by the weight's own.
    let pad = |p: i64, k: usize| {
        usize::try_from(p)
            .ok()
            .filter(|&p| p < k)
            .ok_or_else(|| format!("pads {p}: from 0 to the kernel's size {k} minus 1"))
    };
    Ok((kernel, [pad(ph, kernel[1])?, pad(pw, kernel[2])?]))
}

/// Whether `ai.v2l.Conv` runs this node: a plain `Conv` with an f32 weight initializer and a
/// bias (computed or not: the VAE's cache ties order convs through their bias),
/// one group, stride and dilation 1, explicit pads it takes ([`conv_geometry`]).
fn runs_on_v2l(n: &NodeProto, f32_inits: &std::collections::HashSet<&str>) -> bool {
    let ones = |name: &str| attr_ints(n, name).is_none_or(|v| v.iter().all(|&x| x == 1));
    n.op_type == "Conv"
        && n.domain.is_empty()
        && n.input.len() == 3
        && n.input
            .get(1)
            .is_some_and(|w| f32_inits.contains(w.as_str()))
        && attr_i(n, "group").is_none_or(|g| g == 1)
        && ones("strides")
        && ones("dilations")
        && n.attribute
            .iter()
            .all(|a| a.name != "auto_pad" || a.s.is_empty() || a.s == b"NOTSET")
        && attr_ints(n, "kernel_shape")
            .is_some_and(|k| conv_geometry(k, attr_ints(n, "pads")).is_ok())
}

/// Moves every `Conv` that `ai.v2l.Conv` runs ([`runs_on_v2l`]) onto it, keeping its inputs and
/// attributes; returns how many moved.
pub fn v2l_conv(model: &mut ModelProto) -> usize {
    let Some(graph) = model.graph.as_mut() else {
        return 0;
    };
    let f32_inits: std::collections::HashSet<&str> = graph
        .initializer
        .iter()
        .filter(|t| t.data_type == DType::F32.onnx_code())
        .map(|t| t.name.as_str())
        .collect();
    let moving: std::collections::HashSet<usize> = (graph.node.iter().enumerate())
        .filter(|(_, n)| runs_on_v2l(n, &f32_inits))
        .map(|(i, _)| i)
        .collect();
    for (_, n) in (graph.node.iter_mut().enumerate()).filter(|(i, _)| moving.contains(i)) {
        n.domain = V2L_DOMAIN.into();
        n.op_type = V2L_CONV.into();
        n.attribute
            .retain(|a| a.name == "kernel_shape" || a.name == "pads");
    }
    if !moving.is_empty() {
        super::edit::import_domain(model, V2L_DOMAIN);
    }
    moving.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::{Attr, Graph};

    #[test]
    fn stride_one_convs_with_constant_weights_move_and_others_stay() {
        let mut g = Graph::new("convs");
        let x = g.input(
            "x",
            DType::F32,
            vec![1.into(), 2.into(), 3.into(), 8.into(), 8.into()],
        );
        let w3 = g.const_f32(&[0.5; 2 * 2 * 27], &[2, 2, 3, 3, 3]);
        let b = g.const_f32(&[0.0; 2], &[2]);
        let pads = ("pads", Attr::Ints(vec![0, 1, 1, 0, 1, 1]));
        let k3 = ("kernel_shape", Attr::Ints(vec![3, 3, 3]));
        let y = g.op("Conv", &[&x, &w3, &b], vec![k3.clone(), pads.clone()]);
        // Stride 2, and time pads: ONNX Runtime keeps them.
        let strided = g.op(
            "Conv",
            &[&y, &w3, &b],
            vec![
                k3.clone(),
                pads.clone(),
                ("strides", Attr::Ints(vec![1, 2, 2])),
            ],
        );
        let time_padded = g.op(
            "Conv",
            &[&y, &w3, &b],
            vec![k3, ("pads", Attr::Ints(vec![1, 1, 1, 1, 1, 1]))],
        );
        // A computed bias (as the VAE's cache ties make it) moves; a computed weight stays.
        let tied = g.op("Identity", &[&b], vec![]);
        let pads_only = vec![("kernel_shape", Attr::Ints(vec![3, 3, 3])), pads.clone()];
        let biased = g.op("Conv", &[&y, &w3, &tied], pads_only.clone());
        let w_computed = g.op("Identity", &[&w3], vec![]);
        let weighted = g.op("Conv", &[&y, &w_computed, &b], pads_only);
        for (v, name) in [
            (&strided, "a"),
            (&time_padded, "b"),
            (&biased, "c"),
            (&weighted, "d"),
        ] {
            g.output(v, name, DType::F32, vec![]);
        }
        let d = tempfile::tempdir().expect("a temporary directory");
        let p = d.path().join("m.onnx");
        crate::save(&g, &p, crate::ExternalData::Never).expect("written");
        let mut m = crate::read_model(&p).expect("read back");
        assert_eq!(v2l_conv(&mut m), 2);
        let graph = m.graph.as_ref().expect("graph");
        let ours: Vec<_> = (graph.node.iter())
            .filter(|n| n.domain == V2L_DOMAIN)
            .collect();
        assert_eq!(ours.len(), 2);
        assert!(ours.iter().all(|n| n.op_type == V2L_CONV));
        let tie = graph
            .node
            .iter()
            .find(|n| n.op_type == "Identity")
            .expect("tie");
        assert_eq!(
            ours[1].input[2], tie.output[0],
            "the conv with the tied bias"
        );
        assert!(m.opset_import.iter().any(|o| o.domain == V2L_DOMAIN));
    }

    #[test]
    fn geometry_is_read_or_refused() {
        assert_eq!(
            conv_geometry(&[3, 3, 3], Some(&[0, 1, 1, 0, 1, 1])),
            Ok(([3, 3, 3], [1, 1]))
        );
        assert_eq!(
            conv_geometry(&[3, 3], Some(&[1, 1, 1, 1])),
            Ok(([1, 3, 3], [1, 1]))
        );
        assert_eq!(conv_geometry(&[1, 1, 1], None), Ok(([1, 1, 1], [0, 0])));
        assert!(
            conv_geometry(&[3, 3, 3], Some(&[1, 1, 1, 1, 1, 1])).is_err(),
            "time pads"
        );
        assert!(
            conv_geometry(&[3, 3], Some(&[0, 1, 1, 1])).is_err(),
            "uneven pads"
        );
        assert!(conv_geometry(&[3], None).is_err());
        assert!(conv_geometry(&[0, 3, 3], None).is_err());
        assert!(
            conv_geometry(&[3, 3], Some(&[3, 3, 3, 3])).is_err(),
            "pads past the kernel"
        );
        assert!(
            conv_geometry(&[3, 3], Some(&[-1, 1, -1, 1])).is_err(),
            "negative pads"
        );
        assert!(conv_geometry(&[3, 3], Some(&[i64::MAX, 1, i64::MAX, 1])).is_err());
    }
}
