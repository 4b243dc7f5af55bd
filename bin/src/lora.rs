//! `v2l-lora`'s subcommands: inspect and compare, convert, merge, predict and fuse LoRA files.

use std::path::{Path, PathBuf};
use v2l_contracts::io::hypernet as hypernet_io;

use clap::ValueEnum;
use v2l_runtime::lora::format::{self, Lora, LoraFormat};
use v2l_runtime::RuntimeError;

use crate::{check_output, same_file, Failure};

/// `--format`: a LoRA file format.
#[derive(Clone, Copy, ValueEnum)]
pub enum FormatArg {
    Diffusers,
    Kohya,
    Comfyui,
}

impl From<FormatArg> for LoraFormat {
    fn from(f: FormatArg) -> LoraFormat {
        match f {
            FormatArg::Diffusers => LoraFormat::Diffusers,
            FormatArg::Kohya => LoraFormat::Kohya,
            FormatArg::Comfyui => LoraFormat::ComfyUi,
        }
    }
}

/// `predict`'s arguments.
#[derive(clap::Args)]
pub struct PredictArgs {
    /// Engine bundle (from `v2l-compile`) or export directory (from `v2l-export`), with a
    /// DiT and a hypernetwork (and a VAE for --reference, a text encoder for --effect)
    #[arg(long)]
    pub engine: PathBuf,
    /// Reference clip: a video file (ffmpeg), a directory of PNGs, or a safetensors file
    /// with `reference_u8 [F, H, W, 3]`
    #[arg(long, required_unless_present_any = ["effect", "effect_embeds", "lofa"], conflicts_with_all = ["effect", "effect_embeds", "lofa"])]
    pub reference: Option<PathBuf>,
    #[command(flatten)]
    pub effects: crate::EffectArgs,
    /// Effect prompt for the LoFA hypernetwork (`--effect TEXT --hypernet lofa`)
    #[arg(long, value_name = "TEXT", conflicts_with_all = ["effect", "hypernet"])]
    pub lofa: Vec<String>,
    /// LoFA: pass stage 1's hidden states to stage 2 in f32, not rounded through fp16 as the
    /// authors' checkpoints were trained (off by default)
    #[arg(long)]
    pub no_fp16_prior: bool,
    /// Layers streamed through the hypernetwork per call (default: as many as fit 2 GiB of
    /// activations, at most 16: Prompt2Effect at paper size 1, LoFA at Wan-1.3B size 16)
    #[arg(long)]
    pub effect_chunk: Option<usize>,
    /// Output .safetensors LoRA file, replaced if it exists
    #[arg(short, long)]
    pub output: PathBuf,
    /// Use only the first N frames
    #[arg(long)]
    pub frames: Option<usize>,
    /// Generation height in pixels (default: the VAE config's sample_height)
    #[arg(long)]
    pub height: Option<usize>,
    /// Generation width in pixels (default: the VAE config's sample_width)
    #[arg(long)]
    pub width: Option<usize>,
    /// Video2LoRA LoRA weight w, as `v2l-run --lora-scale` (upstream uses it as multiplier
    /// and alpha: fuse scale w²); `--lora-weight` is the old spelling
    #[arg(
        long = "lora-scale",
        alias = "lora-weight",
        default_value_t = 1.0,
        allow_negative_numbers = true
    )]
    pub lora_weight: f32,
    /// Output format
    #[arg(long, value_enum, default_value = "diffusers")]
    pub format: FormatArg,
    /// Also write reference_latents and hyper_weights to this safetensors file
    #[arg(long)]
    pub dump: Option<PathBuf>,
}

