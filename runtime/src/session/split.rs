//! A model run as consecutive parts cut from its one graph ([`v2l_graphs::split`]).
//!
//! The parts are written to a private temporary directory beside links to the model's weight
//! files (external data is found relative to the model file), loaded, and the directory is
//! removed: the sessions hold what they read. Each part takes the fixed inputs, weights and
//! borrowed inputs that name its own inputs or initializers, and nothing else.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use crate::error::{Result, RuntimeError};
use crate::session::{Model, SessionOptions};
use crate::tensor::Tensor;

struct Part {
    model: Model,
    /// Its graph outputs, in order.
    outputs: Vec<String>,
    /// Its graph inputs and initializers: the names it can be given.
    takes: HashSet<String>,
}

/// One model as consecutive ONNX Runtime sessions.
pub struct SplitModel {
    parts: Vec<Part>,
}

impl SplitModel {
    /// Loads `path` cut at `cuts` (see [`v2l_graphs::split::split`]), each part with the
    /// `weights` among its initializers.
    pub fn load(
        path: &Path,
        model: v2l_graphs::proto::ModelProto,
        cuts: &[Vec<String>],
        opts: &SessionOptions,
        weights: Vec<(String, Tensor)>,
    ) -> Result<SplitModel> {
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |source| RuntimeError::Io { path: p, source }
        };
        let graphs = v2l_graphs::split::split(&model, cuts).map_err(|e| RuntimeError::BadFile {
            path: path.to_path_buf(),
            message: format!("cannot cut the graph for step caching: {e}"),
        })?;
        drop(model);
        let dir = path.parent().unwrap_or(Path::new("."));
        let tmp = tempfile::Builder::new()
            .prefix("v2l-parts-")
            .tempdir()
            .map_err(io(&std::env::temp_dir()))?;
        // External data is read relative to the model file: link each weight file (or the
        // directory that holds it) into the parts' directory under its own relative name.
        let files = v2l_graphs::external_data_files(path).map_err(io(path))?;
        let mut linked = HashSet::new();
        for f in files {
            let Some(first) = f.strip_prefix(dir).ok().and_then(|r| r.components().next()) else {
                continue;
            };
            let name = first.as_os_str().to_owned();
            if linked.insert(name.clone()) {
                let link = tmp.path().join(&name);
                std::os::unix::fs::symlink(dir.join(&name), &link).map_err(io(&link))?;
            }
        }
        let mut weights: BTreeMap<String, Tensor> = weights.into_iter().collect();
        let mut parts = Vec::with_capacity(graphs.len());
        for (k, g) in graphs.into_iter().enumerate() {
            let graph = g.graph.as_ref();
            let takes: HashSet<String> = graph
                .into_iter()
                .flat_map(|g| {
                    g.input
                        .iter()
                        .map(|i| i.name.clone())
                        .chain(g.initializer.iter().map(|t| t.name.clone()))
                })
                .collect();
            let own: Vec<(String, Tensor)> = takes
                .iter()
                .filter_map(|n| weights.remove_entry(n))
                .collect();
            let outputs = graph
                .into_iter()
                .flat_map(|g| g.output.iter().map(|o| o.name.clone()))
                .collect();
            let file = tmp.path().join(format!("part{k}.onnx"));
            v2l_graphs::write_model(&file, &g).map_err(|e| RuntimeError::BadFile {
                path: file.clone(),
                message: e.to_string(),
            })?;
            let model = Model::load_with_weights(&file, opts, own)?;
            parts.push(Part {
                model,
                outputs,
                takes,
            });
        }
        Ok(SplitModel { parts })
    }

    /// Whether any part takes `name`.
    pub fn takes(&self, name: &str) -> bool {
        self.parts.iter().any(|p| p.takes.contains(name))
    }

    /// The graph inputs of every part, each once.
    pub fn input_names(&self) -> Vec<String> {
        let mut seen = HashSet::new();
        self.parts
            .iter()
            .flat_map(|p| p.model.input_names())
            .filter(|n| seen.insert(n.as_str()))
            .cloned()
            .collect()
    }

    /// [`Model::set_fixed_inputs`], each input given to the parts that take it.
    pub fn set_fixed_inputs(&mut self, inputs: Vec<(String, Tensor)>) -> Result<()> {
        for (name, t) in inputs {
            for p in self.parts.iter_mut().filter(|p| p.takes.contains(&name)) {
                p.model.set_fixed_inputs(vec![(name.clone(), t.clone())])?;
            }
        }
        Ok(())
    }

    /// [`Model::fixed_f32_mut`] when exactly one part takes `name`.
    pub fn fixed_f32_mut(&mut self, name: &str, shape: &[usize]) -> Option<&mut [f32]> {
        let mut takers = self.parts.iter_mut().filter(|p| p.takes.contains(name));
        match (takers.next(), takers.next()) {
            (Some(p), None) => p.model.fixed_f32_mut(name, shape),
            _ => None,
        }
    }

    /// Runs part `k` on `values` (inputs it does not take are ignored) with the `borrowed`
    /// inputs it takes; returns its outputs.
    pub fn run_part(
        &mut self,
        k: usize,
        values: &BTreeMap<String, Tensor>,
        borrowed: &[(&str, &[usize], &[f32])],
    ) -> Result<BTreeMap<String, Tensor>> {
        let part = self
            .parts
            .get_mut(k)
            .ok_or_else(|| RuntimeError::Internal {
                what: "split model".into(),
                message: format!("no part {k}"),
            })?;
        let own: Vec<(&str, &[usize], &[f32])> = borrowed
            .iter()
            .filter(|(n, _, _)| part.takes.contains(*n))
            .copied()
            .collect();
        part.model.run_with(values, &own)
    }

    /// Part `k`'s outputs, in order (none for a part that does not exist).
    pub fn outputs(&self, k: usize) -> Vec<&str> {
        self.parts
            .get(k)
            .map(|p| p.outputs.iter().map(String::as_str).collect())
            .unwrap_or_default()
    }
}
