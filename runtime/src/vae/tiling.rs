//! Spatial tiling of the VAE, as diffusers' `AutoencoderKLCogVideoX.enable_tiling()` does it.
//!
//! Frames larger than a tile are cut into overlapping tiles; each tile runs the whole
//! frame-batch loop on its own (its own causal caches and GroupNorm statistics), and the tiles
//! are blended linearly over the overlap, then cropped and stitched. Memory is bounded by one
//! tile of one frame batch whatever the resolution; the result differs slightly from untiled
//! decoding (each tile normalises alone), exactly as diffusers' tiled result does.
//!
//! The order of blending matters and follows diffusers: tiles are visited row by row; each is
//! first blended with the (already blended) tile above, then with the (already blended) tile
//! to its left, in place.

// Tile arithmetic indexes the blend and stitch buffers it has just sized from the same tile
// grid; every shape that reaches it was checked by `Vae::encode`/`decode`.
#![allow(clippy::indexing_slicing)]

use crate::error::{Result, RuntimeError};
use crate::tensor::Tensor;

/// When to tile.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TilingMode {
    /// Tile frames larger than a tile and than [`Tiling::auto_max_pixels`]: on the CPU
    /// ([`AUTO_MAX_UNTILED_PIXELS`]) real resolutions (480×720 and up) are tiled, 256×384 and
    /// smaller are not; on a GPU ([`AUTO_MAX_UNTILED_PIXELS_GPU`]) up to 480×832 decodes whole,
    /// as diffusers does.
    #[default]
    Auto,
    /// diffusers' `enable_tiling()`: tile whenever a frame is larger than a tile.
    On,
    Off,
}

/// `auto` leaves frames up to 256×384 pixels untiled. There the untiled decode of CogVideoX's
/// VAE peaks at 8.0 GB (9 frames, 2026-11-26), under a generation's text-encode peak, and takes
/// 49 s against 64 s tiled; diffusers' pipelines decode untiled unless told. At 480×720 it would
/// need about 3.5× that memory, so real resolutions stay tiled (docs/benchmarks.md, "VAE").
pub const AUTO_MAX_UNTILED_PIXELS: usize = 256 * 384;

/// `auto` on a GPU engine leaves frames up to 480×832 pixels untiled (CogVideoX's 480×720 and
/// Wan's 480p): what diffusers' pipelines and PyTorch decode, so the frames are the same
/// computation, and the GPU is not held to one tile's small convolutions. PyTorch fp32 decodes
/// 17×480×720 untiled on an 80 GB H100 (2026-11-26); v2l's untiled peak there is not yet
/// measured (`v2l-bench gpu --scale` reports it). Larger frames are tiled as on the CPU.
pub const AUTO_MAX_UNTILED_PIXELS_GPU: usize = 480 * 832;

/// The least device memory for [`AUTO_MAX_UNTILED_PIXELS_GPU`]: a GPU with less keeps the CPU's
/// rule. Scaled from the CPU's measured untiled peak (8.0 GB at 9×256×384, fp32), a 480×832
/// decode needs about 32 GB beside the DiT and text encoder a pipeline also holds (about 20 GB
/// at CogVideoX-5B, bf16): an 80 GB H100 or A100 qualifies, a 48 GB card does not. An estimate,
/// not a measurement.
pub const AUTO_UNTILED_GPU_MIN_MEMORY: u64 = 64 << 30;

impl TilingMode {
    pub fn parse(s: &str) -> Option<TilingMode> {
        match s {
            "auto" => Some(TilingMode::Auto),
            "on" => Some(TilingMode::On),
            "off" => Some(TilingMode::Off),
            _ => None,
        }
    }
}

/// Tile geometry in sample pixels (diffusers' attribute names in the docs).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tiling {
    /// `tile_sample_min_height` / `_width`: a tile's size in pixels.
    pub sample_height: usize,
    pub sample_width: usize,
    /// `tile_overlap_factor_height` / `_width`: the fraction of a tile shared with the next.
    pub overlap_height: f64,
    pub overlap_width: f64,
    /// Pixels per latent (`2^(len(block_out_channels) - 1)`).
    pub factor: usize,
    /// The largest frame `auto` leaves untiled (by the provider: [`Tiling::on_gpu`]).
    pub auto_max_pixels: usize,
}

