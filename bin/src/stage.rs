//! `v2l-run stage`: one pipeline component on a safetensors file of inputs, checked against
//! the engine, timed, compared with reference outputs and profiled where asked.

use std::path::{Path, PathBuf};

use clap::ValueEnum;
use v2l_contracts::io::files as files_io;
use v2l_contracts::io::text as text_io;
use v2l_runtime::engine::Engine;
use v2l_runtime::lora::AppliedLora;
use v2l_runtime::request;
use v2l_runtime::{read_safetensors, write_safetensors, SessionOptions};
use v2l_tools::stage::{check_inputs, run_stage, Stage};

use crate::{check_output, Failure};

#[derive(Clone, Copy, ValueEnum)]
pub enum StageArg {
    Dit,
    VaeEncode,
    VaeDecode,
    Hypernet,
    /// The prompt encoder: `input_ids [B, L]` int64 -> `prompt_embeds`
    TextEncoder,
    /// Tokenizer + prompt encoder: `--prompts FILE` -> `input_ids`, `prompt_embeds`
    Text,
}

impl From<StageArg> for Stage {
    fn from(s: StageArg) -> Stage {
        match s {
            StageArg::Dit => Stage::Dit,
            StageArg::VaeEncode => Stage::VaeEncode,
            StageArg::VaeDecode => Stage::VaeDecode,
            StageArg::Hypernet => Stage::Hypernet,
            StageArg::TextEncoder | StageArg::Text => Stage::TextEncoder,
        }
    }
}

/// `stage`'s arguments.
#[derive(clap::Args)]
pub struct StageArgs {
    #[arg(value_enum)]
    pub stage: StageArg,
    /// safetensors file with the stage's input tensors
    #[arg(long, required_unless_present = "prompts")]
    pub inputs: Option<PathBuf>,
    /// `text` stage: a JSON file holding an array of prompt strings
    #[arg(long, conflicts_with = "inputs")]
    pub prompts: Option<PathBuf>,
    /// Output .safetensors file for the outputs, replaced if it exists
    #[arg(short, long)]
    pub output: PathBuf,
    /// LoRA for the DiT (diffusers/PEFT, kohya or ComfyUI safetensors), applied by the engine's
    /// LoRA strategy as generation applies it (`unfused` on GPU engines: a branch per layer)
    #[arg(long)]
    pub lora: Option<PathBuf>,
    /// With --lora: the LoRA strategy instead of the engine's (fused, bound or unfused; on a
    /// cuda engine `bound` merges the LoRA into the weights on the GPU)
    #[arg(long, value_name = "STRATEGY", requires = "lora")]
    pub lora_strategy: Option<String>,
    /// LoRA multiplier: the scale is multiplier · alpha / rank
    #[arg(long, default_value_t = 1.0)]
    pub lora_scale: f32,
    /// Reference outputs (e.g. from PyTorch) to compare against: prints the relative L2
    /// error of each output against the tensor of the same name in this file
    #[arg(long)]
    pub compare: Option<PathBuf>,
    /// Reference tensor name for an output, as OUTPUT=REFERENCE (e.g. sample=output); repeatable
    #[arg(long = "compare-name", value_name = "OUT=REF")]
    pub compare_names: Vec<String>,
    /// With --compare: fail (exit 1) when an output's relative L2 error exceeds this, so a
    /// script's parity check can fail (e.g. 1e-4 for f32 engines)
    #[arg(long, value_name = "E", requires = "compare")]
    pub max_error: Option<f64>,
    /// Print one JSON object on stdout: output shapes, session build and run time (ms)
    #[arg(long)]
    pub json: bool,
    /// Run the component this many times on one loaded session (timings: the median, and
    /// every run with --json; the first run pays for first-touch memory)
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// Write ONNX Runtime's per-node trace of each session into DIR (new or without
    /// traces) and print where the time went, by operator and provider (with --json, as
    /// `profile`). On CUDA, set CUDA_LAUNCH_BLOCKING=1 so each node's time is its kernels'
    #[arg(long, value_name = "DIR")]
    pub profile: Option<PathBuf>,
}

