//! int8 linears on CPUs with AVX512-VNNI: our ONNX Runtime operator `ai.v2l.QMatMul`.
//!
//! An int8 engine's linears are `com.microsoft.DynamicQuantizeMatMul`: activations quantised
//! to u8 per tensor on the fly, weights s8 per output channel. ONNX Runtime's u8·s8 GEMM behind
//! it ran at 1.1–1.2 TOP/s at the DiT's shapes on a 2-core AVX-512 VNNI CPU, about 55 % of
//! `vpdpbusd`'s peak, and it is about 60 % of an int8 DiT step. This operator computes the same
//! thing (the same quantisation of the activations, the same integer products, `y = (acc − zp
//! · Σk b) · a_scale · b_scale + bias`) with a register-blocked `vpdpbusd` kernel.
//!
//! `v2l-compile` places it for CPU engines whose weights are s8 (`int8_scheme: "u8s8"`, chosen
//! where the CPU sums u8·s8 in int32: VNNI), beside `ai.v2l.Attention`; the `.ort` twin graphs
//! keep `DynamicQuantizeMatMul`. Inputs: `x [..., K]` f32, `B [K, N]` s8, `scale [N]` f32,
//! optional `bias [N]` f32; output `[..., N]` f32.
//!
//! Layout: B is packed per call (into a buffer kept between calls) into panels of 64
//! columns, each `[K/4][64][4]` (four consecutive inputs of one output per 32-bit lane); a
//! 6 × 64 tile of outputs lives in 24 registers while it runs over K.

// Hot loops index buffers whose sizes are fixed by the shapes checked in `QMatMulKernel`.
#![allow(clippy::indexing_slicing)]

use std::sync::Mutex;

use ort::operator::{
    ComputeContext, Kernel as OrtKernel, KernelContext, Operator, OperatorInput, OperatorOutput,
    ShapeInferenceContext,
};
use ort::value::{TensorElementType, ValueType};

use crate::attention::{Out, ParFor};

/// The operator's name in the `ai.v2l` domain.
pub const OP: &str = "QMatMul";

/// Output rows per register tile.
const MR: usize = 6;
/// Output columns per register tile and packed panel (four 16-lane registers).
const NR: usize = 64;
/// Rows per task.
const MC: usize = 48;
/// Panels per task (1,024 columns).
const PANELS_PER_TASK: usize = 16;
/// Groups of four inputs per pass over K (3,072 inputs): longer Ks are summed in passes.
const KC4: usize = 768;

/// Whether this CPU runs the `vpdpbusd` kernel.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vnni");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The activations' quantisation as `DynamicQuantizeMatMul` computes it: the range of `x`
/// widened to include 0, split in 255 steps; the zero point rounded half to even.
pub fn quant_params(min: f32, max: f32) -> (f32, u8) {
    let (min, max) = (min.min(0.0), max.max(0.0));
    let scale = if max == min { 1.0 } else { (max - min) / 255.0 };
    let zp = (0.0 - min / scale).clamp(0.0, 255.0).round_ties_even();
    (scale, zp as u8)
}

/// `round_half_even(x / scale) + zp`, saturated to u8, for each of `x`.
fn quantize(x: &[f32], scale: f32, zp: u8, out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: AVX-512 (F, BW) was detected.
        return unsafe { avx512::quantize(x, scale, zp, out) };
    }
    quantize_portable(x, scale, zp, out)
}

fn quantize_portable(x: &[f32], scale: f32, zp: u8, out: &mut [u8]) {
    let (lo, hi) = (-f32::from(zp), 255.0 - f32::from(zp));
    for (o, &v) in out.iter_mut().zip(x) {
        *o = ((v / scale).clamp(lo, hi).round_ties_even() + f32::from(zp)) as u8;
    }
}

/// The smallest and largest of `x` (±infinity when empty).
fn range(x: &[f32]) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: AVX-512 F was detected.
        return unsafe { avx512::range(x) };
    }
    range_portable(x)
}

fn range_portable(x: &[f32]) -> (f32, f32) {
    x.iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        })
}

