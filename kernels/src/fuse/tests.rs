//! The fuse kernel against a scalar reference: every dtype, rank and path, bit for bit.

use super::elem::*;
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

/// Stored factors in each type, checked in chunks: the first failing element is found past the
/// first chunk, named by kind (not finite, or beyond an fp16 engine's range), and a limit
/// never admits what is not finite.
#[test]
fn check_factor_bytes_finds_the_first_failure_by_kind() {
    use v2l_graphs::DType;
    let bytes = |v: &[f32], dtype: DType| -> Vec<u8> {
        match dtype {
            DType::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            DType::F16 => v
                .iter()
                .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                .collect(),
            _ => v
                .iter()
                .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                .collect(),
        }
    };
    let fp16 = Some(65504.0);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let mut v = vec![0.5f32; 3000];
        v[2999] = -60000.0;
        let b = bytes(&v, dtype);
        assert_eq!(check_factor_bytes("a", &b, dtype, None), Ok(()), "{dtype}");
        assert_eq!(check_factor_bytes("a", &b, dtype, fp16), Ok(()), "{dtype}");
        let e = check_factor_bytes("a", &b, dtype, Some(1.0)).expect_err("past 1");
        assert!(
            matches!(e, FuseError::BeyondLimit { index: 2999, limit, .. } if limit == 1.0),
            "{dtype}: {e}"
        );
        for (bad, at) in [
            (f32::NAN, 2100),
            (f32::INFINITY, 1500),
            (f32::NEG_INFINITY, 7),
        ] {
            let mut w = v.clone();
            w[at] = bad;
            let b = bytes(&w, dtype);
            for limit in [None, fp16, Some(f32::INFINITY)] {
                let e = check_factor_bytes("up", &b, dtype, limit).expect_err("not finite");
                assert!(
                    matches!(e, FuseError::NonFinite { index, ref name, .. } if index == at && name == "up"),
                    "{dtype} {limit:?}: {e}"
                );
            }
        }
    }
    // f32's 1e6 passes bf16 (its range is f32's) but not an fp16 engine's limit.
    let b = bytes(&[1e6], DType::BF16);
    assert!(check_factor_bytes("a", &b, DType::BF16, None).is_ok());
    assert!(check_factor_bytes("a", &b, DType::BF16, fp16).is_err());
    assert!(check_factor_bytes("a", &[0, 0, 0, 0], DType::I8, None).is_err());
}

#[test]
fn kernel_is_named() {
    assert!(["portable", "avx2+f16c"].contains(&kernel_name()));
}
