#!/usr/bin/env bash
# Installs what v2l needs at run time, from the project's own files and public registries only:
#   - the ONNX Runtime shared library, unpacked from the `onnxruntime` wheel on PyPI into
#     .v2l/onnxruntime/ (ort is built with `load-dynamic`: nothing is downloaded at build time);
#   - ffmpeg, from Debian packages (video in and out).
# That is all `scripts/demo.sh` needs. What only the tests need (the Python wheel's wheelhouse
# and packaging tools, the onnx checker, Ray Serve, Schemathesis, valgrind, a C compiler) is
# `scripts/setup-tests.sh`, which runs this first.
# Safe to run again: it skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

ORT_VERSION="${V2L_ORT_VERSION:-1.31.1}"
dest=".v2l/onnxruntime"

# The onnxruntime wheel is kept in .v2l/wheels (the tests' wheelhouse adds what `pip install
# v2l` pulls beside it, offline: scripts/setup-tests.sh).
wheels=".v2l/wheels"
if ! ls "$wheels"/onnxruntime-"$ORT_VERSION"-*.whl >/dev/null 2>&1; then
  command -v python3 >/dev/null || { echo "setup: python3 is needed to fetch the onnxruntime wheel" >&2; exit 1; }
  echo "setup: fetching onnxruntime==$ORT_VERSION from PyPI into $wheels"
  mkdir -p "$wheels"
  python3 -m pip download --quiet --only-binary=:all: --no-deps -d "$wheels" "onnxruntime==$ORT_VERSION"
fi

if ls "$dest"/libonnxruntime.so* >/dev/null 2>&1; then
  echo "setup: ONNX Runtime present in $dest"
else
  mkdir -p "$dest"
  python3 - "$wheels" "$dest" "$ORT_VERSION" <<'PY'
import glob, os, sys, zipfile
wheels, dest, version = sys.argv[1], sys.argv[2], sys.argv[3]
wheel = glob.glob(os.path.join(wheels, f"onnxruntime-{version}-*.whl"))[0]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        base = os.path.basename(name)
        if name.startswith("onnxruntime/capi/") and base.startswith("libonnxruntime"):
            with z.open(name) as src, open(os.path.join(dest, base + ".part"), "wb") as out:
                out.write(src.read())
            os.replace(os.path.join(dest, base + ".part"), os.path.join(dest, base))
            print("setup: installed", os.path.join(dest, base))
PY
fi

if command -v ffmpeg >/dev/null; then
  echo "setup: ffmpeg present"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "setup: installing ffmpeg from Debian packages"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg >/dev/null
else
  echo "setup: ffmpeg not found; install it (Debian: sudo apt-get install ffmpeg)" >&2
  exit 1
fi
