//! Graph input and output names: the ONNX graphs `v2l-export` writes and the runtime feeds, and
//! the tensor names of `stage` files and fixtures. One constant per name, so a rename is one edit.

/// The DiT (`dit.onnx`), both families.
pub mod dit {
    /// `[B, F, Cin, H, W]` (CogVideoX) or `[B, Cin, F, H, W]` (Wan): noisy latents and conditioning.
    pub const HIDDEN_STATES: &str = "hidden_states";
    /// `[B, L, Dtext]`: prompt embeddings.
    pub const ENCODER_HIDDEN_STATES: &str = "encoder_hidden_states";
    /// Wan I2V: the first frame's CLIP image tokens `[B, tokens, image_dim]`.
    pub const ENCODER_HIDDEN_STATES_IMAGE: &str = "encoder_hidden_states_image";
    /// `[B]`: int64 for CogVideoX, float for Wan.
    pub const TIMESTEP: &str = "timestep";
    /// `[tokens, Dhead]` RoPE tables.
    pub const ROPE_COS: &str = "rope_cos";
    pub const ROPE_SIN: &str = "rope_sin";
    /// The prediction, shaped like the latents.
    pub const SAMPLE: &str = "sample";
}

/// The tensors Q/DQ adds for the linear whose weight is `weight` (`<module>.weight`).
#[derive(Clone, Debug, PartialEq)]
pub struct QdqNames {
    pub input_scale: String,
    pub input_zero_point: String,
    pub weight_scale: String,
    pub weight_zero_point: String,
}

impl QdqNames {
    /// The names for the linear whose weight initializer is `weight`.
    pub fn of(weight: &str) -> QdqNames {
        QdqNames {
            input_scale: format!("{weight}.input_scale"),
            input_zero_point: format!("{weight}.input_zero_point"),
            weight_scale: format!("{weight}.weight_scale"),
            weight_zero_point: format!("{weight}.weight_zero_point"),
        }
    }
}

/// The VAE (`vae_encoder.onnx`, `vae_decoder.onnx`), both families; `[B, C, F, H, W]` tensors.
pub mod vae {
    /// Encoder input: the clip in [-1, 1].
    pub const VIDEO: &str = "video";
    /// Encoder outputs: the posterior's mean and log-variance.
    pub const POSTERIOR_MEAN: &str = "posterior_mean";
    pub const POSTERIOR_LOGVAR: &str = "posterior_logvar";
    /// Decoder input.
    pub const LATENTS: &str = "latents";
    /// Decoder output: frames in [-1, 1].
    pub const SAMPLE: &str = "sample";
}
