"""Train the tiny CogVideoX I2V DiT jointly with the Video2LoRA hypernetwork and LiLoRA.

Pipeline (see training/README.md, "DiT + hypernetwork"):

1. A frozen trained VAE (diffusers dir, or train_vae.py's resume.pt) pre-encodes a cache
   (--cache, default /work/train/latents.pt) for every training seed and every effect:
     target     [16, 5, 8, 8]  clip in [-1, 1] -> posterior mode * scaling_factor (what the DiT learns)
     reference  [16, 5, 8, 8]  clip in [0, 1]  -> posterior mode * scaling_factor (hypernetwork input,
                               Video2LoRA's range)
     image      [16, 1, 8, 8]  frame 0 in [-1, 1] encoded alone (mode and posterior std, both
                               * scaling_factor); padded with 4 zero latent frames at train time, which
                               is CogVideoXImageToVideoPipeline.prepare_latents (no noise augmentation there)
   Pixels are rounded to 8-bit first (inference reads PNG / video files). Frame 0 is the same
   for every effect of a seed, so the image latent is stored once per seed.
2. A CogVideoXTransformer3DModel (I2V: 32 input channels = [noisy latents, image latents]).
3. LiLoRA on every nn.Linear of the DiT (forward hooks, s = 1), rows from VideoHyperDream.
4. Example = effect E, seeds s1 != s2: hypernet(reference[s1, E]) -> LoRA rows; x0 = target[s2, E],
   image = image[s2]. t ~ U{0..999}, x_t = scheduler.add_noise(x0, eps, t), v-prediction target
   scheduler.get_velocity(x0, eps, t) (CogVideoXDDIMScheduler, zero-SNR); DiT input
   cat([x_t, image], channels) in the pipeline's [B, F, C, H, W] layout, the rotary embeddings the
   pipeline computes for 64x64 / 5 latent frames, the tiny T5's embeddings of "" (8 tokens).
   loss = MSE(v_pred, v) (equal to diffusers' CogVideoX fine-tuning loss, the x0 error weighted by
   1 / (1 - alphas_cumprod)).
5. Saves a diffusers pipeline dir (--out) + hypernetwork.safetensors + lilora.safetensors +
   video2lora.json. Resumable checkpoints in --work/resume.pt.

    nice -n 19 /work/torchvenv/bin/python training/train_dit.py --threads 2 --max-steps 16000 --batch 16 --cosine
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from effects import EFFECTS, make_clip  # noqa: E402
from video2lora import HYPER_PREFIX, LiLoRA, VideoHyperDream, save_hypernet, save_lilora  # noqa: E402

REPO = os.path.dirname(HERE)
FIXTURE = os.path.join(REPO, "tests", "fixtures", "cogvideox-tiny")
TRAIN_SEED0 = 1_000_000  # training seeds; everything in 10000..999999 is held out
VAL_SEED0 = 20_000  # validation-loss seeds (held out; eval_transfer.py uses 10000..)
FRAMES, SIZE = 17, 64


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bf16_enabled(mode: str) -> bool:
    """bf16 autocast for the forward passes: 'auto' turns it on where the CPU multiplies bf16 in
    hardware (AMX or AVX512-BF16); elsewhere bf16 is emulated and slower than fp32."""
    if mode == "auto":
        return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})
    return mode == "on"


# ----------------------------------------------------------------------------------------- VAE


def load_vae(path: str, channels: str = "16,16,32,32", groups: int = 8, layers: int = 1):
    """A diffusers AutoencoderKLCogVideoX dir, or train_vae.py's resume.pt (its "model" state
    dict, built with build_vae(channels, layers, groups)). Returns (vae, description)."""
    from diffusers import AutoencoderKLCogVideoX

    if os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")):
        vae = AutoencoderKLCogVideoX.from_pretrained(path)
        desc = f"{path} (diffusers dir)"
    else:
        if os.path.isdir(path):
            path = os.path.join(path, "resume.pt")
        from train_vae import build_vae

        ck = torch.load(path, map_location="cpu", weights_only=False)
        vae = build_vae([int(c) for c in channels.split(",")], layers, groups)
        vae.load_state_dict(ck["model"])
        desc = f"{path} (resume.pt, step {ck.get('step')})"
    vae.eval().requires_grad_(False)
    return vae, desc


def vae_from_cache(cache: dict):
    """The exact VAE that encoded the cache (its config + weights are stored in it)."""
    from diffusers import AutoencoderKLCogVideoX

    vae = AutoencoderKLCogVideoX.from_config(cache["vae_config"])
    vae.load_state_dict(cache["vae_state"])
    return vae.eval().requires_grad_(False)


def quantize(clip: np.ndarray) -> np.ndarray:
    return np.round(clip * 255.0) / 255.0


@torch.no_grad()
def encode_clips(vae, clips: np.ndarray, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """clips [B, F, H, W, 3] in [0, 1] -> (posterior mean, posterior std) [B, 16, f, h, w], unscaled."""
    x = torch.from_numpy(np.ascontiguousarray(clips, dtype=np.float32)).permute(0, 4, 1, 2, 3)
    if signed:
        x = x * 2.0 - 1.0
    dist = vae.encode(x).latent_dist
    return dist.mode(), dist.std


@torch.no_grad()
def encode_seed(vae, seed: int, effects: list[str]):
    """One seed: target/reference latents [E, 16, 5, 8, 8], image mean/std [16, 1, 8, 8] (unscaled)."""
    clips = np.stack([quantize(make_clip(e, seed)) for e in effects])  # [E, F, H, W, 3]
    target, _ = encode_clips(vae, clips, signed=True)
    ref, _ = encode_clips(vae, clips, signed=False)
    img_mean, img_std = encode_clips(vae, clips[:1, :1], signed=True)
    return target, ref, img_mean[0], img_std[0]


CACHE_CHUNK = 50  # seeds per part file: a stopped cache build loses at most this many seeds


def _vae_fingerprint(vae) -> str:
    """Identifies the VAE's weights, so part files of another VAE are never mixed in."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(vae.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def build_cache(vae, vae_desc: str, seeds: list[int], val_seeds: list[int], effects: list[str],
                scaling: str, threads: int, parts_dir: str) -> dict:
    """Encodes every seed, CACHE_CHUNK seeds per part file in `parts_dir` (written atomically);
    parts already there are reused, so a stopped build continues where it stopped."""
    os.makedirs(parts_dir, exist_ok=True)
    fp = _vae_fingerprint(vae)
    meta_path = os.path.join(parts_dir, "meta.json")
    want = dict(vae_fingerprint=fp, effects=effects, chunk=CACHE_CHUNK)
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            have = json.load(f)
        if have != want:
            raise SystemExit(f"{parts_dir} holds parts of another cache ({have}, this one is {want}); "
                             f"remove it or pick another --cache")
    else:
        with open(meta_path + ".tmp", "w") as f:
            json.dump(want, f)
        os.replace(meta_path + ".tmp", meta_path)
    t0 = time.time()
    parts, seconds, reused = {}, 0.0, 0
    for name, ss in (("train", seeds), ("val", val_seeds)):
        chunks = []
        for c0 in range(0, len(ss), CACHE_CHUNK):
            chunk_seeds = ss[c0: c0 + CACHE_CHUNK]
            path = os.path.join(parts_dir, f"{name}_{chunk_seeds[0]}_{len(chunk_seeds)}.pt")
            if os.path.exists(path):
                chunk = torch.load(path, weights_only=False)
                reused += len(chunk_seeds)
            else:
                c_t0 = time.time()
                enc = [encode_seed(vae, s, effects) for s in chunk_seeds]
                chunk = dict(tensors=[torch.stack(t) for t in zip(*enc)], seconds=time.time() - c_t0)
                torch.save(chunk, path + ".tmp")
                os.replace(path + ".tmp", path)
            seconds += chunk["seconds"]
            chunks.append(chunk["tensors"])
            done = c0 + len(chunk_seeds)
            print(f"  cache {name}: {done}/{len(ss)} seeds, {time.time() - t0:.0f} s "
                  f"({reused} seeds from earlier parts)", flush=True)
        parts[name] = [torch.cat(t) for t in zip(*chunks)]
    n_clips = (len(seeds) + len(val_seeds)) * len(effects)
    tgt = parts["train"][0]
    latent_std = float(tgt.std())
    if scaling == "auto":
        sf = float(f"{1.0 / latent_std:.4g}")
    elif scaling == "keep":
        sf = float(vae.config.scaling_factor)
    else:
        sf = float(scaling)
    cache = dict(vae_config=dict(vae.config), vae_state={k: v.clone() for k, v in vae.state_dict().items()},
                 meta=dict(vae=vae_desc, scaling_factor=sf, raw_latent_std=latent_std,
                           raw_latent_mean=float(tgt.mean()), effects=effects, seeds=seeds, val_seeds=val_seeds,
                           encode_seconds=round(seconds, 1), clips=n_clips,
                           seconds_per_clip=seconds / n_clips, threads=threads,
                           layout="target/reference [S, E, C=16, F=5, H=8, W=8]; image [S, 16, 1, 8, 8]; all x scaling_factor"))
    for name in ("train", "val"):
        tg, rf, im, isd = parts[name]
        p = "" if name == "train" else "val_"
        cache[p + "target"] = tg * sf
        cache[p + "reference"] = rf * sf
        cache[p + "image"] = im * sf
        cache[p + "image_std"] = isd * sf
    print(f"cache: {n_clips} clips ({len(seeds)} train + {len(val_seeds)} val seeds x {len(effects)} effects) "
          f"encoded in {seconds:.1f} s = {seconds / n_clips * 1000:.0f} ms/clip (3 VAE encodes per seed: "
          f"targets, references, first frame); raw latent std {latent_std:.3f} -> scaling_factor {sf}",
          flush=True)
    return cache


