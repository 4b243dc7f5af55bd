"""The PyTorch + diffusers side of `v2l-bench scale` (run with --torch-python PY).

Runs the same module on the same generated checkpoint and inputs as v2l, in its own process so
its peak RSS is its own, and prints one JSON line: forward time (median of --repeat runs after
one warm-up), peak RSS, and the output written for v2l to compare against.

  PY torch_baseline.py dit <transformer dir> <inputs.safetensors> <out.safetensors> --threads 2
  PY torch_baseline.py vae-decode <vae dir> <inputs.safetensors> <out.safetensors> --threads 2
  PY torch_baseline.py make-vae <vae dir>   (a random CogVideoX VAE at the real widths)
"""
import argparse
import json
import resource
import statistics
import time

import torch
from safetensors.torch import load_file, save_file


def peak_rss_mb():
    """This process's own peak (VmHWM, MB of 10^6 bytes): getrusage's ru_maxrss carries the
    spawning process's peak across fork and exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["dit", "vae-decode", "make-vae"])
    ap.add_argument("model")
    ap.add_argument("inputs", nargs="?")
    ap.add_argument("output", nargs="?")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--tiling", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    if a.what == "make-vae":
        from diffusers import AutoencoderKLCogVideoX

        torch.manual_seed(0)
        # diffusers' default config is CogVideoX's VAE (block_out_channels 128/256/256/512).
        AutoencoderKLCogVideoX().save_pretrained(a.model)
        print(json.dumps({"written": a.model}))
        return
    x = load_file(a.inputs)
    t0 = time.perf_counter()
    if a.what == "dit":
        from diffusers import CogVideoXTransformer3DModel

        m = CogVideoXTransformer3DModel.from_pretrained(a.model, torch_dtype=dtype).eval()
        rope = (x["rope_cos"].to(dtype), x["rope_sin"].to(dtype))

        def run():
            return m(
                hidden_states=x["hidden_states"].to(dtype),
                encoder_hidden_states=x["encoder_hidden_states"].to(dtype),
                timestep=x["timestep"],
                image_rotary_emb=rope,
                return_dict=False,
            )[0]

        name = "sample"
    else:
        from diffusers import AutoencoderKLCogVideoX

        m = AutoencoderKLCogVideoX.from_pretrained(a.model, torch_dtype=dtype).eval()
        if a.tiling:
            m.enable_tiling()

        def run():
            return m.decode(x["latents"].to(dtype)).sample

        name = "sample"
    load_s = time.perf_counter() - t0
    times = []
    with torch.inference_mode():
        for _ in range(max(1, a.repeat)):
            t = time.perf_counter()
            out = run()
            times.append((time.perf_counter() - t) * 1e3)
    save_file({name: out.float().contiguous()}, a.output)
    print(json.dumps({
        "ms": statistics.median(times),
        "runs_ms": times,
        "load_s": load_s,
        "peak_rss_mb": peak_rss_mb(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
