//! Export directories: each part (DiT, VAE, text encoder, image encoder, hypernetworks) written
//! into a directory with its `manifest.json` entry, and a whole diffusers pipeline directory
//! exported into a staging directory and moved in only when every part succeeded.
//!
//! What the exporter cannot check itself (whether the runtime reads the scheduler config, the
//! tokenizer, the image processor and the LiLoRA file it copies) comes from the caller through
//! [`PartChecks`], so this crate does not link the runtime. `v2l-export` and the tests use
//! `v2l_tools::ExportChecks`.

use std::path::Path;

use v2l_contracts::{Family, LinearInfo, Manifest, PipelineKind};
use v2l_graphs::{DType, ExternalData};

use crate::error::{ExportError, Result};
use crate::{cogvideox_dit, video2lora_hypernet, Checkpoint};

/// Where an export writes, and who hears about it.
#[derive(Clone, Copy)]
pub struct Output<'a> {
    /// The export directory (created if missing; each part adds its graphs to it).
    pub output: &'a Path,
    /// Weights in a side file `<model>.onnx.data` (`Auto`: above 64 MiB).
    pub external_data: ExternalData,
    /// Where the files end up when `output` is a staging directory (messages name this).
    pub shown_as: Option<&'a Path>,
    /// A line for the user on what was written.
    pub say: &'a dyn Fn(&str),
    /// A warning (checkpoint tensors the graph does not use).
    pub warn: &'a dyn Fn(&str),
    pub checks: &'a dyn PartChecks,
}

impl Output<'_> {
    /// `file` as the user will find it.
    fn shown(&self, file: &str) -> String {
        self.shown_as
            .unwrap_or(self.output)
            .join(file)
            .display()
            .to_string()
    }
}

/// The runtime's readers of the parts an export copies, supplied by the caller: each returns
/// what is wrong in words that name the file, or for the LiLoRA file its sizes.
pub trait PartChecks {
    /// A diffusers `scheduler_config.json` the runtime's sampler for `family` reads.
    fn scheduler(&self, family: Family, config: &Path) -> std::result::Result<(), String>;
    /// A tokenizer directory that loads and gives ids below `vocab_size`.
    fn tokenizer(&self, dir: &Path, vocab_size: usize) -> std::result::Result<(), String>;
    /// A CLIP `preprocessor_config.json`.
    fn image_processor(&self, config: &Path) -> std::result::Result<(), String>;
    /// A LiLoRA auxiliary file for `linears`: its sizes.
    fn lilora(
        &self,
        file: &Path,
        linears: &[LinearInfo],
    ) -> std::result::Result<LiLoraSizes, String>;
}

/// A LiLoRA file's sizes: the down and up auxiliaries' widths and its layer count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LiLoraSizes {
    pub a: usize,
    pub b: usize,
    pub layers: usize,
}

fn prepare_dir(dir: &Path) -> Result<Manifest> {
    std::fs::create_dir_all(dir)
        .map_err(|e| ExportError::Part(format!("cannot create {}: {e}", dir.display())))?;
    Ok(Manifest::read_or_default(dir)?)
}

fn warn_unused(out: &Output, keys: &[String]) {
    if !keys.is_empty() {
        (out.warn)(&format!(
            "{} checkpoint tensors were not used: {}",
            keys.len(),
            keys.join(", ")
        ));
    }
}

pub fn dit(checkpoint: &Path, out: &Output, weight_dtype: DType) -> Result<()> {
    let ck = Checkpoint::open_dir(checkpoint)?;
    let ex = crate::dit::export(&ck, weight_dtype)?;
    warn_unused(out, &ex.unused_keys);
    let mut manifest = prepare_dir(&out.output)?;
    let file = "dit.onnx";
    let written = v2l_graphs::save(&ex.graph, &out.output.join(file), out.external_data.into())?;
    manifest.dit = Some(ex.manifest_entry(file));
    manifest.write(&out.output)?;
    (out.say)(&format!(
        "wrote {} ({}, {} layers, {} LoRA-targetable linears, {} of {} weights{})",
        out.shown(file),
        ex.class_name,
        ex.num_layers,
        ex.linears.len(),
        bytes(written.weight_bytes),
        weight_dtype,
        if written.data.is_some() {
            ", external data"
        } else {
            ""
        }
    ));
    Ok(())
}

