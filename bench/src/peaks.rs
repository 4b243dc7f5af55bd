//! This CPU's ceilings for the multiply-adds the DiT's kernels are built from: register-only
//! loops, no memory traffic, every thread busy, the best of three runs.
//!
//! Two groups:
//! - the AVX-512 instructions v2l's attention kernels use (`vdpbf16ps`, `vpdpbusd`);
//! - the AVX2 (ymm) cells an AVX2-only CPU is left with: the f32 FMA, and the two int8 cells
//!   ONNX Runtime's MLAS multiplies with where VNNI is missing (u8·u8: `vpmaddwd` + `vpaddd`;
//!   u8·s8: `vpmaddubsw` + `vpmaddwd` by ones + `vpaddd`), plus the s8·s8 cell an int8 q·kᵀ
//!   would need there (`vpsignb` first). Their ratios say what int8 can gain over f32 on such
//!   a CPU: measured here too, since AVX-512 CPUs run the same ymm code.

/// One instruction cell whose rate is measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cell {
    /// `vdpbf16ps zmm`: 16 lanes × 2 bf16 products.
    Bf16Dp,
    /// `vpdpbusd zmm`: 16 lanes × 4 u8·s8 products.
    Int8Vnni,
    /// `vfmadd231ps ymm`: 8 f32 products.
    F32FmaYmm,
    /// `vpmaddwd ymm` + `vpaddd`: 16 s16 products (MLAS's u8·u8 cell).
    U8U8Ymm,
    /// `vpmaddubsw ymm` + `vpmaddwd` by ones + `vpaddd`: 32 u8·s8 products (MLAS's u8·s8 cell
    /// without VNNI, whose int16 pair sums saturate).
    U8S8Ymm,
    /// `vpsignb` + the u8·s8 cell: 32 s8·s8 products that cannot saturate (|q|·±k, codes
    /// within ±127).
    S8S8Ymm,
}

impl Cell {
    /// Multiply-adds one cell performs; ops are twice that.
    fn products(self) -> usize {
        match self {
            Cell::Bf16Dp => 32,
            Cell::Int8Vnni => 64,
            Cell::F32FmaYmm => 8,
            Cell::U8U8Ymm => 16,
            Cell::U8S8Ymm | Cell::S8S8Ymm => 32,
        }
    }

    /// Whether this CPU has the instructions.
    #[cfg(target_arch = "x86_64")]
    fn runs(self) -> bool {
        use std::arch::is_x86_feature_detected as has;
        match self {
            Cell::Bf16Dp => has!("avx512bf16"),
            Cell::Int8Vnni => has!("avx512vnni"),
            Cell::F32FmaYmm => has!("avx2") && has!("fma"),
            Cell::U8U8Ymm | Cell::U8S8Ymm | Cell::S8S8Ymm => has!("avx2"),
        }
    }

    /// Runs `iters` iterations of `CELLS` independent cells.
    ///
    /// # Safety
    /// The CPU must have the cell's instructions ([`Cell::runs`]).
    #[cfg(target_arch = "x86_64")]
    unsafe fn spin(self, iters: usize) {
        match self {
            Cell::Bf16Dp => avx512::bf16(iters),
            Cell::Int8Vnni => avx512::vnni(iters),
            Cell::F32FmaYmm => avx2::fma(iters),
            Cell::U8U8Ymm => avx2::u8u8(iters),
            Cell::U8S8Ymm => avx2::u8s8(iters),
            Cell::S8S8Ymm => avx2::s8s8(iters),
        }
    }
}

/// Cells per loop iteration, in every loop below.
const CELLS: usize = 16;

