"""VideoX-Fun's side of `v2l-bench e2e --model cogvideox-fun-5b-inp`: the authors'
`CogVideoXFunInpaintPipeline` in bf16 on the generated Fun-InP pipeline directory, as
Video2LoRA's `predict_i2v.py` runs it (diffusers' `DDIMScheduler` from the folder's config, the
first frame tiled by `get_image_to_video_latent`), with the LoRA `v2l-lora predict` wrote fused
into the transformer, at the size and steps v2l ran.

  PY videox_fun_e2e.py MODEL_DIR LORA IMAGE OUT.safetensors --videox-fun REPO --prompt P
      --frames F --height H --width W --steps S --guidance G --noise NOISE.safetensors

REPO is a work tree of BerserkerVV/Video2LoRA (or aigc-apps/VideoX-Fun): its `videox_fun`
package is imported from there. The prompt is encoded first and the T5 deleted before the
transformer loads. Prints one JSON line: per-stage wall seconds and peak RSS (VmHWM, reset
between stages), each DiT call's seconds, and writes the frames `[F, H, W, 3]` in [0, 1].
"""
import argparse
import importlib.machinery
import json
import os
import sys
import time
import types

import torch

from stages import Stages


def stub(name, **attrs):
    """VideoX-Fun imports decord and librosa at module level; neither is used here."""
    m = types.ModuleType(name)
    m.__spec__ = importlib.machinery.ModuleSpec(name, None)
    m.__dict__.update(attrs)
    sys.modules.setdefault(name, m)


def fuse_lora(transformer, path):
    """W += (α / r) · B A for every `transformer.<module>.lora_A/B.weight` pair (PEFT keys)."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
        alpha = None
        if "lora_adapter_metadata" in meta:
            alpha = json.loads(meta["lora_adapter_metadata"]).get("lora_alpha")
        modules = dict(transformer.named_modules())
        for key in f.keys():
            if not key.endswith(".lora_A.weight"):
                continue
            name = key[len("transformer."):-len(".lora_A.weight")]
            a = f.get_tensor(key).float()
            b = f.get_tensor(key.replace("lora_A", "lora_B")).float()
            scale = (alpha if alpha is not None else a.shape[0]) / a.shape[0]
            w = modules[name].weight
            w.data = (w.data.float() + scale * (b @ a)).to(w.dtype)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("lora")
    ap.add_argument("image")
    ap.add_argument("output")
    ap.add_argument("--videox-fun", required=True)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--frames", type=int, required=True)
    ap.add_argument("--height", type=int, required=True)
    ap.add_argument("--width", type=int, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--guidance", type=float, required=True)
    ap.add_argument("--noise", required=True, help="safetensors with v2l's `initial_noise`")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.environ.setdefault("VIDEOX_ATTENTION_TYPE", "TORCH")
    sys.path.insert(0, a.videox_fun)
    stub("decord", VideoReader=object, cpu=lambda *x: None,
         bridge=types.SimpleNamespace(set_bridge=lambda *x: None))
    stub("librosa")
    from diffusers import DDIMScheduler
    from safetensors.torch import load_file, save_file
    from transformers import T5EncoderModel, T5Tokenizer
    from videox_fun.models import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
    from videox_fun.pipeline import CogVideoXFunInpaintPipeline
    from videox_fun.utils.utils import get_image_to_video_latent

    s = Stages()
    bf16 = torch.bfloat16
    with torch.inference_mode():
        tok = T5Tokenizer.from_pretrained(a.model, subfolder="tokenizer")
        t5 = T5EncoderModel.from_pretrained(a.model, subfolder="text_encoder", torch_dtype=bf16)
        s.end("text_encoder_load")

        def encode(text):
            ids = tok(text, padding="max_length", max_length=226, truncation=True,
                      add_special_tokens=True, return_tensors="pt").input_ids
            return t5(ids)[0]

        pe, ne = encode(a.prompt), encode("")
        del t5
        s.end("text_encode")
        # As predict_i2v.py loads them: `torch_dtype`, then `.to()` (the VAE keeps some biases
        # in float32 otherwise, and its decode then fails on bf16 inputs).
        transformer = CogVideoXTransformer3DModel.from_pretrained(
            a.model, subfolder="transformer", torch_dtype=bf16).to(bf16)
        vae = AutoencoderKLCogVideoX.from_pretrained(
            a.model, subfolder="vae", torch_dtype=bf16).to(bf16)
        scheduler = DDIMScheduler.from_pretrained(a.model, subfolder="scheduler")
        pipe = CogVideoXFunInpaintPipeline(vae=vae, tokenizer=None, text_encoder=None,
                                           transformer=transformer, scheduler=scheduler)
        s.end("load")
        fuse_lora(transformer, a.lora)
        s.end("lora_fuse")
        video, mask, _ = get_image_to_video_latent(a.image, None, video_length=a.frames,
                                                   sample_size=[a.height, a.width])
        # Each DiT call (both guidance branches in one batch) timed alone, as v2l reports it.
        steps, forward = [], transformer.forward

        def timed(*args, **kw):
            t = time.perf_counter()
            out = forward(*args, **kw)
            steps.append(time.perf_counter() - t)
            return out

        transformer.forward = timed
        frames = pipe(None, prompt_embeds=pe, negative_prompt_embeds=ne, height=a.height,
                      width=a.width, video=video, mask_video=mask, num_frames=a.frames,
                      num_inference_steps=a.steps, guidance_scale=a.guidance,
                      latents=load_file(a.noise)["initial_noise"].to(bf16),
                      output_type="numpy").videos
        s.end("generate")
    frames = torch.as_tensor(frames).float()[0].permute(1, 2, 3, 0).contiguous()  # F, H, W, 3
    save_file({"frames": frames}, a.output)
    print(json.dumps({"stages": s.stages, "peak_rss_mb": s.highest, "dit_steps_s": steps,
                      "frames_shape": list(frames.shape), "torch": torch.__version__}))


if __name__ == "__main__":
    main()
