#!/usr/bin/env bash
# The layering the runtime promises: it loads engines and serves requests, so it links neither
# the compile layer, nor calibration, nor the exporter, nor the server's async stack. Run by
# scripts/test.sh (and so by CI); fails naming the crate that leaked in.
set -euo pipefail
cd "$(dirname "$0")/.."
deps=$(cargo tree -p v2l-runtime --edges normal --prefix none --format '{p}' | awk '{print $1}' | sort -u)
bad=0
for forbidden in v2l-compile v2l-calibration v2l-export v2l-serve axum tokio hyper; do
  if grep -qx "$forbidden" <<<"$deps"; then
    echo "check-layers: v2l-runtime depends on $forbidden (see: cargo tree -p v2l-runtime -i $forbidden)" >&2
    bad=1
  fi
done
[ "$bad" = 0 ] && echo "check-layers: v2l-runtime links $(wc -l <<<"$deps") crates, none of the compile layer, calibration, exporter or server"
[ "$bad" = 0 ] || exit 1
# Inside the crates along the data flow, modules import each other one way only.
# Every crate depends only on the layers below it (scripts/crate-layers.py holds the table).
python3 scripts/crate-layers.py
crates="contracts graphs calibration export kernels sampling runtime compile tools serve capi bin bench"
python3 scripts/module-cycles.py $(for c in $crates; do echo "$c/src"; done)
echo "check-layers: no module import cycles in $crates"
# Prompt text and video files are features: the runtime must build without them (and without
# `tokenizers`).
if cargo tree -p v2l-runtime --no-default-features --edges normal --prefix none --format '{p}' | grep -q '^tokenizers '; then
  echo "check-layers: v2l-runtime without default features still links tokenizers" >&2
  exit 1
fi
cargo check --quiet -p v2l-runtime --no-default-features
echo "check-layers: v2l-runtime builds without its text and video features ($(cargo tree -p v2l-runtime --no-default-features --edges normal --prefix none --format '{p}' | awk '{print $1}' | sort -u | wc -l) crates)"
# Model knowledge lives in contracts: no diffusers class name is spelled anywhere else.
python3 scripts/check-class-names.py
