//! What an engine is: an export directory or a compiled engine bundle, opened and checked
//! once (manifest read, every part's hash verified), then shared by everything that runs it.
//! Plain data (`Send + Sync`): open it once and hand it to any number of pipelines and threads.

use std::path::{Path, PathBuf};

use v2l_contracts::bundle::{Strategy, VaeGraphs, VariantGraph};
use v2l_contracts::family::WanDitConfig;
use v2l_contracts::{Family, Manifest};

use crate::error::{Result, RuntimeError};
use crate::session::{Model, SessionOptions};

/// An opened engine: an engine bundle from `v2l-compile` (every part's hash checked on open) or
/// a plain export directory from `v2l-export` (or a model file inside either), with its
/// manifest. Open it once; it is plain data (`Send + Sync`), so any number of pipelines and
/// threads can share it.
#[derive(Clone, Debug)]
pub struct Engine {
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// The engine bundle, when the directory was compiled by `v2l-compile` (checked on open).
    pub bundle: Option<crate::bundle::Bundle>,
}

/// Tokens a Wan pipeline encodes a prompt to (`WanPipeline.__call__`'s `max_sequence_length`).
pub const WAN_TEXT_TOKENS: usize = 512;

/// The largest DiT batch a GPU engine's profile admits: four guided requests in one call.
pub const MAX_DIT_BATCH: usize = 8;

impl Engine {
    /// Opens `path`: an export directory, or a model file inside one.
    pub fn open(path: &Path) -> Result<Engine> {
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
        let manifest = Manifest::read(&dir)?;
        // An unknown transformer class is never run as CogVideoX; a recorded pipeline kind must
        // agree with the channels it was derived from.
        let bad_manifest = |message| RuntimeError::BadFile {
            path: dir.join(v2l_contracts::manifest::FILE_NAME),
            message,
        };
        if let Some(d) = &manifest.dit {
            d.family().map_err(bad_manifest)?;
        }
        if manifest.pipeline.is_some() {
            manifest.pipeline_kind().map_err(bad_manifest)?;
        }
        let bundle = crate::bundle::verify(&dir)?;
        if let Some(b) = &bundle {
            b.check_parts_listed(&manifest.parts(), &dir.join(crate::bundle::FILE_NAME))?;
            if let (Some(recorded), Ok(derived)) = (b.pipeline, manifest.pipeline_kind()) {
                if recorded != derived {
                    return Err(RuntimeError::BadFile {
                        path: dir.join(crate::bundle::FILE_NAME),
                        message: format!(
                            "`pipeline` is `{recorded}` but the manifest's DiT and VAE make `{derived}`"
                        ),
                    });
                }
            }
            let isa = crate::cpu::Isa::detect();
            crate::cpu::check_int8_scheme(b.precision, b.backend, b.int8_scheme, &isa).map_err(
                |message| RuntimeError::Invalid {
                    what: dir.join(crate::bundle::FILE_NAME).display().to_string(),
                    message,
                },
            )?;
        }
        Ok(Engine {
            dir,
            manifest,
            bundle,
        })
    }

    /// Session options for running this engine: its bundle's backend (CPU for a plain export
    /// directory), with the TensorRT engine cache under `<engine>/trt_cache/<weight hash>`.
    /// Every front end builds its sessions from these, so a CUDA or TensorRT engine is never
    /// silently run on the CPU provider.
    pub fn session_options(&self, threads: usize) -> SessionOptions {
        self.options_on(threads, 0)
    }

    /// [`Engine::session_options`] on GPU `device` (CUDA's numbering, after
    /// `CUDA_VISIBLE_DEVICES`; `nvidia-smi`'s where the GPUs are alike or
    /// `CUDA_DEVICE_ORDER=PCI_BUS_ID`): one process serving from several GPUs puts each
    /// pipeline on its own. A CPU engine takes device 0 only; a device the machine lacks is
    /// ONNX Runtime's error when the first session is built.
    pub fn session_options_on(&self, threads: usize, device: u32) -> Result<SessionOptions> {
        let gpu = self
            .bundle
            .as_ref()
            .is_some_and(|b| b.backend != crate::backend::Backend::Cpu);
        let id = i32::try_from(device).ok().filter(|_| gpu || device == 0);
        let Some(id) = id else {
            return Err(RuntimeError::Invalid {
                what: "device".into(),
                message: match gpu {
                    true => format!("{device} is not a CUDA device number"),
                    false => format!(
                        "{device}: {} runs on the CPU; a GPU device is chosen for `cuda` and \
                         `tensorrt` engines (v2l-compile --backend)",
                        self.dir.display()
                    ),
                },
            });
        };
        Ok(self.options_on(threads, id))
    }

