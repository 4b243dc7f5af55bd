"""Learning curves of a train_dit.py run: held-out losses and effect-transfer accuracy per effect
against training steps, from its train_log.json (the `transfer` entries written every
--eval-every steps).

    python training/curves.py /work/train/dit/train_log.json --png curves.png --md curves.md

Prints (and with --md writes) one Markdown table: per evaluation, the step, the held-out losses
(matched / mismatched reference / no LoRA), overall accuracy with the LoRA and without, and per
effect the hits with the LoRA out of the clips of that effect, with the median strength of the
effect in brackets (1.0 = the nominal 90 degrees, x1.5, 24 px, 150 degrees, x0.1). With --png it
draws accuracy per effect against steps (Pillow only).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from effects import EFFECTS  # noqa: E402

SHORT = dict(rotate_cw="rotCW", rotate_ccw="rotCCW", zoom_in="zIn", zoom_out="zOut", pan_left="panL",
             pan_right="panR", hue_shift="hue", fade_black="fade")
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]


def evaluations(log: list[dict]) -> list[dict]:
    """The log entries that carry a transfer evaluation, with the nearest validation losses."""
    out, last_val = [], {}
    for e in log:
        if "val_matched" in e:
            last_val = {k: e[k] for k in ("val_matched", "val_mismatched", "val_no_lora")}
        if "transfer" in e:
            out.append(dict(step=e["step"], t=e["t"], **last_val, **e["transfer"]))
    return out


def table(evals: list[dict]) -> str:
    per = "per_effect_hits_lora_base_strength_lora_base"
    head = ["step", "hours", "val matched / mismatched / no LoRA", "LoRA", "off"] + [SHORT[e] for e in EFFECTS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for ev in evals:
        n_e = ev["n"] // len(EFFECTS)
        val = " / ".join(f"{ev[k]:.3f}" for k in ("val_matched", "val_mismatched", "val_no_lora") if k in ev)
        cells = [str(ev["step"]), f"{ev['t'] / 3600:.2f}", val or "-", f"{ev['accuracy_lora']:.0%}",
                 f"{ev['accuracy_no_lora']:.0%}"]
        for e in EFFECTS:
            hits, base, s_lora, _ = ev[per][e]
            cells.append(f"{hits}/{n_e} ({s_lora:+.2f}), off {base}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(evals: list[dict], path: str) -> None:
    from PIL import Image, ImageDraw

    W, H, L, R, T, B = 760, 420, 50, 150, 20, 40
    im = Image.new("RGB", (W, H), (255, 255, 255))
    dr = ImageDraw.Draw(im)
    steps = [ev["step"] for ev in evals]
    s_max = max(steps) if steps else 1
    x = lambda s: L + (W - L - R) * s / max(s_max, 1)  # noqa: E731
    y = lambda a: T + (H - T - B) * (1.0 - a)  # noqa: E731
    for a in (0.0, 0.25, 0.5, 0.75, 1.0):
        dr.line([(L, y(a)), (W - R, y(a))], fill=(225, 225, 225))
        dr.text((5, y(a) - 6), f"{a:.0%}", fill=(0, 0, 0))
    dr.line([(L, y(0.5)), (W - R, y(0.5))], fill=(160, 160, 160))  # the 4/8 bar
    dr.text((L, H - B + 8), "0", fill=(0, 0, 0))
    dr.text((W - R - 30, H - B + 8), f"{s_max} steps", fill=(0, 0, 0))
    per = "per_effect_hits_lora_base_strength_lora_base"
    series = [(SHORT[e], COLOURS[i], [ev[per][e][0] / max(ev["n"] // len(EFFECTS), 1) for ev in evals])
              for i, e in enumerate(EFFECTS)]
    series.append(("all", (0, 0, 0), [ev["accuracy_lora"] for ev in evals]))
    for k, (name, col, vals) in enumerate(series):
        pts = [(x(s), y(v)) for s, v in zip(steps, vals)]
        if len(pts) > 1:
            dr.line(pts, fill=col, width=3 if name == "all" else 2)
        for p in pts:
            dr.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=col)
        dr.line([(W - R + 10, T + 14 * k + 6), (W - R + 30, T + 14 * k + 6)], fill=col, width=3)
        dr.text((W - R + 35, T + 14 * k), name, fill=(0, 0, 0))
    dr.text((L, 3), "effect-transfer accuracy with the LoRA, per effect, against training steps", fill=(0, 0, 0))
    im.save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("log", help="train_log.json of train_dit.py (WORK/ or the pipeline dir)")
    ap.add_argument("--png", default="", help="write the accuracy-per-effect plot here")
    ap.add_argument("--md", default="", help="write the table here")
    a = ap.parse_args()
    try:
        with open(a.log) as f:
            log = json.load(f)["log"]
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"{a.log}: not a train_dit.py train_log.json ({e})")
    evals = evaluations(log)
    if not evals:
        raise SystemExit(f"{a.log}: no transfer evaluations (train with --eval-every N)")
    md = table(evals)
    print(md)
    if a.md:
        with open(a.md, "w") as f:
            f.write(md + "\n")
    if a.png:
        plot(evals, a.png)
        print(f"plot {a.png}")


if __name__ == "__main__":
    main()
