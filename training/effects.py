"""Procedural "effects" dataset for training a tiny Video2LoRA demo model.

Every clip is 17 frames of 64x64 RGB (float32 in [0, 1], layout [F, H, W, 3]) showing a random
scene (a textured gradient background and a few discs / squares / triangles with solid, striped
or radially shaded fills) undergoing exactly one effect from EFFECTS.

The scene is an analytic function of continuous scene coordinates, evaluated per frame through
the inverse of the frame's camera transform, so moving / zooming / rotating never shows a black
border and never resamples an already-rasterised image.

Conventions (all describe what the *image content* does on screen, y pointing down):
  rotate_cw / rotate_ccw  content turns clockwise / counter-clockwise about the image centre
  zoom_in / zoom_out      content grows / shrinks about the image centre
  pan_left / pan_right    content slides left / right (i.e. the camera moves right / left)
  hue_shift               hues rotate (luma kept) around the colour wheel
  fade_black              brightness ramps down towards black

Determinism: the scene depends only on `seed`; the effect magnitude is drawn from a separate
stream of the same seed. So `make_clip(e, s)[0]` is the same image for every effect e (frame 0 is
always the untransformed scene), and two seeds give two unrelated scenes -- a training pair for
the hypernetwork is (reference = make_clip(E, s1), target = make_clip(E, s2)).

Run `python training/effects.py sheet.png` to write a contact sheet (rows = effects).
"""

from __future__ import annotations

import sys

import numpy as np

FRAMES = 17
SIZE = 64

EFFECTS = [
    "rotate_cw",
    "rotate_ccw",
    "zoom_in",
    "zoom_out",
    "pan_left",
    "pan_right",
    "hue_shift",
    "fade_black",
]

# Nominal full-clip magnitudes; each clip draws its own within +-JITTER of these.
ROTATION_DEG = 90.0
ZOOM = 1.5
PAN_PX = 24.0
HUE_DEG = 150.0
FADE_TO = 0.1  # brightness factor reached at the last frame
JITTER = 0.15

# RGB <-> YIQ (NTSC); a rotation of (I, Q) is a hue rotation at constant luma.
_RGB2YIQ = np.array(
    [[0.299, 0.587, 0.114], [0.595716, -0.274453, -0.321263], [0.211456, -0.522591, 0.311135]],
    dtype=np.float64,
)
_YIQ2RGB = np.linalg.inv(_RGB2YIQ)


def first_frame(clip: np.ndarray) -> np.ndarray:
    """The conditioning image of a clip: frame 0, [H, W, 3]."""
    return clip[0]


# --------------------------------------------------------------------------------------- scene


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6.0) % 6
    f = h * 6.0 - int(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i])


def _rand_colour(rng: np.random.Generator, sat=(0.5, 1.0), val=(0.45, 1.0)) -> np.ndarray:
    return _hsv_to_rgb(rng.random(), rng.uniform(*sat), rng.uniform(*val))


def make_scene(seed: int) -> dict:
    """Random scene description (plain numbers / arrays), a pure function of `seed`."""
    rng = np.random.default_rng([seed, 0])
    bg = {
        "c0": _rand_colour(rng, sat=(0.3, 0.8), val=(0.3, 0.8)),
        "c1": _rand_colour(rng, sat=(0.3, 0.8), val=(0.3, 0.8)),
        "angle": rng.uniform(0, 2 * np.pi),
        "texture": ["waves", "checker", "dots"][rng.integers(3)],
        "tex_amp": rng.uniform(0.08, 0.16),
        "tex_period": rng.uniform(9.0, 20.0),
        "tex_angle": rng.uniform(0, np.pi),
        "waves": [(rng.uniform(0, 2 * np.pi), rng.uniform(8.0, 24.0), rng.uniform(0, 2 * np.pi))
                  for _ in range(3)],
    }
    shapes = []
    for _ in range(int(rng.integers(3, 7))):
        shapes.append({
            "kind": ["disc", "square", "triangle"][rng.integers(3)],
            "centre": rng.uniform(-26, 26, size=2),
            "radius": rng.uniform(6.0, 13.0),
            "angle": rng.uniform(0, 2 * np.pi),
            "fill": ["solid", "stripes", "radial"][rng.integers(3)],
            "ca": _rand_colour(rng),
            "cb": _rand_colour(rng),
            "period": rng.uniform(5.0, 9.0),
        })
    return {"bg": bg, "shapes": shapes}


