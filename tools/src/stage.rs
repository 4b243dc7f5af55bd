//! Running one pipeline component on named tensors: `v2l-run ... stage <name>`.
//!
//! This is how a user validates an export against PyTorch: dump a component's inputs from
//! diffusers to safetensors, run the same component here, compare the outputs. Tensor names
//! follow the fixtures (`tests/fixtures/README.md`) and `v2l_contracts::io`.

use std::collections::BTreeMap;
use std::path::Path;
use v2l_contracts::io::dit as dit_io;
use v2l_contracts::io::hypernet as hypernet_io;
use v2l_contracts::io::text as text_io;
use v2l_contracts::io::vae as vae_io;

use v2l_contracts::family::WanDitConfig;
use v2l_runtime::engine::Engine;
use v2l_runtime::lora::strategy::{DitRunner, Strategy};
use v2l_runtime::lora::AppliedLora;

use v2l_runtime::error::{Result, RuntimeError};
use v2l_runtime::session::SessionOptions;
use v2l_runtime::tensor::Tensor;

/// A component that `stage` can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Dit,
    VaeEncode,
    VaeDecode,
    Hypernet,
    TextEncoder,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Dit => "dit",
            Stage::VaeEncode => "vae-encode",
            Stage::VaeDecode => "vae-decode",
            Stage::Hypernet => "hypernet",
            Stage::TextEncoder => "text-encoder",
        }
    }

    /// Input tensor names, as in the fixtures.
    pub fn inputs(self) -> &'static [&'static str] {
        match self {
            Stage::Dit => &[
                dit_io::HIDDEN_STATES,
                dit_io::ENCODER_HIDDEN_STATES,
                dit_io::TIMESTEP,
                dit_io::ROPE_COS,
                dit_io::ROPE_SIN,
            ],
            Stage::VaeEncode => &[vae_io::VIDEO],
            Stage::VaeDecode => &[vae_io::LATENTS],
            Stage::Hypernet => &[hypernet_io::REFERENCE_LATENTS],
            Stage::TextEncoder => &[text_io::INPUT_IDS],
        }
    }
}

impl Stage {
    /// The inputs this stage of `engine` requires: the DiT's depend on its architecture (a Wan
    /// DiT takes float timesteps, computes its RoPE tables when they are not given, and takes
    /// `encoder_hidden_states_image` when it is an I2V model).
    pub fn required_inputs(self, engine: &Engine) -> Vec<&'static str> {
        match (self, engine.wan_config().ok().flatten()) {
            (Stage::Dit, Some(w)) => {
                let mut v = vec![
                    dit_io::HIDDEN_STATES,
                    dit_io::ENCODER_HIDDEN_STATES,
                    dit_io::TIMESTEP,
                ];
                if w.image_dim.is_some() {
                    v.push(dit_io::ENCODER_HIDDEN_STATES_IMAGE);
                }
                v
            }
            _ => self.inputs().to_vec(),
        }
    }
}

/// A Wan DiT's feed beyond the required inputs: timesteps as float, and the RoPE tables (the
/// given ones, or `rope::wan_rope` for the latent's size).
fn wan_feed(
    w: &WanDitConfig,
    inputs: &BTreeMap<String, Tensor>,
    feed: &mut BTreeMap<String, Tensor>,
) -> Result<()> {
    if let Some(t) = feed.get_mut(dit_io::TIMESTEP) {
        if let v2l_runtime::tensor::Data::I64(v) = &t.data {
            *t = Tensor::f32(t.shape.clone(), v.iter().map(|&x| x as f32).collect());
        }
    }
    let (cos, sin) = match (inputs.get(dit_io::ROPE_COS), inputs.get(dit_io::ROPE_SIN)) {
        (Some(c), Some(s)) => (c.clone(), s.clone()),
        _ => {
            let shape = feed
                .get(dit_io::HIDDEN_STATES)
                .map(|t| t.shape.clone())
                .unwrap_or_default();
            let [_, _, f, h, wd] = shape[..] else {
                return Err(RuntimeError::Invalid {
                    what: dit_io::HIDDEN_STATES.into(),
                    message: format!("has shape {shape:?}; expected [B, C, F, H, W]"),
                });
            };
            let (c, s) = v2l_runtime::rope::wan_rope(
                w.attention_head_dim,
                f,
                h,
                wd,
                w.patch(),
                w.rope_max_seq_len,
            )?;
            let rows = c.len() / w.attention_head_dim.max(1);
            (
                Tensor::f32(vec![rows, w.attention_head_dim], c),
                Tensor::f32(vec![rows, w.attention_head_dim], s),
            )
        }
    };
    feed.insert(dit_io::ROPE_COS.into(), cos);
    feed.insert(dit_io::ROPE_SIN.into(), sin);
    Ok(())
}

