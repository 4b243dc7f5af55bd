//! fp16/bf16 graphs: weights and activations in the low type, what diffusers keeps in f32 kept
//! f32, and the graph's inputs and outputs still f32 (the runtime's contract) but for a VAE's
//! frame-batch caches when [`Lowering::low_caches`] asks (the runtime carries a cache in the type
//! its graph declares).
//!
//! Kept f32 ("islands"), following what diffusers computes when the model is in bf16/fp16:
//! - `Softmax`: attention probabilities (torch's attention kernels accumulate them in f32);
//! - nodes in a scope named `rope`: `apply_rotary_emb` computes `x·cos + rot(x)·sin` in f32 and
//!   casts the result back;
//! - the top-level `time_proj` scope: the sinusoidal timestep embedding is f32, cast to the
//!   model's type before `time_embedding.linear_1` (CogVideoX) or
//!   `condition_embedder.time_embedder.linear_1` (Wan);
//! - the model's own `_keep_in_fp32_modules`, which the exporter records in the graph's
//!   metadata ([`KEEP_IN_FP32`], module names separated by commas): a node whose scope has one of
//!   those names as a dot-separated component is f32, as diffusers matches the names against
//!   parameter names (Wan: `time_embedder`, `scale_shift_table`, `norm1`, `norm2`, `norm3`,
//!   and `norm_out`, an `FP32LayerNorm`). Where diffusers rounds back (`.type_as(x)`), the
//!   exporter writes an f32 `Cast` outside those scopes, which this pass retargets to the low
//!   type;
//! - `gelu`: torch's GELU widens each element and rounds its output once;
//! - `group_norm`: a GroupNorm (the VAE's, with the decoder's spatial modulation folded in):
//!   statistics and affine in f32, the output rounded once;
//! - `rms`: an RMS norm's mean square and division (`torch.nn.RMSNorm`, T5's layer norm:
//!   computed in f32 and rounded before the weight). Also a placement matter: ONNX Runtime's
//!   CUDA provider has no bf16 `ReduceMean`, so a bf16 one would run on the CPU;
//! - a LoRA branch's scale ([`super::lora::LORA_SCALE_NODE`], on the rank-wide product), so
//!   the scale is not rounded. The rest of a branch computes in the low type, as PEFT runs a
//!   LoRA on a bf16/fp16 model: an f32 branch (v2l's form before 2026-11-27) cast the layer's
//!   input up, wrote its output-wide product in f32 and cast the sum back, which at
//!   CogVideoX-5B width moved more bytes per block than the block's own elementwise work;
//! - the VAE's cache ties ([`super::schedule::carried_outputs_first`]: a conv's bias plus 0 × the number
//!   of elements of a cache): that count passes 65,504, fp16's largest.
//!
//! `LayerNormalization` runs in the low type with its default `stash_type = 1` (mean and
//! variance in f32), as torch's `layer_norm` does. Everything else — the linears and their
//! weights, the residual stream, modulation, attention's matrix products — is in the low type,
//! as `transformer.to(torch.bfloat16)` has it.
//!
//! Two forms of the same typing ([`Lowering::emulate`]):
//! - **typed**: every tensor in its type, for backends with low-precision kernels (TensorRT
//!   builds it strongly typed: the types in the graph are the precision; CUDA).
//! - **emulated**, for ONNX Runtime's CPU provider, which has no bf16 `MatMul`: every node that
//!   computes reads its low inputs widened to f32 and its output is rounded back to the low
//!   type. Tensors between nodes and the weights in memory stay low (weights are widened per
//!   use, so the session must not constant-fold those Casts); each op sees exactly the low
//!   values and rounds once, as a GPU kernel with f32 accumulation does.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use v2l_contracts::frame_batch::{CACHE_INPUT_PREFIX, CACHE_OUTPUT_PREFIX};

use super::data_file::DataFile;
use super::edit::PassError;
use crate::builder::{attr_proto, Attr};
use crate::dtype::DType;
use crate::proto::{self, ModelProto};