    fn options_on(&self, threads: usize, device_id: i32) -> SessionOptions {
        let backend = match &self.bundle {
            Some(b) => crate::backend::BackendOptions {
                backend: b.backend,
                device_id,
                trt_cache_dir: Some(self.dir.join("trt_cache")),
                weight_hash: b.weight_hash.clone(),
                trt_profile: Vec::new(),
                tf32: b.tf32,
                cuda: b.cuda_options.clone(),
            },
            None => Default::default(),
        };
        SessionOptions {
            threads,
            backend,
            ..Default::default()
        }
    }

    pub fn missing(&self, what: &str, cmd: &str) -> RuntimeError {
        RuntimeError::Engine {
            dir: self.dir.clone(),
            message: format!(
                "holds no {what}; export one with `v2l-export {cmd} ... -o {}`",
                self.dir.display()
            ),
        }
    }

    /// The engine's DiT entry; an error naming the engine when it has none.
    pub fn dit_entry(&self) -> Result<&v2l_contracts::manifest::DitEntry> {
        self.manifest
            .dit
            .as_ref()
            .ok_or_else(|| self.missing("DiT", "dit"))
    }

    /// Loads the DiT graph (of the engine's precision).
    pub fn dit(&self, opts: &SessionOptions) -> Result<Model> {
        Model::load(&self.dit_path()?, &self.dit_options(opts))
    }

    /// Session options for this engine's DiT graphs. An int8 engine from an f16/bf16-stored
    /// export keeps its f32 layers' weight Casts per use: folding them at session build held
    /// 3.2 GB of f32 copies for a 42-block CogVideoX-5B and took ~20 s of its load, against a
    /// per-step cost of converting those layers (one row per sample) again.
    pub fn dit_options(&self, opts: &SessionOptions) -> SessionOptions {
        let stored_low = self
            .manifest
            .dit
            .as_ref()
            .is_some_and(|d| stored_below_f32(d.weight_dtype));
        use crate::backend::Precision;
        // An fp16/bf16 engine on the CPU widens its low weights per use (emulated graph).
        let low = matches!(self.precision(), Precision::Fp16 | Precision::Bf16);
        SessionOptions {
            keep_weight_casts: opts.keep_weight_casts
                || low
                || (stored_low && matches!(self.precision(), Precision::Int8 | Precision::Int4)),
            qdq_matmul: opts.qdq_matmul
                || self
                    .bundle
                    .as_ref()
                    .is_some_and(|b| b.calibration.is_some()),
            backend: crate::backend::BackendOptions {
                trt_profile: match opts.backend.backend {
                    crate::backend::Backend::TensorRt => self.dit_trt_profile(MAX_DIT_BATCH),
                    _ => Vec::new(),
                },
                ..opts.backend.clone()
            },
            ..opts.clone()
        }
    }

