//! The latent grid a video encodes to: the one place the VAEs' compression is written down.
//!
//! Both VAEs v2l runs (CogVideoX's and Wan 2.1's) keep the first frame and compress the rest 4×
//! in time, and compress 8× in space, so `frames × height × width` pixels become
//! `((frames − 1) / 4 + 1) × height/8 × width/8` latents. Noise shapes, RoPE tables, engine
//! profiles, accuracy samples and the C ABI's buffer sizes all derive from [`LatentGrid`].

/// Pixel frames per latent frame after the first.
pub const TIME_STRIDE: usize = 4;

/// Pixels per latent row or column.
pub const SPACE_STRIDE: usize = 8;

/// The latent grid of a video: frames, height, width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LatentGrid {
    pub frames: usize,
    pub height: usize,
    pub width: usize,
}

impl LatentGrid {
    /// The latents of a `frames × height × width` video (`frames` of 0 counts as 1).
    pub const fn of_video(frames: usize, height: usize, width: usize) -> LatentGrid {
        let frames = if frames == 0 { 1 } else { frames };
        LatentGrid {
            frames: (frames - 1) / TIME_STRIDE + 1,
            height: height / SPACE_STRIDE,
            width: width / SPACE_STRIDE,
        }
    }

    /// `(frames, height, width)`.
    pub const fn dims(self) -> (usize, usize, usize) {
        (self.frames, self.height, self.width)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn videos_map_to_their_latent_grids() {
        assert_eq!(LatentGrid::of_video(49, 480, 720).dims(), (13, 60, 90));
        assert_eq!(LatentGrid::of_video(1, 64, 96).dims(), (1, 8, 12));
        assert_eq!(LatentGrid::of_video(17, 32, 48).dims(), (5, 4, 6));
        assert_eq!(LatentGrid::of_video(0, 8, 8).dims(), (1, 1, 1));
    }
}
