//! The CPU this process runs on: its model and the instruction-set extensions that decide which
//! kernels run, read once. Every figure v2l records (a bundle's accuracy, `v2l-run --json`)
//! carries this, because the same engine takes different kernels on different CPUs.
//!
//! It also holds why an int8 engine stores its weights as u8 ([`saturation`]): ONNX Runtime
//! multiplies u8 activations by s8 weights with `vpmaddubsw` on x86-64 CPUs without VNNI
//! (AVX2, AVX-512 without VNNI). That instruction adds each pair of u8·s8 products in int16
//! and saturates (255·127·2 = 64,770 > 32,767), so full-range s8 weights lose whole products
//! there: a tiny model's int8 DiT was 1.9e-2 from PyTorch instead of 4.0e-3. VNNI
//! (`vpdpbusd`) and AMX sum in int32. With the same codes stored as u8 (zero point 128) ONNX
//! Runtime runs its u8·u8 kernel instead, on every CPU: both operands widened to int16 and
//! multiplied by `vpmaddwd`, whose pair sums are int32 (2·255·255 < 2³¹), exact.

use std::sync::OnceLock;

pub use v2l_contracts::bundle::Machine;

/// The ISA extensions v2l and ONNX Runtime choose kernels by, in the order they are listed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Isa {
    pub avx2: bool,
    pub fma: bool,
    pub avx512f: bool,
    pub avx512bw: bool,
    pub avx512vl: bool,
    pub avx512dq: bool,
    pub avx512vnni: bool,
    pub avx512bf16: bool,
    pub avxvnni: bool,
    pub amx_tile: bool,
    pub amx_int8: bool,
    pub amx_bf16: bool,
}

impl Isa {
    /// What this CPU (and its OS) enables.
    // CPUID is a safe intrinsic from Rust 1.87; the workspace builds from 1.85.
    #[allow(unused_unsafe)]
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            // AMX is read from CPUID leaf 7 (EDX bits 22, 24, 25): the feature macro does not
            // name it on stable Rust. It is reported, never relied on: every AMX CPU also has
            // AVX512-VNNI, which is what the int8 choice reads.
            // SAFETY: CPUID leaf 7 exists on every x86-64 CPU that has AVX2; on older ones it
            // returns zeros for an unsupported leaf.
            let edx = unsafe { std::arch::x86_64::__cpuid_count(7, 0) }.edx;
            Isa {
                avx2: has!("avx2"),
                fma: has!("fma"),
                avx512f: has!("avx512f"),
                avx512bw: has!("avx512bw"),
                avx512vl: has!("avx512vl"),
                avx512dq: has!("avx512dq"),
                avx512vnni: has!("avx512vnni"),
                avx512bf16: has!("avx512bf16"),
                avxvnni: has!("avxvnni"),
                amx_bf16: edx & (1 << 22) != 0,
                amx_tile: edx & (1 << 24) != 0,
                amx_int8: edx & (1 << 25) != 0,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        Isa::default()
    }

