//! Step caching: diffusers' First Block Cache on v2l's DiT.
//!
//! Every DiT call runs the embeddings and the first transformer block (the *head*). The change
//! of the first block's residual (its output minus its input) since the last call that ran the
//! other blocks, `mean|r − r_prev| / mean|r_prev|`, decides the rest: above the threshold the
//! other blocks run and their residual (last block's output minus the first block's) is kept;
//! at or below it they are skipped and the kept residual is added to this call's first-block
//! output. The output layers run on every call. This is `diffusers.hooks.FirstBlockCacheConfig`
//! (0.42.1, `first_block_cache.py`) step for step: the residual compared against is only
//! replaced by calls that ran the blocks, and the first call of a request always runs them.
//!
//! To skip blocks the DiT runs as three sessions cut from its one compiled graph
//! ([`parts`]) at the values the exporter recorded in the graph's metadata
//! ([`v2l_contracts::io::dit::cache`]). A pipeline cuts its DiT the first time a request asks
//! for the cache; later requests with the cache off run the three parts in a row.

use std::collections::BTreeMap;
use std::path::Path;

use v2l_contracts::io::dit::{cache as keys, SAMPLE};

use crate::error::{Result, RuntimeError};
mod parts;
use crate::session::{DeviceValues, Model, SessionOptions};
use crate::tensor::Tensor;
pub use parts::SplitModel;

pub use v2l_contracts::request::StepCache;

/// The DiT as ONNX Runtime runs it: one session, or cut into head, blocks and output.
pub enum DitModel {
    Whole(Model),
    Cut(Box<CutDit>),
    /// No session: between releasing one and building the next (a failed build leaves it,
    /// and every run is then refused).
    Released,
}

/// The DiT in three sessions and the values that cross between them.
pub struct CutDit {
    parts: SplitModel,
    names: CutNames,
}

/// The values the exporter recorded (graph metadata) for cutting the DiT.
#[derive(Clone, Debug)]
pub struct CutNames {
    first_block_input: String,
    first_block_output: String,
    blocks_output: String,
}

const HEAD: usize = 0;
const BLOCKS: usize = 1;
const OUTPUT: usize = 2;

impl DitModel {
    /// Loads the graph at `path` whole, or `cut` for step caching, with `weights` in place of
    /// the file's.
    pub fn load(
        path: &Path,
        opts: &SessionOptions,
        weights: Vec<(String, Tensor)>,
        cut: bool,
    ) -> Result<DitModel> {
        match cut {
            false => Ok(DitModel::Whole(Model::load_with_weights(
                path, opts, weights,
            )?)),
            true => Self::load_cut(path, cut_names(path)?, opts, weights),
        }
    }

    /// Loads the graph at `path` cut where `graph` (its model, read by [`cut_names`]) says.
    pub fn load_cut(
        path: &Path,
        graph: (v2l_graphs::proto::ModelProto, CutNames),
        opts: &SessionOptions,
        weights: Vec<(String, Tensor)>,
    ) -> Result<DitModel> {
        let (model, names) = graph;
        let cuts = [
            vec![
                names.first_block_input.clone(),
                names.first_block_output.clone(),
            ],
            vec![names.blocks_output.clone()],
        ];
        let parts = SplitModel::load(path, model, &cuts, opts, weights)?;
        // A skipped call hands the output layers the cached blocks' output alone: the blocks
        // part must pass on nothing else.
        if parts.outputs(BLOCKS) != [names.blocks_output.as_str()] {
            return Err(RuntimeError::BadFile {
                path: path.to_path_buf(),
                message: format!(
                    "the DiT's blocks pass {:?} to its output layers; step caching needs the last block's output alone",
                    parts.outputs(BLOCKS)
                ),
            });
        }
        Ok(DitModel::Cut(Box::new(CutDit { parts, names })))
    }

    pub fn is_cut(&self) -> bool {
        matches!(self, DitModel::Cut(_))
    }

    pub fn input_names(&self) -> Vec<String> {
        match self {
            DitModel::Whole(m) => m.input_names().to_vec(),
            DitModel::Cut(c) => c.parts.input_names(),
            DitModel::Released => Vec::new(),
        }
    }

    /// [`Model::declared_float`] of the session that takes `name`.
    pub fn declared_float(&self, name: &str) -> v2l_graphs::DType {
        match self {
            DitModel::Whole(m) => m.declared_float(name),
            DitModel::Cut(c) => c.parts.declared_float(name),
            DitModel::Released => v2l_graphs::DType::F32,
        }
    }