/// The activations' passes, 16 values at a time.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn quantize(x: &[f32], scale: f32, zp: u8, out: &mut [u8]) {
        let n = x.len().min(out.len());
        let (lo, hi) = (-f32::from(zp), 255.0 - f32::from(zp));
        let (s, l, h) = (
            _mm512_set1_ps(scale),
            _mm512_set1_ps(lo),
            _mm512_set1_ps(hi),
        );
        let z = _mm512_set1_epi32(i32::from(zp));
        let mut i = 0;
        while i + 16 <= n {
            let v = _mm512_div_ps(_mm512_loadu_ps(x.as_ptr().add(i)), s);
            let v = _mm512_min_ps(_mm512_max_ps(v, l), h);
            // The default rounding mode: to nearest, ties to even.
            let q = _mm512_add_epi32(_mm512_cvtps_epi32(v), z);
            _mm_storeu_si128(out.as_mut_ptr().add(i).cast(), _mm512_cvtusepi32_epi8(q));
            i += 16;
        }
        super::quantize_portable(&x[i..n], scale, zp, &mut out[i..n]);
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn range(x: &[f32]) -> (f32, f32) {
        let (mut lo, mut hi) = (
            _mm512_set1_ps(f32::INFINITY),
            _mm512_set1_ps(f32::NEG_INFINITY),
        );
        let mut i = 0;
        while i + 16 <= x.len() {
            let v = _mm512_loadu_ps(x.as_ptr().add(i));
            lo = _mm512_min_ps(lo, v);
            hi = _mm512_max_ps(hi, v);
            i += 16;
        }
        let (l, h) = super::range_portable(&x[i..]);
        (
            _mm512_reduce_min_ps(lo).min(l),
            _mm512_reduce_max_ps(hi).max(h),
        )
    }
}

/// B `[K, N]` packed into panels of [`NR`] columns, `[K/4][NR][4]` each, zero-padded, with
/// each column's sum (for the activations' zero point).
pub struct Packed {
    data: Vec<i8>,
    colsum: Vec<i32>,
    k: usize,
    n: usize,
    k4: usize,
}

impl Packed {
    pub const fn empty() -> Packed {
        Packed {
            data: Vec::new(),
            colsum: Vec::new(),
            k: 0,
            n: 0,
            k4: 0,
        }
    }

    pub fn new(b: &[i8], k: usize, n: usize) -> Packed {
        let mut p = Packed::empty();
        p.fill(b, k, n);
        p
    }

    /// Packs `b` into this buffer, reusing its memory.
    pub fn fill(&mut self, b: &[i8], k: usize, n: usize) {
        let k4 = k.div_ceil(4);
        let panels = n.div_ceil(NR);
        // Whole panels and groups of four overwrite every byte below; otherwise the padding
        // must be zeros.
        if n % NR != 0 || k % 4 != 0 {
            self.data.clear();
        }
        self.data.resize(panels * k4 * NR * 4, 0);
        self.colsum.clear();
        self.colsum.resize(n, 0);
        (self.k, self.n, self.k4) = (k, n, k4);
        for row in b.chunks_exact(n).take(k) {
            for (s, &w) in self.colsum.iter_mut().zip(row) {
                *s += i32::from(w);
            }
        }
        // Four rows × 16 columns at a time: a byte transpose into 16 groups of four.
        let full = if n % 16 == 0 { k / 4 } else { 0 };
        for t in 0..full {
            let rows: [&[i8]; 4] =
                std::array::from_fn(|j| &b[(4 * t + j) * n..(4 * t + j + 1) * n]);
            for c in (0..n).step_by(16) {
                let (p, cc) = (c / NR, c % NR);
                let at = ((p * k4 + t) * NR + cc) * 4;
                interleave4(rows.map(|r| &r[c..c + 16]), &mut self.data[at..at + 64]);
            }
        }
        for kk in 4 * full..k {
            let (t, j) = (kk / 4, kk % 4);
            for (col, &w) in b[kk * n..(kk + 1) * n].iter().enumerate() {
                let (p, c) = (col / NR, col % NR);
                self.data[((p * k4 + t) * NR + c) * 4 + j] = w;
            }
        }
    }

    fn panel(&self, p: usize) -> &[i8] {
        &self.data[p * self.k4 * NR * 4..(p + 1) * self.k4 * NR * 4]
    }
}

