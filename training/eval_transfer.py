"""Effect-transfer accuracy of a pipeline dir written by train_dit.py.

For clip i (effect E = EFFECTS[i % 8], held-out seeds: first-frame scene s2 = SEED0 + i, reference
scene s1 = SEED0 + 100000 + i, both in the held-out 10000..999999 range):
  reference make_clip(E, s1) in [0, 1] -> VAE posterior mode x scaling_factor -> hypernetwork ->
  LiLoRA rows, applied to the DiT through forward hooks (s = 1);
  diffusers CogVideoXImageToVideoPipeline(image = frame 0 of make_clip(E, s2) as a PNG-like
  8-bit PIL image, prompt "" / negative "", 8 tokens, DDIM, --steps, --guidance) -> 17 frames;
  measure.classify(frames) -> label. Accuracy = fraction labelled E, for (a) the LoRA from the
  reference, (b) the same model with the LoRA off (same noise), (c) chance 1/8; plus the
  ground-truth clips make_clip(E, s2) as a check of the measurement.

    nice -n 19 /work/torchvenv/bin/python training/eval_transfer.py --model /work/train/pipeline --n 64 \
        --sheet /work/train/eval_sheet.png --json /work/train/eval.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from effects import EFFECTS, make_clip  # noqa: E402
from measure import classify, measure, transfer_summary  # noqa: E402
from video2lora import load_video2lora  # noqa: E402

SHORT = dict(rotate_cw="rotCW", rotate_ccw="rotCCW", zoom_in="zIn", zoom_out="zOut", pan_left="panL",
             pan_right="panR", hue_shift="hue", fade_black="fade", none="none")


def to_uint8(clip: np.ndarray) -> np.ndarray:
    return np.clip(np.round(clip * 255.0), 0, 255).astype(np.uint8)


@torch.no_grad()
def reference_latents(vae, clip_u8: np.ndarray) -> torch.Tensor:
    """[F, H, W, 3] uint8 -> [1, 16, f, h, w]: frames in [0, 1], posterior mode x scaling_factor."""
    x = torch.from_numpy(clip_u8.astype(np.float32) / 255.0).permute(3, 0, 1, 2)[None]
    return vae.encode(x).latent_dist.mode() * vae.config.scaling_factor


@torch.no_grad()
def fuse_check(pipe, lilora, rows: torch.Tensor) -> float:
    """Max |hooked DiT - DiT with W' = W + s B A fused| on random inputs (a self-check of the module
    against the fused form the Rust runtime uses)."""
    dit = pipe.transformer
    cfg = dit.config
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(1, 5, cfg.in_channels, 8, 8, generator=g)
    enc = torch.randn(1, cfg.max_text_seq_length, cfg.text_embed_dim, generator=g)
    t = torch.tensor([500])
    from train_dit import rotary_embeddings

    rope = rotary_embeddings(dit)
    lilora.set_rows(rows)
    a = dit(hidden_states=hs, encoder_hidden_states=enc, timestep=t, image_rotary_emb=rope, return_dict=False)[0]
    lilora.set_rows(None)
    mods = dict(dit.named_modules())
    deltas = lilora.fused_deltas(rows)
    for p, dw in deltas.items():
        mods[p].weight += dw
    b = dit(hidden_states=hs, encoder_hidden_states=enc, timestep=t, image_rotary_emb=rope, return_dict=False)[0]
    for p, dw in deltas.items():
        mods[p].weight -= dw
    return float((a - b).abs().max())


def contact_sheet(rows: list[dict], path: str, scale: int = 2) -> None:
    from PIL import Image, ImageDraw

    cols = [("reference", [0, 8, 16]), ("LoRA", [0, 4, 8, 12, 16]), ("no LoRA", [0, 8, 16])]
    s = 64 * scale
    gap, head, label_w = 8, 14, 150
    n_cells = sum(len(c[1]) for c in cols)
    W = label_w + n_cells * s + gap * (len(cols) - 1)
    H = head + len(rows) * (s + 4)
    sheet = Image.new("RGB", (W, H), (255, 255, 255))
    dr = ImageDraw.Draw(sheet)
    x = label_w
    for name, idx in cols:
        dr.text((x + 2, 1), name, fill=(0, 0, 0))
        x += len(idx) * s + gap
    for r, row in enumerate(rows):
        y = head + r * (s + 4)
        dr.text((2, y + 2), row["effect"], fill=(0, 0, 0))
        dr.text((2, y + 16), f"LoRA:  {SHORT[row['label_lora']]} {row['conf_lora']:.2f}", fill=(0, 0, 0))
        dr.text((2, y + 30), f"off:   {SHORT[row['label_base']]} {row['conf_base']:.2f}", fill=(0, 0, 0))
        x = label_w
        for (name, idx), clip in zip(cols, (row["ref"], row["gen"], row["base"])):
            for f in idx:
                im = Image.fromarray(clip[f]).resize((s, s), Image.NEAREST)
                sheet.paste(im, (x, y))
                x += s
            x += gap
    sheet.save(path)


def mp4_roundtrip(clip_u8: np.ndarray) -> np.ndarray:
    """The clip as v2l reads the reference eval_v2l.py gives it: H.264 CRF 12 yuv444p, decoded to rgb24."""
    import subprocess
    import tempfile

    from eval_v2l import write_mp4

    f, h, w, _ = clip_u8.shape
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ref.mp4")
        write_mp4(clip_u8, path)
        raw = subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-i", path, "-vf", f"scale={w}:{h}:flags=bicubic",
                              "-f", "rawvideo", "-pix_fmt", "rgb24", "-"], capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, h, w, 3).copy()


def run_transfer(pipe, hyper, lilora, iters: int, n: int, seed0: int = 10000, steps: int = 20,
                 guidance: float = 1.0, base: bool = True, keep_frames: int = 0, roundtrip: bool = False,
                 match_v2l: bool = False, log=print) -> tuple[list, dict]:
    """Generates and measures `n` held-out clips (see the module doc); returns (per-clip results,
    summary). The first `keep_frames` results also carry their uint8 clips (ref, gen, base) for a
    contact sheet. `strength_*` is the measured score of the clip's own effect (1.0 = the nominal
    magnitude: 90 degrees, x1.5, 24 px, ...), so a model that moves the content a little in the
    right direction shows here before it passes the classifier's threshold.

    `match_v2l` gives diffusers exactly what eval_v2l.py gives v2l: the reference through the same
    mp4, the first frame's posterior mode (v2l-run's default; the stock pipeline samples it) and
    eval_v2l.shared_noise(scene) as the initial noise, so the two can agree clip by clip."""
    from diffusers.pipelines.cogvideo import pipeline_cogvideox_image2video as i2v

    t0 = time.time()
    stock_retrieve = i2v.retrieve_latents
    if match_v2l:
        i2v.retrieve_latents = lambda enc, generator=None, sample_mode="sample": enc.latent_dist.mode()
    try:
        results = _generate_and_measure(pipe, hyper, lilora, iters, n, seed0, steps, guidance, base, keep_frames,
                                        roundtrip, match_v2l, log)
    finally:
        i2v.retrieve_latents = stock_retrieve
    return results, _summary(results, steps, guidance, iters, base, roundtrip, time.time() - t0)


def _generate_and_measure(pipe, hyper, lilora, iters, n, seed0, steps, guidance, base, keep_frames, roundtrip,
                          match_v2l, log) -> list[dict]:
    from PIL import Image

    from eval_v2l import shared_noise

    vae = pipe.vae
    results, t0 = [], time.time()
    for i in range(n):
        effect = EFFECTS[i % len(EFFECTS)]
        s2, s1 = seed0 + i, seed0 + 100000 + i
        ref = to_uint8(make_clip(effect, s1))
        if match_v2l:
            ref = mp4_roundtrip(ref)
        truth = to_uint8(make_clip(effect, s2))
        image = Image.fromarray(truth[0])
        with torch.no_grad():
            rows = hyper(reference_latents(vae, ref), iters)
        if i == 0:
            log(f"fused-vs-hooked DiT max |diff| {fuse_check(pipe, lilora, rows):.2e}")

        def generate(lora_rows):
            lilora.set_rows(lora_rows)
            latents = torch.from_numpy(shared_noise(s2)) if match_v2l else None
            try:
                out = pipe(image=image, prompt="", negative_prompt="", height=64, width=64, num_frames=17,
                           num_inference_steps=steps, guidance_scale=guidance, max_sequence_length=8,
                           generator=torch.Generator().manual_seed(s2), latents=latents,
                           output_type="np").frames[0]
            finally:
                lilora.set_rows(None)
            return to_uint8(np.asarray(out))

        gen = generate(rows)
        m = measure(gen)
        r = dict(i=i, effect=effect, seed=s2, ref_seed=s1, label_lora=m.label, conf_lora=m.confidence,
                 strength_lora=float(m.scores.get(effect, 0.0)))
        if base:
            base_clip = generate(None)
            mb = measure(base_clip)
            r.update(label_base=mb.label, conf_base=mb.confidence, strength_base=float(mb.scores.get(effect, 0.0)))
        else:
            base_clip = np.zeros_like(gen)
            r.update(label_base="none", conf_base=0.0, strength_base=0.0)
        r["label_truth"], r["conf_truth"] = classify(truth)
        if roundtrip:  # the ceiling the VAE allows: the true clip encoded (mode) and decoded
            with torch.no_grad():
                x = torch.from_numpy(truth.astype(np.float32) / 127.5 - 1.0).permute(3, 0, 1, 2)[None]
                y = vae.decode(vae.encode(x).latent_dist.mode()).sample[0].permute(1, 2, 3, 0)
            r["label_vae"], r["conf_vae"] = classify(to_uint8((y.numpy() + 1.0) / 2.0))
        results.append(r)
        log(f"[{i + 1}/{n}] {effect:10s} LoRA -> {m.label:10s} ({m.confidence:.2f}, strength "
            f"{r['strength_lora']:+.2f})  off -> {r['label_base']:10s} ({r['conf_base']:.2f})  truth -> "
            f"{r['label_truth']}  {time.time() - t0:.0f} s")
        if i < keep_frames:
            r.update(ref=ref, gen=gen, base=base_clip)

    return results


def _summary(results: list[dict], steps: int, guidance: float, iters: int, base: bool, roundtrip: bool,
             seconds: float) -> dict:
    keys = ["label_lora", "label_truth"] + (["label_base"] if base else []) + (["label_vae"] if roundtrip else [])
    hist = lambda key: {l: sum(r[key] == l for r in results) for l in EFFECTS + ["none"] if any(r[key] == l for r in results)}  # noqa: E731,E741
    summary = dict(steps=steps, guidance=guidance, iterations=iters, **transfer_summary(results, keys),
                   labels_lora=hist("label_lora"), labels_no_lora=hist("label_base"),
                   seconds=round(seconds, 1))
    summary["accuracy_no_lora"] = summary.pop("accuracy_base", None)
    for e, row in summary["per_effect"].items():
        mine = [r for r in results if r["effect"] == e]
        for k in ("lora", "base"):
            row[f"strength_{k}"] = float(np.median([r[f"strength_{k}"] for r in mine])) if mine else float("nan")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/work/train/pipeline", help="pipeline dir from train_dit.py")
    ap.add_argument("--n", type=int, default=64, help="clips (effects round-robin)")
    ap.add_argument("--seed0", type=int, default=10000, help="held-out seeds start here (train seeds are >= 1e6)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=1.0,
                    help="CFG scale; with prompt = negative = \"\" both branches are equal, so >1 only costs time")
    ap.add_argument("--iterations", type=int, default=0, help="hypernet refinement iterations (0 = trained value)")
    ap.add_argument("--no-base", action="store_true", help="skip the LoRA-off generations")
    ap.add_argument("--match-v2l", action="store_true",
                    help="the inputs eval_v2l.py gives v2l (reference through its mp4, first-frame posterior mode, "
                         "shared noise), so the two tables can be compared clip by clip (eval_v2l.py --compare)")
    ap.add_argument("--vae-roundtrip", action="store_true",
                    help="also measure each true clip after a VAE encode + decode (the VAE's ceiling)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sheet", default="", help="contact sheet PNG")
    ap.add_argument("--sheet-n", type=int, default=8, help="examples on the sheet")
    ap.add_argument("--json", default="", help="write per-clip results + summary here")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    from diffusers import CogVideoXImageToVideoPipeline
    from diffusers.utils import logging as dlog
    dlog.disable_progress_bar()
    pipe = CogVideoXImageToVideoPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    hyper, lilora, cfg = load_video2lora(args.model, pipe.transformer)
    iters = args.iterations or cfg["iterations"]
    vae = pipe.vae
    print(f"model {args.model}: {cfg['num_layers']} LiLoRA layers, D {cfg['weight_dim']}, {cfg['blocks']} blocks, "
          f"{iters} iterations; VAE scaling_factor {vae.config.scaling_factor}; trained steps {cfg.get('train_steps')}",
          flush=True)

    results, summary = run_transfer(pipe, hyper, lilora, iters, args.n, args.seed0, args.steps, args.guidance,
                                    not args.no_base, args.sheet_n, args.vae_roundtrip, args.match_v2l,
                                    log=lambda m: print(m, flush=True))
    summary = dict(model=args.model, match_v2l=args.match_v2l, **summary)
    n = len(results)
    print("SUMMARY", json.dumps(summary), flush=True)
    print(f"effect-transfer accuracy: with LoRA {summary['accuracy_lora']:.1%}, LoRA off "
          f"{'-' if args.no_base else format(summary['accuracy_no_lora'], '.1%')}, chance {1 / len(EFFECTS):.1%} "
          f"(ground-truth clips {summary['accuracy_truth']:.1%}), {n} held-out clips", flush=True)
    if args.sheet:
        contact_sheet([r for r in results if "gen" in r], args.sheet)
        print(f"contact sheet {args.sheet}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(summary=summary, clips=[{k: v for k, v in r.items() if k not in ("ref", "gen", "base")}
                                                  for r in results]), f, indent=1)


if __name__ == "__main__":
    main()