    pub fn set_fixed_inputs(&mut self, inputs: Vec<(String, Tensor)>) -> Result<()> {
        match self {
            DitModel::Whole(m) => m.set_fixed_inputs(inputs),
            DitModel::Cut(c) => c.parts.set_fixed_inputs(inputs),
            DitModel::Released => Err(released()),
        }
    }

    /// [`Model::packs_fixed`].
    pub fn packs_fixed(&self) -> bool {
        match self {
            DitModel::Whole(m) => m.packs_fixed(),
            DitModel::Cut(c) => c.parts.packs_fixed(),
            DitModel::Released => false,
        }
    }

    /// [`Model::set_fixed_packed`].
    pub fn set_fixed_packed(&mut self, packed: crate::session::Packed) -> Result<()> {
        match self {
            DitModel::Whole(m) => m.set_fixed_packed(packed),
            DitModel::Cut(c) => c.parts.set_fixed_packed(packed),
            DitModel::Released => Err(released()),
        }
    }

    /// [`Model::take_fixed`].
    pub fn take_fixed(&mut self, names: &[String]) -> DeviceValues {
        match self {
            DitModel::Whole(m) => m.take_fixed(names.iter().map(String::as_str)),
            DitModel::Cut(c) => c.parts.take_fixed(names),
            DitModel::Released => DeviceValues::default(),
        }
    }

    /// [`Model::set_fixed_values`].
    pub fn set_fixed_values(&mut self, values: DeviceValues) -> Result<()> {
        match self {
            DitModel::Whole(m) => {
                m.set_fixed_values(values);
                Ok(())
            }
            DitModel::Cut(c) => c.parts.set_fixed_values(values),
            DitModel::Released => Err(released()),
        }
    }

    /// [`Model::fixed_mut_many`].
    pub fn fixed_mut_many<'a>(
        &'a mut self,
        wanted: &std::collections::HashMap<&str, &[usize]>,
    ) -> Vec<(&'a str, crate::tensor::FloatsMut<'a>)> {
        match self {
            DitModel::Whole(m) => m.fixed_mut_many(wanted),
            DitModel::Cut(c) => c.parts.fixed_mut_many(wanted),
            DitModel::Released => Vec::new(),
        }
    }

    /// [`Model::fixed_to_device`].
    pub fn fixed_to_device(&mut self, names: &[String]) -> Result<()> {
        match self {
            DitModel::Whole(m) => m.fixed_to_device(names),
            DitModel::Cut(c) => c.parts.fixed_to_device(names),
            DitModel::Released => Err(released()),
        }
    }

    pub fn fixed_mut(
        &mut self,
        name: &str,
        shape: &[usize],
    ) -> Option<crate::tensor::FloatsMut<'_>> {
        match self {
            DitModel::Whole(m) => m.fixed_mut(name, shape),
            DitModel::Cut(c) => c.parts.fixed_mut(name, shape),
            DitModel::Released => None,
        }
    }

    /// One whole DiT call (every block runs).
    pub fn run_with(
        &mut self,
        inputs: &BTreeMap<String, Tensor>,
        borrowed: &[(&str, &[usize], &[f32])],
    ) -> Result<BTreeMap<String, Tensor>> {
        match self {
            DitModel::Whole(m) => m.run_with(inputs, borrowed),
            DitModel::Cut(c) => c.run(inputs, borrowed, None),
            DitModel::Released => Err(released()),
        }
    }

    /// One DiT call under First Block Cache, deciding with and updating `state`.
    pub fn run_cached(
        &mut self,
        inputs: &BTreeMap<String, Tensor>,
        borrowed: &[(&str, &[usize], &[f32])],
        state: &mut FirstBlockState,
    ) -> Result<BTreeMap<String, Tensor>> {
        match self {
            DitModel::Whole(_) => Err(RuntimeError::Internal {
                what: "step cache".into(),
                message: "the DiT was not cut for caching".into(),
            }),
            DitModel::Cut(c) => c.run(inputs, borrowed, Some(state)),
            DitModel::Released => Err(released()),
        }
    }
}

