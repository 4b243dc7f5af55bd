"""Direct (non-learned) measurement of which effect a clip shows.

For every consecutive frame pair the global motion is fitted as a similarity transform
    x' = (1 + a) x - b y + tx,   y' = b x + (1 + a) y + ty      (centred pixel coords, y down)
by Gauss-Newton on per-frame-normalised, blurred luma, coarse to fine over a 3-level pyramid.
The normalised cross-correlation (NCC) of the aligned pair (lightly blurred luma; upper quartile
over the clip) says whether consecutive frames are related at all. On the aligned pair we also measure the hue rotation (angle of the YIQ chroma
correlation) and the brightness ratio. Summed over the clip this gives rotation (deg, + =
clockwise), log-zoom, pan (px, content motion), hue rotation (deg) and log-gain, which are divided
by the nominal magnitudes of effects.py; the largest signed score wins, "none" if it is too small
or frames do not align (noise).

    python training/measure.py --validate          # accuracy on seeded clips of effects.py
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from effects import (  # noqa: E402
    EFFECTS, FADE_TO, HUE_DEG, PAN_PX, ROTATION_DEG, ZOOM, _RGB2YIQ, make_clip, noise_clip,
)

NONE = "none"
LABELS = EFFECTS + [NONE]
MIN_SCORE = 0.3  # a winning score below this (30 % of the nominal magnitude) -> "none"
MIN_NCC = 0.5  # upper-quartile aligned correlation of consecutive frames below this -> "none"
GOOD_FIT = 0.05  # pair fit residual (normalised luma) above this -> also try other initial guesses

_LUMA = np.array([0.299, 0.587, 0.114])


@dataclass
class Measurement:
    label: str
    confidence: float
    scores: dict = field(default_factory=dict)  # effect -> signed normalised magnitude
    motion: dict = field(default_factory=dict)  # accumulated raw measurements


# ------------------------------------------------------------------------------------- helpers


def _gauss_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    r = max(1, int(math.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    for axis in (0, 1):
        p = np.pad(img, [(r, r) if ax == axis else (0, 0) for ax in range(img.ndim)], mode="reflect")
        n = img.shape[axis]
        img = sum(w * np.take(p, np.arange(i, i + n), axis=axis) for i, w in enumerate(k))
    return img


def _down2(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[0] // 2 * 2, img.shape[1] // 2 * 2
    img = img[:h, :w]
    return 0.25 * (img[0::2, 0::2] + img[1::2, 0::2] + img[0::2, 1::2] + img[1::2, 1::2])


def _sample(img: np.ndarray, X: np.ndarray, Y: np.ndarray):
    """Bilinear sample of img [H, W(, C)] at pixel coords (X, Y); returns (values, inside-mask)."""
    h, w = img.shape[:2]
    inside = (X >= 0) & (X <= w - 1) & (Y >= 0) & (Y <= h - 1)
    X, Y = np.clip(X, 0, w - 1), np.clip(Y, 0, h - 1)
    x0, y0 = np.minimum(np.floor(X).astype(int), w - 2), np.minimum(np.floor(Y).astype(int), h - 2)
    fx, fy = X - x0, Y - y0
    if img.ndim == 3:
        fx, fy = fx[..., None], fy[..., None]
    v = (img[y0, x0] * (1 - fx) * (1 - fy) + img[y0, x0 + 1] * fx * (1 - fy)
         + img[y0 + 1, x0] * (1 - fx) * fy + img[y0 + 1, x0 + 1] * fx * fy)
    return v, inside


def _grid(h: int, w: int, border: int):
    ys, xs = np.mgrid[border:h - border, border:w - border].astype(np.float64)
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    return xs - cx, ys - cy, cx, cy


def _warp_coords(p, x, y, cx, cy):
    a, b, tx, ty = p
    return (1 + a) * x - b * y + tx + cx, b * x + (1 + a) * y + ty + cy


def _fit_level(I0, I1, p, iters=10, border=2):
    """Levenberg-Marquardt fit of the similarity p = (a, b, tx, ty) with I1(W(x)) ~ I0(x).
    Returns (p, mean squared residual)."""
    x, y, cx, cy = _grid(*I0.shape, border)
    T = I0[border:I0.shape[0] - border, border:I0.shape[1] - border]
    gy_img, gx_img = np.gradient(I1)
    grads = np.stack([I1, gx_img, gy_img], axis=-1)
    lim = np.array([0.5, 0.5, I0.shape[1] / 3, I0.shape[0] / 3])

    def evaluate(p):
        X, Y = _warp_coords(p, x, y, cx, cy)
        v, m = _sample(grads, X, Y)
        if m.sum() < 16:
            return np.inf, None
        r = (v[..., 0] - T)[m]
        return float(np.mean(r * r)), (r, v[..., 1][m], v[..., 2][m], x[m], y[m])

    p = np.clip(np.array(p, dtype=np.float64), -lim, lim)
    cost, data = evaluate(p)
    lam = 1e-3
    for _ in range(iters):
        if data is None:
            break
        r, gx, gy, xm, ym = data
        J = np.stack([gx * xm + gy * ym, -gx * ym + gy * xm, gx, gy], axis=1)
        H = J.T @ J
        g = J.T @ r
        while True:
            dp = -np.linalg.solve(H + lam * np.diag(np.diag(H) + 1e-9), g)
            pn = np.clip(p + dp, -lim, lim)
            cn, dn = evaluate(pn)
            if cn <= cost:
                lam = max(lam / 10, 1e-6)
                break
            lam *= 10
            if lam > 1e4:
                return p, cost
        p, cost, data = pn, cn, dn
        if np.abs(dp[:2]).max() < 1e-5 and np.abs(dp[2:]).max() < 1e-3:
            break
    return p, cost


def _normalise(img):
    return (img - img.mean()) / (img.std() + 1e-6)


def _pyramid(L, levels):
    pyr = [_normalise(_gauss_blur(L, 1.0))]
    for _ in range(levels - 1):
        pyr.append(_down2(_gauss_blur(pyr[-1], 1.0)))
    return pyr


def _pair_motion(L0, L1, levels=3, prior=None):
    """Similarity p mapping frame-0 coords to frame-1 coords (content motion), from luma.
    Coarse-to-fine from identity, fine-only from identity and from `prior` (the previous pair's
    motion); the candidate with the lowest residual at full resolution wins."""
    pyr0, pyr1 = _pyramid(L0, levels), _pyramid(L1, levels)
    p = np.zeros(4)
    for lvl in range(levels - 1, 0, -1):
        p, _ = _fit_level(pyr0[lvl], pyr1[lvl], p)
        p[2:] *= 2.0
    cands = [_fit_level(pyr0[0], pyr1[0], p)]
    if cands[0][1] > GOOD_FIT:  # normalised luma: residual 0.05 ~ correlation 0.975
        cands.append(_fit_level(pyr0[0], pyr1[0], np.zeros(4)))
        if prior is not None:
            cands.append(_fit_level(pyr0[0], pyr1[0], prior))
    return min(cands, key=lambda pc: pc[1])[0]


# ----------------------------------------------------------------------------------- measuring


def _as_float(clip) -> np.ndarray:
    clip = np.asarray(clip)
    if clip.ndim != 4 or clip.shape[-1] != 3:
        raise ValueError(f"expected a clip [F, H, W, 3], got {clip.shape}")
    if clip.dtype == np.uint8:
        return clip.astype(np.float64) / 255.0
    return clip.astype(np.float64)


def motion_stats(clip) -> dict:
    """Accumulated global motion / colour change over the clip (raw units)."""
    clip = _as_float(clip)
    F, H, W, _ = clip.shape
    luma = clip @ _LUMA
    blurred = [_gauss_blur(f, 1.0) for f in luma]
    x, y, cx, cy = _grid(H, W, 2)
    rot = logz = hue = logg = 0.0
    M = np.eye(3)
    nccs = []
    p = None
    for k in range(F - 1):
        p = _pair_motion(luma[k], luma[k + 1], prior=p)
        a, b, tx, ty = p
        rot += math.atan2(b, 1 + a)
        logz += math.log(max(math.hypot(1 + a, b), 1e-3))
        M = np.array([[1 + a, -b, tx], [b, 1 + a, ty], [0, 0, 1]]) @ M
        # Align frame k+1 to frame k, then compare brightness / chroma / structure.
        X, Y = _warp_coords(p, x, y, cx, cy)
        rgb1, m = _sample(clip[k + 1], X, Y)
        rgb0 = clip[k][2:H - 2, 2:W - 2]
        if m.sum() < 16:
            nccs.append(0.0)
            continue
        rgb0, rgb1 = rgb0[m], rgb1[m]
        l0, l1 = rgb0 @ _LUMA, rgb1 @ _LUMA
        b1, _ = _sample(blurred[k + 1], X, Y)  # structure check on lightly blurred luma
        b0, b1 = blurred[k][2:H - 2, 2:W - 2][m], b1[m]
        d0, d1 = b0 - b0.mean(), b1 - b1.mean()
        nccs.append(float((d0 * d1).sum() / (np.sqrt((d0 ** 2).sum() * (d1 ** 2).sum()) + 1e-12)))
        logg += math.log(max(l1.mean(), 1e-4) / max(l0.mean(), 1e-4))
        c0 = rgb0 @ _RGB2YIQ[1:].T
        c1 = rgb1 @ _RGB2YIQ[1:].T
        z = (c0[:, 0] - 1j * c0[:, 1]) @ (c1[:, 0] + 1j * c1[:, 1])  # sum conj(c0) * c1
        hue += float(np.angle(z)) if abs(z) > 1e-9 else 0.0
    # Translation of the image centre in units of a 64-px frame.
    s64 = 64.0 / W
    return {
        "rotation_deg": math.degrees(rot),
        "log_zoom": logz,
        "pan_x": float(M[0, 2]) * s64,
        "pan_y": float(M[1, 2]) * s64,
        "hue_deg": math.degrees(hue),
        "log_gain": logg,
        # Upper quartile: a fade's last, nearly black frames may be noise-dominated.
        "ncc": float(np.percentile(nccs, 75)) if nccs else 0.0,
    }


def scores_from_motion(mo: dict) -> dict:
    """Signed, nominal-normalised evidence for each effect (1.0 = the nominal magnitude)."""
    r = mo["rotation_deg"] / ROTATION_DEG
    z = mo["log_zoom"] / math.log(ZOOM)
    px = mo["pan_x"] / PAN_PX
    h = abs(mo["hue_deg"]) / HUE_DEG
    f = mo["log_gain"] / math.log(FADE_TO)
    return {"rotate_cw": r, "rotate_ccw": -r, "zoom_in": z, "zoom_out": -z,
            "pan_left": -px, "pan_right": px, "hue_shift": h, "fade_black": f}


def measure(clip) -> Measurement:
    """Detect the effect of `clip` ([F, H, W, 3], uint8 or float in [0, 1])."""
    mo = motion_stats(clip)
    sc = scores_from_motion(mo)
    ranked = sorted(sc.items(), key=lambda kv: kv[1], reverse=True)
    (top, s1), (_, s2) = ranked[0], ranked[1]
    # Unlisted motion (vertical pan) also counts against a confident answer.
    s2 = max(s2, abs(mo["pan_y"]) / PAN_PX)
    if mo["ncc"] < MIN_NCC:
        return Measurement(NONE, float(np.clip(1 - mo["ncc"] / MIN_NCC, 0, 1)), sc, mo)
    if s1 < MIN_SCORE:
        return Measurement(NONE, float(np.clip(1 - s1 / MIN_SCORE, 0, 1)), sc, mo)
    conf = min(s1, 1.0) * (1 - max(s2, 0.0) / s1) * float(np.clip(mo["ncc"], 0, 1))
    return Measurement(top, float(np.clip(conf, 0, 1)), sc, mo)


def classify(clip):
    """(label, confidence) -- label is one of EFFECTS or "none"."""
    m = measure(clip)
    return m.label, m.confidence


def effect_accuracy(clips, labels) -> float:
    """Fraction of `clips` whose measured label equals the corresponding entry of `labels`."""
    labels = list(labels)
    if not labels:
        return float("nan")
    hits = sum(measure(c).label == l for c, l in zip(clips, labels))
    return hits / len(labels)


def transfer_summary(results: list[dict], keys: list[str]) -> dict:
    """Effect-transfer accuracy of evaluation results (dicts with "effect" and one label per
    key of `keys`): per key the fraction labelled with the clip's effect, and per effect the
    clip count and the hits of each key. Shared by eval_transfer.py and eval_v2l.py."""
    n = len(results)
    acc = {f"accuracy_{k.removeprefix('label_')}": sum(r[k] == r["effect"] for r in results) / n if n else float("nan")
           for k in keys}
    per_effect = {e: dict(n=sum(r["effect"] == e for r in results),
                          **{k.removeprefix("label_"): sum(r["effect"] == e and r[k] == e for r in results)
                             for k in keys})
                  for e in EFFECTS}
    return dict(n=n, chance=1 / len(EFFECTS), **acc, per_effect=per_effect)


# ---------------------------------------------------------------------------------- validation


def _degrade(clip, seed):
    """What a tiny generator might output: blurred, noisy, 8-bit."""
    rng = np.random.default_rng([seed, 3])
    out = np.stack([_gauss_blur(f.astype(np.float64), 1.0) for f in clip])
    out = out + rng.normal(0, 0.03, out.shape)
    return np.round(np.clip(out, 0, 1) * 255).astype(np.uint8)


def validate(n: int, seed0: int = 10_000) -> None:
    import time

    rows = EFFECTS + ["static", "noise"]
    variants = [("clean (float)", lambda e, s: make_clip(e, s)),
                ("degraded (blur 1px + noise 0.03 + uint8)", lambda e, s: _degrade(make_clip(e, s), s)),
                ("half strength", lambda e, s: make_clip(e, s, strength=0.5))]
    for name, gen in variants:
        conf = {r: {l: 0 for l in LABELS} for r in rows}
        confs = {r: [] for r in rows}
        t_gen = t_meas = 0.0
        for r in rows:
            for i in range(n):
                s = seed0 + i
                t = time.perf_counter()
                clip = noise_clip(s) if r == "noise" else gen(r, s)
                t_gen += time.perf_counter() - t
                t = time.perf_counter()
                m = measure(clip)
                t_meas += time.perf_counter() - t
                conf[r][m.label] += 1
                confs[r].append(m.confidence)
        total = n * len(rows)
        print(f"\n== {name}: {n} clips per row, seeds {seed0}..{seed0 + n - 1}")
        abbrev = {"rotate_cw": "rotCW", "rotate_ccw": "rotCCW", "zoom_in": "zIn", "zoom_out": "zOut",
                  "pan_left": "panL", "pan_right": "panR", "hue_shift": "hue", "fade_black": "fade",
                  "none": "none"}
        print("| true \\ measured | " + " | ".join(abbrev[l] for l in LABELS) + " | accuracy | mean conf |")
        print("|---" * (len(LABELS) + 3) + "|")
        correct = 0
        for r in rows:
            want = NONE if r in ("static", "noise") else r
            acc = conf[r][want] / n
            correct += conf[r][want]
            print(f"| {r} | " + " | ".join(str(conf[r][l]) for l in LABELS)
                  + f" | {100 * acc:.0f} % | {np.mean(confs[r]):.2f} |")
        eff_acc = sum(conf[r][r] for r in EFFECTS) / (n * len(EFFECTS))
        print(f"effects accuracy {100 * eff_acc:.1f} %, all rows (static/noise -> none) "
              f"{100 * correct / total:.1f} %; generation {1e3 * t_gen / total:.1f} ms/clip, "
              f"measurement {1e3 * t_meas / total:.1f} ms/clip")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--validate", action="store_true", help="accuracy / confusion on effects.py clips")
    ap.add_argument("--n", type=int, default=50, help="clips per effect for --validate")
    ap.add_argument("--effect", help="measure one generated clip: effect name (with --seed)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.validate:
        validate(a.n)
    elif a.effect:
        clip = noise_clip(a.seed) if a.effect == "noise" else make_clip(a.effect, a.seed)
        m = measure(clip)
        print(m.label, f"{m.confidence:.3f}")
        print({k: round(v, 3) for k, v in m.motion.items()})
        print({k: round(v, 3) for k, v in m.scores.items()})
    else:
        ap.print_help()