pub fn vae(checkpoint: &Path, out: &Output) -> Result<()> {
    vae_for(checkpoint, None, out)
}

/// [`vae`] for the pipeline `kind` that decodes with it (VideoX-Fun's has its own decode loop).
fn vae_for(checkpoint: &Path, kind: Option<PipelineKind>, out: &Output) -> Result<()> {
    let ck = Checkpoint::open_dir(checkpoint)?;
    let ex = crate::vae::export_for(&ck, kind)?;
    warn_unused(out, &ex.unused_keys);
    let mut manifest = prepare_dir(&out.output)?;
    let (enc, dec) = ("vae_encoder.onnx", "vae_decoder.onnx");
    let we = v2l_graphs::save(&ex.encoder, &out.output.join(enc), out.external_data.into())?;
    let wd = v2l_graphs::save(&ex.decoder, &out.output.join(dec), out.external_data.into())?;
    manifest.vae = Some(ex.manifest_entry(enc, dec));
    manifest.write(&out.output)?;
    let (ce, cd) = ex.cache_counts();
    (out.say)(&format!(
        "wrote {} and {} ({}: {} + {} of f32 weights; {ce} + {cd} causal-conv caches)",
        out.shown(enc),
        out.shown(dec),
        ex.class_name,
        bytes(we.weight_bytes),
        bytes(wd.weight_bytes),
    ));
    Ok(())
}

pub fn text_encoder(
    checkpoint: &Path,
    tokenizer: Option<&Path>,
    out: &Output,
    weight_dtype: DType,
) -> Result<()> {
    let ck = Checkpoint::open_dir(checkpoint)?;
    let ex = crate::t5_encoder::export(&ck, (weight_dtype != DType::F32).then_some(weight_dtype))?;
    warn_unused(out, &ex.unused_keys);
    let mut manifest = prepare_dir(&out.output)?;
    let file = "text_encoder.onnx";
    let written = v2l_graphs::save(&ex.graph, &out.output.join(file), out.external_data.into())?;
    let tokenizer_dir = match tokenizer {
        Some(t) => copy_tokenizer(t, out, ex.config.vocab_size)?,
        None => String::new(),
    };
    manifest.text_encoder = Some(crate::manifest::TextEncoderEntry {
        file: file.into(),
        model_type: ex.config.model_type.clone(),
        d_model: ex.config.d_model,
        vocab_size: ex.config.vocab_size,
        tokenizer: tokenizer_dir,
        weight_dtype,
        config: ck.raw_config()?.clone(),
    });
    manifest.write(&out.output)?;
    (out.say)(&format!(
        "wrote {} ({} encoder, {} layers, d_model {}, {} of {} weights)",
        out.shown(file),
        ex.config.model_type,
        ex.config.num_layers,
        ex.config.d_model,
        bytes(written.weight_bytes),
        weight_dtype
    ));
    Ok(())
}

