//! The 3D rotary position embedding CogVideoX 1.0 feeds its transformer (`rope_cos`, `rope_sin`),
//! built as diffusers 0.42.1's `CogVideoXImageToVideoPipeline._prepare_rotary_positional_embeddings`
//! does for `patch_size_t = None`: a crop region of the grid inside the transformer's base grid
//! (`get_resize_crop_region_for_grid`), then `get_3d_rotary_pos_embed` with `use_real=True` and
//! linspace grids.
//!
//! Precision mirrors torch: the grids (torch's scalar `linspace` scheme), frequencies and angles
//! are float32 (the crop arithmetic is Python float64/int), with the same operation order.
//! `cos`/`sin` of the float32 angles are evaluated in float64 and rounded, i.e. correctly
//! rounded. torch evaluates them with MKL's float32 vector math, which is within one ulp but
//! not always correctly rounded: on the tiny fixture 2 of the distinct angles (1.0 and
//! 10000^(-1/3)) come out one float32 ulp apart, 2.5e-8 relative L2 over `rope_cos`; `rope_sin`
//! is bitwise equal.

use crate::scheduler::linspace_f32;

/// `rope_cos`, `rope_sin`, each `[latent_frames · (latent_height/p) · (latent_width/p), head_dim]`
/// row-major (rows ordered frame, then row, then column).
///
/// `latent_height`/`latent_width` are the latent sizes (pixels / 8); `sample_height` /
/// `sample_width` are the transformer config's values (latent units).
///
/// Panics if `patch_size` is 0 or `head_dim` is not a multiple of 8 (diffusers splits the head
/// dimension as `D/4 + 3·D/8 + 3·D/8`, with even parts).
pub fn cogvideox_rope(
    head_dim: usize,
    latent_frames: usize,
    latent_height: usize,
    latent_width: usize,
    patch_size: usize,
    sample_height: usize,
    sample_width: usize,
) -> crate::Result<(Vec<f32>, Vec<f32>)> {
    let grid = [latent_frames, latent_height, latent_width];
    rope_with(
        head_dim,
        grid,
        patch_size,
        [sample_height, sample_width],
        Grid::Torch,
    )
}

/// [`cogvideox_rope`] as VideoX-Fun's `CogVideoXFunInpaintPipeline` builds it: its own copy of
/// `get_3d_rotary_pos_embed` makes the position grids with
/// `numpy.linspace(start, stop, n, endpoint=False, dtype=float32)` (float64 `i·(stop −
/// start)/n + start`, rounded once) instead of torch's float32 `linspace`. Where the crop
/// region is not a whole number of patches the last bits differ.
pub fn cogvideox_fun_rope(
    head_dim: usize,
    latent_frames: usize,
    latent_height: usize,
    latent_width: usize,
    patch_size: usize,
    sample_height: usize,
    sample_width: usize,
) -> crate::Result<(Vec<f32>, Vec<f32>)> {
    let grid = [latent_frames, latent_height, latent_width];
    rope_with(
        head_dim,
        grid,
        patch_size,
        [sample_height, sample_width],
        Grid::Numpy,
    )
}

/// How the position grids are filled: diffusers' torch grids or VideoX-Fun's numpy ones.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Grid {
    Torch,
    Numpy,
}

/// `numpy.linspace(start, stop, num, endpoint=False, dtype=float32)` for integer bounds.
fn np_linspace_open_f32(start: i64, stop: i64, num: usize) -> Vec<f32> {
    let step = (stop - start) as f64 / num.max(1) as f64;
    (0..num)
        .map(|i| {
            let y = if step == 0.0 {
                i as f64 / num as f64 * (stop - start) as f64
            } else {
                i as f64 * step
            };
            (y + start as f64) as f32
        })
        .collect()
}

