//! Running one pipeline component on named tensors: `v2l-run ... stage <name>`.
//!
//! This is how a user validates an export against PyTorch: dump a component's inputs from
//! diffusers to safetensors, run the same component here, compare the outputs. Tensor names
//! follow the fixtures (DESIGN.md).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use v2l_export::Manifest;

use crate::error::{Result, RuntimeError};
use crate::session::{Model, SessionOptions};
use crate::tensor::Tensor;

/// A component that `stage` can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Dit,
    VaeEncode,
    VaeDecode,
    Hypernet,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Dit => "dit",
            Stage::VaeEncode => "vae-encode",
            Stage::VaeDecode => "vae-decode",
            Stage::Hypernet => "hypernet",
        }
    }

    /// Input tensor names, as in the fixtures.
    pub fn inputs(self) -> &'static [&'static str] {
        match self {
            Stage::Dit => &[
                "hidden_states",
                "encoder_hidden_states",
                "timestep",
                "rope_cos",
                "rope_sin",
            ],
            Stage::VaeEncode => &["video"],
            Stage::VaeDecode => &["latents"],
            Stage::Hypernet => &["reference_latents"],
        }
    }
}

/// An export directory (or a file inside one) and its manifest.
pub struct ExportDir {
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// The engine bundle, when the directory was compiled by `v2l-compile` (checked on open).
    pub bundle: Option<crate::bundle::Bundle>,
}

impl ExportDir {
    /// Opens `path`: an export directory, or a model file inside one.
    pub fn open(path: &Path) -> Result<ExportDir> {
        let dir = if path.is_file() {
            path.parent().unwrap_or(Path::new(".")).to_path_buf()
        } else {
            path.to_path_buf()
        };
        if !dir.is_dir() {
            return Err(RuntimeError::Io {
                path: path.into(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no such engine or export directory",
                ),
            });
        }
        let manifest = Manifest::read(&dir).map_err(|e| RuntimeError::BadFile {
            path: dir.clone(),
            message: e.to_string(),
        })?;
        let bundle = crate::bundle::verify(&dir)?;
        Ok(ExportDir {
            dir,
            manifest,
            bundle,
        })
    }

    fn missing(&self, what: &str, cmd: &str) -> RuntimeError {
        RuntimeError::Invalid {
            what: self.dir.display().to_string(),
            message: format!(
                "holds no {what}; export one with `v2l-export {cmd} ... -o {}`",
                self.dir.display()
            ),
        }
    }

    /// Loads the DiT graph.
    pub fn dit(&self, opts: &SessionOptions) -> Result<Model> {
        let e = self
            .manifest
            .dit
            .as_ref()
            .ok_or_else(|| self.missing("DiT", "dit"))?;
        Model::load(&self.dir.join(&e.file), opts)
    }

    /// The DiT's LoRA-targetable linear layers.
    pub fn dit_targets(&self) -> Result<&[v2l_export::LinearInfo]> {
        Ok(&self
            .manifest
            .dit
            .as_ref()
            .ok_or_else(|| self.missing("DiT", "dit"))?
            .lora_targets)
    }

    /// Loads the DiT with `lora` fused into its weights (an ORT session built with the fused
    /// initializers in place of the base ones).
    pub fn dit_with_lora(&self, opts: &SessionOptions, lora: &AppliedLora) -> Result<Model> {
        let e = self
            .manifest
            .dit
            .as_ref()
            .ok_or_else(|| self.missing("DiT", "dit"))?;
        let path = self.dir.join(&e.file);
        let weights = crate::lora::apply::fused_weights(
            &path,
            &e.lora_targets,
            &lora.lora,
            lora.multiplier,
            &lora.source,
        )?;
        let mut opts = opts.clone();
        if opts.backend.backend == crate::backend::Backend::TensorRt {
            // TensorRT's engine cache key ignores weight values: key this session's engine by
            // its fused weights, or a cached engine of another LoRA (or the base) would be reused.
            let mut h = crate::backend::PartsHasher::default();
            h.part(opts.backend.weight_hash.as_bytes());
            for (name, t) in &weights {
                h.part(name.as_bytes());
                let v = t.as_f32(name)?;
                h.part(&v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>());
            }
            opts.backend.weight_hash = h.finish();
        }
        Model::load_with_weights(&path, &opts, weights)
    }
}

/// Checks that `inputs` holds every tensor `stage` needs; `source` names the file for errors.
pub fn check_inputs(stage: Stage, inputs: &BTreeMap<String, Tensor>, source: &Path) -> Result<()> {
    for name in stage.inputs() {
        if !inputs.contains_key(*name) {
            return Err(RuntimeError::MissingTensor {
                path: source.into(),
                name: name.to_string(),
            });
        }
    }
    Ok(())
}