impl Tiling {
    /// diffusers' defaults for a VAE `config.json`: half the configured sample size, overlaps
    /// 1/6 (height) and 1/5 (width).
    pub fn for_config(config: &serde_json::Value) -> Tiling {
        let get = |k: &str, d: usize| {
            config
                .get(k)
                .and_then(|v| v.as_u64())
                .map_or(d, |v| v as usize)
        };
        let blocks = config
            .get("block_out_channels")
            .and_then(|v| v.as_array())
            .map_or(4, |a| a.len());
        Tiling {
            sample_height: get("sample_height", 480) / 2,
            sample_width: get("sample_width", 720) / 2,
            overlap_height: 1.0 / 6.0,
            overlap_width: 1.0 / 5.0,
            // Capped so a malformed config cannot overflow the shift.
            factor: 1 << blocks.saturating_sub(1).min(16),
            auto_max_pixels: AUTO_MAX_UNTILED_PIXELS,
        }
    }

    /// The same geometry with `auto` set for a GPU provider with `memory` bytes of device
    /// memory (`None`: unknown, so the CPU's rule).
    pub fn on_gpu_with(self, memory: Option<u64>) -> Tiling {
        self.on_gpu(memory.is_some_and(|m| m >= AUTO_UNTILED_GPU_MIN_MEMORY))
    }

    /// The same geometry with `auto` set for a GPU provider when `gpu` holds.
    pub fn on_gpu(self, gpu: bool) -> Tiling {
        Tiling {
            auto_max_pixels: if gpu {
                AUTO_MAX_UNTILED_PIXELS_GPU
            } else {
                AUTO_MAX_UNTILED_PIXELS
            },
            ..self
        }
    }

    fn latent_height(&self) -> usize {
        (self.sample_height as f64 / self.factor as f64) as usize
    }

    fn latent_width(&self) -> usize {
        (self.sample_width as f64 / self.factor as f64) as usize
    }

    /// Whether `mode` tiles a frame of `height × width` pixels.
    pub fn applies(&self, mode: TilingMode, height: usize, width: usize) -> bool {
        let larger = height > self.sample_height || width > self.sample_width;
        match mode {
            TilingMode::Off => false,
            TilingMode::On => larger,
            TilingMode::Auto => larger && height * width > self.auto_max_pixels,
        }
    }

    /// Tile geometry for decoding (`to_sample`) or encoding, in input and output units:
    /// (input tile h, w; input stride h, w; blend extent h, w; kept rows, columns).
    fn plan(&self, to_sample: bool) -> Result<[usize; 8]> {
        let (lh, lw) = (self.latent_height(), self.latent_width());
        let (sh, sw) = (self.sample_height, self.sample_width);
        let ((ih, iw), (oh, ow)) = if to_sample {
            ((lh, lw), (sh, sw))
        } else {
            ((sh, sw), (lh, lw))
        };
        let stride_h = (ih as f64 * (1.0 - self.overlap_height)) as usize;
        let stride_w = (iw as f64 * (1.0 - self.overlap_width)) as usize;
        let blend_h = (oh as f64 * self.overlap_height) as usize;
        let blend_w = (ow as f64 * self.overlap_width) as usize;
        if stride_h == 0 || stride_w == 0 || ih == 0 || iw == 0 {
            return Err(RuntimeError::Invalid {
                what: "VAE tiling".into(),
                message: format!(
                    "tile {sh}x{sw} px is too small for a {}x spatial factor",
                    self.factor
                ),
            });
        }
        Ok([
            ih,
            iw,
            stride_h,
            stride_w,
            blend_h,
            blend_w,
            oh - blend_h,
            ow - blend_w,
        ])
    }

    /// How many tiles [`Tiling::run`] cuts an input of `height × width` (its own units) into.
    pub fn count(&self, height: usize, width: usize, to_sample: bool) -> Result<usize> {
        let [_, _, stride_h, stride_w, ..] = self.plan(to_sample)?;
        Ok(height.div_ceil(stride_h) * width.div_ceil(stride_w))
    }