/// The peak of `cell` in G multiply-add ops per second (2 per product), on `threads` threads;
/// `None` where the CPU lacks it.
#[cfg(target_arch = "x86_64")]
pub fn peak(cell: Cell, threads: usize) -> Option<f64> {
    if !cell.runs() {
        return None;
    }
    let iters = 20_000_000;
    let ops = (threads.max(1) * iters * CELLS * cell.products() * 2) as f64;
    // A peak is the best of a few runs: a thread started late or a core lent to another
    // process only ever lowers one.
    let rate = || {
        let t = std::time::Instant::now();
        std::thread::scope(|s| {
            for _ in 0..threads.max(1) {
                // SAFETY: `cell.runs()` was checked above.
                s.spawn(move || unsafe { cell.spin(iters) });
            }
        });
        ops / t.elapsed().as_secs_f64() / 1e9
    };
    (0..3).map(|_| rate()).reduce(f64::max)
}

#[cfg(not(target_arch = "x86_64"))]
pub fn peak(_cell: Cell, _threads: usize) -> Option<f64> {
    None
}

/// `$ins DST, SRC, SRC` for each destination: one instruction of each chain.
#[cfg(target_arch = "x86_64")]
macro_rules! chains {
    ($ins:literal, $src:literal; $($dst:literal),+) => {
        concat!($($ins, " ", $dst, ", ", $src, ", ", $src, "\n"),+)
    };
}

/// The loops are `asm!`: the compiler may not hoist a product of constant operands out of
/// them, nor spill an accumulator (16 of them were spilled to the stack once, which halved
/// the rate this reported before 2026-11-26).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::asm;

    /// A loop of 16 independent `$ins zmmN, zmm16, zmm16` chains (latency covered at two per
    /// cycle).
    macro_rules! zmm_loop {
        ($iters:expr, $ins:literal) => {
            asm!(
                "vpxord zmm16, zmm16, zmm16",
                "2:",
                chains!($ins, "zmm16"; "zmm0", "zmm1", "zmm2", "zmm3", "zmm4", "zmm5", "zmm6",
                    "zmm7", "zmm8", "zmm9", "zmm10", "zmm11", "zmm12", "zmm13", "zmm14", "zmm15"),
                "dec {n}",
                "jnz 2b",
                n = inout(reg) $iters => _,
                out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _,
                out("zmm4") _, out("zmm5") _, out("zmm6") _, out("zmm7") _,
                out("zmm8") _, out("zmm9") _, out("zmm10") _, out("zmm11") _,
                out("zmm12") _, out("zmm13") _, out("zmm14") _, out("zmm15") _,
                out("zmm16") _,
                options(nostack, nomem),
            )
        };
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn bf16(iters: usize) {
        zmm_loop!(iters, "vdpbf16ps");
    }

    #[target_feature(enable = "avx512f,avx512vnni")]
    pub(super) unsafe fn vnni(iters: usize) {
        zmm_loop!(iters, "vpdpbusd");
    }
}