fn rope_with(
    head_dim: usize,
    [latent_frames, latent_height, latent_width]: [usize; 3],
    patch_size: usize,
    [sample_height, sample_width]: [usize; 2],
    kind: Grid,
) -> crate::Result<(Vec<f32>, Vec<f32>)> {
    // diffusers splits the head into time (1/4), height and width (3/8 each): a multiple of 8.
    if patch_size == 0 || head_dim == 0 || head_dim % 8 != 0 {
        return Err(crate::SamplingError::Invalid {
            what: "RoPE".into(),
            message: format!(
                "attention_head_dim {head_dim} with patch size {patch_size}: CogVideoX's 3-D RoPE needs a positive patch size and a head size that is a multiple of 8"
            ),
        });
    }
    let grid_h = latent_height / patch_size;
    let grid_w = latent_width / patch_size;
    let base_h = sample_height / patch_size;
    let base_w = sample_width / patch_size;

    let ((top, left), (bottom, right)) =
        resize_crop_region_for_grid(grid_h, grid_w, base_w, base_h);

    // get_3d_rotary_pos_embed, grid_type = "linspace"
    let t = latent_frames as i64;
    let (pos_h, pos_w, pos_t) = match kind {
        Grid::Torch => (
            linspace_f32(
                top as f32,
                py_true_div(bottom * (grid_h as i64 - 1), grid_h as i64) as f32,
                grid_h,
            ),
            linspace_f32(
                left as f32,
                py_true_div(right * (grid_w as i64 - 1), grid_w as i64) as f32,
                grid_w,
            ),
            linspace_f32(0.0, py_true_div(t * (t - 1), t) as f32, latent_frames),
        ),
        Grid::Numpy => (
            np_linspace_open_f32(top, bottom, grid_h),
            np_linspace_open_f32(left, right, grid_w),
            np_linspace_open_f32(0, t, latent_frames),
        ),
    };

    let dim_t = head_dim / 4;
    let dim_h = head_dim / 8 * 3;
    let dim_w = dim_h;
    let (t_cos, t_sin) = rotary_1d(dim_t, &pos_t, 10000.0);
    let (h_cos, h_sin) = rotary_1d(dim_h, &pos_h, 10000.0);
    let (w_cos, w_sin) = rotary_1d(dim_w, &pos_w, 10000.0);

    let rows = latent_frames * grid_h * grid_w;
    let mut cos = Vec::with_capacity(rows * head_dim);
    let mut sin = Vec::with_capacity(rows * head_dim);
    // Row (f, y, x) is [t(f) | h(y) | w(x)]; dims are positive (head_dim is a multiple of 8).
    let rows_of = |v: &[f32], d: usize| {
        v.chunks_exact(d.max(1))
            .map(<[f32]>::to_vec)
            .collect::<Vec<_>>()
    };
    let (tc, ts) = (rows_of(&t_cos, dim_t), rows_of(&t_sin, dim_t));
    let (hc, hs) = (rows_of(&h_cos, dim_h), rows_of(&h_sin, dim_h));
    let (wc, ws) = (rows_of(&w_cos, dim_w), rows_of(&w_sin, dim_w));
    for (t_c, t_s) in tc.iter().zip(&ts) {
        for (h_c, h_s) in hc.iter().zip(&hs) {
            for (w_c, w_s) in wc.iter().zip(&ws) {
                cos.extend_from_slice(t_c);
                cos.extend_from_slice(h_c);
                cos.extend_from_slice(w_c);
                sin.extend_from_slice(t_s);
                sin.extend_from_slice(h_s);
                sin.extend_from_slice(w_s);
            }
        }
    }
    Ok((cos, sin))
}

