//! What differs between CogVideoX and Wan when a request runs, behind one trait the pipeline
//! drives.

use super::denoise;
use crate::error::Result;
use crate::request::{LatentShape, Request};
use crate::stages::Timings;
use crate::tensor::Tensor;
use crate::vae::Vae;

/// What differs between the families when a request runs, behind one trait: each
/// conditions on the first frame, runs the one denoise loop (`pipeline/denoise.rs`) with its
/// sampler, and decodes its latent layout. CogVideoX in `pipeline/cogvideox.rs`, Wan in
/// `pipeline/wan.rs`.
pub(super) trait FamilySteps: Send {
    /// Step 2 and the request's share of step 3: condition on the first frame, and everything
    /// its lane of the denoise loop needs (sampler, DiT inputs, initial latents).
    fn lane(
        &mut self,
        parts: Parts<'_>,
        req: &Request,
        shape: &LatentShape,
        timings: &mut Timings,
    ) -> Result<denoise::Lane>;
    /// Step 4: the final latents → the video `[1, 3, F, H, W]` in [-1, 1]; `go_on` as
    /// [`Vae::decode_reporting`].
    fn decode(
        &self,
        vae: &mut Vae,
        latents: &[f32],
        shape: &LatentShape,
        go_on: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<Tensor>;
}

/// The pipeline's models a family's conditioning runs.
pub(super) struct Parts<'a> {
    pub(super) vae: &'a mut Vae,
    pub(super) entry: &'a v2l_contracts::manifest::DitEntry,
}
