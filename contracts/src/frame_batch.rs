//! The CogVideoX VAE's frame batching, as diffusers does it, shared by the exporter (which
//! builds one graph per batch with its causal-conv caches as inputs and outputs), the runtime
//! (which threads the caches) and the C ABI (which sizes output buffers).

use serde::{Deserialize, Serialize};

/// A spatial size relative to the graph's main input: `floor(size · num / den)`.
///
/// Why a ratio: encoder caches live at `H/2^k` (each Downsample3D maps `H` to `floor(H/2)`,
/// and chained floors equal one floor), decoder caches at `h·2^k`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpatialScale {
    pub num: usize,
    pub den: usize,
}

impl SpatialScale {
    /// The main input's own resolution.
    pub const ONE: SpatialScale = SpatialScale { num: 1, den: 1 };

    /// The size at this scale for a main-input size `size`.
    pub fn apply(&self, size: usize) -> usize {
        size * self.num / self.den
    }

    pub fn halved(self) -> Self {
        SpatialScale {
            num: self.num,
            den: self.den * 2,
        }
    }

    pub fn doubled(self) -> Self {
        SpatialScale {
            num: self.num * 2,
            den: self.den,
        }
    }
}

/// A VAE graph's input carrying a causal-conv cache into a frame batch: `cache_in.<module>`.
pub const CACHE_INPUT_PREFIX: &str = "cache_in.";
/// The output carrying it on to the next batch: `cache_out.<module>`.
pub const CACHE_OUTPUT_PREFIX: &str = "cache_out.";

/// One causal-conv cache the runtime threads between frame batches.
///
/// Why: the runtime must build zero caches for the first batch, so it needs each shape as a
/// function of the clip's size: `[B, channels, frames, spatial_divisor.apply(H), spatial_divisor.apply(W)]`
/// where H, W are the graph's main input size (`video` for the encoder, `latents` for the decoder).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheSpec {
    /// Graph input name, `cache_in.<module path>`; the matching output is [`CacheSpec::output_name`].
    pub name: String,
    /// Input channels of the convolution.
    pub channels: usize,
    /// `k_t - 1` frames.
    pub frames: usize,
    /// Spatial size relative to the graph's main input.
    pub spatial_divisor: SpatialScale,
}

impl CacheSpec {
    /// The graph output carrying this cache for the next batch (`cache_out.<module path>`).
    pub fn output_name(&self) -> String {
        format!("{CACHE_OUTPUT_PREFIX}{}", self.module())
    }

    /// The diffusers module path (`encoder.conv_in`).
    pub fn module(&self) -> &str {
        self.name
            .strip_prefix(CACHE_INPUT_PREFIX)
            .unwrap_or(&self.name)
    }

    /// The cache's shape for batch size `batch` and main-input spatial size `height × width`.
    pub fn shape(&self, batch: usize, height: usize, width: usize) -> [usize; 5] {
        [
            batch,
            self.channels,
            self.frames,
            self.spatial_divisor.apply(height),
            self.spatial_divisor.apply(width),
        ]
    }
}

/// diffusers' `(start, end)` frame ranges of `_encode` / `_decode` for `num_frames` frames in
/// batches of `batch`: `max(n / batch, 1)` batches, the first also taking `n % batch`.
///
/// Why: GroupNorm and the parity rules depend on each batch's frames, so the runtime must cut
/// the clip exactly as diffusers does. Empty for `num_frames == 0`; `batch == 0` is one batch.
pub fn frame_batches(num_frames: usize, batch: usize) -> Vec<(usize, usize)> {
    if num_frames == 0 {
        return Vec::new();
    }
    if batch == 0 {
        return vec![(0, num_frames)];
    }
    let rem = num_frames % batch;
    (0..(num_frames / batch).max(1))
        .map(|i| {
            let start = batch * i + if i == 0 { 0 } else { rem };
            // Python slicing clamps the end (fewer frames than one batch).
            let end = (batch * (i + 1) + rem).min(num_frames);
            (start, end)
        })
        .collect()
}

/// How a VAE's loop cuts a clip into frame batches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FrameSchedule {
    /// CogVideoX ([`frame_batches`]): batches of `batch`, the first also taking the remainder.
    #[default]
    RemainderFirst,
    /// Wan (`AutoencoderKLWan._encode` / `_decode`): the first frame alone, then batches of
    /// `batch`. Frames past the last whole batch would be dropped by diffusers; they are
    /// refused here instead.
    FirstAlone,
    /// VideoX-Fun's CogVideoX decode (`auto_split_process = False`): the first frame alone,
    /// then batches of `batch`, the last one short when the rest does not divide.
    FirstThenBatches,
}