/// `inspect`: each file's format, layers, ranks and alphas; with `compare`, how two LoRAs
/// relate layer by layer.
pub fn inspect_files(
    files: &[PathBuf],
    compare: bool,
    json: bool,
    model: Option<&Path>,
) -> Result<(), Failure> {
    let loras = files
        .iter()
        .map(|f| read(f, model))
        .collect::<Result<Vec<_>, _>>()?;
    match (compare, loras.as_slice()) {
        (true, [a, b]) => compare_loras(a, b, json),
        (true, _) => Err(Failure::usage(format!(
            "--compare takes two LoRA files, not {}",
            files.len()
        ))),
        (false, _) => loras.iter().try_for_each(|l| inspect(l, json)),
    }
}

/// `convert`: `input` rewritten to `output` in `format`, factors kept bitwise.
pub fn convert(
    input: &Path,
    output: &Path,
    format: LoraFormat,
    model: Option<&Path>,
) -> Result<(), Failure> {
    if same_file(input, output) {
        return Err(Failure::new(format!(
            "{}: the output is the input file; converting in place would lose it",
            output.display()
        ))
        .with_hint("write to another file, e.g. -o converted.safetensors"));
    }
    check_output(output, &["safetensors"])?;
    let lora = read(input, model)?;
    format::write(output, &lora, format).map_err(RuntimeError::from)?;
    println!(
        "wrote {} ({} layers, {})",
        output.display(),
        lora.layers.len(),
        format.name()
    );
    Ok(())
}

/// `predict`: a LoRA from a reference clip (Video2LoRA) or from effect prompts
/// (Prompt2Effect, LoFA), written to `-o`.
pub fn predict_command(args: PredictArgs) -> Result<(), Failure> {
    let PredictArgs {
        engine,
        reference,
        effects,
        lofa,
        no_fp16_prior,
        effect_chunk,
        output,
        frames,
        height,
        width,
        lora_weight,
        format,
        dump,
    } = args;
    v2l_runtime::limits::finite("--lora-scale", lora_weight)?;
    check_output(&output, &["safetensors"])?;
    if let Some(d) = &dump {
        check_output(d, &["safetensors"])?;
    }
    let mut outputs = vec![("-o", output.as_path())];
    outputs.extend(dump.as_deref().map(|d| ("--dump", d)));
    crate::check_outputs_outside_engine(&outputs, &engine)?;
    let Some(reference) = reference else {
        let hypernet = match lofa.is_empty() {
            true => effects.hypernet,
            false => Some(crate::HypernetArg::Lofa),
        };
        let prompts = [effects.effect, lofa].concat();
        let effects = crate::effects(&prompts, &effects.effect_embeds, &effects.effect_weights)?;
        return predict_effects(
            &engine,
            hypernet,
            !no_fp16_prior,
            &effects,
            effect_chunk,
            &output,
            format.into(),
        );
    };
    predict(
        &engine,
        &reference,
        &output,
        frames,
        height,
        width,
        lora_weight,
        format.into(),
        dump.as_deref(),
    )
}

/// `fuse`: a copy of the diffusers checkpoint `base` with `lora` fused into its weights at
/// `scale` (only LoFA's response map, |ΔW| > τ·|W|, with `response_tau`).
pub fn fuse(
    base: &Path,
    lora: &Path,
    scale: f32,
    response_tau: Option<f32>,
    output: &Path,
) -> Result<(), Failure> {
    v2l_runtime::limits::finite("--scale", scale)?;
    if let Some(t) = response_tau {
        if !(t.is_finite() && t >= 0.0) {
            return Err(Failure::usage(format!(
                "--response-tau {t}: must be a finite number ≥ 0"
            )));
        }
    }
    crate::check_not_in_an_engine(output)?;
    let modules = model_modules(base)?;
    let l = format::read(lora, Some(&modules)).map_err(RuntimeError::from)?;
    let (n, touched, entries) =
        crate::fuse_checkpoint::fuse_checkpoint(base, &l, scale, response_tau, lora, output)?;
    let share = 100.0 * touched as f64 / entries.max(1) as f64;
    println!(
        "wrote {} ({n} layers fused at scale {scale}; {touched} of their {entries} entries changed, {share:.2} %)",
        output.display()
    );
    Ok(())
}

