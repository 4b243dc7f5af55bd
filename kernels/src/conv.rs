//! bf16 convolution for the video VAE's decoder: our ONNX Runtime custom operator
//! `ai.v2l.Conv`.
//!
//! ONNX Runtime's CPU provider runs `Conv` in f32 only: im2col, then MLAS's f32 GEMM. At
//! CogVideoX-5B widths the VAE decode is a third of a whole `v2l-run` (9 frames at 256×384:
//! 48.6 s of 146 s, 62 % of it in that GEMM and 13 % in im2col's copies), while PyTorch decodes
//! in bf16 on the same CPU. `v2l-compile` therefore writes, for CPU engines below fp32, a twin
//! of the decoder whose stride-1 convolutions call this operator (`vae_decoder_bf16` in the
//! bundle); CPUs without AVX512-BF16 load the export's f32 decoder instead
//! (`Engine::vae_graphs`).
//!
//! The operator takes what those `Conv`s take: `X [N, C, H, W]` or `[N, C, T, H, W]`, a
//! constant `W [M, C, (kt,) kh, kw]` and `B [M]`, attributes `kernel_shape` and `pads` (zero
//! padding of height and width only: the VAE pads time itself, with its frame caches). It
//! computes with the kernel [`Kernel::detect`] picks once per process:
//! - [`Kernel::Bf16`] on CPUs with AVX512-BF16 ([`bf16`]): inputs and weights rounded to bf16,
//!   products and sums by `vdpbf16ps` in f32, as PyTorch's bf16 convolution accumulates;
//! - [`Kernel::Fp32`] elsewhere, or when `V2L_CONV=fp32` forces it ([`fp32`]): the same loops
//!   in f32, exact to rounding.
//!
//! Both read the input once into a padded copy laid out for their inner loop (no im2col), then
//! compute output rows (sample, frame, row) in parallel on ONNX Runtime's intra-op pool.

// Hot loops index buffers whose sizes follow from the shape checked in `conv`.
#![allow(clippy::indexing_slicing)]

#[cfg(target_arch = "x86_64")]
mod bf16;
mod fp32;
mod geometry;
pub use geometry::Shape;

use std::sync::OnceLock;

use ort::operator::{
    ComputeContext, Kernel as OrtKernel, KernelContext, Operator, OperatorInput, OperatorOutput,
};
use ort::value::TensorElementType;

/// The operator's name in the `ai.v2l` domain (registered with every session).
pub const OP: &str = "Conv";
/// The environment variable that forces the f32 kernel (`V2L_CONV=fp32`).
pub const ENV: &str = "V2L_CONV";

/// Which kernel this process runs `ai.v2l.Conv` with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// bf16 inputs and weights, f32 sums (AVX512-BF16).
    Bf16,
    /// f32 throughout.
    Fp32,
}

impl Kernel {
    /// The kernel for this CPU, unless `V2L_CONV=fp32` forces the f32 one (read once).
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

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Bf16 => "bf16",
            Kernel::Fp32 => "fp32",
        }
    }

    /// Why this kernel runs.
    pub fn reason(self) -> String {
        match self {
            Kernel::Bf16 => "AVX512-BF16".into(),
            Kernel::Fp32 => crate::cpu::fp32_fallback_reason(ENV),
        }
    }
}

/// Why a convolution was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConvError {
    #[error("ai.v2l.Conv: {0}")]
    Shape(String),
}

/// Weights prepared once per node for the kernel that runs them.
pub enum Weights {
    /// bf16 pairs of input channels, `[cout][tap][cin pair]` (the bf16 kernel).
    Bf16(Vec<u32>),
    /// As given, `[cout][cin][tap]` (the f32 kernel).
    Fp32(Vec<f32>),
}

