//! What a request may ask for, checked before any work starts.
//!
//! Every front end (CLI, C ABI, server) goes through these checks (most through
//! `request::Settings::check`), so a bad size or a NaN is one clear error in
//! microseconds instead of minutes of loading, an out-of-memory kill or a black video. The
//! limits are generous defaults for this class of model on one machine; the CLI and the C ABI
//! raise them with environment variables (`V2L_MAX_FRAMES`, `V2L_MAX_PIXELS`, `V2L_MAX_STEPS`,
//! `V2L_MAX_THREADS`, `V2L_MAX_ITERATIONS`), the server with its `--max-*` flags. A failed
//! check is a [`RequestError`] naming its [`Field`].

use crate::error::{Result, RuntimeError};
use v2l_contracts::request::{Field, RequestError};

/// Upper bounds on a request's sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Video frames (CogVideoX generates 49; 1 + 4·64).
    pub max_frames: usize,
    /// Height × width in pixels (1920×1080).
    pub max_pixels: usize,
    /// Denoising steps.
    pub max_steps: usize,
    /// ONNX Runtime threads.
    pub max_threads: usize,
    /// Hypernetwork refinement iterations unrolled at export.
    pub max_iterations: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frames: 257,
            max_pixels: 1920 * 1080,
            max_steps: 1000,
            max_threads: 256,
            max_iterations: 64,
        }
    }
}

fn invalid(what: &str, message: String) -> RuntimeError {
    RuntimeError::Invalid {
        what: what.into(),
        message,
    }
}

impl Limits {
    /// The defaults, each overridable by its environment variable (a bad value is an error).
    pub fn from_env() -> Result<Limits> {
        let mut l = Limits::default();
        for (var, field) in [
            ("V2L_MAX_FRAMES", &mut l.max_frames),
            ("V2L_MAX_PIXELS", &mut l.max_pixels),
            ("V2L_MAX_STEPS", &mut l.max_steps),
            ("V2L_MAX_THREADS", &mut l.max_threads),
            ("V2L_MAX_ITERATIONS", &mut l.max_iterations),
        ] {
            if let Ok(v) = std::env::var(var) {
                *field = v
                    .trim()
                    .parse()
                    .map_err(|_| invalid(var, format!("`{v}` is not a positive integer")))?;
            }
        }
        Ok(l)
    }

    /// `frames` of `height × width`: positive, within the limits, the sizes multiples of
    /// `multiple` (VAE stride × patch size) and frames `1 + 4k` (the VAE's time stride).
    pub fn check_video(
        &self,
        frames: usize,
        height: usize,
        width: usize,
        multiple: usize,
    ) -> std::result::Result<(), RequestError> {
        self.check_frame_size(height, width, multiple)?;
        if frames == 0 || (frames - 1) % v2l_contracts::latent::TIME_STRIDE != 0 {
            return Err(RequestError::new(
                Field::Frames,
                format!("{frames}: must be 1 + 4k (1, 5, 9, …, 49)"),
            ));
        }
        if frames > self.max_frames {
            return Err(over(
                Field::Frames,
                format!("{frames} is over the limit of {}", self.max_frames),
            ));
        }
        Ok(())
    }

    /// `height × width`: positive multiples of `multiple`, at most `max_pixels`. With
    /// `multiple` 1 this checks only what needs no engine (zero sizes, the pixel limit), with
    /// the same messages as the full check.
    pub fn check_frame_size(
        &self,
        height: usize,
        width: usize,
        multiple: usize,
    ) -> std::result::Result<(), RequestError> {
        for (field, v) in [(Field::Height, height), (Field::Width, width)] {
            if v == 0 {
                return Err(RequestError::new(field, "0: must be positive"));
            }
            if multiple > 1 && v % multiple != 0 {
                return Err(RequestError::new(
                    field,
                    format!("{v}: must be a multiple of {multiple}"),
                ));
            }
        }
        if height.saturating_mul(width) > self.max_pixels {
            return Err(over(
                Field::Size,
                format!(
                    "{height}x{width} is over the limit of {} pixels",
                    self.max_pixels
                ),
            ));
        }
        Ok(())
    }

