//! The LoRA fuse kernel: `W' = W + s·B·A` for one linear weight, in one streaming pass.
//!
//! `W` is `[out, in]` row-major in f32, f16 or bf16; `B` is `[out, r]`, `A` is `[r, in]`
//! (row-major f32) and `s` the LoRA scale. Two entry points share one inner loop:
//!
//! * [`fuse_in_place`]: `w += s·B·A`;
//! * [`fuse_from`]: `target = base + s·B·A` (reads `base`, writes `target`, one pass). This is
//!   what LoRA switching uses: going from LoRA X to LoRA Y rewrites every layer either of them
//!   touches from the base weights (a layer only X touched is restored with [`restore_from`]),
//!   so X → Y → X gives X's weights bitwise.
//!
//! # Arithmetic (the same on every code path, so results never depend on the machine)
//!
//! Per element, in f32, with separate multiplies and adds — never FMA: Rust does not contract
//! `a * b + c`, and the SIMD path uses `mul` then `add` too, so the portable and the AVX2 paths
//! give the same bits (FMA would round once less and differ in the last bit):
//!
//! ```text
//! c_k     = s * B[i,k]
//! d       = c_0 * A[0,j];  d = d + c_k * A[k,j]  for k = 1 .. r-1   (in this order)
//! W'[i,j] = round_T(upcast(W[i,j]) + d)                             (one rounding)
//! ```
//!
//! `round_T` is round-to-nearest-even: f16 by F16C `vcvtps2ph` or `half`'s conversion, bf16 by
//! `(bits + 0x7FFF + ((bits >> 16) & 1)) >> 16` with NaN kept NaN. `B·A` is never
//! materialised: at rank 1 the product is formed in registers; at rank > 1 a row is processed
//! in column chunks of [`CHUNK`], the chunk's `d` values in a 4 KiB f32 tile (L1).
//!
//! # Speed
//!
//! The layer is cut into blocks of whole rows (about 1 MiB of f32 each) handed out to
//! `threads` threads (`0`: all cores; a small layer uses fewer) through an atomic counter, so
//! a thread that loses its core to another process does not hold the others up.
//!
//! On x86_64 with AVX2 + F16C (detected at run time: the workspace builds for baseline x86_64)
//! the inner loop is explicit AVX2, 16 elements a step:
//! * [`fuse_from`] writes `target` with non-temporal (streaming) stores. `target` is never read,
//!   and a normal store would first read each line in (read-for-ownership): 3 memory
//!   transfers per element instead of 2. [`restore_from`] is a streaming copy for the same
//!   reason. The in-place path reads each line anyway and uses normal stores.
//! * A block is walked as one flat range in 16-element groups whose destination is 32-byte
//!   aligned, groups crossing a row boundary included, so every store is a whole aligned
//!   vector (a scalar store into a line that also gets streaming stores costs a
//!   read-for-ownership and a flush: rows whose length is not a multiple of the alignment
//!   ran at half speed). Only a block's unaligned first and last few elements are scalar.
//! * W is prefetched into L2 16 KiB ahead of the loads: the hardware prefetchers alone kept
//!   too few lines in flight per core (bf16 at in = 12288, where A also streams from L2,
//!   ran at 40 % of the copy speed without it, at par with it).
//! * bf16 is handled as even/odd lanes (`bits << 16` and `bits & 0xFFFF0000`), so that its
//!   conversions need no shuffles; at rank 1, A is split into its even and odd elements
//!   once per call to match. Its rounding skips the NaN lane mask when the factors are all
//!   finite (one pass over A and B per call), which is exact then (see `avx::bf16_round8`).
//!
//! bf16 and f16 cost more arithmetic per byte than f32: in L1 one core of the development
//! machine (Zen 4) does about 12 G bf16 and 14 G f16 elements/s, i.e. 48 and 56 GB/s of W
//! read + written, so with few cores and other processes on them they become compute-bound
//! before f32 does.
//!
//! Elsewhere a portable loop (auto-vectorised where the compiler can) gives the same bits.
//!
//! NaN/Inf in the factors are not checked here (not in the hot loop): callers run
//! [`check_finite`] once per LoRA. A NaN weight stays NaN; an overflow gives ±inf.

// The kernel indexes rows and tiles of buffers whose lengths `check_shapes` has verified
// against `[out, in]` and the rank on entry; checked access in its inner loops would cost
// bandwidth for nothing.
#![allow(clippy::indexing_slicing)]

pub use half::{bf16, f16};

