//! The CLIP image encoder's input: transformers' `CLIPImageProcessor` on one RGB8 image.
//!
//! Wan I2V encodes its first frame with a CLIP vision model whose `pixel_values` come from
//! transformers 5.23's `CLIPImageProcessor`. Without torchvision that is the PIL backend, and
//! this module reproduces it step by step, so the runtime's embedding matches PyTorch's:
//!
//! 1. resize so the shortest side is `shortest_edge`: the long side is
//!    `int(shortest_edge * long / short)` (Python float division, truncated), done by Pillow's
//!    BICUBIC resampling on the uint8 image ([`resize_bicubic_rgb8`], bit-exact);
//! 2. center crop to `crop_height x crop_width` on the uint8 image: per axis the crop starts at
//!    `(size - crop) // 2`; an axis shorter than the crop is padded with zeros instead, the image
//!    starting at `ceil((crop - size) / 2)`;
//! 3. rescale: `float32(float64(v) * rescale_factor)`;
//! 4. normalize in float32: `(x - float32(mean)) / float32(std)`;
//! 5. channels first, batch of one: `[1, 3, crop_height, crop_width]`.
//!
//! Every step is IEEE-exact (integer filter arithmetic, correctly rounded float ops), so the
//! output equals the processor's bit for bit (as Pillow's x86-64 wheels compute the filter
//! weights, without fused multiply-adds). `do_convert_rgb` is not modelled: the input is RGB8
//! already, where the conversion is the identity. With torchvision installed, transformers picks
//! its torchvision backend instead, whose resize is not Pillow's: this module is not that.

use std::path::Path;

use crate::error::{Result, RuntimeError};
use crate::tensor::Tensor;

/// OpenAI CLIP's per-channel mean (transformers' `OPENAI_CLIP_MEAN`), the processor default.
const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// OpenAI CLIP's per-channel std (`OPENAI_CLIP_STD`).
const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];
/// `PILImageResampling.BICUBIC`, the only filter implemented.
const BICUBIC: u32 = 3;

fn invalid(what: &str, message: impl Into<String>) -> RuntimeError {
    RuntimeError::Invalid {
        what: what.into(),
        message: message.into(),
    }
}

/// What a `preprocessor_config.json` of `CLIPImageProcessor` says.
///
/// Fields a config leaves out (or sets to `null`) take `CLIPImageProcessor`'s class defaults,
/// as transformers does.
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
#[serde(try_from = "RawConfig")]
pub struct ClipPreprocess {
    pub do_resize: bool,
    /// `size: {"shortest_edge": N}` (or the older `size: N`).
    pub shortest_edge: usize,
    /// PIL resampling filter; only 3 (BICUBIC) is supported.
    pub resample: u32,
    pub do_center_crop: bool,
    pub crop_height: usize,
    pub crop_width: usize,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
}

impl ClipPreprocess {
    /// Reads a `preprocessor_config.json` (the `image_processor/` folder of a diffusers Wan I2V
    /// pipeline). Settings this module cannot reproduce are an error, not a silent mismatch.
    pub fn from_file(path: &Path) -> Result<ClipPreprocess> {
        let text = v2l_contracts::input::read_text(path, v2l_contracts::input::InputKind::Record)
            .map_err(|e| RuntimeError::io(path, e))?;
        serde_json::from_str(&text).map_err(|e| RuntimeError::BadFile {
            path: path.into(),
            message: format!("not a CLIPImageProcessor config: {e}"),
        })
    }

    /// `CLIPImageProcessor`'s defaults (OpenAI mean/std, bicubic, rescale 1/255) with shortest
    /// edge and square crop `size`: what a CLIP vision model of `image_size` expects.
    pub fn for_image_size(size: usize) -> ClipPreprocess {
        ClipPreprocess {
            do_resize: true,
            shortest_edge: size,
            resample: BICUBIC,
            do_center_crop: true,
            crop_height: size,
            crop_width: size,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: OPENAI_CLIP_MEAN,
            image_std: OPENAI_CLIP_STD,
        }
    }

