//! Every integration test of the fixtures, in one harness: one binary to link and run. Each
//! module is one component or model against the output of its upstream reference code.

mod attention_kernel;
mod backend_errors;
mod bound_runs;
mod clip_vision_parity;
mod dit_parity;
mod flow_schedulers;
mod fullscale;
mod fun_inpaint_parity;
mod gpu_setup;
mod hypernet_parity;
mod interrupt;
mod lofa_parity;
mod lora_parity;
mod measure_parity;
mod ort_fusions;
mod prompt2effect_parity;
mod scheduler_rope;
mod session_race;
mod shared_arena;
mod text_encoder_parity;
mod tokenizer_parity;
mod umt5_parity;
mod umt5_tokenizer_parity;
mod vae_parity;
mod wan_dit_parity;
mod wan_lora_parity;
mod wan_pipeline_parity;
mod wan_vae_parity;