/// How to lower a graph.
#[derive(Clone, Copy, Debug)]
pub struct Lowering {
    /// `F16` or `BF16`.
    pub dtype: DType,
    /// The CPU form (see the module docs).
    pub emulate: bool,
    /// Typed form only: a VAE's frame-batch caches (`cache_in.*` inputs, `cache_out.*`
    /// outputs) in the low type too, where every node reading a cache computes in the low type.
    /// Nothing changes but the carried bytes: each value was rounded to the low type before any
    /// node read it, so storing it low is exact; the runtime carries a cache in its graph's
    /// declared type, on the device, without the two casts per batch and at half the memory.
    pub low_caches: bool,
    /// A LoRA branch's factor inputs (`<module>.lora_A`, `.lora_B`, [`super::lora_input_names`])
    /// in the low type, both forms, where every node reading them computes in it (the branch's
    /// products do; its scale stays f32). The graph's `Cast` would round them to the low type
    /// on every step; given low, they are rounded once, on the host, to the same values (both
    /// round to nearest even), and a switch moves half the bytes: at CogVideoX-5B width and
    /// rank 64, 0.5 GB instead of 1 GB per switch to a GPU.
    pub low_factors: bool,
    /// The GELUs (scope `gelu`) in the low type instead of f32: ONNX Runtime's fp16/bf16
    /// `FastGelu` then reads and writes the low type but rounds after each operation of its
    /// formula, where torch widens and rounds once (`v2l-compile --low-gelu`: what the f32
    /// island's two casts cost against that, measured on a GPU).
    pub low_gelu: bool,
    /// bf16 graphs: each `com.microsoft.MultiHeadAttention`, the RoPE before it (scope
    /// `rope`, whatever the model's f32 module list says: diffusers computes it in f32 for
    /// precision, which fp16 keeps) and the reshapes that only feed them, in fp16. ONNX
    /// Runtime's CUDA kernel offers its flash and cuDNN attention for fp16 only; bf16 runs the
    /// memory-efficient one (`multihead_attention.cc`: `kIsFp16`). fp16 holds bf16's values
    /// with three more significand bits, exactly from 2⁻¹⁴ to 65,504 in magnitude (smaller
    /// ones lose at most 2⁻²⁵, larger ones would be inf): q and k enter the RoPE exactly, which
    /// rounds three times to fp16 (its CUDA kernel computes in its input's type; its cos/sin
    /// tables are rounded to fp16), less than the one bf16 rounding of torch's f32 RoPE; v is
    /// carried exactly; the attention's fp16 output is rounded to bf16. The CPU form (the
    /// compile's accuracy record) rounds each of these nodes' inputs and outputs to fp16 but
    /// computes the fused RoPE and the attention in f32, so their kernels' own fp16 roundings
    /// (flash attention's fp16 probabilities among them) are not in the record.
    pub half_attention: bool,
    /// bf16 graphs: the GELUs (scope `gelu`) in fp16 instead of f32, unless [`Self::low_gelu`].
    /// The f32 island casts the feed-forward's 4×-wide activation up and back (40 passes over
    /// a hidden-size bf16 vector per token, the largest elementwise cost of a block); in fp16
    /// it is 24: the input is cast exactly, ONNX Runtime's fp16 `FastGelu` computes in fp16
    /// (roundings 8× finer than bf16's) and the output is rounded to bf16 once, as torch
    /// rounds its f32 GELU. An input beyond ±65,504 would be inf (a pre-activation that large
    /// is not seen in these models). The feed-forward's bias, moved into the GELU on CUDA
    /// engines (`passes::fuse_gelu_bias`), is added in fp16 there. The CPU form rounds the
    /// GELU's inputs and output to fp16 but computes it in f32. A GELU in a module the model
    /// keeps in f32 stays f32.
    pub half_gelu: bool,
}

/// Where the converted weights go.
#[derive(Clone, Copy, Debug)]
pub enum WeightFile<'a> {
    /// A new external-data file beside the model that will be written.
    Write(&'a Path),
    /// Already written by an earlier lowering of the same weights ([`Lowered::tensors`]): how
    /// a second graph of one engine (its LoRA-branch variant) shares one weight file.
    Reuse(&'a [proto::TensorProto]),
}

/// What [`lower_precision`] did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Lowered {
    /// The converted initializers' entries.
    pub tensors: Vec<proto::TensorProto>,
    /// Initializers converted (to the low type, or widened to f32 for an island).
    pub converted: usize,
    /// Bytes of those initializers before and after.
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// Nodes kept in f32 (islands).
    pub f32_nodes: usize,
    /// Casts inserted.
    pub casts: usize,
}

/// Scopes kept in f32 wherever they are (module docs).
const F32_SCOPES: &[&str] = &[ROPE_SCOPE, GELU_SCOPE, "rms", GROUP_NORM_SCOPE];

/// The GELUs' scope: f32, as torch computes them, but for [`Lowering::half_gelu`] and
/// [`Lowering::low_gelu`].
const GELU_SCOPE: &str = "gelu";

/// The rotary embedding's scope: f32, as diffusers computes it, but for fp16 attention in a
/// bf16 graph ([`Lowering::half_attention`]).
const ROPE_SCOPE: &str = "rope";

/// The scope of a GroupNorm's nodes (the VAE's), all f32 below f32: torch's `group_norm` on
/// bf16/fp16 input computes statistics and affine in f32 and rounds its output once.
pub const GROUP_NORM_SCOPE: &str = "group_norm";

/// Graph metadata key: the modules the model keeps in f32 below f32 (module docs).
pub const KEEP_IN_FP32: &str = "v2l.keep_in_fp32_modules";

