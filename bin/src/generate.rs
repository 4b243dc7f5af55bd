//! `v2l-run` generation: the flags, mapped onto the runtime's request contract
//! ([`v2l_runtime::request`]), and the outputs written.

use std::path::PathBuf;

use clap::ValueEnum;
use v2l_contracts::io::files as files_io;
use v2l_contracts::io::hypernet as hypernet_io;
use v2l_runtime::engine::Engine;
use v2l_runtime::lora::AppliedLora;
use v2l_runtime::pipeline::{LoraInput, MediaInput, NoiseInput, Pipeline, PromptInput};
use v2l_runtime::request::{self, Settings};
use v2l_runtime::stages::ms_since;
use v2l_runtime::{write_safetensors, SessionOptions};

use crate::{check_output, Failure};

/// The generation flags.
#[derive(clap::Args)]
pub struct GenerateArgs {
    /// First frame (PNG or anything ffmpeg reads), resized to --width x --height (not for
    /// text-to-video engines)
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Wan I2V: safetensors with `image_embeds` [1, tokens, image_dim], the first frame's
    /// CLIP vision tokens (penultimate layer, as `WanImageToVideoPipeline.encode_image`);
    /// default: computed from --image by the engine's image encoder
    #[arg(long)]
    pub image_embeds: Option<PathBuf>,
    /// Prompt text, encoded by the engine's tokenizer and T5 text encoder
    #[arg(long, conflicts_with = "prompt_embeds")]
    pub prompt: Option<String>,
    /// Negative prompt text (default: empty, as diffusers)
    #[arg(long, requires = "prompt")]
    pub negative_prompt: Option<String>,
    /// Prompt tokens (padded or truncated to this; default: the DiT's max_text_seq_length)
    #[arg(long, global = true)]
    pub max_sequence_length: Option<usize>,
    /// safetensors with `prompt_embeds` and `negative_prompt_embeds` [1, L, D], instead of
    /// --prompt
    #[arg(long)]
    pub prompt_embeds: Option<PathBuf>,
    /// Reference clip (mp4, a directory of PNGs, or safetensors `reference_u8 [F,H,W,3]`)
    #[arg(long, conflicts_with_all = ["effect", "effect_embeds"])]
    pub reference: Option<PathBuf>,
    /// A LoRA file to generate with instead of a reference clip (diffusers/PEFT, kohya or
    /// ComfyUI); repeat it for several, merged exactly (rank concatenation)
    #[arg(long = "lora", value_name = "FILE", conflicts_with_all = ["reference", "effect", "effect_embeds"])]
    pub loras: Vec<PathBuf>,
    #[command(flatten)]
    pub effects: crate::EffectArgs,
    /// Multiplier of each --lora, comma-separated, in order (default: 1 each)
    #[arg(
        long,
        value_name = "W,W,...",
        value_delimiter = ',',
        allow_negative_numbers = true,
        requires = "loras"
    )]
    pub lora_weights: Vec<f32>,
    /// Frames to generate, 1 + 4k (default: the model's sample_frames)
    #[arg(long)]
    pub frames: Option<usize>,
    /// Height in pixels (default: the VAE config's sample_height)
    #[arg(long)]
    pub height: Option<usize>,
    /// Width in pixels (default: the VAE config's sample_width)
    #[arg(long)]
    pub width: Option<usize>,
    /// Denoising steps
    #[arg(long, default_value_t = request::DEFAULT_STEPS)]
    pub steps: usize,
    /// Classifier-free guidance scale
    #[arg(long, default_value_t = request::DEFAULT_GUIDANCE, allow_negative_numbers = true)]
    pub guidance: f32,
    /// Seed of v2l's Gaussian noise (the same seed gives the same video); generation needs
    /// --seed or --noise. With --noise it seeds only what the file does not hold (a Fun-InP
    /// model's augmentation noise, the dpm sampler's step noise)
    #[arg(long)]
    pub seed: Option<u64>,
    /// safetensors with `initial_noise [1, f, 16, h, w]` (e.g. torch's, for exact comparisons);
    /// for a CogVideoX-Fun-InP engine it may also hold `inpaint_noise [1, 3, F, H, W]`, the
    /// conditioning clip's augmentation noise as upstream adds it
    #[arg(long)]
    pub noise: Option<PathBuf>,
    /// Sampler of a CogVideoX engine: `ddim` (diffusers' DDIMScheduler, VideoX-Fun's
    /// DDIM_Origin; the default for CogVideoX-Fun-InP engines), `cogvideox-ddim`
    /// (CogVideoXDDIMScheduler; the default for diffusers' CogVideoX I2V) or `dpm`
    /// (CogVideoXDPMScheduler, for fewer steps; its step noise comes from --seed). Wan engines
    /// use their flow sampler
    #[arg(long, value_name = "NAME")]
    pub scheduler: Option<v2l_runtime::pipeline::Sampler>,
    /// Step caching, off by default. `first-block:THRESHOLD` is diffusers' First Block Cache
    /// (`apply_first_block_cache`): every step runs the DiT's first block, and the other blocks
    /// only when the first block's residual changed by more than THRESHOLD (relative mean
    /// absolute change) since they last ran; otherwise their last residual is reused. Higher
    /// skips more. On the demo model at 20 steps, 0.1 skips 9 of 20 DiT calls, 0.2 skips 13.
    /// --json reports `dit_calls` and `cache_skips`. Under guidance, CogVideoX decides once
    /// for both prompts and Wan once per prompt, as diffusers' pipelines do
    #[arg(long, value_name = "METHOD:THRESHOLD")]
    pub cache: Option<v2l_runtime::step_cache::StepCache>,
    /// Sample the VAE posterior with this seed (first frame and reference) instead of its mode
    #[arg(long)]
    pub posterior_seed: Option<u64>,
    /// How the LoRA reaches the DiT: fused (session rebuilt with fused weights), bound (fused
    /// weights bound as inputs), unfused (low-rank branch); default: the engine's
    #[arg(long)]
    pub lora_strategy: Option<String>,
    /// Video2LoRA LoRA weight w (upstream passes it as multiplier and alpha: scale w²)
    #[arg(long, default_value_t = 1.0)]
    pub lora_scale: f32,
    /// Output .mp4 file, replaced if it exists (a contact sheet .png is written beside it)
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Also write intermediates (reference_latents, hyper_weights, latents_step{i}, frames)
    #[arg(long)]
    pub dump: Option<PathBuf>,
    /// Frames per second of the mp4
    #[arg(long, default_value_t = 8)]
    pub fps: u32,
    /// Tile the VAE spatially as diffusers' enable_tiling() does: `on` whenever a frame is
    /// larger than a tile (half the VAE's sample size), `auto` likewise above 256x384 pixels on
    /// the CPU (real resolutions; memory bounded by one tile) and above 480x832 on a GPU with
    /// 64 GiB or more (480p decodes whole, as diffusers does), `off` never
    #[arg(long, value_enum, default_value = "auto", global = true)]
    pub vae_tiling: TilingArg,
    /// No progress bar
    #[arg(long)]
    pub quiet: bool,
    /// Print a JSON summary (timings per stage, output paths) on stdout
    #[arg(long)]
    pub json: bool,
    /// Also measure each stage's own peak RSS (text encode, load, reference encode,
    /// hypernetwork, LoRA, each DiT step, VAE decode) into the --json summary. It resets the
    /// kernel's per-process high-water mark between stages; for benchmarks
    #[arg(long, requires = "json")]
    pub stage_memory: bool,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum TilingArg {
    Auto,
    On,
    Off,
}

