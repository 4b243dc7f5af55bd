//! Low-precision CPU attention: our own ONNX Runtime custom operator, `ai.v2l.Attention`.
//!
//! ONNX Runtime's CPU provider runs `com.microsoft.MultiHeadAttention` in f32 only, and
//! attention is about 40 % of an int8 DiT step at CogVideoX-5B width. PyTorch runs the same
//! attention in bf16 on the CPU's matrix units. `v2l-compile` therefore places this operator
//! for CPU engines below fp32 (`attention: "bf16"` in the bundle); fp32 engines keep
//! `MultiHeadAttention` and their exactness.
//!
//! The operator takes what `MultiHeadAttention` takes in the compiled graphs: `query`, `key`,
//! `value` as `[batch, tokens, heads·head_dim]` f32, attributes `num_heads` and `scale`. It
//! picks its kernel once per process ([`Kernel::detect`]):
//! - [`Kernel::Bf16`] on CPUs with AVX512-BF16 ([`bf16`]): flash-style, q·kᵀ and p·v by
//!   `vdpbf16ps`, softmax in f32 with online rescaling;
//! - [`Kernel::Int8`] where the graph asks for it (attribute `scores = "int8"`, written by
//!   `v2l-compile --attention int8`) and the CPU has AVX512-VNNI and AVX512-BF16 ([`int8`]):
//!   q·kᵀ in int8 by `vpdpbusd` with K smoothed as SageAttention does (and a scale per query
//!   and per key); softmax in f32 and p·v in bf16 as the bf16 kernel;
//! - [`Kernel::Fp32`] elsewhere, or when `V2L_ATTENTION=fp32` forces it ([`fp32`]): the same
//!   blocking in f32.
//!
//! Work is split over (sample, head) pairs on ONNX Runtime's intra-op thread pool.

// Hot loops index buffers whose sizes are fixed by the shapes checked in `attend`.
#![allow(clippy::indexing_slicing)]

#[cfg(target_arch = "x86_64")]
mod bf16;
mod head;
use head::Head;
mod fp32;
#[cfg(target_arch = "x86_64")]
mod int8;

use std::sync::atomic::Ordering;
use std::sync::OnceLock;

use ort::operator::{
    ComputeContext, Kernel as OrtKernel, KernelContext, Operator, OperatorInput, OperatorOutput,
    ShapeInferenceContext,
};
use ort::value::{SymbolicDimensions, TensorElementType, ValueType};

/// The custom-op domain and name `v2l-compile` writes into low-precision CPU graphs.
pub const DOMAIN: &str = "ai.v2l";
pub const OP: &str = "Attention";
/// The operator's optional attribute naming the precision of its scores (`"int8"`).
pub const SCORES: &str = "scores";
/// The environment variable that forces the f32 kernel (`V2L_ATTENTION=fp32`).
pub const ENV: &str = "V2L_ATTENTION";

/// Which kernel this process runs `ai.v2l.Attention` with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// bf16 products, f32 softmax and sums (AVX512-BF16).
    Bf16,
    /// int8 q·kᵀ (AVX512-VNNI), f32 softmax, bf16 p·v (AVX512-BF16).
    Int8,
    /// f32 throughout.
    Fp32,
}

impl Kernel {
    /// The kernel for this CPU, unless `V2L_ATTENTION=fp32` forces the f32 one (read once).
    pub fn detect() -> Kernel {
        static K: OnceLock<Kernel> = OnceLock::new();
        *K.get_or_init(|| {
            if crate::cpu::bf16_kernel_runs(ENV) {
                Kernel::Bf16
            } else {
                Kernel::Fp32
            }
        })
    }

    /// The kernel for a graph that asks for int8 scores: [`Kernel::Int8`] where this CPU has
    /// AVX512-VNNI and AVX512-BF16 (and `V2L_ATTENTION=fp32` does not force f32), else what
    /// [`Kernel::detect`] picks.
    pub fn detect_int8() -> Kernel {
        match Kernel::detect() {
            Kernel::Bf16 if int8_available() => Kernel::Int8,
            k => k,
        }
    }

    /// This kernel and why it runs, for `v2l-run --json` and logs.
    pub fn describe(self) -> String {
        format!("{} ({})", self.name(), self.reason())
    }

    /// Why this kernel runs.
    pub fn reason(self) -> String {
        match self {
            Kernel::Bf16 => "AVX512-BF16".into(),
            Kernel::Int8 => "AVX512-VNNI and AVX512-BF16".into(),
            Kernel::Fp32 => crate::cpu::fp32_fallback_reason(ENV),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Bf16 => "bf16",
            Kernel::Int8 => "int8",
            Kernel::Fp32 => "fp32",
        }
    }
}