def pad_image_latents(img: torch.Tensor, latent_frames: int = 5) -> torch.Tensor:
    """[B, 16, 1, h, w] -> [B, F, 16, h, w]: prepare_latents' layout, frame 0 then zero frames."""
    img = img.permute(0, 2, 1, 3, 4)
    pad = img.new_zeros(img.shape[0], latent_frames - 1, *img.shape[2:])
    return torch.cat([img, pad], dim=1)


# ----------------------------------------------------------------------------------------- DiT


def build_dit(layers=4, heads=4, head_dim=32, time_dim=64, text_dim=32, text_len=8, patch=2, abs_pos=False):
    """The fixture's CogVideoX config at the given size. `patch` 1 gives one token per latent pixel
    (8x8 per latent frame instead of 4x4); `abs_pos` adds CogVideoX-5B-I2V's fixed 3D sin-cos table
    (`use_learned_positional_embeddings`, a buffer for the one trained sample size) to RoPE, so a
    token knows where it is: rotation and zoom move content by an amount that depends on its
    distance from the centre, which relative positions alone do not give."""
    from diffusers import CogVideoXTransformer3DModel

    with open(os.path.join(FIXTURE, "transformer", "config.json")) as f:
        cfg = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    cfg.update(num_layers=layers, num_attention_heads=heads, attention_head_dim=head_dim,
               time_embed_dim=time_dim, text_embed_dim=text_dim, max_text_seq_length=text_len,
               in_channels=32, out_channels=16, patch_size=patch, sample_height=SIZE // 8, sample_width=SIZE // 8,
               sample_frames=FRAMES, use_rotary_positional_embeddings=True,
               use_learned_positional_embeddings=abs_pos)
    return CogVideoXTransformer3DModel(**cfg)


