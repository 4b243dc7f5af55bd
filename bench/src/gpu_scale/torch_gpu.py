"""The PyTorch side of `v2l-bench gpu --scale`, on one CUDA GPU (written beside its checkpoints).

  PY torch_gpu.py make-dit DIR --frames F --height H --width W   CogVideoX-5B widths, 2 blocks,
                                                                 random weights; inputs at batch 2
  PY torch_gpu.py make-vae DIR --frames F --height H --width W   the real CogVideoX VAE config,
                                                                 random weights; latents of that
                                                                 video (17x480x720: 5 at 60x90)
  PY torch_gpu.py make-lora DIR --rank R -o FILE                a PEFT-format LoRA of rank R on
                                                                 every linear of DIR's DiT blocks
  PY torch_gpu.py run DIR --stage dit|vae-decode --dtype fp32|bf16|fp16 -n N --reference REF
                      [--lora FILE]
      one JSON line: median ms, peak GPU memory; fp32 (TF32 off) writes REF, the reference every
      other run is compared with (rel_l2_vs_fp32). --lora: FILE on the DiT as PEFT runs an
      unmerged LoRA, `base(x) + lora_B(lora_A(x)) * scaling` in the model's dtype (scaling 1:
      alpha = rank).
  --device cpu: the same on the CPU (checks the plumbing on a machine without a GPU)
"""
import argparse, json, time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_dit(a):
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from safetensors.torch import save_file

    torch.manual_seed(0)
    frames, h, w = (a.frames - 1) // 4 + 1, a.height // 8, a.width // 8
    model = CogVideoXTransformer3DModel(
        num_attention_heads=48, attention_head_dim=64, in_channels=32, out_channels=16,
        time_embed_dim=512, text_embed_dim=4096, num_layers=2, sample_frames=49,
        sample_height=60, sample_width=90, patch_size=2,
        use_rotary_positional_embeddings=True, use_learned_positional_embeddings=False,
        max_text_seq_length=226,
    ).eval()
    model.save_pretrained(f"{a.dir}/transformer")
    gh, gw = h // 2, w // 2
    cos, sin = get_3d_rotary_pos_embed(
        embed_dim=64, crops_coords=((0, 0), (gh, gw)), grid_size=(gh, gw),
        temporal_size=frames, device="cpu",
    )
    save_file(
        {
            "hidden_states": torch.randn(2, frames, 32, h, w),
            "encoder_hidden_states": torch.randn(2, 226, 4096),
            # Two timesteps: each sample's AdaLN modulation differs, so a kernel that applied
            # one sample's to both (ONNX Runtime's CUDA LayerNormalization on a broadcast it
            # does not support) shows in the distance from PyTorch.
            "timestep": torch.tensor([999, 500], dtype=torch.int64),
            "rope_cos": cos.float().contiguous(),
            "rope_sin": sin.float().contiguous(),
        },
        f"{a.dir}/inputs.safetensors",
    )
    print(json.dumps({"tokens": frames * gh * gw + 226}))


def make_vae(a):
    from diffusers import AutoencoderKLCogVideoX
    from safetensors.torch import save_file

    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX().eval()  # diffusers' defaults are CogVideoX's VAE
    vae.save_pretrained(f"{a.dir}/vae")
    frames, h, w = (a.frames - 1) // 4 + 1, a.height // 8, a.width // 8
    save_file({"latents": torch.randn(1, 16, frames, h, w)}, f"{a.dir}/inputs.safetensors")
    print(json.dumps({"params_m": sum(p.numel() for p in vae.parameters()) / 1e6}))