impl Weights {
    /// `w [cout, cin, taps…]` for `kernel` (f32 where bf16 is asked of a CPU without it).
    pub fn new(kernel: Kernel, shape: &Shape, w: &[f32]) -> Result<Weights, ConvError> {
        if w.len() != shape.weight_len() {
            return Err(ConvError::Shape(format!(
                "{shape:?} needs {} weights; got {}",
                shape.weight_len(),
                w.len()
            )));
        }
        Ok(match kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::Bf16 if bf16::available() => Weights::Bf16(bf16::pack_weights(shape, w)),
            _ => Weights::Fp32(w.to_vec()),
        })
    }

    /// The kernel these weights run on.
    pub fn kernel(&self) -> Kernel {
        match self {
            Weights::Bf16(_) => Kernel::Bf16,
            Weights::Fp32(_) => Kernel::Fp32,
        }
    }

    fn len(&self) -> usize {
        match self {
            Weights::Bf16(w) => w.len(),
            Weights::Fp32(w) => w.len(),
        }
    }
}

pub use crate::attention::ParFor;

/// `out = conv(x, weights) + bias` for `shape`, on `weights`' kernel, rows spread by `par`.
pub fn conv(
    shape: &Shape,
    x: &[f32],
    weights: &Weights,
    bias: &[f32],
    out: &mut [f32],
    par: ParFor<'_>,
) -> Result<(), ConvError> {
    if shape.output().is_none() || shape.cin == 0 || shape.cout == 0 {
        return Err(ConvError::Shape(format!(
            "{shape:?}: the kernel does not fit the padded input"
        )));
    }
    let pack_len = match weights {
        Weights::Bf16(_) => shape.cout * shape.taps() * shape.cin.div_ceil(2),
        Weights::Fp32(_) => shape.weight_len(),
    };
    let held = weights.len();
    if x.len() != shape.input_len()
        || out.len() != shape.output_len()
        || held != pack_len
        || bias.len() != shape.cout
    {
        return Err(ConvError::Shape(format!(
            "{shape:?} needs an input of {}, an output of {} and {} biases; got {}, {} and {} (weights for {} of {held})",
            shape.input_len(),
            shape.output_len(),
            shape.cout,
            x.len(),
            out.len(),
            bias.len(),
            pack_len
        )));
    }
    let dst = crate::attention::Out(out.as_mut_ptr());
    match weights {
        // Only built where `bf16::available()` (`Weights::new`).
        #[cfg(target_arch = "x86_64")]
        Weights::Bf16(w) => bf16::conv(shape, x, w, bias, dst, par),
        #[cfg(not(target_arch = "x86_64"))]
        Weights::Bf16(_) => unreachable!("bf16 weights are only packed on x86-64"),
        Weights::Fp32(w) => fp32::conv(shape, x, w, bias, dst, par),
    }
    Ok(())
}

/// The operator `v2l-compile` places in the bf16 VAE decoder.
pub(crate) struct ConvOp;

pub(crate) struct ConvKernel {
    kernel: [usize; 3],
    pads: [usize; 2],
    /// Packed at kernel creation when the weights are the graph's constants (they are, in the
    /// graphs `v2l-compile` writes); otherwise packed on each call.
    weights: Option<Weights>,
}

impl Operator for ConvOp {
    type Kernel<'attr> = ConvKernel;

    fn name(&self) -> &str {
        OP
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        [0; 3].map(|_| OperatorInput::required(TensorElementType::Float32))
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [OperatorOutput::required(TensorElementType::Float32)]
    }

    fn create_kernel<'attr>(&self, ctx: &KernelContext<'attr>) -> ort::Result<ConvKernel> {
        let kernel_shape = ctx
            .get::<Vec<i64>>("kernel_shape")
            .ok_or_else(|| ort::Error::new("ai.v2l.Conv needs its kernel_shape"))?;
        let pads = ctx.get::<Vec<i64>>("pads");
        let (kernel, pads) = v2l_graphs::passes::conv_geometry(&kernel_shape, pads.as_deref())
            .map_err(|m| ort::Error::new(format!("ai.v2l.Conv: {m}")))?;
        let mut k = ConvKernel {
            kernel,
            pads,
            weights: None,
        };
        // Constant weights are packed once here; the input's channel count is the weights'.
        if let Ok(v) = ctx.constant_input::<ort::value::DynTensorValueType>(1) {
            if let Ok((ws, w)) = v.try_extract_tensor::<f32>() {
                let shape = k.shape_of(ws, None)?;
                k.weights = Some(
                    Weights::new(Kernel::detect(), &shape, w)
                        .map_err(|e| ort::Error::new(e.to_string()))?,
                );
            }
        }
        Ok(k)
    }
}