/// Whether this CPU runs the int8 kernel (AVX512-VNNI and AVX512-BF16).
pub fn int8_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return int8::available();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The shape of one attention call: `q [batch, q_len, heads·head_dim]`,
/// `k, v [batch, kv_len, heads·head_dim]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub batch: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl Shape {
    fn width(&self) -> usize {
        self.heads * self.head_dim
    }
}

/// Why an attention call was refused.
#[derive(Debug, thiserror::Error)]
pub enum AttentionError {
    #[error("attention: {0}")]
    Shape(String),
}

/// A buffer's pointer shared by tasks that write disjoint parts of it (here: (sample, head)
/// columns; v2l's other operators use it too).
pub(crate) struct Out<T>(pub(crate) *mut T);
// SAFETY: every user writes only its own task's part (see `attend`, `conv`, `qgemm`).
unsafe impl<T> Sync for Out<T> {}
unsafe impl<T> Send for Out<T> {}
impl<T> Clone for Out<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Out<T> {}

/// Runs `f(0..n)` in any order, on any threads: ONNX Runtime's pool in the operator, a plain
/// loop in tests.
pub type ParFor<'a> = &'a dyn Fn(usize, &(dyn Fn(usize) + Sync));

/// The inputs of one call: `q [batch, q_len, heads·head_dim]`, `k, v [batch, kv_len, …]`.
#[derive(Clone, Copy)]
pub struct Qkv<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
}

/// `out = softmax(q·kᵀ·scale)·v` per head, with `kernel`, the (sample, head) pairs spread by
/// `par`.
pub fn attend(
    kernel: Kernel,
    shape: Shape,
    scale: f32,
    Qkv { q, k, v }: Qkv<'_>,
    out: &mut [f32],
    par: ParFor<'_>,
) -> Result<(), AttentionError> {
    let w = shape.width();
    let (nq, nkv) = (
        shape.batch * shape.q_len * w,
        shape.batch * shape.kv_len * w,
    );
    if q.len() != nq || out.len() != nq || k.len() != nkv || v.len() != nkv {
        return Err(AttentionError::Shape(format!(
            "{shape:?} needs query/output of {nq} and key/value of {nkv} values; got {}, {}, {}, {}",
            q.len(),
            out.len(),
            k.len(),
            v.len()
        )));
    }
    if shape.kv_len == 0 || shape.head_dim == 0 {
        return Err(AttentionError::Shape(format!(
            "{shape:?}: no keys to attend to"
        )));
    }
    let dst = Out(out.as_mut_ptr());
    let task = |i: usize| {
        let (b, h) = (i / shape.heads, i % shape.heads);
        let head = Head {
            q: &q[b * shape.q_len * w..(b + 1) * shape.q_len * w],
            k: &k[b * shape.kv_len * w..(b + 1) * shape.kv_len * w],
            v: &v[b * shape.kv_len * w..(b + 1) * shape.kv_len * w],
            q_len: shape.q_len,
            kv_len: shape.kv_len,
            head_dim: shape.head_dim,
            width: w,
            offset: h * shape.head_dim,
            scale,
        };
        let dst = &dst;
        let mut write = |row: usize, x: &[f32]| {
            let at = (b * shape.q_len + row) * w + h * shape.head_dim;
            // SAFETY: `at..at + head_dim` lies in `out` (lengths checked above) and belongs to
            // this task's (sample, head) alone.
            unsafe { std::ptr::copy_nonoverlapping(x.as_ptr(), dst.0.add(at), shape.head_dim) };
        };
        match kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::Int8 if int8::available() => int8::head(&head, &mut write),
            #[cfg(target_arch = "x86_64")]
            Kernel::Bf16 | Kernel::Int8 if bf16::available() => bf16::head(&head, &mut write),
            _ => fp32::head(&head, &mut write),
        }
    };
    par(shape.batch * shape.heads, &task);
    Ok(())
}

/// An output's dimension names for `shape`: an unnamed unknown dimension gets a fresh name;
/// left as -1 it would read as the value -1 to the shape arithmetic after it.
pub(crate) fn named(shape: &[i64], symbols: &[String]) -> SymbolicDimensions {
    static FRESH: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    shape
        .iter()
        .enumerate()
        .map(|(i, &d)| match symbols.get(i) {
            Some(s) if !s.is_empty() || d >= 0 => s.clone(),
            _ => format!(
                "v2l_dim_{}",
                FRESH.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ),
        })
        .collect()
}