impl From<TilingArg> for v2l_runtime::vae::TilingMode {
    fn from(t: TilingArg) -> Self {
        match t {
            TilingArg::Auto => Self::Auto,
            TilingArg::On => Self::On,
            TilingArg::Off => Self::Off,
        }
    }
}

fn need<'a, T>(v: &'a Option<T>, flag: &str) -> Result<&'a T, Failure> {
    v.as_ref().ok_or_else(|| {
        Failure::usage(format!("{flag} is required to generate")).with_hint("see `v2l-run --help`")
    })
}

/// `v2l-run` without a subcommand: the flags become the runtime's [`Settings`] and [`Inputs`], and the one request
/// builder (`Inputs::build`, shared with the C ABI and the server) checks and reads them; this
/// function maps flags and writes outputs.
pub fn run(
    engine: &std::path::Path,
    g: &GenerateArgs,
    opts: &SessionOptions,
    device: u32,
) -> Result<(), Failure> {
    use v2l_runtime::pipeline::{Inputs, PromptEncoders};
    let output = need(&g.output, "-o/--output")?;
    check_generate_paths(engine, g, output)?;
    // What needs no engine is checked before the engine is opened.
    let limits = v2l_runtime::limits::Limits::from_env()?;
    limits.check_threads(opts.threads)?;
    let settings = g.settings();
    settings.check_alone(&limits)?;
    request::check_fps(g.fps)?;
    let t0 = std::time::Instant::now();
    let dir = Engine::open(engine)?;
    let opts = &dir.session_options_on(opts.threads, device)?;
    let checked = settings.check(&dir, &limits)?;
    let inputs = Inputs {
        prompt: prompt_input(g)?,
        image: g.image.clone().map(MediaInput::File),
        image_embeds: (g.image_embeds.as_deref())
            .map(|p| take_tensor(p, files_io::IMAGE_EMBEDS))
            .transpose()?,
        lora: lora_input(&dir, opts, g)?,
        noise: noise_input(g)?,
        sampler: g.scheduler,
        cache: g.cache,
    };
    // Stages outside the pipeline (text encode, load) are recorded here, the rest by it.
    let mut outer = v2l_runtime::stages::Timings::with_memory(g.stage_memory);
    let mut prompts = PromptEncoders::default();
    let built = inputs.build(&dir, opts, &checked, &mut prompts)?;
    // The encoder (10 GB for a T5-XXL) is gone before the DiT loads.
    prompts.release();
    for (field, w) in &built.warnings {
        eprintln!("warning: {}: {w} (--max-sequence-length)", field.flag());
    }
    for path in g.image.iter().chain(g.reference.as_ref()) {
        let warning = v2l_runtime::video::aspect_warning(path, checked.height(), checked.width());
        warning.into_iter().for_each(|w| eprintln!("warning: {w}"));
    }
    if let Some(ms) = built.text_encode_ms {
        outer.insert("text_encode".into(), ms);
    }
    let t_load = std::time::Instant::now();
    let strategy = g.lora_strategy.as_deref().map(parse_strategy).transpose()?;
    let mut pipeline = match strategy {
        None => Pipeline::load(dir, opts)?,
        Some(s) => Pipeline::load_with_strategy(dir, opts, s)?,
    };
    outer.insert("load".into(), ms_since(t_load));
    pipeline.set_stage_memory(g.stage_memory);
    pipeline.set_posterior_sampling(g.posterior_seed);
    pipeline.set_vae_tiling(g.vae_tiling.into());
    let req = built.request;
    let facts = RunFacts::of(pipeline.engine(), checked.steps())?;
    let dumped_prompts = (g.dump.as_ref()).map(|_| {
        (
            req.prompt_embeds.clone(),
            req.negative_prompt_embeds.clone(),
        )
    });
    let bar = !g.quiet && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut progress = crate::ProgressBars::new(bar);
    // One request: each part is released once done with (the DiT before the VAE decodes).
    let gen = pipeline.generate_once(&req, &mut progress)?;
    let rgb = v2l_runtime::video::to_rgb8(&gen.frames)?;
    let sheet = output.with_extension("png");
    v2l_runtime::video::write_mp4(output, &rgb, g.fps)?;
    v2l_runtime::video::write_contact_sheet(&sheet, &rgb, 8)?;
    if let Some(d) = &g.dump {
        write_dump(d, &gen, dumped_prompts)?;
    }
    report(g, output, &rgb, gen, outer, facts, ms_since(t0));
    Ok(())
}