def make_lora(a):
    from diffusers import CogVideoXTransformer3DModel
    from safetensors.torch import save_file

    torch.manual_seed(1)
    m = CogVideoXTransformer3DModel.from_pretrained(f"{a.dir}/transformer")
    out = {}
    for name, mod in m.named_modules():
        if name.startswith("transformer_blocks.") and isinstance(mod, torch.nn.Linear):
            out[f"transformer.{name}.lora_A.weight"] = (
                torch.randn(a.rank, mod.in_features) / mod.in_features**0.5)
            # Moves the DiT's output by ~5% (0.02: 1.0%, the size of bf16's own error).
            out[f"transformer.{name}.lora_B.weight"] = torch.randn(mod.out_features, a.rank) * 0.1
    save_file(out, a.output)
    print(json.dumps({"rank": a.rank, "layers": len(out) // 2}))


class UnmergedLora(torch.nn.Module):
    """A linear layer with a LoRA beside it, as PEFT's `lora.Linear` computes it unmerged."""

    def __init__(self, base, down, up):
        super().__init__()
        self.base, self.down, self.up = base, down, up

    def forward(self, x):
        return self.base(x) + torch.nn.functional.linear(
            torch.nn.functional.linear(x, self.down), self.up)


def add_lora(m, path, dt, dev):
    from safetensors.torch import load_file

    w = load_file(path)
    for key in [k for k in w if k.endswith(".lora_A.weight")]:
        name = key[len("transformer."):-len(".lora_A.weight")]
        parent, _, leaf = name.rpartition(".")
        owner = m.get_submodule(parent)
        down = w[key].to(dt).to(dev)
        up = w[key.replace("lora_A", "lora_B")].to(dt).to(dev)
        setattr(owner, leaf, UnmergedLora(getattr(owner, leaf), down, up))


def run(a):
    from safetensors.torch import load_file, save_file

    torch.set_grad_enabled(False)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dt, dev = DTYPES[a.dtype], a.device
    gpu = dev == "cuda"
    io = {
        k: (v.to(dt) if v.is_floating_point() else v).to(dev)
        for k, v in load_file(f"{a.dir}/inputs.safetensors").items()
    }
    if a.stage == "dit":
        from diffusers import CogVideoXTransformer3DModel

        m = CogVideoXTransformer3DModel.from_pretrained(f"{a.dir}/transformer", torch_dtype=dt)
        m = m.eval().to(dev)
        if a.lora:
            add_lora(m, a.lora, dt, dev)

        def f():
            return m(
                hidden_states=io["hidden_states"],
                encoder_hidden_states=io["encoder_hidden_states"],
                timestep=io["timestep"],
                image_rotary_emb=(io["rope_cos"], io["rope_sin"]),
                return_dict=False,
            )[0]
    else:
        from diffusers import AutoencoderKLCogVideoX

        m = AutoencoderKLCogVideoX.from_pretrained(f"{a.dir}/vae", torch_dtype=dt).eval().to(dev)
        def f():
            return m.decode(io["latents"]).sample  # [B, C, F, H, W], as v2l's stage takes them

    sync = torch.cuda.synchronize if gpu else (lambda: None)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    out = f()
    sync()
    times = []
    for _ in range(a.n):
        t = time.perf_counter()
        out = f()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    r = {"torch_ms": times[len(times) // 2], "dtype": a.dtype, "lora": a.lora is not None,
         "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if gpu else None,
         "torch": f"{torch.__version__} on "
                  + (torch.cuda.get_device_name() if gpu else "the CPU")}
    out = out.float().cpu().contiguous()
    if a.dtype == "fp32":
        save_file({"sample": out}, a.reference)
    else:
        ref = load_file(a.reference)["sample"]
        r["rel_l2_vs_fp32"] = float((out - ref).norm() / ref.norm())
    print(json.dumps(r))


p = argparse.ArgumentParser()
p.add_argument("cmd", choices=["make-dit", "make-vae", "make-lora", "run"])
p.add_argument("dir")
p.add_argument("--frames", type=int, default=49)
p.add_argument("--height", type=int, default=480)
p.add_argument("--width", type=int, default=720)
p.add_argument("--stage", default="dit")
p.add_argument("--dtype", default="bf16")
p.add_argument("-n", type=int, default=5)
p.add_argument("--rank", type=int, default=64)
p.add_argument("--lora")
p.add_argument("--reference")
p.add_argument("-o", "--output")
p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
a = p.parse_args()
{"make-dit": make_dit, "make-vae": make_vae, "make-lora": make_lora, "run": run}[a.cmd](a)
