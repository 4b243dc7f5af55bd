//! VideoX-Fun's inpaint conditioning (`CogVideoXFunInpaintPipeline`, the backbone Video2LoRA's
//! released code trains on): the DiT reads `[noisy C | mask 1 | masked-video latents C]` per
//! latent frame.
//!
//! As upstream builds it for image-to-video (`get_image_to_video_latent`, `prepare_mask_latents`):
//! - a whole clip of F frames, frame 0 the first frame in [-1, 1], every later frame -1;
//! - with `add_noise_in_inpaint_model`, every pixel that is not -1 gets the augmentation noise
//!   `0.0563 · ε` (`add_noise_to_reference_video`);
//! - the clip VAE-encoded (posterior mode, whatever the request's posterior setting: upstream
//!   takes `.mode()` here) × `scaling_factor`;
//! - the mask channel `resize_mask(1 − mask) · scaling_factor`: the first latent frame is
//!   resized alone from a mask of ones, so it is `scaling_factor` exactly, the rest 0.

use crate::error::{Result, RuntimeError};
use crate::tensor::Tensor;
use crate::vae::Vae;
use crate::video::Frames;
use v2l_contracts::io::files as files_io;
use v2l_contracts::request::{Field, RequestError};

use crate::request::LatentShape;

/// `noise_aug_strength`, `CogVideoXFunInpaintPipeline.__call__`'s default.
pub const NOISE_AUG_STRENGTH: f32 = 0.0563;

/// Mixed into the request's seed for the augmentation noise, so that ε is not the initial
/// latent noise's first values.
const AUGMENTATION_STREAM: u64 = 0x494E_5041_494E_5421; // "INPAINT!"

/// The conditioning clip `[1, 3, F, H, W]`: the first frame in [-1, 1], then -1.
fn conditioning_clip(image: &Frames, frames: usize) -> Result<Tensor> {
    let first = image.to_unit_video()?;
    let plane = image.height * image.width;
    let mut clip = vec![-1f32; 3 * frames * plane];
    // Each channel's first plane is the image; the rest stay -1.
    for (dst, src) in clip
        .chunks_exact_mut(frames.max(1) * plane)
        .zip(first.as_f32("image")?.chunks_exact(plane))
    {
        for (o, v) in dst.iter_mut().zip(src) {
            *o = v * 2.0 - 1.0;
        }
    }
    Ok(Tensor::f32(
        vec![1, 3, frames, image.height, image.width],
        clip,
    ))
}

/// The augmentation noise as upstream adds it: `0.0563 · ε`, zero where the pixel is -1; the
/// request's own (`given`) or ε drawn from `seed`.
fn augmentation(
    clip: &[f32],
    shape: &[usize],
    given: Option<&Tensor>,
    seed: Option<u64>,
) -> Result<Vec<f32>> {
    match (given, seed) {
        (Some(t), _) => {
            if t.shape != shape {
                return Err(RequestError::new(
                    Field::Noise,
                    format!(
                        "`{}` has shape {:?}; expected {shape:?} (the conditioning clip)",
                        files_io::INPAINT_NOISE,
                        t.shape
                    ),
                )
                .into());
            }
            let v = t.as_f32(files_io::INPAINT_NOISE)?;
            crate::error::check_finite(|| files_io::INPAINT_NOISE.into(), v)?;
            Ok(v.to_vec())
        }
        (None, Some(seed)) => {
            let eps = v2l_contracts::noise::gaussian(clip.len(), seed ^ AUGMENTATION_STREAM);
            Ok(clip
                .iter()
                .zip(eps)
                .map(|(&x, e)| {
                    if x == -1.0 {
                        0.0
                    } else {
                        e * NOISE_AUG_STRENGTH
                    }
                })
                .collect())
        }
        (None, None) => Err(RequestError::new(
            Field::Noise,
            "this CogVideoX-Fun-InP model adds noise to its conditioning clip \
             (`add_noise_in_inpaint_model`): give the request a seed or its `inpaint_noise`",
        )
        .into()),
    }
}

/// Per latent frame `[mask 1 | masked-video latents C]`, frames first: `[lf, C + 1, h, w]`.
pub(super) fn inpaint_latents(
    vae: &mut Vae,
    image: &Frames,
    frames: usize,
    add_noise: bool,
    given: Option<&Tensor>,
    seed: Option<u64>,
    shape: &LatentShape,
) -> Result<Vec<f32>> {
    let clip = conditioning_clip(image, frames)?;
    let clip = if add_noise {
        let px = clip.as_f32("clip")?;
        let aug = augmentation(px, &clip.shape, given, seed)?;
        let noisy = px.iter().zip(&aug).map(|(x, n)| x + n).collect();
        Tensor::f32(clip.shape.clone(), noisy)
    } else {
        clip
    };
    let (mean, _) = vae.encode(&clip)?;
    let sf = vae.entry.scaling_factor as f32;
    let (lf, c, plane) = (shape.frames, shape.channels, shape.height * shape.width);
    if mean.shape != [1, c, lf, shape.height, shape.width] {
        return Err(RuntimeError::Graph {
            graph: "VAE encoder".into(),
            message: format!(
                "the conditioning clip's latents are {:?}; expected {:?}",
                mean.shape,
                [1, c, lf, shape.height, shape.width]
            ),
        });
    }
    // `[C, lf]` planes of the posterior mean, plane (ch, f) at ch·lf + f.
    let planes: Vec<&[f32]> = mean.as_f32("posterior_mean")?.chunks_exact(plane).collect();
    let mut out = Vec::with_capacity(lf * (c + 1) * plane);
    for f in 0..lf {
        out.extend(std::iter::repeat_n(if f == 0 { sf } else { 0.0 }, plane));
        for ch in 0..c {
            let p = planes.get(ch * lf + f).copied().unwrap_or_default();
            out.extend(p.iter().map(|v| v * sf));
        }
    }
    Ok(out)
}