/// Module paths of a model: from an export manifest or a diffusers checkpoint's 2-D weights.
fn model_modules(dir: &Path) -> Result<Vec<String>, Failure> {
    if dir.join(v2l_export::manifest::FILE_NAME).exists() {
        let m = v2l_export::Manifest::read(dir)?;
        if let Some(d) = m.dit {
            return Ok(d.lora_targets.into_iter().map(|t| t.name).collect());
        }
    }
    let ck = v2l_export::Checkpoint::open_dir(dir)?;
    Ok(crate::fuse_checkpoint::checkpoint_linears(&ck)
        .into_iter()
        .map(|t| t.name)
        .collect())
}

fn read(file: &Path, model: Option<&Path>) -> Result<Lora, Failure> {
    let modules = model.map(model_modules).transpose()?;
    format::read(file, modules.as_deref()).map_err(|e| {
        let hint = matches!(e, format::LoraError::UnresolvedKohya { .. })
            .then_some("kohya names drop the dots of module paths; pass --model <transformer dir> to resolve them");
        let f = Failure::from(RuntimeError::from(e));
        match hint {
            Some(h) => f.with_hint(h),
            None => f,
        }
    })
}

pub fn merge(
    files: &[PathBuf],
    weights: &[f32],
    equalize: Option<Option<f64>>,
    output: &Path,
    format: LoraFormat,
    model: Option<&Path>,
) -> Result<(), Failure> {
    use v2l_runtime::lora::merge;
    if !weights.is_empty() && weights.len() != files.len() {
        return Err(Failure::usage(format!(
            "--weights has {} values for {} LoRA files",
            weights.len(),
            files.len()
        )));
    }
    if let Some(f) = files.iter().find(|f| same_file(f, output)) {
        return Err(Failure::new(format!(
            "{}: the output is an input file; merging into it would lose it",
            f.display()
        )));
    }
    check_output(output, &["safetensors"])?;
    let loras = files
        .iter()
        .map(|f| read(f, model))
        .collect::<Result<Vec<_>, _>>()?;
    let weighted = loras
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let w = weights.get(i).copied().unwrap_or(1.0);
            v2l_runtime::limits::finite("--weights", w).map(|w| (l, w))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let merged = match equalize {
        None => merge::merge(&weighted)?,
        Some(target) => merge_equalized(&weighted, target)?,
    };
    format::write(output, &merged, format).map_err(RuntimeError::from)?;
    let rank: usize = merged.layers.iter().map(|l| l.rank()).max().unwrap_or(0);
    println!(
        "wrote {} ({} LoRAs, {} layers, rank up to {rank}, {})",
        output.display(),
        files.len(),
        merged.layers.len(),
        format.name()
    );
    Ok(())
}

/// `merge --equalize-norms`: each LoRA's weighted update scaled to `target` (default: the mean)
/// in each layer, the norms and factors printed, then the merge.
fn merge_equalized(weighted: &[(&Lora, f32)], target: Option<f64>) -> Result<Lora, Failure> {
    use v2l_runtime::lora::merge;
    use v2l_tools::lora_compare as compare;
    let eq = compare::equalize_norms(weighted, target)?;
    println!("{:<48} {:>10} norm → factor, per LoRA", "module", "target");
    for l in &eq {
        let per: Vec<String> = l
            .norms
            .iter()
            .zip(&l.factors)
            .map(|(n, f)| match (n, f) {
                (Some(n), Some(f)) => format!("{n:.4e} × {f:.4}"),
                _ => "-".into(),
            })
            .collect();
        println!("{:<48} {:>10.4e} {}", l.module, l.target, per.join("  "));
    }
    let merged = merge::merge_scaled(weighted, |module, i| {
        eq.iter()
            .find(|l| l.module == module)
            .and_then(|l| l.factors.get(i).copied().flatten())
            .unwrap_or(1.0)
    })?;
    Ok(merged)
}