def _render(scene: dict, x: np.ndarray, y: np.ndarray, px: float) -> np.ndarray:
    """Evaluate the scene at scene coordinates (x, y) (same shape); `px` is the size of one
    output pixel in scene units (for anti-aliasing). Returns [..., 3] in [0, 1]."""
    bg = scene["bg"]
    u = x * np.cos(bg["angle"]) + y * np.sin(bg["angle"])
    g = np.clip(0.5 + u / 120.0, 0.0, 1.0)[..., None]
    img = bg["c0"] * (1 - g) + bg["c1"] * g
    if bg["texture"] == "waves":
        tex = sum(np.sin(2 * np.pi * (x * np.cos(a) + y * np.sin(a)) / p + ph)
                  for a, p, ph in bg["waves"]) / 3.0
    else:
        ca, sa = np.cos(bg["tex_angle"]), np.sin(bg["tex_angle"])
        xr, yr = ca * x + sa * y, -sa * x + ca * y
        w = 2 * np.pi / bg["tex_period"]
        if bg["texture"] == "checker":
            tex = np.tanh(3.0 * np.sin(w * xr) * np.sin(w * yr))
        else:  # dots
            tex = 2.0 * np.clip((np.cos(w * xr) * np.cos(w * yr) - 0.3) * 3.0, 0, 1) - 1.0
    img = img * (1.0 + bg["tex_amp"] * tex[..., None])

    for s in scene["shapes"]:
        dx, dy = x - s["centre"][0], y - s["centre"][1]
        c, si = np.cos(s["angle"]), np.sin(s["angle"])
        qx, qy = c * dx + si * dy, -si * dx + c * dy  # shape-local coordinates
        r = s["radius"]
        if s["kind"] == "disc":
            d = np.hypot(qx, qy) - r
        elif s["kind"] == "square":
            d = np.maximum(np.abs(qx), np.abs(qy)) - 0.8 * r
        else:  # equilateral triangle, circumradius r
            d = np.full_like(qx, -np.inf)
            for k in range(3):
                a = np.pi / 2 + 2 * np.pi * k / 3
                d = np.maximum(d, qx * np.cos(a) + qy * np.sin(a) - r / 2)
        alpha = np.clip(0.5 - d / px, 0.0, 1.0)[..., None]
        if s["fill"] == "solid":
            col = np.broadcast_to(s["ca"], qx.shape + (3,))
        elif s["fill"] == "stripes":
            m = (0.5 + 0.5 * np.tanh(2.0 * np.sin(2 * np.pi * qx / s["period"])))[..., None]
            col = s["ca"] * m + s["cb"] * (1 - m)
        else:  # radial
            m = np.clip(np.hypot(qx + 0.3 * r, qy + 0.3 * r) / (1.6 * r), 0, 1)[..., None]
            col = s["ca"] * (1 - m) + s["cb"] * m
        img = img * (1 - alpha) + col * alpha
    return np.clip(img, 0.0, 1.0)


# -------------------------------------------------------------------------------------- effect


def effect_params(effect: str, seed: int, strength: float = 1.0) -> dict:
    """Full-clip magnitude of `effect` for `seed` (nominal * jitter * strength)."""
    rng = np.random.default_rng([seed, 1])
    j = strength * rng.uniform(1 - JITTER, 1 + JITTER)
    return {
        "rotation_deg": ROTATION_DEG * j,
        "zoom": ZOOM ** j,
        "pan_px": PAN_PX * j,
        "hue_deg": HUE_DEG * j,
        "fade_to": FADE_TO ** j,
    }