/// A LoRA to fuse into the DiT's weights for a run: the file it came from and its multiplier.
pub struct AppliedLora {
    pub lora: crate::lora::format::Lora,
    pub source: PathBuf,
    pub multiplier: f32,
}

/// What a stage run produced, and where its time went.
pub struct StageRun {
    pub outputs: BTreeMap<String, Tensor>,
    /// Session building (graph load, optimisation, weights), in milliseconds.
    pub load_ms: f64,
    /// Running the component on the inputs, in milliseconds (the median of `runs_ms`).
    pub run_ms: f64,
    /// Every run, in order (the first pays for first-touch memory; later ones are steady state).
    pub runs_ms: Vec<f64>,
}

/// Runs `f` `runs` times (at least once), returning the last result and each run's time.
fn timed<T>(runs: usize, mut f: impl FnMut() -> Result<T>) -> Result<(T, Vec<f64>)> {
    let mut times = Vec::with_capacity(runs.max(1));
    let mut last = None;
    for _ in 0..runs.max(1) {
        let t = std::time::Instant::now();
        last = Some(f()?);
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    match last {
        Some(v) => Ok((v, times)),
        None => Err(RuntimeError::Invalid {
            what: "stage".into(),
            message: "no run".into(),
        }),
    }
}

/// Runs `stage` of the export in `dir` on `inputs`, with `lora` fused into the DiT if given,
/// `runs` times on one loaded session (for timing; the outputs are the last run's).
pub fn run_stage(
    dir: &ExportDir,
    stage: Stage,
    inputs: &BTreeMap<String, Tensor>,
    opts: &SessionOptions,
    lora: Option<&AppliedLora>,
    vae_tiling: crate::vae::TilingMode,
    runs: usize,
) -> Result<StageRun> {
    if lora.is_some() && stage != Stage::Dit {
        return Err(RuntimeError::Invalid {
            what: format!("stage {}", stage.name()),
            message: "--lora applies to the dit stage only".into(),
        });
    }
    let ms = |t: std::time::Instant| t.elapsed().as_secs_f64() * 1e3;
    let t0 = std::time::Instant::now();
    let (outputs, load_ms, runs_ms) = match stage {
        Stage::Dit => {
            let mut m = match lora {
                None => dir.dit(opts)?,
                Some(l) => dir.dit_with_lora(opts, l)?,
            };
            let load_ms = ms(t0);
            let feed = stage
                .inputs()
                .iter()
                .map(|n| (n.to_string(), inputs[*n].clone()))
                .collect();
            let (mut out, times) = timed(runs, || m.run(&feed))?;
            let sample = out.remove("sample").ok_or_else(|| RuntimeError::Invalid {
                what: dir.dir.display().to_string(),
                message: "the DiT graph has no `sample` output".into(),
            })?;
            (
                BTreeMap::from([("sample".to_string(), sample)]),
                load_ms,
                times,
            )
        }
        Stage::VaeEncode => {
            let mut vae = crate::vae::Vae::load(dir, opts)?;
            vae.tiling = vae_tiling;
            let load_ms = ms(t0);
            let ((mean, logvar), times) = timed(runs, || vae.encode(&inputs["video"]))?;
            (
                BTreeMap::from([
                    ("posterior_mean".to_string(), mean),
                    ("posterior_logvar".to_string(), logvar),
                ]),
                load_ms,
                times,
            )
        }
        Stage::VaeDecode => {
            let mut vae = crate::vae::Vae::load(dir, opts)?;
            vae.tiling = vae_tiling;
            let load_ms = ms(t0);
            let (sample, times) = timed(runs, || vae.decode(&inputs["latents"]))?;
            (
                BTreeMap::from([("sample".to_string(), sample)]),
                load_ms,
                times,
            )
        }
        Stage::Hypernet => {
            let mut p = crate::predict::Predictor::load(dir, opts)?;
            let load_ms = ms(t0);
            let (hw, times) = timed(runs, || p.hyper_weights(&inputs["reference_latents"]))?;
            (
                BTreeMap::from([("hyper_weights".to_string(), hw)]),
                load_ms,
                times,
            )
        }
    };
    let mut sorted = runs_ms.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    Ok(StageRun {
        outputs,
        load_ms,
        run_ms: sorted.get(sorted.len() / 2).copied().unwrap_or(0.0),
        runs_ms,
    })
}