/// Wan's 3-D RoPE tables (`WanRotaryPosEmbed`, diffusers 0.42.1) for a `latent_frames ×
/// latent_height × latent_width` latent with patch `(p_t, p_h, p_w)`: `[N, head_dim]` cos and
/// sin, row `(f, y, x)` = `[t(f) | h(y) | w(x)]` with `h = w = 2·⌊head_dim/6⌋` and the rest for
/// time. Positions are whole patch indices; frequencies are float64 (`freqs_dtype=float64`),
/// cos/sin rounded to float32, each repeated twice (interleaved pairs).
pub fn wan_rope(
    head_dim: usize,
    latent_frames: usize,
    latent_height: usize,
    latent_width: usize,
    patch: (usize, usize, usize),
    max_seq_len: usize,
) -> crate::Result<(Vec<f32>, Vec<f32>)> {
    let (pt, ph, pw) = patch;
    let bad = |message: String| crate::SamplingError::Invalid {
        what: "RoPE".into(),
        message,
    };
    if pt == 0 || ph == 0 || pw == 0 || head_dim < 6 || head_dim % 2 != 0 {
        return Err(bad(format!(
            "attention_head_dim {head_dim} with patch {patch:?}: Wan's RoPE needs an even head size of at least 6 and a positive patch"
        )));
    }
    let (f, h, w) = (latent_frames / pt, latent_height / ph, latent_width / pw);
    if f.max(h).max(w) > max_seq_len {
        return Err(bad(format!(
            "{f}x{h}x{w} patches: more than rope_max_seq_len {max_seq_len} along an axis"
        )));
    }
    let h_dim = 2 * (head_dim / 6);
    let t_dim = head_dim - 2 * h_dim;
    let table = |dim: usize, n: usize| -> (Vec<f32>, Vec<f32>) {
        let freqs: Vec<f64> = (0..dim / 2)
            .map(|j| 1.0 / 10000f64.powf((2 * j) as f64 / dim as f64))
            .collect();
        let (mut c, mut s) = (Vec::with_capacity(n * dim), Vec::with_capacity(n * dim));
        for p in 0..n {
            for &fr in &freqs {
                let a = p as f64 * fr;
                let (sa, ca) = (a.sin() as f32, a.cos() as f32);
                c.extend_from_slice(&[ca, ca]);
                s.extend_from_slice(&[sa, sa]);
            }
        }
        (c, s)
    };
    let (tc, ts) = table(t_dim, f);
    let (hc, hs) = table(h_dim, h);
    let (wc, ws) = table(h_dim, w);
    let rows = f * h * w;
    let (mut cos, mut sin) = (
        Vec::with_capacity(rows * head_dim),
        Vec::with_capacity(rows * head_dim),
    );
    let row = |v: &[f32], i: usize, d: usize| v.get(i * d..(i + 1) * d).unwrap_or(&[]).to_vec();
    for fi in 0..f {
        for yi in 0..h {
            for xi in 0..w {
                for (out, (t, hh, ww)) in [(&mut cos, (&tc, &hc, &wc)), (&mut sin, (&ts, &hs, &ws))]
                {
                    out.extend(row(t, fi, t_dim));
                    out.extend(row(hh, yi, h_dim));
                    out.extend(row(ww, xi, h_dim));
                }
            }
        }
    }
    Ok((cos, sin))
}

/// Python's `a / b` for ints (correctly rounded; exact conversion for the small ints here).
fn py_true_div(a: i64, b: i64) -> f64 {
    if b == 0 {
        // Only reached for an empty grid, whose linspace has no elements.
        return 0.0;
    }
    a as f64 / b as f64
}

/// diffusers' `get_resize_crop_region_for_grid((h, w), tgt_width, tgt_height)`: Python floats,
/// `round` is half-to-even.
fn resize_crop_region_for_grid(
    h: usize,
    w: usize,
    tgt_width: usize,
    tgt_height: usize,
) -> ((i64, i64), (i64, i64)) {
    let (tw, th) = (tgt_width as f64, tgt_height as f64);
    let (hf, wf) = (h as f64, w as f64);
    let r = hf / wf;
    let (resize_height, resize_width) = if r > th / tw {
        (tgt_height as i64, (th / hf * wf).round_ties_even() as i64)
    } else {
        ((tw / wf * hf).round_ties_even() as i64, tgt_width as i64)
    };
    let crop_top = ((tgt_height as i64 - resize_height) as f64 / 2.0).round_ties_even() as i64;
    let crop_left = ((tgt_width as i64 - resize_width) as f64 / 2.0).round_ties_even() as i64;
    (
        (crop_top, crop_left),
        (crop_top + resize_height, crop_left + resize_width),
    )
}