    /// The flags present, by their `/proc/cpuinfo` names.
    pub fn flags(&self) -> Vec<&'static str> {
        [
            (self.avx2, "avx2"),
            (self.fma, "fma"),
            (self.avx512f, "avx512f"),
            (self.avx512bw, "avx512bw"),
            (self.avx512vl, "avx512vl"),
            (self.avx512dq, "avx512dq"),
            (self.avx512vnni, "avx512_vnni"),
            (self.avx512bf16, "avx512_bf16"),
            (self.avxvnni, "avx_vnni"),
            (self.amx_tile, "amx_tile"),
            (self.amx_int8, "amx_int8"),
            (self.amx_bf16, "amx_bf16"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect()
    }

    /// Whether ONNX Runtime's u8·s8 GEMM on this CPU sums pairs in int32 (cannot saturate).
    /// Its MLAS picks the AVX-512 kernels when AVX512F/BW/DQ/VL are all there, and among them
    /// the VNNI one only with AVX512-VNNI; without AVX-512 it picks the AVX-VNNI kernel where
    /// that exists. Everything else (plain AVX2, AVX-512 without VNNI) pairs in int16.
    pub fn u8s8_sums_in_int32(&self) -> bool {
        let avx512 = self.avx512f && self.avx512bw && self.avx512dq && self.avx512vl;
        if avx512 {
            self.avx512vnni
        } else {
            self.avxvnni
        }
    }

    /// The int8 scheme an engine compiled here gets unless told: s8 weights where the u8·s8
    /// kernel is exact (2.0× the u8·u8 kernel's speed per 5B-width block on AVX512-VNNI), u8
    /// weights everywhere else. Such an engine runs wherever it was compiled; moved to a CPU
    /// without VNNI, a u8s8 one is refused with the fix ([`check_int8_scheme`]).
    pub fn native_int8_scheme(&self) -> v2l_contracts::bundle::Int8Scheme {
        if self.u8s8_sums_in_int32() {
            v2l_contracts::bundle::Int8Scheme::U8S8
        } else {
            v2l_contracts::bundle::Int8Scheme::U8U8
        }
    }
}

/// Whether an engine of `precision` on `backend` with int8 scheme `recorded` (its bundle's
/// `int8_scheme`) is exact on a CPU of `isa`: `Err` with the reason and the fix for an int8
/// CPU engine with s8 weights (`u8s8`, or `None`: compiled before the scheme was recorded)
/// where ONNX Runtime's u8·s8 kernel pairs products in int16.
pub fn check_int8_scheme(
    precision: v2l_contracts::bundle::Precision,
    backend: v2l_contracts::bundle::Backend,
    recorded: Option<v2l_contracts::bundle::Int8Scheme>,
    isa: &Isa,
) -> Result<(), String> {
    use v2l_contracts::bundle::{Backend, Int8Scheme, Precision};
    if precision != Precision::Int8 || backend != Backend::Cpu {
        return Ok(());
    }
    let scheme = recorded.unwrap_or(Int8Scheme::U8S8);
    if scheme == Int8Scheme::U8U8 || isa.u8s8_sums_in_int32() {
        return Ok(());
    }
    let m = this();
    Err(format!(
        "this int8 engine stores s8 weights (int8_scheme {}{}), which ONNX Runtime multiplies \
         exactly only on CPUs with AVX512-VNNI or AVX-VNNI; on this CPU ({}; {}) its u8·s8 \
         kernel saturates int16 pair sums and the DiT's output is wrong. Compile it again \
         with `v2l-compile --int8-gemm u8u8`, exact on every x86-64 CPU",
        scheme.name(),
        if recorded.is_none() {
            ", implied: compiled before the scheme was recorded"
        } else {
            ""
        },
        m.cpu,
        if m.isa.is_empty() {
            "no AVX2".to_string()
        } else {
            m.isa.join(" ")
        }
    ))
}

/// The processor's brand string (`model name` in `/proc/cpuinfo`), from CPUID.
#[allow(unused_unsafe)]
fn model_name() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::__cpuid;
        // SAFETY: CPUID is available on every x86-64 CPU; leaf 0x8000_0000 says how many
        // extended leaves exist, and the brand leaves are read only when they do.
        let max = unsafe { __cpuid(0x8000_0000) }.eax;
        if max >= 0x8000_0004 {
            let mut bytes = Vec::with_capacity(48);
            for leaf in 0x8000_0002u32..=0x8000_0004 {
                // SAFETY: as above, the leaf exists.
                let r = unsafe { __cpuid(leaf) };
                for reg in [r.eax, r.ebx, r.ecx, r.edx] {
                    bytes.extend_from_slice(&reg.to_le_bytes());
                }
            }
            let s = String::from_utf8_lossy(&bytes);
            let s = s.trim_matches(char::from(0)).trim();
            if !s.is_empty() {
                return s.split_whitespace().collect::<Vec<_>>().join(" ");
            }
        }
    }
    std::env::consts::ARCH.to_string()
}