    /// The unfused DiT's TensorRT optimisation profile at this engine's default size: the batch
    /// axis from 1 to `max_batch` (2, one guided request, as typical), the LoRA factors at the
    /// padded rank. Empty where the engine has no unfused DiT or no default size.
    pub fn dit_trt_profile(&self, max_batch: usize) -> Vec<crate::backend::TrtProfile> {
        use v2l_contracts::io::dit as io;
        let (Some(d), Some(b)) = (self.manifest.dit.as_ref(), self.bundle.as_ref()) else {
            return Vec::new();
        };
        if !b
            .dit_variants
            .has(VariantGraph::Strategy(Strategy::Unfused))
        {
            return Vec::new();
        }
        let (Some(frames), Some(height), Some(width)) = self.default_size() else {
            return Vec::new();
        };
        let batched = |input: &str, rest: Vec<usize>| {
            let with = |n: usize| [vec![n], rest.clone()].concat();
            crate::backend::TrtProfile {
                input: input.to_string(),
                min: with(1),
                opt: with(2.min(max_batch)),
                max: with(max_batch),
            }
        };
        let (lf, lh, lw) = v2l_contracts::LatentGrid::of_video(frames, height, width).dims();
        let hidden = match d.family() {
            Ok(Family::Wan) => vec![d.in_channels, lf, lh, lw],
            Ok(Family::CogVideoX) => vec![lf, d.in_channels, lh, lw],
            Err(_) => return Vec::new(),
        };
        let text = self.text_sequence_length().unwrap_or(226);
        let mut p = vec![
            batched(io::HIDDEN_STATES, hidden),
            batched(io::TIMESTEP, vec![]),
            batched(io::ENCODER_HIDDEN_STATES, vec![text, d.text_embed_dim]),
        ];
        if let Ok(Some(w)) = self.wan_config() {
            if let Some(dim) = w.image_dim {
                // CLIP ViT tokens: one per 14-pixel patch, plus the class token.
                let side = self
                    .manifest
                    .image_encoder
                    .as_ref()
                    .map_or(224, |e| e.image_size);
                let tokens = (side / 14) * (side / 14) + 1;
                p.push(batched(io::ENCODER_HIDDEN_STATES_IMAGE, vec![tokens, dim]));
            }
        }
        let rank = b.max_rank.unwrap_or(64);
        for t in &d.lora_targets {
            let [a, bn, s] = v2l_graphs::passes::lora_input_names(&format!("{}.weight", t.name));
            p.push(batched(&a, vec![rank, t.in_features]));
            p.push(batched(&bn, vec![t.out_features, rank]));
            p.push(batched(&s, vec![1, 1]));
        }
        p
    }

    /// Session options for the text encoder: an f16/bf16-stored encoder keeps its weights in
    /// that type and widens each per use (a T5-XXL in bf16 is 9.5 GB; folded to f32, 19 GB).
    pub fn text_encoder_options(&self, opts: &SessionOptions) -> SessionOptions {
        let low = self
            .manifest
            .text_encoder
            .as_ref()
            .is_some_and(|t| stored_below_f32(t.weight_dtype));
        SessionOptions {
            keep_weight_casts: opts.keep_weight_casts || low,
            ..opts.clone()
        }
    }

    /// The DiT graph this engine runs without a LoRA: the export's, or the bundle's graph for
    /// its precision (`dit_int8.onnx` in an int8 engine).
    pub fn dit_path(&self) -> Result<PathBuf> {
        let e = self.dit_entry()?;
        let variant = self.bundle.as_ref().and_then(|b| {
            (b.precision != crate::backend::Precision::Fp32)
                .then(|| self.dit_variant(VariantGraph::Precision(b.precision)))
                .flatten()
        });
        Ok(self.dir.join(variant.unwrap_or(&e.file)))
    }

    /// Whether this engine's graphs call v2l's attention operator but this process runs ONNX
    /// Runtime's instead: no AVX512-BF16 here (or `V2L_ATTENTION=fp32`), and the bundle has
    /// the `<variant>.ort` twins.
    fn attention_fallback(&self) -> bool {
        self.bundle.as_ref().is_some_and(|b| {
            b.attention != crate::bundle::Attention::Ort
                && crate::attention::Kernel::detect() != crate::attention::Kernel::Bf16
                && b.dit_variants.has_ort_twins()
        })
    }

    /// The bundle's graph file of DiT variant `graph` (`int8`, `unfused`, `bound`): on a CPU
    /// without v2l's bf16 attention kernel, its twin on ONNX Runtime's attention.
    pub fn dit_variant(&self, graph: VariantGraph) -> Option<&str> {
        let b = self.bundle.as_ref()?;
        self.attention_fallback()
            .then(|| b.dit_variants.file(graph, true))
            .flatten()
            .or_else(|| b.dit_variants.file(graph, false))
    }

    /// What the DiT's attention runs on in this process, for `v2l-run --json` and logs:
    /// `ort` (ONNX Runtime's f32 `MultiHeadAttention`), `bf16 (AVX512-BF16)` or
    /// `int8 (AVX512-VNNI and AVX512-BF16)` (v2l's kernels), or
    /// `ort (fallback: …)` where v2l's engine meets a CPU without AVX512-BF16.
    pub fn attention(&self) -> String {
        let asked = self.bundle.as_ref().map(|b| b.attention);
        let ours = asked.is_some_and(|a| a != crate::bundle::Attention::Ort);
        let kernel = match asked {
            Some(crate::bundle::Attention::Int8) => crate::attention::Kernel::detect_int8(),
            _ => crate::attention::Kernel::detect(),
        };
        match (ours, self.attention_fallback()) {
            (false, _) => "ort".into(),
            (true, true) => format!("ort (fallback: {})", kernel.reason()),
            (true, false) => kernel.describe(),
        }
    }