pub fn image_encoder(checkpoint: &Path, out: &Output, weight_dtype: DType) -> Result<()> {
    let ck = Checkpoint::open_dir(checkpoint)?;
    let ex = crate::clip_vision::export(&ck, (weight_dtype != DType::F32).then_some(weight_dtype))?;
    // The last layer and post_layernorm are unused by design (Wan takes hidden_states[-2]).
    let mut manifest = prepare_dir(&out.output)?;
    let file = "image_encoder.onnx";
    let written = v2l_graphs::save(&ex.graph, &out.output.join(file), out.external_data.into())?;
    // A diffusers pipeline keeps the encoder's image processor beside it (`image_processor/`):
    // checked and copied, so the runtime preprocesses first frames as the pipeline does.
    let processor = checkpoint
        .parent()
        .map(|p| p.join("image_processor").join("preprocessor_config.json"))
        .filter(|p| p.is_file());
    let preprocessor = match processor {
        Some(src) => {
            out.checks
                .image_processor(&src)
                .map_err(ExportError::Part)?;
            let rel = "image_processor/preprocessor_config.json";
            let dst = out.output.join(rel);
            let copied = dst
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|_| std::fs::copy(&src, &dst));
            copied.map_err(|e| ExportError::Part(format!("{}: {e}", dst.display())))?;
            rel.to_string()
        }
        None => String::new(),
    };
    manifest.image_encoder = Some(crate::manifest::ImageEncoderEntry {
        file: file.into(),
        model_type: ex.config.model_type.clone(),
        hidden_size: ex.config.hidden_size,
        image_size: ex.config.image_size,
        weight_dtype,
        preprocessor,
        config: ck.raw_config()?.clone(),
    });
    manifest.write(&out.output)?;
    (out.say)(&format!(
        "wrote {} (CLIP vision, {} of {} layers: the penultimate hidden states; {} of {} weights)",
        out.shown(file),
        ex.config.num_hidden_layers - 1,
        ex.config.num_hidden_layers,
        bytes(written.weight_bytes),
        weight_dtype
    ));
    Ok(())
}

/// Checks the tokenizer in `src` (it loads, and its ids fit the encoder's `vocab_size`) and
/// copies its files to `<out>/tokenizer/`. Returns that subdirectory's name.
fn copy_tokenizer(src: &Path, out: &Output, vocab_size: usize) -> Result<String> {
    out.checks
        .tokenizer(src, vocab_size)
        .map_err(ExportError::Part)?;
    let name = "tokenizer";
    let dir = out.output.join(name);
    std::fs::create_dir_all(&dir)
        .map_err(|e| ExportError::Part(format!("cannot create {}: {e}", dir.display())))?;
    for f in TOKENIZER_FILES {
        let from = src.join(f);
        if from.is_file() {
            std::fs::copy(&from, dir.join(f))
                .map_err(|e| ExportError::Part(format!("{}: {e}", from.display())))?;
        }
    }
    Ok(name.into())
}

/// The files of a tokenizer directory v2l reads (the rest is not needed).
const TOKENIZER_FILES: [&str; 4] = [
    "spiece.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
];