/// The DiT graph at `path` and where it is cut, read from its metadata; an error naming the
/// missing key when the exporter recorded none (a graph exported before step caching, or a
/// family without it yet).
pub fn cut_names(path: &Path) -> Result<(v2l_graphs::proto::ModelProto, CutNames)> {
    let model = v2l_graphs::read_model(path).map_err(|source| RuntimeError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let meta = |key: &str| {
        model
            .metadata_props
            .iter()
            .find(|e| e.key == key)
            .map(|e| e.value.clone())
            .ok_or_else(|| RuntimeError::BadFile {
                path: path.to_path_buf(),
                message: format!(
                    "this DiT graph does not record where to cut it for step caching (`{key}`); \
                     export and compile the model again with this v2l"
                ),
            })
    };
    let names = CutNames {
        first_block_input: meta(keys::FIRST_BLOCK_INPUT)?,
        first_block_output: meta(keys::FIRST_BLOCK_OUTPUT)?,
        blocks_output: meta(keys::BLOCKS_OUTPUT)?,
    };
    Ok((model, names))
}

impl CutDit {
    fn run(
        &mut self,
        inputs: &BTreeMap<String, Tensor>,
        borrowed: &[(&str, &[usize], &[f32])],
        state: Option<&mut FirstBlockState>,
    ) -> Result<BTreeMap<String, Tensor>> {
        let n = &self.names;
        let mut values = inputs.clone();
        values.extend(self.parts.run_part(HEAD, inputs, borrowed)?);
        match state {
            None => {
                let blocks = self.parts.run_part(BLOCKS, &values, borrowed)?;
                values.extend(blocks);
            }
            Some(state) => {
                let get = |name: &str| {
                    values
                        .get(name)
                        .ok_or_else(|| RuntimeError::missing_output("DiT head", name))
                };
                let x0 = get(&n.first_block_output)?;
                let shape = x0.shape.clone();
                let x0 = x0.as_f32(&n.first_block_output)?.to_vec();
                let x_in = get(&n.first_block_input)?.as_f32(&n.first_block_input)?;
                same_size(&n.first_block_input, x_in.len(), x0.len())?;
                let residual: Vec<f32> = x0.iter().zip(x_in).map(|(a, b)| a - b).collect();
                let run = state.decide(&residual)?;
                let last = if run.iter().any(|&r| r) {
                    let mut blocks = self.parts.run_part(BLOCKS, &values, borrowed)?;
                    let last = blocks.remove(&n.blocks_output).ok_or_else(|| {
                        RuntimeError::missing_output("DiT blocks", &n.blocks_output)
                    })?;
                    let last = last.as_f32(&n.blocks_output)?.to_vec();
                    same_size(&n.blocks_output, last.len(), x0.len())?;
                    Some(last)
                } else {
                    None
                };
                let x_last = state.blocks_output(&run, &residual, &x0, last)?;
                values.insert(n.blocks_output.clone(), Tensor::f32(shape, x_last));
            }
        }
        let out = self.parts.run_part(OUTPUT, &values, borrowed)?;
        if !out.contains_key(SAMPLE) {
            return Err(RuntimeError::missing_output("DiT output layers", SAMPLE));
        }
        Ok(out)
    }
}

/// The cache adds and subtracts block-boundary activations element by element: each must have
/// the first block's output's size (a graph whose cut values differ in size is refused).
fn same_size(what: &str, got: usize, want: usize) -> Result<()> {
    match got == want {
        true => Ok(()),
        false => Err(RuntimeError::Graph {
            graph: "DiT (step cache)".into(),
            message: format!(
                "`{what}` has {got} values, the first block's output {want}: the graph's cut points do not match"
            ),
        }),
    }
}

fn released() -> RuntimeError {
    RuntimeError::Internal {
        what: "DiT".into(),
        message: "no session: building the DiT again failed earlier".into(),
    }
}

/// One decision of the cache: per DiT call, or per guidance branch of it (see
/// [`FirstBlockState`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CacheCall {
    /// The relative change of the first block's residual compared with the threshold; `None`
    /// on a request's first call (nothing to compare with).
    pub change: Option<f64>,
    /// Whether the blocks after the first ran (else their cached residual was reused).
    pub ran_blocks: bool,
}