/// `inspect --compare`: per shared layer, both update norms, their cosine and the overlap
/// of their column spaces (`v2l_tools::lora_compare`).
fn compare_loras(a: &Lora, b: &Lora, json: bool) -> Result<(), Failure> {
    use v2l_tools::lora_compare as compare;
    let mut rows = Vec::new();
    for x in &a.layers {
        let Some(y) = b.layers.iter().find(|y| y.module == x.module) else {
            continue;
        };
        if x.b.shape[0] != y.b.shape[0] || x.a.shape[1] != y.a.shape[1] {
            return Err(Failure::new(format!(
                "layer `{}`: the LoRAs disagree on its shape: [{}, {}] and [{}, {}]",
                x.module, x.b.shape[0], x.a.shape[1], y.b.shape[0], y.a.shape[1]
            )));
        }
        rows.push((
            x.module.clone(),
            compare::update_norm(x, 1.0),
            compare::update_norm(y, 1.0),
            compare::update_cosine(x, y),
            compare::subspace_overlap(x, y),
        ));
    }
    let only = |p: &Lora, q: &Lora| {
        p.layers
            .iter()
            .filter(|x| !q.layers.iter().any(|y| y.module == x.module))
            .count()
    };
    let mean = |f: fn(&(String, f64, f64, f64, f64)) -> f64| {
        rows.iter().map(f).sum::<f64>() / rows.len().max(1) as f64
    };
    let (mean_overlap, mean_cos) = (mean(|r| r.4), mean(|r| r.3.abs()));
    if json {
        let layers: Vec<_> = rows
            .iter()
            .map(|(m, na, nb, c, o)| {
                serde_json::json!({"module": m, "norm_a": na, "norm_b": nb, "cosine": c, "overlap": o})
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"shared_layers": rows.len(), "only_a": only(a, b), "only_b": only(b, a),
                "mean_overlap": mean_overlap, "mean_abs_cosine": mean_cos, "layers": layers})
        );
        return Ok(());
    }
    println!(
        "{:<48} {:>11} {:>11} {:>8} {:>8}",
        "module", "‖ΔW_a‖", "‖ΔW_b‖", "cosine", "overlap"
    );
    for (m, na, nb, c, o) in &rows {
        println!("{m:<48} {na:>11.4e} {nb:>11.4e} {c:>8.4} {o:>8.4}");
    }
    println!(
        "shared layers: {}  only in a: {}  only in b: {}  mean overlap: {mean_overlap:.4}  mean |cosine|: {mean_cos:.4}",
        rows.len(),
        only(a, b),
        only(b, a)
    );
    Ok(())
}

fn inspect(lora: &Lora, json: bool) -> Result<(), Failure> {
    let params: usize = lora
        .layers
        .iter()
        .map(|l| l.a.shape[0] * l.a.shape[1] + l.b.shape[0] * l.b.shape[1])
        .sum();
    if json {
        let layers: Vec<_> = lora
            .layers
            .iter()
            .map(|l| {
                serde_json::json!({"module": l.module, "rank": l.rank(), "alpha": l.alpha, "in_features": l.a.shape[1],
                    "out_features": l.b.shape[0], "dtype": l.a.dtype.name()})
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"format": lora.format.name(), "parameters": params, "layers": layers})
        );
        return Ok(());
    }
    println!(
        "format: {}  layers: {}  parameters: {params}",
        lora.format.name(),
        lora.layers.len()
    );
    println!(
        "{:<48} {:>5} {:>8} {:>7} {:>7} {:>6}",
        "module", "rank", "alpha", "in", "out", "dtype"
    );
    for l in &lora.layers {
        println!(
            "{:<48} {:>5} {:>8} {:>7} {:>7} {:>6}",
            l.module,
            l.rank(),
            l.alpha,
            l.a.shape[1],
            l.b.shape[0],
            l.a.dtype.name()
        );
    }
    Ok(())
}