    /// Settings the steps below cannot run with (checked before any work).
    fn check(&self) -> std::result::Result<(), String> {
        if self.do_resize && self.shortest_edge == 0 {
            return Err("size.shortest_edge must be positive".into());
        }
        if self.do_resize && self.resample != BICUBIC {
            return Err(format!(
                "resample {} is not supported (only 3, BICUBIC)",
                self.resample
            ));
        }
        let crop_fits = self.crop_height > 0 && self.crop_width > 0;
        if self.do_center_crop
            && !(crop_fits && rgb_len(self.crop_height, self.crop_width).is_some())
        {
            return Err(format!(
                "crop_size {}x{} must be positive and not absurdly large",
                self.crop_height, self.crop_width
            ));
        }
        if self.do_rescale && !self.rescale_factor.is_finite() {
            return Err("rescale_factor must be finite".into());
        }
        // Checked as the float32 values normalize uses.
        let std_ok = self.image_std.iter().all(|s| (*s as f32).is_normal());
        let mean_ok = self.image_mean.iter().all(|m| (*m as f32).is_finite());
        if self.do_normalize && !(std_ok && mean_ok) {
            return Err(
                "image_mean must be finite and image_std finite and non-zero (as float32)".into(),
            );
        }
        Ok(())
    }

    /// The (height, width) the resize step produces: transformers'
    /// `get_resize_output_image_size(default_to_square=False)`.
    fn resized_size(&self, height: usize, width: usize) -> (usize, usize) {
        let (short, long) = if width <= height {
            (width, height)
        } else {
            (height, width)
        };
        // Python: int(size * long / short). Both operands are exact in f64 below 2^53 and the
        // division is correctly rounded, as Python's int / int is; `as` truncates like int().
        let new_long = (self.shortest_edge as f64 * long as f64 / short as f64) as usize;
        if width <= height {
            (new_long, self.shortest_edge)
        } else {
            (self.shortest_edge, new_long)
        }
    }

    /// RGB8 `height x width` (interleaved) → `pixel_values [1, 3, crop_h, crop_w]`.
    pub fn apply(&self, rgb: &[u8], height: usize, width: usize) -> Result<Tensor> {
        self.check().map_err(|m| invalid("CLIP preprocessing", m))?;
        check_rgb(rgb, height, width)?;
        let (mut img, mut h, mut w) = (std::borrow::Cow::Borrowed(rgb), height, width);
        if self.do_resize {
            // Sizes are the caller's to limit (`crate::limits`); this only refuses what cannot
            // be addressed at all.
            let (oh, ow) = self.resized_size(h, w);
            img = resize_bicubic_rgb8(&img, h, w, oh, ow)?.into();
            (h, w) = (oh, ow);
        }
        if self.do_center_crop {
            img = center_crop(&img, h, w, self.crop_height, self.crop_width).into();
            (h, w) = (self.crop_height, self.crop_width);
        }
        // transformers' rescale multiplies in float64 and stores float32; normalize then works
        // on that float32 image with float32 mean and std.
        let mean = self.image_mean.map(|m| m as f32);
        let std = self.image_std.map(|s| s as f32);
        let plane = h * w;
        let mut out = vec![0f32; 3 * plane];
        for (c, dst) in out.chunks_exact_mut(plane.max(1)).enumerate() {
            let (m, s) = (
                mean.get(c).copied().unwrap_or(0.0),
                std.get(c).copied().unwrap_or(1.0),
            );
            for (o, px) in dst.iter_mut().zip(img.iter().skip(c).step_by(3)) {
                let mut x = if self.do_rescale {
                    (f64::from(*px) * self.rescale_factor) as f32
                } else {
                    f32::from(*px)
                };
                if self.do_normalize {
                    x = (x - m) / s;
                }
                *o = x;
            }
        }
        Ok(Tensor::f32(vec![1, 3, h, w], out))
    }
}