/// What the engine ran with, read before the pipeline is consumed, for `--json`.
struct RunFacts {
    steps: usize,
    kind: v2l_runtime::pipeline::PipelineKind,
    attention: String,
    int8_gemm: Option<String>,
    vae_conv: String,
    compiled_on: Option<v2l_runtime::bundle::Machine>,
}

impl RunFacts {
    fn of(e: &Engine, steps: usize) -> Result<RunFacts, Failure> {
        Ok(RunFacts {
            steps,
            kind: e.pipeline_kind()?,
            attention: e.attention(),
            int8_gemm: e.int8_gemm(),
            vae_conv: e.vae_conv(),
            compiled_on: e.compiled_on().cloned(),
        })
    }
}

/// The run's summary: `--json`'s object, or one line.
fn report(
    g: &GenerateArgs,
    output: &std::path::Path,
    rgb: &v2l_runtime::video::Frames,
    gen: v2l_runtime::pipeline::Generation,
    outer: v2l_runtime::stages::Timings,
    facts: RunFacts,
    wall_ms: f64,
) {
    let sheet = output.with_extension("png");
    if g.json {
        let lora_layers = gen.lora.as_ref().map(|l| l.layers.len());
        let cache_skips = gen.cache_skips();
        let mut stages = gen.timings;
        stages.merge(outer);
        println!(
            "{}",
            serde_json::json!({
                "output": output, "contact_sheet": sheet, "dump": g.dump,
                "frames": rgb.frames, "height": rgb.height, "width": rgb.width, "steps": facts.steps,
                "lora": lora_layers, "stages_ms": stages.ms, "wall_ms": wall_ms,
                "stage_peak_rss_mb": stages.peak_rss_mb, "dit_steps_ms": stages.steps_ms,
                "dit_steps_peak_rss_mb": g.stage_memory.then_some(stages.steps_peak_rss_mb),
                "pipeline": facts.kind, "scheduler": g.scheduler.or(v2l_runtime::pipeline::Sampler::default_for(facts.kind)),
                "attention": facts.attention, "int8_gemm": facts.int8_gemm, "vae_conv": facts.vae_conv,
                "peak_rss_mb": crate::own_peak_rss_mb(),
                "cache": g.cache.map(|c| c.describe()), "dit_calls": gen.dit_calls,
                "cache_skips": cache_skips,
                "machine": v2l_runtime::cpu::this(), "compiled_on": facts.compiled_on,
            })
        );
    } else if !g.quiet {
        println!(
            "wrote {} and {} ({} frames of {}x{})",
            output.display(),
            sheet.display(),
            rgb.frames,
            rgb.width,
            rgb.height
        );
    }
}