    /// What the DiT's int8 linears run on in this process, for `v2l-run --json`: `None` for
    /// engines without dynamic int8 linears on v2l's operator, else `v2l (AVX512-VNNI)`, or
    /// `ort (fallback: …)` where this CPU loads the `.ort` twins.
    pub fn int8_gemm(&self) -> Option<String> {
        self.bundle.as_ref().filter(|b| b.v2l_int8_gemm)?;
        Some(if self.attention_fallback() {
            format!(
                "ort (fallback: {})",
                crate::attention::Kernel::detect().reason()
            )
        } else if crate::qgemm::available() {
            "v2l (AVX512-VNNI)".into()
        } else {
            "v2l portable (no AVX512-VNNI)".into()
        })
    }

    /// The VAE graph files this process loads: a GPU engine's in its precision
    /// (`vae_lowered`); the bundle's on v2l's bf16 convolution (`vae_bf16`) where this CPU runs
    /// its bf16 kernel (AVX512-BF16, `V2L_CONV` not `fp32`); else the manifest's f32 graphs.
    pub fn vae_graphs(&self, entry: &v2l_contracts::manifest::VaeEntry) -> VaeGraphs {
        if let Some(g) = self.bundle.as_ref().and_then(|b| b.vae_lowered.clone()) {
            return g;
        }
        match self.bundle.as_ref().and_then(|b| b.vae_bf16.clone()) {
            Some(g) if crate::conv::Kernel::detect() == crate::conv::Kernel::Bf16 => g,
            _ => VaeGraphs {
                encoder: entry.encoder.clone(),
                decoder: entry.decoder.clone(),
            },
        }
    }

    /// What the VAE's convolutions run on in this process, for `v2l-run --json` and logs:
    /// `ort` (ONNX Runtime's f32 `Conv`), `bf16 (AVX512-BF16)` (v2l's), or `ort (fallback: …)`
    /// where an engine with bf16 VAE graphs meets a CPU without AVX512-BF16.
    pub fn vae_conv(&self) -> String {
        if let Some(b) = self.bundle.as_ref().filter(|b| b.vae_lowered.is_some()) {
            return format!("ort ({})", b.precision.name());
        }
        let kernel = crate::conv::Kernel::detect();
        match self.bundle.as_ref().and_then(|b| b.vae_bf16.as_ref()) {
            None => "ort".into(),
            Some(_) if kernel == crate::conv::Kernel::Bf16 => {
                format!("{} ({})", kernel.name(), kernel.reason())
            }
            Some(_) => format!("ort (fallback: {})", kernel.reason()),
        }
    }

    /// The CPU this engine's accuracy was measured on when it was compiled (its bundle's
    /// first accuracy record), for `v2l-run --json` beside the machine it runs on.
    pub fn compiled_on(&self) -> Option<&crate::bundle::Machine> {
        self.bundle
            .as_ref()?
            .accuracy
            .iter()
            .find_map(|a| a.machine.as_ref())
    }

    /// The engine's precision (fp32 for a plain export directory).
    pub fn precision(&self) -> crate::backend::Precision {
        self.bundle
            .as_ref()
            .map(|b| b.precision)
            .unwrap_or_default()
    }

    /// An integer from the DiT's (`dit = true`) or the VAE's config, if it has one.
    fn config_usize(&self, key: &str, dit: bool) -> Option<usize> {
        let config = if dit {
            self.manifest.dit.as_ref().map(|d| &d.config)
        } else {
            self.manifest.vae.as_ref().map(|v| &v.config)
        };
        v2l_contracts::manifest::config_usize(config?, key)
    }

    /// The video size a request gets when it names none: `(frames, height, width)` from the
    /// DiT's `sample_frames` and the VAE's `sample_height`/`sample_width`, where they are set.
    pub fn default_size(&self) -> (Option<usize>, Option<usize>, Option<usize>) {
        (
            self.config_usize("sample_frames", true),
            self.config_usize("sample_height", false),
            self.config_usize("sample_width", false),
        )
    }