/// A shape or dtype mismatch between a weight and its LoRA factors, or bad factor values.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FuseError {
    #[error("LoRA rank is 0")]
    ZeroRank,
    #[error("empty weight shape [{out}, {inp}]")]
    EmptyWeight { out: usize, inp: usize },
    #[error("weight shape [{out}, {inp}] overflows usize")]
    Overflow { out: usize, inp: usize },
    #[error("{which} has {len} elements, expected {expected} for shape [{out}, {inp}]")]
    WeightLen {
        which: &'static str,
        len: usize,
        expected: usize,
        out: usize,
        inp: usize,
    },
    #[error("LoRA B has {len} elements, expected {expected} for shape [{out}, {rank}]")]
    BLen {
        len: usize,
        expected: usize,
        out: usize,
        rank: usize,
    },
    #[error("LoRA A has {len} elements, expected {expected} for shape [{rank}, {inp}]")]
    ALen {
        len: usize,
        expected: usize,
        rank: usize,
        inp: usize,
    },
    #[error("dtype mismatch: base is {base}, target is {target}")]
    DTypeMismatch {
        base: &'static str,
        target: &'static str,
    },
    #[error("{name}: non-finite value {value} at index {index}")]
    NonFinite {
        name: String,
        index: usize,
        value: f32,
    },
    #[error("{name}: {value} at index {index} is beyond ±{limit}")]
    BeyondLimit {
        name: String,
        index: usize,
        value: f32,
        limit: f32,
    },
}

/// Read-only weights in their storage type.
#[derive(Clone, Copy, Debug)]
pub enum Weights<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
}

/// Writable weights in their storage type.
#[derive(Debug)]
pub enum WeightsMut<'a> {
    F32(&'a mut [f32]),
    F16(&'a mut [f16]),
    BF16(&'a mut [bf16]),
}

impl Weights<'_> {
    pub fn len(&self) -> usize {
        match self {
            Weights::F32(w) => w.len(),
            Weights::F16(w) => w.len(),
            Weights::BF16(w) => w.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `"f32"`, `"f16"` or `"bf16"`.
    pub fn dtype(&self) -> &'static str {
        match self {
            Weights::F32(_) => "f32",
            Weights::F16(_) => "f16",
            Weights::BF16(_) => "bf16",
        }
    }
}

impl WeightsMut<'_> {
    pub fn len(&self) -> usize {
        match self {
            WeightsMut::F32(w) => w.len(),
            WeightsMut::F16(w) => w.len(),
            WeightsMut::BF16(w) => w.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `"f32"`, `"f16"` or `"bf16"`.
    pub fn dtype(&self) -> &'static str {
        match self {
            WeightsMut::F32(_) => "f32",
            WeightsMut::F16(_) => "f16",
            WeightsMut::BF16(_) => "bf16",
        }
    }

    /// A shorter-lived `WeightsMut` over the same slice (to call a fuse function twice).
    pub fn reborrow(&mut self) -> WeightsMut<'_> {
        match self {
            WeightsMut::F32(w) => WeightsMut::F32(w),
            WeightsMut::F16(w) => WeightsMut::F16(w),
            WeightsMut::BF16(w) => WeightsMut::BF16(w),
        }
    }
}

impl<'a> From<&'a [f32]> for Weights<'a> {
    fn from(w: &'a [f32]) -> Self {
        Weights::F32(w)
    }
}
impl<'a> From<&'a [f16]> for Weights<'a> {
    fn from(w: &'a [f16]) -> Self {
        Weights::F16(w)
    }
}
impl<'a> From<&'a [bf16]> for Weights<'a> {
    fn from(w: &'a [bf16]) -> Self {
        Weights::BF16(w)
    }
}
impl<'a> From<&'a mut [f32]> for WeightsMut<'a> {
    fn from(w: &'a mut [f32]) -> Self {
        WeightsMut::F32(w)
    }
}
impl<'a> From<&'a mut [f16]> for WeightsMut<'a> {
    fn from(w: &'a mut [f16]) -> Self {
        WeightsMut::F16(w)
    }
}
impl<'a> From<&'a mut [bf16]> for WeightsMut<'a> {
    fn from(w: &'a mut [bf16]) -> Self {
        WeightsMut::BF16(w)
    }
}

/// LoRA factors of one layer: `B` `[out, rank]`, `A` `[rank, in]` (row-major f32) and the scale
/// (`alpha / rank` times any user strength).
#[derive(Clone, Copy, Debug)]
pub struct Factors<'a> {
    pub b: &'a [f32],
    pub a: &'a [f32],
    pub rank: usize,
    pub scale: f32,
}