/// `v2l-run stage`: one component on a tensor file, checked, timed, optionally compared and profiled.
pub fn run(
    engine: &std::path::Path,
    args: &StageArgs,
    threads: usize,
    device: u32,
    max_sequence_length: Option<usize>,
    tiling: v2l_runtime::vae::TilingMode,
) -> Result<(), Failure> {
    let StageArgs {
        stage,
        inputs,
        prompts,
        output,
        lora,
        lora_strategy,
        lora_scale,
        compare,
        compare_names,
        max_error,
        json,
        repeat,
        profile,
    } = args;
    let (stage, lora_scale, json, repeat) = (*stage, *lora_scale, *json, *repeat);
    if let StageArg::Text = stage {
        let file = prompts.as_ref().ok_or_else(|| {
            Failure::usage("the text stage reads --prompts FILE (a JSON array of strings)")
        })?;
        check_output(&output, &["safetensors"])?;
        crate::check_outputs_are_not_inputs(&[("-o", &output)], &[("--prompts", file)])?;
        crate::check_outputs_outside_engine(&[("-o", &output)], engine)?;
        let dir = Engine::open(engine)?;
        let opts = dir.session_options_on(threads, device)?;
        return text_stage(&dir, &opts, file, &output, max_sequence_length);
    }
    let inputs = inputs.clone().ok_or_else(|| {
        Failure::usage(format!(
            "stage {}: give --inputs FILE",
            Stage::from(stage).name()
        ))
    })?;
    let stage = Stage::from(stage);
    check_output(&output, &["safetensors"])?;
    let mut read = vec![("--inputs", inputs.as_path())];
    read.extend(lora.as_deref().map(|l| ("--lora", l)));
    crate::check_outputs_are_not_inputs(&[("-o", &output)], &read)?;
    crate::check_outputs_outside_engine(&[("-o", &output)], engine)?;
    v2l_runtime::limits::finite("--lora-scale", lora_scale)?;
    let strategy = lora_strategy
        .as_deref()
        .map(crate::generate::parse_strategy)
        .transpose()?;
    v2l_runtime::limits::Limits::from_env()?.check_threads(threads)?;
    let dir = Engine::open(engine)?;
    let mut opts = dir.session_options_on(threads, device)?;
    if let Some(p) = &profile {
        check_profile_dir(p)?;
        opts.profile = Some(p.clone());
    }
    let tensors = read_safetensors(&inputs)?;
    check_inputs(&dir, stage, &tensors, &inputs)?;
    let lora = match lora {
        Some(path) => {
            let modules: Vec<String> = dir.dit_targets()?.iter().map(|t| t.name.clone()).collect();
            let lora = v2l_runtime::lora::format::read(&path, Some(&modules))
                .map_err(v2l_runtime::RuntimeError::from)?;
            Some(AppliedLora {
                lora: lora.into(),
                source: path.clone(),
                multiplier: lora_scale,
            })
        }
        None => None,
    };
    if !(1..=1000).contains(&repeat) {
        return Err(Failure::usage(format!(
            "--repeat {repeat}: must be 1 to 1000"
        )));
    }
    let lora = lora.as_ref().map(|l| (l, strategy));
    let run = run_stage(&dir, stage, &tensors, &opts, lora, tiling, repeat)?;
    let out = run.outputs;
    write_safetensors(&output, &out)?;
    let profile = match &profile {
        Some(p) => {
            let summary = v2l_tools::profile::summarize(p).map_err(Failure::new)?;
            eprint!("{summary}");
            Some(summary)
        }
        None => None,
    };
    if json {
        let shapes: serde_json::Map<String, serde_json::Value> = out
            .iter()
            .map(|(n, t)| (n.clone(), serde_json::json!(t.shape)))
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "outputs": shapes, "load_ms": run.load_ms, "run_ms": run.run_ms,
                "runs_ms": run.runs_ms, "attention": dir.attention(),
                "int8_gemm": dir.int8_gemm(),
                "vae_conv": dir.vae_conv(),
                "peak_rss_mb": crate::own_peak_rss_mb(),
                "machine": v2l_runtime::cpu::this(),
                "compiled_on": dir.compiled_on(),
                "profile": profile,
                // Graphs asked to run as CUDA graphs that ONNX Runtime would not capture.
                "uncaptured_graphs": v2l_runtime::session::uncaptured_graphs(),
                // Whether the sessions took one arena (`cuda:0`) or each their own.
                "shared_arenas": v2l_runtime::session::shared_arenas(),
            })
        );
    } else {
        for (name, t) in &out {
            println!("{name} {:?}", t.shape);
        }
    }
    if let Some(reference) = compare {
        compare_outputs(&out, reference, compare_names, *max_error)?;
    }
    Ok(())
}

