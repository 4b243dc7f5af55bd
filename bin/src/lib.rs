//! Shared plumbing of the `v2l-*` binaries: error reporting and exit codes.
//!
//! Exit codes (one `error:` line, maybe a `hint:` line): 0 success, 1 bad input (a value, a
//! file, a LoRA), 2 command-line usage errors (clap's), 3 ONNX Runtime missing or unloadable,
//! 4 ONNX Runtime failed while running, 5 cancelled: `RuntimeError::kind`, the same
//! classification the C ABI's status codes come from. Data goes to stdout, messages to stderr.
//! Ended by SIGINT, SIGTERM or SIGHUP, a binary first removes the outputs it was writing, then
//! ends by the signal (a shell's 130 for Ctrl-C, 143 for SIGTERM).

use std::fmt::Display;
use std::process::ExitCode;
use v2l_contracts::io::files as files_io;
use v2l_contracts::request::Field;

pub mod fuse_checkpoint;
pub mod generate;
pub mod lora;
pub mod stage;

/// A failure as shown to the user: the message and an optional fix.
pub struct Failure {
    pub message: String,
    pub hint: Option<String>,
    /// 2 for a command line that cannot work (a missing argument), 1 for bad input or work.
    pub exit_code: u8,
}

impl Failure {
    pub fn new(message: impl Display) -> Self {
        Failure {
            message: message.to_string(),
            hint: None,
            exit_code: 1,
        }
    }

    /// A command-line usage error (exit code 2, as clap's own).
    pub fn usage(message: impl Display) -> Self {
        Failure {
            exit_code: 2,
            ..Failure::new(message)
        }
    }

    pub fn with_hint(mut self, hint: impl Display) -> Self {
        self.hint = Some(hint.to_string());
        self
    }
}

impl From<v2l_export::ExportError> for Failure {
    fn from(e: v2l_export::ExportError) -> Self {
        Failure::new(e)
    }
}

impl From<v2l_runtime::RuntimeError> for Failure {
    fn from(e: v2l_runtime::RuntimeError) -> Self {
        let hint = e.hint();
        let mut exit_code = e.kind().exit_code();
        let message = match &e {
            // A request field by its command-line flag: `--frames: 48: must be 1 + 4k …`.
            v2l_runtime::RuntimeError::Request(r) => {
                // A flag this engine lacks or does not take (`--image` for a text-to-video
                // engine, `--scheduler` for Wan): the command line cannot work, as clap's.
                if matches!(r.field, Field::Image | Field::Scheduler) {
                    exit_code = 2;
                }
                request_message(r)
            }
            e => e.to_string(),
        };
        Failure {
            message,
            hint,
            exit_code,
        }
    }
}

impl From<v2l_compile::CompileError> for Failure {
    fn from(e: v2l_compile::CompileError) -> Self {
        match e {
            v2l_compile::CompileError::Runtime(e) => Failure::from(e),
            e => Failure {
                message: e.to_string(),
                hint: e.hint(),
                exit_code: e.kind().exit_code(),
            },
        }
    }
}

impl From<v2l_runtime::request::RequestError> for Failure {
    fn from(e: v2l_runtime::request::RequestError) -> Self {
        Failure::from(v2l_runtime::RuntimeError::Request(e))
    }
}

/// A request error as the command line says it: the field's flag, the message, and for a
/// limit the environment variable that raises it.
pub fn request_message(e: &v2l_runtime::request::RequestError) -> String {
    format!("{}: {}", e.field.flag(), e.message_with_env_hint())
}

impl From<v2l_contracts::ManifestError> for Failure {
    fn from(e: v2l_contracts::ManifestError) -> Self {
        Failure::new(e)
    }
}

impl From<v2l_graphs::WriteError> for Failure {
    fn from(e: v2l_graphs::WriteError) -> Self {
        Failure::new(e)
    }
}

/// A run's progress on stderr when `show` (stderr is a terminal and not `--quiet`): a bar
/// for the reference clip's encode (with `--reference`), one for the denoising steps, then
/// one for the decode's frame batches (`decoding [###   ] i/n  12.3s`, each timed from the end
/// of the one before), redrawn as each step or batch ends. It never cancels.
pub struct ProgressBars {
    show: bool,
    started: std::time::Instant,
}

