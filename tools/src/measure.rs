//! Which effect a clip shows, measured directly from its pixels (no model): the Rust twin of
//! `training/measure.py`, same algorithm, same constants, in f64.
//!
//! For every consecutive frame pair the global motion is fitted as a similarity transform
//! `x' = (1 + a)·x − b·y + tx`, `y' = b·x + (1 + a)·y + ty` (centred pixel coordinates, y down)
//! by Levenberg–Marquardt on blurred luma normalised per frame, coarse to fine over a 3-level
//! pyramid; where the full-resolution fit is poor (residual above `GOOD_FIT`) it is retried
//! from the identity and from the previous pair's motion, and the lowest residual wins. On the
//! aligned pair it measures the normalised cross-correlation (NCC) of lightly blurred luma, the
//! hue rotation (angle of the YIQ chroma correlation) and the brightness ratio. Summed over the
//! clip: rotation (degrees, + = clockwise), log zoom, pan (content motion of the image centre,
//! in pixels of a 64-px frame, from the composed transforms), hue rotation (degrees), log gain,
//! and the NCC's upper quartile (numpy's default linear-interpolation percentile).
//!
//! Each quantity divided by its nominal magnitude in `training/effects.py` (`ROTATION_DEG` 90°,
//! `ZOOM` ×1.5, `PAN_PX` 24 px, `HUE_DEG` 150°, `FADE_TO` ×0.1; zoom and fade as logs) is a
//! signed score per effect of [`EFFECTS`]; the largest wins, or [`NONE`] when it is below
//! [`MIN_SCORE`] (0.3) or frames do not align (NCC below [`MIN_NCC`], 0.5: noise, cuts), with
//! confidence 1 − s₁/0.3 or 1 − NCC/0.5. Otherwise confidence = min(s₁, 1) · (1 − max(s₂, 0)/s₁)
//! · NCC, s₂ the runner-up or the vertical pan (which no effect explains), if larger.
//!
//! numpy semantics are reproduced where they decide the numbers: pairwise summation for sums and
//! means, `np.gradient`, `np.pad(mode="reflect")`, the bilinear sampler's clamping, LM's λ
//! schedule and stopping rules. What cannot be reproduced bit for bit (BLAS's summation order
//! and FMA use in matrix products, LAPACK's elimination order) moves results by rounding only.

use v2l_runtime::error::{Result, RuntimeError};
use v2l_runtime::video::Frames;

/// The effects of `training/effects.py`, in its order.
pub const EFFECTS: [&str; 8] = [
    "rotate_cw",
    "rotate_ccw",
    "zoom_in",
    "zoom_out",
    "pan_left",
    "pan_right",
    "hue_shift",
    "fade_black",
];
/// The label of a clip that shows none of [`EFFECTS`] (or nothing that aligns).
pub const NONE: &str = "none";
/// A winning score below this (30 % of the nominal magnitude) means [`NONE`].
pub const MIN_SCORE: f64 = 0.3;
/// Consecutive frames whose aligned correlation (upper quartile) is below this are unrelated.
pub const MIN_NCC: f64 = 0.5;
/// The smallest frame side: the 3-level pyramid's coarsest level must keep 2 pixels.
pub const MIN_SIDE: usize = 8;

// Nominal full-clip magnitudes of effects.py (scores are measured / nominal).
const ROTATION_DEG: f64 = 90.0;
const ZOOM: f64 = 1.5;
const PAN_PX: f64 = 24.0;
const HUE_DEG: f64 = 150.0;
const FADE_TO: f64 = 0.1;
/// Pair fit residual (normalised luma) above which other initial guesses are tried.
const GOOD_FIT: f64 = 0.05;
const LEVELS: usize = 3;
const LM_ITERS: usize = 10;
const BORDER: usize = 2;
const BLUR_RADIUS: usize = 3; // ceil(3σ), σ = 1

const LUMA: [f64; 3] = [0.299, 0.587, 0.114];
/// The I and Q rows of effects.py's RGB → YIQ matrix.
const RGB2IQ: [[f64; 3]; 2] = [
    [0.595716, -0.274453, -0.321263],
    [0.211456, -0.522591, 0.311135],
];

/// The clip's accumulated global motion and colour change (raw units, as measure.py's
/// `motion_stats`).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Motion {
    /// Summed rotation, degrees, + = content turns clockwise.
    pub rotation_deg: f64,
    /// Summed log scale, + = content grows.
    pub log_zoom: f64,
    /// Content motion of the image centre, pixels of a 64-px-wide frame, + = right.
    pub pan_x: f64,
    /// Likewise vertical, + = down.
    pub pan_y: f64,
    /// Summed hue rotation, degrees.
    pub hue_deg: f64,
    /// Summed log brightness ratio, − = darkening.
    pub log_gain: f64,
    /// Upper quartile of the aligned pairs' correlation: near 1 when frames are related.
    pub ncc: f64,
}

