//! A small typed builder for ONNX graphs.
//!
//! Architectures in `v2l-export` describe their forward pass with it, one method call per
//! PyTorch operation. Node names are hierarchical (`transformer_blocks.0.attn1/Softmax_3`) so a
//! profile or an error from ONNX Runtime points at the module it came from, and initializers
//! keep the checkpoint key they were read from, so a LoRA can later be fused by name.

use std::sync::Arc;

use crate::dtype::DType;
use crate::proto::{self, attribute_type};

/// The opset v2l emits. 17 brings `LayerNormalization`; nothing newer is needed.
pub const OPSET: i64 = 17;

/// A symbolic tensor in the graph under construction.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Value(Arc<str>);

impl Value {
    pub fn name(&self) -> &str {
        &self.0
    }
}

/// One dimension of a graph input or output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dim {
    Fixed(i64),
    Named(String),
}

impl From<i64> for Dim {
    fn from(v: i64) -> Self {
        Dim::Fixed(v)
    }
}

impl From<&str> for Dim {
    fn from(v: &str) -> Self {
        Dim::Named(v.to_string())
    }
}

/// A node attribute.
#[derive(Clone, Debug)]
pub enum Attr {
    Int(i64),
    Float(f32),
    Ints(Vec<i64>),
    Str(String),
}

/// Where an initializer's bytes come from.
///
/// `Shared` keeps a reference into a buffer the caller already holds (a memory-mapped
/// checkpoint), so building a graph never copies the weights; they are read, and converted
/// if the stored type differs, only when the model is written.
#[derive(Clone)]
pub enum TensorData {
    Owned(Vec<u8>),
    Shared {
        buffer: Arc<dyn AsRef<[u8]> + Send + Sync>,
        start: usize,
        end: usize,
        stored: DType,
    },
}

impl std::fmt::Debug for TensorData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TensorData::Owned(b) => write!(f, "Owned({} bytes)", b.len()),
            TensorData::Shared {
                start, end, stored, ..
            } => {
                write!(f, "Shared({stored}, {} bytes)", end - start)
            }
        }
    }
}

impl TensorData {
    /// The bytes as stored (before any conversion to the initializer's type).
    pub fn stored_bytes(&self) -> &[u8] {
        match self {
            TensorData::Owned(b) => b,
            TensorData::Shared {
                buffer, start, end, ..
            } => (**buffer).as_ref().get(*start..*end).unwrap_or(&[]),
        }
    }
}

/// A named constant tensor of the graph.
#[derive(Clone, Debug)]
pub struct Initializer {
    pub name: String,
    pub dtype: DType,
    pub dims: Vec<i64>,
    pub data: TensorData,
}

impl Initializer {
    pub fn numel(&self) -> usize {
        self.dims.iter().product::<i64>() as usize
    }

    /// Size in bytes once written in `dtype`.
    pub fn byte_len(&self) -> usize {
        self.numel() * self.dtype.size()
    }
}

/// A graph input or output declaration.
#[derive(Clone, Debug)]
pub struct IoSpec {
    pub name: String,
    pub dtype: DType,
    pub dims: Vec<Dim>,
}

/// The graph under construction: nodes, declared inputs and outputs, initializers.
#[derive(Debug, Default)]
pub struct Graph {
    pub name: String,
    pub(crate) nodes: Vec<proto::NodeProto>,
    pub(crate) inputs: Vec<IoSpec>,
    pub(crate) outputs: Vec<IoSpec>,
    pub(crate) initializers: Vec<Initializer>,
    pub(crate) metadata: Vec<(String, String)>,
    scope: Vec<String>,
    counter: usize,
}

impl Graph {
    pub fn new(name: impl Into<String>) -> Self {
        Graph {
            name: name.into(),
            ..Default::default()
        }
    }

    /// Runs `f` with `name` pushed onto the node-name scope.
    pub fn scoped<R>(&mut self, name: &str, f: impl FnOnce(&mut Self) -> R) -> R {
        self.scope.push(name.to_string());
        let r = f(self);
        self.scope.pop();
        r
    }

    fn fresh(&mut self, op: &str) -> String {
        self.counter += 1;
        if self.scope.is_empty() {
            format!("{op}_{}", self.counter)
        } else {
            format!("{}/{op}_{}", self.scope.join("."), self.counter)
        }
    }