/// The byte count of an `h x w` RGB8 image, if Pillow could hold it (sides fit a C int) and
/// its float32 `pixel_values` fit in memory addressing (no capacity overflow panics).
fn rgb_len(h: usize, w: usize) -> Option<usize> {
    let max_side = i32::MAX as usize;
    h.checked_mul(w)
        .and_then(|n| n.checked_mul(3))
        .filter(|n| h <= max_side && w <= max_side && *n <= isize::MAX as usize / 4)
}

/// `rgb` holds `height x width` RGB8 pixels, both sides positive.
fn check_rgb(rgb: &[u8], height: usize, width: usize) -> Result<()> {
    if height == 0 || width == 0 {
        return Err(invalid(
            "image",
            format!("size {height}x{width} has a zero side"),
        ));
    }
    match rgb_len(height, width) {
        Some(n) if n == rgb.len() => Ok(()),
        Some(n) => Err(invalid(
            "image",
            format!(
                "{} bytes for a {height}x{width} RGB8 image (expected {n})",
                rgb.len()
            ),
        )),
        None => Err(invalid(
            "image",
            format!("size {height}x{width} is too large"),
        )),
    }
}

/// transformers' `center_crop` on a uint8 HWC image: crops each axis at `(size - crop) // 2`,
/// or zero-pads an axis shorter than the crop with the image at `ceil((crop - size) / 2)`.
fn center_crop(rgb: &[u8], h: usize, w: usize, crop_h: usize, crop_w: usize) -> Vec<u8> {
    // (first source index, first destination index, count) along one axis.
    let axis = |size: usize, crop: usize| {
        if size >= crop {
            ((size - crop) / 2, 0, crop)
        } else {
            (0, (crop - size).div_ceil(2), size)
        }
    };
    let (sy, dy, ny) = axis(h, crop_h);
    let (sx, dx, nx) = axis(w, crop_w);
    let mut out = vec![0u8; crop_h * crop_w * 3];
    let src_rows = rgb.chunks_exact(w * 3).skip(sy).take(ny);
    let dst_rows = out.chunks_exact_mut(crop_w * 3).skip(dy);
    for (src, dst) in src_rows.zip(dst_rows) {
        let src = src.iter().skip(sx * 3).take(nx * 3);
        for (d, s) in dst.iter_mut().skip(dx * 3).zip(src) {
            *d = *s;
        }
    }
    out
}

/// Pillow's fixed-point fraction bits for 8-bit images (`32 - 8 - 2`: headroom for the
/// filter's negative lobes and sums above one).
const PRECISION_BITS: u32 = 22;

/// Pillow's bicubic kernel, `a = -0.5`, with its exact operation order.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// One output sample's filter: the first input index and the fixed-point weights.
struct Taps {
    first: usize,
    weights: Vec<i64>,
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for resampling `in_size` samples to
/// `out_size` (the whole input, no box).
fn taps(in_size: usize, out_size: usize) -> Vec<Taps> {
    // Pillow passes the box (here the whole input) as C floats: the input size is an f32.
    let scale = f64::from(in_size as f32) / out_size as f64;
    let filterscale = if scale < 1.0 { 1.0 } else { scale };
    let support = 2.0 * filterscale;
    let ss = 1.0 / filterscale;
    let one = f64::from(1u32 << PRECISION_BITS);
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // C's (int) cast truncates toward zero, as `as` does; then clamp to the input.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
            let raw: Vec<f64> = (xmin..xmax)
                .map(|x| bicubic((x as f64 - center + 0.5) * ss))
                .collect();
            let ww: f64 = raw.iter().fold(0.0, |acc, w| acc + w);
            let weights = raw
                .into_iter()
                .map(|w| {
                    let k = if ww != 0.0 { w / ww } else { w };
                    // Round half away from zero, then truncate as C's (int) does.
                    if k < 0.0 {
                        (-0.5 + k * one) as i64
                    } else {
                        (0.5 + k * one) as i64
                    }
                })
                .collect();
            Taps {
                first: xmin as usize,
                weights,
            }
        })
        .collect()
}