/// One request's First Block Cache: created per request, so nothing leaks between requests.
///
/// diffusers decides once per transformer call, in the call's cache context. CogVideoX's
/// pipelines call the transformer once per step with both guidance prompts in its batch, so one
/// decision covers the batch. Wan's pipelines call it once per prompt (`cache_context("cond")`,
/// then `"uncond"`), each context with its own residuals, so a guided Wan request decides per
/// branch: `branches` splits the batch into that many equal parts, each with its own state. The
/// blocks then run for the whole batch when any branch needs them, and a branch that skipped
/// takes its cached residual instead of their output (per-sample ops: the numbers diffusers'
/// separate call gives); a step is cheaper only when every branch skips.
///
/// diffusers also keeps the text stream's residual; v2l does not, because the DiT's output
/// layers never read the text tokens after the last block (CogVideoX's `norm_final` normalises
/// each token on its own and the text tokens are dropped after it; Wan's blocks return the
/// video tokens alone).
#[derive(Clone, Debug)]
pub struct FirstBlockState {
    threshold: f64,
    branches: Vec<Branch>,
    /// Every decision, per DiT call and within it per branch in batch order.
    pub calls: Vec<CacheCall>,
}

/// One decision context's residuals.
#[derive(Clone, Debug, Default)]
struct Branch {
    /// The first block's residual at the last call that ran the blocks.
    head: Option<Vec<f32>>,
    /// The blocks' residual (last block's output − first block's) at that call.
    tail: Option<Vec<f32>>,
}

impl FirstBlockState {
    /// A request's state deciding for the whole batch at once.
    pub fn new(threshold: f64) -> FirstBlockState {
        FirstBlockState::per_branch(threshold, 1)
    }

    /// A request's state deciding for each of `branches` equal parts of the batch.
    pub fn per_branch(threshold: f64, branches: usize) -> FirstBlockState {
        FirstBlockState {
            threshold,
            branches: vec![Branch::default(); branches.max(1)],
            calls: Vec::new(),
        }
    }

    /// Each branch's decision for this call's first-block `residual`: `true` where the other
    /// blocks must run. Records the calls.
    fn decide(&mut self, residual: &[f32]) -> Result<Vec<bool>> {
        let parts = self.split(residual)?;
        let mut run = Vec::with_capacity(parts.len());
        for (b, r) in self.branches.iter().zip(parts) {
            let change = b.change(r)?;
            let ran_blocks = b.tail.is_none() || change.is_none_or(|c| c > self.threshold);
            self.calls.push(CacheCall { change, ran_blocks });
            run.push(ran_blocks);
        }
        Ok(run)
    }

    /// The last block's output for this call: where a branch ran, `last`'s part (and the
    /// branch keeps this call's residuals); where it skipped, its first-block output plus the
    /// cached blocks' residual.
    fn blocks_output(
        &mut self,
        run: &[bool],
        residual: &[f32],
        x0: &[f32],
        last: Option<Vec<f32>>,
    ) -> Result<Vec<f32>> {
        let part = x0.len() / self.branches.len();
        let computed = last.is_some();
        // The blocks' output where they ran (written over where a branch skipped), else room.
        let mut out = last.unwrap_or_else(|| vec![0.0; x0.len()]);
        same_size("the blocks' output", out.len(), x0.len())?;
        let spans = out.chunks_mut(part.max(1)).zip(x0.chunks(part.max(1)));
        let spans = spans.zip(residual.chunks(part.max(1)));
        for ((b, &ran), ((o, h), r)) in self.branches.iter_mut().zip(run).zip(spans) {
            if ran {
                if !computed {
                    return Err(RuntimeError::Internal {
                        what: "step cache".into(),
                        message: "a branch ran the blocks but their output is missing".into(),
                    });
                }
                b.tail = Some(o.iter().zip(h).map(|(l, h)| l - h).collect());
                b.head = Some(r.to_vec());
            } else {
                let tail = b.tail.as_deref().unwrap_or(&[]);
                same_size("the cached blocks' residual", tail.len(), h.len())?;
                for (o, (h, t)) in o.iter_mut().zip(h.iter().zip(tail)) {
                    *o = h + t;
                }
            }
        }
        Ok(out)
    }

    /// `residual` as one slice per branch (the batch's leading axis splits evenly).
    fn split<'a>(&self, residual: &'a [f32]) -> Result<Vec<&'a [f32]>> {
        let n = self.branches.len();
        if residual.len() % n != 0 {
            return Err(RuntimeError::Internal {
                what: "step cache".into(),
                message: format!(
                    "{} first-block values do not split into {n} guidance branches",
                    residual.len()
                ),
            });
        }
        Ok(residual.chunks(residual.len() / n).collect())
    }

    /// Decisions that reused the cached blocks.
    pub fn skips(&self) -> usize {
        self.calls.iter().filter(|c| !c.ran_blocks).count()
    }
}