/// `out[4c + j] = rows[j][c]` for 16 columns `c` and four rows `j`.
fn interleave4(rows: [&[i8]; 4], out: &mut [i8]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        // SAFETY: SSE2 is part of x86-64; each row holds 16 bytes and `out` 64 (slices above).
        unsafe {
            let r = rows.map(|r| _mm_loadu_si128(r.as_ptr().cast()));
            let (a, b) = (_mm_unpacklo_epi8(r[0], r[1]), _mm_unpackhi_epi8(r[0], r[1]));
            let (c, d) = (_mm_unpacklo_epi8(r[2], r[3]), _mm_unpackhi_epi8(r[2], r[3]));
            let o = out.as_mut_ptr();
            _mm_storeu_si128(o.cast(), _mm_unpacklo_epi16(a, c));
            _mm_storeu_si128(o.add(16).cast(), _mm_unpackhi_epi16(a, c));
            _mm_storeu_si128(o.add(32).cast(), _mm_unpacklo_epi16(b, d));
            _mm_storeu_si128(o.add(48).cast(), _mm_unpackhi_epi16(b, d));
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    for c in 0..16 {
        for j in 0..4 {
            out[4 * c + j] = rows[j][c];
        }
    }
}

/// The quantised activations: rows padded to a multiple of [`MR`], each `4·K/4` wide.
struct Activations<'a> {
    q: &'a [u8],
    rows: usize,
    lda: usize,
    zp: u8,
}

thread_local! {
    /// One task's int32 sums, kept between tasks on each pool thread.
    static ACC: std::cell::RefCell<Vec<i32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `out[m, n] = (Σk a[m, k]·b[k, n] − zp·Σk b[k, n]) · mult[n] + bias[n]`, tasks spread by
/// `par` over (1,024-column, 48-row) tiles.
fn gemm(
    a: &Activations<'_>,
    b: &Packed,
    mult: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
    par: ParFor<'_>,
) {
    let n = b.n;
    let chunks = n.div_ceil(NR * PANELS_PER_TASK);
    let blocks = a.rows.div_ceil(MC);
    let dst = Out(out.as_mut_ptr());
    let dst = &dst;
    let vnni = available();
    let task = |i: usize| {
        let (chunk, block) = (i / blocks, i % blocks);
        let (c0, c1) = (
            chunk * NR * PANELS_PER_TASK,
            ((chunk + 1) * NR * PANELS_PER_TASK).min(n),
        );
        let (r0, r1) = (block * MC, ((block + 1) * MC).min(a.rows));
        let width = (c1 - c0).div_ceil(NR) * NR;
        ACC.with_borrow_mut(|acc| {
            acc.resize(MC * width, 0);
            for p in 0..width / NR {
                let panel = b.panel(c0 / NR + p);
                let mut t0 = 0;
                while t0 < b.k4 {
                    let t1 = (t0 + KC4).min(b.k4);
                    for r in (r0..r1.next_multiple_of(MR)).step_by(MR) {
                        let sums = &mut acc[(r - r0) * width + p * NR..];
                        let tile = Tile {
                            rows: &a.q[r * a.lda..(r + MR) * a.lda],
                            lda: a.lda,
                            panel,
                            t0,
                            t1,
                            ldc: width,
                            first: t0 == 0,
                        };
                        #[cfg(target_arch = "x86_64")]
                        if vnni {
                            // SAFETY: VNNI was detected; the rows, the panel and the sums hold what
                            // `vnni::tile` reads and writes (MR rows, t1 groups, MR rows of width).
                            unsafe { vnni::tile(&tile, sums) };
                            continue;
                        }
                        let _ = vnni;
                        portable_tile(&tile, sums);
                    }
                    t0 = t1;
                }
            }
            for r in r0..r1 {
                let row = &acc[(r - r0) * width..];
                // SAFETY: row `r < rows` and columns `c0..c1 ≤ n` of `out` belong to this task only.
                let y = unsafe { std::slice::from_raw_parts_mut(dst.0.add(r * n + c0), c1 - c0) };
                let zp = i32::from(a.zp);
                let sums = row[..c1 - c0].iter().zip(&b.colsum[c0..c1]);
                let scaled = sums
                    .zip(&mult[c0..c1])
                    .map(|((&s, &cs), &m)| (s - zp * cs) as f32 * m);
                match bias {
                    Some(bias) => {
                        for ((y, v), &b) in y.iter_mut().zip(scaled).zip(&bias[c0..c1]) {
                            *y = v + b;
                        }
                    }
                    None => y.iter_mut().zip(scaled).for_each(|(y, v)| *y = v),
                }
            }
        });
    };
    par(chunks * blocks, &task);
}

/// One register tile's work: [`MR`] rows of the activations (`lda` bytes apart) by one panel
/// of B over groups `t0..t1`, into sums `ldc` apart (added to them unless `first`).
struct Tile<'a> {
    rows: &'a [u8],
    lda: usize,
    panel: &'a [i8],
    t0: usize,
    t1: usize,
    ldc: usize,
    first: bool,
}

