//! `v2l-kernels`: the CPU kernels below the runtime, and the only place v2l writes `unsafe` for
//! speed (SIMD intrinsics, raw pointers into ONNX Runtime's buffers, work split over threads).
//! The runtime registers the operators with its sessions and calls the fuse kernels; nothing
//! here knows about engines, requests or pipelines.
//!
//! | module | what it owns |
//! |---|---|
//! | [`cpu`] | the CPU's model and ISA flags, recorded beside every figure; which int8 GEMM ONNX Runtime may run |
//! | [`attention`] | the attention operator (`ai.v2l.Attention`): bf16 on AVX512-BF16, int8, f32 elsewhere |
//! | [`conv`] | the VAE's convolution operator (`ai.v2l.Conv`): bf16 products with f32 sums on AVX512-BF16 |
//! | [`qgemm`] | the int8 linear operator (`ai.v2l.QMatMul`): `vpdpbusd` on AVX512-VNNI |
//! | [`stop`] | the runtime's stop flag, checked between a kernel's work items |
//! | [`fuse`] | `W ± scale·(B·A)` into f32/f16/bf16 weights in place, exactly (AVX2 and portable) |
//!
//! GPU code does not live here: device-resident tensors and provider options sit beside the
//! sessions in the runtime (`session`, `backend`).

// Input reaches this crate: no unwrap, expect or unchecked indexing outside tests (modules
// that index provably in-bounds buffers in hot loops say so and allow it locally).
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

pub mod attention;
pub mod conv;
pub mod cpu;
pub mod fuse;
pub mod memory;
pub mod qgemm;
pub mod stop;

/// The `ai.v2l` operator domain every session registers: the attention ([`attention`]), the
/// VAE's bf16 convolution ([`conv`]) and the int8 linears ([`qgemm`]). Registering costs nothing
/// for graphs that call none of them.
pub fn operators() -> ort::Result<ort::operator::OperatorDomain> {
    ort::operator::OperatorDomain::new(attention::DOMAIN)?
        .add(attention::AttentionOp)?
        .add(conv::ConvOp)?
        .add(qgemm::QMatMulOp)
}