impl Branch {
    /// `mean|r − r_prev| / mean|r_prev|`, as diffusers' `_should_compute_remaining_blocks`
    /// computes it (a NaN, from an all-zero `r_prev`, skips there too).
    fn change(&self, residual: &[f32]) -> Result<Option<f64>> {
        let Some(prev) = &self.head else {
            return Ok(None);
        };
        if prev.len() != residual.len() {
            return Err(RuntimeError::Internal {
                what: "step cache".into(),
                message: format!(
                    "the first block's output changed size within a request ({} → {})",
                    prev.len(),
                    residual.len()
                ),
            });
        }
        let (mut moved, mut size) = (0f64, 0f64);
        for (r, p) in residual.iter().zip(prev) {
            moved += (r - p).abs() as f64;
            size += p.abs() as f64;
        }
        Ok(Some(moved / size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_change_is_relative_to_the_last_residual_that_ran_the_blocks() {
        let mut b = Branch::default();
        assert_eq!(b.change(&[1.0, -1.0]).unwrap(), None);
        b.head = Some(vec![1.0, -1.0]);
        // |1.1-1| + |-1.1+1| = 0.2 over |1| + |-1| = 2.
        let c = b.change(&[1.1, -1.1]).unwrap().unwrap();
        assert!((c - 0.1).abs() < 1e-6, "{c}");
        assert!(b.change(&[1.0]).is_err());
        b.head = Some(vec![0.0, 0.0]);
        assert!(b.change(&[1.0, 1.0]).unwrap().unwrap().is_infinite());
    }

    #[test]
    fn guidance_branches_decide_and_keep_their_residuals_apart() {
        // Two branches of two values each; the first call runs both.
        let mut s = FirstBlockState::per_branch(0.1, 2);
        let (x0, r) = ([1.0, 1.0, 2.0, 2.0], [0.5, 0.5, 1.0, 1.0]);
        assert_eq!(s.decide(&r).unwrap(), [true, true]);
        let out = s.blocks_output(&[true, true], &r, &x0, Some(vec![3.0, 3.0, 5.0, 5.0]));
        assert_eq!(out.unwrap(), [3.0, 3.0, 5.0, 5.0]);
        // Branch 0 barely moves (skips: x0 + its tail 2), branch 1 doubles (runs).
        let (x0, r) = ([1.5, 1.5, 4.0, 4.0], [0.51, 0.51, 2.0, 2.0]);
        let run = s.decide(&r).unwrap();
        assert_eq!(run, [false, true]);
        let out = s.blocks_output(&run, &r, &x0, Some(vec![9.0, 9.0, 7.0, 7.0]));
        assert_eq!(out.unwrap(), [3.5, 3.5, 7.0, 7.0]);
        // Branch 1 now compares with its new residual (2, not 1), branch 0 still with 0.5.
        let run = s.decide(&[0.5, 0.5, 2.0, 2.0]).unwrap();
        assert_eq!(run, [false, false]);
        assert_eq!(s.skips(), 3);
        let c: Vec<_> = s.calls.iter().map(|c| c.change).collect();
        assert_eq!(c[..2], [None, None]);
        assert!(
            (c[3].unwrap() - 1.0).abs() < 1e-9 && c[5].unwrap().abs() < 1e-9,
            "{c:?}"
        );
        // Every branch skipped: the blocks' output is the branches' cached residuals.
        let out = s.blocks_output(&run, &[0.5; 4], &[0.0; 4], None).unwrap();
        assert_eq!(out, [2.0, 2.0, 3.0, 3.0]);
        // A batch that does not split into the branches is an error, not a silent half.
        assert!(s.decide(&[1.0; 3]).is_err());
    }

    #[test]
    fn a_graph_without_cut_points_is_refused_by_name() {
        use v2l_graphs::{DType, Graph};
        let mut g = Graph::new("dit");
        let x = g.input("x", DType::F32, vec![1.into()]);
        let y = g.silu(&x);
        g.output(&y, SAMPLE, DType::F32, vec![1.into()]);
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("dit.onnx");
        v2l_graphs::save(&g, &path, v2l_graphs::ExternalData::Never).unwrap();
        let err = cut_names(&path).err().unwrap().to_string();
        assert!(
            err.contains("does not record where to cut") && err.contains(keys::FIRST_BLOCK_INPUT),
            "{err}"
        );
        let err = DitModel::load(&path, &SessionOptions::default(), Vec::new(), true)
            .err()
            .unwrap();
        assert!(
            err.to_string()
                .contains("export and compile the model again"),
            "{err}"
        );
    }
}