/// A [`Tile`] in plain integer arithmetic.
fn portable_tile(t: &Tile<'_>, sums: &mut [i32]) {
    for r in 0..MR {
        for c in 0..NR {
            let mut s = if t.first { 0 } else { sums[r * t.ldc + c] };
            for g in t.t0..t.t1 {
                for j in 0..4 {
                    s += i32::from(t.rows[r * t.lda + 4 * g + j])
                        * i32::from(t.panel[(g * NR + c) * 4 + j]);
                }
            }
            sums[r * t.ldc + c] = s;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use std::arch::x86_64::*;

    use super::{Tile, MR, NR};

    /// A [`Tile`] in 6 rows × 4 registers of 16 sums, one `vpdpbusd` each per group of four
    /// inputs.
    ///
    /// # Safety
    /// AVX512-F/BW/VNNI; `t.rows` holds MR rows of `lda ≥ 4·t1` bytes, `t.panel` t1 groups of
    /// NR·4, `sums` MR rows of `ldc ≥ NR`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn tile(t: &Tile<'_>, sums: &mut [i32]) {
        let (lda, ldc, t0, t1) = (t.lda, t.ldc, t.t0, t.t1);
        // The bounds the raw loads and stores below rely on (a handful of compares a tile).
        assert!(
            t.rows.len() >= (MR - 1) * lda + 4 * t1
                && t.panel.len() >= t1 * NR * 4
                && sums.len() >= (MR - 1) * ldc + NR
                && lda >= 4 * t1
                && ldc >= NR
        );
        let c = sums.as_mut_ptr();
        let mut acc = [_mm512_setzero_si512(); MR * 4];
        if !t.first {
            for r in 0..MR {
                for j in 0..4 {
                    acc[r * 4 + j] = _mm512_loadu_si512(c.add(r * ldc + 16 * j).cast());
                }
            }
        }
        let a = t.rows.as_ptr();
        let mut bp = t.panel.as_ptr().add(t0 * NR * 4);
        for g in t0..t1 {
            let b = [0, 1, 2, 3].map(|j| _mm512_loadu_si512(bp.add(64 * j).cast()));
            for r in 0..MR {
                let av = _mm512_set1_epi32(a.add(r * lda + 4 * g).cast::<i32>().read_unaligned());
                for j in 0..4 {
                    acc[r * 4 + j] = _mm512_dpbusd_epi32(acc[r * 4 + j], av, b[j]);
                }
            }
            bp = bp.add(NR * 4);
        }
        for r in 0..MR {
            for j in 0..4 {
                _mm512_storeu_si512(c.add(r * ldc + 16 * j).cast(), acc[r * 4 + j]);
            }
        }
    }
}

/// Scratch for the quantised activations, kept between calls (no fresh pages per linear); a
/// call that finds it taken uses its own.
static SCRATCH: Mutex<Vec<u8>> = Mutex::new(Vec::new());

/// One linear: `x [M, K]` → `out [M, N]`.
pub fn linear(
    x: &[f32],
    b: &Packed,
    scale: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
    par: ParFor<'_>,
) -> Result<(), String> {
    let (k, n) = (b.k, b.n);
    if k == 0 || x.len() % k != 0 {
        return Err(format!("input of {} values is not rows of {k}", x.len()));
    }
    let m = x.len() / k;
    if out.len() != m * n
        || !(scale.len() == n || scale.len() == 1)
        || bias.is_some_and(|b| b.len() != n)
    {
        return Err(format!(
            "{m}×{k} by {k}×{n}: output {}, scale {}, bias {:?} do not fit",
            out.len(),
            scale.len(),
            bias.map(<[f32]>::len)
        ));
    }
    // The range, then the codes, in parallel over row blocks.
    let blocks = m.div_ceil(MC).max(1);
    let ranges: Vec<Mutex<(f32, f32)>> = (0..blocks)
        .map(|_| Mutex::new((f32::INFINITY, f32::NEG_INFINITY)))
        .collect();
    par(blocks, &|i| {
        let r = range(&x[i * MC * k..((i + 1) * MC * k).min(x.len())]);
        if let Ok(mut slot) = ranges[i].lock() {
            *slot = r;
        }
    });
    let (lo, hi) = ranges
        .iter()
        .filter_map(|r| r.lock().ok().map(|r| *r))
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), (c, d)| {
            (a.min(c), b.max(d))
        });
    let (a_scale, zp) = quant_params(lo, hi);
    let lda = b.k4 * 4;
    let rows = m.next_multiple_of(MR);
    let mut own = Vec::new();
    let mut shared = SCRATCH.try_lock().ok();
    let q = match shared.as_deref_mut() {
        Some(v) => v,
        None => &mut own,
    };
    // Every byte is written below (codes, then zeros in the padding), so the buffer is only
    // grown, not cleared: no pass over it beyond the codes.
    q.resize(rows * lda, 0);
    q[m * lda..].fill(0);
    {
        // Each task writes its own rows.
        let dst = Out(q.as_mut_ptr());
        let dst = &dst;
        par(blocks, &|i| {
            for r in i * MC..((i + 1) * MC).min(m) {
                // SAFETY: row `r < m ≤ rows` of `q` (`lda ≥ k` bytes) is this task's alone.
                let row = unsafe { std::slice::from_raw_parts_mut(dst.0.add(r * lda), lda) };
                let (codes, pad) = row.split_at_mut(k);
                quantize(&x[r * k..(r + 1) * k], a_scale, zp, codes);
                pad.fill(0);
            }
        });
    }
    let mult: Vec<f32> = (0..n)
        .map(|c| a_scale * scale[if scale.len() == 1 { 0 } else { c }])
        .collect();
    let a = Activations {
        q,
        rows: m,
        lda,
        zp,
    };
    gemm(&a, b, &mult, bias, out, par);
    Ok(())
}