    /// The files a predicted LoRA depends on: the hypernetworks (Video2LoRA's with its LiLoRA,
    /// Prompt2Effect's, LoFA's stages) and the VAE encoder that feeds Video2LoRA's, with their
    /// external weight files. What a LoRA cache must key on where no bundle record hashes
    /// them (a plain export directory, re-exported in place).
    pub fn prediction_files(&self) -> Vec<PathBuf> {
        let m = &self.manifest;
        let mut names: Vec<&str> = Vec::new();
        if let Some(h) = &m.hypernet {
            names.extend([h.file.as_str(), h.lilora.as_str()]);
            if let Some(v) = &m.vae {
                names.push(v.encoder.as_str());
            }
        }
        if let Some(p) = &m.prompt2effect {
            names.push(p.file.as_str());
        }
        if let Some(l) = &m.lofa {
            names.extend([l.stage1.as_str(), l.stage2.as_str()]);
        }
        let mut files = Vec::new();
        for n in names {
            let p = self.dir.join(n);
            if n.ends_with(".onnx") {
                files.extend(v2l_graphs::external_data_files(&p).unwrap_or_default());
            }
            files.push(p);
        }
        files
    }

    /// The one video size `(frames, height, width)` the DiT runs at, where it has a learned
    /// positional table (CogVideoX's `use_learned_positional_embeddings`, as CogVideoX-5B-I2V
    /// 1.0 and the demo model have): the table is for its sample size alone, in pixels the
    /// DiT's `sample_frames` and its latent `sample_height`/`sample_width` times the VAE's
    /// stride. `None` where any size the limits allow runs.
    pub fn fixed_size(&self) -> Option<(usize, usize, usize)> {
        let learned = self
            .manifest
            .dit
            .as_ref()?
            .config
            .get("use_learned_positional_embeddings")?
            .as_bool()?;
        if !learned {
            return None;
        }
        let s = v2l_contracts::latent::SPACE_STRIDE;
        Some((
            self.config_usize("sample_frames", true)?,
            self.config_usize("sample_height", true)? * s,
            self.config_usize("sample_width", true)? * s,
        ))
    }

    /// Whether the engine makes video from text alone (Wan T2V: the DiT takes only the noisy
    /// latents), so a request has no first frame.
    pub fn text_to_video(&self) -> bool {
        self.pipeline_kind()
            .is_ok_and(|k| k == v2l_contracts::PipelineKind::WanT2v)
    }

    /// The pipeline this engine deploys ([`v2l_contracts::PipelineKind`]): recorded by the
    /// export, checked against the DiT's and the VAE's channels; an unknown DiT class or a
    /// channel count no pipeline has is an error naming it.
    pub fn pipeline_kind(&self) -> Result<v2l_contracts::PipelineKind> {
        self.manifest
            .pipeline_kind()
            .map_err(|message| RuntimeError::BadFile {
                path: self.dir.join(v2l_contracts::manifest::FILE_NAME),
                message,
            })
    }

    /// The prompt length the DiT was trained with (`max_text_seq_length`, 226 for CogVideoX;
    /// 512 for Wan, whose pipelines encode that many).
    pub fn text_sequence_length(&self) -> Option<usize> {
        self.config_usize("max_text_seq_length", true)
            // The Wan pipelines' `max_sequence_length` default (its DiT config has none).
            .or_else(|| (self.family().ok() == Some(Family::Wan)).then_some(WAN_TEXT_TOKENS))
    }

    /// The initial latent noise ([`Engine::noise_shape`]) of a `frames × height × width`
    /// request, from `seed` (`crate::tensor::gaussian_noise`): what every front end
    /// draws, so the same seed is the same video from the CLI, the C ABI and the server.
    pub fn seeded_noise(
        &self,
        frames: usize,
        height: usize,
        width: usize,
        seed: u64,
    ) -> Result<crate::tensor::Tensor> {
        Ok(crate::tensor::gaussian_noise(
            self.noise_shape(frames, height, width)?,
            seed,
        ))
    }

    /// The initial noise's shape for a `frames × height × width` request, in the layout the
    /// family's pipeline draws: Wan channels first, CogVideoX frames first.
    pub fn noise_shape(&self, frames: usize, height: usize, width: usize) -> Result<Vec<usize>> {
        let dit = self.dit_entry()?;
        let (lf, lh, lw) = v2l_contracts::LatentGrid::of_video(frames, height, width).dims();
        // The DiT predicts the noisy latents: its output channels are the latent channels.
        let c = dit.out_channels;
        Ok(match self.family()? {
            Family::Wan => vec![1, c, lf, lh, lw],
            Family::CogVideoX => vec![1, lf, c, lh, lw],
        })
    }