def rotary_embeddings(dit, height=SIZE, width=SIZE, latent_frames=5):
    """(cos, sin) exactly as CogVideoXImageToVideoPipeline._prepare_rotary_positional_embeddings."""
    from diffusers import CogVideoXImageToVideoPipeline

    ns = SimpleNamespace(transformer=dit, vae_scale_factor_spatial=8)
    return CogVideoXImageToVideoPipeline._prepare_rotary_positional_embeddings(
        ns, height, width, latent_frames, torch.device("cpu"))


@torch.no_grad()
def empty_prompt_embeds(text_len=8) -> torch.Tensor:
    """The tiny T5's embeddings of "" padded to text_len tokens: [1, text_len, 32]."""
    from transformers import T5EncoderModel, T5Tokenizer

    tok = T5Tokenizer.from_pretrained(os.path.join(FIXTURE, "tokenizer"))
    te = T5EncoderModel.from_pretrained(os.path.join(FIXTURE, "text_encoder")).eval()
    ids = tok([""], padding="max_length", max_length=text_len, truncation=True, add_special_tokens=True,
              return_tensors="pt").input_ids
    return te(ids)[0].float()


def load_scheduler():
    from diffusers import CogVideoXDDIMScheduler

    return CogVideoXDDIMScheduler.from_pretrained(os.path.join(FIXTURE, "scheduler"))


def opposite_effects(e: torch.Tensor) -> torch.Tensor:
    """Each effect's opposite (rotate cw <-> ccw, zoom in <-> out, pan left <-> right, hue <-> fade):
    the held-out loss with the opposite's reference (`val_opposite`) equals `val_matched` when the
    model cannot tell a motion from its reverse."""
    pairs = [("rotate_cw", "rotate_ccw"), ("zoom_in", "zoom_out"), ("pan_left", "pan_right"),
             ("hue_shift", "fade_black")]
    table = list(range(len(EFFECTS)))
    for x, y in pairs:
        table[EFFECTS.index(x)], table[EFFECTS.index(y)] = EFFECTS.index(y), EFFECTS.index(x)
    return torch.tensor(table)[e]


