//! Switching LoRAs on a set of resident weights without drift.
//!
//! [`SwitchableWeights`] keeps each targetable weight twice: the base, never modified, and the
//! live copy an engine reads. Applying a LoRA rewrites the union of the layers the previous and
//! the new LoRA touch, from the base (`fuse_from` for layers the new one touches, `restore_from`
//! for the others), so X → Y → X gives X's weights bitwise and no earlier LoRA leaves anything
//! behind. Everything is validated before the first weight is written.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use half::{bf16, f16};
use v2l_contracts::LinearInfo;

use super::apply::match_targets;
use super::format::Lora;
use super::fuse::{fuse_from, restore_from, Weights, WeightsMut};
use crate::error::{Result, RuntimeError};

/// A weight buffer in its storage type.
#[derive(Clone, Debug, PartialEq)]
pub enum Buffer {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl Buffer {
    /// Reads little-endian f32/f16/bf16 bytes; `None` for another dtype.
    pub fn from_le_bytes(dtype: v2l_graphs::DType, b: &[u8]) -> Option<Buffer> {
        use v2l_graphs::DType;
        if b.len() % dtype.size() != 0 {
            return None;
        }
        Some(match dtype {
            DType::F32 => Buffer::F32(bytemuck::pod_collect_to_vec(b)),
            DType::F16 => Buffer::F16(bytemuck::pod_collect_to_vec(b)),
            DType::BF16 => Buffer::BF16(bytemuck::pod_collect_to_vec(b)),
            _ => return None,
        })
    }

    pub fn to_le_bytes(&self) -> Vec<u8> {
        use v2l_graphs::dtype::le_bytes;
        match self {
            Buffer::F32(v) => le_bytes(v).to_vec(),
            Buffer::F16(v) => le_bytes(v).to_vec(),
            Buffer::BF16(v) => le_bytes(v).to_vec(),
        }
    }

    /// The buffer as the fuse kernel reads it.
    pub fn view(&self) -> Weights<'_> {
        match self {
            Buffer::F32(v) => Weights::F32(v),
            Buffer::F16(v) => Weights::F16(v),
            Buffer::BF16(v) => Weights::BF16(v),
        }
    }

    /// The buffer as the fuse kernel writes it.
    pub fn view_mut(&mut self) -> WeightsMut<'_> {
        match self {
            Buffer::F32(v) => WeightsMut::F32(v),
            Buffer::F16(v) => WeightsMut::F16(v),
            Buffer::BF16(v) => WeightsMut::BF16(v),
        }
    }
}

/// A base weight: owned, or a range of a memory-mapped weight file (never copied; only the
/// pages a fuse or restore reads are brought in, and the kernel may drop them again).
#[derive(Clone, Debug)]
pub enum BaseWeights {
    Owned(Buffer),
    Mapped {
        map: std::sync::Arc<memmap2::Mmap>,
        start: usize,
        /// Elements (not bytes).
        len: usize,
        dtype: v2l_graphs::DType,
    },
}

impl BaseWeights {
    /// A mapped range, checked for bounds, alignment and type.
    pub fn mapped(
        map: std::sync::Arc<memmap2::Mmap>,
        start: usize,
        bytes: usize,
        dtype: v2l_graphs::DType,
    ) -> Option<BaseWeights> {
        let size = match dtype {
            v2l_graphs::DType::F32 => 4,
            v2l_graphs::DType::F16 | v2l_graphs::DType::BF16 => 2,
            _ => return None,
        };
        let end = start.checked_add(bytes)?;
        let slice = map.get(start..end)?;
        if bytes % size != 0 || (slice.as_ptr() as usize) % size != 0 {
            return None;
        }
        Some(BaseWeights::Mapped {
            map,
            start,
            len: bytes / size,
            dtype,
        })
    }

    /// The buffer as the fuse kernel reads it.
    pub fn view(&self) -> Weights<'_> {
        match self {
            BaseWeights::Owned(b) => b.view(),
            BaseWeights::Mapped {
                map,
                start,
                len,
                dtype,
            } => {
                // `mapped` checked the range and the alignment, so the casts cannot fail; an
                // empty view would only make the fuse refuse the layer's shape.
                let size = if *dtype == v2l_graphs::DType::F32 {
                    4
                } else {
                    2
                };
                let bytes = map.get(*start..*start + *len * size).unwrap_or(&[]);
                match dtype {
                    v2l_graphs::DType::F32 => {
                        Weights::F32(bytemuck::try_cast_slice::<u8, f32>(bytes).unwrap_or(&[]))
                    }
                    v2l_graphs::DType::F16 => {
                        Weights::F16(bytemuck::try_cast_slice::<u8, f16>(bytes).unwrap_or(&[]))
                    }
                    _ => Weights::BF16(bytemuck::try_cast_slice::<u8, bf16>(bytes).unwrap_or(&[])),
                }
            }
        }
    }

    /// An owned copy (the live weights start as the base).
    fn to_buffer(&self) -> Buffer {
        match self.view() {
            Weights::F32(v) => Buffer::F32(v.to_vec()),
            Weights::F16(v) => Buffer::F16(v.to_vec()),
            Weights::BF16(v) => Buffer::BF16(v.to_vec()),
        }
    }
}