impl GenerateArgs {
    /// The request's settings, for the runtime to check.
    fn settings(&self) -> Settings {
        Settings {
            frames: self.frames,
            height: self.height,
            width: self.width,
            steps: self.steps,
            guidance: self.guidance,
            lora_scale: self.lora_scale,
            max_sequence_length: self.max_sequence_length,
        }
    }
}

/// What the command line alone decides, before the engine is opened: the flags that must come
/// together, and outputs that are neither an input nor a file of the engine.
fn check_generate_paths(
    engine: &std::path::Path,
    g: &GenerateArgs,
    output: &std::path::Path,
) -> Result<(), Failure> {
    if g.prompt.is_none() && g.prompt_embeds.is_none() {
        return Err(Failure::usage("give --prompt TEXT or --prompt-embeds FILE"));
    }
    if g.seed.is_none() && g.noise.is_none() {
        return Err(Failure::usage("give --seed N or --noise <safetensors>"));
    }
    if !g.lora_weights.is_empty() && g.lora_weights.len() != g.loras.len() {
        return Err(Failure::usage(format!(
            "--lora-weights has {} values for {} --lora files",
            g.lora_weights.len(),
            g.loras.len()
        )));
    }
    check_output(output, &["mp4"])?;
    if let Some(d) = &g.dump {
        check_output(d, &["safetensors"])?;
    }
    let sheet = output.with_extension("png");
    let mut outputs = vec![("-o", output), ("-o (its contact sheet)", sheet.as_path())];
    outputs.extend(g.dump.as_deref().map(|d| ("--dump", d)));
    let mut inputs: Vec<(&str, &std::path::Path)> = Vec::new();
    for (flag, p) in [
        ("--image", &g.image),
        ("--reference", &g.reference),
        ("--noise", &g.noise),
        ("--prompt-embeds", &g.prompt_embeds),
        ("--image-embeds", &g.image_embeds),
    ] {
        inputs.extend(p.as_deref().map(|p| (flag, p)));
    }
    inputs.extend(g.loras.iter().map(|p| ("--lora", p.as_path())));
    crate::check_outputs_are_not_inputs(&outputs, &inputs)?;
    crate::check_outputs_outside_engine(&outputs, engine)
}

/// `--prompt` text or the two tensors of `--prompt-embeds`.
fn prompt_input(g: &GenerateArgs) -> Result<PromptInput, Failure> {
    match (&g.prompt, &g.prompt_embeds) {
        (Some(text), _) => Ok(PromptInput::Text {
            prompt: text.clone(),
            negative: g.negative_prompt.clone().unwrap_or_default(),
        }),
        (None, Some(path)) => {
            let names = [files_io::PROMPT_EMBEDS, files_io::NEGATIVE_PROMPT_EMBEDS];
            let mut file = read_with(path, &names)?;
            let mut take = |name| file.remove(name).ok_or_else(|| missing(path, name));
            Ok(PromptInput::Embeds {
                prompt: take(names[0])?,
                negative: take(names[1])?,
            })
        }
        (None, None) => Err(Failure::usage("give --prompt TEXT or --prompt-embeds FILE")),
    }
}