class Trainer:
    def __init__(self, args, cache):
        self.args = args
        self.dit = build_dit(args.layers, args.heads, args.head_dim, args.time_dim, args.text_dim, args.text_len,
                             args.patch_size, args.abs_pos)
        self.autocast = bf16_enabled(args.bf16)
        self.lilora = LiLoRA(self.dit, args.a, args.b, args.r, scale=args.lora_scale)
        grid = tuple(cache["reference"].shape[-3:])
        context_len = grid[0] * grid[1] * grid[2]
        self.hyper = VideoHyperDream(self.lilora.num_layers, 16, args.a, args.b, args.r, args.hyper_blocks,
                                     args.hyper_iters, context_len if getattr(args, "context_pos", False) else 0,
                                     context_conv=getattr(args, "context_conv", 0), context_shape=grid)
        self.sched = load_scheduler()
        self.alphas_cumprod = self.sched.alphas_cumprod.float()
        self.rope = rotary_embeddings(self.dit)
        self.text = empty_prompt_embeds(args.text_len)
        self.cache = cache
        self.n_eff = cache["target"].shape[1]
        # --hyper-labels: a training-only classifier of the effect on the context encoder's features
        self.label_head = (nn.Linear(2 * args.context_conv, self.n_eff)
                           if getattr(args, "hyper_labels", 0.0) and getattr(args, "context_conv", 0) else None)

    def parameters(self):
        return list(self.dit.parameters()) + self.hyper_parameters()

    def hyper_parameters(self):
        """Hypernetwork, LiLoRA and the training-only label head (one optimizer group)."""
        head = list(self.label_head.parameters()) if self.label_head is not None else []
        return list(self.lilora.parameters()) + list(self.hyper.parameters()) + head

    def param_counts(self) -> dict:
        n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        return dict(dit=n(self.dit), hypernet=n(self.hyper), lilora=n(self.lilora),
                    lilora_layers=self.lilora.num_layers, weight_dim=self.lilora.weight_dim, heads=self.hyper.heads)

    def loss(self, ref, x0, img, t, noise, lora: bool = True, keep: torch.Tensor | None = None) -> torch.Tensor:
        """ref/x0 [B, 16, 5, 8, 8], img [B, 16, 1, 8, 8] (already sampled), t [B] long, noise like x0;
        keep [B] (0/1): examples with 0 get zero LoRA rows, i.e. exactly the DiT without LoRA."""
        x0 = x0.permute(0, 2, 1, 3, 4)  # pipeline layout [B, F, C, H, W]
        noise = noise.permute(0, 2, 1, 3, 4)
        xt = self.sched.add_noise(x0, noise, t)
        v = self.sched.get_velocity(x0, noise, t)
        inp = torch.cat([xt, pad_image_latents(img)], dim=2)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            rows = None
            if lora:
                rows = self.hyper(ref)
                if keep is not None:
                    rows = rows * keep.view(-1, 1, 1).to(rows.dtype)
            self.lilora.set_rows(rows)
            try:
                pred = self.dit(hidden_states=inp, encoder_hidden_states=self.text.expand(x0.shape[0], -1, -1),
                                timestep=t, image_rotary_emb=self.rope, return_dict=False)[0]
            finally:
                self.lilora.set_rows(None)
        return F.mse_loss(pred.float(), v)

    def sample_image(self, idx, gen, prefix=""):
        img = self.cache[prefix + "image"][idx]
        if self.args.image_latents == "sample":  # what prepare_latents does (retrieve_latents samples)
            img = img + self.cache[prefix + "image_std"][idx] * torch.randn(img.shape, generator=gen)
        return img

    def batch(self, rng: np.random.Generator, gen: torch.Generator, bsz: int):
        S = self.cache["target"].shape[0]
        e = rng.integers(self.n_eff, size=bsz)
        s2 = rng.integers(S, size=bsz)
        s1 = (s2 + rng.integers(1, S, size=bsz)) % S  # != s2
        e_t, s1_t, s2_t = map(torch.from_numpy, (e, s1, s2))
        ref = self.cache["reference"][s1_t, e_t]
        x0 = self.cache["target"][s2_t, e_t]
        img = self.sample_image(s2_t, gen)
        t = torch.randint(0, self.sched.config.num_train_timesteps, (bsz,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        keep = (torch.rand(bsz, generator=gen) >= self.args.lora_dropout).float()
        # for contrastive(): the same effect seen in the target's own scene
        pair = (ref, self.cache["reference"][s2_t, e_t], e_t)
        return (ref, x0, img, t, noise, True, keep), pair

    def contrastive(self, ref, ref2, e, tau: float = 0.1) -> torch.Tensor:
        """InfoNCE on the hypernetwork's rows (training only; the model and its files are
        unchanged): rows of reference scene s1 should be nearest to the rows of the same effect in
        scene s2, among the batch's other effects. The diffusion loss alone gives the hypernetwork
        little reason to tell a motion from its reverse once the DiT has learned to ignore the
        difference (training/README.md, "Motion run")."""
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            a = self.hyper(ref)
            b = self.hyper(ref2)
        a = F.normalize(a.flatten(1).float(), dim=1)
        b = F.normalize(b.flatten(1).float(), dim=1)
        logits = a @ b.T / tau
        same = e[:, None] == e[None, :]
        eye = torch.eye(len(e), dtype=torch.bool)
        logits = logits.masked_fill(same & ~eye, float("-inf"))
        return F.cross_entropy(logits, torch.arange(len(e)))

    def labels(self, ref, e) -> torch.Tensor:
        """Cross-entropy of the effect label predicted from the context encoder's features
        (training only; the exported model never sees a label). It teaches the encoder to see
        each effect, direction included, quickly (hyper_probe.py: 88 % after 600 steps), which the
        diffusion loss alone, reaching the encoder through the DiT, does slowly."""
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.label_head(self.hyper.context_encoder.features(ref))
        return F.cross_entropy(logits.float(), e)

    @torch.no_grad()
    def validate(self, bsz: int) -> dict:
        """Held-out loss with the matching reference, a reference of another effect, and no LoRA
        (same seeds, timesteps and noise). matched < mismatched means the effect is transferred."""
        c = self.cache
        S = c["val_target"].shape[0]
        if S < 2:
            return {}
        gen = torch.Generator().manual_seed(1234)
        rows = [(e, s, (s + 1) % S) for e in range(self.n_eff) for s in range(S)]
        tot = {"matched": 0.0, "mismatched": 0.0, "opposite": 0.0, "no_lora": 0.0}
        motion = {"matched": 0.0, "opposite": 0.0}  # batches of motion effects only: can it tell the direction?
        self.dit.eval(), self.hyper.eval()
        n = n_motion = 0
        for i in range(0, len(rows), bsz):
            r = rows[i: i + bsz]
            e = torch.tensor([x[0] for x in r])
            s2 = torch.tensor([x[1] for x in r])
            s1 = torch.tensor([x[2] for x in r])
            e_wrong = (e + 1 + torch.randint(0, self.n_eff - 1, e.shape, generator=gen)) % self.n_eff
            x0 = c["val_target"][s2, e]
            img = c["val_image"][s2]
            t = torch.linspace(20, 980, len(r)).round().long()
            noise = torch.randn(x0.shape, generator=gen)
            w = len(r)
            matched = self.loss(c["val_reference"][s1, e], x0, img, t, noise).item()
            opposite = self.loss(c["val_reference"][s1, opposite_effects(e)], x0, img, t, noise).item()
            tot["matched"] += w * matched
            tot["mismatched"] += w * self.loss(c["val_reference"][s1, e_wrong], x0, img, t, noise).item()
            tot["opposite"] += w * opposite
            tot["no_lora"] += w * self.loss(None, x0, img, t, noise, lora=False).item()
            n += w
            if all(EFFECTS[x[0]] not in ("hue_shift", "fade_black") for x in r):
                motion["matched"] += w * matched
                motion["opposite"] += w * opposite
                n_motion += w
        self.dit.train(), self.hyper.train()
        out = {f"val_{k}": v / n for k, v in tot.items()}
        if n_motion:
            out.update({f"val_motion_{k}": v / n_motion for k, v in motion.items()})
        return out

    @torch.no_grad()
    def transfer_eval(self, vae, sf: float, n: int, steps: int) -> dict:
        """eval_transfer.py's measurement on the in-memory model (diffusers pipeline, fp32, LoRA on
        and off): accuracy and median strength per effect, for the curve in train_log.json."""
        from diffusers import CogVideoXImageToVideoPipeline
        from transformers import T5EncoderModel, T5Tokenizer

        from eval_transfer import run_transfer

        if getattr(self, "_pipe", None) is None:
            vae.register_to_config(scaling_factor=sf)
            self._pipe = CogVideoXImageToVideoPipeline(
                tokenizer=T5Tokenizer.from_pretrained(os.path.join(FIXTURE, "tokenizer")),
                text_encoder=T5EncoderModel.from_pretrained(os.path.join(FIXTURE, "text_encoder")).eval(),
                vae=vae, transformer=self.dit, scheduler=load_scheduler())
            self._pipe.set_progress_bar_config(disable=True)
        self.dit.eval(), self.hyper.eval()
        try:
            _, sm = run_transfer(self._pipe, self.hyper, self.lilora, self.hyper.sample_iters, n, steps=steps,
                                 log=lambda m: None)
        finally:
            self.dit.train(), self.hyper.train()
        per = {e: [r["lora"], r["base"], round(r["strength_lora"], 3), round(r["strength_base"], 3)]
               for e, r in sm["per_effect"].items()}
        return dict(n=n, accuracy_lora=sm["accuracy_lora"], accuracy_no_lora=sm["accuracy_no_lora"],
                    per_effect_hits_lora_base_strength_lora_base=per, seconds=sm["seconds"])

    def state(self) -> dict:
        head = {"label_head": self.label_head.state_dict()} if self.label_head is not None else {}
        return dict(dit=self.dit.state_dict(), lilora=self.lilora.state_dict(), hyper=self.hyper.state_dict(), **head)

    def load_state(self, st: dict) -> None:
        self.dit.load_state_dict(st["dit"])
        self.lilora.load_state_dict(st["lilora"])
        self.hyper.load_state_dict(st["hyper"])
        if self.label_head is not None and "label_head" in st:
            self.label_head.load_state_dict(st["label_head"])


# ---------------------------------------------------------------------------------------- save


def _copy_tree(src: str, dst: str) -> None:
    """Copies the files only (the fixture dirs are read-only; the copies should not be)."""
    os.makedirs(dst)
    for name in sorted(os.listdir(src)):
        shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))