struct Layer {
    info: LinearInfo,
    base: BaseWeights,
    live: Buffer,
}

/// Base and live copies of a model's LoRA-targetable weights.
pub struct SwitchableWeights {
    layers: Vec<Layer>,
    index: HashMap<String, usize>,
    /// Layers the current LoRA changed.
    touched: BTreeSet<usize>,
    pub threads: usize,
}

impl SwitchableWeights {
    /// Takes the base weights (`[out, in]` each, as described by `infos`).
    pub fn new(weights: Vec<(LinearInfo, Buffer)>) -> SwitchableWeights {
        Self::from_base(
            weights
                .into_iter()
                .map(|(i, b)| (i, BaseWeights::Owned(b)))
                .collect(),
        )
    }

    /// Takes base weights that may be memory-mapped: only the live copy is held in memory.
    pub fn from_base(weights: Vec<(LinearInfo, BaseWeights)>) -> SwitchableWeights {
        let index = weights
            .iter()
            .enumerate()
            .map(|(i, (info, _))| (info.name.clone(), i))
            .collect();
        let layers = weights
            .into_iter()
            .map(|(info, base)| Layer {
                info,
                live: base.to_buffer(),
                base,
            })
            .collect();
        SwitchableWeights {
            layers,
            index,
            touched: BTreeSet::new(),
            threads: 0,
        }
    }

    pub fn targets(&self) -> Vec<LinearInfo> {
        self.layers.iter().map(|l| l.info.clone()).collect()
    }

    /// The live weight of `module`.
    pub fn live(&self, module: &str) -> Option<&Buffer> {
        self.index
            .get(module)
            .and_then(|&i| self.layers.get(i))
            .map(|l| &l.live)
    }

    /// Makes the live weights `base + s·B·A` for `lora` (or the base for `None`). Returns the
    /// module paths rewritten (the union of the previous and the new LoRA's layers).
    pub fn apply(&mut self, lora: Option<(&Lora, f32, &Path)>) -> Result<Vec<String>> {
        // Validate and prepare everything first: a bad LoRA leaves the live weights untouched.
        let mut plan: Vec<(usize, super::fuse::FusePlan)> = Vec::new();
        if let Some((lora, multiplier, source)) = lora {
            let targets = self.targets();
            for (t, l) in match_targets(lora, &targets, source)? {
                let fp = l.fuse_plan(multiplier);
                fp.check_finite(&l.module).map_err(|e| RuntimeError::Fuse {
                    what: source.display().to_string(),
                    source: e,
                })?;
                let i =
                    self.index
                        .get(&t.name)
                        .copied()
                        .ok_or_else(|| RuntimeError::LoraLayer {
                            layer: source.display().to_string(),
                            message: format!("layer `{}` is not a switchable weight", t.name),
                        })?;
                plan.push((i, fp));
            }
        }
        let next: BTreeSet<usize> = plan.iter().map(|p| p.0).collect();
        let threads = self.threads;
        let mut rewritten = Vec::new();
        for &i in self.touched.difference(&next) {
            let Some(layer) = self.layers.get_mut(i) else {
                continue;
            };
            restore_from(layer.base.view(), layer.live.view_mut(), threads).map_err(|e| {
                RuntimeError::Fuse {
                    what: layer.info.name.clone(),
                    source: e,
                }
            })?;
            rewritten.push(layer.info.name.clone());
        }
        for (i, fp) in &plan {
            let Some(layer) = self.layers.get_mut(*i) else {
                continue;
            };
            let f = fp.factors();
            let (o, n) = (layer.info.out_features, layer.info.in_features);
            let Layer { base, live, info } = layer;
            fuse_from(base.view(), live.view_mut(), o, n, &f, threads).map_err(|e| {
                RuntimeError::Fuse {
                    what: info.name.clone(),
                    source: e,
                }
            })?;
            rewritten.push(info.name.clone());
        }
        self.touched = next;
        rewritten.sort();
        Ok(rewritten)
    }
}
