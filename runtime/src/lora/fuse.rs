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

/// Columns per tile for rank > 1 (a 4 KiB f32 tile).
pub const CHUNK: usize = 1024;

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
/// given strength ([`crate::lora::format::LoraLayer::fuse_plan`]).
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

/// A storage type: upcast to f32 and round back (round-to-nearest-even).
trait Elem: Copy + Send + Sync + 'static {
    fn up(self) -> f32;
    fn down(x: f32) -> Self;

    /// The lane layout of `load16`/`store16`: `false`, elements 0..8 and 8..16; `true`, the
    /// even and the odd elements (bf16: its conversions are then a shift or a mask, no shuffle).
    #[cfg(target_arch = "x86_64")]
    const EVEN_ODD: bool = false;

    /// 16 elements at `p` as two f32x8 (in the `EVEN_ODD` layout).
    ///
    /// # Safety
    /// `p..p+16` readable; AVX2 and F16C available.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> (avx::V, avx::V);

    /// Rounds and stores 16 elements at `p`; with `NT`, a streaming store (`p` 32-byte aligned).
    /// `G`: guard against NaNs with arbitrary payloads (bf16; see `avx::bf16_round8`).
    ///
    /// # Safety
    /// `p..p+16` writable; AVX2 and F16C available; aligned as above.
    #[cfg(target_arch = "x86_64")]
    unsafe fn store16<const NT: bool, const G: bool>(p: *mut Self, lo: avx::V, hi: avx::V);
}

