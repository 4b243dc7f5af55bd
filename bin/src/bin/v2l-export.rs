//! `v2l-export`: rebuild a PyTorch-trained model as an ONNX graph, from its checkpoint alone.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use v2l_cli::{bytes, main_with, Failure};
use v2l_export::{cogvideox_dit, video2lora_hypernet, Checkpoint, Manifest};
use v2l_graphs::{DType, ExternalData};

/// Export diffusers / upstream checkpoints to ONNX graphs, without PyTorch.
///
/// Each subcommand writes its graph(s) into the output directory and records them in
/// `<dir>/manifest.json`, so components can be exported one at a time into one directory.
/// Weights a LoRA can target keep their checkpoint names as ONNX initializers.
///
/// Examples:
///   v2l-export dit models/cogvideox/transformer -o out/
///   v2l-export vae models/cogvideox/vae -o out/
///   v2l-run --engine out/ stage dit --inputs dit_in.safetensors -o dit_out.safetensors
#[derive(Parser)]
#[command(version, verbatim_doc_comment)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Diffusion transformer -> <dir>/dit.onnx: CogVideoX (`CogVideoXTransformer3DModel`) or
    /// Wan2.1 (`WanTransformer3DModel`, T2V and I2V), by the checkpoint's `_class_name`
    ///
    /// Example:
    ///   v2l-export dit models/CogVideoX-5b-I2V/transformer -o export/
    ///   v2l-export dit models/Wan2.1-T2V-1.3B-Diffusers/transformer -o export/
    #[command(verbatim_doc_comment)]
    Dit {
        /// diffusers transformer directory (config.json + safetensors, single or sharded)
        checkpoint: PathBuf,
        #[command(flatten)]
        out: OutputArgs,
        /// Storage type of the weights; the graph computes in f32 either way
        /// (f16/bf16 weights are followed by a Cast and halve the file size)
        #[arg(long, value_enum, default_value = "f32")]
        weight_dtype: WeightDType,
    },
    /// Video2LoRA hypernetwork (`VideoHyperDream`) -> <dir>/hypernet.onnx, plus its LiLoRA
    /// auxiliaries, checked against the DiT's linear layers
    ///
    /// Example:
    ///   v2l-export hypernet hypernetwork.safetensors --lilora lilora.safetensors \
    ///       --dit models/CogVideoX-5b-I2V/transformer -o export/
    #[command(verbatim_doc_comment)]
    Hypernet {
        /// Hypernetwork checkpoint (upstream `img_weight_generator.*` keys)
        checkpoint: PathBuf,
        /// LiLoRA auxiliaries (`lora_unet__<module>.down_aux` / `.up_aux`)
        #[arg(long)]
        lilora: PathBuf,
        /// diffusers transformer directory the LoRA targets (its nn.Linear order is the row order)
        #[arg(long)]
        dit: PathBuf,
        /// Refinement iterations unrolled in the graph (the paper's k)
        #[arg(long, default_value_t = 4)]
        iterations: usize,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Prompt2Effect hypernetwork (`HyperNet` of the public reproduction) ->
    /// <dir>/prompt2effect.onnx: an effect prompt's embeddings and a chunk of the DiT's square
    /// attention weights in, LoRA factors for those layers out (`v2l-lora predict --effect`)
    ///
    /// The checkpoint is a directory with `config.json` (the reproduction's `HyperConfig`
    /// fields: text_dim, weight_dim, hidden_dim, n_heads, n_layer, rank, num_latents,
    /// module_specs, max_layers, layer_embed_dim, module_embed_dim) and `model.safetensors`
    /// (its state_dict under upstream names). The reproduction saves a torch pickle; convert it
    /// once with `safetensors.torch.save_file(ckpt["state_dict"], "model.safetensors")` and
    /// write `ckpt["config"]` plus num_latents (256 unless trained otherwise) to config.json.
    ///
    /// Example:
    ///   v2l-export prompt2effect checkpoints/prompt2effect/ -o export/
    #[command(verbatim_doc_comment)]
    Prompt2effect {
        /// Checkpoint directory (config.json + model.safetensors)
        checkpoint: PathBuf,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// LoFA hypernetwork, both stages -> <dir>/lofa_stage1.onnx and lofa_stage2.onnx: an effect
    /// prompt's embeddings and a chunk of the DiT's square attention weights in; stage 1's
    /// hidden states are stage 2's prior; LoRA factors (alpha folded in) out
    /// (`v2l-lora predict --lofa`)
    ///
    /// Each stage is a directory with `config.json` (the constructor's keyword arguments, as in
    /// the authors' config.yaml) and `model.safetensors` (its state_dict). The authors ship
    /// torch pickles; convert once with `safetensors.torch.save_file(torch.load(p), ...)`.
    ///
    /// Example:
    ///   v2l-export lofa checkpoints/lofa/stage1 checkpoints/lofa/stage2 -o export/
    #[command(verbatim_doc_comment)]
    Lofa {
        /// Stage 1 checkpoint directory (config.json + model.safetensors)
        stage1: PathBuf,
        /// Stage 2 checkpoint directory (config.json + model.safetensors)
        stage2: PathBuf,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// A whole diffusers pipeline directory, CogVideoX or Wan2.1 (transformer/, vae/, scheduler/;
    /// text_encoder/ and image_encoder/ if present) and optionally the Video2LoRA hypernetwork:
    /// every graph plus the scheduler config, in one directory, staged and published together
    /// (a failed export leaves nothing behind).
    ///
    /// Examples:
    ///   v2l-export pipeline models/CogVideoX-5b-I2V --hypernet hypernetwork.safetensors \
    ///       --lilora lilora.safetensors -o export/
    ///   v2l-export pipeline models/Wan2.1-T2V-1.3B-Diffusers -o wan/
    #[command(verbatim_doc_comment)]
    Pipeline {
        /// diffusers model directory with transformer/, vae/ and scheduler/
        model: PathBuf,
        /// Video2LoRA hypernetwork checkpoint (needs --lilora)
        #[arg(long, requires = "lilora")]
        hypernet: Option<PathBuf>,
        /// LiLoRA auxiliaries for the hypernetwork
        #[arg(long, requires = "hypernet")]
        lilora: Option<PathBuf>,
        /// Refinement iterations of the hypernetwork
        #[arg(long, default_value_t = 4)]
        iterations: usize,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// T5 prompt encoder (transformers `T5EncoderModel` v1.1, or `UMT5EncoderModel` for Wan)
    /// -> <dir>/text_encoder.onnx: `input_ids [B, L]` int64 -> `prompt_embeds [B, L, d_model]`,
    /// run as diffusers' pipelines run it (T5: no attention mask; umT5: an `attention_mask`
    /// input)
    ///
    /// Example:
    ///   v2l-export text-encoder models/CogVideoX-5b-I2V/text_encoder -o export/
    ///   v2l-export text-encoder models/Wan2.1-T2V-1.3B-Diffusers/text_encoder -o export/
    #[command(verbatim_doc_comment)]
    TextEncoder {
        /// transformers model directory (config.json + model.safetensors, single or sharded)
        checkpoint: PathBuf,
        /// The model's tokenizer directory (spiece.model + tokenizer_config.json, or
        /// tokenizer.json), checked and copied beside the graph so `v2l-run --prompt` works
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        #[command(flatten)]
        out: OutputArgs,
        /// Storage type of the weights; the graph computes in f32 either way (T5-XXL: 19 GB
        /// in f32, 9.5 GB in bf16)
        #[arg(long, value_enum, default_value = "f32")]
        weight_dtype: WeightDType,
    },
    /// I2V image encoder (transformers `CLIPVisionModel`, Wan's) -> <dir>/image_encoder.onnx:
    /// `pixel_values [B, 3, S, S]` -> `image_embeds`, the penultimate layer as Wan uses it
    ///
    /// Example:
    ///   v2l-export image-encoder models/Wan2.1-I2V-14B-480P-Diffusers/image_encoder -o export/
    #[command(verbatim_doc_comment)]
    ImageEncoder {
        /// transformers model directory (config.json + model.safetensors, single or sharded)
        checkpoint: PathBuf,
        #[command(flatten)]
        out: OutputArgs,
        /// Storage type of the weights; the graph computes in f32 either way
        #[arg(long, value_enum, default_value = "f32")]
        weight_dtype: WeightDType,
    },
    /// Video VAE (CogVideoX `AutoencoderKLCogVideoX`, Wan2.1 `AutoencoderKLWan`) -> <dir>/vae_encoder.onnx, <dir>/vae_decoder.onnx
    ///
    /// Example:
    ///   v2l-export vae models/CogVideoX-5b-I2V/vae -o export/
    ///   v2l-export vae models/Wan2.1-T2V-1.3B-Diffusers/vae -o export/
    #[command(verbatim_doc_comment)]
    Vae {
        /// diffusers VAE directory (config.json + safetensors)
        checkpoint: PathBuf,
        #[command(flatten)]
        out: OutputArgs,
    },
}

#[derive(clap::Args)]
struct OutputArgs {
    /// Output export directory (created if missing; each export adds its graphs to it)
    #[arg(short, long)]
    output: PathBuf,
    /// Put weights in a side file `<model>.onnx.data`: `auto` does so above 64 MiB
    /// (protobuf holds at most 2 GiB, and ONNX Runtime loads external weights faster)
    #[arg(long, value_enum, default_value = "auto")]
    external_data: External,
    /// Where the files end up when `output` is a staging directory (messages name this).
    #[arg(skip)]
    shown_as: Option<PathBuf>,
}

impl OutputArgs {
    /// `file` as the user will find it.
    fn shown(&self, file: &str) -> String {
        self.shown_as
            .as_ref()
            .unwrap_or(&self.output)
            .join(file)
            .display()
            .to_string()
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum WeightDType {
    F32,
    F16,
    Bf16,
}

impl From<WeightDType> for DType {
    fn from(w: WeightDType) -> DType {
        match w {
            WeightDType::F32 => DType::F32,
            WeightDType::F16 => DType::F16,
            WeightDType::Bf16 => DType::BF16,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum External {
    Auto,
    Always,
    Never,
}

impl From<External> for ExternalData {
    fn from(e: External) -> ExternalData {
        match e {
            External::Auto => ExternalData::Auto,
            External::Always => ExternalData::Always,
            External::Never => ExternalData::Never,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    main_with(|| match cli.command {
        Command::Dit {
            checkpoint,
            out,
            weight_dtype,
        } => export_dit(&checkpoint, &out, weight_dtype.into()),
        Command::Vae { checkpoint, out } => export_vae(&checkpoint, &out),
        Command::TextEncoder {
            checkpoint,
            tokenizer,
            out,
            weight_dtype,
        } => export_text_encoder(&checkpoint, tokenizer.as_deref(), &out, weight_dtype.into()),
        Command::ImageEncoder {
            checkpoint,
            out,
            weight_dtype,
        } => export_image_encoder(&checkpoint, &out, weight_dtype.into()),
        Command::Pipeline {
            model,
            hypernet,
            lilora,
            iterations,
            out,
        } => {
            v2l_runtime::limits::Limits::from_env()?.check_iterations(iterations)?;
            export_pipeline(
                &model,
                hypernet.as_deref(),
                lilora.as_deref(),
                iterations,
                &out,
            )
        }
        Command::Prompt2effect { checkpoint, out } => export_prompt2effect(&checkpoint, &out),
        Command::Lofa {
            stage1,
            stage2,
            out,
        } => export_lofa(&stage1, &stage2, &out),
        Command::Hypernet {
            checkpoint,
            lilora,
            dit,
            iterations,
            out,
        } => {
            v2l_runtime::limits::Limits::from_env()?.check_iterations(iterations)?;
            export_hypernet(&checkpoint, &lilora, &dit, iterations, &out)
        }
    })
}

fn prepare_dir(dir: &Path) -> Result<Manifest, Failure> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Failure::new(format!("cannot create {}: {e}", dir.display())))?;
    Ok(Manifest::read_or_default(dir)?)
}

fn warn_unused(keys: &[String]) {
    if !keys.is_empty() {
        eprintln!(
            "warning: {} checkpoint tensors were not used: {}",
            keys.len(),
            keys.join(", ")
        );
    }
}

fn export_dit(checkpoint: &Path, out: &OutputArgs, weight_dtype: DType) -> Result<(), Failure> {
    let ck = Checkpoint::open_dir(checkpoint)?;
    let ex = v2l_export::dit::export(&ck, weight_dtype)?;
    warn_unused(&ex.unused_keys);
    let mut manifest = prepare_dir(&out.output)?;
    let file = "dit.onnx";
    let written = v2l_graphs::save(&ex.graph, &out.output.join(file), out.external_data.into())?;
    manifest.dit = Some(ex.manifest_entry(file));
    manifest.write(&out.output)?;
    println!(
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
    );
    Ok(())
}

fn export_vae(checkpoint: &Path, out: &OutputArgs) -> Result<(), Failure> {
    let ck = Checkpoint::open_dir(checkpoint)?;
    let ex = v2l_export::vae::export(&ck)?;
    warn_unused(&ex.unused_keys);
    let mut manifest = prepare_dir(&out.output)?;
    let (enc, dec) = ("vae_encoder.onnx", "vae_decoder.onnx");
    let we = v2l_graphs::save(&ex.encoder, &out.output.join(enc), out.external_data.into())?;
    let wd = v2l_graphs::save(&ex.decoder, &out.output.join(dec), out.external_data.into())?;
    manifest.vae = Some(ex.manifest_entry(enc, dec));
    manifest.write(&out.output)?;
    let (ce, cd) = ex.cache_counts();
    println!(
        "wrote {} and {} ({}: {} + {} of f32 weights; {ce} + {cd} causal-conv caches)",
        out.shown(enc),
        out.shown(dec),
        ex.class_name,
        bytes(we.weight_bytes),
        bytes(wd.weight_bytes),
    );
    Ok(())
}

fn export_text_encoder(
    checkpoint: &Path,
    tokenizer: Option<&Path>,
    out: &OutputArgs,
    weight_dtype: DType,
) -> Result<(), Failure> {
    let ck = Checkpoint::open_dir(checkpoint)?;
    let ex =
        v2l_export::t5_encoder::export(&ck, (weight_dtype != DType::F32).then_some(weight_dtype))?;
    warn_unused(&ex.unused_keys);
    let mut manifest = prepare_dir(&out.output)?;
    let file = "text_encoder.onnx";
    let written = v2l_graphs::save(&ex.graph, &out.output.join(file), out.external_data.into())?;
    let tokenizer_dir = match tokenizer {
        Some(t) => copy_tokenizer(t, &out.output, ex.config.vocab_size)?,
        None => String::new(),
    };
    manifest.text_encoder = Some(v2l_export::manifest::TextEncoderEntry {
        file: file.into(),
        model_type: ex.config.model_type.clone(),
        d_model: ex.config.d_model,
        vocab_size: ex.config.vocab_size,
        tokenizer: tokenizer_dir,
        weight_dtype: weight_dtype.name().into(),
        config: ck.raw_config()?.clone(),
    });
    manifest.write(&out.output)?;
    println!(
        "wrote {} ({} encoder, {} layers, d_model {}, {} of {} weights)",
        out.shown(file),
        ex.config.model_type,
        ex.config.num_layers,
        ex.config.d_model,
        bytes(written.weight_bytes),
        weight_dtype
    );
    Ok(())
}

fn export_image_encoder(
    checkpoint: &Path,
    out: &OutputArgs,
    weight_dtype: DType,
) -> Result<(), Failure> {
    let ck = Checkpoint::open_dir(checkpoint)?;
    let ex =
        v2l_export::clip_vision::export(&ck, (weight_dtype != DType::F32).then_some(weight_dtype))?;
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
            v2l_runtime::image_preprocess::ClipPreprocess::from_file(&src)?;
            let rel = "image_processor/preprocessor_config.json";
            let dst = out.output.join(rel);
            let copied = dst
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|_| std::fs::copy(&src, &dst));
            copied.map_err(|e| Failure::new(format!("{}: {e}", dst.display())))?;
            rel.to_string()
        }
        None => String::new(),
    };
    manifest.image_encoder = Some(v2l_export::manifest::ImageEncoderEntry {
        file: file.into(),
        model_type: ex.config.model_type.clone(),
        hidden_size: ex.config.hidden_size,
        image_size: ex.config.image_size,
        weight_dtype: weight_dtype.name().into(),
        preprocessor,
        config: ck.raw_config()?.clone(),
    });
    manifest.write(&out.output)?;
    println!(
        "wrote {} (CLIP vision, {} of {} layers: the penultimate hidden states; {} of {} weights)",
        out.shown(file),
        ex.config.num_hidden_layers - 1,
        ex.config.num_hidden_layers,
        bytes(written.weight_bytes),
        weight_dtype
    );
    Ok(())
}

/// Checks the tokenizer in `src` (it loads, and its ids fit the encoder's `vocab_size`) and
/// copies its files to `<out>/tokenizer/`. Returns that subdirectory's name.
fn copy_tokenizer(src: &Path, out: &Path, vocab_size: usize) -> Result<String, Failure> {
    let tok = v2l_runtime::text::tokenizer::PromptTokenizer::from_dir(src)?;
    let probe = tok.ids("<extra_id_0> a")?;
    if let Some(id) = probe.iter().find(|&&i| i < 0 || i as usize >= vocab_size) {
        return Err(Failure::new(format!(
            "{}: gives token id {id}, outside the text encoder's vocabulary of {vocab_size}",
            src.display()
        )));
    }
    let name = "tokenizer";
    let dir = out.join(name);
    std::fs::create_dir_all(&dir)
        .map_err(|e| Failure::new(format!("cannot create {}: {e}", dir.display())))?;
    for f in TOKENIZER_FILES {
        let from = src.join(f);
        if from.is_file() {
            std::fs::copy(&from, dir.join(f))
                .map_err(|e| Failure::new(format!("{}: {e}", from.display())))?;
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

fn export_hypernet(
    checkpoint: &Path,
    lilora: &Path,
    dit: &Path,
    iterations: usize,
    out: &OutputArgs,
) -> Result<(), Failure> {
    let ck = Checkpoint::open_file(checkpoint)?;
    let ex =
        video2lora_hypernet::export(&ck, &video2lora_hypernet::HypernetOptions { iterations })?;
    warn_unused(&ex.unused_keys);
    let linears = cogvideox_dit::export(&Checkpoint::open_dir(dit)?, &Default::default())?.linears;
    let aux = v2l_runtime::lora::lilora::LiLora::load(lilora, &linears)
        .map_err(v2l_runtime::RuntimeError::from)?;
    let d = &ex.dims;
    if d.num_layers != aux.layers.len() {
        return Err(Failure::new(format!(
            "{}: the hypernetwork predicts {} rows, but {} has {} layers (one per nn.Linear of the DiT)",
            checkpoint.display(),
            d.num_layers,
            lilora.display(),
            aux.layers.len()
        )));
    }
    if d.weight_dim % (aux.a + aux.b) != 0 {
        return Err(Failure::new(format!(
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
            tmp.persist(&dst).map(drop).map_err(|e| e.error)
        };
        copy().map_err(|e| Failure::new(format!("{}: {e}", dst.display())))?;
    }
    manifest.hypernet = Some(v2l_export::manifest::HypernetEntry {
        file: file.into(),
        dims: ex.dims.clone(),
        lilora: lilora_name.into(),
        lilora_a: aux.a,
        lilora_b: aux.b,
        layers: linears.iter().map(|l| l.name.clone()).collect(),
    });
    manifest.write(&out.output)?;
    println!(
        "wrote {} ({} rows of width {}, {} heads, {} blocks, {} iterations; {} of weights) and {}",
        out.shown(file),
        d.num_layers,
        d.weight_dim,
        d.heads,
        d.blocks,
        d.iterations,
        bytes(written.weight_bytes),
        out.shown(lilora_name)
    );
    Ok(())
}

fn export_prompt2effect(checkpoint: &Path, out: &OutputArgs) -> Result<(), Failure> {
    let ck = Checkpoint::open_dir(checkpoint)?;
    let ex = v2l_export::prompt2effect::export(&ck)?;
    warn_unused(&ex.unused_keys);
    let mut manifest = prepare_dir(&out.output)?;
    let file = "prompt2effect.onnx";
    let written = v2l_graphs::save(&ex.graph, &out.output.join(file), out.external_data.into())?;
    let c = &ex.config;
    manifest.prompt2effect = Some(v2l_export::manifest::Prompt2EffectEntry {
        file: file.into(),
        text_dim: c.text_dim,
        weight_dim: c.weight_dim,
        rank: c.rank,
        hidden_dim: c.hidden_dim,
        max_layers: c.max_layers,
        module_types: c.module_specs.clone(),
    });
    manifest.write(&out.output)?;
    println!(
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
    );
    Ok(())
}

fn export_lofa(stage1: &Path, stage2: &Path, out: &OutputArgs) -> Result<(), Failure> {
    use v2l_export::lofa;
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
    warn_unused(&unused);
    let mut manifest = prepare_dir(&out.output)?;
    let (f1, f2) = ("lofa_stage1.onnx", "lofa_stage2.onnx");
    let w1 = v2l_graphs::save(&one.graph, &out.output.join(f1), out.external_data.into())?;
    let w2 = v2l_graphs::save(&two.graph, &out.output.join(f2), out.external_data.into())?;
    let c = &two.config;
    manifest.lofa = Some(v2l_export::manifest::LofaEntry {
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
    println!(
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
    );
    Ok(())
}

fn export_pipeline(
    model: &Path,
    hypernet: Option<&Path>,
    lilora: Option<&Path>,
    iterations: usize,
    out: &OutputArgs,
) -> Result<(), Failure> {
    let sched = model.join("scheduler").join("scheduler_config.json");
    if !sched.is_file() {
        return Err(Failure::new(format!(
            "{}: missing (a diffusers pipeline directory has scheduler/scheduler_config.json)",
            sched.display()
        )));
    }
    // The sampler's config is checked now, not at the first generation: Wan pipelines ship
    // flow samplers, CogVideoX DDIM.
    let transformer = Checkpoint::open_dir(&model.join("transformer"))?;
    match transformer
        .raw_config()?
        .get("_class_name")
        .and_then(|c| c.as_str())
    {
        Some(v2l_export::wan_dit::CLASS_NAME) => {
            v2l_runtime::flow::FlowScheduler::from_file(&sched)?;
        }
        _ => {
            v2l_runtime::scheduler::SchedulerConfig::from_file(&sched)?;
        }
    }
    drop(transformer);
    // Every part is written to a staging directory beside the output and moved in only when
    // all succeeded: a failed export leaves nothing a later `v2l-compile` would accept.
    let parent = out
        .output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)
        .map_err(|e| Failure::new(format!("cannot create {}: {e}", parent.display())))?;
    let staging = tempfile::Builder::new()
        .prefix(".v2l-export-")
        .tempdir_in(parent)
        .map_err(|e| {
            Failure::new(format!(
                "cannot create a staging directory in {}: {e}",
                parent.display()
            ))
        })?;
    let stage = OutputArgs {
        output: staging.path().to_path_buf(),
        external_data: out.external_data,
        shown_as: Some(out.output.clone()),
    };
    // An existing manifest (other parts exported before) carries over.
    if let Ok(m) = Manifest::read(&out.output) {
        m.write(&stage.output)?;
    }
    export_dit(&model.join("transformer"), &stage, DType::F32)?;
    export_vae(&model.join("vae"), &stage)?;
    // The prompt encoder, when the pipeline directory has one.
    if model.join("text_encoder").join("config.json").is_file() {
        let tok = model.join("tokenizer");
        export_text_encoder(
            &model.join("text_encoder"),
            tok.is_dir().then_some(tok.as_path()),
            &stage,
            DType::F32,
        )?;
    }
    // Wan I2V's CLIP vision encoder, when the pipeline has one.
    if model.join("image_encoder").join("config.json").is_file() {
        export_image_encoder(&model.join("image_encoder"), &stage, DType::F32)?;
    }
    if let (Some(h), Some(l)) = (hypernet, lilora) {
        export_hypernet(h, l, &model.join("transformer"), iterations, &stage)?;
    }
    let name = "scheduler_config.json";
    std::fs::copy(&sched, stage.output.join(name))
        .map_err(|e| Failure::new(format!("{}: {e}", stage.output.join(name).display())))?;
    let mut manifest = Manifest::read_or_default(&stage.output)?;
    manifest.scheduler = Some(name.into());
    manifest.write(&stage.output)?;
    publish(staging, &out.output)?;
    println!("wrote {}", out.output.join(name).display());
    Ok(())
}

/// Moves a finished staging directory's files into `out` (created if missing), the manifest
/// last, so `out` only ever holds a complete export.
fn publish(staging: tempfile::TempDir, out: &Path) -> Result<(), Failure> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |e: std::io::Error| Failure::new(format!("{}: {e}", p.display()))
    };
    if !out.exists() {
        let src = staging.keep();
        return std::fs::rename(&src, out).map_err(io(out));
    }
    let manifest = v2l_export::manifest::FILE_NAME;
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