def make_clip(effect: str, seed: int, *, frames: int = FRAMES, size: int = SIZE,
              strength: float = 1.0, uint8: bool = False) -> np.ndarray:
    """Clip [frames, size, size, 3] of scene `seed` under `effect` (one of EFFECTS, or "static"
    for no effect). float32 in [0, 1], or uint8 if `uint8`. `strength` scales the magnitude."""
    if effect not in EFFECTS and effect != "static":
        raise ValueError(f"unknown effect {effect!r}; expected one of {EFFECTS} or 'static'")
    scene = make_scene(seed)
    p = effect_params(effect, seed, strength)
    c = (size - 1) / 2.0
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    # Screen coordinates in 64-px units (so magnitudes are the same at any `size`).
    sx, sy = (xs - c) * (SIZE / size), (ys - c) * (SIZE / size)
    out = np.empty((frames, size, size, 3), np.float32)
    for f in range(frames):
        t = f / (frames - 1)
        ang, scale, pan, hue, gain = 0.0, 1.0, 0.0, 0.0, 1.0
        if effect == "rotate_cw":
            ang = np.deg2rad(p["rotation_deg"]) * t
        elif effect == "rotate_ccw":
            ang = -np.deg2rad(p["rotation_deg"]) * t
        elif effect == "zoom_in":
            scale = p["zoom"] ** t
        elif effect == "zoom_out":
            scale = p["zoom"] ** -t
        elif effect == "pan_left":
            pan = -p["pan_px"] * t
        elif effect == "pan_right":
            pan = p["pan_px"] * t
        elif effect == "hue_shift":
            hue = np.deg2rad(p["hue_deg"]) * t
        elif effect == "fade_black":
            gain = 1.0 - (1.0 - p["fade_to"]) * t
        # screen = scale * R(ang) @ scene + (pan, 0); R(+) is clockwise on a y-down screen.
        ux, uy = (sx - pan) / scale, sy / scale
        ca, sa = np.cos(ang), np.sin(ang)
        x, y = ca * ux + sa * uy, -sa * ux + ca * uy
        img = _render(scene, x, y, px=(SIZE / size) / scale)
        if hue != 0.0:
            yiq = img @ _RGB2YIQ.T
            i, q = yiq[..., 1].copy(), yiq[..., 2].copy()
            yiq[..., 1] = np.cos(hue) * i - np.sin(hue) * q
            yiq[..., 2] = np.sin(hue) * i + np.cos(hue) * q
            img = np.clip(yiq @ _YIQ2RGB.T, 0.0, 1.0)
        out[f] = img * gain
    if uint8:
        return np.round(out * 255.0).astype(np.uint8)
    return out


def noise_clip(seed: int, *, frames: int = FRAMES, size: int = SIZE) -> np.ndarray:
    """Independent uniform RGB noise per frame (a negative control for measure.py)."""
    rng = np.random.default_rng([seed, 2])
    return rng.random((frames, size, size, 3), dtype=np.float32)


# ------------------------------------------------------------------------------- contact sheet


def contact_sheet(path: str, seed: int = 0, cols=(0, 4, 8, 12, 16), zoom: int = 2) -> None:
    from PIL import Image, ImageDraw

    rows = EFFECTS + ["static"]
    label_w, pad = 90, 2
    cell = SIZE * zoom
    sheet = Image.new("RGB", (label_w + len(cols) * (cell + pad), len(rows) * (cell + pad) + 14),
                      (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for j, f in enumerate(cols):
        draw.text((label_w + j * (cell + pad) + 4, 1), f"frame {f}", fill=(0, 0, 0))
    for i, eff in enumerate(rows):
        clip = make_clip(eff, seed + i, uint8=True)
        y0 = 14 + i * (cell + pad)
        draw.text((4, y0 + cell // 2 - 6), eff, fill=(0, 0, 0))
        for j, f in enumerate(cols):
            im = Image.fromarray(clip[f]).resize((cell, cell), Image.NEAREST)
            sheet.paste(im, (label_w + j * (cell + pad), y0))
    sheet.save(path)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="write a contact sheet of the effects dataset")
    ap.add_argument("out", help="PNG path")
    ap.add_argument("--seed", type=int, default=0, help="seed of the first row (row i uses seed+i)")
    a = ap.parse_args()
    contact_sheet(a.out, seed=a.seed)
    print(f"wrote {a.out}", file=sys.stderr)