impl Elem for f32 {
    #[inline(always)]
    fn up(self) -> f32 {
        self
    }
    #[inline(always)]
    fn down(x: f32) -> f32 {
        x
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> (avx::V, avx::V) {
        avx::load16_f32(p)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn store16<const NT: bool, const G: bool>(p: *mut f32, lo: avx::V, hi: avx::V) {
        avx::store16_f32::<NT>(p, lo, hi)
    }
}

impl Elem for f16 {
    #[inline(always)]
    fn up(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn down(x: f32) -> f16 {
        f16::from_f32(x)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f16) -> (avx::V, avx::V) {
        avx::load16_f16(p as *const u16)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn store16<const NT: bool, const G: bool>(p: *mut f16, lo: avx::V, hi: avx::V) {
        avx::store16_f16::<NT>(p as *mut u16, lo, hi)
    }
}

/// f32 → bf16 bits, round-to-nearest-even; NaN stays (quiet) NaN.
#[inline(always)]
fn bf16_round(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        ((b >> 16) | 0x0040) as u16
    } else {
        (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16
    }
}

impl Elem for bf16 {
    #[inline(always)]
    fn up(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    fn down(x: f32) -> bf16 {
        bf16::from_bits(bf16_round(x))
    }
    #[cfg(target_arch = "x86_64")]
    const EVEN_ODD: bool = true;
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const bf16) -> (avx::V, avx::V) {
        avx::load16_bf16(p as *const u16)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn store16<const NT: bool, const G: bool>(p: *mut bf16, lo: avx::V, hi: avx::V) {
        avx::store16_bf16::<NT, G>(p as *mut u16, lo, hi)
    }
}

/// `tile[t] = d` for columns `j0 .. j0 + tile.len()` of the row whose `coef[k] = s·B[i,k]`,
/// in the documented order (the same as `Rows::value`).
#[inline(always)]
fn delta_tile(tile: &mut [f32], coef: &[f32], a: &[f32], inp: usize, j0: usize) {
    let n = tile.len();
    let c = coef[0];
    for (t, &x) in tile.iter_mut().zip(&a[j0..j0 + n]) {
        *t = c * x;
    }
    let mut k = 1;
    // Four terms per pass over the tile (fewer tile loads/stores), still added one at a time.
    while k + 4 <= coef.len() {
        let (c0, c1, c2, c3) = (coef[k], coef[k + 1], coef[k + 2], coef[k + 3]);
        let a0 = &a[k * inp + j0..][..n];
        let a1 = &a[(k + 1) * inp + j0..][..n];
        let a2 = &a[(k + 2) * inp + j0..][..n];
        let a3 = &a[(k + 3) * inp + j0..][..n];
        for t in 0..n {
            tile[t] = (((tile[t] + c0 * a0[t]) + c1 * a1[t]) + c2 * a2[t]) + c3 * a3[t];
        }
        k += 4;
    }
    while k < coef.len() {
        let c = coef[k];
        for (t, &x) in tile.iter_mut().zip(&a[k * inp + j0..][..n]) {
            *t += c * x;
        }
        k += 1;
    }
}

/// One element: `dst[j] = round(up(src[j]) + d)`.
///
/// # Safety
/// `src.add(j)` readable, `dst.add(j)` writable (they may be the same pointer).
#[inline(always)]
unsafe fn scalar_elem<T: Elem>(src: *const T, dst: *mut T, j: usize, d: f32) {
    let w = (*src.add(j)).up();
    *dst.add(j) = T::down(w + d);
}

/// A contiguous block of rows for one thread. `src == dst` for in-place.
struct Rows<'a, T> {
    src: *const T,
    dst: *mut T,
    nrows: usize,
    inp: usize,
    /// `B` rows of this block, `[nrows, rank]`.
    b: &'a [f32],
    a: &'a [f32],
    /// For rank 1 and an `EVEN_ODD` type on the AVX2 path: A's even elements then its odd
    /// elements, each padded to `inp / 2 + 9` (see [`split_even_odd`]); else empty.
    a_split: &'a [f32],
    rank: usize,
    scale: f32,
    /// Some factor (or the scale) is not finite: the bf16 AVX2 path must guard against NaN
    /// payloads (see `avx::bf16_round8`).
    nan_guard: bool,
}

impl<T: Elem> Rows<'_, T> {
    /// The fused value at flat index `p` of the block (row `p / inp`, column `p % inp`),
    /// computed element-wise in the documented order (bitwise the same as the vector paths).
    ///
    /// # Safety
    /// `p < nrows · inp`.
    #[inline(always)]
    unsafe fn value(&self, p: usize) -> T {
        let d = self.delta(p / self.inp, p % self.inp);
        T::down((*self.src.add(p)).up() + d)
    }

    /// `d` for row `i` (of the block), column `j`, in the documented order.
    #[inline(always)]
    fn delta(&self, i: usize, j: usize) -> f32 {
        let b = &self.b[i * self.rank..][..self.rank];
        let mut d = (self.scale * b[0]) * self.a[j];
        for (k, &bk) in b.iter().enumerate().skip(1) {
            d += (self.scale * bk) * self.a[k * self.inp + j];
        }
        d
    }

    fn run(&self, isa: Isa, streaming: bool) {
        let mut coef = vec![0f32; self.rank];
        match isa {
            // SAFETY: pointers cover nrows·inp elements (checked by the callers); AVX2+F16C
            // were detected.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe {
                match (streaming, self.nan_guard) {
                    (true, false) => avx::rows::<T, true, false>(self, &mut coef),
                    (false, false) => avx::rows::<T, false, false>(self, &mut coef),
                    (true, true) => avx::rows::<T, true, true>(self, &mut coef),
                    (false, true) => avx::rows::<T, false, true>(self, &mut coef),
                }
            },
            // SAFETY: as above.
            Isa::Portable => unsafe { self.rows_portable(&mut coef) },
        }
    }

    /// The portable inner loop (auto-vectorised where the compiler can).
    unsafe fn rows_portable(&self, coef: &mut [f32]) {
        let inp = self.inp;
        let mut tile = [0f32; CHUNK];
        for i in 0..self.nrows {
            for (c, &b) in coef.iter_mut().zip(&self.b[i * self.rank..][..self.rank]) {
                *c = self.scale * b;
            }
            let src = self.src.add(i * inp);
            let dst = self.dst.add(i * inp);
            let mut j0 = 0;
            while j0 < inp {
                let n = CHUNK.min(inp - j0);
                if self.rank == 1 {
                    let c = coef[0];
                    let a = &self.a[j0..j0 + n];
                    for (t, &x) in a.iter().enumerate() {
                        scalar_elem(src, dst, j0 + t, c * x);
                    }
                } else {
                    delta_tile(&mut tile[..n], coef, self.a, inp, j0);
                    for (t, &d) in tile[..n].iter().enumerate() {
                        scalar_elem(src, dst, j0 + t, d);
                    }
                }
                j0 += n;
            }
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
        rows.run(isa, streaming);
    });
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
mod avx {
    use super::{delta_tile, Elem, Rows, CHUNK};
    use std::arch::x86_64::*;

    pub(super) type V = __m256;

    /// All rows of a block. `NT`: streaming stores to `dst` (fuse_from).
    ///
    /// # Safety
    /// AVX2 and F16C available; `r.src`/`r.dst` cover `r.nrows · r.inp` elements.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn rows<T: Elem, const NT: bool, const G: bool>(
        r: &Rows<T>,
        coef: &mut [f32],
    ) {
        // The block is cut into groups of 16 elements on one flat grid whose destination is
        // 32-byte aligned, so that every store is a whole aligned vector: mixing scalar and
        // streaming stores in one cache line costs a read-for-ownership and a flush (it
        // halved the speed when rows were not multiples of the alignment). Only the unaligned
        // start and the last < 16 elements of the block are scalar.
        //
        // Groups inside a row are computed 16-wide; a group across a row boundary gets its 16
        // deltas element by element.
        let inp = r.inp;
        let total = r.nrows * inp;
        let dst = r.dst;
        let mut tile = [0f32; CHUNK];
        let head = (dst.align_offset(32)).min(total);
        for p in 0..head {
            *dst.add(p) = r.value(p);
        }
        let end = head + (total - head) / 16 * 16;
        // Row i's groups inside the row: `n` columns from flat position `q`.
        let in_row = |i: usize| -> (usize, usize) {
            let q = head + ((i * inp).max(head) - head).div_ceil(16) * 16;
            let row_end = ((i + 1) * inp).min(end);
            (
                q,
                if q + 16 <= row_end {
                    (row_end - q) / 16 * 16
                } else {
                    0
                },
            )
        };
        // (Column panels across the rows, to keep A in L1 for long rows, were tried: the
        // broken-up W stream cost more than they saved, at every panel width.)
        for i in 0..r.nrows {
            let (q, n) = in_row(i);
            if n > 0 {
                in_row_groups::<T, NT, G>(r, i, q - i * inp, n, coef, &mut tile);
            }
        }
        // The groups across row boundaries: each is the one after some row's in-row groups.
        let mut next = 0;
        for i in 0..r.nrows {
            let (q, n) = in_row(i);
            let q = q + n;
            if q >= next && q + 16 <= end && q / inp != (q + 15) / inp {
                crossing_group::<T, NT, G>(r, q);
                next = q + 16;
            }
        }
        for p in end..total {
            *dst.add(p) = r.value(p);
        }
        if NT {
            // Streaming stores are weakly ordered: make them visible before the caller
            // (or the thread join) hands the weights on.
            _mm_sfence();
        }
    }

    /// How far ahead of the loads W is prefetched into L2. One core's hardware prefetchers
    /// alone kept too few lines in flight (at in = 12288, where A streams from L2 too, bf16
    /// ran at 40 % of the copy speed); 16 KiB ahead roughly doubled that.
    const PREFETCH_BYTES: usize = 16 << 10;

    /// Prefetches the line at `p` into L2 (`p` may be past the end of the buffer: a prefetch
    /// never faults).
    #[inline(always)]
    unsafe fn prefetch_l2<T>(p: *const T) {
        _mm_prefetch::<_MM_HINT_T1>(p as *const i8);
    }

    /// Columns `j .. j + len` of row `i` (`len` a multiple of 16, `dst` aligned at `j`).
    #[inline(always)]
    unsafe fn in_row_groups<T: Elem, const NT: bool, const G: bool>(
        r: &Rows<T>,
        i: usize,
        j: usize,
        len: usize,
        coef: &mut [f32],
        tile: &mut [f32; CHUNK],
    ) {
        let (inp, a) = (r.inp, r.a);
        for (c, &b) in coef.iter_mut().zip(&r.b[i * r.rank..][..r.rank]) {
            *c = r.scale * b;
        }
        let (src, dst) = (r.src.add(i * inp), r.dst.add(i * inp));
        let end = j + len;
        let mut j0 = j;
        while j0 < end {
            let n = CHUNK.min(end - j0);
            if r.rank == 1 {
                let c = _mm256_set1_ps(coef[0]);
                // The A values of a group's two vectors: contiguous, or (EVEN_ODD) from the
                // even/odd split of A, whose roles swap at odd columns.
                let (mut lo, mut hi, step) = if T::EVEN_ODD {
                    let h = r.a_split.len() / 2;
                    let (ae, ao) = (r.a_split.as_ptr(), r.a_split.as_ptr().add(h));
                    if j0.is_multiple_of(2) {
                        (ae.add(j0 / 2), ao.add(j0 / 2), 8)
                    } else {
                        (ao.add(j0 / 2), ae.add(j0 / 2 + 1), 8)
                    }
                } else {
                    (a.as_ptr().add(j0), a.as_ptr().add(j0 + 8), 16)
                };
                let mut j = j0;
                while j < j0 + n {
                    prefetch_l2(src.wrapping_add(j + PREFETCH_BYTES / size_of::<T>()));
                    let (w0, w1) = T::load16(src.add(j));
                    let d0 = _mm256_mul_ps(c, _mm256_loadu_ps(lo));
                    let d1 = _mm256_mul_ps(c, _mm256_loadu_ps(hi));
                    T::store16::<NT, G>(dst.add(j), _mm256_add_ps(w0, d0), _mm256_add_ps(w1, d1));
                    (lo, hi) = (lo.add(step), hi.add(step));
                    j += 16;
                }
            } else {
                delta_tile(&mut tile[..n], coef, a, inp, j0);
                let tp = tile.as_ptr();
                let mut t = 0;
                while t < n {
                    prefetch_l2(src.wrapping_add(j0 + t + PREFETCH_BYTES / size_of::<T>()));
                    let (w0, w1) = T::load16(src.add(j0 + t));
                    let (d0, d1) =
                        layout::<T>(_mm256_loadu_ps(tp.add(t)), _mm256_loadu_ps(tp.add(t + 8)));
                    T::store16::<NT, G>(
                        dst.add(j0 + t),
                        _mm256_add_ps(w0, d0),
                        _mm256_add_ps(w1, d1),
                    );
                    t += 16;
                }
            }
            j0 += n;
        }
    }

    /// The group at flat position `q`, which crosses a row boundary (maybe several).
    #[inline(always)]
    unsafe fn crossing_group<T: Elem, const NT: bool, const G: bool>(r: &Rows<T>, q: usize) {
        let mut d = [0f32; 16];
        let (mut i, mut j) = (q / r.inp, q % r.inp);
        for dt in d.iter_mut() {
            *dt = r.delta(i, j);
            j += 1;
            if j == r.inp {
                (i, j) = (i + 1, 0);
            }
        }
        let (w0, w1) = T::load16(r.src.add(q));
        let (d0, d1) = layout::<T>(
            _mm256_loadu_ps(d.as_ptr()),
            _mm256_loadu_ps(d.as_ptr().add(8)),
        );
        T::store16::<NT, G>(r.dst.add(q), _mm256_add_ps(w0, d0), _mm256_add_ps(w1, d1));
    }

    /// `len` bytes from `src` to `dst` (not overlapping) with streaming stores.
    ///
    /// # Safety
    /// AVX2 available; both ranges valid for `len` bytes and disjoint.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn stream_copy(src: *const u8, dst: *mut u8, len: usize) {
        let head = (dst.align_offset(32)).min(len);
        std::ptr::copy_nonoverlapping(src, dst, head);
        let mut i = head;
        while i + 64 <= len {
            prefetch_l2(src.wrapping_add(i + PREFETCH_BYTES));
            let a = _mm256_loadu_si256(src.add(i) as *const __m256i);
            let b = _mm256_loadu_si256(src.add(i + 32) as *const __m256i);
            _mm256_stream_si256(dst.add(i) as *mut __m256i, a);
            _mm256_stream_si256(dst.add(i + 32) as *mut __m256i, b);
            i += 64;
        }
        std::ptr::copy_nonoverlapping(src.add(i), dst.add(i), len - i);
        _mm_sfence();
    }

    #[inline(always)]
    pub(super) unsafe fn load16_f32(p: *const f32) -> (V, V) {
        (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)))
    }

    #[inline(always)]
    pub(super) unsafe fn store16_f32<const NT: bool>(p: *mut f32, lo: V, hi: V) {
        if NT {
            _mm256_stream_ps(p, lo);
            _mm256_stream_ps(p.add(8), hi);
        } else {
            _mm256_storeu_ps(p, lo);
            _mm256_storeu_ps(p.add(8), hi);
        }
    }

    #[inline(always)]
    pub(super) unsafe fn load16_f16(p: *const u16) -> (V, V) {
        let lo = _mm_loadu_si128(p as *const __m128i);
        let hi = _mm_loadu_si128(p.add(8) as *const __m128i);
        (_mm256_cvtph_ps(lo), _mm256_cvtph_ps(hi))
    }

    #[inline(always)]
    pub(super) unsafe fn store16_f16<const NT: bool>(p: *mut u16, lo: V, hi: V) {
        let l = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(lo);
        let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(hi);
        store256::<NT>(p, _mm256_set_m128i(h, l));
    }

    #[inline(always)]
    pub(super) unsafe fn load16_bf16(p: *const u16) -> (V, V) {
        // bf16 → f32 is `bits << 16`: the even elements are the low halves of the u32 lanes
        // shifted up, the odd ones the high halves in place.
        let v = _mm256_loadu_si256(p as *const __m256i);
        let even = _mm256_slli_epi32::<16>(v);
        let odd = _mm256_and_si256(v, _mm256_set1_epi32(0xFFFF_0000_u32 as i32));
        (_mm256_castsi256_ps(even), _mm256_castsi256_ps(odd))
    }

    /// f32x8 → bf16 bits (round-to-nearest-even) in the high half of each u32 lane.
    ///
    /// `x` always comes out of an add, so a NaN `x` is quiet (bit 22 set) and truncating it
    /// gives `bf16_round`'s bits. With `G`, NaN lanes get no rounding bias (are truncated).
    /// Without, a NaN is rounded like a number, which is the same as truncating when its low
    /// 16 bits are zero: true of every NaN the kernel can produce from finite factors (a NaN
    /// weight is a widened bf16, and inf − inf or 0·inf give the default NaN `0xFFC00000`).
    /// A NaN payload from the factors themselves could carry into the exponent, so callers
    /// pass `G` unless the factors are all finite (`Rows::nan_guard`); it costs ~25 %.
    #[inline(always)]
    unsafe fn bf16_round8<const G: bool>(x: V) -> __m256i {
        let b = _mm256_castps_si256(x);
        let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(b), _mm256_set1_epi32(1));
        let bias = _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF));
        if G {
            let ordered = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_ORD_Q>(x, x));
            _mm256_add_epi32(b, _mm256_and_si256(bias, ordered))
        } else {
            _mm256_add_epi32(b, bias)
        }
    }

    #[inline(always)]
    pub(super) unsafe fn store16_bf16<const NT: bool, const G: bool>(p: *mut u16, even: V, odd: V) {
        let e = _mm256_srli_epi32::<16>(bf16_round8::<G>(even));
        let o = _mm256_and_si256(
            bf16_round8::<G>(odd),
            _mm256_set1_epi32(0xFFFF_0000_u32 as i32),
        );
        store256::<NT>(p, _mm256_or_si256(e, o));
    }

    /// Natural-order deltas (elements 0..8, 8..16) in `T`'s lane layout.
    #[inline(always)]
    unsafe fn layout<T: Elem>(d0: V, d1: V) -> (V, V) {
        if T::EVEN_ODD {
            // shuffle_ps gives [0 2 8 10 | 4 6 12 14]; the 64-bit permute sorts it.
            let e = _mm256_shuffle_ps::<0x88>(d0, d1);
            let o = _mm256_shuffle_ps::<0xDD>(d0, d1);
            (
                _mm256_castpd_ps(_mm256_permute4x64_pd::<0xD8>(_mm256_castps_pd(e))),
                _mm256_castpd_ps(_mm256_permute4x64_pd::<0xD8>(_mm256_castps_pd(o))),
            )
        } else {
            (d0, d1)
        }
    }

    #[inline(always)]
    unsafe fn store256<const NT: bool>(p: *mut u16, v: __m256i) {
        if NT {
            _mm256_stream_si256(p as *mut __m256i, v);
        } else {
            _mm256_storeu_si256(p as *mut __m256i, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in (-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = v2l_contracts::noise::SplitMix64::new(seed);
        (0..n).map(|_| rng.symmetric()).collect()
    }

    struct Lora {
        b: Vec<f32>,
        a: Vec<f32>,
        rank: usize,
        scale: f32,
    }

    impl Lora {
        fn new(out: usize, inp: usize, rank: usize, seed: u64) -> Lora {
            Lora {
                b: values(out * rank, seed),
                a: values(rank * inp, seed + 1000),
                rank,
                scale: 0.37,
            }
        }
        fn factors(&self) -> Factors<'_> {
            Factors {
                b: &self.b,
                a: &self.a,
                rank: self.rank,
                scale: self.scale,
            }
        }
    }

    /// The naive reference in the documented order, rounding with `half`'s own conversions.
    fn reference<T: Elem>(
        w: &[T],
        out: usize,
        inp: usize,
        l: &Lora,
        round: impl Fn(f32) -> T,
    ) -> Vec<T> {
        let mut r = Vec::with_capacity(w.len());
        for i in 0..out {
            for j in 0..inp {
                let mut d = (l.scale * l.b[i * l.rank]) * l.a[j];
                for k in 1..l.rank {
                    d += (l.scale * l.b[i * l.rank + k]) * l.a[k * inp + j];
                }
                r.push(round(w[i * inp + j].up() + d));
            }
        }
        r
    }

    /// The same in f64 (no intermediate rounding), for the tolerance check.
    fn reference_f64(w: &[f32], out: usize, inp: usize, l: &Lora) -> Vec<f64> {
        let mut r = Vec::with_capacity(w.len());
        for i in 0..out {
            for j in 0..inp {
                let mut d = 0f64;
                for k in 0..l.rank {
                    d += l.b[i * l.rank + k] as f64 * l.a[k * inp + j] as f64;
                }
                r.push(w[i * inp + j] as f64 + l.scale as f64 * d);
            }
        }
        r
    }

    fn isas() -> Vec<Isa> {
        let mut v = vec![Isa::Portable];
        if Isa::detect() != Isa::Portable {
            v.push(Isa::detect());
        }
        v
    }

    const SHAPES: &[(usize, usize)] = &[
        (7, 13),
        (1, 1),
        (5, 1),
        (3, 40),
        (9, 2051),
        (33, 70),
        (5, 4133),
        (3, 6160),
    ];

    /// Every shape × rank × thread count × isa × (from, in place) × destination misalignment
    /// against the same-order reference: bitwise.
    fn check_dtype<T: Elem + PartialEq + std::fmt::Debug>(
        conv: impl Fn(f32) -> T + Copy,
        round: impl Fn(f32) -> T + Copy,
    ) {
        for &(out, inp) in SHAPES {
            for rank in [1, 4, 5, 16] {
                let l = Lora::new(out, inp, rank, (out * 31 + inp * 7 + rank) as u64);
                let base: Vec<T> = values(out * inp, 99).into_iter().map(conv).collect();
                let want = reference(&base, out, inp, &l, round);
                for isa in isas() {
                    for threads in [1, 3] {
                        for offset in [0, 1, 3] {
                            // fuse_from into a destination shifted by `offset` elements.
                            let mut buf = vec![conv(9.0); out * inp + offset];
                            let dst = &mut buf[offset..];
                            run_exact(Some(&base), dst, out, inp, &l.factors(), threads, 2, isa);
                            assert_eq!(
                                dst,
                                &want[..],
                                "from: {out}x{inp} r{rank} t{threads} {isa:?} +{offset}"
                            );
                            // in place on a shifted copy of base.
                            let mut buf = vec![conv(0.0); out * inp + offset];
                            buf[offset..].copy_from_slice(&base);
                            let w = &mut buf[offset..];
                            run_exact(None, w, out, inp, &l.factors(), threads, 2, isa);
                            assert_eq!(
                                w,
                                &want[..],
                                "in place: {out}x{inp} r{rank} t{threads} {isa:?} +{offset}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn f32_matches_reference_bitwise() {
        check_dtype::<f32>(|x| x, |x| x);
    }

    #[test]
    fn f16_matches_reference_bitwise() {
        check_dtype::<f16>(f16::from_f32, f16::from_f32);
    }

    #[test]
    fn bf16_matches_reference_bitwise() {
        check_dtype::<bf16>(bf16::from_f32, bf16::from_f32);
    }

    #[test]
    fn f32_close_to_exact_product() {
        for &(out, inp) in SHAPES {
            for rank in [1, 4, 16] {
                let l = Lora::new(out, inp, rank, 5);
                let base = values(out * inp, 3);
                let exact = reference_f64(&base, out, inp, &l);
                let mut t = vec![0f32; out * inp];
                fuse_from(
                    Weights::F32(&base),
                    WeightsMut::F32(&mut t),
                    out,
                    inp,
                    &l.factors(),
                    3,
                )
                .expect("valid shapes");
                for (x, e) in t.iter().zip(&exact) {
                    // |w| <= 1, |d| <= 0.37·rank: a few ulps of the largest term.
                    let tol = 8.0 * f32::EPSILON as f64 * (1.0 + 0.37 * rank as f64);
                    assert!((*x as f64 - e).abs() <= tol, "{x} vs {e}");
                }
            }
        }
    }

    #[test]
    fn public_api_matches_reference() {
        let (out, inp) = (300, 700); // big enough for the thread heuristic to split
        let l = Lora::new(out, inp, 1, 11);
        let base: Vec<bf16> = values(out * inp, 1)
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        let want = reference(&base, out, inp, &l, bf16::from_f32);
        let mut t = vec![bf16::ZERO; out * inp];
        fuse_from(
            (&base[..]).into(),
            (&mut t[..]).into(),
            out,
            inp,
            &l.factors(),
            0,
        )
        .expect("valid shapes");
        assert_eq!(t, want);
        let mut w = base.clone();
        fuse_in_place((&mut w[..]).into(), out, inp, &l.factors(), 2).expect("valid shapes");
        assert_eq!(w, want);
    }

    #[test]
    fn bf16_rounding_ties_nan_inf() {
        for x in [
            1.0f32,
            f32::from_bits(0x3F80_8000), // tie, even below
            f32::from_bits(0x3F81_8000), // tie, odd below: rounds up
            f32::from_bits(0x3F80_8001),
            f32::MAX,
            -f32::MAX,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e-40,
            -0.0,
        ] {
            assert_eq!(bf16_round(x), bf16::from_f32(x).to_bits(), "{x:e}");
        }
        assert!(bf16::from_bits(bf16_round(f32::NAN)).is_nan());
        assert!(bf16::from_bits(bf16_round(f32::from_bits(0x7F80_0001))).is_nan());
        assert!(bf16::from_bits(bf16_round(f32::from_bits(0xFFFF_FFFF))).is_nan());
    }

    #[test]
    fn nan_and_inf_weights_propagate() {
        let (out, inp) = (2, 40);
        let l = Lora::new(out, inp, 1, 2);
        for isa in isas() {
            let mut base = vec![bf16::from_f32(0.5); out * inp];
            base[3] = bf16::NAN;
            base[20] = bf16::INFINITY;
            let mut t = vec![bf16::ZERO; out * inp];
            run_exact(Some(&base), &mut t, out, inp, &l.factors(), 1, 1, isa);
            assert!(t[3].is_nan() && t[20] == bf16::INFINITY, "{isa:?}");
            let mut base = vec![f16::from_f32(0.5); out * inp];
            base[3] = f16::NAN;
            base[20] = f16::from_f32(65504.0); // + d may overflow to inf: must match reference
            let want = reference(&base, out, inp, &l, f16::from_f32);
            let mut t = vec![f16::ZERO; out * inp];
            run_exact(Some(&base), &mut t, out, inp, &l.factors(), 1, 1, isa);
            assert!(t[3].is_nan(), "{isa:?}");
            assert_eq!(t[20], want[20], "{isa:?}");
        }
    }

    /// NaN weights with any payload (signalling or quiet, either sign) come out as the same
    /// NaN bits on every path (vector body, scalar head/tail, row-crossing groups).
    #[test]
    fn nan_payloads_agree_across_paths() {
        let (out, inp) = (5, 37);
        let l = Lora::new(out, inp, 1, 4);
        let l4 = Lora::new(out, inp, 4, 4);
        let bf: Vec<bf16> = (0..out * inp)
            .map(|i| match i % 5 {
                0 => bf16::from_bits(0x7F81 + (i as u16 % 60)), // signalling, small payload
                1 => bf16::from_bits(0xFFC0 | (i as u16 % 60)), // quiet, negative
                2 => bf16::from_bits(0x7FFF),
                _ => bf16::from_f32(0.25),
            })
            .collect();
        let hf: Vec<f16> = (0..out * inp)
            .map(|i| match i % 5 {
                0 => f16::from_bits(0x7C01 + (i as u16 % 200)),
                1 => f16::from_bits(0xFE00 | (i as u16 % 200)),
                2 => f16::from_bits(0x7FFF),
                _ => f16::from_f32(0.25),
            })
            .collect();
        for lora in [&l, &l4] {
            for offset in [0, 1, 5] {
                let mut want_bf = None;
                let mut want_hf = None;
                for isa in isas() {
                    let mut t = vec![bf16::ZERO; out * inp + offset];
                    run_exact(
                        Some(&bf),
                        &mut t[offset..],
                        out,
                        inp,
                        &lora.factors(),
                        2,
                        2,
                        isa,
                    );
                    let bits: Vec<u16> = t[offset..].iter().map(|x| x.to_bits()).collect();
                    assert!(bits
                        .iter()
                        .zip(&bf)
                        .all(|(b, x)| x.is_nan() == bf16::from_bits(*b).is_nan()));
                    assert_eq!(want_bf.get_or_insert(bits.clone()), &bits, "bf16 {isa:?}");
                    let mut t = vec![f16::ZERO; out * inp + offset];
                    run_exact(
                        Some(&hf),
                        &mut t[offset..],
                        out,
                        inp,
                        &lora.factors(),
                        2,
                        2,
                        isa,
                    );
                    let bits: Vec<u16> = t[offset..].iter().map(|x| x.to_bits()).collect();
                    assert!(bits
                        .iter()
                        .zip(&hf)
                        .all(|(b, x)| x.is_nan() == f16::from_bits(*b).is_nan()));
                    assert_eq!(want_hf.get_or_insert(bits.clone()), &bits, "f16 {isa:?}");
                }
            }
        }
    }

    /// Non-finite factors (which callers should reject with `check_finite`) still give NaN,
    /// never a number, wherever a NaN with any payload enters the delta — on every path
    /// (this is what the bf16 NaN guard is for).
    #[test]
    fn nan_factors_give_nan() {
        let (out, inp) = (6, 45);
        for rank in [1, 3] {
            let mut l = Lora::new(out, inp, rank, 9);
            l.a[7] = f32::from_bits(0x7FFF_FFFF); // payload that would carry when rounded
            l.a[30] = f32::from_bits(0xFFBF_FFFF); // signalling, negative
            l.b[2 * rank] = f32::from_bits(0x7F80_FFFF);
            let base: Vec<bf16> = values(out * inp, 5)
                .into_iter()
                .map(bf16::from_f32)
                .collect();
            let mut want: Option<Vec<u16>> = None;
            for isa in isas() {
                for offset in [0, 3] {
                    let mut t = vec![bf16::ZERO; out * inp + offset];
                    run_exact(
                        Some(&base),
                        &mut t[offset..],
                        out,
                        inp,
                        &l.factors(),
                        2,
                        2,
                        isa,
                    );
                    let t = &t[offset..];
                    for i in 0..out {
                        for j in 0..inp {
                            let nan = i == 2 || j == 7 || j == 30;
                            assert_eq!(t[i * inp + j].is_nan(), nan, "r{rank} {isa:?} [{i},{j}]");
                        }
                    }
                    // Numbers bitwise; NaN payloads may differ where two NaNs meet (the
                    // compiler may commute a multiply's operands).
                    let bits: Vec<u16> = t
                        .iter()
                        .map(|x| if x.is_nan() { 0x7FC0 } else { x.to_bits() })
                        .collect();
                    assert_eq!(want.get_or_insert(bits.clone()), &bits, "r{rank} {isa:?}");
                }
            }
        }
    }

    /// Fuse X, restore: base bitwise. X → Y → X: X's weights bitwise. All dtypes.
    fn switching<T: Elem + PartialEq + std::fmt::Debug>(
        conv: impl Fn(f32) -> T,
        wrap: impl Fn(&[T]) -> Weights<'_>,
        wrap_mut: impl Fn(&mut [T]) -> WeightsMut<'_>,
    ) {
        let (out, inp) = (37, 1100);
        let base: Vec<T> = values(out * inp, 8).into_iter().map(conv).collect();
        let x = Lora::new(out, inp, 1, 21);
        let y = Lora::new(out, inp, 4, 22);
        let mut t = base.clone();
        for threads in [1, 3] {
            fuse_from(
                wrap(&base),
                wrap_mut(&mut t),
                out,
                inp,
                &x.factors(),
                threads,
            )
            .expect("valid shapes");
            let with_x = t.clone();
            assert_ne!(with_x, base);
            restore_from(wrap(&base), wrap_mut(&mut t), threads).expect("valid shapes");
            assert_eq!(t, base);
            fuse_from(
                wrap(&base),
                wrap_mut(&mut t),
                out,
                inp,
                &x.factors(),
                threads,
            )
            .expect("valid shapes");
            fuse_from(
                wrap(&base),
                wrap_mut(&mut t),
                out,
                inp,
                &y.factors(),
                threads,
            )
            .expect("valid shapes");
            assert_ne!(t, with_x);
            fuse_from(
                wrap(&base),
                wrap_mut(&mut t),
                out,
                inp,
                &x.factors(),
                threads,
            )
            .expect("valid shapes");
            assert_eq!(t, with_x);
        }
    }

    #[test]
    fn restore_copies_bitwise() {
        for n in [1, 15, 33, 1000, 2 * BLOCK_ELEMS + 77] {
            let src: Vec<bf16> = values(n + 3, n as u64)
                .into_iter()
                .map(bf16::from_f32)
                .collect();
            for isa in isas() {
                for (so, d_off) in [(0, 0), (1, 0), (0, 3), (2, 1)] {
                    let mut dst = vec![bf16::ZERO; n + 3];
                    par_copy(&src[so..so + n], &mut dst[d_off..d_off + n], 3, isa);
                    assert_eq!(&dst[d_off..d_off + n], &src[so..so + n], "{n} {isa:?}");
                    assert!(dst[..d_off]
                        .iter()
                        .chain(&dst[d_off + n..])
                        .all(|x| *x == bf16::ZERO));
                }
            }
        }
    }

    #[test]
    fn switching_is_exact_f32() {
        switching::<f32>(|x| x, |w| Weights::F32(w), |w| WeightsMut::F32(w));
    }

    #[test]
    fn switching_is_exact_f16() {
        switching::<f16>(f16::from_f32, |w| Weights::F16(w), |w| WeightsMut::F16(w));
    }

    #[test]
    fn switching_is_exact_bf16() {
        switching::<bf16>(
            bf16::from_f32,
            |w| Weights::BF16(w),
            |w| WeightsMut::BF16(w),
        );
    }

    #[test]
    fn shape_errors() {
        let (out, inp, r) = (4, 6, 2);
        let b = vec![0.1f32; out * r];
        let a = vec![0.1f32; r * inp];
        let f = Factors {
            b: &b,
            a: &a,
            rank: r,
            scale: 1.0,
        };
        let base = vec![0f32; out * inp];
        let mut t = vec![0f32; out * inp];
        let mut short = vec![0f32; out * inp - 1];
        let mut t16 = vec![f16::ZERO; out * inp];

        let zero = Factors { rank: 0, ..f };
        assert_eq!(
            fuse_in_place(WeightsMut::F32(&mut t), out, inp, &zero, 1),
            Err(FuseError::ZeroRank)
        );
        let empty = Factors {
            b: &[],
            a: &[],
            rank: 0,
            scale: 1.0,
        };
        assert_eq!(
            fuse_from(Weights::F32(&[]), WeightsMut::F32(&mut []), 0, 0, &empty, 1),
            Err(FuseError::ZeroRank)
        );
        assert_eq!(
            fuse_in_place(WeightsMut::F32(&mut []), 0, inp, &f, 1),
            Err(FuseError::EmptyWeight { out: 0, inp })
        );
        assert_eq!(
            fuse_in_place(WeightsMut::F32(&mut []), usize::MAX, 2, &f, 1),
            Err(FuseError::Overflow {
                out: usize::MAX,
                inp: 2
            })
        );
        assert!(matches!(
            fuse_in_place(WeightsMut::F32(&mut short), out, inp, &f, 1),
            Err(FuseError::WeightLen {
                which: "weight",
                len: 23,
                expected: 24,
                ..
            })
        ));
        assert!(matches!(
            fuse_from(
                Weights::F32(&base[1..]),
                WeightsMut::F32(&mut t),
                out,
                inp,
                &f,
                1
            ),
            Err(FuseError::WeightLen {
                which: "base",
                len: 23,
                ..
            })
        ));
        assert!(matches!(
            fuse_from(
                Weights::F32(&base),
                WeightsMut::F32(&mut short),
                out,
                inp,
                &f,
                1
            ),
            Err(FuseError::WeightLen {
                which: "target",
                len: 23,
                ..
            })
        ));
        let bad_b = Factors { b: &b[1..], ..f };
        assert_eq!(
            fuse_in_place(WeightsMut::F32(&mut t), out, inp, &bad_b, 1),
            Err(FuseError::BLen {
                len: 7,
                expected: 8,
                out,
                rank: r
            })
        );
        let bad_a = Factors { a: &a[..11], ..f };
        assert_eq!(
            fuse_from(
                Weights::F32(&base),
                WeightsMut::F32(&mut t),
                out,
                inp,
                &bad_a,
                1
            ),
            Err(FuseError::ALen {
                len: 11,
                expected: 12,
                rank: r,
                inp
            })
        );
        // rank disagreeing with the factor lengths
        let bad_rank = Factors { rank: 3, ..f };
        assert!(matches!(
            fuse_in_place(WeightsMut::F32(&mut t), out, inp, &bad_rank, 1),
            Err(FuseError::BLen { .. })
        ));
        assert_eq!(
            fuse_from(
                Weights::F32(&base),
                WeightsMut::F16(&mut t16),
                out,
                inp,
                &f,
                1
            ),
            Err(FuseError::DTypeMismatch {
                base: "f32",
                target: "f16"
            })
        );
        assert_eq!(
            restore_from(Weights::F32(&base), WeightsMut::BF16(&mut []), 1),
            Err(FuseError::WeightLen {
                which: "target",
                len: 0,
                expected: 24,
                out: 1,
                inp: 24
            })
        );
        let bf = vec![bf16::ZERO; out * inp];
        assert_eq!(
            restore_from(Weights::BF16(&bf), WeightsMut::F16(&mut t16), 1),
            Err(FuseError::DTypeMismatch {
                base: "bf16",
                target: "f16"
            })
        );
        // errors leave the target untouched
        assert!(t.iter().all(|&x| x == 0.0));
        // messages name the problem
        let msg = FuseError::ALen {
            len: 11,
            expected: 12,
            rank: 2,
            inp: 6,
        }
        .to_string();
        assert_eq!(msg, "LoRA A has 11 elements, expected 12 for shape [2, 6]");
    }

    #[test]
    fn check_finite_finds_first_bad_value() {
        assert_eq!(check_finite("a", &[0.0, 1.0, -3.4e38]), Ok(()));
        assert_eq!(check_finite("a", &[]), Ok(()));
        let e = check_finite("up", &[0.0, f32::INFINITY, f32::NAN]).expect_err("must fail");
        assert!(matches!(e, FuseError::NonFinite { index: 1, .. }), "{e}");
        let e = check_finite("down", &[1.0, f32::NAN]).expect_err("must fail");
        assert!(matches!(e, FuseError::NonFinite { index: 1, ref name, .. } if name == "down"));
    }

    #[test]
    fn kernel_is_named() {
        assert!(["portable", "avx2+f16c"].contains(&kernel_name()));
    }
}