/// This machine's CPU: model and ISA flags (read once).
pub fn this() -> &'static Machine {
    static M: OnceLock<Machine> = OnceLock::new();
    M.get_or_init(|| Machine {
        cpu: model_name(),
        isa: Isa::detect()
            .flags()
            .into_iter()
            .map(String::from)
            .collect(),
    })
}

/// Whether this CPU runs v2l's bf16 kernels (attention, VAE convolution): AVX512-F and
/// AVX512-BF16 (`vdpbf16ps`).
pub fn avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bf16");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether a bf16 kernel runs here: this CPU has AVX512-BF16 and the environment variable
/// `var` (`V2L_ATTENTION`, `V2L_CONV`) does not force its f32 fallback (`var=fp32`).
pub fn bf16_kernel_runs(var: &str) -> bool {
    let forced = std::env::var(var).is_ok_and(|v| v.eq_ignore_ascii_case("fp32"));
    !forced && avx512_bf16()
}

/// Why a bf16 kernel's f32 fallback runs: `var=fp32`, or no AVX512-BF16 here.
pub fn fp32_fallback_reason(var: &str) -> String {
    if avx512_bf16() {
        format!("{var}=fp32")
    } else {
        "this CPU has no AVX512-BF16".into()
    }
}

/// The arithmetic of the int8 GEMM kernels, to show on any CPU which one can saturate.
pub mod saturation {
    /// The largest |pair sum| of u8 activations (0..=255) times one pair of weights, as
    /// `vpmaddubsw` forms it before saturating to int16: `255·(|w₀| + |w₁|)` when the
    /// weights share a sign, else `255·max(|w₀|, |w₁|)`.
    pub fn worst_u8s8_pair(w0: i8, w1: i8) -> i32 {
        let (a, b) = (i32::from(w0), i32::from(w1));
        if (a >= 0) == (b >= 0) {
            255 * (a.abs() + b.abs())
        } else {
            255 * a.abs().max(b.abs())
        }
    }

    /// How many adjacent input pairs of an int8 weight stored `[inp, out]` (as
    /// `DynamicQuantizeMatMul` reads it; MLAS packs consecutive input rows in pairs) can
    /// saturate `vpmaddubsw` for some u8 activation: the non-VNNI U8S8 kernel's hazard.
    pub fn u8s8_saturating_pairs(q: &[i8], inp: usize, out: usize) -> usize {
        let mut n = 0;
        for i in (0..inp.saturating_sub(1)).step_by(2) {
            for o in 0..out {
                let (Some(&a), Some(&b)) = (q.get(i * out + o), q.get((i + 1) * out + o)) else {
                    continue;
                };
                if worst_u8s8_pair(a, b) > i32::from(i16::MAX) {
                    n += 1;
                }
            }
        }
        n
    }

    /// One output of the U8S8 `vpmaddubsw` + `vpmaddwd` kernel: pair sums saturated to int16,
    /// then summed in int32 (the non-VNNI path), against activation `x` and weight column `w`.
    pub fn u8s8_int16_dot(x: &[u8], w: &[i8]) -> i64 {
        x.chunks(2)
            .zip(w.chunks(2))
            .map(|(xp, wp)| {
                let s: i32 = xp
                    .iter()
                    .zip(wp)
                    .map(|(&a, &b)| i32::from(a) * i32::from(b))
                    .sum();
                i64::from(s.clamp(i32::from(i16::MIN), i32::from(i16::MAX)))
            })
            .sum()
    }

    /// One output of the U8U8 kernel ONNX Runtime runs under `session.x64quantprecision`:
    /// the s8 weight stored as u8 `w + 128` (zero point 128), both operands widened to int16
    /// and multiplied by `vpmaddwd` (int32 pair sums), the zero point taken out after.
    pub fn u8u8_dot(x: &[u8], w: &[i8]) -> i64 {
        let mut acc: i32 = 0;
        let mut xsum: i32 = 0;
        for (xp, wp) in x.chunks(2).zip(w.chunks(2)) {
            let pair: i32 = xp
                .iter()
                .zip(wp)
                .map(|(&a, &b)| i32::from(a) * (i32::from(b) + 128))
                .sum();
            acc = acc.wrapping_add(pair);
            xsum = xsum.wrapping_add(xp.iter().map(|&a| i32::from(a)).sum::<i32>());
        }
        i64::from(acc) - 128 * i64::from(xsum)
    }

