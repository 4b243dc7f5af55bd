//! A convolution's shape and the zero-padded row layout both kernels read.

use crate::attention::ParFor;

/// The shape of one convolution: stride 1, no dilation, one group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub batch: usize,
    pub cin: usize,
    pub cout: usize,
    /// Input frames, height, width (one frame for a 2-D convolution).
    pub input: [usize; 3],
    /// Kernel frames, height, width.
    pub kernel: [usize; 3],
    /// Zeros added on both sides of height and of width.
    pub pads: [usize; 2],
}

impl Shape {
    /// Output frames, height, width; `None` where the kernel is larger than the padded input.
    pub fn output(&self) -> Option<[usize; 3]> {
        let [t, h, w] = self.input;
        let [kt, kh, kw] = self.kernel;
        let [ph, pw] = self.pads;
        Some([
            (t + 1).checked_sub(kt)?,
            (h + 2 * ph + 1).checked_sub(kh)?,
            (w + 2 * pw + 1).checked_sub(kw)?,
        ])
    }

    pub(super) fn taps(&self) -> usize {
        self.kernel.iter().product()
    }

    pub(super) fn input_len(&self) -> usize {
        self.batch * self.cin * self.input.iter().product::<usize>()
    }

    pub(super) fn weight_len(&self) -> usize {
        self.cout * self.cin * self.taps()
    }

    pub(super) fn output_len(&self) -> usize {
        self.output()
            .map_or(0, |o| self.batch * self.cout * o.iter().product::<usize>())
    }

    /// Padded height and the padded row length the kernels read: whole 16-pixel output vectors
    /// plus the kernel's reach, so no load runs past a row.
    pub(super) fn padded_rows(&self) -> (usize, usize) {
        let [_, h, _] = self.input;
        let [_, _, kw] = self.kernel;
        let [_, _, wo] = self.output().unwrap_or([0; 3]);
        (h + 2 * self.pads[0], wo.div_ceil(16) * 16 + kw - 1)
    }
}

/// How [`pack_rows`] makes one padded row: `fill(first channel's row, second's, dst)`.
pub(super) type RowFill<'a, E> = dyn Fn(&[f32], Option<&[f32]>, &mut [E]) + Sync + 'a;

/// The input copied once into zero-padded rows laid out for the kernels' inner loops:
/// `[sample][frame][padded row][group][padded column]`, where a group is `group` (1 or 2)
/// channels of one pixel made one element by `fill(first channel's row, second's, dst)`.
/// Returns the copy and its strides (row, frame).
pub(super) fn pack_rows<E: Copy + Default + Send + Sync>(
    shape: &Shape,
    x: &[f32],
    group: usize,
    par: ParFor<'_>,
    fill: &RowFill<'_, E>,
) -> Vec<E> {
    let [t, h, w] = shape.input;
    let (hp, ws) = shape.padded_rows();
    let groups = shape.cin.div_ceil(group);
    let mut data = vec![E::default(); shape.batch * t * hp * groups * ws];
    struct Dst<E>(*mut E);
    // SAFETY: each task writes only its own input row's elements (disjoint ranges below).
    unsafe impl<E> Sync for Dst<E> {}
    let dst = Dst(data.as_mut_ptr());
    let plane = t * h * w;
    par(shape.batch * t * h, &|i| {
        let (b, r) = (i / (t * h), i % (t * h));
        let (ti, hi) = (r / h, r % h);
        let dst = &dst;
        let src = |c: usize| {
            let at = (b * shape.cin + c) * plane + (ti * h + hi) * w;
            &x[at..at + w]
        };
        for gi in 0..groups {
            let c = gi * group;
            let second = (group == 2 && c + 1 < shape.cin).then(|| src(c + 1));
            let at = (((b * t + ti) * hp + hi + shape.pads[0]) * groups + gi) * ws + shape.pads[1];
            // SAFETY: `at + w ≤ data.len()` (ws ≥ w + 2·pad), and this range belongs to this
            // task's row alone.
            let row = unsafe { std::slice::from_raw_parts_mut(dst.0.add(at), w) };
            fill(src(c), second, row);
        }
    });
    data
}
