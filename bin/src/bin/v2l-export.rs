//! `v2l-export`: rebuild a PyTorch-trained model as an ONNX graph, from its checkpoint alone.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use v2l_cli::main_with;
use v2l_export::pipeline::{self as export, Output};
use v2l_graphs::{DType, ExternalData};
use v2l_tools::ExportChecks;

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
        /// Storage type of the DiT's and the text encoder's weights (the VAE and the
        /// hypernetwork stay f32); the graphs compute in f32 either way. At CogVideoX-5B size
        /// bf16 keeps the export at 11 + 9.5 GB instead of 22 + 19 GB, and `v2l-compile
        /// --precision int8|bf16` takes it as it is
        #[arg(long, value_enum, default_value = "f32")]
        weight_dtype: WeightDType,
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
    main_with(|| {
        let out_args = match &cli.command {
            Command::Dit { out, .. }
            | Command::Vae { out, .. }
            | Command::TextEncoder { out, .. }
            | Command::ImageEncoder { out, .. }
            | Command::Pipeline { out, .. }
            | Command::Prompt2effect { out, .. }
            | Command::Lofa { out, .. }
            | Command::Hypernet { out, .. } => out,
        };
        let out = Output {
            output: &out_args.output,
            external_data: out_args.external_data.into(),
            shown_as: None,
            say: &|line| println!("{line}"),
            warn: &|line| eprintln!("warning: {line}"),
            checks: &ExportChecks,
        };
        let limits = v2l_runtime::limits::Limits::from_env;
        match &cli.command {
            Command::Dit {
                checkpoint,
                weight_dtype,
                ..
            } => export::dit(checkpoint, &out, (*weight_dtype).into())?,
            Command::Vae { checkpoint, .. } => export::vae(checkpoint, &out)?,
            Command::TextEncoder {
                checkpoint,
                tokenizer,
                weight_dtype,
                ..
            } => export::text_encoder(
                checkpoint,
                tokenizer.as_deref(),
                &out,
                (*weight_dtype).into(),
            )?,
            Command::ImageEncoder {
                checkpoint,
                weight_dtype,
                ..
            } => export::image_encoder(checkpoint, &out, (*weight_dtype).into())?,
            Command::Pipeline {
                model,
                hypernet,
                lilora,
                iterations,
                weight_dtype,
                ..
            } => {
                limits()?.check_iterations(*iterations)?;
                export::pipeline(
                    model,
                    hypernet.as_deref(),
                    lilora.as_deref(),
                    *iterations,
                    (*weight_dtype).into(),
                    &out,
                )?
            }
            Command::Prompt2effect { checkpoint, .. } => export::prompt2effect(checkpoint, &out)?,
            Command::Lofa { stage1, stage2, .. } => export::lofa(stage1, stage2, &out)?,
            Command::Hypernet {
                checkpoint,
                lilora,
                dit,
                iterations,
                ..
            } => {
                limits()?.check_iterations(*iterations)?;
                export::hypernet(checkpoint, lilora, dit, *iterations, &out)?
            }
        }
        Ok(())
    })
}