pub fn hypernet(
    checkpoint: &Path,
    lilora: &Path,
    dit: &Path,
    iterations: usize,
    out: &Output,
) -> Result<()> {
    let ck = Checkpoint::open_file(checkpoint)?;
    let ex =
        video2lora_hypernet::export(&ck, &video2lora_hypernet::HypernetOptions { iterations })?;
    warn_unused(out, &ex.unused_keys);
    let linears = cogvideox_dit::export(&Checkpoint::open_dir(dit)?, &Default::default())?.linears;
    let aux = out
        .checks
        .lilora(lilora, &linears)
        .map_err(ExportError::Part)?;
    let d = &ex.dims;
    if d.num_layers != aux.layers {
        return Err(ExportError::Part(format!(
            "{}: the hypernetwork predicts {} rows, but {} has {} layers (one per nn.Linear of the DiT)",
            checkpoint.display(),
            d.num_layers,
            lilora.display(),
            aux.layers
        )));
    }
    if d.weight_dim % (aux.a + aux.b) != 0 {
        return Err(ExportError::Part(format!(
            "{}: rows of width {} are not a multiple of the LiLoRA a + b = {} + {}",
            checkpoint.display(),
            d.weight_dim,
            aux.a,
            aux.b
        )));
    }
    let mut manifest = prepare_dir(&out.output)?;
    let file = "hypernet.onnx";
    let written = v2l_graphs::save(&ex.graph, &out.output.join(file), out.external_data.into())?;
    let lilora_name = "lilora.safetensors";
    let dst = out.output.join(lilora_name);
    if std::fs::canonicalize(lilora).ok() != std::fs::canonicalize(&dst).ok() {
        let copy = || -> std::io::Result<()> {
            let mut tmp = v2l_contracts::atomic::temp_sibling(&dst, ".tmp")?;
            std::io::copy(&mut std::fs::File::open(lilora)?, &mut tmp)?;
            tmp.persist(&dst)
        };
        copy().map_err(|e| ExportError::Part(format!("{}: {e}", dst.display())))?;
    }
    manifest.hypernet = Some(crate::manifest::HypernetEntry {
        file: file.into(),
        dims: ex.dims.clone(),
        lilora: lilora_name.into(),
        lilora_a: aux.a,
        lilora_b: aux.b,
        layers: linears.iter().map(|l| l.name.clone()).collect(),
    });
    manifest.write(&out.output)?;
    let encoder = match &d.context_encoder {
        Some(c) => format!(
            ", a context encoder (width {}, reference grid {}×{}×{})",
            c.hidden, c.grid[0], c.grid[1], c.grid[2]
        ),
        None => String::new(),
    };
    (out.say)(&format!(
        "wrote {} ({} rows of width {}, {} heads, {} blocks, {} iterations{encoder}; {} of weights) and {}",
        out.shown(file),
        d.num_layers,
        d.weight_dim,
        d.heads,
        d.blocks,
        d.iterations,
        bytes(written.weight_bytes),
        out.shown(lilora_name)
    ));
    Ok(())
}

pub fn prompt2effect(checkpoint: &Path, out: &Output) -> Result<()> {
    let ck = Checkpoint::open_dir(checkpoint)?;
    let ex = crate::prompt2effect::export(&ck)?;
    warn_unused(out, &ex.unused_keys);
    let mut manifest = prepare_dir(&out.output)?;
    let file = "prompt2effect.onnx";
    let written = v2l_graphs::save(&ex.graph, &out.output.join(file), out.external_data.into())?;
    let c = &ex.config;
    manifest.prompt2effect = Some(crate::manifest::Prompt2EffectEntry {
        file: file.into(),
        text_dim: c.text_dim,
        weight_dim: c.weight_dim,
        rank: c.rank,
        hidden_dim: c.hidden_dim,
        max_layers: c.max_layers,
        module_types: c.module_specs.clone(),
    });
    manifest.write(&out.output)?;
    (out.say)(&format!(
        "wrote {} (text width {}, {}×{} weights, rank {}, {} blocks of width {}, {} module types; {} of weights)",
        out.shown(file),
        c.text_dim,
        c.weight_dim,
        c.weight_dim,
        c.rank,
        c.n_layer,
        c.hidden_dim,
        c.module_specs.len(),
        bytes(written.weight_bytes)
    ));
    Ok(())
}