/// What [`measure`] found.
#[derive(Clone, Debug, PartialEq)]
pub struct Measurement {
    /// One of [`EFFECTS`], or [`NONE`].
    pub label: &'static str,
    /// In [0, 1]; for [`NONE`], how clearly nothing matched.
    pub confidence: f64,
    /// Signed evidence per effect, in [`EFFECTS`] order (1.0 = the nominal magnitude).
    pub scores: [(&'static str, f64); 8],
    pub motion: Motion,
}

/// Detects the effect of an RGB8 clip (values /255, as measure.py's uint8 path).
///
/// An error if the clip has fewer than 2 frames, a side below [`MIN_SIDE`], or a buffer that is
/// not `frames × height × width × 3` bytes.
pub fn measure(clip: &Frames) -> Result<Measurement> {
    let motion = motion_stats(clip)?;
    let scores = scores_from_motion(&motion);
    Ok(classify(scores, &motion))
}

fn invalid(message: String) -> RuntimeError {
    RuntimeError::Invalid {
        what: "clip".into(),
        message,
    }
}

// ------------------------------------------------------------------------- numpy semantics

/// numpy's pairwise summation (`np.sum`/`np.mean` of a contiguous float64 array): 8 running
/// sums for blocks up to 128, halves (multiples of 8) above, a plain loop under 8.
fn pairwise_sum(a: &[f64]) -> f64 {
    let n = a.len();
    if n < 8 {
        a.iter().fold(-0.0, |s, &x| s + x)
    } else if n <= 128 {
        let mut blocks = a.chunks_exact(8);
        let mut r = [0.0f64; 8];
        if let Some(first) = blocks.next() {
            r.copy_from_slice(first);
        }
        for block in blocks.by_ref() {
            for (acc, &x) in r.iter_mut().zip(block) {
                *acc += x;
            }
        }
        let [r0, r1, r2, r3, r4, r5, r6, r7] = r;
        let s = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7));
        blocks.remainder().iter().fold(s, |s, &x| s + x)
    } else {
        let half = n / 2;
        let (lo, hi) = a.split_at(half - half % 8);
        pairwise_sum(lo) + pairwise_sum(hi)
    }
}

fn mean(a: &[f64]) -> f64 {
    pairwise_sum(a) / a.len() as f64
}

/// `np.std` (population): the mean of squared deviations, pairwise-summed.
fn std(a: &[f64], m: f64) -> f64 {
    let sq: Vec<f64> = a.iter().map(|&x| (x - m) * (x - m)).collect();
    (pairwise_sum(&sq) / a.len() as f64).sqrt()
}

/// `np.pad(mode="reflect")` source index of padded position `i` (may be out of range) on an
/// axis of length `n`: mirror about the end samples without repeating them, repeatedly when
/// the pad is longer than the axis; a single sample is repeated (numpy's legacy rule).
fn reflect(i: isize, n: usize) -> usize {
    if n <= 1 {
        return 0;
    }
    let period = 2 * (n as isize - 1);
    let m = i.rem_euclid(period);
    (if m >= n as isize { period - m } else { m }) as usize
}

/// One luma or gradient image, row-major.
#[derive(Clone, Debug)]
struct Plane {
    h: usize,
    w: usize,
    v: Vec<f64>,
}

/// measure.py's `_gauss_blur` with σ = 1: a normalised 7-tap Gaussian, rows then columns,
/// reflect-padded, taps accumulated in order.
#[allow(clippy::indexing_slicing)] // every index is `reflect`ed into the plane or < h·w
fn blur(p: &Plane) -> Plane {
    let k = kernel();
    let (h, w) = (p.h, p.w);
    let r = BLUR_RADIUS as isize;
    let mut rows = vec![0.0; h * w];
    for y in 0..h {
        for x in 0..w {
            let mut acc = 0.0;
            for (i, kv) in k.iter().enumerate() {
                let yy = reflect(y as isize + i as isize - r, h);
                acc += kv * p.v[yy * w + x];
            }
            rows[y * w + x] = acc;
        }
    }
    let mut out = vec![0.0; h * w];
    for y in 0..h {
        let row = &rows[y * w..(y + 1) * w];
        for x in 0..w {
            let mut acc = 0.0;
            for (i, kv) in k.iter().enumerate() {
                acc += kv * row[reflect(x as isize + i as isize - r, w)];
            }
            out[y * w + x] = acc;
        }
    }
    Plane { h, w, v: out }
}

/// `exp(-½ t²)` for t = −3..3, divided by its (sequential, 7-term) sum.
fn kernel() -> [f64; 2 * BLUR_RADIUS + 1] {
    let mut k = [0.0; 2 * BLUR_RADIUS + 1];
    for (i, kv) in k.iter_mut().enumerate() {
        let t = (i as f64 - BLUR_RADIUS as f64) / 1.0;
        *kv = (-0.5 * (t * t)).exp();
    }
    let s = k.iter().fold(-0.0, |s, &x| s + x);
    k.map(|x| x / s)
}

/// measure.py's `_down2`: 2×2 means after cropping to even sides.
#[allow(clippy::indexing_slicing)] // 2y + 1 < h and 2x + 1 < w
fn down2(p: &Plane) -> Plane {
    let (h, w) = (p.h / 2, p.w / 2);
    let mut v = Vec::with_capacity(h * w);
    for y in 0..h {
        for x in 0..w {
            let at = |dy: usize, dx: usize| p.v[(2 * y + dy) * p.w + 2 * x + dx];
            v.push(0.25 * (((at(0, 0) + at(1, 0)) + at(0, 1)) + at(1, 1)));
        }
    }
    Plane { h, w, v }
}

