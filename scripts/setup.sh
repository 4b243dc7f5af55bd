#!/usr/bin/env bash
# Installs what v2l needs at run time, from the project's own files and public registries only:
#   - the ONNX Runtime shared library, unpacked from the `onnxruntime` wheel on PyPI into
#     .v2l/onnxruntime/ (ort is built with `load-dynamic`: nothing is downloaded at build time);
#   - a wheelhouse (.v2l/wheels) and packaging tools (.v2l/build) for the Python wheel's tests;
#   - ffmpeg, from Debian packages (video in and out);
#   - valgrind and a C compiler for the C ABI tests, from Debian packages if missing.
# Safe to run again: it skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

ORT_VERSION="${V2L_ORT_VERSION:-1.31.1}"
dest=".v2l/onnxruntime"

# The onnxruntime wheel (and, for the Python wheel's install test, everything `pip install v2l`
# pulls: imageio-ffmpeg and onnxruntime's own dependencies) is kept in .v2l/wheels, so tests
# install offline (`pip install --no-index --find-links .v2l/wheels`).
wheels=".v2l/wheels"
IMAGEIO_FFMPEG_VERSION="${V2L_IMAGEIO_FFMPEG_VERSION:-0.6.0}"
if ! ls "$wheels"/onnxruntime-"$ORT_VERSION"-*.whl >/dev/null 2>&1 \
   || ! ls "$wheels"/imageio_ffmpeg-"$IMAGEIO_FFMPEG_VERSION"-*.whl >/dev/null 2>&1; then
  command -v python3 >/dev/null || { echo "setup: python3 is needed to fetch the onnxruntime wheel" >&2; exit 1; }
  echo "setup: fetching onnxruntime==$ORT_VERSION and imageio-ffmpeg==$IMAGEIO_FFMPEG_VERSION (with dependencies) from PyPI into $wheels"
  mkdir -p "$wheels"
  python3 -m pip download --quiet --only-binary=:all: -d "$wheels" \
    "onnxruntime==$ORT_VERSION" "imageio-ffmpeg==$IMAGEIO_FFMPEG_VERSION"
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

# The packaging tools of scripts/build-wheel.sh (.v2l/build), so the wheel tests build offline.
bash scripts/build-wheel.sh --tools-only

# The onnx checker, for the one test that validates every written graph with
# onnx.checker.check_model(full_check=True). The product itself needs no Python.
ONNX_VERSION="${V2L_ONNX_VERSION:-1.23.2}"
if [ -x .v2l/py/bin/python ] && .v2l/py/bin/python -c "import onnx" 2>/dev/null; then
  echo "setup: onnx checker present in .v2l/py"
else
  echo "setup: installing onnx==$ONNX_VERSION into .v2l/py (test-only)"
  python3 -m venv .v2l/py
  .v2l/py/bin/python -m pip install --quiet "onnx==$ONNX_VERSION"
fi

# Ray Serve, for the one test of the Python package's Ray Serve deployment (test-only: the
# product and its Python binding need no third-party package).
RAY_VERSION="${V2L_RAY_VERSION:-2.60.0}"
if .v2l/py/bin/python -c "import ray.serve" 2>/dev/null; then
  echo "setup: ray[serve] present in .v2l/py"
else
  echo "setup: installing ray[serve]==$RAY_VERSION into .v2l/py (test-only)"
  .v2l/py/bin/python -m pip install --quiet "ray[serve]==$RAY_VERSION"
fi

# Schemathesis, the property-based API tester: the test suite runs it against a live v2l-serve
# (bin/tests/schemathesis.rs), with and without a token (test-only).
SCHEMATHESIS_VERSION="${V2L_SCHEMATHESIS_VERSION:-4.32.5}"
if .v2l/py/bin/python -c "import schemathesis, sys; sys.exit(schemathesis.__version__ != '$SCHEMATHESIS_VERSION')" 2>/dev/null; then
  echo "setup: schemathesis present in .v2l/py"
else
  echo "setup: installing schemathesis==$SCHEMATHESIS_VERSION into .v2l/py (test-only)"
  .v2l/py/bin/python -m pip install --quiet "schemathesis==$SCHEMATHESIS_VERSION"
fi

# valgrind and a C compiler: the C ABI tests build examples/c and run it under valgrind.
# GNU time (/usr/bin/time): the server tests measure the decoder's peak RSS with it.
for tool in valgrind cc /usr/bin/time; do
  if ! command -v "$tool" >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "setup: installing $tool from Debian packages"
      apt-get update -qq >/dev/null
      case "$tool" in cc) pkg=gcc ;; /usr/bin/time) pkg=time ;; *) pkg="$tool" ;; esac
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null
    else
      echo "setup: $tool not found (needed by the C ABI tests)" >&2
    fi
  fi
done

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
