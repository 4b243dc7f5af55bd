#!/usr/bin/env bash
# Installs what the tests need beyond the run-time set-up (scripts/setup.sh, run first), from
# public registries only:
#   - a wheelhouse (.v2l/wheels: onnxruntime, imageio-ffmpeg and their dependencies) and the
#     packaging tools (.v2l/build), so the Python wheel's tests build and install offline;
#   - a venv (.v2l/py) with the onnx checker, Ray Serve and Schemathesis, each used by one test;
#   - valgrind, a C compiler and GNU time, from Debian packages if missing.
# Also the GPU set-up (`scripts/setup.sh --gpu`), which one test checks.
# None of it is needed to run v2l. Safe to run again: it skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
# --gpu: the GPU libraries too, which tests/gpu_setup.rs checks as far as a machine without a
# GPU allows (1.8 GB from PyPI the first time).
bash scripts/setup.sh --gpu

ORT_VERSION="${V2L_ORT_VERSION:-1.31.1}"
wheels=".v2l/wheels"
IMAGEIO_FFMPEG_VERSION="${V2L_IMAGEIO_FFMPEG_VERSION:-0.6.0}"
if ! ls "$wheels"/imageio_ffmpeg-"$IMAGEIO_FFMPEG_VERSION"-*.whl >/dev/null 2>&1 \
   || [ ! -f "$wheels/.complete-$ORT_VERSION" ]; then
  echo "setup-tests: fetching onnxruntime==$ORT_VERSION and imageio-ffmpeg==$IMAGEIO_FFMPEG_VERSION with their dependencies from PyPI into $wheels"
  python3 -m pip download --quiet --only-binary=:all: -d "$wheels" \
    "onnxruntime==$ORT_VERSION" "imageio-ffmpeg==$IMAGEIO_FFMPEG_VERSION"
  touch "$wheels/.complete-$ORT_VERSION"
fi

# The packaging tools of scripts/build-wheel.sh (.v2l/build), so the wheel tests build offline.
bash scripts/build-wheel.sh --tools-only

# A venv (.v2l/py) for the Python tools some tests run; none of it is needed by the product.
# py_install NAME SPEC CHECK installs SPEC unless the Python code CHECK succeeds there already.
py_install() {
  local name="$1" spec="$2" check="$3"
  [ -x .v2l/py/bin/python ] || python3 -m venv .v2l/py
  if .v2l/py/bin/python -c "$check" 2>/dev/null; then
    echo "setup-tests: $name present in .v2l/py"
  else
    echo "setup-tests: installing $spec into .v2l/py"
    .v2l/py/bin/python -m pip install --quiet "$spec"
  fi
}
# The onnx checker, for the one test that validates every written graph with
# onnx.checker.check_model(full_check=True).
py_install onnx "onnx==${V2L_ONNX_VERSION:-1.23.2}" "import onnx"
# Ray Serve, for the one test of the Python package's Ray Serve deployment (the Python binding
# itself needs no third-party package).
py_install "ray[serve]" "ray[serve]==${V2L_RAY_VERSION:-2.60.0}" "import ray.serve"
# Schemathesis, the property-based API tester: the test suite runs it against a live v2l-serve
# (bin/tests/schemathesis.rs), with and without a token.
SCHEMATHESIS_VERSION="${V2L_SCHEMATHESIS_VERSION:-4.32.5}"
py_install schemathesis "schemathesis==$SCHEMATHESIS_VERSION" \
  "import schemathesis, sys; sys.exit(schemathesis.__version__ != '$SCHEMATHESIS_VERSION')"

# valgrind and a C compiler: the C ABI tests build examples/c and run it under valgrind.
# GNU time (/usr/bin/time): the server tests measure the decoder's peak RSS with it.
for tool in valgrind cc /usr/bin/time; do
  if ! command -v "$tool" >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "setup-tests: installing $tool from Debian packages"
      apt-get update -qq >/dev/null
      case "$tool" in cc) pkg=gcc ;; /usr/bin/time) pkg=time ;; *) pkg="$tool" ;; esac
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null
    else
      echo "setup-tests: $tool not found (needed by the C ABI tests)" >&2
    fi
  fi
done

