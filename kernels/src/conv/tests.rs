use super::*;

/// A plain loop for the tests: every index, in order.
fn serial(n: usize, f: &(dyn Fn(usize) + Sync)) {
    (0..n).for_each(f)
}

/// Deterministic values in [-1, 1).
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 23) as f32) - 1.0
        })
        .collect()
}

/// The convolution by definition, in f64, of `x` and `w` as given (`round` first rounds both
/// to bf16).
fn reference(shape: &Shape, x: &[f32], w: &[f32], bias: &[f32], round: bool) -> Vec<f32> {
    let r = |v: f32| {
        if round {
            f32::from_bits(bf16_bits(v) << 16) as f64
        } else {
            v as f64
        }
    };
    let [t, h, wd] = shape.input;
    let [kt, kh, kw] = shape.kernel;
    let [ph, pw] = shape.pads;
    let [to, ho, wo] = shape.output().expect("fits");
    let mut out = vec![0f32; shape.output_len()];
    for b in 0..shape.batch {
        for co in 0..shape.cout {
            for (ti, hi, wi) in
                (0..to).flat_map(|a| (0..ho).flat_map(move |c| (0..wo).map(move |d| (a, c, d))))
            {
                let mut s = bias[co] as f64;
                for ci in 0..shape.cin {
                    for dt in 0..kt {
                        for dh in 0..kh {
                            for dw in 0..kw {
                                let (y, xx) = (
                                    (hi + dh) as isize - ph as isize,
                                    (wi + dw) as isize - pw as isize,
                                );
                                if y < 0 || xx < 0 || y >= h as isize || xx >= wd as isize {
                                    continue;
                                }
                                let xi = (((b * shape.cin + ci) * t + ti + dt) * h + y as usize)
                                    * wd
                                    + xx as usize;
                                let wi_ =
                                    (co * shape.cin + ci) * shape.taps() + (dt * kh + dh) * kw + dw;
                                s += r(x[xi]) * r(w[wi_]);
                            }
                        }
                    }
                }
                out[(((b * shape.cout + co) * to + ti) * ho + hi) * wo + wi] = s as f32;
            }
        }
    }
    out
}

fn bf16_bits(x: f32) -> u32 {
    let b = x.to_bits();
    (b + 0x7fff + ((b >> 16) & 1)) >> 16
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// Shapes that reach every tail: odd channel counts (a pair with zero), output channels past
/// the last whole tile of 6, rows that end inside a pixel vector, 2-D and 1×1×1 kernels, more
/// than one sample and frame.
fn shapes() -> Vec<Shape> {
    // (batch, cin, cout, input [t, h, w], kernel [t, h, w], pads [h, w])
    let table = [
        (2, 5, 7, [4, 6, 37], [3, 3, 3], [1, 1]),
        (1, 16, 12, [3, 5, 64], [3, 3, 3], [1, 1]),
        (3, 9, 13, [1, 7, 70], [1, 3, 3], [1, 1]),
        (1, 8, 3, [2, 4, 20], [1, 1, 1], [0, 0]),
        (1, 4, 6, [3, 5, 9], [2, 3, 3], [0, 0]),
    ];
    (table.iter())
        .map(|&(batch, cin, cout, input, kernel, pads)| Shape {
            batch,
            cin,
            cout,
            input,
            kernel,
            pads,
        })
        .collect()
}

fn run(
    kernel: Kernel,
    shape: &Shape,
    seed: u64,
) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Kernel) {
    let x = noise(shape.input_len(), seed);
    let w = noise(shape.weight_len(), seed + 1);
    let bias = noise(shape.cout, seed + 2);
    let weights = Weights::new(kernel, shape, &w).expect("weights fit");
    let mut out = vec![f32::NAN; shape.output_len()];
    conv(shape, &x, &weights, &bias, &mut out, &serial).expect("shape fits");
    (x, w, bias, out, weights.kernel())
}

#[test]
fn the_f32_kernel_is_the_convolution_on_every_cpu() {
    for (i, shape) in shapes().iter().enumerate() {
        let (x, w, bias, out, ran) = run(Kernel::Fp32, shape, 10 * i as u64);
        assert_eq!(ran, Kernel::Fp32);
        let e = rel_l2(&out, &reference(shape, &x, &w, &bias, false));
        assert!(e < 1e-6, "{shape:?}: {e:e}");
    }
}

#[test]
fn the_bf16_kernel_is_the_convolution_of_bf16_values_with_f32_sums() {
    if !crate::cpu::avx512_bf16() {
        eprintln!("skipped: this CPU has no AVX512-BF16 (the f32 kernel runs; tested above)");
        let (_, _, _, _, ran) = run(Kernel::Bf16, &shapes()[0], 1);
        assert_eq!(
            ran,
            Kernel::Fp32,
            "bf16 weights on a CPU without AVX512-BF16"
        );
        return;
    }
    for (i, shape) in shapes().iter().enumerate() {
        let (x, w, bias, out, ran) = run(Kernel::Bf16, shape, 10 * i as u64);
        assert_eq!(ran, Kernel::Bf16);
        // Against the same bf16 inputs summed in f64: only the f32 sums differ.
        let rounded = reference(shape, &x, &w, &bias, true);
        let e = rel_l2(&out, &rounded);
        assert!(
            e < 1e-6,
            "{shape:?}: {e:e} from the bf16-rounded convolution"
        );
        // Against the f32 convolution: bf16's 8 significant bits.
        let exact = reference(shape, &x, &w, &bias, false);
        let e = rel_l2(&out, &exact);
        assert!(
            e > 1e-5 && e < 1e-2,
            "{shape:?}: {e:e} from the f32 convolution"
        );
    }
}

#[test]
fn a_shape_the_buffers_do_not_fit_is_refused() {
    let shape = shapes()[0];
    let w = noise(shape.weight_len(), 1);
    let bias = noise(shape.cout, 2);
    let weights = Weights::new(Kernel::Fp32, &shape, &w).expect("fits");
    let x = noise(shape.input_len(), 3);
    let mut out = vec![0f32; shape.output_len()];
    assert!(conv(&shape, &x[1..], &weights, &bias, &mut out, &serial).is_err());
    assert!(conv(&shape, &x, &weights, &bias[1..], &mut out, &serial).is_err());
    assert!(conv(&shape, &x, &weights, &bias, &mut out[1..], &serial).is_err());
    assert!(Weights::new(Kernel::Fp32, &shape, &w[1..]).is_err());
    let tiny = Shape {
        input: [1, 1, 1],
        ..shape
    };
    let mut none = vec![];
    let x = noise(tiny.input_len(), 3);
    assert!(conv(&tiny, &x, &weights, &bias, &mut none, &serial).is_err());
}
