//! LoRA algebra: standard LoRA files, Video2LoRA's LiLoRA, and fusing factors into weights.
//!
//! | file | what |
//! |---|---|
//! | [`fuse`] | the fuse kernel `W' = W + s·B·A`, f32/f16/bf16, streaming, multi-threaded |

pub mod fuse;