/// `(img − mean) / (std + 1e-6)`.
fn normalise(mut p: Plane) -> Plane {
    let m = mean(&p.v);
    let s = std(&p.v, m) + 1e-6;
    for x in &mut p.v {
        *x = (*x - m) / s;
    }
    p
}

/// `np.gradient`: central differences inside, one-sided at the edges; `(d/dy, d/dx)`.
/// Needs both sides ≥ 2 (every pyramid level has them).
#[allow(clippy::indexing_slicing)] // neighbours are clamped into the plane
fn gradient(p: &Plane) -> (Plane, Plane) {
    let (h, w) = (p.h, p.w);
    let at = |y: usize, x: usize| p.v[y * w + x];
    let diff = |lo: f64, hi: f64, central: bool| {
        if central {
            (hi - lo) / 2.0
        } else {
            (hi - lo) / 1.0
        }
    };
    let mut gy = Vec::with_capacity(h * w);
    let mut gx = Vec::with_capacity(h * w);
    for y in 0..h {
        let (y0, y1) = (y.saturating_sub(1), (y + 1).min(h - 1));
        for x in 0..w {
            let (x0, x1) = (x.saturating_sub(1), (x + 1).min(w - 1));
            gy.push(diff(at(y0, x), at(y1, x), y1 - y0 == 2));
            gx.push(diff(at(y, x0), at(y, x1), x1 - x0 == 2));
        }
    }
    (Plane { h, w, v: gy }, Plane { h, w, v: gx })
}

/// Where one bilinear sample reads (measure.py's `_sample`): coordinates clamped into the
/// image, the top-left corner at most `w − 2` / `h − 2`, and whether the point was inside.
#[derive(Clone, Copy, Debug)]
struct Tap {
    at: usize,
    fx: f64,
    fy: f64,
    inside: bool,
}

impl Tap {
    /// Needs `h, w ≥ 2`. A NaN coordinate reads pixel 0 and is outside.
    fn new(h: usize, w: usize, x: f64, y: f64) -> Tap {
        let (wm, hm) = ((w - 1) as f64, (h - 1) as f64);
        let inside = x >= 0.0 && x <= wm && y >= 0.0 && y <= hm;
        let (x, y) = (x.clamp(0.0, wm), y.clamp(0.0, hm));
        // `as` saturates (NaN → 0), so the corner is always a valid pixel.
        let x0 = (x.floor() as usize).min(w - 2);
        let y0 = (y.floor() as usize).min(h - 2);
        Tap {
            at: y0 * w + x0,
            fx: x - x0 as f64,
            fy: y - y0 as f64,
            inside,
        }
    }

    /// The sample of `v` (row stride `w`), in measure.py's order of terms.
    #[allow(clippy::indexing_slicing)] // `at` is a corner with x0 ≤ w − 2, y0 ≤ h − 2
    fn read(&self, v: &[f64], w: usize) -> f64 {
        let (fx, fy) = (self.fx, self.fy);
        v[self.at] * (1.0 - fx) * (1.0 - fy)
            + v[self.at + 1] * fx * (1.0 - fy)
            + v[self.at + w] * (1.0 - fx) * fy
            + v[self.at + w + 1] * fx * fy
    }
}

/// The interior pixels (a `BORDER` frame dropped) in centred coordinates, row-major.
struct Grid {
    x: Vec<f64>,
    y: Vec<f64>,
    /// Row-major index of each grid point in the full image.
    at: Vec<usize>,
    cx: f64,
    cy: f64,
}

impl Grid {
    fn new(h: usize, w: usize) -> Grid {
        let (cx, cy) = ((w as f64 - 1.0) / 2.0, (h as f64 - 1.0) / 2.0);
        let (mut x, mut y, mut at) = (Vec::new(), Vec::new(), Vec::new());
        for row in BORDER..h.saturating_sub(BORDER) {
            for col in BORDER..w.saturating_sub(BORDER) {
                x.push(col as f64 - cx);
                y.push(row as f64 - cy);
                at.push(row * w + col);
            }
        }
        Grid { x, y, at, cx, cy }
    }

    /// The taps of every grid point warped by `p` (measure.py's `_warp_coords`).
    fn warp(&self, p: &[f64; 4], h: usize, w: usize) -> Vec<Tap> {
        let [a, b, tx, ty] = *p;
        self.x
            .iter()
            .zip(&self.y)
            .map(|(&x, &y)| {
                let wx = (1.0 + a) * x - b * y + tx + self.cx;
                let wy = b * x + (1.0 + a) * y + ty + self.cy;
                Tap::new(h, w, wx, wy)
            })
            .collect()
    }
}

// ------------------------------------------------------------------------------ pair motion

/// One pyramid level of a frame pair, ready for `fit`: the template `I0` on the grid and the
/// image `I1` with its gradients.
struct Level<'a> {
    h: usize,
    w: usize,
    grid: Grid,
    template: Vec<f64>,
    img: &'a Plane,
    gx: Plane,
    gy: Plane,
}

