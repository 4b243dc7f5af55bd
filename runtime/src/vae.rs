//! The video VAE's frame-batch loop around its two per-batch graphs.
//!
//! diffusers encodes CogVideoX 8 frames at a time (decodes 2 latent frames at a time), the first
//! batch also taking the remainder; Wan the first frame alone, then 4 at a time (decodes 1 latent
//! frame at a time). Both carry each causal convolution's last frames to the next
//! batch. Normalisation statistics are per batch, so this batching is part of the numbers. The
//! exported graphs compute one batch with the caches as explicit inputs and outputs
//! (`cache_in.*` → `cache_out.*`, see `v2l_contracts::frame_batch`); this loop threads them.
//! Memory stays bounded by one batch however long the clip.

use std::collections::BTreeMap;
use v2l_contracts::io::vae as vae_io;

mod tiling;
pub use tiling::{
    Tiling, TilingMode, AUTO_MAX_UNTILED_PIXELS, AUTO_MAX_UNTILED_PIXELS_GPU,
    AUTO_UNTILED_GPU_MIN_MEMORY,
};

use v2l_contracts::bundle::VaeGraphs;
use v2l_contracts::frame_batch::CacheSpec;
use v2l_contracts::manifest::VaeEntry;

use crate::engine::Engine;
use crate::error::{Result, RuntimeError};
use crate::session::{Model, SessionOptions};
use crate::tensor::Tensor;

/// Encoder and decoder sessions with their loop contract.
pub struct Vae {
    pub entry: VaeEntry,
    /// `Some(seed)`: [`Vae::latent`] samples the posterior; `None`: it takes the mode (mean).
    pub posterior_seed: Option<u64>,
    /// When encode and decode tile frames spatially (default: `auto`).
    pub tiling: TilingMode,
    /// Tile geometry (diffusers' defaults for this VAE unless changed).
    pub tile: Tiling,
    /// `None` once released ([`Vae::release_encoder`]).
    encoder: Option<BatchSessions>,
    decoder: BatchSessions,
}

/// One VAE graph's sessions: the one every clip's first frame batch runs in and, where
/// [`SessionOptions::first_batch_session`] asks, a second for the later batches, built at the
/// first clip that has any (the weights and ONNX Runtime's arena twice on the device, each
/// convolution's cuDNN plan built once for each shape instead of twice a clip).
struct BatchSessions {
    first: Model,
    rest: Option<Model>,
    /// Where to build `rest` from, when it is wanted.
    split: Option<(std::path::PathBuf, SessionOptions)>,
    /// Clips of frames up to this many pixels use `rest`: any size where the two sessions
    /// share the process's arena ([`Model::shares_arena`]), or the graph is lowered (half the
    /// bytes); otherwise only up to [`AUTO_MAX_UNTILED_PIXELS`] (a second arena of an f32
    /// decode at 480×720 whole, some 30 GB by the CPU's measured peak, would not fit beside a
    /// pipeline on an 80 GB GPU).
    split_max_pixels: usize,
}

impl BatchSessions {
    fn load(path: &std::path::Path, opts: &SessionOptions, lowered: bool) -> Result<BatchSessions> {
        let first = Model::load(path, opts)?;
        // The CUDA provider's convolution (not TensorRT's engines). Not where CUDA graphs are
        // asked for: a replay builds no plan, and a session whose capture was refused (built
        // again without) would be refused again.
        let backend = opts.backend.for_this_process()?;
        let cuda = backend.backend == crate::backend::Backend::Cuda;
        let wanted = opts.first_batch_session || (cuda && !backend.cuda_graph());
        let split = (wanted && !first.bound_runs()).then(|| (path.to_path_buf(), opts.clone()));
        let split_max_pixels = if lowered || first.shares_arena() {
            usize::MAX
        } else {
            AUTO_MAX_UNTILED_PIXELS
        };
        Ok(BatchSessions {
            first,
            rest: None,
            split,
            split_max_pixels,
        })
    }

    /// The session for batch `i` of a clip of frames of `pixels` pixels.
    fn for_batch(&mut self, i: usize, pixels: usize) -> Result<&mut Model> {
        let wanted = i > 0 && pixels <= self.split_max_pixels;
        let Some((path, opts)) = self.split.as_ref().filter(|_| wanted) else {
            return Ok(&mut self.first);
        };
        let rest = match self.rest.take() {
            Some(m) => m,
            None => match Model::load(path, opts) {
                Ok(m) => m,
                // Most likely the device's memory, which already holds the first session:
                // this clip and the later ones go on in that one.
                Err(e) => {
                    eprintln!(
                        "note: {}: the later frame batches run in the first batch's session ({e})",
                        path.display()
                    );
                    self.split = None;
                    return Ok(&mut self.first);
                }
            },
        };
        Ok(self.rest.insert(rest))
    }
}