impl FrameSchedule {
    /// The `(start, end)` batches of `frames` frames, or why that count does not fit.
    pub fn batches(self, frames: usize, batch: usize) -> Result<Vec<(usize, usize)>, String> {
        match self {
            FrameSchedule::RemainderFirst => Ok(frame_batches(frames, batch)),
            FrameSchedule::FirstAlone => {
                let batch = batch.max(1);
                if frames == 0 || (frames - 1) % batch != 0 {
                    return Err(format!(
                        "{frames} frames; this VAE takes 1 + {batch}·k frames (the first frame alone, then batches of {batch})"
                    ));
                }
                let rest = (0..(frames - 1) / batch).map(|i| (1 + i * batch, 1 + (i + 1) * batch));
                Ok(std::iter::once((0, 1)).chain(rest).collect())
            }
            FrameSchedule::FirstThenBatches => {
                let batch = batch.max(1);
                let rest = (1..frames)
                    .step_by(batch)
                    .map(|start| (start, (start + batch).min(frames)));
                Ok((frames > 0)
                    .then_some((0, 1))
                    .into_iter()
                    .chain(rest)
                    .collect())
            }
        }
    }
}

/// Frames the CogVideoX VAE decodes from `latent_frames`, as diffusers does: the latents are
/// cut into batches ([`frame_batches`]: `max(n / batch, 1)` batches, the first
/// also taking `n % batch`) and each temporal upsampler maps `n` frames to
/// `1 + 2(n - 1)` for odd `n > 1` (the first frame is not doubled), `2n` for even `n`, and 1
/// to 1. So `1 + 4k` frames come back whole when every batch is odd (13 latents: 49 frames),
/// but 5 frames (2 latents, one even batch) decode to 8.
pub fn decoded_frames(latent_frames: usize, batch: usize, levels: usize) -> usize {
    let up = |n: usize| {
        (0..levels).fold(n, |n, _| match n {
            0 | 1 => n,
            n if n % 2 == 1 => 1 + 2 * (n - 1),
            n => 2 * n,
        })
    };
    // `frame_batches` in closed form (it would allocate one entry per batch).
    if latent_frames == 0 {
        return 0;
    }
    if batch == 0 || latent_frames < batch {
        return up(latent_frames);
    }
    let batches = latent_frames / batch;
    up(batch + latent_frames % batch) + (batches - 1) * up(batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_alone_matches_wan_encode_and_decode() {
        // `_encode`: x[:, :, :1], then x[:, :, 1 + 4(i-1) : 1 + 4i]; `_decode`: one frame each.
        let s = FrameSchedule::FirstAlone;
        assert_eq!(s.batches(9, 4), Ok(vec![(0, 1), (1, 5), (5, 9)]));
        assert_eq!(s.batches(1, 4), Ok(vec![(0, 1)]));
        assert_eq!(s.batches(3, 1), Ok(vec![(0, 1), (1, 2), (2, 3)]));
        assert!(s.batches(8, 4).is_err());
        assert!(s.batches(0, 1).is_err());
    }

    #[test]
    fn first_then_batches_matches_videox_fun_decode() {
        // `_decode`: z[:, :, 0:1], then z[:, :, s:s+2] while s < n (Python clamps the end).
        let s = FrameSchedule::FirstThenBatches;
        assert_eq!(s.batches(5, 2), Ok(vec![(0, 1), (1, 3), (3, 5)]));
        assert_eq!(s.batches(4, 2), Ok(vec![(0, 1), (1, 3), (3, 4)]));
        assert_eq!(s.batches(1, 2), Ok(vec![(0, 1)]));
        assert_eq!(s.batches(0, 2), Ok(vec![]));
    }

    #[test]
    fn decoded_frames_agree_with_the_batches() {
        // Each batch of n latent frames decodes to up(n) frames; the closed form must agree
        // with summing over `frame_batches`.
        let up = |n: usize| {
            (0..2).fold(n, |n, _| match n {
                0 | 1 => n,
                n if n % 2 == 1 => 1 + 2 * (n - 1),
                n => 2 * n,
            })
        };
        for n in 0..40 {
            for batch in [1, 2, 3, 8] {
                let summed: usize = frame_batches(n, batch).iter().map(|(s, e)| up(e - s)).sum();
                assert_eq!(
                    decoded_frames(n, batch, 2),
                    summed,
                    "{n} latents in batches of {batch}"
                );
            }
        }
        assert_eq!(decoded_frames(13, 2, 2), 49);
        assert_eq!(decoded_frames(2, 2, 2), 8);
    }
}
