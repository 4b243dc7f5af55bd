//! A checkpoint path prefix paired with the graph: the candle `VarBuilder` idea.
//!
//! Architecture code reads like the PyTorch module it mirrors:
//! `let attn = vb.pp("transformer_blocks").pp(i).pp("attn1"); attn.linear(g, &x, "to_q", d, d, true)`
//! adds the initializer `transformer_blocks.{i}.attn1.to_q.weight` under its checkpoint name.

use std::cell::RefCell;
use std::rc::Rc;

use v2l_graphs::{DType, Graph, Value};

use crate::checkpoint::Checkpoint;
use crate::error::Result;

/// An `nn.Linear` the exporter emitted: a layer a LoRA can target (a shared contract).
pub use v2l_contracts::LinearInfo;

/// A prefix into a checkpoint (like candle's `VarBuilder`): where one module's tensors live.
#[derive(Clone)]
pub struct Scope<'a> {
    ckpt: &'a Checkpoint,
    prefix: String,
    linears: Rc<RefCell<Vec<LinearInfo>>>,
    /// The type initializers are written in (the graph computes in f32; see `ExportOptions`).
    pub weight_dtype: Option<DType>,
}

impl<'a> Scope<'a> {
    pub fn new(ckpt: &'a Checkpoint) -> Self {
        Scope {
            ckpt,
            prefix: String::new(),
            linears: Rc::default(),
            weight_dtype: None,
        }
    }

    /// Descends into a submodule (`pp` as in candle: "push prefix").
    pub fn pp(&self, name: impl std::fmt::Display) -> Scope<'a> {
        Scope {
            ckpt: self.ckpt,
            prefix: self.key(&name.to_string()),
            linears: self.linears.clone(),
            weight_dtype: self.weight_dtype,
        }
    }

    pub fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The linear layers emitted so far through this scope tree, in call order.
    pub fn linears(&self) -> Vec<LinearInfo> {
        self.linears.borrow().clone()
    }

    pub fn checkpoint(&self) -> &'a Checkpoint {
        self.ckpt
    }

    pub fn has(&self, name: &str) -> bool {
        self.ckpt.contains(&self.key(name))
    }

    /// Adds the checkpoint tensor `name` (shape-checked) as an f32-computing initializer.
    ///
    /// With `weight_dtype` set to f16/bf16 the initializer keeps that storage type and a Cast
    /// to f32 follows it, so big models stay small on disk while the graph still computes in f32.
    ///
    /// A module applied twice (CogVideoX's `norm1.norm` on video and on text tokens) reads its
    /// weight once: ONNX requires initializer names to be unique.
    pub fn weight(&self, g: &mut Graph, name: &str, shape: &[usize]) -> Result<Value> {
        let t = self.ckpt.tensor(&self.key(name), shape)?;
        let dims = shape.iter().map(|&d| d as i64).collect();
        let store = self.weight_dtype.unwrap_or(DType::F32);
        let v = match g.find_initializer(&t.key) {
            Some(v) => v,
            None => g.initializer(&t.key, store, dims, t.data),
        };
        Ok(if store == DType::F32 {
            v
        } else {
            g.cast(&v, DType::F32)
        })
    }

    /// `nn.Linear(in, out)` named `name` under this scope, applied to `x`.
    pub fn linear(
        &self,
        g: &mut Graph,
        x: &Value,
        name: &str,
        inp: usize,
        out: usize,
        bias: bool,
    ) -> Result<Value> {
        let s = self.pp(name);
        let w = s.weight(g, "weight", &[out, inp])?;
        let b = if bias {
            Some(s.weight(g, "bias", &[out])?)
        } else {
            None
        };
        self.linears.borrow_mut().push(LinearInfo {
            name: s.prefix().to_string(),
            out_features: out,
            in_features: inp,
        });
        Ok(g.scoped(s.prefix(), |g| g.linear(x, &w, b.as_ref(), out as i64)))
    }

    /// `nn.LayerNorm(dim, eps, elementwise_affine)` named `name` under this scope.
    pub fn layer_norm(
        &self,
        g: &mut Graph,
        x: &Value,
        name: &str,
        dim: usize,
        eps: f32,
        affine: bool,
    ) -> Result<Value> {
        let s = self.pp(name);
        let (w, b) = if affine {
            (s.weight(g, "weight", &[dim])?, s.weight(g, "bias", &[dim])?)
        } else {
            (
                g.const_f32(&vec![1.0; dim], &[dim as i64]),
                g.const_f32(&vec![0.0; dim], &[dim as i64]),
            )
        };
        Ok(g.scoped(s.prefix(), |g| g.layer_norm(x, &w, &b, eps)))
    }

    /// `nn.RMSNorm(dim, eps)` with its weight, named `name` under this scope:
    /// `x / √(mean(x²) + ε) · w` over the last axis.
    pub fn rms_norm(
        &self,
        g: &mut Graph,
        x: &Value,
        name: &str,
        dim: usize,
        eps: f32,
    ) -> Result<Value> {
        let s = self.pp(name);
        let w = s.weight(g, "weight", &[dim])?;
        Ok(g.scoped(s.prefix(), |g| {
            // The `rms` scope is what torch computes in f32 whatever the model's type
            // (`torch.nn.RMSNorm`, T5's layer norm): a bf16/fp16 engine keeps it f32
            // (`passes::lower_precision`) and rounds before the weight, as torch does.
            // `x²` as `Pow(x, 2)`, torch's own spelling: ONNX Runtime's
            // `SimplifiedLayerNormFusion` starts its match at a `Pow`, and then makes the
            // whole norm one `SimplifiedLayerNormalization` kernel, on the CPU in f32 and on
            // CUDA across the casts of a bf16/fp16 engine's f32 island (`x * x` is never
            // fused: eight passes over the activation instead of one).
            let y = g.scoped("rms", |g| {
                let two = g.scalar(2.0);
                let x2 = g.op("Pow", &[x, &two], vec![]);
                let var = g.op(
                    "ReduceMean",
                    &[&x2],
                    vec![
                        ("axes", v2l_graphs::Attr::Ints(vec![-1])),
                        ("keepdims", v2l_graphs::Attr::Int(1)),
                    ],
                );
                let eps = g.scalar(eps);
                let var = g.add(&var, &eps);
                let rms = g.op("Sqrt", &[&var], vec![]);
                g.div(x, &rms)
            });
            g.mul(&w, &y)
        }))
    }
}