pub fn lofa(stage1: &Path, stage2: &Path, out: &Output) -> Result<()> {
    use crate::lofa;
    let (c1, c2) = (Checkpoint::open_dir(stage1)?, Checkpoint::open_dir(stage2)?);
    let (one, two) = lofa::export_pair(&c1, &c2)?;
    // Stage 1's heads make its training-time response map, unused at inference.
    let unused: Vec<String> = one
        .unused_keys
        .iter()
        .filter(|k| !k.starts_with("head_"))
        .chain(&two.unused_keys)
        .cloned()
        .collect();
    warn_unused(out, &unused);
    let mut manifest = prepare_dir(&out.output)?;
    let (f1, f2) = ("lofa_stage1.onnx", "lofa_stage2.onnx");
    let w1 = v2l_graphs::save(&one.graph, &out.output.join(f1), out.external_data.into())?;
    let w2 = v2l_graphs::save(&two.graph, &out.output.join(f2), out.external_data.into())?;
    let c = &two.config;
    manifest.lofa = Some(crate::manifest::LofaEntry {
        stage1: f1.into(),
        stage2: f2.into(),
        text_dim: c.context_dim,
        weight_dim: c.in_dim,
        rank: c.lora_rank,
        d_model: c.d_model,
        tokens: c.tokens(),
        num_depth: c.num_depth,
        module_types: lofa::VALID_LAYERS
            .iter()
            .take(c.num_type)
            .map(|s| s.to_string())
            .collect(),
    });
    manifest.write(&out.output)?;
    (out.say)(&format!(
        "wrote {} and {} (text width {}, {}×{} weights in {} tokens, rank {}, {} blocks of width {}; {} + {} of weights)",
        out.shown(f1),
        out.shown(f2),
        c.context_dim,
        c.in_dim,
        c.in_dim,
        c.tokens(),
        c.lora_rank,
        c.n_blocks,
        c.d_model,
        bytes(w1.weight_bytes),
        bytes(w2.weight_bytes)
    ));
    Ok(())
}

pub fn pipeline(
    model: &Path,
    hypernet_file: Option<&Path>,
    lilora: Option<&Path>,
    iterations: usize,
    weight_dtype: DType,
    out: &Output,
) -> Result<()> {
    let sched = model.join("scheduler").join("scheduler_config.json");
    if !sched.is_file() {
        return Err(ExportError::Part(format!(
            "{}: missing (a diffusers pipeline directory has scheduler/scheduler_config.json)",
            sched.display()
        )));
    }
    // The sampler's config is checked now, not at the first generation: Wan pipelines ship
    // flow samplers, CogVideoX DDIM.
    let transformer = Checkpoint::open_dir(&model.join("transformer"))?;
    let kind = pipeline_kind(model, transformer.raw_config()?)?;
    out.checks
        .scheduler(kind.family(), &sched)
        .map_err(ExportError::Part)?;
    drop(transformer);
    // Every part is written to a staging directory beside the output and moved in only when
    // all succeeded: a failed export leaves nothing a later `v2l-compile` would accept.
    let parent = out
        .output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)
        .map_err(|e| ExportError::Part(format!("cannot create {}: {e}", parent.display())))?;
    remove_abandoned_staging(parent);
    let staging = tempfile::Builder::new()
        .prefix(&format!("{STAGING_PREFIX}{}-", std::process::id()))
        .tempdir_in(parent)
        .map_err(|e| {
            ExportError::Part(format!(
                "cannot create a staging directory in {}: {e}",
                parent.display()
            ))
        })?;
    // Removed on a signal too (the CLIs' Ctrl-C), not only by the next export.
    let listed = v2l_contracts::atomic::list_partial(staging.path());
    let stage = Output {
        output: staging.path(),
        shown_as: Some(out.output),
        ..*out
    };
    // An existing manifest (other parts exported before) carries over.
    if let Ok(m) = Manifest::read(&out.output) {
        m.write(&stage.output)?;
    }
    dit(&model.join("transformer"), &stage, weight_dtype)?;
    vae_for(&model.join("vae"), Some(kind), &stage)?;
    // The prompt encoder, when the pipeline directory has one.
    if model.join("text_encoder").join("config.json").is_file() {
        let tok = model.join("tokenizer");
        text_encoder(
            &model.join("text_encoder"),
            tok.is_dir().then_some(tok.as_path()),
            &stage,
            weight_dtype,
        )?;
    }
    // Wan I2V's CLIP vision encoder, when the pipeline has one.
    if model.join("image_encoder").join("config.json").is_file() {
        image_encoder(&model.join("image_encoder"), &stage, weight_dtype)?;
    }
    if let (Some(h), Some(l)) = (hypernet_file, lilora) {
        hypernet(h, l, &model.join("transformer"), iterations, &stage)?;
    }
    let name = "scheduler_config.json";
    std::fs::copy(&sched, stage.output.join(name))
        .map_err(|e| ExportError::Part(format!("{}: {e}", stage.output.join(name).display())))?;
    let mut manifest = Manifest::read_or_default(&stage.output)?;
    manifest.scheduler = Some(name.into());
    manifest.pipeline = Some(kind);
    manifest.write(&stage.output)?;
    // The renames into place under the list's lock: a signal's clean-up never removes a
    // staging directory half published.
    listed.settle(|| publish(staging, out.output))?;
    (out.say)(&format!("wrote {}", out.output.join(name).display()));
    Ok(())
}

