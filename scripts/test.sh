#!/usr/bin/env bash
# The test command: set-up (ONNX Runtime library, ffmpeg), the runtime's layering
# (scripts/check-layers.sh), then every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/check-layers.sh
cargo test --workspace "$@"