/// Prints `relative L2 error` of each output against a reference file; with `max_error`, an
/// error above it (or not a number) is a failure naming the output.
fn compare_outputs(
    out: &std::collections::BTreeMap<String, v2l_runtime::Tensor>,
    reference: &std::path::Path,
    names: &[String],
    max_error: Option<f64>,
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
        let err = t.rel_l2(r);
        println!("{name} vs {ref_name}: relative L2 error {err:.3e}");
        if let Some(bound) = max_error {
            if err.is_nan() || err > bound {
                return Err(Failure::new(format!(
                    "`{name}` differs from {}'s `{ref_name}` by {err:.3e} relative L2, above --max-error {bound:.0e}",
                    reference.display()
                )));
            }
        }
    }
    Ok(())
}

/// The prompt length: `--max-sequence-length`, or the DiT's `max_text_seq_length`.
fn sequence_length(engine: &Engine, given: Option<usize>) -> Result<usize, Failure> {
    match given {
        Some(l) => Ok(request::check_sequence_length(l)?),
        None => engine.text_sequence_length().ok_or_else(|| {
            Failure::usage("give --max-sequence-length (the engine has no DiT to take it from)")
        }),
    }
}

/// `stage text`: prompts from a JSON array → `input_ids [N, L]` and `prompt_embeds [N, L, D]`.
fn text_stage(
    engine: &Engine,
    opts: &SessionOptions,
    file: &std::path::Path,
    output: &std::path::Path,
    max_sequence_length: Option<usize>,
) -> Result<(), Failure> {
    let bad = |m: String| Failure::new(format!("{}: {m}", file.display()));
    let text = v2l_contracts::input::read_text(file, v2l_contracts::input::InputKind::Record)
        .map_err(|e| bad(e.to_string()))?;
    let prompts: Vec<String> = serde_json::from_str(&text)
        .map_err(|e| bad(format!("expected a JSON array of strings ({e})")))?;
    if prompts.is_empty() {
        return Err(bad("holds no prompts".into()));
    }
    let len = sequence_length(engine, max_sequence_length)?;
    let mut enc = v2l_runtime::text::prompt::PromptEncoder::load(engine, opts)?;
    let (mut ids, mut embeds) = (Vec::new(), Vec::new());
    for (i, p) in prompts.iter().enumerate() {
        let mut warn =
            |n: usize| eprintln!("warning: prompt {i} is {n} tokens; truncated to {len}");
        let (id, e) = enc.encode(p, len, &mut warn)?;
        ids.extend(id);
        embeds.push(e);
    }
    let n = prompts.len();
    let embeds = v2l_runtime::Tensor::concat(&embeds, 0)?;
    let out = std::collections::BTreeMap::from([
        (
            text_io::INPUT_IDS.to_string(),
            v2l_runtime::Tensor::i64(vec![n, len], ids),
        ),
        (files_io::PROMPT_EMBEDS.to_string(), embeds),
    ]);
    write_safetensors(output, &out)?;
    for (name, t) in &out {
        println!("{name} {:?}", t.shape);
    }
    Ok(())
}

/// `--profile DIR`: new, or a directory without traces (the summary reads every trace in it).
fn check_profile_dir(dir: &Path) -> Result<(), Failure> {
    let traces = |d: &Path| -> std::io::Result<bool> {
        Ok(std::fs::read_dir(d)?
            .filter_map(|e| e.ok())
            .any(|e| e.path().extension().is_some_and(|x| x == "json")))
    };
    let fail = |why: String| Failure::usage(format!("--profile {}: {why}", dir.display()));
    if dir.exists() {
        match traces(dir) {
            Ok(false) => Ok(()),
            Ok(true) => Err(fail(
                "holds traces already; give a new or empty directory".into(),
            )),
            Err(e) => Err(fail(e.to_string())),
        }
    } else {
        std::fs::create_dir_all(dir).map_err(|e| fail(format!("cannot create it ({e})")))
    }
}