/// `--reference`, the effect flags (predicted here by the engine's effect hypernetwork),
/// `--lora` files, or the engine's own LoRA.
fn lora_input(
    engine: &Engine,
    opts: &SessionOptions,
    g: &GenerateArgs,
) -> Result<LoraInput, Failure> {
    if let Some(r) = &g.reference {
        return Ok(LoraInput::Reference(MediaInput::File(r.clone())));
    }
    if g.effects.any() {
        let effects = g.effects.effects()?;
        let which = crate::hypernet(engine, g.effects.hypernet)?;
        let lora = v2l_runtime::effect::predict_effects(
            engine,
            which,
            true,
            opts,
            &effects,
            None,
            &mut |_, _| {},
        )?;
        return Ok(LoraInput::Applied(vec![AppliedLora {
            lora: lora.into(),
            source: PathBuf::from("--effect"),
            multiplier: 1.0,
        }]));
    }
    let weights = g.loras.iter().enumerate();
    Ok(match g.loras.is_empty() {
        true => LoraInput::Resident,
        false => LoraInput::Files(
            weights
                .map(|(i, p)| (p.clone(), g.lora_weights.get(i).copied().unwrap_or(1.0)))
                .collect(),
        ),
    })
}

/// `--noise` gives the initial noise (and a Fun-InP model's augmentation noise, if it holds
/// it); `--seed` seeds everything else the pipeline draws, or all of it without `--noise`.
fn noise_input(g: &GenerateArgs) -> Result<NoiseInput, Failure> {
    match (&g.noise, g.seed) {
        (Some(p), seed) => {
            let mut file = read_with(p, &[files_io::INITIAL_NOISE])?;
            let noise = file
                .remove(files_io::INITIAL_NOISE)
                .ok_or_else(|| missing(p, files_io::INITIAL_NOISE))?;
            Ok(NoiseInput::Given {
                noise,
                inpaint_noise: file.remove(files_io::INPAINT_NOISE),
                seed,
            })
        }
        (None, Some(seed)) => Ok(NoiseInput::Seed(seed)),
        (None, None) => Err(Failure::usage("give --seed N or --noise <safetensors>")),
    }
}

fn missing(path: &std::path::Path, name: &str) -> Failure {
    Failure::from(v2l_runtime::RuntimeError::MissingTensor {
        path: path.to_path_buf(),
        name: name.into(),
    })
}

/// One tensor of a safetensors file, named in the error when absent.
fn take_tensor(path: &std::path::Path, name: &str) -> Result<v2l_runtime::Tensor, Failure> {
    read_with(path, &[name])?
        .remove(name)
        .ok_or_else(|| missing(path, name))
}

/// The tensors of `path`, which must list `required` (checked from its header before the
/// data is read).
fn read_with(
    path: &std::path::Path,
    required: &[&str],
) -> Result<std::collections::BTreeMap<String, v2l_runtime::Tensor>, Failure> {
    Ok(v2l_runtime::tensor::read_safetensors_with(path, required)?)
}

pub(crate) fn parse_strategy(s: &str) -> Result<v2l_runtime::lora::strategy::Strategy, Failure> {
    v2l_runtime::lora::strategy::Strategy::parse(s).ok_or_else(|| {
        Failure::usage(format!(
            "--lora-strategy {s}: expected fused, bound or unfused"
        ))
    })
}

/// `--dump`: every step's latents, the reference's latents and hypernetwork weights, the
/// frames and the prompt embeddings.
fn write_dump(
    d: &std::path::Path,
    gen: &v2l_runtime::pipeline::Generation,
    prompts: Option<(v2l_runtime::Tensor, v2l_runtime::Tensor)>,
) -> Result<(), Failure> {
    let mut m = std::collections::BTreeMap::new();
    for (i, l) in gen.latents_steps.iter().enumerate() {
        m.insert(format!("latents_step{i}"), l.clone());
    }
    if let Some(t) = &gen.reference_latents {
        m.insert(hypernet_io::REFERENCE_LATENTS.into(), t.clone());
    }
    if let Some(t) = &gen.hyper_weights {
        m.insert(hypernet_io::HYPER_WEIGHTS.into(), t.clone());
    }
    m.insert("frames".into(), gen.frames.clone());
    if let Some((p, n)) = prompts {
        m.insert(files_io::PROMPT_EMBEDS.into(), p);
        m.insert(files_io::NEGATIVE_PROMPT_EMBEDS.into(), n);
    }
    Ok(write_safetensors(d, &m)?)
}
