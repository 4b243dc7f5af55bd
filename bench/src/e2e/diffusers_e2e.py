"""diffusers' side of `v2l-bench e2e`: CogVideoXImageToVideoPipeline in bf16 on the generated
pipeline directory, with the LoRA `v2l-lora predict` wrote, at the size and steps v2l ran.

  PY diffusers_e2e.py MODEL_DIR LORA IMAGE OUT.safetensors --prompt P --frames F --height H
      --width W --steps S --guidance G --noise NOISE.safetensors [--staged]

Stock: `from_pretrained` then one `pipe(...)` call, everything resident, as the diffusers docs
show it, started from v2l's initial noise and conditioned on the posterior's mode as v2l is. `--staged`: the prompt encoded first and the T5 deleted before the transformer loads,
as a user who hits the memory limit would do. Prints one JSON line: per-stage wall seconds and
peak RSS (VmHWM, reset between stages), and writes the frames `[F, H, W, 3]` in [0, 1].
"""
import argparse
import json

import torch

from stages import Stages


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("lora")
    ap.add_argument("image")
    ap.add_argument("output")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--frames", type=int, required=True)
    ap.add_argument("--height", type=int, required=True)
    ap.add_argument("--width", type=int, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--guidance", type=float, required=True)
    ap.add_argument("--noise", help="safetensors with v2l's `initial_noise` [1, F, 16, h, w]")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--staged", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from diffusers import CogVideoXImageToVideoPipeline
    from diffusers.utils import load_image
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from safetensors.torch import load_file, save_file

    # v2l conditions on the posterior's mode; diffusers samples it. For frames that compare,
    # the baseline takes the mode too (the only change made to diffusers' computation).
    DiagonalGaussianDistribution.sample = lambda self, generator=None: self.mode()

    s = Stages()
    image = load_image(a.image).resize((a.width, a.height))
    kw = dict(
        image=image, num_frames=a.frames, height=a.height, width=a.width,
        num_inference_steps=a.steps, guidance_scale=a.guidance, use_dynamic_cfg=False,
        output_type="np",
        latents=load_file(a.noise)["initial_noise"].to(torch.bfloat16),
    )
    with torch.inference_mode():
        if a.staged:
            pipe = CogVideoXImageToVideoPipeline.from_pretrained(
                a.model, transformer=None, vae=None, torch_dtype=torch.bfloat16)
            s.end("text_encoder_load")
            pe, ne = pipe.encode_prompt(a.prompt, "", do_classifier_free_guidance=a.guidance > 1,
                                        max_sequence_length=226, dtype=torch.bfloat16)
            del pipe
            s.end("text_encode")
            pipe = CogVideoXImageToVideoPipeline.from_pretrained(
                a.model, text_encoder=None, tokenizer=None, torch_dtype=torch.bfloat16)
            kw.update(prompt_embeds=pe, negative_prompt_embeds=ne)
        else:
            pipe = CogVideoXImageToVideoPipeline.from_pretrained(a.model, torch_dtype=torch.bfloat16)
            kw.update(prompt=a.prompt)
        s.end("load")
        pipe.load_lora_weights(a.lora, adapter_name="v2l")
        s.end("lora_load")
        frames = pipe(**kw).frames[0]
        s.end("generate")
    save_file({"frames": torch.from_numpy(frames).float().contiguous()}, a.output)
    print(json.dumps({"stages": s.stages, "peak_rss_mb": s.highest,
                      "frames_shape": list(frames.shape), "staged": a.staged,
                      "torch": torch.__version__}))


if __name__ == "__main__":
    main()
