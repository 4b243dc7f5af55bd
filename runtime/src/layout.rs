//! The pipeline's tensor layout changes, each one named, through `ndarray` views: the data is
//! read through a permuted or sliced view and written once into a standard (row-major) array,
//! which is what ONNX Runtime then reads without a copy (`session.rs` binds host slices).
//!
//! diffusers keeps DiT tensors as `[B, F, C, H, W]` and VAE tensors as `[B, C, F, H, W]`, and
//! frames as `[F, H, W, 3]` bytes; these functions are the only places v2l moves between them.

use ndarray::{concatenate, Array4, ArrayView3, ArrayView4, Axis};

use crate::error::{Result, RuntimeError};

fn shape_err(what: &str, e: ndarray::ShapeError) -> RuntimeError {
    RuntimeError::Tensor {
        what: what.into(),
        message: format!("layout: {e}"),
    }
}

/// RGB8 frames `[F, H, W, 3]` → `[3, F, H, W]` floats `x / 255` (the VAE's channel-first clip).
pub fn rgb8_to_planes(rgb: &[u8], frames: usize, height: usize, width: usize) -> Result<Vec<f32>> {
    let v = ArrayView4::from_shape((frames, height, width, 3), rgb)
        .map_err(|e| shape_err("frames", e))?;
    let mut out = Array4::<f32>::zeros((3, frames, height, width));
    out.zip_mut_with(&v.permuted_axes([3, 0, 1, 2]), |o, &x| {
        *o = x as f32 / 255.0
    });
    Ok(out.into_raw_vec_and_offset().0)
}

/// Channel planes `[3, N]` (N = F·H·W) → interleaved `[N, 3]`, each value `f(x)`.
pub fn planes_to_interleaved(planes: &[f32], n: usize, f: impl Fn(f32) -> f32) -> Result<Vec<f32>> {
    let v = ndarray::ArrayView2::from_shape((3, n), planes).map_err(|e| shape_err("video", e))?;
    let mut out = ndarray::Array2::<f32>::zeros((n, 3));
    out.zip_mut_with(&v.t(), |o, &x| *o = f(x));
    Ok(out.into_raw_vec_and_offset().0)
}

/// `[A, B, P]` → `[B, A, P]` (P = one plane), each value `f(x)`: the DiT's `[F, C, h·w]`
/// latents to the VAE's `[C, F, h·w]`.
pub fn swap_leading(
    x: &[f32],
    a: usize,
    b: usize,
    plane: usize,
    f: impl Fn(f32) -> f32,
) -> Result<Vec<f32>> {
    let v = ArrayView3::from_shape((a, b, plane), x).map_err(|e| shape_err("latents", e))?;
    let mut out = ndarray::Array3::<f32>::zeros((b, a, plane));
    out.zip_mut_with(&v.permuted_axes([1, 0, 2]), |o, &x| *o = f(x));
    Ok(out.into_raw_vec_and_offset().0)
}

/// The DiT's `hidden_states` for classifier-free guidance: `[latents C | conditioning C']` on
/// the channel axis, `[F, C + C', P]`, `batch` times (2: the negative and the positive
/// branch): `[batch, F, C + C', P]`. C' is C for diffusers' I2V (the first frame's latents),
/// C + 1 for VideoX-Fun's inpaint models (mask and masked-video latents).
pub fn guidance_batch(
    latents: &[f32],
    image_latents: &[f32],
    frames: usize,
    [channels, cond_channels]: [usize; 2],
    plane: usize,
    batch: usize,
) -> Result<Vec<f32>> {
    let noisy = ArrayView3::from_shape((frames, channels, plane), latents)
        .map_err(|e| shape_err("latents", e))?;
    let image = ArrayView3::from_shape((frames, cond_channels, plane), image_latents)
        .map_err(|e| shape_err("image latents", e))?;
    let one = concatenate(Axis(1), &[noisy, image]).map_err(|e| shape_err("latents", e))?;
    let one: Vec<f32> = one.as_standard_layout().iter().copied().collect();
    Ok(one.repeat(batch))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_move_every_value_where_diffusers_has_it() {
        // [F=2, H=1, W=2, 3] bytes → [3, F, H, W].
        let rgb: Vec<u8> = (0..12).collect();
        let p = rgb8_to_planes(&rgb, 2, 1, 2).unwrap();
        let want: Vec<f32> = [0, 3, 6, 9, 1, 4, 7, 10, 2, 5, 8, 11]
            .iter()
            .map(|&x| x as f32 / 255.0)
            .collect();
        assert_eq!(p, want);
        // Back to interleaved.
        let i = planes_to_interleaved(&p, 4, |x| x * 255.0).unwrap();
        let back: Vec<f32> = rgb.iter().map(|&x| x as f32).collect();
        assert!(i.iter().zip(&back).all(|(a, b)| (a - b).abs() < 1e-4));
        // [A=2, B=3, P=1] → [B, A, P].
        let s = swap_leading(&[0., 1., 2., 3., 4., 5.], 2, 3, 1, |x| x).unwrap();
        assert_eq!(s, [0., 3., 1., 4., 2., 5.]);
        // Guidance batch: per frame [noisy C | image C], the whole thing twice.
        let g = guidance_batch(&[1., 2.], &[10., 20.], 2, [1, 1], 1, 2).unwrap();
        assert_eq!(g, [1., 10., 2., 20., 1., 10., 2., 20.]);
        let g = guidance_batch(&[1., 2.], &[10., 20.], 2, [1, 1], 1, 1).unwrap();
        assert_eq!(g, [1., 10., 2., 20.]);
        assert!(guidance_batch(&[1.], &[1., 2.], 2, [1, 1], 1, 2).is_err());
    }
}
