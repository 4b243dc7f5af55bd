"""Throughput / feasibility probe: train a small diffusers AutoencoderKLCogVideoX on effects.py clips.

The config mimics tests/fixtures/cogvideox-tiny/vae/config.json (4 CogVideoX down/up blocks,
16 latent channels, 8x spatial / 4x temporal compression); `--channels` changes the widths.
Clips are scaled to [-1, 1] (as diffusers' VideoProcessor does) and laid out [B, C, F, H, W].
Loss = MSE(recon, x) + kl_weight * KL(posterior || N(0, I)) (mean over elements).

    /work/torchvenv/bin/python training/train_vae.py --minutes 12 --out /tmp/vae_probe
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from effects import EFFECTS, make_clip  # noqa: E402

TRAIN_KINDS = EFFECTS + ["static"]
EVAL_SEEDS = list(range(10000, 10008))  # held out: training seeds are drawn from >= 1_000_000


def build_vae(channels: list[int], layers_per_block: int = 1, norm_groups: int = 4):
    from diffusers import AutoencoderKLCogVideoX

    n = len(channels)
    return AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=["CogVideoXDownBlock3D"] * n,
        up_block_types=["CogVideoXUpBlock3D"] * n,
        block_out_channels=channels,
        latent_channels=16,
        layers_per_block=layers_per_block,
        act_fn="silu",
        norm_eps=1e-6,
        norm_num_groups=norm_groups,
        temporal_compression_ratio=4,
        sample_height=64,
        sample_width=64,
        scaling_factor=0.7,
        force_upcast=True,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def clips_to_tensor(clips: list[np.ndarray]) -> torch.Tensor:
    x = torch.from_numpy(np.stack(clips))  # [B, F, H, W, 3] in [0, 1]
    return (x.permute(0, 4, 1, 2, 3) * 2.0 - 1.0).contiguous()  # [B, 3, F, H, W] in [-1, 1]


def sample_batch(rng: np.random.Generator, batch: int) -> torch.Tensor:
    clips = []
    for _ in range(batch):
        kind = TRAIN_KINDS[rng.integers(len(TRAIN_KINDS))]
        seed = int(rng.integers(1_000_000, 2**31 - 1))
        clips.append(make_clip(kind, seed))
    return clips_to_tensor(clips)


def eval_batch() -> torch.Tensor:
    kinds = TRAIN_KINDS
    return clips_to_tensor([make_clip(kinds[i % len(kinds)], s) for i, s in enumerate(EVAL_SEEDS)])


@torch.no_grad()
def psnr(vae, x: torch.Tensor) -> float:
    vae.eval()
    vals = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1]
        z = vae.encode(xi).latent_dist.mode()
        r = vae.decode(z).sample.clamp(-1, 1)
        mse = (((r - xi) / 2.0) ** 2).mean().item()  # in [0, 1] units
        vals.append(10 * math.log10(1.0 / max(mse, 1e-12)))
    vae.train()
    return float(np.mean(vals))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=12.0)
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0 = no limit)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--kl-weight", type=float, default=1e-6)
    ap.add_argument("--channels", type=str, default="8,8,16,16")
    ap.add_argument("--layers-per-block", type=int, default=1)
    ap.add_argument("--norm-groups", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", choices=["auto", "on", "off"], default="off",
                    help="bf16 autocast of encode/decode (auto: where the CPU has AMX or AVX512-BF16); the "
                         "trained VAE was made in fp32, so off by default")
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--eval-every", type=int, default=0, help="PSNR on held-out clips every N steps (0 = end only)")
    ap.add_argument("--out", type=str, default="/tmp/vae_probe")
    ap.add_argument("--checkpoint-every", type=int, default=0,
                    help="save a resumable checkpoint (model, optimiser, step, RNG) to OUT/resume.pt every N steps")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/resume.pt when it exists")
    ap.add_argument("--cosine", action="store_true", help="cosine-decay the learning rate to 0 at --max-steps")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    from train_dit import bf16_enabled

    autocast = bf16_enabled(args.bf16)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)

    channels = [int(c) for c in args.channels.split(",")]
    vae = build_vae(channels, args.layers_per_block, args.norm_groups)
    vae.train()
    n_params = sum(p.numel() for p in vae.parameters())
    print(f"params {n_params:,}  channels {channels}  batch {args.batch}", flush=True)

    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=1e-4, betas=(0.9, 0.99))
    x_eval = eval_batch()
    print(f"init eval PSNR {psnr(vae, x_eval):.2f} dB", flush=True)

    log = []
    t0 = time.time()
    t_data = 0.0
    step = 0
    resume = os.path.join(args.out, "resume.pt")
    if args.resume and os.path.exists(resume):
        ck = torch.load(resume, weights_only=False)
        vae.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step, log = ck["step"], ck["log"]
        rng.bit_generator.state = ck["rng"]
        gen.set_state(ck["gen"])
        t0 -= ck["seconds"]
        print(f"resumed at step {step} ({ck['seconds']:.0f} s trained)", flush=True)
    last_t, last_step = t0, 0
    ema = None
    while True:
        elapsed = time.time() - t0
        if elapsed > args.minutes * 60 or (args.max_steps and step >= args.max_steps):
            break
        if args.cosine and args.max_steps:
            for g in opt.param_groups:
                g["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.max_steps))
        td = time.time()
        x = sample_batch(rng, args.batch)
        t_data += time.time() - td
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            post = vae.encode(x).latent_dist
            z = post.sample(generator=gen)
            rec = vae.decode(z).sample
        mse = torch.nn.functional.mse_loss(rec.float(), x)
        kl = 0.5 * (post.mean**2 + post.var - 1.0 - post.logvar).mean()
        loss = mse + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        ema = mse.item() if ema is None else 0.95 * ema + 0.05 * mse.item()
        if step % args.log_every == 0 or step == 1:
            now = time.time()
            sps = (step - last_step) / max(now - last_t, 1e-9)
            last_t, last_step = now, step
            # mse is in [-1,1] units; PSNR in [0,1] units = 10 log10(4 / mse)
            rec_psnr = 10 * math.log10(4.0 / max(ema, 1e-12))
            entry = dict(step=step, t=round(now - t0, 1), mse=mse.item(), mse_ema=ema, kl=kl.item(),
                         train_psnr_ema=rec_psnr, steps_per_s=sps)
            if args.eval_every and step % args.eval_every == 0:
                entry["eval_psnr"] = psnr(vae, x_eval)
            log.append(entry)
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()),
                  f"rss={peak_rss_mb():.0f}MB", flush=True)
        if args.checkpoint_every and step % args.checkpoint_every == 0:
            os.makedirs(args.out, exist_ok=True)
            ck = dict(model=vae.state_dict(), opt=opt.state_dict(), step=step, log=log,
                      rng=rng.bit_generator.state, gen=gen.get_state(), seconds=time.time() - t0)
            torch.save(ck, resume + ".tmp")
            os.replace(resume + ".tmp", resume)

    total = time.time() - t0
    final_psnr = psnr(vae, x_eval)
    summary = dict(params=n_params, channels=channels, batch=args.batch, steps=step, seconds=round(total, 1),
                   steps_per_s=step / total, s_per_clip=total / max(step * args.batch, 1),
                   data_seconds=round(t_data, 1), final_mse_ema=ema, eval_psnr=final_psnr,
                   peak_rss_mb=peak_rss_mb(), args=vars(args))
    print("SUMMARY", json.dumps(summary), flush=True)
    os.makedirs(args.out, exist_ok=True)
    vae.save_pretrained(args.out)
    with open(os.path.join(args.out, "train_log.json"), "w") as f:
        json.dump(dict(summary=summary, log=log), f, indent=1)
    print(f"saved to {args.out}", flush=True)


if __name__ == "__main__":
    main()