/// `shape` as exactly `N` non-empty axes, or the message for the tensor's error.
fn sized<const N: usize>(shape: &[usize], layout: &str) -> std::result::Result<[usize; N], String> {
    <[usize; N]>::try_from(shape)
        .ok()
        .filter(|d| !d.contains(&0))
        .ok_or_else(|| format!("has shape {shape:?}; expected {layout} with no empty axis"))
}

/// Checks `inputs` against what `stage` of the export in `dir` takes, before any session is
/// built: every tensor present, of its dtype and rank, sizes that agree with each other and with
/// the model, floats finite, timesteps within the scheduler's range. `source` names the file.
/// A bad input is one clear error in milliseconds, not an ONNX Runtime kernel message after
/// seconds of loading.
pub fn check_inputs(
    engine: &Engine,
    stage: Stage,
    inputs: &BTreeMap<String, Tensor>,
    source: &Path,
) -> Result<()> {
    let bad = |name: &str, message: String| RuntimeError::BadFile {
        path: source.into(),
        message: format!("`{name}` {message}"),
    };
    let mut shapes = BTreeMap::new();
    let wan = engine.wan_config()?;
    for name in stage.required_inputs(engine) {
        let t = inputs
            .get(name)
            .ok_or_else(|| RuntimeError::MissingTensor {
                path: source.into(),
                name: name.to_string(),
            })?;
        // CogVideoX takes int64 timesteps; Wan's flow samplers step at fractional ones.
        let want_int = (name == dit_io::TIMESTEP && wan.is_none()) || name == text_io::INPUT_IDS;
        match (&t.data, want_int) {
            (v2l_runtime::tensor::Data::F32(v), false) => {
                if let Some((i, x)) = v.iter().enumerate().find(|(_, x)| !x.is_finite()) {
                    return Err(bad(
                        name,
                        format!("holds {x} at element {i}; every value must be finite"),
                    ));
                }
            }
            (v2l_runtime::tensor::Data::I64(_), true) => {}
            // Wan: UniPC's whole-number timesteps may come as int64 (taken as floats).
            (v2l_runtime::tensor::Data::I64(_), false) if name == dit_io::TIMESTEP => {}
            _ => {
                let want = if want_int { "int64" } else { "float32" };
                return Err(bad(name, format!("must be {want}")));
            }
        }
        shapes.insert(name, t.shape.as_slice());
    }
    let dims = |name: &str| shapes.get(name).copied().unwrap_or(&[]);
    // A 5-D input whose axis 1 must be `want` channels for `model`.
    let channels = |name: &str, layout: &str, want: usize, model: &str| {
        let s: [usize; 5] = sized(dims(name), layout).map_err(|m| bad(name, m))?;
        if s[1] != want {
            return Err(bad(
                name,
                format!("has shape {s:?}; {model} takes {want} channels"),
            ));
        }
        Ok(s)
    };
    let manifest = &engine.manifest;
    match stage {
        Stage::Dit if wan.is_some() => {
            let (d, w) = match (manifest.dit.as_ref(), wan.as_ref()) {
                (Some(d), Some(w)) => (d, w),
                _ => return Err(engine.missing("DiT", "dit")),
            };
            let hs = dims(dit_io::HIDDEN_STATES);
            let [b, c, f, h, wd] =
                sized(hs, "[B, C, F, H, W]").map_err(|m| bad(dit_io::HIDDEN_STATES, m))?;
            let (pt, ph, pw) = w.patch();
            if c != d.in_channels || f % pt.max(1) != 0 || h % ph.max(1) != 0 || wd % pw.max(1) != 0
            {
                return Err(bad(dit_io::HIDDEN_STATES, format!(
                    "has shape {hs:?}; the Wan DiT takes [B, {}, F, H, W] with F, H, W multiples of its patch {:?}",
                    d.in_channels, w.patch()
                )));
            }
            for (name, width) in [
                (dit_io::ENCODER_HIDDEN_STATES, Some(d.text_embed_dim)),
                (dit_io::ENCODER_HIDDEN_STATES_IMAGE, w.image_dim),
            ] {
                let Some(width) = width else { continue };
                let e = dims(name);
                let [eb, _, ed] = sized(e, "[B, L, D]").map_err(|m| bad(name, m))?;
                if eb != b || ed != width {
                    return Err(bad(
                        name,
                        format!("has shape {e:?}; expected [{b}, L, {width}]"),
                    ));
                }
            }
            let [tb] =
                sized(dims(dit_io::TIMESTEP), "[B]").map_err(|m| bad(dit_io::TIMESTEP, m))?;
            if tb != b {
                return Err(bad(
                    dit_io::TIMESTEP,
                    format!("has {tb} values for a batch of {b}"),
                ));
            }
            let tokens = (f / pt.max(1)) * (h / ph.max(1)) * (wd / pw.max(1));
            for name in [dit_io::ROPE_COS, dit_io::ROPE_SIN] {
                if let Some(r) = inputs.get(name) {
                    if r.shape != [tokens, w.attention_head_dim] {
                        return Err(bad(name, format!(
                            "has shape {:?}; expected [{tokens}, {}] (or leave it out: v2l computes it)",
                            r.shape, w.attention_head_dim
                        )));
                    }
                }
            }
        }
        Stage::Dit => {
            let d = manifest
                .dit
                .as_ref()
                .ok_or_else(|| engine.missing("DiT", "dit"))?;
            let hs = dims(dit_io::HIDDEN_STATES);
            let [b, f, c, h, w] =
                sized(hs, "[B, F, C, H, W]").map_err(|m| bad(dit_io::HIDDEN_STATES, m))?;
            let p = d.patch_size.max(1);
            if c != d.in_channels || h % p != 0 || w % p != 0 {
                return Err(bad(dit_io::HIDDEN_STATES, format!(
                    "has shape {hs:?}; the DiT takes {} channels and H, W multiples of its patch size {p}",
                    d.in_channels
                )));
            }
            let ehs = dims(dit_io::ENCODER_HIDDEN_STATES);
            let [eb, _, ed] =
                sized(ehs, "[B, L, D]").map_err(|m| bad(dit_io::ENCODER_HIDDEN_STATES, m))?;
            if eb != b || ed != d.text_embed_dim {
                return Err(bad(dit_io::ENCODER_HIDDEN_STATES, format!(
                    "has shape {ehs:?}; expected [{b}, L, {}] (batch of hidden_states, the DiT's text width)",
                    d.text_embed_dim
                )));
            }
            let ts = dims(dit_io::TIMESTEP);
            let [tb] = sized(ts, "[B]").map_err(|m| bad(dit_io::TIMESTEP, m))?;
            if tb != b {
                return Err(bad(
                    dit_io::TIMESTEP,
                    format!("has shape {ts:?}; expected [{b}]"),
                ));
            }
            let train_steps = match &manifest.scheduler {
                Some(file) => {
                    v2l_runtime::scheduler::SchedulerConfig::from_file(&engine.dir.join(file))?
                        .num_train_timesteps
                }
                None => 1000,
            };
            if let Some(v2l_runtime::tensor::Data::I64(v)) =
                inputs.get(dit_io::TIMESTEP).map(|t| &t.data)
            {
                if let Some(t) = v.iter().find(|&&t| t < 0 || t as u64 >= train_steps as u64) {
                    return Err(bad(dit_io::TIMESTEP, format!(
                        "holds {t}; timesteps are 0 to {} (the scheduler's num_train_timesteps - 1)",
                        train_steps - 1
                    )));
                }
            }
            let tokens = f * (h / p) * (w / p);
            for name in [dit_io::ROPE_COS, dit_io::ROPE_SIN] {
                let r = sized(dims(name), "[tokens, head_dim]").map_err(|m| bad(name, m))?;
                if r != [tokens, d.attention_head_dim] {
                    return Err(bad(name, format!(
                        "has shape {r:?}; {f} frames of {h}x{w} latents in patches of {p} need [{tokens}, {}]",
                        d.attention_head_dim
                    )));
                }
            }
        }
        Stage::VaeEncode => {
            let v = manifest
                .vae
                .as_ref()
                .ok_or_else(|| engine.missing("VAE", "vae"))?;
            let [_, _, _, h, w] =
                channels(vae_io::VIDEO, "[B, 3, F, H, W]", v.in_channels, "the VAE")?;
            if h % 8 != 0 || w % 8 != 0 {
                return Err(bad(
                    vae_io::VIDEO,
                    format!("is {h}x{w}; the VAE takes H, W multiples of 8"),
                ));
            }
        }
        Stage::VaeDecode => {
            let v = manifest
                .vae
                .as_ref()
                .ok_or_else(|| engine.missing("VAE", "vae"))?;
            channels(
                vae_io::LATENTS,
                "[B, C, F, H, W]",
                v.latent_channels,
                "the VAE",
            )?;
        }
        Stage::Hypernet => {
            let e = manifest
                .hypernet
                .as_ref()
                .ok_or_else(|| engine.missing("hypernetwork", "hypernet"))?;
            let want = e.dims.feature_dim;
            channels(
                hypernet_io::REFERENCE_LATENTS,
                "[B, C, T, H, W]",
                want,
                "the hypernetwork",
            )?;
        }
        Stage::TextEncoder => {
            let e = manifest
                .text_encoder
                .as_ref()
                .ok_or_else(|| engine.missing("text encoder", "text-encoder"))?;
            let _: [usize; 2] = sized(dims(text_io::INPUT_IDS), "[B, L]")
                .map_err(|m| bad(text_io::INPUT_IDS, m))?;
            // Optional (umT5 graphs take one; without it every non-padding token counts).
            if let Some(m) = inputs.get("attention_mask") {
                let ok = m.shape == dims(text_io::INPUT_IDS)
                    && matches!(&m.data, v2l_runtime::tensor::Data::I64(v) if v.iter().all(|&x| x == 0 || x == 1));
                if !ok {
                    return Err(bad(
                        "attention_mask",
                        "must be int64 0/1 of the shape of `input_ids`".into(),
                    ));
                }
            }
            if let Some(v2l_runtime::tensor::Data::I64(ids)) =
                inputs.get(text_io::INPUT_IDS).map(|t| &t.data)
            {
                if let Some((i, id)) = ids
                    .iter()
                    .enumerate()
                    .find(|(_, id)| **id < 0 || **id as u64 >= e.vocab_size as u64)
                {
                    return Err(bad(
                        text_io::INPUT_IDS,
                        format!(
                            "holds {id} at element {i}; token ids are 0..{}",
                            e.vocab_size
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// What a stage run produced, and where its time went.
pub struct StageRun {
    pub outputs: BTreeMap<String, Tensor>,
    /// Session building (graph load, optimisation, weights), in milliseconds.
    pub load_ms: f64,
    /// Running the component on the inputs, in milliseconds (the median of `runs_ms`).
    pub run_ms: f64,
    /// Every run, in order (the first pays for first-touch memory; later ones are steady state).
    pub runs_ms: Vec<f64>,
}

/// Runs `f` `runs` times (at least once), returning the last result and each run's time.
fn timed<T>(runs: usize, mut f: impl FnMut() -> Result<T>) -> Result<(T, Vec<f64>)> {
    let mut times = Vec::with_capacity(runs.max(1));
    let mut last = None;
    for _ in 0..runs.max(1) {
        let t = std::time::Instant::now();
        last = Some(f()?);
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    match last {
        Some(v) => Ok((v, times)),
        None => Err(RuntimeError::Internal {
            what: "stage".into(),
            message: "no run".into(),
        }),
    }
}

/// Runs `stage` of the export in `dir` on `inputs`, with `lora` applied to the DiT if given (by
/// the strategy given with it, or the engine's, as generation applies it),
/// `runs` times on one loaded session (for timing; the outputs are the last run's).
pub fn run_stage(
    engine: &Engine,
    stage: Stage,
    inputs: &BTreeMap<String, Tensor>,
    opts: &SessionOptions,
    lora: Option<(&AppliedLora, Option<Strategy>)>,
    vae_tiling: v2l_runtime::vae::TilingMode,
    runs: usize,
) -> Result<StageRun> {
    if lora.is_some() && stage != Stage::Dit {
        return Err(RuntimeError::Invalid {
            what: format!("stage {}", stage.name()),
            message: "--lora applies to the dit stage only".into(),
        });
    }
    let get = |name: &str| {
        inputs.get(name).ok_or_else(|| RuntimeError::MissingTensor {
            path: "stage inputs".into(),
            name: name.into(),
        })
    };
    let ms = |t: std::time::Instant| t.elapsed().as_secs_f64() * 1e3;
    let t0 = std::time::Instant::now();
    let (outputs, load_ms, runs_ms) = match stage {
        Stage::Dit => {
            let mut feed: BTreeMap<String, Tensor> = stage
                .required_inputs(engine)
                .iter()
                .map(|n| Ok((n.to_string(), get(n)?.clone())))
                .collect::<Result<_>>()?;
            if let Some(w) = engine.wan_config()? {
                wan_feed(&w, inputs, &mut feed)?;
            }
            // A repeat times the call as a denoising step makes it: the request's constants
            // (prompt, RoPE tables, timestep) held by the session (on a GPU engine, on the
            // device), the latents given per call.
            let step: BTreeMap<String, Tensor> = feed
                .remove_entry(dit_io::HIDDEN_STATES)
                .into_iter()
                .collect();
            let (mut out, load_ms, times) = match lora {
                None => {
                    let mut m = engine.dit(opts)?;
                    let takes = m.input_names().to_vec();
                    m.set_fixed_inputs(
                        feed.into_iter()
                            .filter(|(n, _)| takes.contains(n))
                            .collect(),
                    )?;
                    let load_ms = ms(t0);
                    let (out, times) = timed(runs, || m.run(&step))?;
                    (out, load_ms, times)
                }
                // The LoRA as generation applies it: by default the engine's strategy (a GPU
                // engine's factors as inputs, a branch per layer).
                Some((l, strategy)) => {
                    let strategy = strategy.unwrap_or_else(|| {
                        engine
                            .bundle
                            .as_ref()
                            .map(|b| b.lora_strategy)
                            .unwrap_or_default()
                    });
                    let mut dit = DitRunner::load(engine, opts, strategy)?;
                    dit.set_lora(engine, Some(l))?;
                    dit.set_constant_inputs(feed)?;
                    let load_ms = ms(t0);
                    let (out, times) = timed(runs, || dit.run(&step))?;
                    (out, load_ms, times)
                }
            };
            let sample = (out.remove("sample"))
                .ok_or_else(|| RuntimeError::missing_output("DiT", "sample"))?;
            (
                BTreeMap::from([("sample".to_string(), sample)]),
                load_ms,
                times,
            )
        }
        Stage::VaeEncode => {
            let mut vae = v2l_runtime::vae::Vae::load(engine, opts)?;
            vae.tiling = vae_tiling;
            let load_ms = ms(t0);
            let ((mean, logvar), times) = timed(runs, || vae.encode(get(vae_io::VIDEO)?))?;
            (
                BTreeMap::from([
                    (vae_io::POSTERIOR_MEAN.to_string(), mean),
                    (vae_io::POSTERIOR_LOGVAR.to_string(), logvar),
                ]),
                load_ms,
                times,
            )
        }
        Stage::VaeDecode => {
            let mut vae = v2l_runtime::vae::Vae::load(engine, opts)?;
            vae.tiling = vae_tiling;
            let load_ms = ms(t0);
            let (sample, times) = timed(runs, || vae.decode(get(vae_io::LATENTS)?))?;
            (
                BTreeMap::from([("sample".to_string(), sample)]),
                load_ms,
                times,
            )
        }
        Stage::Hypernet => {
            let mut p = v2l_runtime::predict::Predictor::load(engine, opts)?;
            let load_ms = ms(t0);
            let (hw, times) = timed(runs, || {
                p.hyper_weights(get(hypernet_io::REFERENCE_LATENTS)?)
            })?;
            (
                BTreeMap::from([(hypernet_io::HYPER_WEIGHTS.to_string(), hw)]),
                load_ms,
                times,
            )
        }
        Stage::TextEncoder => {
            let e = engine
                .manifest
                .text_encoder
                .as_ref()
                .ok_or_else(|| engine.missing("text encoder", "text-encoder"))?;
            let mut m = v2l_runtime::session::Model::load(
                &engine.dir.join(&e.file),
                &engine.text_encoder_options(opts),
            )?;
            let load_ms = ms(t0);
            let mask = inputs.get("attention_mask").cloned();
            let feed = v2l_runtime::text::encoder_feed(&m, get(text_io::INPUT_IDS)?.clone(), mask);
            let (mut out, times) = timed(runs, || m.run(&feed))?;
            let embeds = out
                .remove(text_io::PROMPT_EMBEDS)
                .ok_or_else(|| RuntimeError::missing_output(&e.file, text_io::PROMPT_EMBEDS))?;
            (
                BTreeMap::from([(text_io::PROMPT_EMBEDS.to_string(), embeds)]),
                load_ms,
                times,
            )
        }
    };
    let mut sorted = runs_ms.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    Ok(StageRun {
        outputs,
        load_ms,
        run_ms: sorted.get(sorted.len() / 2).copied().unwrap_or(0.0),
        runs_ms,
    })
}
