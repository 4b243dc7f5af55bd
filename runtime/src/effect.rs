//! Prompt2Effect: an effect prompt → a LoRA for the engine's own DiT.
//!
//! The hypernetwork reads the base weights it adapts, so the DiT's targeted weights are streamed
//! through it from the engine's weight file, `chunk` layers at a time: memory holds one chunk of
//! weights and factors, never the model (at Wan2.1-14B's 5120×5120, 100 MB per layer in f32).
//!
//! Which layers: the DiT's square attention projections whose type the checkpoint knows, named
//! as the reproduction names them (Wan's original `blocks.{i}.self_attn.q` … `cross_attn.o`,
//! from [`crate::lora::names::wan_original`]): type id = its position in the checkpoint's
//! `module_specs` + 1, layer index = the block index clamped to the layer table. The reproduction
//! cannot map I2V's `add_k_proj`/`add_v_proj` (`cross_attn.k_img`/`v_img` are not in its
//! vocabulary) and skips them; so does v2l, and says so ([`EffectPredictor::skipped`]).
//!
//! Several effects blend exactly: `ΔW = Σ wᵢ·ΔWᵢ` as a rank concatenation
//! ([`crate::lora::merge::merge`]).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use v2l_contracts::manifest::Prompt2EffectEntry;

use crate::engine::Engine;
use crate::error::{Result, RuntimeError};
use crate::lora::format::{Factor, Lora, LoraFormat, LoraLayer};
use crate::session::{Model, SessionOptions};
use crate::tensor::Tensor;

/// Layers streamed through the hypernetwork per call unless told otherwise (the
/// reproduction's `--hypernet-chunk`).
pub const DEFAULT_CHUNK: usize = 16;

/// One DiT layer the hypernetwork adapts.
#[derive(Clone, Debug, PartialEq)]
pub struct EffectTarget {
    /// diffusers module name (`blocks.0.attn1.to_q`).
    pub module: String,
    pub layer_index: i64,
    pub module_index: i64,
}

/// The engine's Prompt2Effect graph and the layers it predicts for.
pub struct EffectPredictor {
    model: Model,
    entry: Prompt2EffectEntry,
    /// The graph whose initializers are the base weights (the export's DiT).
    weights: PathBuf,
    targets: Vec<EffectTarget>,
    skipped: Vec<String>,
}

impl EffectPredictor {
    /// Loads `engine`'s Prompt2Effect hypernetwork and matches it to the DiT's layers.
    pub fn load(engine: &Engine, opts: &SessionOptions) -> Result<EffectPredictor> {
        let entry = engine
            .manifest
            .prompt2effect
            .clone()
            .ok_or_else(|| engine.missing("Prompt2Effect hypernetwork", "prompt2effect"))?;
        let dit = engine
            .manifest
            .dit
            .as_ref()
            .ok_or_else(|| engine.missing("DiT", "dit"))?;
        let (mut targets, mut skipped) = (Vec::new(), Vec::new());
        for t in &dit.lora_targets {
            let square = t.in_features == entry.weight_dim && t.out_features == entry.weight_dim;
            let typed = crate::lora::names::wan_original(&t.name).and_then(|o| {
                let rest = o.strip_prefix("blocks.")?;
                let (block, kind) = rest.split_once('.')?;
                let block: i64 = block.parse().ok()?;
                let id = entry.module_types.iter().position(|m| m == kind)?;
                Some((block, id as i64 + 1))
            });
            match typed {
                Some((block, module_index)) if square => targets.push(EffectTarget {
                    module: t.name.clone(),
                    layer_index: block.clamp(0, entry.max_layers.saturating_sub(1) as i64),
                    module_index,
                }),
                // Attention projections it has no type for (I2V's image k/v), or of another size.
                _ if t.name.contains(".attn") => skipped.push(t.name.clone()),
                _ => {}
            }
        }
        if targets.is_empty() {
            return Err(RuntimeError::Invalid {
                what: engine.dir.display().to_string(),
                message: format!(
                    "no layer of its DiT is one the Prompt2Effect hypernetwork adapts ({}×{} attention projections of types {}); it is made for Wan2.1",
                    entry.weight_dim,
                    entry.weight_dim,
                    entry.module_types.join(", ")
                ),
            });
        }
        Ok(EffectPredictor {
            model: Model::load(&engine.dir.join(&entry.file), opts)?,
            weights: engine.dir.join(&dit.file),
            entry,
            targets,
            skipped,
        })
    }

    /// The layers predicted for, in the DiT's order.
    pub fn targets(&self) -> &[EffectTarget] {
        &self.targets
    }

    /// Attention projections of the DiT it does not adapt (no type in its vocabulary).
    pub fn skipped(&self) -> &[String] {
        &self.skipped
    }

