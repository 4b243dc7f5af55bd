//! `v2l-run`: run exported graphs.

use std::path::PathBuf;
use std::process::ExitCode;
use v2l_contracts::io::files as files_io;

use clap::{Parser, Subcommand};
use v2l_cli::{main_with, Failure};
use v2l_runtime::{read_safetensors, SessionOptions};

/// Generate a video from a first frame (and optionally a reference clip whose effect a
/// Video2LoRA LoRA carries), or from text alone (Wan T2V), or run one component at a time with
/// `stage`.
///
/// Generation (CogVideoX image-to-video, classifier-free guidance, DDIM):
///   v2l-run --engine engine/ --image first.png --prompt "a red car in the snow" \
///       --reference ref.mp4 --seed 42 -o out.mp4
/// writes out.mp4 and out.png (a contact sheet of every frame). The prompt is tokenized and
/// encoded by the engine's T5 text encoder as diffusers does it (padded/truncated to
/// --max-sequence-length, `</s>` appended, no attention mask); or give precomputed embeddings
/// with --prompt-embeds (a safetensors file with `prompt_embeds` and `negative_prompt_embeds`
/// [1, L, D]). With --lora FILE (repeatable, --lora-weights) those LoRA files instead of a
/// reference clip, merged exactly; without --reference or --lora no LoRA is applied.
///
///   v2l-run --engine engine/ --image first.png --prompt-embeds prompt.safetensors \
///       --lora a.safetensors --lora b.safetensors --lora-weights 0.6,0.4 --seed 42 -o out.mp4
///
/// Wan2.1 engines (`v2l-export pipeline` of a Wan directory) run the same command with the
/// engine's flow sampler (UniPC or Euler, as its scheduler config says): a T2V engine takes no
/// --image; an I2V engine takes --image and encodes it with its CLIP image processor and
/// encoder (or takes the tokens from --image-embeds).
///
///   v2l-run --engine wan-t2v/ --prompt "a cat surfing" --frames 81 --height 480 --width 832 \
///       --guidance 5 --steps 50 --seed 42 -o cat.mp4
///
/// `stage` runs a single component on tensors from a safetensors file, named as diffusers
/// names them, and writes its outputs to another safetensors file: the way to check an
/// export against PyTorch outputs.
///
///   dit           hidden_states, encoder_hidden_states, timestep, rope_cos, rope_sin -> sample
///   vae-encode    video [B,3,F,H,W] in [-1,1]           -> posterior_mean, posterior_logvar
///   vae-decode    latents [B,16,f,h,w] (unscaled)        -> sample
///   text-encoder  input_ids [B,L] int64                  -> prompt_embeds
///   text          --prompts FILE (a JSON array of strings) -> input_ids, prompt_embeds
///
/// Example:
///   v2l-run --engine out/ stage dit --inputs dit_io.safetensors -o dit_out.safetensors
///
/// `measure` tells which effect each clip shows, from its pixels alone (no engine):
///   v2l-run measure out.mp4 ref.mp4
#[derive(Parser)]
#[command(version, verbatim_doc_comment)]
struct Cli {
    /// Engine bundle (from `v2l-compile`) or export directory (from `v2l-export`)
    #[arg(long, global = true)]
    engine: Option<PathBuf>,
    /// CPU threads for ONNX Runtime (0: one per core)
    #[arg(long, global = true, default_value_t = 0)]
    threads: usize,
    /// GPU to run a cuda or tensorrt engine on, as CUDA numbers them (after
    /// CUDA_VISIBLE_DEVICES; `nvidia-smi`'s order where the GPUs are alike, or with
    /// CUDA_DEVICE_ORDER=PCI_BUS_ID); a CPU engine takes 0 only
    #[arg(long, global = true, default_value_t = 0, value_name = "N")]
    device: u32,
    #[command(flatten)]
    gen: v2l_cli::generate::GenerateArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run one component on named tensors
    ///
    ///   dit         hidden_states, encoder_hidden_states, timestep, rope_cos, rope_sin -> sample
    ///   vae-encode  video [B,3,F,H,W] in [-1,1]           -> posterior_mean, posterior_logvar
    ///   vae-decode  latents [B,16,f,h,w] (unscaled)        -> sample
    ///   hypernet    reference_latents [B,16,T,h,w]         -> hyper_weights
    ///   text-encoder input_ids [B,L] int64                 -> prompt_embeds
    ///   text        --prompts FILE (JSON array of strings) -> input_ids [N,L], prompt_embeds [N,L,D]
    ///
    /// Inputs are checked against the model before anything runs (dtypes, shapes, finite
    /// values, timesteps within the scheduler's range).
    ///
    /// Examples:
    ///   v2l-run --engine engine/ stage dit --inputs dit_in.safetensors -o dit_out.safetensors \
    ///       --compare torch_out.safetensors --compare-name sample=output
    ///   v2l-run --engine engine/ stage vae-decode --inputs latents.safetensors -o video.safetensors
    ///   v2l-run --engine engine/ stage text --prompts prompts.json -o embeds.safetensors
    #[command(verbatim_doc_comment)]
    Stage(v2l_cli::stage::StageArgs),
    /// Tell which effect each clip shows, measured from its pixels (no engine, no model)
    ///
    /// For each pair of consecutive frames a similarity transform (rotation, zoom, pan) is
    /// fitted to the luma, coarse to fine; on the aligned pair the hue rotation, the
    /// brightness ratio and the correlation are measured. Summed over the clip and divided by
    /// the nominal magnitudes of the effects dataset (training/effects.py), the largest score
    /// names the effect:
    ///
    ///   rotate_cw / rotate_ccw  content turns clockwise / counter-clockwise (nominal 90°)
    ///   zoom_in / zoom_out      content grows / shrinks about the centre (nominal ×1.5)
    ///   pan_left / pan_right    content slides left / right (nominal 24 px of a 64-px frame)
    ///   hue_shift               hues rotate at constant luma (nominal 150°)
    ///   fade_black              brightness ramps down (nominal to ×0.1)
    ///   none                    the best score is under 30 % of its nominal, or consecutive
    ///                           frames do not line up (noise, cuts)
    ///
    /// Confidence (0 to 1) drops when a second effect, or a vertical pan, is nearly as strong,
    /// and when frames line up poorly. Each clip is read at its own size, not resized: an mp4
    /// (or anything ffmpeg decodes), a directory of PNGs, or a safetensors file with
    /// `reference_u8 [F,H,W,3]`; at least 2 frames of 8×8 pixels. The measurement is
    /// training/measure.py's, to rounding. The first clip that cannot be read or measured
    /// stops the command with an error naming it.
    ///
    /// Each line reads: label (confidence), then what was measured over the whole clip:
    /// rotation (+ = clockwise), zoom factor, pan x,y (+ = right, down; pixels of a 64-px-wide
    /// frame), hue rotation, brightness gain, and ncc (how well consecutive frames line up).
    ///
    /// Examples:
    ///   v2l-run measure out/demo/video.mp4 models/cogvideox-effects/examples/ref_pan_right.mp4
    ///   v2l-run measure clips/*.mp4 --json > effects.jsonl
    #[command(verbatim_doc_comment)]
    Measure {
        /// Clips to measure (mp4, a directory of PNGs, or safetensors `reference_u8`)
        #[arg(required = true, value_name = "VIDEO")]
        videos: Vec<PathBuf>,
        /// Print one JSON object per clip (path, label, confidence, scores, motion) instead of
        /// a line of text
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    main_with(|| {
        let engine = || {
            cli.engine.as_ref().ok_or_else(|| {
                Failure::usage("no engine given").with_hint(
                    "pass --engine <export dir>, e.g. `v2l-run --engine out/ stage dit ...`",
                )
            })
        };
        let opts = SessionOptions {
            threads: cli.threads,
            ..Default::default()
        };
        match cli.command {
            Some(Command::Measure { videos, json }) => measure_clips(&videos, json),
            Some(Command::Stage(args)) => v2l_cli::stage::run(
                engine()?,
                &args,
                opts.threads,
                cli.device,
                cli.gen.max_sequence_length,
                cli.gen.vae_tiling.into(),
            ),
            None => v2l_cli::generate::run(engine()?, &cli.gen, &opts, cli.device),
        }
    })
}

/// `measure`: reads each clip at its own size and prints what it shows.
fn measure_clips(videos: &[PathBuf], json: bool) -> Result<(), Failure> {
    use v2l_tools::measure::measure;
    for path in videos {
        let clip = read_clip(path)?;
        let m = measure(&clip).map_err(|e| match e {
            v2l_runtime::RuntimeError::Invalid { message, .. } => {
                Failure::new(format!("{}: {message}", path.display()))
            }
            e => Failure::from(e),
        })?;
        let mo = &m.motion;
        if json {
            let scores: serde_json::Map<String, serde_json::Value> = m
                .scores
                .iter()
                .map(|&(name, v)| (name.to_string(), v.into()))
                .collect();
            println!(
                "{}",
                serde_json::json!({
                    "path": path.display().to_string(), "label": m.label, "confidence": m.confidence,
                    "scores": scores, "motion": mo,
                })
            );
        } else {
            println!(
                "{}: {} (confidence {:.2})  rotation {:+.1}°  zoom ×{:.3}  pan {:+.1},{:+.1} px  \
                 hue {:+.0}°  gain ×{:.2}  ncc {:.3}",
                path.display(),
                m.label,
                m.confidence,
                mo.rotation_deg,
                mo.log_zoom.exp(),
                mo.pan_x,
                mo.pan_y,
                mo.hue_deg,
                mo.log_gain.exp(),
                mo.ncc,
            );
        }
    }
    Ok(())
}

/// A clip at its stored size: ffprobe's for video and PNGs, the tensor's for safetensors.
fn read_clip(path: &std::path::Path) -> Result<v2l_runtime::video::Frames, Failure> {
    use v2l_runtime::RuntimeError;
    if !path.exists() {
        return Err(RuntimeError::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
        )
        .into());
    }
    let (height, width) = if path.extension().is_some_and(|e| e == "safetensors") {
        let tensors = read_safetensors(path)?;
        let t = tensors
            .get(files_io::REFERENCE_U8)
            .ok_or_else(|| RuntimeError::MissingTensor {
                path: path.into(),
                name: files_io::REFERENCE_U8.into(),
            })?;
        let f = v2l_runtime::video::Frames::from_u8_tensor(t)
            .map_err(|m| Failure::new(format!("{}: `reference_u8`: {m}", path.display())))?;
        (f.height, f.width)
    } else {
        v2l_runtime::video::source_size(path).ok_or_else(|| {
            Failure::new(format!("{}: not a video ffprobe can read", path.display())).with_hint(
                "give an mp4 (or anything ffmpeg decodes), a directory of PNGs, or a safetensors \
                 file with `reference_u8`; ffprobe comes with ffmpeg (bash scripts/setup.sh)",
            )
        })?
    };
    Ok(v2l_runtime::video::read_frames(path, height, width)?)
}
