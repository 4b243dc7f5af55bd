#!/usr/bin/env bash
# The main job on the embedded default model (tests/fixtures/cogvideox-tiny, RANDOM weights, so
# the video is noise): set up, build, export the CogVideoX I2V pipeline and the Video2LoRA
# hypernetwork from their checkpoints, compile an engine, and generate a video from the first
# frame with the reference clip's effect. Then check each component against what diffusers
# computed. Outputs go to out/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --quiet
bin=target/release
tiny=tests/fixtures/cogvideox-tiny
out=out/demo
rm -rf "$out"
mkdir -p "$out"

$bin/v2l-export pipeline "$tiny" --hypernet "$tiny/hypernetwork.safetensors" --lilora "$tiny/lilora.safetensors" -o "$out/export"
$bin/v2l-compile "$out/export" -o "$out/engine"

# Generate: first frame + prompt text (tokenized and encoded by the exported T5) + reference clip
# -> mp4 + contact sheet.
$bin/v2l-run --engine "$out/engine" --image "$tiny/first_frame.png" \
  --prompt "A red car drives through a snowy forest at dusk, cinematic lighting." --negative-prompt "blurry, low quality" \
  --reference "$tiny/reference.mp4" --frames 17 --steps 4 --guidance 6 --seed 42 -o "$out/video.mp4"

# The LoRA the reference clip predicts, as a standard file diffusers or ComfyUI can load.
$bin/v2l-lora predict --engine "$out/engine" --reference "$tiny/reference.mp4" -o "$out/reference_lora.safetensors"
$bin/v2l-lora inspect "$out/reference_lora.safetensors" | head -4

echo "== DiT vs diffusers"
$bin/v2l-run --engine "$out/engine" stage dit --inputs "$tiny/dit_io.safetensors" -o "$out/dit_out.safetensors" \
  --compare "$tiny/dit_io.safetensors" --compare-name sample=output
echo "== VAE encode vs diffusers"
$bin/v2l-run --engine "$out/engine" stage vae-encode --inputs "$tiny/vae_io.safetensors" -o "$out/vae_encode_out.safetensors" \
  --compare "$tiny/vae_io.safetensors"
echo "== VAE decode vs diffusers"
$bin/v2l-run --engine "$out/engine" stage vae-decode --inputs "$tiny/vae_io.safetensors" -o "$out/vae_decode_out.safetensors" \
  --compare "$tiny/vae_io.safetensors" --compare-name sample=decoded
echo "== hypernetwork vs upstream Video2LoRA"
$bin/v2l-run --engine "$out/engine" stage hypernet --inputs "$tiny/e2e_io.safetensors" -o "$out/hyper_out.safetensors" \
  --compare "$tiny/e2e_io.safetensors"
echo "video: $out/video.mp4, contact sheet: $out/video.png"