/// One layer's LoRA update owned in f32, ready for the kernel: what a LoRA layer becomes at a
/// given strength (`LoraLayer::fuse_plan` in `lora/format.rs`).
#[derive(Clone, Debug)]
pub struct FusePlan {
    pub b: Vec<f32>,
    pub a: Vec<f32>,
    pub rank: usize,
    pub scale: f32,
}

impl FusePlan {
    /// The kernel's borrowed view.
    pub fn factors(&self) -> Factors<'_> {
        Factors {
            b: &self.b,
            a: &self.a,
            rank: self.rank,
            scale: self.scale,
        }
    }

    /// Both factors finite (`name`: the layer, for the error): checked once per LoRA, before
    /// any weight is touched.
    pub fn check_finite(&self, name: &str) -> Result<(), FuseError> {
        check_finite(name, &self.a).and_then(|_| check_finite(name, &self.b))
    }
}

/// `w += s·B·A`, in one pass over `w` (`[out, inp]` row-major).
pub fn fuse_in_place(
    w: WeightsMut,
    out: usize,
    inp: usize,
    f: &Factors,
    threads: usize,
) -> Result<(), FuseError> {
    check_shapes(out, inp, f)?;
    check_len("weight", w.len(), out, inp)?;
    let isa = Isa::detect();
    match w {
        WeightsMut::F32(w) => run(None, w, out, inp, f, threads, isa),
        WeightsMut::F16(w) => run(None, w, out, inp, f, threads, isa),
        WeightsMut::BF16(w) => run(None, w, out, inp, f, threads, isa),
    }
    Ok(())
}

/// `target = base + s·B·A`: reads `base`, writes `target` (both `[out, inp]` row-major, same
/// dtype), one pass. `target`'s previous contents are never read.
pub fn fuse_from(
    base: Weights,
    target: WeightsMut,
    out: usize,
    inp: usize,
    f: &Factors,
    threads: usize,
) -> Result<(), FuseError> {
    check_shapes(out, inp, f)?;
    check_len("base", base.len(), out, inp)?;
    check_len("target", target.len(), out, inp)?;
    let isa = Isa::detect();
    match (base, target) {
        (Weights::F32(b), WeightsMut::F32(t)) => run(Some(b), t, out, inp, f, threads, isa),
        (Weights::F16(b), WeightsMut::F16(t)) => run(Some(b), t, out, inp, f, threads, isa),
        (Weights::BF16(b), WeightsMut::BF16(t)) => run(Some(b), t, out, inp, f, threads, isa),
        (b, t) => {
            return Err(FuseError::DTypeMismatch {
                base: b.dtype(),
                target: t.dtype(),
            })
        }
    }
    Ok(())
}

/// `target = base` (a layer the new LoRA does not touch), copied with `threads` threads.
pub fn restore_from(base: Weights, target: WeightsMut, threads: usize) -> Result<(), FuseError> {
    let (n, m) = (base.len(), target.len());
    if n != m {
        return Err(FuseError::WeightLen {
            which: "target",
            len: m,
            expected: n,
            out: 1,
            inp: n,
        });
    }
    match (base, target) {
        (Weights::F32(b), WeightsMut::F32(t)) => par_copy(b, t, threads, Isa::detect()),
        (Weights::F16(b), WeightsMut::F16(t)) => par_copy(b, t, threads, Isa::detect()),
        (Weights::BF16(b), WeightsMut::BF16(t)) => par_copy(b, t, threads, Isa::detect()),
        (b, t) => {
            return Err(FuseError::DTypeMismatch {
                base: b.dtype(),
                target: t.dtype(),
            })
        }
    }
    Ok(())
}

/// Fails on the first NaN or infinity in `v` (call once per factor before fusing).
pub fn check_finite(name: &str, v: &[f32]) -> Result<(), FuseError> {
    match v.iter().position(|x| !x.is_finite()) {
        None => Ok(()),
        Some(index) => Err(FuseError::NonFinite {
            name: name.to_string(),
            index,
            value: v[index],
        }),
    }
}