/// AVX2 cells in the 16 ymm registers an AVX2-only CPU has. The integer cells accumulate
/// into 8 registers by `vpaddd` (one cycle of latency, so few chains suffice); their products
/// go through temporaries that register renaming keeps independent.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::asm;

    /// 12 `vfmadd231ps` chains (latency 4 at two per cycle needs 8).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn fma(iters: usize) {
        // 16 FMAs an iteration over 12 registers: the first four chains take two each.
        asm!(
            "vxorps ymm15, ymm15, ymm15",
            "2:",
            chains!("vfmadd231ps", "ymm15"; "ymm0", "ymm1", "ymm2", "ymm3", "ymm4", "ymm5",
                "ymm6", "ymm7", "ymm8", "ymm9", "ymm10", "ymm11", "ymm0", "ymm1", "ymm2", "ymm3"),
            "dec {n}",
            "jnz 2b",
            n = inout(reg) iters => _,
            out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _,
            out("ymm4") _, out("ymm5") _, out("ymm6") _, out("ymm7") _,
            out("ymm8") _, out("ymm9") _, out("ymm10") _, out("ymm11") _,
            out("ymm15") _,
            options(nostack, nomem),
        );
    }

    /// The sixteen (accumulator, temporary) pairs of a loop iteration: accumulators ymm0–ymm7
    /// twice, temporaries cycling over ymm8–ymm11.
    macro_rules! sixteen {
        ($cell:ident) => {
            concat!(
                $cell!("0", "8"),
                $cell!("1", "9"),
                $cell!("2", "10"),
                $cell!("3", "11"),
                $cell!("4", "8"),
                $cell!("5", "9"),
                $cell!("6", "10"),
                $cell!("7", "11"),
                $cell!("0", "8"),
                $cell!("1", "9"),
                $cell!("2", "10"),
                $cell!("3", "11"),
                $cell!("4", "8"),
                $cell!("5", "9"),
                $cell!("6", "10"),
                $cell!("7", "11"),
            )
        };
    }

    /// `vpaddd`: temporary `$t` into accumulator `$a`.
    macro_rules! add {
        ($a:literal, $t:literal) => {
            concat!("vpaddd ymm", $a, ", ymm", $a, ", ymm", $t, "\n")
        };
    }
    /// `vpmaddwd` by words of 1 (ymm14): the temporary's int16 pair sums, widened to int32.
    macro_rules! widen {
        ($t:literal) => {
            concat!("vpmaddwd ymm", $t, ", ymm", $t, ", ymm14\n")
        };
    }

    // The cells; ymm12 and ymm13 hold the data.
    macro_rules! u8u8_cell {
        ($a:literal, $t:literal) => {
            concat!("vpmaddwd ymm", $t, ", ymm12, ymm13\n", add!($a, $t))
        };
    }
    macro_rules! u8s8_cell {
        ($a:literal, $t:literal) => {
            concat!(
                "vpmaddubsw ymm",
                $t,
                ", ymm12, ymm13\n",
                widen!($t),
                add!($a, $t)
            )
        };
    }
    macro_rules! s8s8_cell {
        ($a:literal, $t:literal) => {
            concat!(
                "vpsignb ymm",
                $t,
                ", ymm13, ymm12\n",
                "vpmaddubsw ymm",
                $t,
                ", ymm12, ymm",
                $t,
                "\n",
                widen!($t),
                add!($a, $t)
            )
        };
    }

    /// A loop of sixteen `$cell`s.
    macro_rules! int_loop {
        ($iters:expr, $cell:ident) => {
            asm!(
                "vpxor ymm12, ymm12, ymm12",
                "vpxor ymm13, ymm13, ymm13",
                "vpcmpeqw ymm14, ymm14, ymm14",
                "vpsrlw ymm14, ymm14, 15",
                "2:",
                sixteen!($cell),
                "dec {n}",
                "jnz 2b",
                n = inout(reg) $iters => _,
                out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _,
                out("ymm4") _, out("ymm5") _, out("ymm6") _, out("ymm7") _,
                out("ymm8") _, out("ymm9") _, out("ymm10") _, out("ymm11") _,
                out("ymm12") _, out("ymm13") _, out("ymm14") _,
                options(nostack, nomem),
            )
        };
    }

    /// `vpmaddwd` + `vpaddd`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn u8u8(iters: usize) {
        int_loop!(iters, u8u8_cell);
    }

    /// `vpmaddubsw` + `vpmaddwd` by ones + `vpaddd`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn u8s8(iters: usize) {
        int_loop!(iters, u8s8_cell);
    }

    /// `vpsignb` + `vpmaddubsw` + `vpmaddwd` by ones + `vpaddd`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn s8s8(iters: usize) {
        int_loop!(iters, s8s8_cell);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every cell this CPU has runs: the feature checks in `runs` match the instructions
    /// each loop uses (a mismatch is an illegal instruction here, not in a bench run).
    #[test]
    fn every_cell_this_cpu_has_measures() {
        for cell in [
            Cell::Bf16Dp,
            Cell::Int8Vnni,
            Cell::F32FmaYmm,
            Cell::U8U8Ymm,
            Cell::U8S8Ymm,
            Cell::S8S8Ymm,
        ] {
            #[cfg(target_arch = "x86_64")]
            if cell.runs() {
                // SAFETY: checked just above.
                unsafe { cell.spin(1000) };
            }
        }
    }
}