def save_pipeline(out: str, tr: Trainer, vae, sf: float, extra: dict) -> None:
    """A complete diffusers CogVideoXImageToVideoPipeline dir + the Video2LoRA files."""
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    tr.dit.save_pretrained(os.path.join(tmp, "transformer"))
    vae.register_to_config(scaling_factor=sf)
    vae.save_pretrained(os.path.join(tmp, "vae"))
    for d in ("scheduler", "text_encoder", "tokenizer"):
        _copy_tree(os.path.join(FIXTURE, d), os.path.join(tmp, d))
    shutil.copyfile(os.path.join(FIXTURE, "model_index.json"), os.path.join(tmp, "model_index.json"))
    save_hypernet(tr.hyper, os.path.join(tmp, "hypernetwork.safetensors"))
    save_lilora(tr.lilora, os.path.join(tmp, "lilora.safetensors"))
    cfg = dict(tr.hyper.config(), scale=tr.lilora.scale, layer_order=tr.lilora.paths,
               reference="frames in [0, 1] -> VAE posterior mode x scaling_factor",
               export=f"v2l-export pipeline DIR --hypernet DIR/hypernetwork.safetensors "
                      f"--lilora DIR/lilora.safetensors --iterations {tr.hyper.sample_iters}")
    cfg.update(extra)
    with open(os.path.join(tmp, "video2lora.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    for name in ("hypernetwork.safetensors", "lilora.safetensors"):
        os.chmod(os.path.join(tmp, name), 0o644)  # safetensors writes 0600
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(tmp, out)


def init_from_pipeline(tr: Trainer, path: str) -> tuple[int, list, float]:
    """Loads DiT, LiLoRA and hypernetwork weights from a pipeline dir save_pipeline wrote (or from
    another run's resume.pt); returns (its train_steps, its log, its train_seconds) so the curve goes
    on from there. A hypernetwork with context positions may start from one without."""
    from diffusers import CogVideoXTransformer3DModel
    from safetensors.torch import load_file

    if os.path.isfile(path):
        ck = torch.load(path, weights_only=False)
        tr.dit.load_state_dict(ck["model"]["dit"])
        tr.lilora.load_state_dict(ck["model"]["lilora"])
        tr.hyper.load_upstream_state_dict({HYPER_PREFIX + k: v for k, v in ck["model"]["hyper"].items()},
                                          allow_new_positions=True)
        return ck["step"], ck["log"], ck["seconds"]

    dit = CogVideoXTransformer3DModel.from_pretrained(os.path.join(path, "transformer"))
    tr.dit.load_state_dict(dit.state_dict())
    tr.hyper.load_upstream_state_dict(load_file(os.path.join(path, "hypernetwork.safetensors")),
                                      allow_new_positions=True)
    tr.lilora.load_upstream_state_dict(load_file(os.path.join(path, "lilora.safetensors")))
    with open(os.path.join(path, "video2lora.json")) as f:
        cfg = json.load(f)
    log = []
    if os.path.exists(os.path.join(path, "train_log.json")):
        with open(os.path.join(path, "train_log.json")) as f:
            log = json.load(f)["log"]
    return int(cfg.get("train_steps", 0)), log, float(cfg.get("train_seconds", 0.0))


def dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


# ---------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = ap.add_argument_group("data / cache")
    d.add_argument("--vae", default="/work/train/vae", help="diffusers VAE dir, or a train_vae.py resume.pt (or a dir holding one)")
    d.add_argument("--vae-channels", default="16,16,32,32", help="for resume.pt: build_vae channels")
    d.add_argument("--vae-groups", type=int, default=8)
    d.add_argument("--vae-layers", type=int, default=1)
    d.add_argument("--cache", default="/work/train/latents.pt")
    d.add_argument("--rebuild-cache", action="store_true", help="re-encode even if --cache exists")
    d.add_argument("--cache-only", action="store_true", help="build the cache and exit")
    d.add_argument("--train-seeds", type=int, default=1000, help="seeds 1_000_000.. (each x 8 effects)")
    d.add_argument("--val-seeds", type=int, default=8, help="held-out seeds 20000.. for the validation loss")
    d.add_argument("--scaling-factor", default="auto",
                   help="'auto' = 1/std of the training target latents (written to vae/config.json), "
                        "'keep' = the VAE config's, or a number")
    d.add_argument("--image-latents", choices=["sample", "mode"], default="sample",
                   help="first-frame latent: posterior sample (diffusers prepare_latents) or mode (v2l-run default)")
    m = ap.add_argument_group("model")
    m.add_argument("--layers", type=int, default=4)
    m.add_argument("--heads", type=int, default=4)
    m.add_argument("--head-dim", type=int, default=32)
    m.add_argument("--time-dim", type=int, default=64)
    m.add_argument("--patch-size", type=int, default=2, help="DiT patch size (1 = one token per latent pixel)")
    m.add_argument("--abs-pos", action="store_true",
                   help="add the fixed 3D sin-cos position table (use_learned_positional_embeddings, as "
                        "CogVideoX-5B-I2V) to RoPE")
    m.add_argument("--text-dim", type=int, default=32)
    m.add_argument("--text-len", type=int, default=8)
    m.add_argument("--a", type=int, default=64, help="LiLoRA down_aux rows")
    m.add_argument("--b", type=int, default=32, help="LiLoRA up_aux columns")
    m.add_argument("--r", type=int, default=1)
    m.add_argument("--lora-scale", type=float, default=1.0)
    m.add_argument("--hyper-blocks", type=int, default=2)
    m.add_argument("--hyper-iters", type=int, default=4)
    m.add_argument("--context-pos", action="store_true",
                   help="NOT upstream: a learned position table on the hypernetwork's context tokens "
                        "(img_weight_generator.context_pos_emb), so it can see where and when things move")
    m.add_argument("--context-conv", type=int, default=0,
                   help="NOT upstream: hidden channels of a context encoder (img_weight_generator.context_encoder: "
                        "3D convs and a position-aware readout) whose rows are added to the hypernetwork's, "
                        "so it can tell a motion from its reverse; 0 = none")
    t = ap.add_argument_group("training")
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--lr", type=float, default=5e-4)
    t.add_argument("--hyper-lr", type=float, default=0.0, help="LR of hypernet + LiLoRA (0 = --lr)")
    t.add_argument("--weight-decay", type=float, default=0.01)
    t.add_argument("--warmup", type=int, default=200)
    t.add_argument("--cosine", action="store_true", help="cosine-decay the LR to 0 at --max-steps")
    t.add_argument("--lora-dropout", type=float, default=0.1,
                   help="fraction of examples trained with the LoRA off (zero rows), so the base DiT alone "
                        "still makes plausible clips and 'LoRA off' is a fair baseline")
    t.add_argument("--grad-clip", type=float, default=1.0)
    t.add_argument("--hyper-contrastive", type=float, default=0.0,
                   help="weight of an InfoNCE loss on the hypernetwork's rows (same effect in two scenes "
                        "together, other effects apart); 0 = the diffusion loss only, as upstream")
    t.add_argument("--hyper-labels", type=float, default=0.0,
                   help="with --context-conv: weight of a training-only cross-entropy of the effect label, "
                        "predicted by a linear head from the context encoder's features (NOT upstream, which "
                        "trains on the diffusion loss alone; the exported model has no head and takes no label)")
    t.add_argument("--max-steps", type=int, default=10000)
    t.add_argument("--minutes", type=float, default=0.0, help="also stop after this many minutes (0 = no limit)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=1,
                   help="torch threads: 2 on an idle 2-core machine, 1 when the other core is busy (see README)")
    t.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                   help="bf16 autocast of the forward passes (auto: on where the CPU has AMX or AVX512-BF16)")
    t.add_argument("--eval-every", type=int, default=0,
                   help="every N steps, generate --eval-n held-out clips (DDIM --eval-steps) and measure the "
                        "effect each shows: the accuracy-per-effect curve in train_log.json (0 = never)")
    t.add_argument("--eval-n", type=int, default=32)
    t.add_argument("--eval-steps", type=int, default=20)
    t.add_argument("--log-every", type=int, default=25)
    t.add_argument("--val-every", type=int, default=250, help="held-out matched/mismatched/no-LoRA loss (0 = end only)")
    t.add_argument("--checkpoint-every", type=int, default=100)
    t.add_argument("--work", default="/work/train/dit", help="resume.pt + train_log.json go here")
    t.add_argument("--resume", action="store_true", help="continue from WORK/resume.pt when it exists")
    t.add_argument("--out", default="/work/train/pipeline", help="final diffusers pipeline dir")
    t.add_argument("--init", default="",
                   help="start from the weights of a pipeline dir this script wrote (another machine's run: "
                        "resume.pt is machine-local, the pipeline dir can be committed); the optimizer starts "
                        "afresh with --warmup, steps count on from the dir's train_steps, the log from its "
                        "train_log.json when present. Ignored when --resume finds WORK/resume.pt")
    args = ap.parse_args()
    if args.hyper_labels and not args.context_conv:
        raise SystemExit("--hyper-labels trains a head on the context encoder's features: it needs --context-conv")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)

    if os.path.exists(args.cache) and not args.rebuild_cache:
        cache = torch.load(args.cache, weights_only=False)
        vae = vae_from_cache(cache)
        print(f"cache {args.cache}: {cache['meta']['clips']} clips encoded by {cache['meta']['vae']} "
              f"(that VAE, stored in the cache, is the one saved with the pipeline; --vae is ignored), "
              f"scaling_factor {cache['meta']['scaling_factor']}", flush=True)
    else:
        vae, vae_desc = load_vae(args.vae, args.vae_channels, args.vae_groups, args.vae_layers)
        seeds = list(range(TRAIN_SEED0, TRAIN_SEED0 + args.train_seeds))
        val_seeds = list(range(VAL_SEED0, VAL_SEED0 + args.val_seeds))
        cache = build_cache(vae, vae_desc, seeds, val_seeds, EFFECTS, args.scaling_factor, args.threads,
                            args.cache + ".parts")
        os.makedirs(os.path.dirname(os.path.abspath(args.cache)), exist_ok=True)
        torch.save(cache, args.cache + ".tmp")
        os.replace(args.cache + ".tmp", args.cache)
        shutil.rmtree(args.cache + ".parts", ignore_errors=True)
        print(f"saved {args.cache} ({os.path.getsize(args.cache) / 1e6:.1f} MB)", flush=True)
    if args.cache_only:
        return
    sf = cache["meta"]["scaling_factor"]

    tr = Trainer(args, cache)
    counts = tr.param_counts()
    print("params", json.dumps(counts), f"batch {args.batch}, bf16 autocast {tr.autocast}", flush=True)

    hyper_params = tr.hyper_parameters()
    opt = torch.optim.AdamW([
        dict(params=list(tr.dit.parameters()), lr=args.lr, base_lr=args.lr),
        dict(params=hyper_params, lr=args.hyper_lr or args.lr, base_lr=args.hyper_lr or args.lr),
    ], weight_decay=args.weight_decay, betas=(0.9, 0.99))

    os.makedirs(args.work, exist_ok=True)
    resume = os.path.join(args.work, "resume.pt")
    step, log, seconds0 = 0, [], 0.0
    if args.resume and os.path.exists(resume):
        ck = torch.load(resume, weights_only=False)
        tr.load_state(ck["model"])
        opt.load_state_dict(ck["opt"])
        step, log, seconds0 = ck["step"], ck["log"], ck["seconds"]
        rng.bit_generator.state = ck["rng"]
        gen.set_state(ck["gen"])
        print(f"resumed at step {step} ({seconds0:.0f} s trained)", flush=True)
    elif args.init:
        step, log, seconds0 = init_from_pipeline(tr, args.init)
        print(f"initialised from {args.init}: step {step}, {seconds0:.0f} s trained before", flush=True)
    start_step = step

    def lr_factor(s):
        f = min(1.0, (s - start_step + 1) / args.warmup) if args.warmup else 1.0
        if args.cosine and args.max_steps:
            f *= 0.5 * (1 + math.cos(math.pi * min(s, args.max_steps) / args.max_steps))
        return f

    def save_resume():
        ck = dict(model=tr.state(), opt=opt.state_dict(), step=step, log=log, rng=rng.bit_generator.state,
                  gen=gen.get_state(), seconds=seconds0 + time.time() - t0, args=vars(args))
        torch.save(ck, resume + ".tmp")
        os.replace(resume + ".tmp", resume)
        log_path = os.path.join(args.work, "train_log.json")  # the curve so far (training/curves.py)
        with open(log_path + ".tmp", "w") as f:
            json.dump(dict(log=log), f)
        os.replace(log_path + ".tmp", log_path)

    tr.dit.train(), tr.hyper.train()
    params = tr.parameters()
    t0 = time.time()
    last_t, last_step, last_cpu = t0, step, time.process_time()
    ema = None
    while step < args.max_steps:
        if args.minutes and (time.time() - t0) > args.minutes * 60:
            break
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(step)
        loss_args, pair = tr.batch(rng, gen, args.batch)
        loss = tr.loss(*loss_args)
        aux = None
        if args.hyper_contrastive:
            aux = tr.contrastive(*pair)
            loss = loss + args.hyper_contrastive * aux
        aux_labels = None
        if tr.label_head is not None:
            aux_labels = tr.labels(loss_args[0], pair[2])
            loss = loss + args.hyper_labels * aux_labels
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt.step()
        step += 1
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % args.log_every == 0 or step == 1 or step == args.max_steps:
            now = time.time()
            cpu = time.process_time()
            sps = (step - last_step) / max(now - last_t, 1e-9)
            cpu_per_step = (cpu - last_cpu) / max(step - last_step, 1)
            last_t, last_step, last_cpu = now, step, cpu
            entry = dict(step=step, t=round(seconds0 + now - t0, 1), loss=loss.item(), loss_ema=ema,
                         **({"aux_contrastive": aux.item()} if aux is not None else {}),
                         **({"aux_labels": aux_labels.item()} if aux_labels is not None else {}),
                         grad_norm=float(gnorm), lr=opt.param_groups[0]["lr"], steps_per_s=sps,
                         s_per_step=1 / max(sps, 1e-9), cpu_s_per_step=cpu_per_step)
            if args.val_every and step % args.val_every == 0:
                entry.update(tr.validate(args.batch))
            if args.eval_every and step % args.eval_every == 0:
                entry["transfer"] = tr.transfer_eval(vae, sf, args.eval_n, args.eval_steps)
            log.append(entry)
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()),
                  f"rss={peak_rss_mb():.0f}MB", flush=True)
        if args.checkpoint_every and step % args.checkpoint_every == 0:
            save_resume()

    total = seconds0 + time.time() - t0
    final_val = tr.validate(args.batch)
    print("final", json.dumps(final_val), flush=True)
    if args.checkpoint_every:
        save_resume()
    summary = dict(params=counts, steps=step, seconds=round(total, 1), s_per_step=total / max(step, 1),
                   final_loss_ema=ema, final_val=final_val, peak_rss_mb=peak_rss_mb(), scaling_factor=sf,
                   vae=cache["meta"]["vae"], cache_clips=cache["meta"]["clips"], args=vars(args))
    save_pipeline(args.out, tr, vae, sf, dict(train_steps=step, train_seconds=round(total, 1),
                                              final_val=final_val))
    with open(os.path.join(args.work, "train_log.json"), "w") as f:
        json.dump(dict(summary=summary, log=log), f, indent=1)
    shutil.copyfile(os.path.join(args.work, "train_log.json"), os.path.join(args.out, "train_log.json"))
    sizes = {n: os.path.getsize(os.path.join(args.out, n)) for n in ("hypernetwork.safetensors", "lilora.safetensors")}
    sizes["transformer"] = dir_size(os.path.join(args.out, "transformer"))
    sizes["vae"] = dir_size(os.path.join(args.out, "vae"))
    print("SUMMARY", json.dumps(dict(summary, file_bytes=sizes)), flush=True)
    print(f"saved pipeline to {args.out}", flush=True)


if __name__ == "__main__":
    main()
