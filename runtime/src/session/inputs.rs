//! Where each input of one run comes from, in the one order of precedence that plain and bound
//! runs share: carried from the previous run, given for this one, fixed, borrowed.

use std::collections::{BTreeMap, HashMap};

use ort::value::{DynValue, TensorElementType};

use crate::tensor::Tensor;

/// Outputs of one run held for the next as ONNX Runtime values ([`super::Model::run_carrying`]).
#[derive(Default)]
pub struct Carry {
    pub(super) values: BTreeMap<String, DynValue>,
    /// [`super::Model::unwritten_carry`]'s under bound runs: inputs the next run may leave
    /// unwritten (their element type and shape; nothing is allocated or copied).
    pub(super) unwritten: BTreeMap<String, (TensorElementType, Vec<i64>)>,
    /// After a bound run: each carried input's value is still in that run's output buffer
    /// (its set's id, the output), copied from there into the next run's own.
    pub(super) bound: BTreeMap<String, (i32, String)>,
}

/// Where one input of a run comes from.
pub(super) enum Source<'a> {
    /// Carried from the previous plain run, as ONNX Runtime wrote it.
    Carried(&'a DynValue),
    /// A carried value still in the output buffer `.1` of the bound set with id `.0` (a
    /// previous bound run's; ids, unlike places in the list, survive a set's eviction).
    Output(i32, String),
    /// A carried value never written ([`super::Model::unwritten_carry`] under bound runs), of
    /// this type and shape: nothing to copy.
    Unwritten(TensorElementType, Vec<i64>),
    /// A host tensor given for this run.
    Host(&'a Tensor),
    /// A fixed input (a bound run copies it in only when its generation changed, or binds
    /// it where it is).
    Fixed(&'a super::packed::Held),
    /// f32 data borrowed for this run.
    Borrowed(&'a [usize], &'a [f32]),
}

/// The source of every input in `names`, then of each borrowed and fixed value that is not one
/// of them (ONNX Runtime lists initializers that are also graph inputs, overridable weights,
/// apart from the inputs; they are fed by name all the same), the fixed ones sorted by name so a
/// bound set's key does not depend on a map's order. `Err` names the first input nothing gives. Only `carried`, of
/// [`Carry`]'s parts, is borrowed by the result: a bound run goes on to rewrite `carry.bound`.
pub(super) fn sources<'a>(
    names: &[String],
    fixed: &'a HashMap<String, super::packed::Held>,
    given: &'a BTreeMap<String, Tensor>,
    borrowed: &'a [(&'a str, &'a [usize], &'a [f32])],
    carried: &'a BTreeMap<String, DynValue>,
    carry: &Carry,
) -> std::result::Result<Vec<(String, Source<'a>)>, String> {
    let mut sources = Vec::with_capacity(names.len() + fixed.len());
    for name in names {
        let source = if let Some(v) = carried.get(name) {
            Source::Carried(v)
        } else if let Some(at) = carry.bound.get(name) {
            Source::Output(at.0, at.1.clone())
        } else if let Some((ty, shape)) = carry.unwritten.get(name) {
            Source::Unwritten(*ty, shape.clone())
        } else if let Some(t) = given.get(name) {
            Source::Host(t)
        } else if let Some(v) = fixed.get(name) {
            Source::Fixed(v)
        } else if let Some((_, shape, data)) = borrowed.iter().find(|(n, _, _)| n == name) {
            Source::Borrowed(shape, data)
        } else {
            return Err(name.clone());
        };
        sources.push((name.clone(), source));
    }
    for (name, shape, data) in borrowed {
        if !names.iter().any(|n| n == name) {
            sources.push((name.to_string(), Source::Borrowed(shape, data)));
        }
    }
    let mut extra: Vec<(&String, &super::packed::Held)> = fixed
        .iter()
        .filter(|(name, _)| !names.contains(name) && !borrowed.iter().any(|(n, _, _)| n == name))
        .collect();
    extra.sort_by_key(|(name, _)| *name);
    sources.extend(
        extra
            .into_iter()
            .map(|(n, v)| (n.clone(), Source::Fixed(v))),
    );
    Ok(sources)
}
