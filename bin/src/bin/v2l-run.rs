//! `v2l-run`: run exported graphs.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use v2l_cli::{main_with, Failure};
use v2l_runtime::stage::{check_inputs, run_stage, AppliedLora, ExportDir, Stage};
use v2l_runtime::{read_safetensors, write_safetensors, SessionOptions};

/// Run an exported model: one component at a time with `stage`.
///
/// `stage` runs a single component on tensors from a safetensors file, named as diffusers
/// names them, and writes its outputs to another safetensors file: the way to check an
/// export against PyTorch outputs.
///
///   dit         hidden_states, encoder_hidden_states, timestep, rope_cos, rope_sin -> sample
///   vae-encode  video [B,3,F,H,W] in [-1,1]           -> posterior_mean, posterior_logvar
///   vae-decode  latents [B,16,f,h,w] (unscaled)        -> sample
///
/// Example:
///   v2l-run --engine out/ stage dit --inputs dit_io.safetensors -o dit_out.safetensors
#[derive(Parser)]
#[command(version, verbatim_doc_comment)]
struct Cli {
    /// Export directory (from `v2l-export`) or a model file inside one
    #[arg(long, global = true)]
    engine: Option<PathBuf>,
    /// CPU threads for ONNX Runtime (0: one per core)
    #[arg(long, global = true, default_value_t = 0)]
    threads: usize,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run one component on named tensors
    Stage {
        #[arg(value_enum)]
        stage: StageArg,
        /// safetensors file with the stage's input tensors
        #[arg(long)]
        inputs: PathBuf,
        /// safetensors file to write the outputs to
        #[arg(short, long)]
        output: PathBuf,
        /// LoRA to fuse into the DiT (diffusers/PEFT, kohya or ComfyUI safetensors)
        #[arg(long)]
        lora: Option<PathBuf>,
        /// LoRA multiplier: the fuse scale is multiplier · alpha / rank
        #[arg(long, default_value_t = 1.0)]
        lora_scale: f32,
        /// Reference outputs (e.g. from PyTorch) to compare against: prints the relative L2
        /// error of each output against the tensor of the same name in this file
        #[arg(long)]
        compare: Option<PathBuf>,
        /// Reference tensor name for an output, as OUTPUT=REFERENCE (e.g. sample=output); repeatable
        #[arg(long = "compare-name", value_name = "OUT=REF")]
        compare_names: Vec<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum StageArg {
    Dit,
    VaeEncode,
    VaeDecode,
    Hypernet,
}

impl From<StageArg> for Stage {
    fn from(s: StageArg) -> Stage {
        match s {
            StageArg::Dit => Stage::Dit,
            StageArg::VaeEncode => Stage::VaeEncode,
            StageArg::VaeDecode => Stage::VaeDecode,
            StageArg::Hypernet => Stage::Hypernet,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    main_with(|| {
        let engine = cli.engine.as_ref().ok_or_else(|| {
            Failure::new("no engine given")
                .with_hint("pass --engine <export dir>, e.g. `v2l-run --engine out/ stage dit ...`")
        })?;
        let opts = SessionOptions {
            threads: cli.threads,
            ..Default::default()
        };
        match cli.command {
            Some(Command::Stage { stage, inputs, output, lora, lora_scale, compare, compare_names }) => {
                let stage = Stage::from(stage);
                let dir = ExportDir::open(engine)?;
                let tensors = read_safetensors(&inputs)?;
                check_inputs(stage, &tensors, &inputs)?;
                let lora = match lora {
                    Some(path) => {
                        let modules: Vec<String> = dir.dit_targets()?.iter().map(|t| t.name.clone()).collect();
                        let lora = v2l_runtime::lora::format::read(&path, Some(&modules)).map_err(v2l_runtime::RuntimeError::from)?;
                        Some(AppliedLora { lora, source: path, multiplier: lora_scale })
                    }
                    None => None,
                };
                let out = run_stage(&dir, stage, &tensors, &opts, lora.as_ref())?;
                write_safetensors(&output, &out)?;
                for (name, t) in &out {
                    println!("{name} {:?}", t.shape);
                }
                if let Some(reference) = compare {
                    compare_outputs(&out, &reference, &compare_names)?;
                }
                Ok(())
            }
            None => Err(Failure::new("the end-to-end video pipeline is not available in this build yet")
                .with_hint("run one component with `v2l-run --engine <dir> stage <dit|vae-encode|vae-decode> ...`")),
        }
    })
}

/// Prints `relative L2 error` of each output against a reference file.
fn compare_outputs(
    out: &std::collections::BTreeMap<String, v2l_runtime::Tensor>,
    reference: &std::path::Path,
    names: &[String],
) -> Result<(), Failure> {
    let refs = read_safetensors(reference)?;
    for (name, t) in out {
        let ref_name = names
            .iter()
            .filter_map(|m| m.split_once('='))
            .find(|(o, _)| o == name)
            .map(|(_, r)| r.to_string())
            .unwrap_or_else(|| name.clone());
        let r = refs.get(&ref_name).ok_or_else(|| {
            Failure::new(format!(
                "{}: no tensor `{ref_name}` to compare `{name}` with",
                reference.display()
            ))
            .with_hint("map names with --compare-name OUTPUT=REFERENCE")
        })?;
        if r.shape != t.shape {
            return Err(Failure::new(format!(
                "{}: `{ref_name}` has shape {:?}, the output `{name}` {:?}",
                reference.display(),
                r.shape,
                t.shape
            )));
        }
        println!(
            "{name} vs {ref_name}: relative L2 error {:.3e}",
            t.rel_l2(r)
        );
    }
    Ok(())
}