    /// Declares a graph input.
    pub fn input(&mut self, name: &str, dtype: DType, dims: Vec<Dim>) -> Value {
        self.inputs.push(IoSpec {
            name: name.into(),
            dtype,
            dims,
        });
        Value(name.into())
    }

    /// Declares `v` as a graph output named `name` (adding an Identity if renaming is needed).
    pub fn output(&mut self, v: &Value, name: &str, dtype: DType, dims: Vec<Dim>) {
        let v = if v.name() == name {
            v.clone()
        } else {
            self.push_node("Identity", &[v], vec![], vec![name.to_string()], None)
                .remove(0)
        };
        self.outputs.push(IoSpec {
            name: v.name().into(),
            dtype,
            dims,
        });
    }

    /// Adds an initializer with an exact name (checkpoint keys keep theirs).
    pub fn initializer(
        &mut self,
        name: &str,
        dtype: DType,
        dims: Vec<i64>,
        data: TensorData,
    ) -> Value {
        self.initializers.push(Initializer {
            name: name.into(),
            dtype,
            dims,
            data,
        });
        Value(name.into())
    }

    /// The initializer already named `name`, if any.
    pub fn find_initializer(&self, name: &str) -> Option<Value> {
        self.initializers
            .iter()
            .any(|i| i.name == name)
            .then(|| Value(name.into()))
    }

    /// Adds a float32 constant under a generated name.
    pub fn const_f32(&mut self, values: &[f32], dims: &[i64]) -> Value {
        let name = self.fresh("const");
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializer(&name, DType::F32, dims.to_vec(), TensorData::Owned(bytes))
    }

    /// A float32 scalar constant.
    pub fn scalar(&mut self, v: f32) -> Value {
        self.const_f32(&[v], &[])
    }

    /// Adds a 1-D int64 constant (shapes, axes) under a generated name.
    pub fn const_i64(&mut self, values: &[i64]) -> Value {
        let name = self.fresh("const");
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializer(
            &name,
            DType::I64,
            vec![values.len() as i64],
            TensorData::Owned(bytes),
        )
    }

    /// Records key/value metadata in the written model.
    pub fn metadata(&mut self, key: &str, value: &str) {
        self.metadata.push((key.into(), value.into()));
    }

    fn push_node(
        &mut self,
        op: &str,
        inputs: &[&Value],
        attrs: Vec<(&str, Attr)>,
        outputs: Vec<String>,
        name: Option<String>,
    ) -> Vec<Value> {
        let name = name.unwrap_or_else(|| self.fresh(op));
        let attribute = attrs.into_iter().map(|(k, a)| attr_proto(k, a)).collect();
        self.nodes.push(proto::NodeProto {
            input: inputs.iter().map(|v| v.name().to_string()).collect(),
            output: outputs.clone(),
            name,
            op_type: op.into(),
            attribute,
            ..Default::default()
        });
        outputs.into_iter().map(|o| Value(o.into())).collect()
    }

    /// Adds a node with `n` outputs.
    pub fn op_n(
        &mut self,
        op: &str,
        inputs: &[&Value],
        attrs: Vec<(&str, Attr)>,
        n: usize,
    ) -> Vec<Value> {
        let name = self.fresh(op);
        let outputs = (0..n).map(|i| format!("{name}:{i}")).collect();
        self.push_node(op, inputs, attrs, outputs, Some(name))
    }

    /// Adds a node with one output.
    pub fn op(&mut self, op: &str, inputs: &[&Value], attrs: Vec<(&str, Attr)>) -> Value {
        self.op_n(op, inputs, attrs, 1).remove(0)
    }

    // ---- elementwise -------------------------------------------------------------------