    /// The LoRA for one effect's prompt embeddings `text [1, T, E]`, streaming `chunk` layers
    /// per call; `progress(done, total)` after each chunk. The factors apply at scale 1
    /// (alpha = rank), as the reproduction applies them.
    pub fn predict(
        &mut self,
        text: &Tensor,
        chunk: usize,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Lora> {
        let e = &self.entry;
        let (d, r) = (e.weight_dim, e.rank);
        if text.shape.len() != 3
            || text.shape.first() != Some(&1)
            || text.shape.get(2) != Some(&e.text_dim)
        {
            return Err(RuntimeError::Invalid {
                what: "effect prompt embeddings".into(),
                message: format!(
                    "shape {:?}; the hypernetwork reads [1, tokens, {}]",
                    text.shape, e.text_dim
                ),
            });
        }
        if text.as_f32("text")?.iter().any(|v| !v.is_finite()) {
            return Err(RuntimeError::Invalid {
                what: "effect prompt embeddings".into(),
                message: "contain NaN or infinite values".into(),
            });
        }
        let chunk = chunk.max(1);
        let total = self.targets.len();
        let mut layers = Vec::with_capacity(total);
        for part in self.targets.chunks(chunk) {
            let names: Vec<String> = part
                .iter()
                .map(|t| format!("{}.weight", t.module))
                .collect();
            let mut got: HashMap<String, Vec<f32>> = HashMap::with_capacity(part.len());
            v2l_graphs::for_each_initializer(
                &self.weights,
                &names,
                &mut |name, dtype, _, bytes| {
                    let v = v2l_graphs::dtype::f32_values(&bytes, dtype).ok_or_else(|| {
                        std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!("`{name}` is stored as {dtype}, not a float type"),
                        )
                    })?;
                    got.insert(name.to_string(), v);
                    Ok(())
                },
            )
            .map_err(|source| RuntimeError::Io {
                path: self.weights.clone(),
                source,
            })?;
            let mut w = Vec::with_capacity(part.len() * d * d);
            for n in &names {
                let v = got.remove(n).ok_or_else(|| RuntimeError::MissingTensor {
                    path: self.weights.clone(),
                    name: n.clone(),
                })?;
                if v.len() != d * d {
                    return Err(RuntimeError::Invalid {
                        what: n.clone(),
                        message: format!("{} values, not {d}×{d}", v.len()),
                    });
                }
                w.extend_from_slice(&v);
            }
            let n = part.len();
            let feed = BTreeMap::from([
                ("text".to_string(), text.clone()),
                ("base_weight".to_string(), Tensor::f32(vec![n, d, d], w)),
                (
                    "layer_index".to_string(),
                    Tensor::i64(vec![n], part.iter().map(|t| t.layer_index).collect()),
                ),
                (
                    "module_index".to_string(),
                    Tensor::i64(vec![n], part.iter().map(|t| t.module_index).collect()),
                ),
            ]);
            let mut out = self.model.run(&feed)?;
            let mut take = |k: &str| {
                out.remove(k).ok_or_else(|| RuntimeError::Invalid {
                    what: "Prompt2Effect graph".into(),
                    message: format!("no `{k}` output"),
                })
            };
            let (a, b) = (take("lora_A")?, take("lora_B")?);
            let (a, b) = (a.as_f32("lora_A")?, b.as_f32("lora_B")?);
            for (i, t) in part.iter().enumerate() {
                let (ra, rb) = (i * r * d..(i + 1) * r * d, i * d * r..(i + 1) * d * r);
                let (Some(a), Some(b)) = (a.get(ra), b.get(rb)) else {
                    return Err(RuntimeError::Invalid {
                        what: "Prompt2Effect graph".into(),
                        message: format!("fewer factors than the {n} layers fed"),
                    });
                };
                layers.push(LoraLayer {
                    module: t.module.clone(),
                    a: Factor::from_f32([r, d], a),
                    b: Factor::from_f32([d, r], b),
                    alpha: r as f32,
                });
            }
            progress(layers.len(), total);
        }
        Ok(Lora {
            format: LoraFormat::Diffusers,
            layers,
        })
    }
}

/// Where one effect's prompt embeddings come from.
#[derive(Clone, Debug)]
pub enum Effect {
    /// Prompt text, encoded by the engine's text encoder at the DiT's sequence length (Wan:
    /// umT5, 512 tokens, zeros past the prompt, as the Wan pipelines encode).
    Prompt(String),
    /// Embeddings `[1, T, E]` given as they are.
    Embeds(Tensor),
}

/// The blended LoRA of `effects`, each with its weight: every effect predicted
/// ([`EffectPredictor::predict`], `chunk` layers per call), then `Σ wᵢ·ΔWᵢ` per layer as a rank
/// concatenation. `progress(done, total)` counts layers over all effects.
pub fn predict_effects(
    engine: &Engine,
    opts: &SessionOptions,
    effects: &[(Effect, f32)],
    chunk: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Lora> {
    if effects.is_empty() {
        return Err(RuntimeError::Invalid {
            what: "effects".into(),
            message: "none given".into(),
        });
    }
    for (_, w) in effects {
        crate::limits::finite("effect weight", *w)?;
    }
    let mut predictor = EffectPredictor::load(engine, opts)?;
    let mut encoder = None;
    let total = predictor.targets().len() * effects.len();
    let mut loras = Vec::with_capacity(effects.len());
    for (i, (effect, _)) in effects.iter().enumerate() {
        let text = match effect {
            Effect::Embeds(t) => t.clone(),
            Effect::Prompt(p) => {
                let len = engine
                    .text_sequence_length()
                    .ok_or_else(|| RuntimeError::Invalid {
                        what: engine.dir.display().to_string(),
                        message: "its DiT gives no text sequence length to encode the effect at"
                            .into(),
                    })?;
                if encoder.is_none() {
                    encoder = Some(crate::text::prompt::PromptEncoder::load(engine, opts)?);
                }
                let Some(enc) = encoder.as_mut() else {
                    continue;
                };
                enc.encode(p, len, &mut |_| {})?.1
            }
        };
        let done = i * predictor.targets().len();
        loras.push(predictor.predict(&text, chunk, &mut |n, _| progress(done + n, total))?);
    }
    let weighted: Vec<(&Lora, f32)> = loras
        .iter()
        .zip(effects)
        .map(|(l, (_, w))| (l, *w))
        .collect();
    crate::lora::merge::merge(&weighted)
}
