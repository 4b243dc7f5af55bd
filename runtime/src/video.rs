//! Video in: reference clips as RGB8 frames, through ffmpeg (mp4 and anything ffmpeg decodes),
//! a directory of PNGs, or a safetensors file holding `reference_u8 [F, H, W, 3]`.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::error::{Result, RuntimeError};
use crate::tensor::{Data, Tensor};

/// RGB8 frames `[F, H, W, 3]`.
#[derive(Clone, Debug)]
pub struct Frames {
    pub frames: usize,
    pub height: usize,
    pub width: usize,
    pub rgb: Vec<u8>,
}

impl Frames {
    /// `[1, 3, F, H, W]` float in [0, 1] (Video2LoRA's reference range), the VAE's layout.
    pub fn to_unit_video(&self) -> Tensor {
        let (f, h, w) = (self.frames, self.height, self.width);
        let mut v = vec![0f32; 3 * f * h * w];
        for t in 0..f {
            for p in 0..h * w {
                for c in 0..3 {
                    v[(c * f + t) * h * w + p] = self.rgb[(t * h * w + p) * 3 + c] as f32 / 255.0;
                }
            }
        }
        Tensor::f32(vec![1, 3, f, h, w], v)
    }

    /// Keeps the first `n` frames.
    pub fn truncate(&mut self, n: usize) {
        if n < self.frames {
            self.frames = n;
            self.rgb.truncate(n * self.height * self.width * 3);
        }
    }
}

fn bad(path: &Path, message: impl Into<String>) -> RuntimeError {
    RuntimeError::BadFile { path: path.into(), message: message.into() }
}

/// Reads a reference clip, resized to `height × width` (ffmpeg bicubic) where it is decoded by
/// ffmpeg; a safetensors clip must already have that size.
pub fn read_frames(path: &Path, height: usize, width: usize) -> Result<Frames> {
    if !path.exists() {
        return Err(RuntimeError::Io { path: path.into(), source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory") });
    }
    let frames = if path.extension().is_some_and(|e| e == "safetensors") {
        let t = crate::tensor::read_safetensors(path)?;
        let r = t.get("reference_u8").ok_or_else(|| RuntimeError::MissingTensor { path: path.into(), name: "reference_u8".into() })?;
        let Data::U8(rgb) = &r.data else {
            return Err(bad(path, "`reference_u8` must be uint8"));
        };
        if r.shape.len() != 4 || r.shape[3] != 3 {
            return Err(bad(path, format!("`reference_u8` has shape {:?}; expected [frames, height, width, 3]", r.shape)));
        }
        if (r.shape[1], r.shape[2]) != (height, width) {
            return Err(bad(path, format!("frames are {}×{}, the model needs {height}×{width}", r.shape[1], r.shape[2])));
        }
        Frames { frames: r.shape[0], height, width, rgb: rgb.clone() }
    } else if path.is_dir() {
        let mut pngs: Vec<_> = std::fs::read_dir(path)
            .map_err(|source| RuntimeError::Io { path: path.into(), source })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")))
            .collect();
        pngs.sort();
        let mut rgb = Vec::new();
        for p in &pngs {
            rgb.extend(ffmpeg_decode(p, height, width)?);
        }
        Frames { frames: pngs.len(), height, width, rgb }
    } else {
        let rgb = ffmpeg_decode(path, height, width)?;
        Frames { frames: rgb.len() / (height * width * 3), height, width, rgb }
    };
    if frames.frames == 0 {
        return Err(bad(path, "the video has no frames"));
    }
    Ok(frames)
}

/// Decodes every frame of `path` to RGB24 at `height × width` with ffmpeg.
fn ffmpeg_decode(path: &Path, height: usize, width: usize) -> Result<Vec<u8>> {
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-nostdin", "-i"])
        .arg(path)
        .args(["-vf", &format!("scale={width}:{height}:flags=bicubic"), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| RuntimeError::Invalid {
            what: "ffmpeg".into(),
            message: format!("cannot start ffmpeg ({e}); install it (bash scripts/setup.sh, or apt-get install ffmpeg)"),
        })?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stderr);
        let first = msg.lines().last().unwrap_or("ffmpeg failed").trim().to_string();
        return Err(bad(path, format!("cannot decode video: {first}")));
    }
    Ok(out.stdout)
}