/// Runs `f(0..n)` on ONNX Runtime's intra-op pool from inside one of v2l's operators; a
/// failed hand-over to the pool runs the tasks on this thread instead.
pub(crate) fn on_pool(ctx: &ComputeContext, n: usize, f: &(dyn Fn(usize) + Sync)) {
    let stop = crate::stop::flag();
    let item = |i: usize| {
        if !stop.as_ref().is_some_and(|s| s.load(Ordering::Relaxed)) {
            f(i)
        }
    };
    if ctx.par_for(n, n, item).is_err() {
        (0..n).for_each(item);
    }
}

/// The operator, for the session's `ai.v2l` domain.
pub(crate) struct AttentionOp;

pub(crate) struct AttentionKernel {
    heads: usize,
    scale: f32,
    kernel: Kernel,
}

impl Operator for AttentionOp {
    type Kernel<'attr> = AttentionKernel;

    fn name(&self) -> &str {
        OP
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        [0; 3].map(|_| OperatorInput::required(TensorElementType::Float32))
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [OperatorOutput::required(TensorElementType::Float32)]
    }

    /// The output is the query's type and shape: graphs that need every shape (a chunked
    /// feed-forward's `Scan` body) stay valid ([`named`] dimensions).
    fn infer_shape(&self, ctx: &mut ShapeInferenceContext) -> ort::Result<()> {
        let query = ctx
            .inputs()
            .into_iter()
            .next()
            .ok_or_else(|| ort::Error::new("ai.v2l.Attention: no query"))?;
        let out = match query {
            ValueType::Tensor {
                ty,
                shape,
                dimension_symbols,
            } => ValueType::Tensor {
                ty,
                dimension_symbols: named(&shape, &dimension_symbols),
                shape,
            },
            other => other,
        };
        ctx.set_output(0, &out)
    }

    fn create_kernel<'attr>(&self, ctx: &KernelContext<'attr>) -> ort::Result<AttentionKernel> {
        let heads = ctx
            .get::<i64>("num_heads")
            .filter(|&h| h > 0)
            .ok_or_else(|| ort::Error::new("ai.v2l.Attention needs num_heads > 0"))?;
        let scale = ctx
            .get::<f32>("scale")
            .ok_or_else(|| ort::Error::new("ai.v2l.Attention needs its scale"))?;
        // `scores = "int8"` (v2l-compile --attention int8) asks for the int8 kernel.
        let int8 = ctx.get::<String>(SCORES).is_some_and(|s| s == "int8");
        Ok(AttentionKernel {
            heads: heads as usize,
            scale,
            kernel: if int8 {
                Kernel::detect_int8()
            } else {
                Kernel::detect()
            },
        })
    }
}

impl OrtKernel for AttentionKernel {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let input = |i: usize| {
            ctx.input(i)?
                .ok_or_else(|| ort::Error::new(format!("ai.v2l.Attention: input {i} missing")))
        };
        let (q, k, v) = (input(0)?, input(1)?, input(2)?);
        let (qs, qd) = q.try_extract_tensor::<f32>()?;
        let (ks, kd) = k.try_extract_tensor::<f32>()?;
        let (_, vd) = v.try_extract_tensor::<f32>()?;
        let dims = |s: &ort::value::Shape| -> ort::Result<[usize; 3]> {
            match **s {
                [b, t, d] if b >= 0 && t >= 0 && d >= 0 => Ok([b as usize, t as usize, d as usize]),
                _ => Err(ort::Error::new(format!(
                    "ai.v2l.Attention takes [batch, tokens, width]; got {s:?}"
                ))),
            }
        };
        let ([b, sq, w], [bk, skv, wk]) = (dims(qs)?, dims(ks)?);
        if bk != b || wk != w || w % self.heads != 0 {
            return Err(ort::Error::new(format!(
                "ai.v2l.Attention: query {qs:?} and key {ks:?} do not fit {} heads",
                self.heads
            )));
        }
        let shape = Shape {
            batch: b,
            q_len: sq,
            kv_len: skv,
            heads: self.heads,
            head_dim: w / self.heads,
        };
        let mut o = ctx
            .output(0, qs.to_vec())?
            .ok_or_else(|| ort::Error::new("ai.v2l.Attention: output missing"))?;
        let (_, od) = o.try_extract_tensor_mut::<f32>()?;
        let stop = crate::stop::flag();
        let par = |n: usize, f: &(dyn Fn(usize) + Sync)| crate::attention::on_pool(ctx, n, f);
        attend(
            self.kernel,
            shape,
            self.scale,
            Qkv {
                q: qd,
                k: kd,
                v: vd,
            },
            od,
            &par,
        )
        .map_err(|e| ort::Error::new(e.to_string()))?;
        crate::stop::check(&stop, "ai.v2l.Attention")
    }
}

#[cfg(test)]
mod tests;