/// Pillow's `clip8`: drop the fraction bits (arithmetic shift) and clamp to 0..=255.
fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// The rounding bias every accumulator starts from (one half in fixed point).
const HALF: i64 = 1 << (PRECISION_BITS - 1);

/// PIL `Image.resize(..., BICUBIC)` on interleaved RGB8, bit-exact.
///
/// Pillow resamples in two separable passes on uint8, horizontal first (its result rounded
/// and clamped to uint8), then vertical; a pass whose size does not change is skipped.
/// Pillow computes the horizontal pass only on the rows the vertical pass reads; rows are
/// independent, so computing all of them gives the same values.
pub fn resize_bicubic_rgb8(
    rgb: &[u8],
    height: usize,
    width: usize,
    out_h: usize,
    out_w: usize,
) -> Result<Vec<u8>> {
    check_rgb(rgb, height, width)?;
    // The output and the horizontal pass's `height x out_w` intermediate must be addressable.
    let fits = out_h > 0 && out_w > 0 && rgb_len(out_h, out_w).is_some();
    if !fits || rgb_len(height, out_w).is_none() {
        return Err(invalid(
            "resize",
            format!("cannot resize {height}x{width} to {out_h}x{out_w}"),
        ));
    }
    let horizontal;
    let src: &[u8] = if out_w != width {
        horizontal = resample_rows(rgb, width, out_w);
        &horizontal
    } else {
        rgb
    };
    if out_h != height {
        Ok(resample_columns(src, height, out_w, out_h))
    } else {
        Ok(src.to_vec())
    }
}

/// The horizontal pass: every row of `w` pixels to `out_w` pixels.
fn resample_rows(rgb: &[u8], w: usize, out_w: usize) -> Vec<u8> {
    let taps = taps(w, out_w);
    let rows = rgb.len() / (w * 3);
    let mut out = Vec::with_capacity(rows * out_w * 3);
    for row in rgb.chunks_exact(w * 3) {
        for t in &taps {
            let mut acc = [HALF; 3];
            for (px, k) in row.chunks_exact(3).skip(t.first).zip(&t.weights) {
                for (a, v) in acc.iter_mut().zip(px) {
                    *a += i64::from(*v) * k;
                }
            }
            out.extend(acc.map(clip8));
        }
    }
    out
}

/// The vertical pass: `h` rows of `w` pixels to `out_h` rows.
fn resample_columns(rgb: &[u8], h: usize, w: usize, out_h: usize) -> Vec<u8> {
    let taps = taps(h, out_h);
    let mut out = Vec::with_capacity(out_h * w * 3);
    let mut acc = vec![0i64; w * 3];
    for t in &taps {
        acc.fill(HALF);
        for (row, k) in rgb.chunks_exact(w * 3).skip(t.first).zip(&t.weights) {
            for (a, v) in acc.iter_mut().zip(row) {
                *a += i64::from(*v) * k;
            }
        }
        out.extend(acc.iter().map(|a| clip8(*a)));
    }
    out
}

/// `preprocessor_config.json` as transformers writes it (and older shapes it still reads).
#[derive(serde::Deserialize)]
struct RawConfig {
    image_processor_type: Option<String>,
    do_resize: Option<bool>,
    size: Option<RawSize>,
    default_to_square: Option<bool>,
    resample: Option<u32>,
    do_center_crop: Option<bool>,
    crop_size: Option<RawSize>,
    do_rescale: Option<bool>,
    rescale_factor: Option<f64>,
    do_normalize: Option<bool>,
    image_mean: Option<PerChannel>,
    image_std: Option<PerChannel>,
    do_pad: Option<bool>,
}

