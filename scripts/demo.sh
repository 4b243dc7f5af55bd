#!/usr/bin/env bash
# The main job on the embedded default model, models/cogvideox-effects: a tiny CogVideoX I2V
# pipeline + Video2LoRA hypernetwork TRAINED on procedural effects (training/). Set up, build,
# export the pipeline and the hypernetwork from their diffusers/upstream checkpoints, compile an
# engine, then generate two clips from the SAME first frame with two different reference clips:
# each clip should show its reference's effect. Prints the effect each clip shows (measured by
# `v2l-run measure`) and writes a side-by-side contact sheet. Then checks the DiT against
# diffusers on this model. Outputs go to out/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --quiet
bin="$(bash scripts/target-dir.sh)/release"
model=models/cogvideox-effects
ex=$model/examples
out=out/demo
fx=tests/fixtures/cogvideox-effects
# The two reference clips the model ships with (examples/ref_<effect>.mp4); first the one whose
# LoRA the parity fixture holds (e2e.json's "dit_io_lora"), checked against diffusers at the end.
first=$(grep -o '"dit_io_lora": *"[a-z_]*"' "$fx/e2e.json" | sed 's/.*"\([a-z_]*\)"$/\1/')
effects=("$first")
for f in "$ex"/ref_*.mp4; do e=${f##*/ref_}; e=${e%.mp4}; [ "$e" = "$first" ] || effects+=("$e"); done
if [ -z "$first" ] || [ ! -f "$ex/ref_$first.mp4" ] || [ "${#effects[@]}" -ne 2 ]; then
  echo "demo: expected two reference clips $ex/ref_<effect>.mp4, one of them $fx/e2e.json's dit_io_lora ('$first'); found: $(ls "$ex")" >&2
  exit 1
fi
rm -rf "$out"
mkdir -p "$out"

$bin/v2l-export pipeline "$model" --hypernet "$model/hypernetwork.safetensors" --lilora "$model/lilora.safetensors" -o "$out/export"
$bin/v2l-compile "$out/export" -o "$out/engine"

# The model was trained with the empty prompt and without guidance, so: --prompt "" --guidance 1.
for e in "${effects[@]}"; do
  echo "== reference $ex/ref_$e.mp4 -> $out/$e.mp4"
  $bin/v2l-run --engine "$out/engine" --image "$ex/first_frame.png" --prompt "" --negative-prompt "" \
    --reference "$ex/ref_$e.mp4" --frames 17 --steps 20 --guidance 1 --seed 42 -o "$out/$e.mp4"
done
$bin/v2l-run --engine "$out/engine" --image "$ex/first_frame.png" --prompt "" --negative-prompt "" \
  --frames 17 --steps 20 --guidance 1 --seed 42 -o "$out/no_lora.mp4"

echo "== which effect each clip shows (the references, then what v2l generated)"
$bin/v2l-run measure "$ex/ref_${effects[0]}.mp4" "$out/${effects[0]}.mp4" \
  "$ex/ref_${effects[1]}.mp4" "$out/${effects[1]}.mp4" "$out/no_lora.mp4"

# Contact sheet: frames 0, 4, 8, 12, 16 (x2, nearest). Left: reference A over generated A;
# right: reference B over generated B; bottom: the same first frame without a LoRA.
row='select=not(mod(n\,4)),scale=128:128:flags=neighbor,pad=132:132:2:2:gray,tile=5x1'
ffmpeg -v error -y -i "$ex/ref_${effects[0]}.mp4" -i "$out/${effects[0]}.mp4" \
  -i "$ex/ref_${effects[1]}.mp4" -i "$out/${effects[1]}.mp4" -i "$out/no_lora.mp4" -filter_complex \
  "[0]$row[a];[1]$row[b];[2]$row[c];[3]$row[d];[4]$row[e];[a][b]vstack[l];[c][d]vstack[r];[l][r]hstack[top];[e]pad=1320:132:0:0:gray[bottom];[top][bottom]vstack" \
  -frames:v 1 "$out/.sheet.png"
mv "$out/.sheet.png" "$out/side_by_side.png"

echo "== the DiT vs diffusers on this model, without and with the ${effects[0]} reference's LoRA"
$bin/v2l-run --engine "$out/engine" stage dit --inputs "$fx/dit_io.safetensors" -o "$out/dit_out.safetensors" \
  --compare "$fx/dit_io.safetensors" --compare-name sample=output --max-error 1e-4
# The LoRA a reference predicts, as a standard file diffusers or ComfyUI can load; then the DiT
# with it fused.
$bin/v2l-lora predict --engine "$out/engine" --reference "$ex/ref_${effects[0]}.mp4" -o "$out/${effects[0]}_lora.safetensors"
$bin/v2l-run --engine "$out/engine" stage dit --inputs "$fx/dit_io.safetensors" -o "$out/dit_lora_out.safetensors" \
  --lora "$out/${effects[0]}_lora.safetensors" --compare "$fx/dit_io.safetensors" --compare-name sample=output_with_lilora --max-error 1e-4
echo "videos: $out/{${effects[0]},${effects[1]},no_lora}.mp4"
echo "contact sheet: $out/side_by_side.png (left: ${effects[0]}, right: ${effects[1]}; top row of each: the reference, below: generated; bottom: no LoRA)"