    pub fn add(&mut self, a: &Value, b: &Value) -> Value {
        self.op("Add", &[a, b], vec![])
    }
    pub fn sub(&mut self, a: &Value, b: &Value) -> Value {
        self.op("Sub", &[a, b], vec![])
    }
    pub fn mul(&mut self, a: &Value, b: &Value) -> Value {
        self.op("Mul", &[a, b], vec![])
    }
    pub fn div(&mut self, a: &Value, b: &Value) -> Value {
        self.op("Div", &[a, b], vec![])
    }
    pub fn sigmoid(&mut self, x: &Value) -> Value {
        self.op("Sigmoid", &[x], vec![])
    }
    pub fn exp(&mut self, x: &Value) -> Value {
        self.op("Exp", &[x], vec![])
    }
    pub fn cos(&mut self, x: &Value) -> Value {
        self.op("Cos", &[x], vec![])
    }
    pub fn sin(&mut self, x: &Value) -> Value {
        self.op("Sin", &[x], vec![])
    }
    pub fn cast(&mut self, x: &Value, to: DType) -> Value {
        self.op("Cast", &[x], vec![("to", Attr::Int(to.onnx_code() as i64))])
    }

    /// `x * sigmoid(x)` (PyTorch's SiLU).
    pub fn silu(&mut self, x: &Value) -> Value {
        let s = self.sigmoid(x);
        self.mul(x, &s)
    }

    /// GELU with the tanh approximation: `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
    pub fn gelu_tanh(&mut self, x: &Value) -> Value {
        let c = self.scalar(0.044715);
        let k = self.scalar((2.0f64 / std::f64::consts::PI).sqrt() as f32);
        let half = self.scalar(0.5);
        let one = self.scalar(1.0);
        // `Pow(x, 3)`, torch's spelling: ONNX Runtime fuses this form into one `FastGelu`
        // (its `FastGeluFusion`), not `x·x·x`.
        let three = self.scalar(3.0);
        let x3 = self.op("Pow", &[x, &three], vec![]);
        let cx3 = self.mul(&x3, &c);
        let inner = self.add(x, &cx3);
        let inner = self.mul(&inner, &k);
        let t = self.op("Tanh", &[&inner], vec![]);
        let t1 = self.add(&t, &one);
        let hx = self.mul(x, &half);
        self.mul(&hx, &t1)
    }

    /// Exact GELU: `0.5·x·(1 + erf(x/√2))`. Spelt with `Div(x, √2)`, as torch exports it:
    /// ONNX Runtime's `GeluFusion` makes that one `Gelu` (its kernel multiplies by 1/√2
    /// itself) and leaves `x·(1/√2)` as five nodes.
    pub fn gelu_erf(&mut self, x: &Value) -> Value {
        let sqrt2 = self.scalar(std::f32::consts::SQRT_2);
        let half = self.scalar(0.5);
        let one = self.scalar(1.0);
        let xs = self.div(x, &sqrt2);
        let e = self.op("Erf", &[&xs], vec![]);
        let e1 = self.add(&e, &one);
        let hx = self.mul(x, &half);
        self.mul(&hx, &e1)
    }

    // ---- shapes ------------------------------------------------------------------------

    pub fn shape(&mut self, x: &Value) -> Value {
        self.op("Shape", &[x], vec![])
    }

    /// `Shape(x)[start..end]` as a 1-D int64 tensor.
    pub fn shape_range(&mut self, x: &Value, start: i64, end: i64) -> Value {
        self.op(
            "Shape",
            &[x],
            vec![("start", Attr::Int(start)), ("end", Attr::Int(end))],
        )
    }

    pub fn reshape(&mut self, x: &Value, shape: &Value) -> Value {
        self.op("Reshape", &[x, shape], vec![])
    }

    /// Reshape to a constant target (0 copies the input dim, -1 infers one).
    pub fn reshape_to(&mut self, x: &Value, shape: &[i64]) -> Value {
        let s = self.const_i64(shape);
        self.reshape(x, &s)
    }

    pub fn transpose(&mut self, x: &Value, perm: &[i64]) -> Value {
        self.op("Transpose", &[x], vec![("perm", Attr::Ints(perm.to_vec()))])
    }

    pub fn concat(&mut self, xs: &[&Value], axis: i64) -> Value {
        self.op("Concat", xs, vec![("axis", Attr::Int(axis))])
    }

    /// `x[start:end]` along `axis` (end may be `i64::MAX`).
    pub fn slice(&mut self, x: &Value, axis: i64, start: i64, end: i64) -> Value {
        let s = self.const_i64(&[start]);
        let e = self.const_i64(&[end]);
        let a = self.const_i64(&[axis]);
        self.op("Slice", &[x, &s, &e, &a], vec![])
    }