/// A size: an integer (older configs) or a dict such as `{"shortest_edge": 224}`.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum RawSize {
    Int(usize),
    Dict(std::collections::BTreeMap<String, usize>),
}

/// A mean or std: one value for all channels or one per channel.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum PerChannel {
    One(f64),
    Many(Vec<f64>),
}

impl PerChannel {
    fn channels(self, name: &str) -> std::result::Result<[f64; 3], String> {
        match self {
            PerChannel::One(v) => Ok([v; 3]),
            PerChannel::Many(v) => <[f64; 3]>::try_from(v.as_slice())
                .map_err(|_| format!("{name} has {} values, expected 3", v.len())),
        }
    }
}

impl TryFrom<RawConfig> for ClipPreprocess {
    type Error = String;

    fn try_from(raw: RawConfig) -> std::result::Result<Self, String> {
        if let Some(t) = &raw.image_processor_type {
            if !t.starts_with("CLIPImageProcessor") {
                return Err(format!(
                    "image_processor_type is {t}, not CLIPImageProcessor"
                ));
            }
        }
        if raw.do_pad == Some(true) {
            return Err("do_pad is not supported".into());
        }
        let d = ClipPreprocess::for_image_size(224);
        let shortest_edge = match raw.size {
            None => d.shortest_edge,
            // An integer means the shortest edge unless the config asks for squares.
            Some(RawSize::Int(n)) if raw.default_to_square != Some(true) => n,
            Some(RawSize::Dict(m)) if m.len() == 1 && m.contains_key("shortest_edge") => {
                m.get("shortest_edge").copied().unwrap_or(d.shortest_edge)
            }
            Some(_) => return Err("only size {\"shortest_edge\": N} is supported".into()),
        };
        let (crop_height, crop_width) = match raw.crop_size {
            None => (d.crop_height, d.crop_width),
            Some(RawSize::Int(n)) => (n, n),
            Some(RawSize::Dict(m)) => match (m.get("height"), m.get("width"), m.len()) {
                (Some(h), Some(w), 2) => (*h, *w),
                _ => return Err("crop_size must be {\"height\": H, \"width\": W}".into()),
            },
        };
        let p = ClipPreprocess {
            do_resize: raw.do_resize.unwrap_or(d.do_resize),
            shortest_edge,
            resample: raw.resample.unwrap_or(d.resample),
            do_center_crop: raw.do_center_crop.unwrap_or(d.do_center_crop),
            crop_height,
            crop_width,
            do_rescale: raw.do_rescale.unwrap_or(d.do_rescale),
            rescale_factor: raw.rescale_factor.unwrap_or(d.rescale_factor),
            do_normalize: raw.do_normalize.unwrap_or(d.do_normalize),
            image_mean: match raw.image_mean {
                Some(m) => m.channels("image_mean")?,
                None => d.image_mean,
            },
            image_std: match raw.image_std {
                Some(s) => s.channels("image_std")?,
                None => d.image_std,
            },
        };
        p.check()?;
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Data;
    use std::collections::BTreeMap;

    const FIXTURE: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/wan-tiny/clip_preprocess_io.safetensors"
    );
    const CONFIG: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/wan-tiny/image_processor/preprocessor_config.json"
    );

    fn fixture() -> BTreeMap<String, Tensor> {
        crate::read_safetensors(Path::new(FIXTURE)).unwrap()
    }

    fn u8s(t: &Tensor) -> &[u8] {
        match &t.data {
            Data::U8(v) => v,
            other => panic!("expected uint8, got {other:?}"),
        }
    }

    fn i64s(t: &Tensor) -> &[i64] {
        match &t.data {
            Data::I64(v) => v,
            other => panic!("expected int64, got {other:?}"),
        }
    }

    /// (rgb, height, width) of an `[H, W, 3]` uint8 tensor.
    fn image(t: &Tensor) -> (&[u8], usize, usize) {
        assert_eq!(t.shape.len(), 3);
        assert_eq!(t.shape[2], 3);
        (u8s(t), t.shape[0], t.shape[1])
    }

    fn cases(f: &BTreeMap<String, Tensor>) -> usize {
        (0..)
            .take_while(|i| f.contains_key(&format!("case{i}_rgb")))
            .count()
    }

    #[test]
    fn resize_is_bit_exact() {
        let f = fixture();
        let mut checked = 0;
        for i in 0..cases(&f) {
            let (rgb, h, w) = image(&f[&format!("case{i}_rgb")]);
            let want = &f[&format!("case{i}_resized")];
            let (oh, ow) = (want.shape[0], want.shape[1]);
            let se = i64s(&f[&format!("case{i}_shortest_edge")])[0] as usize;
            let p = ClipPreprocess::for_image_size(se);
            assert_eq!(p.resized_size(h, w), (oh, ow), "case {i} resize size");
            let got = resize_bicubic_rgb8(rgb, h, w, oh, ow).unwrap();
            assert_eq!(got, u8s(want), "case {i}: {h}x{w} -> {oh}x{ow}");
            checked += 1;
        }
        for j in 0.. {
            let Some(input) = f.get(&format!("resize{j}_in")) else {
                break;
            };
            let (rgb, h, w) = image(input);
            let want = &f[&format!("resize{j}_out")];
            let (oh, ow) = (want.shape[0], want.shape[1]);
            let got = resize_bicubic_rgb8(rgb, h, w, oh, ow).unwrap();
            assert_eq!(got, u8s(want), "resize {j}: {h}x{w} -> {oh}x{ow}");
            checked += 1;
        }
        eprintln!("{checked} resizes bit-exact");
        assert!(checked >= 10);
    }

    #[test]
    fn pixel_values_match_the_processor() {
        let f = fixture();
        assert!(cases(&f) >= 3);
        for i in 0..cases(&f) {
            let (rgb, h, w) = image(&f[&format!("case{i}_rgb")]);
            let se = i64s(&f[&format!("case{i}_shortest_edge")])[0] as usize;
            let crop = i64s(&f[&format!("case{i}_crop")]);
            let mut p = ClipPreprocess::for_image_size(se);
            (p.crop_height, p.crop_width) = (crop[0] as usize, crop[1] as usize);
            let got = p.apply(rgb, h, w).unwrap();
            let want = &f[&format!("case{i}_pixel_values")];
            assert_eq!(got.shape, want.shape, "case {i}");
            let (g, wv) = (got.as_f32("got").unwrap(), want.as_f32("want").unwrap());
            let err = crate::rel_l2(g, wv);
            let max_abs = g
                .iter()
                .zip(wv)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let identical = g.iter().zip(wv).all(|(a, b)| a.to_bits() == b.to_bits());
            eprintln!(
                "case {i}: {h}x{w} -> {:?}: rel L2 {err:.3e}, max |diff| {max_abs:.3e}, \
                 bit-identical {identical}",
                got.shape
            );
            assert!(err <= 1e-6, "case {i}: rel L2 {err}");
        }
    }

    #[test]
    fn from_file_reads_the_saved_config() {
        let p = ClipPreprocess::from_file(Path::new(CONFIG)).unwrap();
        assert_eq!(p, ClipPreprocess::for_image_size(28));
        let f = fixture();
        let (rgb, h, w) = image(&f["case0_rgb"]);
        let got = p.apply(rgb, h, w).unwrap();
        assert_eq!(got, f["case0_pixel_values"]);
    }

    #[test]
    fn older_config_shapes_and_defaults() {
        let p: ClipPreprocess =
            serde_json::from_str(r#"{"size": 224, "crop_size": 224, "image_mean": null}"#).unwrap();
        assert_eq!(p, ClipPreprocess::for_image_size(224));
        let p: ClipPreprocess = serde_json::from_str(
            r#"{"size": {"shortest_edge": 16}, "crop_size": {"height": 21, "width": 19},
                "image_mean": 0.5, "image_std": [1, 2, 3]}"#,
        )
        .unwrap();
        assert_eq!((p.shortest_edge, p.crop_height, p.crop_width), (16, 21, 19));
        assert_eq!((p.image_mean, p.image_std), ([0.5; 3], [1.0, 2.0, 3.0]));
    }

    #[test]
    fn bad_input_is_an_error() {
        let p = ClipPreprocess::for_image_size(28);
        let rgb = vec![7u8; 4 * 5 * 3];
        assert!(p.apply(&rgb, 4, 5).is_ok());
        for (h, w, n) in [
            (4, 6, 60),
            (4, 5, 59),
            (0, 5, 0),
            (4, 0, 0),
            (usize::MAX, 3, 9),
        ] {
            let e = p.apply(rgb.get(..n).unwrap(), h, w).unwrap_err();
            assert!(matches!(e, RuntimeError::Invalid { .. }), "{h}x{w}: {e}");
        }
        assert!(resize_bicubic_rgb8(&rgb, 4, 5, 0, 3).is_err());
        assert!(resize_bicubic_rgb8(&rgb, 4, 5, 3, 0).is_err());
        assert!(resize_bicubic_rgb8(&rgb, 5, 5, 3, 3).is_err());
        assert!(resize_bicubic_rgb8(&rgb, 4, 5, usize::MAX / 2, 3).is_err());

        let bad: [fn(&mut ClipPreprocess); 5] = [
            |q| q.shortest_edge = 0,
            |q| q.crop_height = 0,
            |q| q.crop_width = usize::MAX,
            |q| q.resample = 2,
            |q| q.image_std = [1.0, 0.0, 1.0],
        ];
        for (i, spoil) in bad.iter().enumerate() {
            let mut q = p.clone();
            spoil(&mut q);
            let e = q.apply(&rgb, 4, 5).unwrap_err();
            assert!(
                matches!(e, RuntimeError::Invalid { .. }),
                "setting {i}: {e}"
            );
        }

        let dir = tempfile::tempdir().unwrap();
        for (json, why) in [
            (r#"{"resample": 2}"#, "bilinear"),
            (r#"{"size": {"height": 4, "width": 4}}"#, "fixed size"),
            (r#"{"size": {"shortest_edge": 0}}"#, "zero size"),
            (r#"{"crop_size": {"height": 4}}"#, "crop without width"),
            (r#"{"image_mean": [0.5, 0.5]}"#, "two means"),
            (r#"{"image_std": [1, 0, 1]}"#, "zero std"),
            (
                r#"{"image_processor_type": "SiglipImageProcessor"}"#,
                "not CLIP",
            ),
            (r#"{"do_pad": true}"#, "padding"),
            ("not json", "not json"),
        ] {
            let path = dir.path().join("preprocessor_config.json");
            std::fs::write(&path, json).unwrap();
            let e = ClipPreprocess::from_file(&path).unwrap_err();
            assert!(matches!(e, RuntimeError::BadFile { .. }), "{why}: {e}");
        }
        let missing = ClipPreprocess::from_file(&dir.path().join("missing.json")).unwrap_err();
        assert!(matches!(missing, RuntimeError::Io { .. }));
    }

    #[test]
    fn crop_pads_short_axes_like_transformers() {
        // 2x3 image cropped to 5x2: rows padded (top ceil(3/2) = 2), columns cropped at 0.
        let rgb: Vec<u8> = (1..=18).collect();
        let out = center_crop(&rgb, 2, 3, 5, 2);
        let row = |r: usize| &out[r * 6..r * 6 + 6];
        assert_eq!(row(0), [0; 6]);
        assert_eq!(row(1), [0; 6]);
        assert_eq!(row(2), [1, 2, 3, 4, 5, 6]);
        assert_eq!(row(3), [10, 11, 12, 13, 14, 15]);
        assert_eq!(row(4), [0; 6]);
    }
}
