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

    /// Where a DiT graph can be cut for step caching: model metadata keys, each holding the
    /// name of a value inside the graph (names the exporter made up, so they are recorded).
    pub mod cache {
        /// `[B, N, D]`: the video tokens entering the first transformer block.
        pub const FIRST_BLOCK_INPUT: &str = "v2l.cache.first_block_input";
        /// `[B, N, D]`: the video tokens the first block returns.
        pub const FIRST_BLOCK_OUTPUT: &str = "v2l.cache.first_block_output";
        /// `[B, N, D]`: the video tokens the last block returns.
        pub const BLOCKS_OUTPUT: &str = "v2l.cache.blocks_output";
    }
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

/// The prompt encoder (`text_encoder.onnx`): T5 or umT5.
pub mod text {
    /// `[B, L]` int64 token ids.
    pub const INPUT_IDS: &str = "input_ids";
    /// `[B, L, d_model]`: the last hidden states.
    pub const PROMPT_EMBEDS: &str = "prompt_embeds";
}

/// The image encoder (`image_encoder.onnx`, Wan I2V): CLIP vision.
pub mod image {
    /// `[B, 3, S, S]`: the CLIP image processor's output.
    pub const PIXEL_VALUES: &str = "pixel_values";
    /// `[B, tokens, hidden]`: the penultimate layer's hidden states.
    pub const IMAGE_EMBEDS: &str = "image_embeds";
}

/// The Video2LoRA hypernetwork (`hypernet.onnx`).
pub mod hypernet {
    /// `[B, C, T, H, W]`: the reference clip's VAE latents.
    pub const REFERENCE_LATENTS: &str = "reference_latents";
    /// `[B, layers, D]`: one LiLoRA row per targeted layer.
    pub const HYPER_WEIGHTS: &str = "hyper_weights";
}

/// The effect hypernetworks: Prompt2Effect (`prompt2effect.onnx`) and LoFA's two stages.
pub mod effect {
    /// `[1, T, E]`: the effect prompt's embeddings.
    pub const TEXT: &str = "text";
    /// `[N, D, D]`: the base weights being adapted.
    pub const BASE_WEIGHT: &str = "base_weight";
    /// Prompt2Effect: each weight's block and module type ids.
    pub const LAYER_INDEX: &str = "layer_index";
    pub const MODULE_INDEX: &str = "module_index";
    /// LoFA: each weight's depth and layer type ids.
    pub const DEPTH_INDEX: &str = "depth_index";
    pub const TYPE_INDEX: &str = "type_index";
    /// LoFA stage 1's output, stage 2's input.
    pub const HIDDEN: &str = "hidden";
    pub const PRIOR: &str = "prior";
    /// The predicted factors `[N, r, n]` and `[N, n, r]`, and LoFA's per-layer alpha.
    pub const LORA_A: &str = "lora_A";
    pub const LORA_B: &str = "lora_B";
    pub const ALPHA: &str = "alpha";
}

/// Tensor names in the safetensors files a user hands `v2l-run` (`--prompt-embeds`, `--noise`,
/// `--image-embeds`, a clip as `--reference`) and the server stores.
pub mod files {
    pub const PROMPT_EMBEDS: &str = super::text::PROMPT_EMBEDS;
    pub const NEGATIVE_PROMPT_EMBEDS: &str = "negative_prompt_embeds";
    pub const IMAGE_EMBEDS: &str = super::image::IMAGE_EMBEDS;
    /// The initial latents' noise, in the family's layout.
    pub const INITIAL_NOISE: &str = "initial_noise";
    /// Fun-InP: the conditioning clip's augmentation noise.
    pub const INPAINT_NOISE: &str = "inpaint_noise";
    /// A reference clip `[F, H, W, 3]` uint8.
    pub const REFERENCE_U8: &str = "reference_u8";
}
