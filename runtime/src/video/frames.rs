//! RGB8 clips as the pipeline takes them, and float frames back to RGB8.

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
    /// Frames from a uint8 tensor `[F, H, W, 3]`, or one image `[H, W, 3]`: how safetensors
    /// reference clips and the fixtures store them. The error says what the tensor is instead.
    pub fn from_u8_tensor(t: &Tensor) -> std::result::Result<Frames, String> {
        let Data::U8(rgb) = &t.data else {
            return Err("must be uint8".into());
        };
        let (frames, height, width) = match t.shape[..] {
            [h, w, 3] => (1, h, w),
            [f, h, w, 3] => (f, h, w),
            _ => {
                return Err(format!(
                    "shape {:?}; expected [frames, height, width, 3]",
                    t.shape
                ))
            }
        };
        Ok(Frames {
            frames,
            height,
            width,
            rgb: rgb.clone(),
        })
    }

    /// `[1, 3, F, H, W]` float in [0, 1] (Video2LoRA's reference range), the VAE's layout.
    /// An error if `rgb` does not hold `frames × height × width × 3` bytes.
    pub fn to_unit_video(&self) -> Result<Tensor> {
        let (f, h, w) = (self.frames, self.height, self.width);
        let v = crate::layout::rgb8_to_planes(&self.rgb, f, h, w)?;
        Ok(Tensor::f32(vec![1, 3, f, h, w], v))
    }

    /// The first frame alone.
    pub fn frames_first(&self) -> Frames {
        let mut f = self.clone();
        f.truncate(1);
        f
    }

    /// Every frame resized to `height × width` as PIL's `Image.resize` does by default
    /// (bicubic, bit-exact; stretched, no padding): how VideoX-Fun's `predict_i2v.py` brings a
    /// reference clip to the generation size. The clip itself when it already has that size.
    pub fn resized_like_pil(&self, height: usize, width: usize) -> Result<Frames> {
        if (self.height, self.width) == (height, width) {
            return Ok(self.clone());
        }
        let frame = self.height * self.width * 3;
        let mut rgb = Vec::with_capacity(self.frames * height * width * 3);
        for f in self.rgb.chunks_exact(frame.max(1)).take(self.frames) {
            rgb.extend(crate::image_preprocess::resize_bicubic_rgb8(
                f,
                self.height,
                self.width,
                height,
                width,
            )?);
        }
        Ok(Frames {
            frames: self.frames,
            height,
            width,
            rgb,
        })
    }

    /// Keeps the first `n` frames.
    pub fn truncate(&mut self, n: usize) {
        if n < self.frames {
            self.frames = n;
            self.rgb.truncate(n * self.height * self.width * 3);
        }
    }
}

/// Float frames `[1, F, H, W, 3]` in [0, 1] → RGB8 (round to nearest).
pub fn to_rgb8(frames: &Tensor) -> Result<Frames> {
    let v = frames.as_f32("frames")?;
    let [1, f, h, w, 3] = frames.shape[..] else {
        return Err(RuntimeError::Tensor {
            what: "frames".into(),
            message: format!("shape {:?}; expected [1, F, H, W, 3]", frames.shape),
        });
    };
    Ok(Frames {
        frames: f,
        height: h,
        width: w,
        rgb: v
            .iter()
            .map(|x| (x.clamp(0.0, 1.0) * 255.0).round() as u8)
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_from_u8_tensors_of_a_clip_or_an_image() {
        let clip = Tensor {
            shape: vec![2, 3, 4, 3],
            data: Data::U8((0..72).collect()),
        };
        let f = Frames::from_u8_tensor(&clip).unwrap();
        assert_eq!((f.frames, f.height, f.width, f.rgb.len()), (2, 3, 4, 72));
        let image = Tensor {
            shape: vec![3, 4, 3],
            data: Data::U8(vec![7; 36]),
        };
        let f = Frames::from_u8_tensor(&image).unwrap();
        assert_eq!((f.frames, f.height, f.width), (1, 3, 4));
        let rgba = Tensor {
            shape: vec![3, 4, 4],
            data: Data::U8(vec![0; 48]),
        };
        let err = Frames::from_u8_tensor(&rgba).err().unwrap();
        assert!(
            err.contains("[3, 4, 4]") && err.contains("[frames, height, width, 3]"),
            "{err}"
        );
        let float = Tensor::zeros(vec![1, 3, 4, 3]);
        assert_eq!(
            Frames::from_u8_tensor(&float).err().unwrap(),
            "must be uint8"
        );
    }
}