/// The operator, for the session's `ai.v2l` domain.
pub(crate) struct QMatMulOp;

pub(crate) struct QMatMulKernel;

/// The packed weights of the running call, kept between calls: packing per call costs about
/// 1 % of a GEMM, keeping every layer's packed copy would double the weights' memory (ONNX
/// Runtime keeps its own copy of a custom operator's initializers).
static PACKED: Mutex<Packed> = Mutex::new(Packed::empty());

/// `[K, N]` from a weight shape.
fn kn(shape: &[i64]) -> ort::Result<(usize, usize)> {
    match *shape {
        [k, n] if k > 0 && n > 0 => Ok((k as usize, n as usize)),
        _ => Err(ort::Error::new(format!(
            "ai.v2l.QMatMul takes weights [K, N]; got {shape:?}"
        ))),
    }
}

impl Operator for QMatMulOp {
    type Kernel<'attr> = QMatMulKernel;

    fn name(&self) -> &str {
        OP
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        [
            OperatorInput::required(TensorElementType::Float32),
            OperatorInput::required(TensorElementType::Int8),
            OperatorInput::required(TensorElementType::Float32),
            OperatorInput::optional(TensorElementType::Float32),
        ]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [OperatorOutput::required(TensorElementType::Float32)]
    }

    /// The output is the input's shape with its last dimension the weights' N.
    fn infer_shape(&self, ctx: &mut ShapeInferenceContext) -> ort::Result<()> {
        let inputs = ctx.inputs();
        let (
            Some(ValueType::Tensor {
                ty,
                shape,
                dimension_symbols,
            }),
            Some(ValueType::Tensor { shape: ws, .. }),
        ) = (inputs.first(), inputs.get(1))
        else {
            return Err(ort::Error::new("ai.v2l.QMatMul: needs tensor inputs"));
        };
        let mut shape = shape.clone();
        if let (Some(last), Some(&n)) = (shape.last_mut(), ws.get(1)) {
            *last = n;
        }
        // The last dimension is N now, not whatever the input's was called.
        let mut names: Vec<String> = dimension_symbols.iter().cloned().collect();
        if let Some(last) = names.last_mut() {
            last.clear();
        }
        let symbols = crate::attention::named(&shape, &names);
        let out = ValueType::Tensor {
            ty: *ty,
            shape,
            dimension_symbols: symbols,
        };
        ctx.set_output(0, &out)
    }