/// The pipeline a model directory deploys, from its transformer's class and input channels
/// and its VAE's latent channels (the rule of VideoX-Fun's `predict_i2v.py`): an unknown class
/// or channel count is an error naming it.
fn pipeline_kind(model: &Path, transformer: &serde_json::Value) -> Result<PipelineKind> {
    let config = model.join("transformer").join("config.json");
    let unsupported = |what: String| ExportError::Unsupported {
        path: config.clone(),
        what,
    };
    let class = transformer
        .get("_class_name")
        .and_then(|v| v.as_str())
        .unwrap_or_default();
    let family = Family::of_dit_class(class)
        .ok_or_else(|| unsupported(format!("transformer class `{class}`")))?;
    let int =
        |v: &serde_json::Value, key: &str| v.get(key).and_then(|x| x.as_u64()).map(|x| x as usize);
    // Both families' transformers and VAEs default to 16 channels in diffusers.
    let in_channels = int(transformer, "in_channels").unwrap_or(16);
    let vae_config = model.join("vae").join("config.json");
    let vae = v2l_contracts::input::read_text(&vae_config, v2l_contracts::input::InputKind::Record)
        .map_err(|e| ExportError::Part(format!("{}: {e}", vae_config.display())))?;
    let vae: serde_json::Value = serde_json::from_str(&vae)
        .map_err(|e| ExportError::Part(format!("{}: {e}", vae_config.display())))?;
    let latent = int(&vae, "latent_channels")
        .or_else(|| int(&vae, "z_dim"))
        .unwrap_or(16);
    PipelineKind::detect(family, in_channels, latent).map_err(unsupported)
}

/// Staging directories are `.v2l-export-<pid>-<random>`: the pid says whose they are.
const STAGING_PREFIX: &str = ".v2l-export-";

/// Removes staging directories in `parent` left by an export that was killed (its process is
/// gone, as `/proc` tells; elsewhere nothing is removed). A running export's are kept.
fn remove_abandoned_staging(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(STAGING_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let proc = Path::new("/proc");
        if proc.is_dir() && !proc.join(pid.to_string()).exists() && e.path().is_dir() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Moves a finished staging directory's files into `out` (created if missing), the manifest
/// last, so `out` only ever holds a complete export.
fn publish(staging: tempfile::TempDir, out: &Path) -> Result<()> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |e: std::io::Error| ExportError::Part(format!("{}: {e}", p.display()))
    };
    if !out.exists() {
        let src = staging.keep();
        return std::fs::rename(&src, out).map_err(io(out));
    }
    let manifest = crate::manifest::FILE_NAME;
    let mut names: Vec<std::ffi::OsString> = std::fs::read_dir(staging.path())
        .map_err(io(staging.path()))?
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .filter(|n| n != manifest)
        .collect();
    names.push(manifest.into());
    for n in names {
        let (from, to) = (staging.path().join(&n), out.join(&n));
        // A directory part (the tokenizer) replaces the one an earlier export left.
        if from.is_dir() && to.is_dir() {
            std::fs::remove_dir_all(&to).map_err(io(&to))?;
        }
        std::fs::rename(&from, &to).map_err(io(&to))?;
    }
    Ok(())
}

/// Human-readable byte count.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    match UNITS.get(u) {
        Some(unit) if u > 0 => format!("{v:.1} {unit}"),
        _ => format!("{n} B"),
    }
}