impl ProgressBars {
    pub fn new(show: bool) -> ProgressBars {
        ProgressBars {
            show,
            started: std::time::Instant::now(),
        }
    }

    fn draw(&mut self, what: &str, i: usize, n: usize) {
        if !self.show {
            return;
        }
        let w = 30;
        let done = (i * w / n.max(1)).min(w);
        let el = self.started.elapsed().as_secs_f64();
        eprint!(
            "\r{what} [{}{}] {i}/{n}  {el:.1}s",
            "#".repeat(done),
            " ".repeat(w - done)
        );
        if i == n {
            eprintln!();
            // The next bar is timed from here.
            self.started = std::time::Instant::now();
        }
    }
}

impl v2l_runtime::pipeline::Progress for ProgressBars {
    fn reference(&mut self, done: usize, of: usize) -> bool {
        self.draw("reference", done, of);
        true
    }

    fn step(&mut self, done: usize, of: usize) -> bool {
        self.draw("denoising", done, of);
        true
    }

    fn decode(&mut self, done: usize, of: usize) -> bool {
        self.draw("decoding", done, of);
        true
    }
}

/// This process's peak resident memory in MB (10⁶ bytes), from `VmHWM` in
/// `/proc/self/status`: the high-water mark of this process's own memory since its `exec`. A
/// parent's `wait4`/`getrusage` figure is no substitute: Linux carries the spawning process's
/// peak across fork and exec into the child's `ru_maxrss`. 0 where `/proc` is missing.
pub fn own_peak_rss_mb() -> f64 {
    v2l_runtime::stages::process_peak_rss_mb()
}

/// Runs `f`, printing a failure as `error: …` / `hint: …` and exiting with its code (1–5, see
/// the module doc).
pub fn main_with(f: impl FnOnce() -> Result<(), Failure>) -> ExitCode {
    quiet_on_closed_stdout();
    remove_partial_outputs_on_signal();
    match f() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", e.message);
            if let Some(h) = e.hint {
                eprintln!("hint: {h}");
            }
            ExitCode::from(e.exit_code)
        }
    }
}

/// On Ctrl-C (SIGINT), SIGTERM or SIGHUP: removes the outputs being written (their
/// temporary `.v2l-*` siblings; finished ones stay), says so on stderr, and ends the process
/// by the signal, as it would have ended without this (a shell sees 130 for Ctrl-C). Without
/// it the signal ended the process at once and left them: an export's weight file, many GB at
/// 5B, or an engine directory half built. A signal the process was started ignoring (`nohup`,
/// a script's background job) stays ignored; a second one ends the process at once, should
/// the removal take long.
fn remove_partial_outputs_on_signal() {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let caught: Vec<_> = [SIGINT, SIGTERM, SIGHUP]
        .into_iter()
        .filter(|&s| !ignored(s))
        .collect();
    let Ok(mut signals) = signal_hook::iterator::Signals::new(&caught) else {
        // The signals keep their default action: nothing is worse than before.
        return;
    };
    std::thread::spawn(move || {
        let mut arriving = signals.forever();
        let Some(signal) = arriving.next() else {
            return;
        };
        std::thread::spawn(move || {
            let removed = v2l_contracts::atomic::remove_partial_outputs();
            let name = match signal {
                SIGINT => "SIGINT",
                SIGTERM => "SIGTERM",
                _ => "SIGHUP",
            };
            match removed {
                0 => eprintln!("interrupted ({name})"),
                1 => eprintln!("interrupted ({name}): removed the partial output"),
                n => eprintln!("interrupted ({name}): removed {n} partial outputs"),
            }
            end_by(signal);
        });
        if let Some(again) = arriving.next() {
            end_by(again);
        }
    });
}

/// Ends the process by `signal`'s default action, as if it had not been caught.
fn end_by(signal: i32) -> ! {
    let _ = signal_hook::low_level::emulate_default_handler(signal);
    // Where the signal did not end it (it cannot fail to, for these three).
    signal_hook::low_level::exit(128 + signal)
}

