//! The DiT of whichever architecture a checkpoint holds, by its `config.json` `_class_name`:
//! callers (`v2l-export dit`, the pipeline export) need no per-architecture code.

use v2l_contracts::Family;
use v2l_graphs::DType;
use v2l_graphs::Graph;

use crate::checkpoint::Checkpoint;
use crate::error::{ExportError, Result};
use crate::manifest::DitEntry;
use crate::scope::LinearInfo;
use crate::{cogvideox_dit, wan_dit};

pub use crate::dit_graph::DitGraph;

/// An exported DiT graph, whichever the architecture, and its manifest entry.
pub struct ExportedDit {
    pub graph: Graph,
    pub class_name: &'static str,
    pub num_layers: usize,
    pub linears: Vec<LinearInfo>,
    pub unused_keys: Vec<String>,
    entry: DitEntry,
}

impl ExportedDit {
    /// The manifest entry for the graph written to `file`.
    pub fn manifest_entry(&self, file: &str) -> DitEntry {
        DitEntry {
            file: file.into(),
            ..self.entry.clone()
        }
    }
}

/// Exports `CogVideoXTransformer3DModel` or `WanTransformer3DModel`, weights stored as
/// `weight_dtype` (f32: no casts).
pub fn export(ckpt: &Checkpoint, weight_dtype: DType) -> Result<ExportedDit> {
    let stored = (weight_dtype != DType::F32).then_some(weight_dtype);
    let raw = ckpt.raw_config()?;
    let family = Family::of_dit_config(&raw).ok_or_else(|| ExportError::UnknownClass {
        path: ckpt.dir().join("config.json"),
        found: raw
            .get("_class_name")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string(),
        expected: Family::ALL.map(Family::dit_class).join(" or "),
    })?;
    match family {
        Family::Wan => {
            let ex = wan_dit::export(ckpt, stored)?;
            let entry = ex.manifest_entry("", weight_dtype);
            Ok(ExportedDit {
                class_name: wan_dit::CLASS_NAME,
                num_layers: ex.config.num_layers,
                linears: ex.linears,
                unused_keys: ex.unused_keys,
                graph: ex.graph,
                entry,
            })
        }
        Family::CogVideoX => {
            let opts = cogvideox_dit::DitOptions {
                weight_dtype: stored,
            };
            let ex = cogvideox_dit::export(ckpt, &opts).map_err(|e| match e {
                ExportError::UnknownClass { path, found, .. } => ExportError::UnknownClass {
                    path,
                    found,
                    expected: format!("{} or {}", cogvideox_dit::CLASS_NAME, wan_dit::CLASS_NAME),
                },
                e => e,
            })?;
            let entry = ex.manifest_entry("", weight_dtype);
            Ok(ExportedDit {
                class_name: cogvideox_dit::CLASS_NAME,
                num_layers: ex.config.num_layers,
                linears: ex.linears,
                unused_keys: ex.unused_keys,
                graph: ex.graph,
                entry,
            })
        }
    }
}