/// `predict --effect`: the blended Prompt2Effect LoRA of `effects`, written to `output`.
fn predict_effects(
    engine: &Path,
    hypernet: Option<crate::HypernetArg>,
    fp16_prior: bool,
    effects: &[(v2l_runtime::effect::Effect, f32)],
    chunk: Option<usize>,
    output: &Path,
    format: LoraFormat,
) -> Result<(), Failure> {
    let dir = v2l_runtime::engine::Engine::open(engine)?;
    let which = crate::hypernet(&dir, hypernet)?;
    let opts = dir.session_options(0);
    let start = std::time::Instant::now();
    let lora = v2l_runtime::effect::predict_effects(
        &dir,
        which,
        fp16_prior,
        &opts,
        effects,
        chunk,
        &mut |n, t| eprint!("\rpredicting: {n}/{t} layers"),
    )?;
    eprintln!();
    format::write(output, &lora, format).map_err(RuntimeError::from)?;
    println!(
        "wrote {} ({} effects, {} layers, rank {}, {:.2} s)",
        output.display(),
        effects.len(),
        lora.layers.len(),
        lora.layers.first().map(|l| l.rank()).unwrap_or(0),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn predict(
    engine: &Path,
    reference: &Path,
    output: &Path,
    frames: Option<usize>,
    height: Option<usize>,
    width: Option<usize>,
    lora_weight: f32,
    format: LoraFormat,
    dump: Option<&Path>,
) -> Result<(), Failure> {
    use v2l_runtime::engine::Engine;
    if let (Some(h), Some(w)) = (height, width) {
        v2l_runtime::limits::Limits::from_env()?.check_frame_size(h, w, 16)?;
    }
    let dir = Engine::open(engine)?;
    let cfg = dir.manifest.vae.as_ref().map(|v| &v.config);
    let size = |v: Option<usize>, key: &str| {
        v.or_else(|| {
            cfg.and_then(|c| c.get(key))
                .and_then(|x| x.as_u64())
                .map(|x| x as usize)
        })
    };
    let (h, w) = match (size(height, "sample_height"), size(width, "sample_width")) {
        (Some(h), Some(w)) => (h, w),
        _ => {
            return Err(Failure::new("no generation size in the VAE config")
                .with_hint("pass --height and --width"))
        }
    };
    // The generation's rules (v2l-run refuses the same sizes), and the clip itself, checked
    // before any session is built.
    let limits = v2l_runtime::limits::Limits::from_env()?;
    limits.check_frame_size(h, w, 16)?;
    let mut clip = v2l_runtime::video::read_reference(reference, dir.pipeline_kind()?, h, w)?;
    if let Some(n) = frames {
        clip.truncate(n);
    }
    v2l_runtime::predict::check_reference(&clip, &reference.display().to_string())?;
    if let Some(warning) = v2l_runtime::video::aspect_warning(reference, h, w) {
        eprintln!("warning: {warning}");
    }
    let opts = dir.session_options(0);
    let mut vae = v2l_runtime::vae::Vae::load(&dir, &opts)?;
    let mut predictor = v2l_runtime::predict::Predictor::load(&dir, &opts)?;
    let p = predictor.predict(&mut vae, &clip, lora_weight)?;
    format::write(output, &p.lora, format).map_err(RuntimeError::from)?;
    if let Some(d) = dump {
        let m = std::collections::BTreeMap::from([
            (
                hypernet_io::REFERENCE_LATENTS.to_string(),
                p.reference_latents,
            ),
            (hypernet_io::HYPER_WEIGHTS.to_string(), p.hyper_weights),
        ]);
        v2l_runtime::write_safetensors(d, &m)?;
    }
    println!(
        "wrote {} ({} layers, rank {}, {} frames of {h}x{w})",
        output.display(),
        p.lora.layers.len(),
        p.lora.layers.first().map(|l| l.rank()).unwrap_or(0),
        clip.frames
    );
    Ok(())
}