/// The residuals of a warp and what the Jacobian needs, at the inside points.
struct Residuals {
    r: Vec<f64>,
    gx: Vec<f64>,
    gy: Vec<f64>,
    x: Vec<f64>,
    y: Vec<f64>,
}

impl<'a> Level<'a> {
    fn new(i0: &Plane, i1: &'a Plane) -> Level<'a> {
        let grid = Grid::new(i0.h, i0.w);
        let template = grid
            .at
            .iter()
            .map(|&i| i0.v.get(i).copied().unwrap_or(0.0))
            .collect();
        let (gy, gx) = gradient(i1);
        Level {
            h: i1.h,
            w: i1.w,
            grid,
            template,
            img: i1,
            gx,
            gy,
        }
    }

    /// Mean squared residual of `I1(W(x)) − I0(x)` over the points that land inside, or ∞
    /// (and nothing to fit) when fewer than 16 do.
    fn evaluate(&self, p: &[f64; 4]) -> (f64, Option<Residuals>) {
        let taps = self.grid.warp(p, self.h, self.w);
        let mut d = Residuals {
            r: Vec::with_capacity(taps.len()),
            gx: Vec::with_capacity(taps.len()),
            gy: Vec::with_capacity(taps.len()),
            x: Vec::with_capacity(taps.len()),
            y: Vec::with_capacity(taps.len()),
        };
        for (((t, &tv), &x), &y) in taps
            .iter()
            .zip(&self.template)
            .zip(&self.grid.x)
            .zip(&self.grid.y)
        {
            if t.inside {
                d.r.push(t.read(&self.img.v, self.w) - tv);
                d.gx.push(t.read(&self.gx.v, self.w));
                d.gy.push(t.read(&self.gy.v, self.w));
                d.x.push(x);
                d.y.push(y);
            }
        }
        if d.r.len() < 16 {
            return (f64::INFINITY, None);
        }
        let sq: Vec<f64> = d.r.iter().map(|r| r * r).collect();
        (mean(&sq), Some(d))
    }

    /// Levenberg–Marquardt fit of `p = (a, b, tx, ty)` with `I1(W(x)) ≈ I0(x)`, from `p`
    /// (clamped to ±0.5, ±0.5, ±w/3, ±h/3): `(p, mean squared residual)`.
    fn fit(&self, p: [f64; 4]) -> ([f64; 4], f64) {
        let lim = [0.5, 0.5, self.w as f64 / 3.0, self.h as f64 / 3.0];
        let clamp = |p: [f64; 4]| {
            let mut out = p;
            for (v, l) in out.iter_mut().zip(lim) {
                *v = v.clamp(-l, l);
            }
            out
        };
        let mut p = clamp(p);
        let (mut cost, mut data) = self.evaluate(&p);
        let mut lam = 1e-3;
        for _ in 0..LM_ITERS {
            let Some(d) = data.as_ref() else { break };
            let (h, g) = normal_equations(d);
            let (dp, pn, cn, dn) = loop {
                let mut a = h;
                for (i, row) in a.iter_mut().enumerate() {
                    if let Some(v) = row.get_mut(i) {
                        *v += lam * (*v + 1e-9);
                    }
                }
                // H + λ·diag(H) + λ·1e-9 is positive definite: singular only on NaN, where
                // numpy raises; stopping here keeps the last good fit instead.
                let Some(x) = solve4(a, g) else {
                    return (p, cost);
                };
                let dp = x.map(|v| -v);
                let mut pn = p;
                for (v, d) in pn.iter_mut().zip(dp) {
                    *v += d;
                }
                let pn = clamp(pn);
                let (cn, dn) = self.evaluate(&pn);
                if cn <= cost {
                    lam = f64::max(lam / 10.0, 1e-6);
                    break (dp, pn, cn, dn);
                }
                lam *= 10.0;
                if lam > 1e4 {
                    return (p, cost);
                }
            };
            (p, cost, data) = (pn, cn, dn);
            let [da, db, dtx, dty] = dp;
            if da.abs() < 1e-5 && db.abs() < 1e-5 && dtx.abs() < 1e-3 && dty.abs() < 1e-3 {
                break;
            }
        }
        (p, cost)
    }
}

/// `JᵀJ` and `Jᵀr` of the similarity's Jacobian `[gx·x + gy·y, −gx·y + gy·x, gx, gy]`.
fn normal_equations(d: &Residuals) -> ([[f64; 4]; 4], [f64; 4]) {
    let mut h = [[0.0; 4]; 4];
    let mut g = [0.0; 4];
    for ((((&r, &gx), &gy), &x), &y) in d.r.iter().zip(&d.gx).zip(&d.gy).zip(&d.x).zip(&d.y) {
        let j = [gx * x + gy * y, -gx * y + gy * x, gx, gy];
        for ((row, gi), ji) in h.iter_mut().zip(g.iter_mut()).zip(j) {
            for (hv, jk) in row.iter_mut().zip(j) {
                *hv += ji * jk;
            }
            *gi += ji * r;
        }
    }
    (h, g)
}

/// Solves the 4 × 4 system `a·x = b` by Gaussian elimination with partial pivoting (as
/// `np.linalg.solve`'s LAPACK `gesv`); `None` if a pivot is zero or NaN.
#[allow(clippy::indexing_slicing)] // fixed 4 × 4 arrays, every index < 4
fn solve4(mut a: [[f64; 4]; 4], mut b: [f64; 4]) -> Option<[f64; 4]> {
    for col in 0..4 {
        let mut piv = col;
        for row in col + 1..4 {
            if a[row][col].abs() > a[piv][col].abs() {
                piv = row;
            }
        }
        if a[piv][col].is_nan() || a[piv][col] == 0.0 {
            return None;
        }
        a.swap(col, piv);
        b.swap(col, piv);
        for row in col + 1..4 {
            let f = a[row][col] / a[col][col];
            let pivot_row = a[col];
            for (v, p) in a[row].iter_mut().zip(pivot_row).skip(col) {
                *v -= f * p;
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = [0.0; 4];
    for row in (0..4).rev() {
        let mut s = b[row];
        for k in row + 1..4 {
            s -= a[row][k] * x[k];
        }
        x[row] = s / a[row][row];
    }
    Some(x)
}

/// The pyramid of one frame from its blurred luma: normalised, then blurred and halved.
fn pyramid(blurred: &Plane) -> Vec<Plane> {
    let mut pyr = vec![normalise(blurred.clone())];
    while pyr.len() < LEVELS {
        let next = pyr.last().map(|p| down2(&blur(p)));
        pyr.extend(next);
    }
    pyr
}

/// The similarity mapping frame-0 coordinates to frame-1 coordinates (content motion):
/// coarse to fine from the identity; if the full-resolution residual exceeds `GOOD_FIT`, also
/// full resolution alone from the identity and from `prior`; the lowest residual wins (the
/// first on ties, as Python's `min`).
fn pair_motion(pyr0: &[Plane], pyr1: &[Plane], prior: Option<[f64; 4]>) -> [f64; 4] {
    let mut p = [0.0; 4];
    for lvl in (1..LEVELS).rev() {
        if let (Some(i0), Some(i1)) = (pyr0.get(lvl), pyr1.get(lvl)) {
            p = Level::new(i0, i1).fit(p).0;
            p[2] *= 2.0;
            p[3] *= 2.0;
        }
    }
    let (Some(i0), Some(i1)) = (pyr0.first(), pyr1.first()) else {
        return p;
    };
    let full = Level::new(i0, i1);
    let mut best = full.fit(p);
    if best.1 > GOOD_FIT {
        let others = [Some([0.0; 4]), prior];
        for start in others.into_iter().flatten() {
            let c = full.fit(start);
            if c.1 < best.1 {
                best = c;
            }
        }
    }
    best.0
}

// -------------------------------------------------------------------------------- measuring

/// One frame ready for measuring: R, G, B in [0, 1], its blurred luma and luma pyramid.
struct Frame {
    rgb: [Vec<f64>; 3],
    blurred: Plane,
    pyramid: Vec<Plane>,
}

impl Frame {
    /// From `h × w` RGB8 pixels (values /255, as measure.py's uint8 path).
    fn new(raw: &[u8], h: usize, w: usize) -> Frame {
        let px = h * w;
        let mut rgb = [
            Vec::with_capacity(px),
            Vec::with_capacity(px),
            Vec::with_capacity(px),
        ];
        let mut luma = Vec::with_capacity(px);
        for p in raw.chunks_exact(3) {
            let [r, g, b] = [0, 1, 2].map(|c| p.get(c).map_or(0.0, |&v| f64::from(v) / 255.0));
            for (plane, v) in rgb.iter_mut().zip([r, g, b]) {
                plane.push(v);
            }
            luma.push(luma_of(r, g, b));
        }
        let blurred = blur(&Plane { h, w, v: luma });
        let pyramid = pyramid(&blurred);
        Frame {
            rgb,
            blurred,
            pyramid,
        }
    }
}

fn luma_of(r: f64, g: f64, b: f64) -> f64 {
    r * LUMA[0] + g * LUMA[1] + b * LUMA[2]
}

/// Refuses clips the measurement cannot run on (before any work).
fn check(clip: &Frames) -> Result<()> {
    let (f, h, w) = (clip.frames, clip.height, clip.width);
    if f < 2 {
        return Err(invalid(format!(
            "{f} frame(s); measuring an effect needs at least 2"
        )));
    }
    if h < MIN_SIDE || w < MIN_SIDE {
        return Err(invalid(format!(
            "frames are {h}×{w}; measuring an effect needs at least {MIN_SIDE}×{MIN_SIDE}"
        )));
    }
    if f.checked_mul(h * w).and_then(|n| n.checked_mul(3)) != Some(clip.rgb.len()) {
        return Err(invalid(format!(
            "{} bytes for {f} frames of {h}×{w} RGB",
            clip.rgb.len()
        )));
    }
    Ok(())
}

/// measure.py's `motion_stats`: the clip's accumulated motion and colour change. Frames are
/// converted as the pairs reach them, so memory holds two frames in f64, not the clip.
fn motion_stats(clip: &Frames) -> Result<Motion> {
    check(clip)?;
    let (h, w) = (clip.height, clip.width);
    let mut frames = clip
        .rgb
        .chunks_exact(h * w * 3)
        .map(|raw| Frame::new(raw, h, w));
    let Some(mut f0) = frames.next() else {
        return Err(invalid("no frames".into()));
    };
    let grid = Grid::new(h, w);
    let (mut rot, mut logz, mut hue, mut logg) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    let mut m = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
    let mut nccs = Vec::with_capacity(clip.frames - 1);
    let mut prior = None;
    for f1 in frames {
        let p = pair_motion(&f0.pyramid, &f1.pyramid, prior);
        prior = Some(p);
        let [a, b, tx, ty] = p;
        rot += b.atan2(1.0 + a);
        logz += (1.0 + a).hypot(b).max(1e-3).ln();
        m = matmul3(&[[1.0 + a, -b, tx], [b, 1.0 + a, ty], [0.0, 0.0, 1.0]], &m);
        match compare_aligned(&f0, &f1, &grid, &p, h, w) {
            Some(c) => {
                nccs.push(c.ncc);
                logg += c.log_gain;
                hue += c.hue;
            }
            None => nccs.push(0.0),
        }
        f0 = f1;
    }
    // Python's math.degrees multiplies by the double 180/π (Rust's to_degrees uses another).
    let degrees = |x: f64| x * (180.0 / std::f64::consts::PI);
    // Translation of the image centre in units of a 64-px frame.
    let s64 = 64.0 / w as f64;
    Ok(Motion {
        rotation_deg: degrees(rot),
        log_zoom: logz,
        pan_x: m[0][2] * s64,
        pan_y: m[1][2] * s64,
        hue_deg: degrees(hue),
        log_gain: logg,
        // Upper quartile: a fade's last, nearly black frames may be noise-dominated.
        ncc: percentile(&mut nccs, 0.75),
    })
}

/// What one aligned pair shows beyond its motion.
struct Aligned {
    ncc: f64,
    log_gain: f64,
    /// Radians.
    hue: f64,
}

/// Aligns frame 1 to frame 0 by `p`, then compares structure (NCC of the blurred luma),
/// brightness (log ratio of mean luma) and chroma (hue angle); `None` when fewer than 16 grid
/// points land inside frame 1.
fn compare_aligned(
    f0: &Frame,
    f1: &Frame,
    grid: &Grid,
    p: &[f64; 4],
    h: usize,
    w: usize,
) -> Option<Aligned> {
    let taps = grid.warp(p, h, w);
    let inside: Vec<(&Tap, usize)> = taps
        .iter()
        .zip(&grid.at)
        .filter(|(t, _)| t.inside)
        .map(|(t, &i)| (t, i))
        .collect();
    if inside.len() < 16 {
        return None;
    }
    let pick = |v: &[f64], i: usize| v.get(i).copied().unwrap_or(0.0);
    let rgb0: Vec<[f64; 3]> = inside
        .iter()
        .map(|&(_, i)| f0.rgb.each_ref().map(|c| pick(c, i)))
        .collect();
    let rgb1: Vec<[f64; 3]> = inside
        .iter()
        .map(|(t, _)| f1.rgb.each_ref().map(|c| t.read(c, w)))
        .collect();
    // Structure: NCC of the lightly blurred luma.
    let b0: Vec<f64> = inside
        .iter()
        .map(|&(_, i)| pick(&f0.blurred.v, i))
        .collect();
    let b1: Vec<f64> = inside
        .iter()
        .map(|(t, _)| t.read(&f1.blurred.v, w))
        .collect();
    let (m0, m1) = (mean(&b0), mean(&b1));
    let d0: Vec<f64> = b0.iter().map(|v| v - m0).collect();
    let d1: Vec<f64> = b1.iter().map(|v| v - m1).collect();
    let dot = |x: &[f64], y: &[f64]| {
        let prod: Vec<f64> = x.iter().zip(y).map(|(a, b)| a * b).collect();
        pairwise_sum(&prod)
    };
    let ncc = dot(&d0, &d1) / ((dot(&d0, &d0) * dot(&d1, &d1)).sqrt() + 1e-12);
    // Brightness: ratio of mean luma.
    let l0: Vec<f64> = rgb0.iter().map(|&[r, g, b]| luma_of(r, g, b)).collect();
    let l1: Vec<f64> = rgb1.iter().map(|&[r, g, b]| luma_of(r, g, b)).collect();
    let log_gain = (mean(&l1).max(1e-4) / mean(&l0).max(1e-4)).ln();
    // Hue: angle of Σ conj(c0)·c1 over the YIQ chroma c = I + iQ.
    let (mut re, mut im) = (0.0f64, 0.0f64);
    for (c0, c1) in rgb0.iter().zip(&rgb1) {
        let [i0, q0] = chroma(c0);
        let [i1, q1] = chroma(c1);
        re += i0 * i1 + q0 * q1;
        im += i0 * q1 - q0 * i1;
    }
    let hue = if re.hypot(im) > 1e-9 {
        im.atan2(re)
    } else {
        0.0
    };
    Some(Aligned { ncc, log_gain, hue })
}

/// The (I, Q) chroma of an RGB triple.
fn chroma(rgb: &[f64; 3]) -> [f64; 2] {
    RGB2IQ.map(|row| row[0] * rgb[0] + row[1] * rgb[1] + row[2] * rgb[2])
}

/// `a · b` of 3 × 3 matrices.
fn matmul3(a: &[[f64; 3]; 3], b: &[[f64; 3]; 3]) -> [[f64; 3]; 3] {
    let mut c = [[0.0; 3]; 3];
    for (crow, arow) in c.iter_mut().zip(a) {
        for (j, cv) in crow.iter_mut().enumerate() {
            *cv = arow
                .iter()
                .zip(b)
                .map(|(av, brow)| av * brow.get(j).copied().unwrap_or(0.0))
                .fold(0.0, |s, x| s + x);
        }
    }
    c
}

/// `np.percentile(v, 100·q)` with numpy's default linear method (its `_lerp`: from the lower
/// neighbour below t = ½, from the upper one above); 0 for no values. Sorts `v`.
fn percentile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let Some(&last) = v.last() else {
        return 0.0;
    };
    let virt = (n as f64 - 1.0) * q;
    if virt >= n as f64 - 1.0 {
        return last;
    }
    let lo = virt.floor();
    let t = virt - lo;
    let below = v.get(lo as usize).copied().unwrap_or(last);
    let above = v.get(lo as usize + 1).copied().unwrap_or(last);
    let diff = above - below;
    if t >= 0.5 {
        above - diff * (1.0 - t)
    } else {
        below + diff * t
    }
}

/// Signed, nominal-normalised evidence for each effect, in [`EFFECTS`] order.
fn scores_from_motion(mo: &Motion) -> [(&'static str, f64); 8] {
    let r = mo.rotation_deg / ROTATION_DEG;
    let z = mo.log_zoom / ZOOM.ln();
    let px = mo.pan_x / PAN_PX;
    let h = mo.hue_deg.abs() / HUE_DEG;
    let f = mo.log_gain / FADE_TO.ln();
    let values = [r, -r, z, -z, -px, px, h, f];
    let mut out = [("", 0.0); 8];
    for ((o, name), v) in out.iter_mut().zip(EFFECTS).zip(values) {
        *o = (name, v);
    }
    out
}

/// The label and confidence from the scores (measure.py's `measure`).
fn classify(scores: [(&'static str, f64); 8], mo: &Motion) -> Measurement {
    let mut ranked = scores;
    // Stable and descending, as Python's `sorted(..., reverse=True)`: ties keep EFFECTS order.
    ranked.sort_by(|x, y| y.1.partial_cmp(&x.1).unwrap_or(std::cmp::Ordering::Equal));
    let [(top, s1), (_, s2), ..] = ranked;
    // Unlisted motion (vertical pan) also counts against a confident answer.
    let s2 = f64::max(s2, mo.pan_y.abs() / PAN_PX);
    let (label, confidence) = if mo.ncc < MIN_NCC {
        (NONE, 1.0 - mo.ncc / MIN_NCC)
    } else if s1 < MIN_SCORE {
        (NONE, 1.0 - s1 / MIN_SCORE)
    } else {
        let conf = s1.min(1.0) * (1.0 - s2.max(0.0) / s1) * mo.ncc.clamp(0.0, 1.0);
        (top, conf)
    };
    Measurement {
        label,
        confidence: confidence.clamp(0.0, 1.0),
        scores,
        motion: *mo,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A textured pattern (three oblique gratings and a blob) seen through a similarity: screen
    /// point s shows scene point R(−angle)·(s − pan)/scale, so content turns by +angle
    /// (clockwise), grows by `scale` and moves right by `pan`.
    fn render(f: usize, side: usize, motion: impl Fn(f64) -> (f64, f64, f64)) -> Frames {
        let c = (side as f64 - 1.0) / 2.0;
        let mut rgb = Vec::with_capacity(f * side * side * 3);
        for k in 0..f {
            let (angle, scale, pan) = motion(k as f64);
            let (ca, sa) = (angle.cos(), angle.sin());
            for y in 0..side {
                for x in 0..side {
                    let (ux, uy) = ((x as f64 - c - pan) / scale, (y as f64 - c) / scale);
                    let (sx, sy) = (ca * ux + sa * uy, -sa * ux + ca * uy);
                    let v = 0.5
                        + 0.15 * (0.31 * sx + 0.17 * sy).sin()
                        + 0.12 * (-0.23 * sx + 0.37 * sy + 1.0).sin()
                        + 0.1 * (0.13 * sx - 0.41 * sy + 2.0).sin()
                        + 0.1 * (-((sx - 6.0).powi(2) + (sy + 4.0).powi(2)) / 50.0).exp();
                    let px = [v, 0.8 * v + 0.1, 1.0 - v];
                    rgb.extend(px.map(|p| (p.clamp(0.0, 1.0) * 255.0).round() as u8));
                }
            }
        }
        Frames {
            frames: f,
            height: side,
            width: side,
            rgb,
        }
    }

    #[test]
    fn numpy_pairwise_sum_and_reflect() {
        // Under 8 terms: left to right. 8..=128: eight running sums. Above: halves.
        let a: Vec<f64> = (0..300).map(|i| 1.0 / (1.0 + i as f64)).collect();
        assert_eq!(
            pairwise_sum(&a[..5]),
            (((a[0] + a[1]) + a[2]) + a[3]) + a[4]
        );
        let mut r = [0.0; 8];
        for (i, v) in a[..20].iter().enumerate().take(16) {
            r[i % 8] += v;
        }
        let s = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        assert_eq!(
            pairwise_sum(&a[..20]),
            (((s + a[16]) + a[17]) + a[18]) + a[19]
        );
        assert_eq!(
            pairwise_sum(&a),
            pairwise_sum(&a[..144]) + pairwise_sum(&a[144..])
        );
        // np.pad(np.arange(n), 3, mode="reflect")
        let pad = |n: usize| {
            (-3..n as isize + 3)
                .map(|i| reflect(i, n))
                .collect::<Vec<_>>()
        };
        assert_eq!(pad(1), vec![0; 7]);
        assert_eq!(pad(2), vec![1, 0, 1, 0, 1, 0, 1, 0]);
        assert_eq!(pad(3), vec![1, 2, 1, 0, 1, 2, 1, 0, 1]);
        assert_eq!(pad(5), vec![3, 2, 1, 0, 1, 2, 3, 4, 3, 2, 1]);
    }

    #[test]
    fn numpy_percentile_linear() {
        // np.percentile([3, 1, 4, 1, 5], 75) = 4.0; of [0, 1, 10], 75 → 5.5; one value → it.
        assert_eq!(percentile(&mut [3.0, 1.0, 4.0, 1.0, 5.0], 0.75), 4.0);
        assert_eq!(percentile(&mut [10.0, 0.0, 1.0], 0.75), 5.5);
        assert_eq!(percentile(&mut [0.25], 0.75), 0.25);
    }

    #[test]
    fn solve4_pivots() {
        let a = [
            [0.0, 2.0, 0.0, 0.0],
            [1.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 3.0, 1.0],
            [0.0, 0.0, 1.0, 2.0],
        ];
        let x = solve4(a, [4.0, 1.0, 7.0, 9.0]).unwrap();
        for (got, want) in x.iter().zip([1.0, 2.0, 1.0, 4.0]) {
            assert!((got - want).abs() < 1e-12, "{x:?}");
        }
        assert!(solve4([[0.0; 4]; 4], [1.0; 4]).is_none());
    }

    #[test]
    fn a_pure_translation_is_recovered() {
        // 1.5 px right per pair over 8 pairs: 12 px on a 64-px frame, half the nominal pan.
        let m = measure(&render(9, 64, |k| (0.0, 1.0, 1.5 * k))).unwrap();
        assert_eq!(m.label, "pan_right", "{m:?}");
        let mo = m.motion;
        assert!((mo.pan_x - 12.0).abs() < 0.2, "{mo:?}");
        assert!(
            mo.pan_y.abs() < 0.2 && mo.rotation_deg.abs() < 0.3,
            "{mo:?}"
        );
        assert!(mo.log_zoom.abs() < 0.01 && mo.ncc > 0.99, "{mo:?}");
    }

    #[test]
    fn a_rotation_and_a_zoom_are_recovered() {
        let cw = measure(&render(9, 64, |k| ((5.0 * k).to_radians(), 1.0, 0.0))).unwrap();
        assert_eq!(cw.label, "rotate_cw", "{cw:?}");
        assert!((cw.motion.rotation_deg - 40.0).abs() < 1.0, "{cw:?}");
        let ccw = measure(&render(9, 64, |k| ((-5.0 * k).to_radians(), 1.0, 0.0))).unwrap();
        assert_eq!(ccw.label, "rotate_ccw", "{ccw:?}");
        let zoom = measure(&render(9, 64, |k| (0.0, 1.04f64.powf(k), 0.0))).unwrap();
        assert_eq!(zoom.label, "zoom_in", "{zoom:?}");
        assert!(
            (zoom.motion.log_zoom - 8.0 * 1.04f64.ln()).abs() < 0.01,
            "{zoom:?}"
        );
    }

    #[test]
    fn a_static_clip_is_none() {
        let m = measure(&render(5, 32, |_| (0.0, 1.0, 0.0))).unwrap();
        assert_eq!(m.label, NONE, "{m:?}");
        assert!(
            m.motion.rotation_deg.abs() < 1e-6 && m.motion.ncc > 0.99,
            "{m:?}"
        );
        // Constant frames: nothing to fit, nothing moves, still no panic.
        let flat = Frames {
            frames: 3,
            height: 8,
            width: 8,
            rgb: vec![128; 3 * 8 * 8 * 3],
        };
        assert_eq!(measure(&flat).unwrap().label, NONE);
    }

    #[test]
    fn too_few_frames_or_pixels_are_errors() {
        let one = render(1, 16, |_| (0.0, 1.0, 0.0));
        let e = measure(&one).unwrap_err().to_string();
        assert!(e.contains("at least 2"), "{e}");
        let small = render(3, 7, |_| (0.0, 1.0, 0.0));
        let e = measure(&small).unwrap_err().to_string();
        assert!(e.contains("at least 8×8"), "{e}");
        let mut short = render(3, 16, |_| (0.0, 1.0, 0.0));
        short.rgb.pop();
        assert!(measure(&short).is_err());
        // The smallest accepted size runs (its coarsest level has nothing to fit).
        assert!(measure(&render(2, 8, |k| (0.0, 1.0, k))).is_ok());
    }
}