impl Vae {
    /// The VAE of engine `dir`, on the graphs this process runs ([`Engine::vae_graphs`]).
    pub fn load(engine: &Engine, opts: &SessionOptions) -> Result<Vae> {
        let entry = engine
            .manifest
            .vae
            .clone()
            .ok_or_else(|| RuntimeError::Engine {
                dir: engine.dir.clone(),
                message: format!(
                    "holds no VAE; export one with `v2l-export vae ... -o {}`",
                    engine.dir.display()
                ),
            })?;
        let graphs = engine.vae_graphs(&entry);
        // An fp32 engine's graphs are f32 whatever their names (a cuda engine's are the
        // export's with their GroupNorms rewritten).
        let f32 = engine.precision() == crate::backend::Precision::Fp32;
        Vae::load_sessions(&engine.dir, entry, &graphs, opts, f32)
    }

    /// The VAE described by `entry`, from the graph files `graphs` in `dir`.
    pub fn load_graphs(
        dir: &std::path::Path,
        entry: VaeEntry,
        graphs: &VaeGraphs,
        opts: &SessionOptions,
    ) -> Result<Vae> {
        Vae::load_sessions(dir, entry, graphs, opts, false)
    }

    /// [`Vae::load_graphs`]; `f32`: the graphs compute in f32 even where their names are not
    /// the export's.
    fn load_sessions(
        dir: &std::path::Path,
        entry: VaeEntry,
        graphs: &VaeGraphs,
        opts: &SessionOptions,
        f32: bool,
    ) -> Result<Vae> {
        // A GPU engine's lowered graph has another name than the export's.
        let encoder = BatchSessions::load(
            &dir.join(&graphs.encoder),
            opts,
            !f32 && graphs.encoder != entry.encoder,
        )?;
        let decoder = BatchSessions::load(
            &dir.join(&graphs.decoder),
            opts,
            !f32 && graphs.decoder != entry.decoder,
        )?;
        // On a GPU, after its sessions (the CUDA runtime is loaded): the engine's device's
        // memory counts.
        let tile = match opts.backend.backend {
            crate::backend::Backend::Cpu => Tiling::for_config(&entry.config),
            _ => Tiling::for_config(&entry.config).on_gpu_with(
                crate::cuda_libs::device_total_memory(opts.backend.device_id),
            ),
        };
        Ok(Vae {
            tiling: TilingMode::default(),
            tile,
            entry,
            posterior_seed: None,
            encoder: Some(encoder),
            decoder,
        })
    }

    /// Drops the encoder session and its ONNX Runtime arena, which keeps its largest run's
    /// working memory for the session's life (4.8 GB after a 9-frame 256×384 reference clip
    /// at CogVideoX-5B widths). For one-shot runs once everything is encoded.
    pub fn release_encoder(&mut self) {
        self.encoder = None;
    }

    /// `video [B, C, F, H, W]` in [-1, 1] → (`posterior_mean`, `posterior_logvar`), `[B, 16, f, h, w]`.
    pub fn encode(&mut self, video: &Tensor) -> Result<(Tensor, Tensor)> {
        self.encode_reporting(video, &mut |_, _| true)
    }

