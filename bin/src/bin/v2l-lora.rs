//! `v2l-lora`: inspect, convert and fuse LoRA files.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use v2l_cli::lora::{convert, fuse, inspect_files, merge, predict_command, FormatArg, PredictArgs};
use v2l_cli::main_with;

/// Inspect, convert and fuse LoRA files.
///
/// Reads diffusers/PEFT (`transformer.<module>.lora_A/lora_B`, alpha in the
/// `lora_adapter_metadata`), kohya/musubi (`lora_unet_<module>.lora_down/lora_up/alpha`) and
/// ComfyUI (`diffusion_model.<module>.lora_A/lora_B`, optional `alpha`) safetensors files.
/// Conversions keep every factor bitwise.
///
/// Examples:
///   v2l-lora inspect my_lora.safetensors
///   v2l-lora convert my_lora.safetensors -o comfy.safetensors --format comfyui
///   v2l-lora fuse --base CogVideoX-5b/transformer --lora my_lora.safetensors -o fused/transformer
#[derive(Parser)]
#[command(version, verbatim_doc_comment)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a LoRA file's format, layers, ranks and alphas; with --compare, how two LoRAs
    /// relate layer by layer
    ///
    /// --compare prints, for each layer both LoRAs have: each update's norm ‖s·B·A‖_F; the
    /// cosine between the two updates; and the overlap ‖Q_aᵀQ_b‖₂ of their output
    /// (column) spaces, Q an orthonormal basis of B: 0 when the two write to orthogonal
    /// directions (fusing them does not interfere), 1 when they share one.
    ///
    /// Examples:
    ///   v2l-lora inspect my_lora.safetensors --json
    ///   v2l-lora inspect style.safetensors motion.safetensors --compare
    #[command(verbatim_doc_comment)]
    Inspect {
        /// LoRA file(s); two with --compare
        #[arg(required = true, num_args = 1..)]
        files: Vec<PathBuf>,
        /// Compare two LoRAs layer by layer (norms, cosine, column-space overlap)
        #[arg(long)]
        compare: bool,
        /// One JSON object on stdout
        #[arg(long)]
        json: bool,
        /// Model (diffusers transformer directory or export directory) to resolve kohya names
        #[arg(long)]
        model: Option<PathBuf>,
    },
    /// Rewrite a LoRA file in another format (factors kept bitwise)
    ///
    /// Example:
    ///   v2l-lora convert my_lora.safetensors -o comfy.safetensors --format comfyui
    #[command(verbatim_doc_comment)]
    Convert {
        /// LoRA file (diffusers/PEFT, kohya/musubi or ComfyUI safetensors)
        input: PathBuf,
        /// Output .safetensors file, replaced if it exists (never the input itself)
        #[arg(short, long)]
        output: PathBuf,
        #[arg(long, value_enum)]
        format: FormatArg,
        /// Model (diffusers transformer directory or export directory) to resolve kohya names
        #[arg(long)]
        model: Option<PathBuf>,
    },
    /// Merge several LoRAs into one, exactly (rank concatenation)
    ///
    /// ΔW = Σ wᵢ·ΔWᵢ per layer as [w₁B₁ | … | w_kB_k]·[A₁; …; A_k]: ranks add up and nothing
    /// is truncated, so strength is linear in each weight. v2l-run does the same at run time
    /// with --lora a --lora b --lora-weights 0.6,0.4.
    ///
    /// --equalize-norms scales each LoRA's weighted update in each layer to the same
    /// Frobenius norm (the mean over the LoRAs, or --norm-target), so no LoRA dominates a layer
    /// because it was trained louder; the per-layer norms and factors are printed.
    ///
    /// Examples:
    ///   v2l-lora merge style.safetensors motion.safetensors --weights 0.6,0.4 -o merged.safetensors
    ///   v2l-lora merge a.safetensors b.safetensors --equalize-norms -o merged.safetensors
    #[command(verbatim_doc_comment)]
    Merge {
        /// LoRA files (diffusers/PEFT, kohya/musubi or ComfyUI safetensors), two or more
        #[arg(required = true, num_args = 2..)]
        files: Vec<PathBuf>,
        /// Weight of each file, comma-separated, in order (default: 1 each)
        #[arg(
            long,
            value_name = "W,W,...",
            value_delimiter = ',',
            allow_negative_numbers = true
        )]
        weights: Vec<f32>,
        /// Scale every LoRA's update in each layer to one norm (see above)
        #[arg(long)]
        equalize_norms: bool,
        /// The norm --equalize-norms scales to (default: the mean over the LoRAs, per layer)
        #[arg(long, requires = "equalize_norms")]
        norm_target: Option<f64>,
        /// Output .safetensors file, replaced if it exists (never one of the inputs)
        #[arg(short, long)]
        output: PathBuf,
        /// Output format
        #[arg(long, value_enum, default_value = "diffusers")]
        format: FormatArg,
        /// Model (diffusers transformer directory or export directory) to resolve kohya names
        #[arg(long)]
        model: Option<PathBuf>,
    },
    /// Predict a LoRA with a hypernetwork: from a reference video (Video2LoRA) or from
    /// effect prompts (Prompt2Effect, LoFA)
    ///
    /// --reference: the clip is resized to the generation size, scaled to [0, 1], encoded by
    /// the VAE (posterior mode) and multiplied by its scaling factor; the hypernetwork predicts
    /// one row per DiT linear layer and the LiLoRA auxiliaries turn the rows into standard LoRA
    /// factors. Needs an engine with `dit`, `vae` and `hypernet` exported into it. The clip
    /// needs at least 5 frames; one of another aspect ratio is squashed (as diffusers does),
    /// with a warning.
    ///
    /// --effect / --lofa: the prompt is encoded by the engine's text encoder (Wan: umT5, 512
    /// tokens) and the DiT's square attention weights are streamed through the hypernetwork
    /// (`v2l-export prompt2effect`, `v2l-export lofa`: stage 1, then stage 2 with stage 1's
    /// hidden states rounded through fp16 as the authors do), --effect-chunk layers at a time,
    /// so memory holds one chunk, not the model. Several effects blend exactly with
    /// --effect-weights: ΔW = Σ wᵢ·ΔWᵢ as a rank concatenation.
    ///
    /// Examples:
    ///   v2l-lora predict --engine engine/ --reference ref.mp4 -o ref_lora.safetensors
    ///   v2l-lora predict --engine wan/ --effect "melting into gold" -o gold.safetensors
    ///   v2l-lora predict --engine wan/ --effect "gold" --effect "smoke" \
    ///       --effect-weights 0.5,0.5 -o blend.safetensors
    ///   v2l-lora predict --engine wan-1.3b/ --lofa "a person waving" -o wave.safetensors
    #[command(verbatim_doc_comment)]
    Predict(PredictArgs),
    /// Write a copy of a diffusers transformer checkpoint with a LoRA fused into its weights
    ///
    /// --response-tau τ fuses only the entries of LoFA's response map, |ΔW| > τ·|W|, to see how
    /// much of an update carries its effect.
    ///
    /// Examples:
    ///   v2l-lora fuse --base CogVideoX-5b/transformer --lora my_lora.safetensors \
    ///       --scale 0.8 -o fused/transformer
    ///   v2l-lora fuse --base Wan2.1-T2V-1.3B/transformer --lora lofa.safetensors \
    ///       --response-tau 0.02 -o masked/transformer
    #[command(verbatim_doc_comment)]
    Fuse {
        /// diffusers transformer directory
        #[arg(long)]
        base: PathBuf,
        /// LoRA file (diffusers/PEFT, kohya/musubi or ComfyUI safetensors)
        #[arg(long)]
        lora: PathBuf,
        /// Multiplier: each layer's fuse scale is scale · alpha / rank (`--lora-scale` as in v2l-run)
        #[arg(
            long,
            visible_alias = "lora-scale",
            default_value_t = 1.0,
            allow_negative_numbers = true
        )]
        scale: f32,
        /// Change only the entries of LoFA's response map, |ΔW| > τ·|W| (the paper's τ is
        /// 0.02); the share of entries changed is printed. The result is no longer a LoRA.
        #[arg(long, value_name = "TAU", allow_negative_numbers = true)]
        response_tau: Option<f32>,
        /// Output transformer directory (created; if it exists it must be empty)
        #[arg(short, long)]
        output: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    main_with(|| match cli.command {
        Command::Inspect {
            files,
            compare,
            json,
            model,
        } => inspect_files(&files, compare, json, model.as_deref()),
        Command::Merge {
            files,
            weights,
            equalize_norms,
            norm_target,
            output,
            format,
            model,
        } => merge(
            &files,
            &weights,
            equalize_norms.then_some(norm_target),
            &output,
            format.into(),
            model.as_deref(),
        ),
        Command::Convert {
            input,
            output,
            format,
            model,
        } => convert(&input, &output, format.into(), model.as_deref()),
        Command::Predict(args) => predict_command(args),
        Command::Fuse {
            base,
            lora,
            scale,
            response_tau,
            output,
        } => fuse(&base, &lora, scale, response_tau, &output),
    })
}