/// Whether the process was started with `signal` ignored (inherited across exec).
fn ignored(signal: i32) -> bool {
    // SAFETY: a query only (no new action); `old` is a valid, zeroed `sigaction` to write.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(signal, std::ptr::null(), &mut old) == 0
            && old.sa_sigaction == libc::SIG_IGN
    }
}

/// An output path that can be written: a file name with one of `exts`, in an existing
/// directory, not a directory or a device. Checked before the work, not after it.
pub fn check_output(path: &std::path::Path, exts: &[&str]) -> Result<(), Failure> {
    let bad = |m: String| Failure::new(format!("{}: {m}", path.display()));
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if !exts.contains(&ext) {
        return Err(bad(format!(
            "the output needs a .{} extension",
            exts.join(" or .")
        )));
    }
    if let Ok(m) = std::fs::metadata(path) {
        if !m.is_file() {
            return Err(bad("exists and is not a regular file".into()));
        }
    }
    check_not_in_an_engine(path)?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() && !m.permissions().readonly() => Ok(()),
        Ok(_) => Err(bad("the output directory is not writable".into())),
        Err(_) => Err(bad("the output directory does not exist".into())),
    }
}

/// Refuses an output inside an engine directory (one holding `bundle.json`), whichever engine
/// it is and however the path reaches it (symlinks resolved): writing there could replace one
/// of its parts, and the next run would find the engine broken.
pub fn check_not_in_an_engine(path: &std::path::Path) -> Result<(), Failure> {
    let Some(at) = v2l_contracts::input::resolved(path) else {
        return Ok(());
    };
    let bundle = v2l_contracts::bundle::FILE_NAME;
    match at.ancestors().skip(1).find(|d| d.join(bundle).is_file()) {
        Some(engine) => Err(Failure::usage(format!(
            "{}: is inside the engine directory {}; writing there could replace a part of an engine: write elsewhere",
            path.display(),
            engine.display()
        ))),
        None => Ok(()),
    }
}

/// A reader that stops reading stdout (`v2l-lora inspect … | head -1`) ends the command quietly
/// with exit code 0, as ripgrep does, instead of a panic about a broken pipe. SIGPIPE stays
/// ignored (Rust's default), so a failed write to ffmpeg's pipe is still an error, not a kill.
pub fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(0);
        }
        default(info)
    }));
}

/// Refuses an output that is one of the inputs: `outputs` (flag, path) against `inputs`
/// (flag, path), compared as the files they name (`./a.png` and `a.png` are one file).
pub fn check_outputs_are_not_inputs(
    outputs: &[(&str, &std::path::Path)],
    inputs: &[(&str, &std::path::Path)],
) -> Result<(), Failure> {
    for (oflag, out) in outputs {
        for (iflag, inp) in inputs {
            if same_file(out, inp) {
                return Err(Failure::usage(format!(
                    "{oflag} {}: is also the input {iflag}; writing it would destroy the input",
                    out.display()
                )));
            }
        }
    }
    Ok(())
}

/// Refuses an output inside the directory of the engine in use (`engine`: the engine or
/// export directory, or a model file in one): writing there would replace one of its parts,
/// and the next run would find the engine broken.
pub fn check_outputs_outside_engine(
    outputs: &[(&str, &std::path::Path)],
    engine: &std::path::Path,
) -> Result<(), Failure> {
    let dir = if engine.is_file() {
        engine.parent().unwrap_or(std::path::Path::new("."))
    } else {
        engine
    };
    let Ok(dir) = std::fs::canonicalize(dir) else {
        return Ok(()); // no engine there: opening it says so
    };
    for (flag, out) in outputs {
        if v2l_contracts::input::resolved(out).is_some_and(|o| o.starts_with(&dir)) {
            return Err(Failure::usage(format!(
                "{flag} {}: is inside the engine directory {}; writing there could replace a part of the engine in use: write elsewhere",
                out.display(),
                dir.display()
            )));
        }
    }
    Ok(())
}

/// Whether two paths name one file (the output may not exist yet: its directory is compared).
pub fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    matches!((v2l_contracts::input::resolved(a), v2l_contracts::input::resolved(b)), (Some(x), Some(y)) if x == y)
}

pub use v2l_export::pipeline::bytes;

