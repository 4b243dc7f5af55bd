//! A model run as consecutive parts cut from its one graph ([`v2l_graphs::split`]).
//!
//! The parts are built from memory, their external data read from beside the model file (a
//! part's initializers keep their locations), so nothing is written. Each part takes the fixed
//! inputs, weights and borrowed inputs that name its own inputs or initializers, and nothing
//! else.

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
        let graphs = v2l_graphs::split::split(&model, cuts).map_err(|e| RuntimeError::BadFile {
            path: path.to_path_buf(),
            message: format!("cannot cut the graph for step caching: {e}"),
        })?;
        drop(model);
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
            let bytes = prost::Message::encode_to_vec(&g);
            drop(g);
            let model =
                Model::load_bytes_with_weights(&bytes, path, &format!("part {k}"), opts, own)?;
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
            let mut takers: Vec<&mut Part> = self
                .parts
                .iter_mut()
                .filter(|p| p.takes.contains(&name))
                .collect();
            // Copied only for a second part that takes it; the last gets the value itself.
            if let Some(last) = takers.pop() {
                for p in takers {
                    p.model.set_fixed_inputs(vec![(name.clone(), t.clone())])?;
                }
                last.model.set_fixed_inputs(vec![(name, t)])?;
            }
        }
        Ok(())
    }

    /// [`Model::packs_fixed`] (the parts share their options).
    pub fn packs_fixed(&self) -> bool {
        self.parts.first().is_some_and(|p| p.model.packs_fixed())
    }

    /// [`Model::set_fixed_packed`]: the buffer placed once, each input's view to the part that
    /// takes it.
    pub fn set_fixed_packed(&mut self, packed: crate::session::Packed) -> Result<()> {
        let Some(first) = self.parts.first() else {
            return Ok(());
        };
        let values = first.model.place_packed(packed)?;
        self.set_fixed_values(values)
    }

    /// [`Model::declared_float`] of the first part that takes `name`.
    pub fn declared_float(&self, name: &str) -> v2l_graphs::DType {
        self.parts
            .iter()
            .find(|p| p.takes.contains(name))
            .map_or(v2l_graphs::DType::F32, |p| p.model.declared_float(name))
    }

    /// [`Model::take_fixed`] from every part.
    pub fn take_fixed(&mut self, names: &[String]) -> crate::session::DeviceValues {
        let mut all = crate::session::DeviceValues::default();
        for p in &mut self.parts {
            all.extend(p.model.take_fixed(names.iter().map(String::as_str)));
        }
        all
    }

    /// [`Model::set_fixed_values`], each value to the part that takes it (a value on the device
    /// is not copied, so two parts cannot take one).
    pub fn set_fixed_values(&mut self, mut values: crate::session::DeviceValues) -> Result<()> {
        for p in &mut self.parts {
            p.model.set_fixed_values(values.split_off(&p.takes));
        }
        match values.names().next() {
            None => Ok(()),
            Some(name) => Err(RuntimeError::Internal {
                what: "split model".into(),
                message: format!("no part takes `{name}`, or another part took it"),
            }),
        }
    }

    /// [`Model::fixed_mut_many`] over the parts, for the inputs exactly one part takes.
    pub fn fixed_mut_many<'a>(
        &'a mut self,
        wanted: &std::collections::HashMap<&str, &[usize]>,
    ) -> Vec<(&'a str, crate::tensor::FloatsMut<'a>)> {
        let once: std::collections::HashMap<&str, &[usize]> = wanted
            .iter()
            .filter(|(name, _)| {
                self.parts
                    .iter()
                    .filter(|p| p.takes.contains(**name))
                    .count()
                    == 1
            })
            .map(|(name, shape)| (*name, *shape))
            .collect();
        self.parts
            .iter_mut()
            .flat_map(|p| p.model.fixed_mut_many(&once))
            .collect()
    }

    /// [`Model::fixed_to_device`] on every part.
    pub fn fixed_to_device(&mut self, names: &[String]) -> Result<()> {
        self.parts
            .iter_mut()
            .try_for_each(|p| p.model.fixed_to_device(names))
    }

    /// [`Model::fixed_mut`] when exactly one part takes `name`.
    pub fn fixed_mut(
        &mut self,
        name: &str,
        shape: &[usize],
    ) -> Option<crate::tensor::FloatsMut<'_>> {
        let mut takers = self.parts.iter_mut().filter(|p| p.takes.contains(name));
        match (takers.next(), takers.next()) {
            (Some(p), None) => p.model.fixed_mut(name, shape),
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

#[cfg(test)]
mod tests {
    use super::*;
    use v2l_graphs::{DType, Graph, TensorData};

    /// A model whose weights are external data, cut in two, runs as the whole model does
    /// (ONNX Runtime finds the weight file beside the original model, not beside the parts).
    #[test]
    fn parts_with_external_weights_compute_the_whole_model() {
        let mut g = Graph::new("m");
        let x = g.input("x", DType::F32, vec![2.into(), 3.into()]);
        let f32s =
            |v: Vec<f32>| TensorData::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect());
        let w = g.initializer(
            "w",
            DType::F32,
            vec![3, 3],
            f32s((0..9).map(|i| i as f32 * 0.5).collect()),
        );
        let b = g.initializer("b", DType::F32, vec![3], f32s(vec![1.0, -2.0, 0.25]));
        let h = g.matmul(&x, &w);
        let h = g.add(&h, &b);
        let y = g.silu(&h);
        g.output(&y, "y", DType::F32, vec![2.into(), 3.into()]);
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("m.onnx");
        let written = v2l_graphs::save(&g, &path, v2l_graphs::ExternalData::Always).unwrap();
        assert!(written.data.is_some());
        let inputs: BTreeMap<String, Tensor> = [(
            "x".to_string(),
            Tensor::f32(vec![2, 3], vec![1.0, 2.0, 3.0, -1.0, 0.5, 4.0]),
        )]
        .into();
        let opts = SessionOptions::default();
        let whole = Model::load(&path, &opts).unwrap().run(&inputs).unwrap();
        let model = v2l_graphs::read_model(&path).unwrap();
        let mut split = SplitModel::load(
            &path,
            model,
            &[vec![h.name().to_string()]],
            &opts,
            Vec::new(),
        )
        .unwrap();
        assert_eq!(split.outputs(0), [h.name()]);
        let mut values = inputs.clone();
        values.extend(split.run_part(0, &inputs, &[]).unwrap());
        let out = split.run_part(1, &values, &[]).unwrap();
        assert_eq!(out["y"], whole["y"]);
        // A weight given in place of the file's reaches the part that reads it.
        let ones = Tensor::f32(vec![3], vec![1.0; 3]);
        let model = v2l_graphs::read_model(&path).unwrap();
        let cuts = [vec![h.name().to_string()]];
        let mut split =
            SplitModel::load(&path, model, &cuts, &opts, vec![("b".into(), ones.clone())]).unwrap();
        let want = Model::load_with_weights(&path, &opts, vec![("b".into(), ones)])
            .unwrap()
            .run(&inputs)
            .unwrap();
        let mut values = inputs.clone();
        values.extend(split.run_part(0, &inputs, &[]).unwrap());
        assert_eq!(split.run_part(1, &values, &[]).unwrap()["y"], want["y"]);
        assert_ne!(want["y"], whole["y"]);
    }
}