/// [`check_finite`] on stored factor bytes (f32, f16 or bf16), without widening them all at
/// once (a switch checks a LoRA before writing any of it), and with `limit`, also that every
/// element's magnitude is within it (an fp16 engine's range): one pass for both.
pub fn check_factor_bytes(
    name: &str,
    bytes: &[u8],
    dtype: v2l_graphs::DType,
    limit: Option<f32>,
) -> Result<(), FuseError> {
    const CHUNK: usize = 1024;
    let mut buf = [0f32; CHUNK];
    let size = dtype.size().max(1);
    // `|x| <= bound` is false for NaN and for infinities (`bound` is finite): one compare
    // finds all three.
    let bound = limit.map_or(f32::MAX, |l| l.min(f32::MAX));
    for (i, chunk) in bytes.chunks(CHUNK * size).enumerate() {
        let n = chunk.len() / size;
        let Some(dst) = buf.get_mut(..n) else {
            break;
        };
        if v2l_graphs::dtype::f32_values_into(chunk, dtype, dst).is_none() {
            return Err(FuseError::NonFinite {
                name: format!("{name} (stored as {dtype}, not f32/f16/bf16 elements)"),
                index: i * CHUNK,
                value: f32::NAN,
            });
        }
        // A branch-free pass first (vectorised), then the index only where one fails.
        if dst.iter().fold(true, |ok, x| ok & (x.abs() <= bound)) {
            continue;
        }
        if let Some((j, &value)) = dst
            .iter()
            .enumerate()
            .find(|(_, x)| x.is_nan() || x.abs() > bound)
        {
            let (name, index) = (name.to_string(), i * CHUNK + j);
            return Err(match (value.is_finite(), limit) {
                (true, Some(limit)) => FuseError::BeyondLimit {
                    name,
                    index,
                    value,
                    limit,
                },
                _ => FuseError::NonFinite { name, index, value },
            });
        }
    }
    Ok(())
}

/// The inner loop this machine runs: `"avx2+f16c"` or `"portable"`.
pub fn kernel_name() -> &'static str {
    Isa::detect().name()
}

/// The thread count `threads` means (0: all available cores).
pub fn resolve_threads(threads: usize) -> usize {
    if threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        threads
    }
}

fn check_shapes(out: usize, inp: usize, f: &Factors) -> Result<(), FuseError> {
    if f.rank == 0 {
        return Err(FuseError::ZeroRank);
    }
    if out == 0 || inp == 0 {
        return Err(FuseError::EmptyWeight { out, inp });
    }
    out.checked_mul(inp)
        .ok_or(FuseError::Overflow { out, inp })?;
    let eb = out.checked_mul(f.rank);
    if eb != Some(f.b.len()) {
        return Err(FuseError::BLen {
            len: f.b.len(),
            expected: eb.unwrap_or(usize::MAX),
            out,
            rank: f.rank,
        });
    }
    let ea = inp.checked_mul(f.rank);
    if ea != Some(f.a.len()) {
        return Err(FuseError::ALen {
            len: f.a.len(),
            expected: ea.unwrap_or(usize::MAX),
            rank: f.rank,
            inp,
        });
    }
    Ok(())
}

fn check_len(which: &'static str, len: usize, out: usize, inp: usize) -> Result<(), FuseError> {
    let expected = out * inp; // checked in check_shapes
    if len != expected {
        return Err(FuseError::WeightLen {
            which,
            len,
            expected,
            out,
            inp,
        });
    }
    Ok(())
}

/// Which inner loop to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Isa {
    fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("f16c")
            {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => "avx2+f16c",
        }
    }
}

/// A raw pointer that may cross threads (each thread touches a disjoint part of the buffer).
#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);

// SAFETY: used only to hand disjoint row/element ranges of one buffer to scoped threads.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer (a method, so closures capture the `SendPtr`, not its raw field).
    fn get(self) -> *mut T {
        self.0
    }
}