    /// The length of the engine's training schedule (`num_train_timesteps` of its scheduler
    /// config, read as its family's sampler reads it): the most denoising steps a request may
    /// ask for.
    pub fn train_timesteps(&self) -> Result<usize> {
        let name = self
            .manifest
            .scheduler
            .as_ref()
            .ok_or_else(|| self.missing("scheduler config", "pipeline"))?;
        let path = self.dir.join(name);
        Ok(match self.family()? {
            Family::CogVideoX => {
                crate::scheduler::SchedulerConfig::from_file(&path)?.num_train_timesteps
            }
            Family::Wan => crate::flow::FlowScheduler::from_file(&path)?.train_timesteps(),
        })
    }

    /// The family of the engine's DiT: an error when there is no DiT or its class is one this
    /// v2l does not run.
    pub fn family(&self) -> Result<Family> {
        let dit = self
            .manifest
            .dit
            .as_ref()
            .ok_or_else(|| self.missing("DiT", "dit"))?;
        dit.family().map_err(|message| RuntimeError::BadFile {
            path: self.dir.join(v2l_contracts::manifest::FILE_NAME),
            message,
        })
    }

    /// A Wan DiT's config, parsed once with diffusers' defaults (`None`: not a Wan engine).
    pub fn wan_config(&self) -> Result<Option<WanDitConfig>> {
        match self.manifest.dit.as_ref() {
            Some(d) if d.family() == Ok(Family::Wan) => WanDitConfig::from_config(&d.config)
                .map(Some)
                .map_err(|e| RuntimeError::BadFile {
                    path: self.dir.join(v2l_contracts::manifest::FILE_NAME),
                    message: format!("the Wan DiT's config: {e}"),
                }),
            _ => Ok(None),
        }
    }

    /// The DiT's LoRA-targetable linear layers.
    pub fn dit_targets(&self) -> Result<&[v2l_contracts::LinearInfo]> {
        Ok(&self
            .manifest
            .dit
            .as_ref()
            .ok_or_else(|| self.missing("DiT", "dit"))?
            .lora_targets)
    }
}

/// Whether an exported graph stores its weights below f32 (its manifest `weight_dtype`): such
/// weights reach their layers through a Cast each.
fn stored_below_f32(weight_dtype: v2l_graphs::DType) -> bool {
    weight_dtype != v2l_graphs::DType::F32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(dir: &Path, class: &str, in_channels: usize, pipeline: &str) {
        let text = format!(
            r#"{{"format_version": 1, {pipeline} "dit": {{"file": "dit.onnx", "class_name": "{class}",
            "weight_dtype": "f32", "patch_size": 2, "attention_head_dim": 16,
            "in_channels": {in_channels}, "out_channels": 16, "text_embed_dim": 32,
            "config": {{}}, "lora_targets": []}}}}"#
        );
        std::fs::write(dir.join("manifest.json"), text).unwrap();
    }

    #[test]
    fn unknown_classes_and_kinds_that_disagree_are_refused_by_name() {
        let d = tempfile::tempdir().unwrap();
        manifest(d.path(), "UNet2DConditionModel", 32, "");
        let e = Engine::open(d.path()).err().unwrap().to_string();
        assert!(
            e.contains("UNet2DConditionModel") && e.contains("manifest.json"),
            "{e}"
        );
        manifest(
            d.path(),
            "CogVideoXTransformer3DModel",
            32,
            r#""pipeline": "cogvideox-fun-inpaint","#,
        );
        let e = Engine::open(d.path()).err().unwrap().to_string();
        assert!(
            e.contains("cogvideox-fun-inpaint") && e.contains("cogvideox-i2v"),
            "{e}"
        );
        manifest(
            d.path(),
            "CogVideoXTransformer3DModel",
            33,
            r#""pipeline": "cogvideox-fun-inpaint","#,
        );
        let e = Engine::open(d.path()).unwrap();
        assert_eq!(
            e.pipeline_kind().unwrap(),
            v2l_contracts::PipelineKind::CogvideoxFunInpaint
        );
        manifest(d.path(), "CogVideoXTransformer3DModel", 20, "");
        let e = Engine::open(d.path())
            .unwrap()
            .pipeline_kind()
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("in_channels = 20"), "{e}");
    }
}