/// `get_1d_rotary_pos_embed(dim, pos, theta, use_real=True, repeat_interleave_real=True)` with
/// float32 frequencies: `[S, dim]` cos and sin, each frequency repeated twice.
fn rotary_1d(dim: usize, pos: &[f32], theta: f32) -> (Vec<f32>, Vec<f32>) {
    // 1.0 / theta ** (arange(0, dim, 2, float32) / dim), all float32 (the reciprocal is exact
    // division; `powf` is the C library's, as torch's scalar float `std::pow` is).
    let freqs: Vec<f32> = (0..dim / 2)
        .map(|j| 1.0f32 / theta.powf((2 * j) as f32 / dim as f32))
        .collect();
    let mut cos = Vec::with_capacity(pos.len() * dim);
    let mut sin = Vec::with_capacity(pos.len() * dim);
    for &p in pos {
        for &f in &freqs {
            let angle = (p * f) as f64; // torch.outer in float32
            let (s, c) = (angle.sin() as f32, angle.cos() as f32);
            cos.extend_from_slice(&[c, c]);
            sin.extend_from_slice(&[s, s]);
        }
    }
    (cos, sin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numpy_grid_is_float64_then_rounded_once() {
        // numpy: step = (stop - start) / n in float64, y = i·step + start, then float32.
        let g = np_linspace_open_f32(0, 5, 3);
        assert_eq!(
            g,
            vec![0.0, (5.0f64 / 3.0) as f32, (2.0 * (5.0f64 / 3.0)) as f32]
        );
        assert_eq!(np_linspace_open_f32(1, 4, 3), vec![1.0, 2.0, 3.0]);
        assert_eq!(np_linspace_open_f32(0, 5, 5), vec![0.0, 1.0, 2.0, 3.0, 4.0]);
        // A whole crop region gives the same tables either way; a fractional one may not.
        let whole = (
            cogvideox_rope(16, 5, 8, 12, 2, 8, 12).unwrap(),
            cogvideox_fun_rope(16, 5, 8, 12, 2, 8, 12).unwrap(),
        );
        assert!(whole.0 == whole.1);
        let (torch, numpy) = (
            cogvideox_rope(16, 3, 10, 12, 2, 8, 12).unwrap(),
            cogvideox_fun_rope(16, 3, 10, 12, 2, 8, 12).unwrap(),
        );
        assert_eq!(torch.0.len(), numpy.0.len());
    }

    #[test]
    fn crop_region_matches_diffusers() {
        // Square grid in a square base: the whole base.
        assert_eq!(resize_crop_region_for_grid(4, 4, 4, 4), ((0, 0), (4, 4)));
        // CogVideoX-5B at 480x720 (latent 60x90, patch 2 -> 30x45; base 30x45).
        assert_eq!(
            resize_crop_region_for_grid(30, 45, 45, 30),
            ((0, 0), (30, 45))
        );
        // A square grid inside a 30x45 base: resize to 30x30, centred (left = round(7.5) = 8).
        assert_eq!(
            resize_crop_region_for_grid(30, 30, 45, 30),
            ((0, 8), (30, 38))
        );
        // A wide grid: height shrinks; top = round((30 - 15) / 2) = round(7.5) = 8.
        assert_eq!(
            resize_crop_region_for_grid(10, 30, 45, 30),
            ((8, 0), (23, 45))
        );
    }

    #[test]
    fn shapes() {
        let (c, s) = cogvideox_rope(64, 13, 60, 90, 2, 60, 90).unwrap();
        assert_eq!(c.len(), 13 * 30 * 45 * 64);
        assert_eq!(s.len(), c.len());
        // First row: all angles zero.
        assert!(c[..64].iter().all(|&v| v == 1.0));
        assert!(s[..64].iter().all(|&v| v == 0.0));
    }
}
