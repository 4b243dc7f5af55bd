#!/usr/bin/env bash
# Prints the directory cargo builds into, as cargo itself resolves it (CARGO_TARGET_DIR,
# .cargo/config.toml's build.target-dir, or ./target): the scripts read binaries from there,
# never from a hard-coded ./target.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo metadata --format-version 1 --no-deps \
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])'