    fn create_kernel<'attr>(&self, _: &KernelContext<'attr>) -> ort::Result<QMatMulKernel> {
        Ok(QMatMulKernel)
    }
}

impl OrtKernel for QMatMulKernel {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let input = |i: usize| {
            ctx.input(i)?
                .ok_or_else(|| ort::Error::new(format!("ai.v2l.QMatMul: input {i} missing")))
        };
        let (x, w, s) = (input(0)?, input(1)?, input(2)?);
        let bias = ctx.input(3)?;
        let (xs, xd) = x.try_extract_tensor::<f32>()?;
        let (ws, wd) = w.try_extract_tensor::<i8>()?;
        let (_, sd) = s.try_extract_tensor::<f32>()?;
        let bd = match &bias {
            Some(b) => Some(b.try_extract_tensor::<f32>()?.1),
            None => None,
        };
        let (k, n) = kn(ws)?;
        if wd.len() != k * n {
            return Err(ort::Error::new(format!(
                "ai.v2l.QMatMul: weights {ws:?} hold {} values",
                wd.len()
            )));
        }
        if xs.last().copied() != Some(k as i64) {
            return Err(ort::Error::new(format!(
                "ai.v2l.QMatMul: input {xs:?} does not end in the weights' K = {k}"
            )));
        }
        let mut own = Packed::empty();
        let mut shared = PACKED.try_lock().ok();
        let packed = match shared.as_deref_mut() {
            Some(p) => p,
            None => &mut own,
        };
        packed.fill(wd, k, n);
        let mut shape = xs.to_vec();
        if let Some(last) = shape.last_mut() {
            *last = n as i64;
        }
        let mut o = ctx
            .output(0, shape)?
            .ok_or_else(|| ort::Error::new("ai.v2l.QMatMul: output missing"))?;
        let (_, od) = o.try_extract_tensor_mut::<f32>()?;
        let stop = crate::stop::flag();
        let par = |n: usize, f: &(dyn Fn(usize) + Sync)| crate::attention::on_pool(ctx, n, f);
        linear(xd, packed, sd, bd, od, &par)
            .map_err(|e| ort::Error::new(format!("ai.v2l.QMatMul: {e}")))?;
        crate::stop::check(&stop, "ai.v2l.QMatMul")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serial(n: usize, f: &(dyn Fn(usize) + Sync)) {
        (0..n).for_each(f);
    }