    /// `x[start:end]` along `axis` with bounds computed in the graph (1-element int64 tensors).
    pub fn slice_dyn(&mut self, x: &Value, axis: i64, start: &Value, end: &Value) -> Value {
        let a = self.const_i64(&[axis]);
        self.op("Slice", &[x, start, end, &a], vec![])
    }

    /// Splits `x` along `axis` into pieces of the given sizes (`torch.split`).
    pub fn split(&mut self, x: &Value, sizes: &[i64], axis: i64) -> Vec<Value> {
        let s = self.const_i64(sizes);
        self.op_n(
            "Split",
            &[x, &s],
            vec![("axis", Attr::Int(axis))],
            sizes.len(),
        )
    }

    /// `torch.chunk(x, N, axis)` for an axis of `N · size` elements, as `N` named parts.
    pub fn chunk<const N: usize>(&mut self, x: &Value, size: i64, axis: i64) -> [Value; N] {
        let s = self.const_i64(&[size; N]);
        let name = self.fresh("Split");
        let parts: [Value; N] = std::array::from_fn(|i| Value(format!("{name}:{i}").into()));
        let outputs = parts.iter().map(|v| v.name().to_string()).collect();
        self.push_node(
            "Split",
            &[x, &s],
            vec![("axis", Attr::Int(axis))],
            outputs,
            Some(name),
        );
        parts
    }

    pub fn unsqueeze(&mut self, x: &Value, axes: &[i64]) -> Value {
        let a = self.const_i64(axes);
        self.op("Unsqueeze", &[x, &a], vec![])
    }

    // ---- layers ------------------------------------------------------------------------

    pub fn matmul(&mut self, a: &Value, b: &Value) -> Value {
        self.op("MatMul", &[a, b], vec![])
    }

    /// `nn.Linear` on the last axis of `x` of any rank: `x·Wᵀ + b` with `W [out, in]`.
    ///
    /// Lowered as Flatten → `Gemm(transB=1)` → Reshape so the weight initializer is consumed
    /// as stored, untransposed: a TensorRT refit or an ORT initializer override can then replace
    /// it by its checkpoint name.
    pub fn linear(
        &mut self,
        x: &Value,
        weight: &Value,
        bias: Option<&Value>,
        out_features: i64,
    ) -> Value {
        let lead = self.op("Shape", &[x], vec![("end", Attr::Int(-1))]);
        let x2 = self.op("Flatten", &[x], vec![("axis", Attr::Int(-1))]);
        let mut ins = vec![&x2, weight];
        if let Some(b) = bias {
            ins.push(b);
        }
        let y = self.op("Gemm", &ins, vec![("transB", Attr::Int(1))]);
        let out = self.const_i64(&[out_features]);
        let shape = self.concat(&[&lead, &out], 0);
        self.reshape(&y, &shape)
    }

    /// `nn.LayerNorm` over the last axis (statistics in the input type; v2l exports f32).
    pub fn layer_norm(&mut self, x: &Value, weight: &Value, bias: &Value, eps: f32) -> Value {
        self.op(
            "LayerNormalization",
            &[x, weight, bias],
            vec![("axis", Attr::Int(-1)), ("epsilon", Attr::Float(eps))],
        )
    }

    pub fn softmax(&mut self, x: &Value, axis: i64) -> Value {
        self.op("Softmax", &[x], vec![("axis", Attr::Int(axis))])
    }

    /// Number of nodes so far (for tests and progress reports).
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    pub fn initializers(&self) -> &[Initializer] {
        &self.initializers
    }

    pub fn inputs(&self) -> &[IoSpec] {
        &self.inputs
    }

    pub fn outputs(&self) -> &[IoSpec] {
        &self.outputs
    }
}

pub(crate) fn attr_proto(name: &str, a: Attr) -> proto::AttributeProto {
    let mut p = proto::AttributeProto {
        name: name.into(),
        ..Default::default()
    };
    match a {
        Attr::Int(i) => {
            p.r#type = attribute_type::INT;
            p.i = i;
        }
        Attr::Float(f) => {
            p.r#type = attribute_type::FLOAT;
            p.f = f;
        }
        Attr::Ints(v) => {
            p.r#type = attribute_type::INTS;
            p.ints = v;
        }
        Attr::Str(s) => {
            p.r#type = attribute_type::STRING;
            p.s = s.into_bytes();
        }
    }
    p
}
