//! Effect prompts → a LoRA for the engine's own DiT, by the hypernetworks that read the base
//! weights: Prompt2Effect (one graph) and LoFA (two stages, stage 1's hidden states the prior
//! of stage 2).
//!
//! The hypernetworks read the weights they adapt, so the DiT's targeted weights are streamed
//! through them from the engine's weight file, `chunk` layers at a time: memory holds one chunk
//! of weights and factors, never the model (at Wan2.1-14B's 5120×5120, 100 MB per layer in f32).
//!
//! Which layers: the DiT's square attention projections whose type the checkpoint knows, named
//! as the Wan repo names them (`blocks.{i}.self_attn.q` … `cross_attn.o`, from
//! [`crate::lora::names::wan_original`]); the layer index is the block index, clamped to the
//! checkpoint's table as upstream clamps it. Prompt2Effect's type ids start at 1 (0 is
//! "unknown"); LoFA's at 0 (its `VALID_LAYERS` order). Neither maps I2V's `add_k_proj`/
//! `add_v_proj` (`cross_attn.k_img`/`v_img`); the reproduction skips them, and so does v2l,
//! saying so ([`EffectPredictor::skipped`]).
//!
//! Several effects blend exactly: `ΔW = Σ wᵢ·ΔWᵢ` as a rank concatenation
//! ([`crate::lora::merge::merge`]).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use v2l_contracts::io::effect as effect_io;

use v2l_contracts::LinearInfo;

use crate::engine::Engine;
use crate::error::{Result, RuntimeError};
use crate::lora::format::{Factor, Lora, LoraFormat, LoraLayer};
use crate::session::{Model, SessionOptions};
use crate::tensor::Tensor;

/// At most this many layers per call by default (the reproduction's `--hypernet-chunk`).
pub const MAX_DEFAULT_CHUNK: usize = 16;

/// Activation memory a default chunk may take: the chunk is as many layers as fit.
const CHUNK_BUDGET: u64 = 2 << 30;

/// One DiT layer the hypernetwork adapts.
#[derive(Clone, Debug, PartialEq)]
pub struct EffectTarget {
    /// diffusers module name (`blocks.0.attn1.to_q`).
    pub module: String,
    pub layer_index: i64,
    pub module_index: i64,
}

/// Which hypernetwork turns the prompt into a LoRA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hypernet {
    /// `v2l-export prompt2effect`.
    Prompt2Effect,
    /// `v2l-export lofa`.
    Lofa,
}

impl Hypernet {
    /// The one `engine` has (Prompt2Effect when it has both), if any.
    pub fn of(engine: &Engine) -> Option<Hypernet> {
        let m = &engine.manifest;
        match (&m.prompt2effect, &m.lofa) {
            (Some(_), _) => Some(Hypernet::Prompt2Effect),
            (None, Some(_)) => Some(Hypernet::Lofa),
            (None, None) => None,
        }
    }
}

enum Graphs {
    Prompt2Effect(Model),
    Lofa { stage1: Model, stage2: Model },
}

/// The engine's effect hypernetwork and the layers it predicts for.
pub struct EffectPredictor {
    graphs: Graphs,
    text_dim: usize,
    side: usize,
    rank: usize,
    /// The graph whose initializers are the base weights (the export's DiT).
    weights: PathBuf,
    targets: Vec<EffectTarget>,
    skipped: Vec<String>,
    /// Estimated activation bytes of one layer in a call (sizes the default chunk).
    layer_bytes: u64,
    /// LoFA: round stage 1's hidden states through f16 before stage 2, as the authors' demo
    /// stores them (`.half()`) and their checkpoints were trained with. On by default.
    pub fp16_prior: bool,
}