/// The module names a graph's [`KEEP_IN_FP32`] metadata lists (empty without it).
pub fn keep_in_fp32_modules(model: &ModelProto) -> Vec<String> {
    model
        .metadata_props
        .iter()
        .find(|e| e.key == KEEP_IN_FP32)
        .map(|e| {
            e.value
                .split(',')
                .map(str::trim)
                .filter(|m| !m.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

/// Whether the module or node scope `scope` (dot-separated) is one of `modules` or inside one.
pub fn keeps_f32(modules: &[String], scope: &str) -> bool {
    scope.split('.').any(|c| modules.iter().any(|m| m == c))
}

/// The top-level scope of the sinusoidal timestep embedding, kept f32. Matched whole: Wan's
/// `condition_embedder.time_proj` is a linear layer in the model's type.
const SINUSOID_SCOPE: &str = "time_proj";

/// Ops that only move or select elements: exact in any type and with low-type kernels on every
/// backend (ONNX Runtime's CPU provider included), so they run in the type they are given.
const DATA_OPS: &[&str] = &[
    "Reshape",
    "Transpose",
    "Unsqueeze",
    "Squeeze",
    "Concat",
    "Slice",
    "Split",
    "Gather",
    "Identity",
    "Expand",
    "Flatten",
];

/// Ops that compare floats and write bool.
const PREDICATES: &[&str] = &[
    "Greater",
    "Less",
    "GreaterOrEqual",
    "LessOrEqual",
    "Equal",
    "IsNaN",
    "IsInf",
];

/// Initializers up to this size stay inside the graph after conversion.
const INLINE_MAX: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Role {
    /// No float data (shape arithmetic): untouched.
    Int,
    /// Reads any type, writes no float (`Shape`).
    AnyInput,
    /// A `Cast` to a float type: retargeted.
    Cast,
    /// Computes in f32 (module docs).
    Island,
    /// Compares floats, writes bool (`Greater`): in f32, output untouched.
    Predicate,
    Data,
    Compute,
    /// Computes in fp16 inside a bf16 graph (the attention, the RoPE and the GELUs:
    /// [`Lowering::half_attention`], [`Lowering::half_gelu`]); `data`: a data mover among them,
    /// or one that only feeds such nodes ([`half_feeders`]).
    Half {
        data: bool,
    },
}

/// Nodes in fp16 inside a bf16 graph: the attention and the RoPE that feeds it
/// ([`Lowering::half_attention`]), the GELUs ([`Lowering::half_gelu`]). The attention and a
/// GELU in a module the model keeps in f32 stay f32 (`keep`); the RoPE goes fp16 either way.
fn is_half(n: &proto::NodeProto, how: &Lowering, keep: &[String]) -> bool {
    let scope = n.name.split('/').next().unwrap_or("");
    let last = scope.rsplit('.').next();
    let kept = n.name.contains('/') && keeps_f32(keep, scope);
    let rope = last == Some(ROPE_SCOPE);
    let attention = n.op_type == "MultiHeadAttention" && n.domain == "com.microsoft" && !kept;
    let gelu = last == Some(GELU_SCOPE) && !how.low_gelu && !kept;
    (how.half_attention && (rope || attention)) || (how.half_gelu && gelu)
}

fn is_island(n: &proto::NodeProto, keep: &[String], low_gelu: bool) -> bool {
    let scope = n.name.split('/').next().unwrap_or("");
    let last = scope.rsplit('.').next().unwrap_or("");
    n.op_type == "Softmax"
        || (F32_SCOPES.contains(&last) && !(low_gelu && last == GELU_SCOPE))
        || scope == SINUSOID_SCOPE
        || (n.name.contains('/') && keeps_f32(keep, scope))
        || n.name.ends_with(super::lora::LORA_SCALE_NODE)
        || n.name.contains(super::schedule::AFTER_CACHE)
}

fn cast_to(n: &proto::NodeProto) -> Option<DType> {
    n.attribute
        .iter()
        .find(|a| a.name == "to")
        .and_then(|a| DType::from_onnx_code(a.i as i32))
}

/// Rewrites `model` (read from `source`, whose external data stays where it is) into the low
/// type `how.dtype`, its converted weights in `weights`.
pub fn lower_precision(
    model: &mut ModelProto,
    source: &Path,
    weights: WeightFile,
    how: Lowering,
) -> Result<Lowered, PassError> {
    let low = how.dtype;
    if !matches!(low, DType::F16 | DType::BF16) {
        return Err(PassError::Unsupported(format!(
            "lowering to {low}: the low-precision graphs are f16 or bf16"
        )));
    }
    let keep = keep_in_fp32_modules(model);
    let is_island = |n: &proto::NodeProto| is_island(n, &keep, how.low_gelu);
    let half = low == DType::BF16;
    let graph = model.graph.get_or_insert_with(Default::default);
    unwrap_weight_casts(graph);

    // Types as they are now; node outputs are filled in below.
    let mut ty: HashMap<String, DType> = graph
        .input
        .iter()
        .filter_map(|i| Some((i.name.clone(), input_dtype(i)?)))
        .chain(
            graph
                .initializer
                .iter()
                .filter_map(|t| Some((t.name.clone(), DType::from_onnx_code(t.data_type)?))),
        )
        .collect();
    let is_float = |ty: &HashMap<String, DType>, v: &str| ty.get(v).is_some_and(|d| d.is_float());

    // Each node's role, in graph order (outputs' float-ness follows from inputs).
    let mut roles = Vec::with_capacity(graph.node.len());
    {
        let mut float_seen: HashMap<String, DType> = ty.clone();
        for n in &graph.node {
            let float_in = n.input.iter().any(|x| is_float(&float_seen, x));
            let role = match n.op_type.as_str() {
                "Shape" | "Size" => Role::AnyInput,
                "Cast" if cast_to(n).is_some_and(DType::is_float) => Role::Cast,
                "Cast" => Role::Int,
                _ if !float_in => Role::Int,
                op if PREDICATES.contains(&op) && n.domain.is_empty() => Role::Predicate,
                op if half && is_half(n, &how, &keep) => Role::Half {
                    data: DATA_OPS.contains(&op) && n.domain.is_empty(),
                },
                _ if is_island(n) => Role::Island,
                // ONNX Runtime's CPU `Expand` has no bf16: the CPU form widens it (exact).
                "Expand" if how.emulate && low == DType::BF16 => Role::Compute,
                // Nor has its CUDA `Clip` (the VAE posterior's clamp): in f32, which is exact.
                "Clip" if low == DType::BF16 => Role::Island,
                op if DATA_OPS.contains(&op) && n.domain.is_empty() => Role::Data,
                _ => Role::Compute,
            };
            if matches!(
                role,
                Role::Cast | Role::Island | Role::Data | Role::Compute | Role::Half { .. }
            ) {
                for o in &n.output {
                    float_seen.insert(o.clone(), DType::F32);
                }
            }
            roles.push(role);
        }
    }
    if half {
        half_feeders(graph, &mut roles);
    }
    // The type each role computes in, in the typed graph.
    let typed = |role: Role, n: &proto::NodeProto| match role {
        Role::Island => Some(DType::F32),
        Role::Half { .. } => Some(DType::F16),
        Role::Data | Role::Compute => Some(low),
        Role::Cast if half && is_half(n, &how, &keep) => Some(DType::F16),
        Role::Cast => Some(if is_island(n) { DType::F32 } else { low }),
        Role::Int | Role::AnyInput | Role::Predicate => None,
    };
    let low_caches = match how.low_caches && !how.emulate {
        true => caches_read_low(graph, &roles, |r, n| typed(r, n) == Some(low)),
        false => HashSet::new(),
    };
    let low_factors = match how.low_factors {
        true => factors_read_low(graph, &roles, |r, n| typed(r, n) == Some(low)),
        false => HashSet::new(),
    };
    for i in graph
        .input
        .iter_mut()
        .filter(|i| low_caches.contains(&i.name) || low_factors.contains(&i.name))
    {
        set_elem_type(i, low);
        ty.insert(i.name.clone(), low);
    }

    // Float initializers: low where every node reading them computes low, else f32.
    let mut wanted: HashMap<&str, DType> = HashMap::new();
    for (n, &role) in graph.node.iter().zip(&roles) {
        let Some(t) = typed(role, n).filter(|_| role != Role::Cast) else {
            continue;
        };
        for x in &n.input {
            if let Some(DType::F32 | DType::F16 | DType::BF16) = ty.get(x.as_str()) {
                let w = wanted.entry(x.as_str()).or_insert(t);
                if *w != t {
                    *w = DType::F32;
                }
            }
        }
    }
    let inits: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    // Sorted: the same model lowers to the same bytes.
    let mut convert: Vec<(String, DType)> = wanted
        .iter()
        .filter(|(name, want)| inits.contains(*name) && ty.get(**name) != Some(*want))
        .map(|(name, want)| (name.to_string(), *want))
        .collect();
    convert.sort_by(|a, b| a.0.cmp(&b.0));
    let mut done = Lowered::default();
    let new_tensors = match weights {
        WeightFile::Write(data) => convert_initializers(source, data, &convert, &mut done)?,
        WeightFile::Reuse(tensors) => convert
            .iter()
            .map(|(name, want)| {
                tensors
                    .iter()
                    .find(|t| t.name == *name && t.data_type == want.onnx_code())
                    .cloned()
                    .ok_or_else(|| PassError::MissingInitializer(format!("{name} ({want})")))
            })
            .collect::<Result<Vec<_>, _>>()?,
    };
    done.tensors.clone_from(&new_tensors);
    for (name, want) in &convert {
        ty.insert(name.clone(), *want);
    }
    graph
        .initializer
        .retain(|t| !new_tensors.iter().any(|n| n.name == t.name));
    graph.initializer.extend(new_tensors);

    // Emit the nodes with their casts.
    let mut casts: HashMap<(String, DType), String> = HashMap::new();
    let mut nodes = Vec::with_capacity(graph.node.len() * 2);
    let mut taken: HashSet<String> = graph
        .node
        .iter()
        .flat_map(|n| n.output.iter().cloned())
        .chain(ty.keys().cloned())
        .collect();
    let mut fresh = |base: String| {
        let mut name = base.clone();
        let mut k = 1;
        while taken.contains(&name) {
            name = format!("{base}_{k}");
            k += 1;
        }
        taken.insert(name.clone());
        name
    };
    for (mut n, role) in std::mem::take(&mut graph.node).into_iter().zip(roles) {
        let out_ty = typed(role, &n);
        let computes = matches!(role, Role::Compute | Role::Half { data: false });
        let compute = match role {
            _ if computes && how.emulate => Some(DType::F32),
            // Widening is exact, so comparing in f32 is comparing the low values (and CUDA
            // compares no bf16).
            Role::Predicate => Some(DType::F32),
            Role::Cast | Role::Int | Role::AnyInput => None,
            _ => out_ty,
        };
        if let Some(c) = compute {
            for x in n.input.iter_mut() {
                let Some(&t) = ty.get(x.as_str()).filter(|t| t.is_float()) else {
                    continue;
                };
                if t == c {
                    continue;
                }
                // The CPU form widens what the typed graph reads: an input of a third type
                // (fp16 attention's output, read by a bf16 node), or an f32 one read by an fp16
                // node (Wan's RoPE tables), is first rounded as the typed graph's cast rounds
                // it. (An f32 island's output read by a bf16 node is not: the CPU form has
                // always read it unrounded.)
                let half_reads_f32 = matches!(role, Role::Half { .. }) && t == DType::F32;
                let via = out_ty.filter(|&o| {
                    how.emulate && computes && t != o && (t != DType::F32 || half_reads_f32)
                });
                for c in via.into_iter().chain([c]) {
                    let key = (x.clone(), c);
                    if let Some(y) = casts.get(&key) {
                        *x = y.clone();
                        continue;
                    }
                    let y = fresh(format!("{x}.{}", c.name()));
                    nodes.push(cast_node(&format!("{y}/Cast"), x, &y, c));
                    done.casts += 1;
                    ty.insert(y.clone(), c);
                    casts.insert(key, y.clone());
                    *x = y;
                }
            }
        }
        if role == Role::Island {
            done.f32_nodes += 1;
        }
        // ONNX Runtime's CPU `Size` takes no bf16: the product of the shape, exactly.
        let low_input = || {
            n.input
                .first()
                .and_then(|x| ty.get(x))
                .is_some_and(|t| *t != DType::F32 && t.is_float())
        };
        if how.emulate && n.op_type == "Size" && n.domain.is_empty() && low_input() {
            let shape = fresh(format!("{}.shape", n.name));
            nodes.extend(super::opset::size_as_shape_product(&n, shape));
            continue;
        }
        let Some(out_ty) = out_ty else {
            nodes.push(n);
            continue;
        };
        if role == Role::Cast {
            n.attribute.retain(|a| a.name != "to");
            n.attribute
                .push(attr_proto("to", Attr::Int(out_ty.onnx_code() as i64)));
        }
        let round = computes && how.emulate;
        // LayerNormalization's mean and inverse deviation are f32 (`stash_type` 1) whatever
        // its input: only its normalized output is in the type.
        let stats_f32 = n.op_type == "LayerNormalization"
            && n.domain.is_empty()
            && super::edit::attr_i(&n, "stash_type").unwrap_or(1) == 1;
        let mut rounding = Vec::new();
        for (k, o) in n
            .output
            .iter_mut()
            .enumerate()
            .filter(|(_, o)| !o.is_empty())
        {
            if stats_f32 && k > 0 {
                ty.insert(o.clone(), DType::F32);
                continue;
            }
            ty.insert(o.clone(), out_ty);
            if round {
                let wide = fresh(format!("{o}.f32"));
                rounding.push(cast_node(&format!("{o}/Round"), &wide, o, out_ty));
                done.casts += 1;
                *o = wide;
            }
        }
        nodes.push(n);
        nodes.extend(rounding);
    }
    // The graph's outputs keep their declared f32, but for low caches (written low: their
    // producers compute low, `caches_read_low`).
    let mut kept_low = HashSet::new();
    for o in graph.output.iter_mut() {
        let low_cache = o
            .name
            .strip_prefix(CACHE_OUTPUT_PREFIX)
            .is_some_and(|m| low_caches.contains(&format!("{CACHE_INPUT_PREFIX}{m}")));
        if low_cache && ty.get(&o.name) == Some(&low) {
            set_elem_type(o, low);
            kept_low.insert(o.name.clone());
        }
    }
    for out in graph.output.iter().map(|o| o.name.clone()) {
        if kept_low.contains(&out) {
            continue;
        }
        if ty
            .get(&out)
            .is_some_and(|t| t.is_float() && *t != DType::F32)
        {
            let inner = match ty.get(&out) {
                Some(t) => fresh(format!("{out}.{}", t.name())),
                None => fresh(format!("{out}.{}", low.name())),
            };
            rename(&mut nodes, &out, &inner);
            nodes.push(cast_node(&format!("{out}/Cast"), &inner, &out, DType::F32));
            done.casts += 1;
        }
    }
    graph.node = nodes;
    graph.value_info.clear();
    Ok(done)
}

/// Marks the data movers (`Reshape`, …) whose every reader computes in fp16
/// ([`Role::Half`]) fp16 themselves, so what they move is cast once, before them: v reaches
/// the attention, and the feed-forward's activation its GELU, through one cast.
fn half_feeders(graph: &proto::GraphProto, roles: &mut [Role]) {
    let outputs: HashSet<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
    let mut readers: HashMap<&str, Vec<usize>> = HashMap::new();
    for (j, m) in graph.node.iter().enumerate() {
        for x in &m.input {
            readers.entry(x.as_str()).or_default().push(j);
        }
    }
    // Backwards, so a chain of movers before the attention turns fp16 as a whole.
    for (i, n) in graph.node.iter().enumerate().rev() {
        if roles.get(i) != Some(&Role::Data)
            || n.output.iter().any(|o| outputs.contains(o.as_str()))
        {
            continue;
        }
        let mut read_by = n
            .output
            .iter()
            .flat_map(|o| readers.get(o.as_str()).into_iter().flatten())
            .peekable();
        let only_half = read_by.peek().is_some()
            && read_by.all(|&j| matches!(roles.get(j), Some(Role::Half { .. })));
        if let (true, Some(r)) = (only_half, roles.get_mut(i)) {
            *r = Role::Half { data: true };
        }
    }
}

fn cast_node(name: &str, x: &str, y: &str, to: DType) -> proto::NodeProto {
    proto::NodeProto {
        input: vec![x.into()],
        output: vec![y.into()],
        name: name.into(),
        op_type: "Cast".into(),
        attribute: vec![attr_proto("to", Attr::Int(to.onnx_code() as i64))],
        ..Default::default()
    }
}

/// Every node input or output named `from` renamed `to`.
fn rename(nodes: &mut [proto::NodeProto], from: &str, to: &str) {
    for n in nodes.iter_mut() {
        for v in n.output.iter_mut().chain(n.input.iter_mut()) {
            if v == from {
                *v = to.to_string();
            }
        }
    }
}

/// The `cache_in.*` inputs whose every reader computes in the low type (`low_op`), and whose
/// `cache_out.*` output is written by a node computing in it: the caches
/// [`Lowering::low_caches`] types low, both sides.
fn caches_read_low(
    graph: &proto::GraphProto,
    roles: &[Role],
    low_op: impl Fn(Role, &proto::NodeProto) -> bool,
) -> HashSet<String> {
    let outputs: HashSet<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
    let low_nodes = || {
        graph
            .node
            .iter()
            .zip(roles)
            .map(|(n, &r)| (n, low_op(r, n)))
    };
    graph
        .input
        .iter()
        .filter(|i| input_dtype(i) == Some(DType::F32))
        .filter_map(|i| {
            let module = i.name.strip_prefix(CACHE_INPUT_PREFIX)?;
            let out = format!("{CACHE_OUTPUT_PREFIX}{module}");
            outputs
                .contains(out.as_str())
                .then_some((i.name.as_str(), out))
        })
        .filter(|(name, out)| {
            let mut readers = low_nodes()
                .filter(|(n, _)| n.input.iter().any(|x| x == name))
                .peekable();
            let written_low = low_nodes().any(|(n, low)| low && n.output.contains(out));
            written_low && readers.peek().is_some() && readers.all(|(_, low)| low)
        })
        .map(|(name, _)| name.to_string())
        .collect()
}

/// The f32 LoRA factor inputs whose every reader but `Shape` computes in the low type
/// (`low_op`): the ones [`Lowering::low_factors`] types low.
fn factors_read_low(
    graph: &proto::GraphProto,
    roles: &[Role],
    low_op: impl Fn(Role, &proto::NodeProto) -> bool,
) -> HashSet<String> {
    graph
        .input
        .iter()
        .filter(|i| input_dtype(i) == Some(DType::F32) && super::lora::is_factor(&i.name))
        .filter(|i| {
            let mut readers = graph
                .node
                .iter()
                .zip(roles)
                .filter(|(n, _)| n.input.contains(&i.name))
                .peekable();
            readers.peek().is_some() && readers.all(|(n, &r)| r == Role::AnyInput || low_op(r, n))
        })
        .map(|i| i.name.clone())
        .collect()
}

/// Declares a graph input or output of element type `t` (its shape untouched).
fn set_elem_type(v: &mut proto::ValueInfoProto, t: DType) {
    if let Some(proto::type_proto::Value::TensorType(tt)) =
        v.r#type.as_mut().and_then(|ty| ty.value.as_mut())
    {
        tt.elem_type = t.onnx_code();
    }
}

fn input_dtype(i: &proto::ValueInfoProto) -> Option<DType> {
    match i.r#type.as_ref()?.value.as_ref()? {
        proto::type_proto::Value::TensorType(t) => DType::from_onnx_code(t.elem_type),
    }
}

/// Weights stored f16/bf16 reach their Gemm through a `Cast` to f32 (`v2l-export
/// --weight-dtype`); the lowered graph reads them directly (and converts them if the stored
/// type is not the wanted one), so those Casts go.
fn unwrap_weight_casts(graph: &mut proto::GraphProto) {
    let casts: HashMap<String, (usize, String)> = super::edit::cast_initializers(graph)
        .into_iter()
        .map(|(out, (i, w))| (out.to_string(), (i, w.to_string())))
        .collect();
    let dtypes: HashMap<&str, i32> = graph
        .initializer
        .iter()
        .map(|t| (t.name.as_str(), t.data_type))
        .collect();
    let float = |code: Option<&i32>| {
        code.and_then(|c| DType::from_onnx_code(*c))
            .is_some_and(DType::is_float)
    };
    let casts: HashMap<String, (usize, String)> = casts
        .into_iter()
        .filter(|(_, (i, w))| {
            float(dtypes.get(w.as_str()))
                && graph
                    .node
                    .get(*i)
                    .and_then(cast_to)
                    .is_some_and(DType::is_float)
        })
        .collect();
    let outputs: HashSet<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
    let casts: HashMap<String, (usize, String)> = casts
        .into_iter()
        .filter(|(out, _)| !outputs.contains(out.as_str()))
        .collect();
    let removed: HashSet<usize> = casts.values().map(|(i, _)| *i).collect();
    for n in graph.node.iter_mut() {
        for x in n.input.iter_mut() {
            if let Some((_, w)) = casts.get(x.as_str()) {
                x.clone_from(w);
            }
        }
    }
    let mut i = 0;
    graph.node.retain(|_| {
        i += 1;
        !removed.contains(&(i - 1))
    });
}

/// Converts the named initializers of the model at `source` to their wanted types: big ones
/// into the external-data file `data`, small ones inline.
fn convert_initializers(
    source: &Path,
    data: &Path,
    convert: &[(String, DType)],
    done: &mut Lowered,
) -> Result<Vec<proto::TensorProto>, PassError> {
    let want: HashMap<&str, DType> = convert.iter().map(|(n, d)| (n.as_str(), *d)).collect();
    let names: Vec<String> = convert.iter().map(|(n, _)| n.clone()).collect();
    let mut file = DataFile::create(data)?;
    let mut inline = Vec::new();
    crate::write::for_each_initializer(source, &names, &mut |name, dtype, dims, bytes| {
        let to = want.get(name).copied().unwrap_or(dtype);
        let mut out = Vec::with_capacity(bytes.len() / dtype.size().max(1) * to.size());
        crate::dtype::convert_floats(&bytes, dtype, to, &mut out).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("`{name}`: cannot convert {dtype} to {to}"),
            )
        })?;
        done.converted += 1;
        done.bytes_before += bytes.len() as u64;
        done.bytes_after += out.len() as u64;
        if out.len() <= INLINE_MAX {
            inline.push(proto::TensorProto {
                name: name.into(),
                dims: dims.to_vec(),
                data_type: to.onnx_code(),
                raw_data: out,
                ..Default::default()
            });
            Ok(())
        } else {
            file.append(name.into(), to, dims.to_vec(), &out)
        }
    })
    .map_err(|e| PassError::Io {
        path: source.to_path_buf(),
        source: e,
    })?;
    let mut tensors = file.finish()?;
    tensors.extend(inline);
    Ok(tensors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::Attr;
    use crate::{save, ExternalData, Graph, TensorData};

    /// `y = softmax(rope(x·Wᵀ + b))` with a `rope` scope doing `h·c` (c an f32 input).
    fn model(dir: &Path, stored: DType) -> std::path::PathBuf {
        let mut g = Graph::new("t");
        let x = g.input("x", DType::F32, vec!["n".into(), 4.into()]);
        let c = g.input("c", DType::F32, vec!["n".into(), 4.into()]);
        let w: Vec<f32> = (0..16).map(|v| v as f32 / 7.0 - 1.0).collect();
        let mut bytes = Vec::new();
        crate::dtype::convert_floats(bytemuck::cast_slice(&w), DType::F32, stored, &mut bytes)
            .unwrap();
        let w = g.initializer("lin.weight", stored, vec![4, 4], TensorData::Owned(bytes));
        let w = if stored == DType::F32 {
            w
        } else {
            g.cast(&w, DType::F32)
        };
        let b = g.const_f32(&[0.5, -0.5, 0.25, 0.0], &[4]);
        let h = g.scoped("lin", |g| g.linear(&x, &w, Some(&b), 4));
        let r = g.scoped("blk.rope", |g| g.mul(&h, &c));
        let y = g.softmax(&r, -1);
        let two = g.scalar(2.0);
        let y = g.mul(&y, &two);
        g.output(&y, "y", DType::F32, vec!["n".into(), 4.into()]);
        let p = dir.join("m.onnx");
        save(&g, &p, ExternalData::Always).unwrap();
        p
    }

    fn lowered(stored: DType, emulate: bool) -> (ModelProto, Lowered) {
        let d = tempfile::tempdir().unwrap();
        let src = model(d.path(), stored);
        let mut m = crate::read_model(&src).unwrap();
        let how = Lowering {
            dtype: DType::BF16,
            emulate,
            low_caches: false,
            low_factors: false,
            low_gelu: false,
            half_attention: false,
            half_gelu: false,
        };
        let data = d.path().join("low.data");
        let done = lower_precision(&mut m, &src, WeightFile::Write(&data), how).unwrap();
        // A second graph of the same weights reuses the entries, converting nothing.
        let mut again = crate::read_model(&src).unwrap();
        let reused = lower_precision(&mut again, &src, WeightFile::Reuse(&done.tensors), how);
        assert_eq!(reused.unwrap().converted, 0);
        assert_eq!(again, m);
        (m, done)
    }

    fn init_dtype(m: &ModelProto, name: &str) -> Option<DType> {
        let g = m.graph.as_ref().unwrap();
        let t = g.initializer.iter().find(|t| t.name == name)?;
        DType::from_onnx_code(t.data_type)
    }

    fn node<'m>(m: &'m ModelProto, op: &str) -> Vec<&'m proto::NodeProto> {
        let g = m.graph.as_ref().unwrap();
        g.node.iter().filter(|n| n.op_type == op).collect()
    }

    #[test]
    fn typed_graph_has_low_weights_f32_islands_and_f32_io() {
        let (m, done) = lowered(DType::F32, false);
        assert_eq!(init_dtype(&m, "lin.weight"), Some(DType::BF16));
        // The Gemm reads the weight directly, its x through a Cast to bf16 (before the Flatten).
        let gemm = node(&m, "Gemm")[0];
        assert_eq!(gemm.input[1], "lin.weight");
        assert_eq!(node(&m, "Flatten")[0].input, ["x.bf16"]);
        // rope (h·c) and softmax are f32 islands; the scalar after softmax is bf16 again.
        assert_eq!(done.f32_nodes, 2);
        let casts = node(&m, "Cast");
        let to = |n: &proto::NodeProto| cast_to(n).unwrap();
        // x→bf16, h→f32 (rope), softmax out→bf16, y→f32 at the output.
        assert_eq!(
            casts.iter().map(|c| to(c)).collect::<Vec<_>>(),
            [DType::BF16, DType::F32, DType::BF16, DType::F32]
        );
        let g = m.graph.as_ref().unwrap();
        let last = g.node.last().unwrap();
        assert_eq!(
            (last.op_type.as_str(), last.output[0].as_str()),
            ("Cast", "y")
        );
    }

    #[test]
    fn emulated_graph_computes_f32_and_rounds_every_output() {
        let (m, _) = lowered(DType::F32, true);
        // Weights stay bf16 in memory; the Gemm reads them widened and its output is rounded.
        assert_eq!(init_dtype(&m, "lin.weight"), Some(DType::BF16));
        let gemm = node(&m, "Gemm")[0];
        assert!(
            gemm.input.iter().all(|x| x.ends_with(".f32")),
            "{:?}",
            gemm.input
        );
        // Data movement runs in bf16 on the CPU too.
        assert_eq!(node(&m, "Flatten")[0].input, ["x.bf16"]);
        let g = m.graph.as_ref().unwrap();
        let rounds: Vec<_> = g
            .node
            .iter()
            .filter(|n| n.name.ends_with("/Round"))
            .collect();
        // The Gemm and the final Mul compute (rounded); the islands do not round.
        assert_eq!(rounds.len(), 2);
        assert!(rounds.iter().all(|n| cast_to(n) == Some(DType::BF16)));
    }

    /// Where [`causal`]'s cache meets an f32 node (a `group_norm` scope, f32 below f32).
    #[derive(Clone, Copy)]
    enum Island {
        None,
        /// An f32 node reads the cache.
        Reader,
        /// The cache output is written by an f32 node.
        Writer,
    }

    /// A causal conv as the VAE export writes it, its cache read by `Where`.
    fn causal(dir: &Path, island: Island) -> std::path::PathBuf {
        let mut g = Graph::new("causal");
        let dims = || vec![1.into(), 2.into(), "t".into(), 4.into(), 4.into()];
        let x = g.input("x", DType::F32, dims());
        let first = g.input("first_batch", DType::Bool, vec![1.into()]);
        let cache = g.input("cache_in.conv", DType::F32, dims());
        let w = g.const_f32(&[0.1; 2 * 2 * 27], &[2, 2, 3, 3, 3]);
        let b = g.const_f32(&[0.5, -0.5], &[2]);
        let x0 = g.slice(&x, 2, 0, 1);
        let replicated = g.concat(&[&x0, &x0], 2);
        let pad = g.op("Where", &[&first, &replicated, &cache], vec![]);
        let padded = g.concat(&[&pad, &x], 2);
        let cache_out = g.slice(&padded, 2, -2, i64::MAX);
        let y = g.op(
            "Conv",
            &[&padded, &w, &b],
            vec![
                ("kernel_shape", Attr::Ints(vec![3, 3, 3])),
                ("pads", Attr::Ints(vec![0, 1, 1, 0, 1, 1])),
            ],
        );
        let y = match island {
            Island::Reader => {
                let m = g.scoped("norm.group_norm", |g| g.mul(&cache, &cache));
                let s = g.op("ReduceSum", &[&m], vec![("keepdims", Attr::Int(1))]);
                g.add(&y, &s)
            }
            _ => y,
        };
        g.output(&y, "y", DType::F32, vec![]);
        // The output's own node (an `Identity`) in an f32 scope: the cache is written f32.
        let scope = match island {
            Island::Writer => "norm.group_norm",
            _ => "out",
        };
        g.scoped(scope, |g| {
            g.output(&cache_out, "cache_out.conv", DType::F32, dims());
        });
        let p = dir.join("causal.onnx");
        save(&g, &p, ExternalData::Always).unwrap();
        p
    }

    fn declared(vs: &[proto::ValueInfoProto], name: &str) -> Option<DType> {
        input_dtype(vs.iter().find(|v| v.name == name)?)
    }

    #[test]
    fn low_caches_are_carried_in_the_low_type_without_casts() {
        let d = tempfile::tempdir().unwrap();
        let lower = |island: Island, emulate: bool, low_caches: bool| {
            let src = causal(d.path(), island);
            let mut m = crate::read_model(&src).unwrap();
            let how = Lowering {
                dtype: DType::BF16,
                emulate,
                low_caches,
                low_factors: false,
                low_gelu: false,
                half_attention: false,
                half_gelu: false,
            };
            lower_precision(
                &mut m,
                &src,
                WeightFile::Write(&d.path().join("w.data")),
                how,
            )
            .unwrap();
            m.graph.unwrap()
        };
        let g = lower(Island::None, false, true);
        let bf16 = Some(DType::BF16);
        assert_eq!(declared(&g.input, "cache_in.conv"), bf16);
        assert_eq!(declared(&g.output, "cache_out.conv"), bf16);
        // The main input and output keep the runtime's f32; nothing casts the cache.
        assert_eq!(declared(&g.input, "x"), Some(DType::F32));
        assert_eq!(declared(&g.output, "y"), Some(DType::F32));
        for n in &g.node {
            let casts_cache = n.op_type == "Cast"
                && (n.input[0].starts_with("cache_") || n.output[0].starts_with("cache_"));
            assert!(!casts_cache, "{} casts a cache", n.name);
        }
        // Without the option, in the CPU form, or where an f32 node reads or writes the cache:
        // f32 caches, both sides.
        for (island, emulate, low) in [
            (Island::None, false, false),
            (Island::None, true, true),
            (Island::Reader, false, true),
            (Island::Writer, false, true),
        ] {
            let g = lower(island, emulate, low);
            assert_eq!(declared(&g.input, "cache_in.conv"), Some(DType::F32));
            assert_eq!(declared(&g.output, "cache_out.conv"), Some(DType::F32));
        }
    }

    #[test]
    fn low_factors_are_given_in_the_low_type_and_the_scale_stays_f32() {
        let d = tempfile::tempdir().unwrap();
        let src = model(d.path(), DType::F32);
        let mut branched = crate::read_model(&src).unwrap();
        crate::passes::add_lora_branches(&mut branched, &["lin.weight".to_string()]).unwrap();
        let src = d.path().join("branched.onnx");
        crate::write_model(&src, &branched).unwrap();
        let lower = |emulate: bool, low_factors: bool| {
            let mut m = crate::read_model(&src).unwrap();
            let how = Lowering {
                dtype: DType::BF16,
                emulate,
                low_caches: false,
                low_factors,
                low_gelu: false,
                half_attention: false,
                half_gelu: false,
            };
            let data = d.path().join(format!("w{emulate}{low_factors}.data"));
            lower_precision(&mut m, &src, WeightFile::Write(&data), how).unwrap();
            m.graph.unwrap()
        };
        let casts_of = |g: &proto::GraphProto, x: &str| {
            g.node
                .iter()
                .filter(|n| n.op_type == "Cast" && n.input.first().is_some_and(|i| i == x))
                .count()
        };
        for emulate in [false, true] {
            let g = lower(emulate, true);
            for f in ["lin.lora_A", "lin.lora_B"] {
                assert_eq!(declared(&g.input, f), Some(DType::BF16), "{f}");
                assert_eq!(casts_of(&g, f), 0, "{f} is cast in the graph");
            }
            assert_eq!(declared(&g.input, "lin.lora_scale"), Some(DType::F32));
            assert_eq!(declared(&g.input, "x"), Some(DType::F32));
            // Without the option, the graph rounds them itself.
            let g = lower(emulate, false);
            for f in ["lin.lora_A", "lin.lora_B"] {
                assert_eq!(declared(&g.input, f), Some(DType::F32), "{f}");
                assert_eq!(casts_of(&g, f), 1, "{f}");
            }
        }
    }

    #[test]
    fn bf16_stored_weights_are_used_as_stored() {
        let (m, done) = lowered(DType::BF16, false);
        assert_eq!(init_dtype(&m, "lin.weight"), Some(DType::BF16));
        // Only the bias and the scalar were converted; the stored weight's Cast is gone.
        assert_eq!(done.converted, 2);
        assert_eq!(node(&m, "Gemm")[0].input[1], "lin.weight");
    }
}