    /// Runs `f` (the whole frame-batch loop, returning one or more tensors `[B,C,F,h,w]`) tile
    /// by tile over `x [B,C,F,H,W]` and stitches each output as diffusers does.
    pub fn run(
        &self,
        x: &Tensor,
        to_sample: bool,
        f: &mut dyn FnMut(&Tensor) -> Result<Vec<Tensor>>,
    ) -> Result<Vec<Tensor>> {
        let [ih, iw, sh, sw, bh, bw, keep_h, keep_w] = self.plan(to_sample)?;
        let (h, w) = (x.shape[3], x.shape[4]);
        let mut rows: Vec<Vec<Vec<Tensor>>> = Vec::new();
        for i in (0..h).step_by(sh) {
            let band = x.slice_axis(3, i, (i + ih).min(h))?;
            let mut row = Vec::new();
            for j in (0..w).step_by(sw) {
                row.push(f(&band.slice_axis(4, j, (j + iw).min(w))?)?);
            }
            rows.push(row);
        }
        let outputs = rows.first().and_then(|r| r.first()).map_or(0, Vec::len);
        (0..outputs)
            .map(|k| {
                let mut grid: Vec<Vec<Tensor>> = rows
                    .iter_mut()
                    .map(|r| {
                        r.iter_mut()
                            .map(|t| std::mem::replace(&mut t[k], Tensor::f32(vec![0], Vec::new())))
                            .collect()
                    })
                    .collect();
                stitch(&mut grid, bh, bw, keep_h, keep_w)
            })
            .collect()
    }
}

/// Blends every tile with its upper and left neighbours (in place, in diffusers' order), crops
/// each to `keep_h × keep_w` and concatenates the grid.
fn stitch(
    grid: &mut [Vec<Tensor>],
    bh: usize,
    bw: usize,
    keep_h: usize,
    keep_w: usize,
) -> Result<Tensor> {
    for i in 0..grid.len() {
        for j in 0..grid[i].len() {
            if i > 0 {
                let (above, here) = grid.split_at_mut(i);
                blend(&above[i - 1][j], &mut here[0][j], 3, bh)?;
            }
            if j > 0 {
                let (left, here) = grid[i].split_at_mut(j);
                blend(&left[j - 1], &mut here[0], 4, bw)?;
            }
        }
    }
    let mut bands = Vec::with_capacity(grid.len());
    for row in grid.iter() {
        let cropped = row
            .iter()
            .map(|t| {
                let t = t.slice_axis(3, 0, keep_h.min(t.shape[3]))?;
                t.slice_axis(4, 0, keep_w.min(t.shape[4]))
            })
            .collect::<Result<Vec<_>>>()?;
        bands.push(Tensor::concat(&cropped, 4)?);
    }
    Tensor::concat(&bands, 3)
}