/// The effect-prompt flags `v2l-lora predict` and `v2l-run` share.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct EffectArgs {
    /// Effect prompt: the LoRA is predicted by the engine's effect hypernetwork (Prompt2Effect
    /// or LoFA); repeat to blend several with --effect-weights
    #[arg(long, value_name = "TEXT")]
    pub effect: Vec<String>,
    /// Effect prompt embeddings instead of text: safetensors with `prompt_embeds [1, T, E]`;
    /// repeatable, after the --effect prompts in --effect-weights order
    #[arg(long, value_name = "FILE")]
    pub effect_embeds: Vec<std::path::PathBuf>,
    /// Weight of each effect, comma-separated, in order (default: 1 each); the blend is exact
    /// (rank concatenation)
    #[arg(
        long,
        value_name = "W,W,...",
        value_delimiter = ',',
        allow_negative_numbers = true
    )]
    pub effect_weights: Vec<f32>,
    /// The hypernetwork for the effects: prompt2effect or lofa (default: the one the engine
    /// has, prompt2effect if both)
    #[arg(long, value_enum)]
    pub hypernet: Option<HypernetArg>,
}

impl EffectArgs {
    /// Whether any effect was given.
    pub fn any(&self) -> bool {
        !self.effect.is_empty() || !self.effect_embeds.is_empty()
    }

    /// The effects with their weights ([`effects`]).
    pub fn effects(&self) -> Result<Vec<(v2l_runtime::effect::Effect, f32)>, Failure> {
        effects(&self.effect, &self.effect_embeds, &self.effect_weights)
    }
}

/// The effects of `--effect TEXT` (in order), then `--effect-embeds FILE` (each a safetensors
/// with `prompt_embeds [1, T, E]`), each with its `--effect-weights` value (default 1).
pub fn effects(
    prompts: &[String],
    embeds: &[std::path::PathBuf],
    weights: &[f32],
) -> Result<Vec<(v2l_runtime::effect::Effect, f32)>, Failure> {
    use v2l_runtime::effect::Effect;
    let n = prompts.len() + embeds.len();
    if n == 0 {
        return Err(Failure::usage("give --effect TEXT or --effect-embeds FILE"));
    }
    if !weights.is_empty() && weights.len() != n {
        return Err(Failure::usage(format!(
            "--effect-weights has {} values for {n} effects",
            weights.len()
        )));
    }
    let mut out = Vec::with_capacity(n);
    for p in prompts {
        out.push(Effect::Prompt(p.clone()));
    }
    for path in embeds {
        let t = v2l_runtime::read_safetensors(path)?
            .remove(files_io::PROMPT_EMBEDS)
            .ok_or_else(|| {
                Failure::from(v2l_runtime::RuntimeError::MissingTensor {
                    path: path.clone(),
                    name: files_io::PROMPT_EMBEDS.into(),
                })
            })?;
        out.push(Effect::Embeds(t));
    }
    out.into_iter()
        .enumerate()
        .map(|(i, e)| {
            let w = weights.get(i).copied().unwrap_or(1.0);
            Ok((e, v2l_runtime::limits::finite("--effect-weights", w)?))
        })
        .collect()
}

/// `--hypernet`: which effect hypernetwork predicts.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum HypernetArg {
    Prompt2effect,
    Lofa,
}

/// The hypernetwork `given`, or the one the engine has.
pub fn hypernet(
    engine: &v2l_runtime::engine::Engine,
    given: Option<HypernetArg>,
) -> Result<v2l_runtime::effect::Hypernet, Failure> {
    use v2l_runtime::effect::Hypernet;
    Ok(match given {
        Some(HypernetArg::Prompt2effect) => Hypernet::Prompt2Effect,
        Some(HypernetArg::Lofa) => Hypernet::Lofa,
        None => Hypernet::of(engine).ok_or_else(|| {
            Failure::new(format!(
                "{} holds no effect hypernetwork",
                engine.dir.display()
            ))
            .with_hint(format!(
                "export one into it: `v2l-export prompt2effect CKPT -o {0}` or `v2l-export lofa STAGE1 STAGE2 -o {0}`",
                engine.dir.display()
            ))
        })?,
    })
}