    /// The same integer products and the same affine map as `DynamicQuantizeMatMul`, on odd
    /// shapes (K not a multiple of 4, N not of 64, M not of 6), against a plain reference.
    #[test]
    fn qmatmul_is_the_dynamic_int8_linear() {
        // One packing buffer for every shape, as the operator reuses its own.
        let mut b = Packed::empty();
        for (m, k, n) in [
            (13, 3072, 64),
            (1, 3, 1),
            (7, 70, 65),
            (50, 257, 130),
            (9, 259, 96),
            (5, 128, 128),
        ] {
            let mut s = 7u64;
            let mut rnd = || {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s
            };
            let x: Vec<f32> = (0..m * k)
                .map(|_| (rnd() % 2001) as f32 / 1000.0 - 0.7)
                .collect();
            let w: Vec<i8> = (0..k * n)
                .map(|_| ((rnd() % 255) as i32 - 127) as i8)
                .collect();
            let scale: Vec<f32> = (0..n).map(|c| 0.01 + c as f32 * 1e-4).collect();
            let bias: Vec<f32> = (0..n).map(|c| c as f32 * 0.1 - 1.0).collect();
            b.fill(&w, k, n);
            let mut got = vec![0f32; m * n];
            linear(&x, &b, &scale, Some(&bias), &mut got, &serial).unwrap();
            let lo = x.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let (sa, zp) = quant_params(lo, hi);
            let mut q = vec![0u8; m * k];
            quantize(&x, sa, zp, &mut q);
            for r in 0..m {
                for c in 0..n {
                    let acc: i32 = (0..k)
                        .map(|j| {
                            (i32::from(q[r * k + j]) - i32::from(zp)) * i32::from(w[j * n + c])
                        })
                        .sum();
                    let want = acc as f32 * (sa * scale[c]) + bias[c];
                    let g = got[r * n + c];
                    assert!(
                        (g - want).abs() <= 1e-5 * want.abs().max(1.0),
                        "{m}x{k}x{n} [{r},{c}]: {g} vs {want}"
                    );
                }
            }
        }
    }

    /// The portable tile (CPUs without VNNI) and the VNNI one (where this CPU has it) sum the
    /// same products, over a second pass of groups too; so do the portable and vector
    /// quantisation and range.
    #[test]
    fn every_tile_and_pass_agrees_with_plain_sums() {
        let (groups, lda, ldc) = (37, 4 * 37 + 8, NR + 16);
        let rows: Vec<u8> = (0..MR * lda).map(|i| (i * 37 % 256) as u8).collect();
        let panel: Vec<i8> = (0..groups * NR * 4)
            .map(|i| ((i * 91 % 255) as i32 - 127) as i8)
            .collect();
        let want: Vec<i32> = (0..MR * ldc)
            .map(|i| {
                let (r, c) = (i / ldc, i % ldc);
                if c >= NR {
                    return 7;
                }
                (0..4 * groups)
                    .map(|k| {
                        i32::from(rows[r * lda + k])
                            * i32::from(panel[((k / 4) * NR + c) * 4 + k % 4])
                    })
                    .sum()
            })
            .collect();
        let run = |f: &dyn Fn(&Tile<'_>, &mut [i32])| {
            let mut sums = vec![7i32; MR * ldc];
            // Two passes (groups 0..20, then 20..37), as a long K is summed.
            for (t0, t1) in [(0, 20), (20, groups)] {
                let tile = Tile {
                    rows: &rows,
                    lda,
                    panel: &panel,
                    t0,
                    t1,
                    ldc,
                    first: t0 == 0,
                };
                f(&tile, &mut sums);
            }
            sums
        };
        assert_eq!(run(&portable_tile), want);
        #[cfg(target_arch = "x86_64")]
        if available() {
            // SAFETY: VNNI detected; the buffers hold MR rows, `groups` groups, MR rows of ldc.
            assert_eq!(run(&|t, s| unsafe { vnni::tile(t, s) }), want);
        }
        let x: Vec<f32> = (0..1000)
            .map(|i| (i as f32 * 0.37).sin() * 3.0 - 0.5)
            .collect();
        let (lo, hi) = range(&x);
        assert_eq!((lo, hi), range_portable(&x));
        let (scale, zp) = quant_params(lo, hi);
        let (mut a, mut b) = (vec![0u8; x.len()], vec![0u8; x.len()]);
        quantize(&x, scale, zp, &mut a);
        quantize_portable(&x, scale, zp, &mut b);
        assert_eq!(a, b);
    }

    /// The quantisation's corner cases: a constant input, all-positive and all-negative ranges.
    #[test]
    fn quant_params_include_zero() {
        assert_eq!(quant_params(0.0, 0.0), (1.0, 0));
        assert_eq!(quant_params(1.0, 2.0), (2.0 / 255.0, 0));
        assert_eq!(quant_params(-2.0, -1.0), (2.0 / 255.0, 255));
        let (s, zp) = quant_params(-1.0, 3.0);
        assert_eq!((s, zp), (4.0 / 255.0, 64));
    }
}