/// `b[.., y, ..] = a[.., len_a − e + y, ..]·(1 − y/e) + b[.., y, ..]·(y/e)` for `y < e` along
/// `axis` (3: rows, 4: columns), with `e = min(extent, a's and b's length)`.
fn blend(a: &Tensor, b: &mut Tensor, axis: usize, extent: usize) -> Result<()> {
    let (na, nb) = (a.shape[axis], b.shape[axis]);
    let e = extent.min(na).min(nb);
    if e == 0 {
        return Ok(());
    }
    let mismatch = a
        .shape
        .iter()
        .zip(&b.shape)
        .enumerate()
        .any(|(d, (x, y))| d != axis && x != y);
    if a.shape.len() != 5 || b.shape.len() != 5 || mismatch {
        return Err(RuntimeError::Invalid {
            what: "VAE tiling".into(),
            message: format!("cannot blend tiles {:?} and {:?}", a.shape, b.shape),
        });
    }
    let inner: usize = a.shape[axis + 1..].iter().product();
    let outer: usize = a.shape[..axis].iter().product();
    let av = a.as_f32("tile")?;
    let crate::tensor::Data::F32(bv) = &mut b.data else {
        return Err(RuntimeError::Invalid {
            what: "VAE tiling".into(),
            message: "tiles must be f32".into(),
        });
    };
    for o in 0..outer {
        for y in 0..e {
            let t = y as f32 / e as f32;
            let ra = (o * na + na - e + y) * inner;
            let rb = (o * nb + y) * inner;
            for c in 0..inner {
                bv[rb + c] = av[ra + c] * (1.0 - t) + bv[rb + c] * t;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untouched_interior_and_linear_seams() {
        // Identity "model" on a ramp: blending two copies of the same content keeps it.
        let t = Tiling {
            sample_height: 8,
            sample_width: 8,
            overlap_height: 0.25,
            overlap_width: 0.25,
            factor: 1,
            auto_max_pixels: AUTO_MAX_UNTILED_PIXELS,
        };
        let (h, w) = (14, 20);
        let v: Vec<f32> = (0..h * w).map(|i| i as f32).collect();
        let x = Tensor::f32(vec![1, 1, 1, h, w], v.clone());
        let out = t.run(&x, true, &mut |tile| Ok(vec![tile.clone()])).unwrap();
        assert_eq!(out[0].shape, vec![1, 1, 1, h, w]);
        assert_eq!(out[0].as_f32("o").unwrap(), &v[..]);
        assert!(t.applies(TilingMode::On, 9, 8) && !t.applies(TilingMode::Off, 900, 900));
        assert!(!t.applies(TilingMode::Auto, 64, 64));
    }

    #[test]
    fn count_is_the_tiles_run_visits() {
        let t = Tiling {
            sample_height: 8,
            sample_width: 8,
            overlap_height: 0.25,
            overlap_width: 0.5,
            factor: 2,
            auto_max_pixels: AUTO_MAX_UNTILED_PIXELS,
        };
        for (h, w, to_sample) in [(14, 20, false), (7, 10, true), (4, 4, true), (9, 8, false)] {
            let x = Tensor::f32(vec![1, 1, 1, h, w], vec![0.0; h * w]);
            let mut visits = 0;
            t.run(&x, to_sample, &mut |tile| {
                visits += 1;
                Ok(vec![tile.clone()])
            })
            .ok();
            assert_eq!(t.count(h, w, to_sample).unwrap(), visits, "{h}x{w}");
        }
    }

    #[test]
    fn auto_tiles_real_resolutions_only() {
        // CogVideoX's VAE: 240×360 tiles. 256×384 is larger than a tile but decodes whole.
        let t =
            Tiling::for_config(&serde_json::json!({"block_out_channels": [128, 256, 256, 512]}));
        assert!(t.applies(TilingMode::On, 256, 384));
        assert!(!t.applies(TilingMode::Auto, 256, 384) && !t.applies(TilingMode::Auto, 384, 256));
        assert!(t.applies(TilingMode::Auto, 480, 720) && t.applies(TilingMode::Auto, 272, 384));
    }

    #[test]
    fn auto_on_a_gpu_decodes_480p_whole_as_diffusers_does() {
        let cpu =
            Tiling::for_config(&serde_json::json!({"block_out_channels": [128, 256, 256, 512]}));
        let gpu = cpu.on_gpu(true);
        assert_eq!(gpu.on_gpu(false), cpu);
        for (h, w) in [(480, 720), (480, 832), (832, 480)] {
            assert!(cpu.applies(TilingMode::Auto, h, w), "{h}x{w} on the CPU");
            assert!(!gpu.applies(TilingMode::Auto, h, w), "{h}x{w} on a GPU");
            assert!(gpu.applies(TilingMode::On, h, w), "{h}x{w} on a GPU, on");
        }
        assert!(gpu.applies(TilingMode::Auto, 720, 1280));
        // By the device's memory: an 80 GB card decodes whole, a 48 GB one or an unknown one
        // keeps the CPU's rule.
        assert_eq!(cpu.on_gpu_with(Some(80_000_000_000)), gpu);
        assert_eq!(cpu.on_gpu_with(Some(48_000_000_000)), cpu);
        assert_eq!(cpu.on_gpu_with(None), cpu);
    }
}