    /// The exact dot product.
    pub fn exact_dot(x: &[u8], w: &[i8]) -> i64 {
        x.iter()
            .zip(w)
            .map(|(&a, &b)| i64::from(a) * i64::from(b))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::saturation::*;
    use super::*;

    /// CPUs by what ONNX Runtime's int8 dispatch reads: AVX2 only, AVX-512 without VNNI,
    /// AVX-512 with VNNI, AVX2 with AVX-VNNI.
    fn cpus() -> [Isa; 4] {
        let avx2 = Isa {
            avx2: true,
            fma: true,
            ..Isa::default()
        };
        let avx512 = Isa {
            avx512f: true,
            avx512bw: true,
            avx512vl: true,
            avx512dq: true,
            ..avx2
        };
        let vnni = Isa {
            avx512vnni: true,
            ..avx512
        };
        let alder = Isa {
            avxvnni: true,
            ..avx2
        };
        [avx2, avx512, vnni, alder]
    }

    #[test]
    fn the_u8s8_kernel_sums_in_int32_only_with_vnni() {
        let [avx2, avx512, vnni, alder] = cpus();
        for (isa, exact) in [(avx2, false), (avx512, false), (vnni, true), (alder, true)] {
            assert_eq!(isa.u8s8_sums_in_int32(), exact, "{isa:?}");
        }
    }

    /// The compile's default scheme: s8 weights only where they are exact, so an engine
    /// compiled with the default always opens on the CPU that compiled it.
    #[test]
    fn the_native_scheme_is_s8_only_with_vnni_and_always_opens_here() {
        use v2l_contracts::bundle::{Backend, Int8Scheme, Precision};
        let [avx2, avx512, vnni, alder] = cpus();
        for (isa, want) in [
            (avx2, Int8Scheme::U8U8),
            (avx512, Int8Scheme::U8U8),
            (vnni, Int8Scheme::U8S8),
            (alder, Int8Scheme::U8S8),
        ] {
            let scheme = isa.native_int8_scheme();
            assert_eq!(scheme, want, "{isa:?}");
            assert!(check_int8_scheme(Precision::Int8, Backend::Cpu, Some(scheme), &isa).is_ok());
        }
    }

    /// s8-weight int8 engines (`u8s8`, and int8 CPU engines from before the scheme was
    /// recorded) are refused where the u8·s8 kernel saturates, with the fix; `u8u8` engines,
    /// other precisions and GPU engines are never refused.
    #[test]
    fn s8_weight_engines_are_refused_only_where_u8s8_saturates() {
        use v2l_contracts::bundle::{Backend, Int8Scheme, Precision};
        let [avx2, _, vnni, _] = cpus();
        let check = |scheme, precision, backend, isa: &Isa| {
            check_int8_scheme(precision, backend, scheme, isa)
        };
        for scheme in [Some(Int8Scheme::U8S8), None] {
            let e = check(scheme, Precision::Int8, Backend::Cpu, &avx2)
                .expect_err("refused without VNNI");
            assert!(
                e.contains("--int8-gemm u8u8") && e.contains("saturates"),
                "{e}"
            );
            assert_eq!(e.contains("implied"), scheme.is_none(), "{e}");
            assert!(check(scheme, Precision::Int8, Backend::Cpu, &vnni).is_ok());
        }
        for (scheme, precision, backend) in [
            (Some(Int8Scheme::U8U8), Precision::Int8, Backend::Cpu),
            (None, Precision::Int4, Backend::Cpu),
            (None, Precision::Int8, Backend::TensorRt),
        ] {
            assert!(
                check(scheme, precision, backend, &avx2).is_ok(),
                "{precision:?}"
            );
        }
    }

    #[test]
    fn this_machine_is_named_with_its_flags() {
        let m = this();
        assert!(!m.cpu.is_empty());
        // The flags listed are the ones detected, in order, with no repeats.
        let isa = Isa::detect();
        assert_eq!(m.isa, isa.flags());
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            m.isa.iter().any(|f| f == "avx512_vnni"),
            std::arch::is_x86_feature_detected!("avx512vnni")
        );
    }

