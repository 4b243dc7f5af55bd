//! Frames: RGB8 clips as the pipeline takes them ([`Frames`]), and video files in and out
//! through ffmpeg (the default cargo feature `video`; [`read_frames`], [`write_mp4`], …): mp4
//! and anything ffmpeg decodes, a directory of PNGs, or a safetensors file holding
//! `reference_u8 [F, H, W, 3]`. Without the feature the runtime still takes frames as bytes.

mod frames;
pub use frames::{to_rgb8, Frames};

#[cfg(feature = "video")]
mod ffmpeg;
#[cfg(feature = "video")]
pub use ffmpeg::*;
