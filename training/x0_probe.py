"""What the DiT believes the clip is, one call at a time: its x0 prediction at a few noise levels,
decoded, next to the true clip, for one held-out validation scene per effect.

    python training/x0_probe.py --work /work/train/dit --cache /work/train/latents.pt --png x0.png

Rows: effects. Per row, for each timestep of --timesteps, frames 0/4/8/12/16 of the decoded
x0-hat = sqrt(a_t) x_t - sqrt(1 - a_t) v-hat (v-prediction), with the matching reference's LoRA;
then the same frames of the true clip (VAE round trip). A model that has learned an effect shows it
here already at t = 999; a model that has not shows the *mean* over what it cannot tell apart:
content that stays put and fades (motion), or a wash (colour). This is how the first motion run
was diagnosed (training/README.md, "Motion run").
"""

from __future__ import annotations

import argparse
import os
import sys
from types import SimpleNamespace

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import train_dit as T  # noqa: E402
from effects import EFFECTS  # noqa: E402

SHOW = (0, 4, 8, 12, 16)


def to_u8(x: torch.Tensor) -> np.ndarray:
    """[3, F, H, W] in [-1, 1] -> [F, H, W, 3] uint8."""
    return ((x.permute(1, 2, 3, 0).numpy() + 1.0) * 127.5).clip(0, 255).astype(np.uint8)


@torch.no_grad()
def probe(tr, vae, sf: float, cache: dict, effects: list[str], timesteps: list[int], scene: int = 0) -> np.ndarray:
    """The picture as an [H, W, 3] uint8 array (see the module doc)."""
    rows = []
    s_ref = (scene + 1) % cache["val_target"].shape[0]
    for name in effects:
        e = EFFECTS.index(name)
        x0 = cache["val_target"][scene: scene + 1, e]
        img = cache["val_image"][scene: scene + 1]
        rows_lora = tr.hyper(cache["val_reference"][s_ref: s_ref + 1, e])
        line = []
        for tt in timesteps:
            t = torch.tensor([tt])
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)).permute(0, 2, 1, 3, 4)
            xt = tr.sched.add_noise(x0.permute(0, 2, 1, 3, 4), noise, t)
            tr.lilora.set_rows(rows_lora)
            try:
                v = tr.dit(hidden_states=torch.cat([xt, T.pad_image_latents(img)], dim=2),
                           encoder_hidden_states=tr.text, timestep=t, image_rotary_emb=tr.rope, return_dict=False)[0]
            finally:
                tr.lilora.set_rows(None)
            a = tr.alphas_cumprod[tt]
            x0_hat = a.sqrt() * xt - (1 - a).sqrt() * v
            frames = to_u8(vae.decode(x0_hat.permute(0, 2, 1, 3, 4) / sf).sample[0])
            line.append(np.concatenate([frames[i] for i in SHOW], axis=1))
        truth = to_u8(vae.decode(x0 / sf).sample[0])
        line.append(np.concatenate([truth[i] for i in SHOW], axis=1))
        gap = np.full((line[0].shape[0], 4, 3), 255, np.uint8)
        rows.append(np.concatenate([x for part in line for x in (part, gap)][:-1], axis=1))
    return np.concatenate(rows, axis=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/work/train/dit", help="train_dit.py --work dir (its resume.pt)")
    ap.add_argument("--cache", default="/work/train/latents.pt")
    ap.add_argument("--png", required=True)
    ap.add_argument("--effects", default="rotate_cw,zoom_in,pan_right,hue_shift")
    ap.add_argument("--timesteps", default="999,800,500")
    ap.add_argument("--scale", type=int, default=2, help="nearest-neighbour upscale of the picture")
    a = ap.parse_args()
    torch.set_num_threads(1)
    from PIL import Image

    path = os.path.join(a.work, "resume.pt")
    if not os.path.exists(path):
        raise SystemExit(f"{path}: no checkpoint (train with --checkpoint-every)")
    ck = torch.load(path, weights_only=False)
    cache = torch.load(a.cache, weights_only=False)
    effects = a.effects.split(",")
    unknown = [e for e in effects if e not in EFFECTS]
    if unknown:
        raise SystemExit(f"--effects: unknown {unknown}; one of {EFFECTS}")
    old_runs = dict(patch_size=2, abs_pos=False)  # checkpoints from before these options
    tr = T.Trainer(SimpleNamespace(**{**old_runs, **ck["args"], "bf16": "off"}), cache)
    tr.load_state(ck["model"])
    tr.dit.eval(), tr.hyper.eval()
    vae = T.vae_from_cache(cache)
    pic = probe(tr, vae, cache["meta"]["scaling_factor"], cache, effects, [int(t) for t in a.timesteps.split(",")])
    im = Image.fromarray(pic)
    im = im.resize((im.width * a.scale, im.height * a.scale), Image.NEAREST)
    im.save(a.png)
    print(f"{a.png}: step {ck['step']}; rows {effects}; per row x0-hat at t = {a.timesteps}, then the true clip")


if __name__ == "__main__":
    main()