impl EffectPredictor {
    /// Loads `engine`'s hypernetwork `which` and matches it to the DiT's layers.
    pub fn load(
        engine: &Engine,
        which: Hypernet,
        opts: &SessionOptions,
    ) -> Result<EffectPredictor> {
        let dit = engine
            .manifest
            .dit
            .as_ref()
            .ok_or_else(|| engine.missing("DiT", "dit"))?;
        let m = &engine.manifest;
        // (graphs, text width, side, rank, types, first type id, layer table, bytes per layer)
        let (graphs, text_dim, side, rank, types, first_id, table, layer_bytes) = match which {
            Hypernet::Prompt2Effect => {
                let e = m
                    .prompt2effect
                    .as_ref()
                    .ok_or_else(|| engine.missing("Prompt2Effect hypernetwork", "prompt2effect"))?;
                let g = Graphs::Prompt2Effect(Model::load(&engine.dir.join(&e.file), opts)?);
                // The decompressor's 2D weight tokens through a 4d-wide FF, with the attention
                // and residual tensors beside it: ~4 such f32 tensors (1.34 GB per layer at
                // D 5120, d 2048; measured 1.4 GB).
                let bytes = 4 * (2 * e.weight_dim * 4 * e.hidden_dim * 4) as u64;
                let (types, table) = (&e.module_types, e.max_layers);
                (g, e.text_dim, e.weight_dim, e.rank, types, 1, table, bytes)
            }
            Hypernet::Lofa => {
                let e = m
                    .lofa
                    .as_ref()
                    .ok_or_else(|| engine.missing("LoFA hypernetwork", "lofa"))?;
                let g = Graphs::Lofa {
                    stage1: Model::load(&engine.dir.join(&e.stage1), opts)?,
                    stage2: Model::load(&engine.dir.join(&e.stage2), opts)?,
                };
                // Per stage, the tokens through a 4D-wide MLP, and the base weight itself.
                let bytes =
                    (8 * e.tokens * 4 * e.d_model * 4 + e.weight_dim * e.weight_dim * 4) as u64;
                let (types, table) = (&e.module_types, e.num_depth);
                (g, e.text_dim, e.weight_dim, e.rank, types, 0, table, bytes)
            }
        };
        let (targets, skipped) = match_targets(&dit.lora_targets, side, types, first_id, table);
        if targets.is_empty() {
            return Err(RuntimeError::Engine {
                dir: engine.dir.clone(),
                message: format!(
                    "no layer of its DiT is one the hypernetwork adapts ({side}×{side} attention projections of types {}); it is made for Wan2.1",
                    types.join(", ")
                ),
            });
        }
        Ok(EffectPredictor {
            graphs,
            text_dim,
            side,
            rank,
            weights: engine.dir.join(&dit.file),
            targets,
            skipped,
            layer_bytes,
            fp16_prior: true,
        })
    }

