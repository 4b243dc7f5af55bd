#!/usr/bin/env bash
# The main job on the embedded default model (tests/fixtures/cogvideox-tiny, random weights):
# set up, build, export the CogVideoX DiT and 3D VAE to ONNX from their diffusers checkpoints,
# then run each exported component on the inputs diffusers was given and compare with what
# diffusers computed. Outputs go to out/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --quiet
bin=target/release
tiny=tests/fixtures/cogvideox-tiny
out=out/demo
mkdir -p "$out"

$bin/v2l-export dit "$tiny/transformer" -o "$out"
$bin/v2l-export vae "$tiny/vae" -o "$out"

echo "== DiT vs diffusers"
$bin/v2l-run --engine "$out" stage dit --inputs "$tiny/dit_io.safetensors" -o "$out/dit_out.safetensors" \
  --compare "$tiny/dit_io.safetensors" --compare-name sample=output
echo "== VAE encode vs diffusers"
$bin/v2l-run --engine "$out" stage vae-encode --inputs "$tiny/vae_io.safetensors" -o "$out/vae_encode_out.safetensors" \
  --compare "$tiny/vae_io.safetensors"
echo "== VAE decode vs diffusers"
$bin/v2l-run --engine "$out" stage vae-decode --inputs "$tiny/vae_io.safetensors" -o "$out/vae_decode_out.safetensors" \
  --compare "$tiny/vae_io.safetensors" --compare-name sample=decoded
echo "outputs in $out/"