/// Runs `work(block)` for every block in `0..nblocks` on up to `threads` threads. Blocks are
/// handed out dynamically (an atomic counter), so a thread that loses its core to another
/// process does not hold up the others.
fn par_blocks(nblocks: usize, threads: usize, work: impl Fn(usize) + Sync) {
    let threads = threads.clamp(1, nblocks.max(1));
    if threads == 1 {
        (0..nblocks).for_each(work);
        return;
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let worker = || loop {
        let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if k >= nblocks {
            break;
        }
        work(k);
    };
    std::thread::scope(|s| {
        for _ in 1..threads {
            s.spawn(worker);
        }
        worker();
    });
}

/// Elements per work block handed to a thread (1 MiB of f32).
const BLOCK_ELEMS: usize = 1 << 18;

/// Splits `dst` (and `src`) into blocks of whole rows across threads and runs the inner loop.
fn run<T: Elem>(
    src: Option<&[T]>,
    dst: &mut [T],
    out: usize,
    inp: usize,
    f: &Factors,
    threads: usize,
    isa: Isa,
) {
    let block_rows = (BLOCK_ELEMS / inp).max(1);
    run_exact(
        src,
        dst,
        out,
        inp,
        f,
        resolve_threads(threads),
        block_rows,
        isa,
    )
}

/// [`run`] with explicit thread count and rows per block.
#[allow(clippy::too_many_arguments)]
fn run_exact<T: Elem>(
    src: Option<&[T]>,
    dst: &mut [T],
    out: usize,
    inp: usize,
    f: &Factors,
    threads: usize,
    block_rows: usize,
    isa: Isa,
) {
    debug_assert!(dst.len() == out * inp && src.is_none_or(|s| s.len() == out * inp));
    let streaming = src.is_some();
    let dst = SendPtr(dst.as_mut_ptr());
    let src = SendPtr(src.map_or(dst.get() as *const T, |s| s.as_ptr()) as *mut T);
    let nblocks = out.div_ceil(block_rows);
    let a_split = split_even_odd::<T>(f, inp, isa);
    // One pass over the factors (out·r + r·in elements, against out·in for the layer).
    let nan_guard = is_even_odd::<T>()
        && !(f.scale.is_finite() && f.b.iter().chain(f.a).all(|x| x.is_finite()));
    par_blocks(nblocks, threads, |k| {
        let row = k * block_rows;
        let n = block_rows.min(out - row);
        let rows = Rows {
            // SAFETY: row + n <= out, and both buffers hold out·inp elements.
            src: unsafe { src.get().add(row * inp) },
            dst: unsafe { dst.get().add(row * inp) },
            nrows: n,
            inp,
            b: &f.b[row * f.rank..(row + n) * f.rank],
            a: f.a,
            a_split: &a_split,
            rank: f.rank,
            scale: f.scale,
            nan_guard,
        };
        run_rows(&rows, isa, streaming);
    });
}

/// One block's rows through the inner loop `isa` names.
fn run_rows<T: Elem>(rows: &Rows<T>, isa: Isa, streaming: bool) {
    let mut coef = vec![0f32; rows.rank];
    match isa {
        // SAFETY: pointers cover nrows·inp elements (checked by the callers); AVX2+F16C
        // were detected.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe {
            match (streaming, rows.nan_guard) {
                (true, false) => avx_rows::rows::<T, true, false>(rows, &mut coef),
                (false, false) => avx_rows::rows::<T, false, false>(rows, &mut coef),
                (true, true) => avx_rows::rows::<T, true, true>(rows, &mut coef),
                (false, true) => avx_rows::rows::<T, false, true>(rows, &mut coef),
            }
        },
        // SAFETY: as above.
        Isa::Portable => unsafe { rows.rows_portable(&mut coef) },
    }
}

/// Whether `T` uses the even/odd lane layout (bf16 on x86_64).
fn is_even_odd<T: Elem>() -> bool {
    #[cfg(target_arch = "x86_64")]
    return T::EVEN_ODD;
    #[cfg(not(target_arch = "x86_64"))]
    return false;
}

/// `Rows::a_split` for this layer (built once per call, shared by the threads).
fn split_even_odd<T: Elem>(f: &Factors, inp: usize, isa: Isa) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if T::EVEN_ODD && f.rank == 1 && isa == Isa::Avx2 {
        let h = inp / 2 + 9;
        let mut v = vec![0f32; 2 * h];
        for (j, &x) in f.a.iter().enumerate() {
            v[(j % 2) * h + j / 2] = x;
        }
        return v;
    }
    let _ = (f, inp, isa);
    Vec::new()
}

/// `dst = src` in blocks across threads; streaming stores where available.
fn par_copy<T: Copy + Send + Sync>(src: &[T], dst: &mut [T], threads: usize, isa: Isa) {
    let n = src.len();
    let (s, d) = (SendPtr(src.as_ptr() as *mut T), SendPtr(dst.as_mut_ptr()));
    par_blocks(n.div_ceil(BLOCK_ELEMS), resolve_threads(threads), |k| {
        let start = k * BLOCK_ELEMS;
        let len = BLOCK_ELEMS.min(n - start);
        // SAFETY: start + len <= n for both buffers; blocks are disjoint; `dst` is borrowed
        // mutably (no other access) and `src` cannot overlap it.
        unsafe {
            let (sp, dp) = (s.get().add(start), d.get().add(start));
            match isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => avx::stream_copy(
                    sp as *const u8,
                    dp as *mut u8,
                    len * std::mem::size_of::<T>(),
                ),
                _ => std::ptr::copy_nonoverlapping(sp, dp, len),
            }
        }
    });
}

/// The explicit AVX2 + F16C inner loop.
#[cfg(target_arch = "x86_64")]
mod avx;
#[cfg(target_arch = "x86_64")]
mod avx_rows;
mod elem;

pub use elem::CHUNK;
use elem::{Elem, Rows};

#[cfg(test)]
mod tests;