    /// Layers per call when not told: as many as fit a 2 GiB activation budget, at most
    /// [`MAX_DEFAULT_CHUNK`] (Prompt2Effect at paper size: 1; LoFA at 1.3B size: 16).
    pub fn default_chunk(&self) -> usize {
        ((CHUNK_BUDGET / self.layer_bytes.max(1)) as usize).clamp(1, MAX_DEFAULT_CHUNK)
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
    /// per call ([`Self::default_chunk`] when `None`); `progress(done, total)` after each chunk. The factors apply at scale 1
    /// (alpha = rank): Prompt2Effect's as the reproduction applies them, LoFA's with its alpha
    /// folded into `lora_B` (ΔW at `lora_scale` 1).
    pub fn predict(
        &mut self,
        text: &Tensor,
        chunk: Option<usize>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Lora> {
        let (d, r, text_dim) = (self.side, self.rank, self.text_dim);
        if text.shape.len() != 3
            || text.shape.first() != Some(&1)
            || text.shape.get(2) != Some(&text_dim)
        {
            return Err(RuntimeError::Invalid {
                what: "effect prompt embeddings".into(),
                message: format!(
                    "shape {:?}; the hypernetwork reads [1, tokens, {}]",
                    text.shape, text_dim
                ),
            });
        }
        if text.as_f32(effect_io::TEXT)?.iter().any(|v| !v.is_finite()) {
            return Err(RuntimeError::Invalid {
                what: "effect prompt embeddings".into(),
                message: "contain NaN or infinite values".into(),
            });
        }
        let chunk = chunk.unwrap_or_else(|| self.default_chunk()).max(1);
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
                    return Err(RuntimeError::Graph {
                        graph: n.clone(),
                        message: format!("{} values, not {d}×{d}", v.len()),
                    });
                }
                w.extend_from_slice(&v);
            }
            let n = part.len();
            let w = Tensor::f32(vec![n, d, d], w);
            let layer = Tensor::i64(vec![n], part.iter().map(|t| t.layer_index).collect());
            let kind = Tensor::i64(vec![n], part.iter().map(|t| t.module_index).collect());
            let out = self.graphs.run(self.fp16_prior, text, w, layer, kind)?;
            let (a, b) = (
                out.0.as_f32(effect_io::LORA_A)?,
                out.1.as_f32(effect_io::LORA_B)?,
            );
            for (i, t) in part.iter().enumerate() {
                let (ra, rb) = (i * r * d..(i + 1) * r * d, i * d * r..(i + 1) * d * r);
                let (Some(a), Some(b)) = (a.get(ra), b.get(rb)) else {
                    return Err(RuntimeError::Graph {
                        graph: "Prompt2Effect graph".into(),
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

impl Graphs {
    /// One chunk through the graph(s): `(lora_A [N, r, n], lora_B [N, n, r])`.
    fn run(
        &mut self,
        fp16_prior: bool,
        text: &Tensor,
        w: Tensor,
        layer: Tensor,
        kind: Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let take = |out: &mut BTreeMap<String, Tensor>, k: &str| {
            (out.remove(k)).ok_or_else(|| RuntimeError::missing_output("effect hypernetwork", k))
        };
        let mut out = match self {
            Graphs::Prompt2Effect(m) => m.run(&BTreeMap::from([
                (effect_io::TEXT.to_string(), text.clone()),
                (effect_io::BASE_WEIGHT.to_string(), w),
                (effect_io::LAYER_INDEX.to_string(), layer),
                (effect_io::MODULE_INDEX.to_string(), kind),
            ]))?,
            Graphs::Lofa { stage1, stage2 } => {
                let mut feed = BTreeMap::from([
                    (effect_io::TEXT.to_string(), text.clone()),
                    (effect_io::BASE_WEIGHT.to_string(), w),
                    (effect_io::DEPTH_INDEX.to_string(), layer),
                    (effect_io::TYPE_INDEX.to_string(), kind),
                ]);
                let mut hidden = take(&mut stage1.run(&feed)?, effect_io::HIDDEN)?;
                if fp16_prior {
                    if let crate::tensor::Data::F32(v) = &mut hidden.data {
                        v.iter_mut()
                            .for_each(|x| *x = half::f16::from_f32(*x).to_f32());
                    }
                }
                feed.insert(effect_io::PRIOR.to_string(), hidden);
                stage2.run(&feed)?
            }
        };
        Ok((
            take(&mut out, effect_io::LORA_A)?,
            take(&mut out, effect_io::LORA_B)?,
        ))
    }
}

/// The DiT layers a hypernetwork adapts (module docs), and the attention projections it skips.
fn match_targets(
    dit: &[LinearInfo],
    side: usize,
    types: &[String],
    first_id: i64,
    table: usize,
) -> (Vec<EffectTarget>, Vec<String>) {
    let (mut targets, mut skipped) = (Vec::new(), Vec::new());
    for t in dit {
        let square = t.in_features == side && t.out_features == side;
        let typed = crate::lora::names::wan_original(&t.name).and_then(|o| {
            let (block, kind) = o.strip_prefix("blocks.")?.split_once('.')?;
            let block: i64 = block.parse().ok()?;
            let id = types.iter().position(|m| m == kind)?;
            Some((block, id as i64 + first_id))
        });
        match typed {
            Some((block, module_index)) if square => targets.push(EffectTarget {
                module: t.name.clone(),
                layer_index: block.clamp(0, table.saturating_sub(1) as i64),
                module_index,
            }),
            // Attention projections it has no type for (I2V's image k/v), or of another size.
            _ if t.name.contains(".attn") => skipped.push(t.name.clone()),
            _ => {}
        }
    }
    (targets, skipped)
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

/// The blended LoRA of `effects`, each with its weight: every effect predicted by `which`
/// ([`EffectPredictor::predict`], `chunk` layers per call), then `Σ wᵢ·ΔWᵢ` per layer as a rank
/// concatenation. `fp16_prior`: [`EffectPredictor::fp16_prior`]. `progress(done, total)`
/// counts layers over all effects.
pub fn predict_effects(
    engine: &Engine,
    which: Hypernet,
    fp16_prior: bool,
    opts: &SessionOptions,
    effects: &[(Effect, f32)],
    chunk: Option<usize>,
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
    let mut predictor = EffectPredictor::load(engine, which, opts)?;
    predictor.fp16_prior = fp16_prior;
    let mut encoder = None;
    let total = predictor.targets().len() * effects.len();
    let mut loras = Vec::with_capacity(effects.len());
    for (i, (effect, _)) in effects.iter().enumerate() {
        let text = match effect {
            Effect::Embeds(t) => t.clone(),
            Effect::Prompt(p) => {
                let len = engine
                    .text_sequence_length()
                    .ok_or_else(|| RuntimeError::Engine {
                        dir: engine.dir.clone(),
                        message: "its DiT gives no text sequence length to encode the effect at"
                            .into(),
                    })?;
                prompt_embeds(&mut encoder, engine, opts, p, len)?
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

/// Lazily loaded prompt encoder (tokenizer + text encoder), or `()` without the `text` feature.
#[cfg(feature = "text")]
type LazyEncoder = Option<crate::text::prompt::PromptEncoder>;
#[cfg(not(feature = "text"))]
type LazyEncoder = Option<()>;

/// An effect prompt's embeddings, `len` tokens, loading the engine's prompt encoder once.
#[cfg(feature = "text")]
fn prompt_embeds(
    encoder: &mut LazyEncoder,
    engine: &Engine,
    opts: &SessionOptions,
    prompt: &str,
    len: usize,
) -> Result<Tensor> {
    if encoder.is_none() {
        *encoder = Some(crate::text::prompt::PromptEncoder::load(engine, opts)?);
    }
    match encoder.as_mut() {
        Some(enc) => Ok(enc.encode(prompt, len, &mut |_| {})?.1),
        None => Err(RuntimeError::Internal {
            what: "prompt".into(),
            message: "the prompt encoder did not load".into(),
        }),
    }
}

/// Without the `text` feature an effect must come as embeddings.
#[cfg(not(feature = "text"))]
fn prompt_embeds(
    _: &mut LazyEncoder,
    _: &Engine,
    _: &SessionOptions,
    _: &str,
    _: usize,
) -> Result<Tensor> {
    Err(v2l_contracts::request::RequestError::new(
        v2l_contracts::request::Field::Prompt,
        "this v2l was built without the `text` feature: give the effect as prompt embeddings",
    )
    .into())
}