    /// Random int8 weights of one `[out, inp]` layer quantised as engines are (v2l-graphs'
    /// `quantize_int8_per_output`, laid out `[inp, out]`), from a deterministic generator with
    /// a few outlier rows, as trained weights have.
    fn int8_layer(out: usize, inp: usize, seed: u64) -> Vec<i8> {
        let mut s = seed;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        let w: Vec<f32> = (0..out * inp)
            .map(|i| next() * if i % 97 == 0 { 8.0 } else { 1.0 })
            .collect();
        let mut q = vec![0i8; out * inp];
        let mut scale = vec![0f32; out];
        v2l_graphs::quant::quantize_int8_per_output(&w, out, inp, &mut q, &mut scale)
            .expect("finite weights");
        q
    }

    /// The DiT's linear shapes (`[out, inp]`) at CogVideoX-5B and Wan2.1-1.3B width (one of
    /// each kind: attention projections, feed-forward in and out), and the demo model's.
    const SHAPES: [(usize, usize); 7] = [
        (3072, 3072),
        (12288, 3072),
        (3072, 12288),
        (1536, 1536),
        (8960, 1536),
        (1536, 8960),
        (32, 128),
    ];

    /// On the real layer shapes: the engines' full-range s8 weights can saturate the non-VNNI
    /// u8s8 kernel (that is the defect), and the kernel v2l runs there, u8u8, cannot: its pair
    /// sums and the whole K-long accumulation fit int32 for every u8 activation. The emulated
    /// kernels are checked against the exact product on the worst activations.
    #[test]
    fn full_range_int8_weights_saturate_u8s8_pairs_but_never_u8u8() {
        for (n, &(out, inp)) in SHAPES.iter().enumerate() {
            // Only the first 64 output columns of the large layers: the hazard is per pair.
            let q = int8_layer(out, inp, n as u64 + 1);
            let cols = out.min(64);
            let sub: Vec<i8> = (0..inp)
                .flat_map(|i| q[i * out..i * out + cols].to_vec())
                .collect();
            let hazards = u8s8_saturating_pairs(&sub, inp, cols);
            assert!(hazards > 0, "{out}x{inp}: no u8s8 pair can saturate?");
            // u8u8: the largest pair sum is 2·255·255 and the accumulation K·255·255, both
            // below 2³¹ for every K here.
            assert!(2 * 255 * 255 < i64::from(i32::MAX));
            assert!((inp as i64) * 255 * 255 < i64::from(i32::MAX), "{inp}");
            // The worst activation for each column: 255 where the weight is positive, 0 where
            // it is negative (every same-sign positive pair at its maximum).
            let mut saturated_cols = 0;
            for o in 0..cols {
                let w: Vec<i8> = (0..inp).map(|i| sub[i * cols + o]).collect();
                let x: Vec<u8> = w.iter().map(|&v| if v > 0 { 255 } else { 0 }).collect();
                let exact = exact_dot(&x, &w);
                assert_eq!(u8u8_dot(&x, &w), exact, "{out}x{inp} col {o}");
                if u8s8_int16_dot(&x, &w) != exact {
                    saturated_cols += 1;
                }
            }
            assert!(
                saturated_cols > 0,
                "{out}x{inp}: the u8s8 emulation lost nothing"
            );
        }
        // 7-bit weights (|w| <= 64) would not saturate either: 255·128 = 32,640.
        assert_eq!(worst_u8s8_pair(64, 64), 32_640);
        assert_eq!(worst_u8s8_pair(127, 127), 64_770);
        assert_eq!(worst_u8s8_pair(127, -127), 32_385);
    }
}