    /// [`Vae::encode`], asking `go_on(done, of)` after each frame batch of each tile whether to
    /// go on, as [`Vae::decode_reporting`] does.
    pub fn encode_reporting(
        &mut self,
        video: &Tensor,
        go_on: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<(Tensor, Tensor)> {
        let [_, _, f, h, w] = check_5d(video, vae_io::VIDEO, self.entry.in_channels)?;
        let batches = self
            .entry
            .encoder_batches(f)
            .map_err(|message| RuntimeError::Tensor {
                what: "`video`".into(),
                message,
            })?;
        let tile = self.tile;
        if tile.applies(self.tiling, h, w) {
            let mut ticks = Ticks::new(tile.count(h, w, false)? * batches.len(), go_on);
            let mut parts = tile
                .run(video, false, &mut |t| {
                    self.encode_untiled(t, &batches, &mut ticks)
                        .map(|(m, l)| vec![m, l])
                })?
                .into_iter();
            return match (parts.next(), parts.next()) {
                (Some(m), Some(l)) => Ok((m, l)),
                _ => Err(missing_output(vae_io::POSTERIOR_MEAN)),
            };
        }
        self.encode_untiled(video, &batches, &mut Ticks::new(batches.len(), go_on))
    }

    fn encode_untiled(
        &mut self,
        video: &Tensor,
        batches: &[(usize, usize)],
        ticks: &mut Ticks<'_>,
    ) -> Result<(Tensor, Tensor)> {
        let encoder = self
            .encoder
            .as_mut()
            .ok_or_else(|| RuntimeError::Internal {
                what: "VAE encoder".into(),
                message: "was released after this request's encodes (Pipeline::generate_once)"
                    .into(),
            })?;
        let mut outs = run_batches(
            encoder,
            &self.entry.encoder_caches,
            (vae_io::VIDEO, video, video.shape.iter().skip(3).product()),
            &[vae_io::POSTERIOR_MEAN, vae_io::POSTERIOR_LOGVAR],
            batches,
            &mut || ticks.tick(),
        )?;
        let take = |outs: &mut Vec<BTreeMap<String, Tensor>>, name: &str| -> Result<Tensor> {
            let parts = outs
                .iter_mut()
                .map(|o| o.remove(name).ok_or_else(|| missing_output(name)))
                .collect::<Result<Vec<_>>>()?;
            Tensor::concat(&parts, 2)
        };
        let mean = take(&mut outs, vae_io::POSTERIOR_MEAN)?;
        let logvar = take(&mut outs, vae_io::POSTERIOR_LOGVAR)?;
        Ok((mean, logvar))
    }

    /// The latent of `video`: the posterior mode, or a sample `mean + exp(logvar / 2)·ε` with ε
    /// drawn from `posterior_seed`. Not multiplied by the scaling factor.
    pub fn latent(&mut self, video: &Tensor) -> Result<Tensor> {
        self.latent_reporting(video, &mut |_, _| true)
    }

    /// [`Vae::latent`], its encode reporting as [`Vae::encode_reporting`]'s.
    pub fn latent_reporting(
        &mut self,
        video: &Tensor,
        go_on: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<Tensor> {
        let (mean, logvar) = self.encode_reporting(video, go_on)?;
        let Some(seed) = self.posterior_seed else {
            return Ok(mean);
        };
        let eps = crate::tensor::gaussian_noise(mean.shape.clone(), seed);
        let (m, lv, e) = (
            mean.as_f32("mean")?,
            logvar.as_f32("logvar")?,
            eps.as_f32("eps")?,
        );
        let v = m
            .iter()
            .zip(lv)
            .zip(e)
            .map(|((m, lv), e)| m + (0.5 * lv).exp() * e)
            .collect();
        Ok(Tensor::f32(mean.shape.clone(), v))
    }

    /// `latents [B, 16, f, h, w]` (already divided by the scaling factor) → `[B, 3, F, H, W]`.
    pub fn decode(&mut self, latents: &Tensor) -> Result<Tensor> {
        self.decode_reporting(latents, &mut |_, _| true)
    }

    /// [`Vae::decode`], asking `go_on(done, of)` after each frame batch of each tile whether to
    /// go on: `false` stops the decode with [`RuntimeError::Cancelled`]. A 49-frame 480×720
    /// decode on a CPU runs its frame batches in each of 9 tiles for some twenty minutes; a
    /// server's cancel or time limit, or a progress bar, should not wait for all of them.
    pub fn decode_reporting(
        &mut self,
        latents: &Tensor,
        go_on: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<Tensor> {
        let [_, _, f, h, w] = check_5d(latents, vae_io::LATENTS, self.entry.latent_channels)?;
        let batches = self
            .entry
            .decoder_batches(f)
            .map_err(|message| RuntimeError::Tensor {
                what: "`latents`".into(),
                message,
            })?;
        let tile = self.tile;
        let factor = tile.factor;
        if tile.applies(self.tiling, h * factor, w * factor) {
            let mut ticks = Ticks::new(tile.count(h, w, true)? * batches.len(), go_on);
            return tile
                .run(latents, true, &mut |t| {
                    self.decode_untiled(t, &batches, &mut ticks)
                        .map(|s| vec![s])
                })?
                .pop()
                .ok_or_else(|| missing_output(vae_io::SAMPLE));
        }
        self.decode_untiled(latents, &batches, &mut Ticks::new(batches.len(), go_on))
    }

    fn decode_untiled(
        &mut self,
        latents: &Tensor,
        batches: &[(usize, usize)],
        ticks: &mut Ticks<'_>,
    ) -> Result<Tensor> {
        let outs = run_batches(
            &mut self.decoder,
            &self.entry.decoder_caches,
            (
                vae_io::LATENTS,
                latents,
                latents.shape.iter().skip(3).product::<usize>() * self.tile.factor.pow(2),
            ),
            &[vae_io::SAMPLE],
            batches,
            &mut || ticks.tick(),
        )?;
        let parts = outs
            .into_iter()
            .map(|mut o| {
                o.remove(vae_io::SAMPLE)
                    .ok_or_else(|| missing_output(vae_io::SAMPLE))
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::concat(&parts, 2)
    }
}

/// Frame batches counted against a decode's whole, each reported to a caller who may stop it.
struct Ticks<'a> {
    done: usize,
    of: usize,
    go_on: &'a mut dyn FnMut(usize, usize) -> bool,
}

impl<'a> Ticks<'a> {
    fn new(of: usize, go_on: &'a mut dyn FnMut(usize, usize) -> bool) -> Ticks<'a> {
        Ticks { done: 0, of, go_on }
    }

    fn tick(&mut self) -> Result<()> {
        self.done += 1;
        match (self.go_on)(self.done, self.of) {
            true => Ok(()),
            false => Err(RuntimeError::Cancelled),
        }
    }
}

fn missing_output(name: &str) -> RuntimeError {
    RuntimeError::missing_output("VAE", name)
}

/// The `[B, C, F, H, W]` of a VAE input with `channels` channels and no empty axis.
fn check_5d(t: &Tensor, name: &str, channels: usize) -> Result<[usize; 5]> {
    match t.shape[..] {
        [b, c, f, h, w] if c == channels && !t.shape.contains(&0) => {
            t.as_f32(name).map(|_| [b, c, f, h, w])
        }
        _ => Err(RuntimeError::Graph {
            graph: format!("`{name}`"),
            message: format!(
                "shape {:?}; expected [batch, {channels}, frames > 0, height, width]",
                t.shape
            ),
        }),
    }
}

/// Runs `model` over diffusers' frame `batches` of `x` (axis 2), threading the caches from
/// batch to batch inside ONNX Runtime ([`crate::session::Carry`]: at real widths they are
/// 1.4 GB a batch), and returns the `fetch` outputs of each batch; `after_batch` runs after
/// each, and an error from it stops the loop.
fn run_batches(
    model: &mut BatchSessions,
    caches: &[CacheSpec],
    (input, x, pixels): (&str, &Tensor, usize),
    fetch: &[&str],
    batches: &[(usize, usize)],
    after_batch: &mut dyn FnMut() -> Result<()>,
) -> Result<Vec<BTreeMap<String, Tensor>>> {
    let [b, _, _, h, w] = x.shape[..] else {
        return Err(RuntimeError::Graph {
            graph: format!("`{input}`"),
            message: format!("shape {:?}; expected [B, C, F, H, W]", x.shape),
        });
    };
    // The first batch ignores its caches (`first_batch` selects around them). Where the
    // caches are carried in session memory (a GPU's), they start there unwritten; else zeros
    // of each cache's declared type (f32 ones from the allocator cost no memory until
    // written, and ONNX Runtime only reads them; low-precision caches are a GPU engine's).
    let shapes: Vec<(String, Vec<usize>)> = caches
        .iter()
        .map(|c| (c.name.clone(), c.shape(b, h, w).to_vec()))
        .collect();
    let first = model.for_batch(0, pixels)?;
    let (mut carry, mut feed) = match first.unwritten_carry(&shapes)? {
        Some(carry) => (carry, BTreeMap::new()),
        None => (crate::session::Carry::default(), first.zero_inputs(shapes)?),
    };
    let links: Vec<(String, String)> = caches
        .iter()
        .map(|c| (c.name.clone(), c.output_name()))
        .collect();
    let mut results = Vec::new();
    for (i, &(start, end)) in batches.iter().enumerate() {
        feed.insert(input.to_string(), x.slice_axis(2, start, end)?);
        feed.insert(
            "first_batch".into(),
            Tensor::f32(vec![1], vec![if i == 0 { 1.0 } else { 0.0 }]),
        );
        let last = i + 1 == batches.len();
        let out = model
            .for_batch(i, pixels)?
            .run_carrying(&feed, &mut carry, &links, fetch, !last)?;
        if i == 0 {
            for c in caches {
                feed.remove(&c.name);
            }
        }
        results.push(out);
        after_batch()?;
    }
    Ok(results)
}