    /// `n` of what `field` counts, in `1..=max`.
    pub fn check_count(
        field: Field,
        n: usize,
        max: usize,
    ) -> std::result::Result<(), RequestError> {
        if n == 0 {
            return Err(RequestError::new(field, "must be at least 1"));
        }
        if n > max {
            return Err(over(field, format!("{n} is over the limit of {max}")));
        }
        Ok(())
    }

    pub fn check_steps(&self, steps: usize) -> std::result::Result<(), RequestError> {
        Self::check_count(Field::Steps, steps, self.max_steps)
    }

    /// Threads: 0 means "one per core"; otherwise at most `max_threads`.
    pub fn check_threads(&self, threads: usize) -> std::result::Result<(), RequestError> {
        if threads == 0 {
            return Ok(());
        }
        Self::check_count(Field::Threads, threads, self.max_threads)
    }

    pub fn check_iterations(&self, iterations: usize) -> std::result::Result<(), RequestError> {
        Self::check_count(Field::Iterations, iterations, self.max_iterations)
    }
}

/// A value over a limit the operator can raise.
fn over(field: Field, message: String) -> RequestError {
    RequestError {
        over_limit: true,
        ..RequestError::new(field, message)
    }
}

/// A directory output that a command creates whole (an engine, a fused checkpoint): it may not
/// exist yet, or be an empty directory (the finished output is renamed over it). Anything else
/// is refused before the work, so no half-finished or mixed directory is ever left.
pub fn check_new_output_dir(out: &std::path::Path) -> Result<()> {
    let refuse = |m: &str| {
        Err(invalid(
            &out.display().to_string(),
            format!("{m}; remove it or choose another output directory"),
        ))
    };
    match std::fs::symlink_metadata(out) {
        Err(_) => Ok(()),
        Ok(m) if !m.is_dir() => refuse("exists and is not a directory"),
        Ok(_) => match std::fs::read_dir(out).map(|mut entries| entries.next().is_none()) {
            Ok(true) => Ok(()),
            Ok(false) => refuse("exists and is not empty"),
            Err(_) => refuse("exists and cannot be read"),
        },
    }
}

/// `v` if finite and within ±[`MAX_SCALE`]: NaN or ±inf in a scale or weight would silently
/// spoil every output, and so would 3e38, which is finite but overflows what it multiplies.
pub fn finite(what: &str, v: f32) -> Result<f32> {
    bounded(v).map_err(|message| invalid(what, message))
}

/// Largest |value| of a guidance scale, a LoRA scale or weight: far beyond any useful value
/// (diffusers' guidance is 1 to 20), far below what overflows f32 arithmetic.
pub const MAX_SCALE: f32 = 1e4;

/// `v` when finite and within ±[`MAX_SCALE`], else what is wrong with it.
pub fn bounded(v: f32) -> std::result::Result<f32, String> {
    if !v.is_finite() {
        return Err(format!("{v} is not a finite number"));
    }
    if v.abs() > MAX_SCALE {
        return Err(format!("{v:e} is outside ±{MAX_SCALE:e}"));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_counts_and_floats_are_checked() {
        let l = Limits::default();
        assert!(l.check_video(49, 480, 720, 16).is_ok());
        for (f, h, w) in [
            (49, 0, 720),
            (49, 480, 0),
            (49, 100_000, 720),
            (0, 480, 720),
            (48, 480, 720),
            (1_000_001, 480, 720),
            (49, 50, 720),
        ] {
            let e = l.check_video(f, h, w, 16).unwrap_err();
            assert!(
                matches!(
                    e.field,
                    Field::Frames | Field::Height | Field::Width | Field::Size
                ),
                "{f}x{h}x{w}: {e}"
            );
        }
        assert!(
            l.check_steps(0).is_err()
                && l.check_steps(50).is_ok()
                && l.check_steps(1_000_000).is_err()
        );
        assert!(l.check_threads(0).is_ok() && l.check_threads(100_000).is_err());
        assert!(l
            .check_iterations(100_000)
            .unwrap_err()
            .to_string()
            .contains("V2L_MAX_ITERATIONS"));
        assert!(
            finite("--guidance", f32::NAN).is_err() && finite("--guidance", f32::INFINITY).is_err()
        );
        assert_eq!(finite("--guidance", -1.0).unwrap(), -1.0);
    }
}