impl ConvKernel {
    /// The call's shape from the weight's shape `[M, C, taps…]` and the input's (when known).
    fn shape_of(&self, ws: &[i64], xs: Option<&[i64]>) -> ort::Result<Shape> {
        let dim = |d: i64| usize::try_from(d).ok();
        let (cout, cin) = match ws {
            [m, c, ..] => (dim(*m), dim(*c)),
            _ => (None, None),
        };
        let taps: Vec<usize> = ws.iter().skip(2).filter_map(|&d| dim(d)).collect();
        let [kt, kh, kw] = self.kernel;
        let fits = taps == [kt, kh, kw] || (kt == 1 && taps == [kh, kw]);
        let (Some(cout), Some(cin), true) = (cout, cin, fits) else {
            return Err(ort::Error::new(format!(
                "ai.v2l.Conv: weight shape {ws:?} does not fit kernel_shape {:?}",
                self.kernel
            )));
        };
        let (batch, input) = match xs.map(|s| s.iter().map(|&d| dim(d)).collect::<Option<Vec<_>>>())
        {
            None => (0, [0; 3]),
            Some(Some(s)) => match s[..] {
                [n, c, h, w] if c == cin && self.kernel[0] == 1 => (n, [1, h, w]),
                [n, c, t, h, w] if c == cin => (n, [t, h, w]),
                _ => {
                    return Err(ort::Error::new(format!(
                        "ai.v2l.Conv: input {xs:?} does not fit weight {ws:?}"
                    )))
                }
            },
            Some(None) => return Err(ort::Error::new(format!("ai.v2l.Conv: input shape {xs:?}"))),
        };
        Ok(Shape {
            batch,
            cin,
            cout,
            input,
            kernel: self.kernel,
            pads: self.pads,
        })
    }
}

impl OrtKernel for ConvKernel {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let input = |i: usize| {
            ctx.input(i)?
                .ok_or_else(|| ort::Error::new(format!("ai.v2l.Conv: input {i} missing")))
        };
        let (x, w, b) = (input(0)?, input(1)?, input(2)?);
        let (xs, xd) = x.try_extract_tensor::<f32>()?;
        let (ws, wd) = w.try_extract_tensor::<f32>()?;
        // The bias need not be constant: the VAE's cache ties order convs through it.
        let (_, bd) = b.try_extract_tensor::<f32>()?;
        let shape = self.shape_of(ws, Some(xs))?;
        let fresh;
        let weights = match &self.weights {
            Some(w) => w,
            None => {
                fresh = Weights::new(Kernel::detect(), &shape, wd)
                    .map_err(|e| ort::Error::new(e.to_string()))?;
                &fresh
            }
        };
        let [t, h, w] = shape
            .output()
            .ok_or_else(|| ort::Error::new(format!("ai.v2l.Conv: {shape:?} has no output")))?;
        let dims: Vec<i64> = if xs.len() == 4 {
            vec![shape.batch as i64, shape.cout as i64, h as i64, w as i64]
        } else {
            [shape.batch, shape.cout, t, h, w]
                .map(|d| d as i64)
                .to_vec()
        };
        let mut o = ctx
            .output(0, dims)?
            .ok_or_else(|| ort::Error::new("ai.v2l.Conv: output missing"))?;
        let (_, od) = o.try_extract_tensor_mut::<f32>()?;
        let stop = crate::stop::flag();
        let par = |n: usize, f: &(dyn Fn(usize) + Sync)| crate::attention::on_pool(ctx, n, f);
        conv(&shape, xd, weights, bd, od, &par).map_err(|e| ort::Error::new(e.to_string()))?;
        crate::stop::check(&stop, "ai.v2l.Conv")
    }
}

#[cfg(test)]
mod tests;
