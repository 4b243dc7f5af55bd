#!/usr/bin/env bash
# Installs what v2l needs at run time, from the project's own files and public registries only:
#   - the ONNX Runtime shared library, unpacked from the `onnxruntime` wheel on PyPI into
#     .v2l/onnxruntime/ (ort is built with `load-dynamic`: nothing is downloaded at build time);
#   - ffmpeg, from Debian packages (video in and out).
# That is all `scripts/demo.sh` needs. What only the tests need (the Python wheel's wheelhouse
# and packaging tools, the onnx checker, Ray Serve, Schemathesis, valgrind, a C compiler) is
# `scripts/setup-tests.sh`, which runs this first.
#
# `--gpu` adds what an NVIDIA GPU needs, from PyPI only (about 1.8 GB of wheels, 2.2 GB
# unpacked), no `LD_LIBRARY_PATH` to set afterwards:
#   - .v2l/onnxruntime-gpu/: the `onnxruntime-gpu` wheel's libraries, the same version as the
#     CPU one (its CUDA and TensorRT providers beside it); v2l loads it on a machine with a GPU;
#   - .v2l/cuda/: the CUDA 13 runtime libraries its CUDA provider loads (cudart, cuBLAS and
#     cuBLASLt, cuRAND, cuFFT, NVRTC, cuDNN 9), from NVIDIA's wheels; v2l loads each by its full
#     path before the first GPU session (runtime/src/cuda_libs.rs). The driver (libcuda.so.1)
#     is the machine's. TensorRT is not among them: PyPI's tensorrt-cu13-libs fetches from
#     NVIDIA's own index at install time.
# Safe to run again: it skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

gpu=0
for arg in "$@"; do
  case "$arg" in
    --gpu) gpu=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup: unknown argument '$arg' (expected --gpu or --help)" >&2; exit 2 ;;
  esac
done

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

[ "$gpu" = 1 ] || exit 0

# The CUDA 13 wheels onnxruntime-gpu's CUDA provider was built against (its `cuda` and `cudnn`
# extras name the same packages; cuBLAS is not among them but its provider links it), pinned
# to CUDA 13.0-era releases, which a 13.0 driver (r580) runs.
CUDA_WHEELS=(
  "nvidia-cuda-runtime==${V2L_CUDART_VERSION:-13.0.96}"
  "nvidia-cublas==${V2L_CUBLAS_VERSION:-13.0.2.14}"
  "nvidia-curand==${V2L_CURAND_VERSION:-10.4.0.35}"
  "nvidia-cufft==${V2L_CUFFT_VERSION:-12.0.0.61}"
  "nvidia-cuda-nvrtc==${V2L_NVRTC_VERSION:-13.0.88}"
  "nvidia-cudnn-cu13==${V2L_CUDNN_VERSION:-9.28.1.4}"
)
# What is kept of them, one folder: the names runtime/src/cuda_libs.rs loads, and cuDNN's parts,
# which libcudnn.so.9 finds beside itself.
CUDA_LIBS="libcudart.so.13 libcublasLt.so.13 libcublas.so.13 libcurand.so.10 libcufft.so.12 libnvrtc-builtins.so.13.0 libnvrtc.so.13 libcudnn.so.9 libcudnn_graph.so.9 libcudnn_ops.so.9 libcudnn_cnn.so.9 libcudnn_adv.so.9 libcudnn_heuristic.so.9 libcudnn_ext.so.9 libcudnn_engines_precompiled.so.9 libcudnn_engines_runtime_compiled.so.9 libcudnn_engines_tensor_ir.so.9"
ORT_GPU_LIBS="libonnxruntime.so.$ORT_VERSION libonnxruntime_providers_shared.so libonnxruntime_providers_cuda.so libonnxruntime_providers_tensorrt.so"
gpu_ort=".v2l/onnxruntime-gpu"
cuda=".v2l/cuda"
stamp="$cuda/.complete-ort-$ORT_VERSION"

complete() {
  local f
  for f in $ORT_GPU_LIBS; do [ -f "$gpu_ort/$f" ] || return 1; done
  for f in $CUDA_LIBS; do [ -f "$cuda/$f" ] || return 1; done
  [ -f "$stamp" ]
}

if complete; then
  echo "setup: onnxruntime-gpu and the CUDA 13 libraries present in $gpu_ort and $cuda"
  exit 0
fi
command -v python3 >/dev/null || { echo "setup: python3 is needed to fetch the GPU wheels" >&2; exit 1; }
download=".v2l/gpu-wheels"
mkdir -p "$download"
echo "setup: fetching onnxruntime-gpu==$ORT_VERSION and ${CUDA_WHEELS[*]} from PyPI into $download"
python3 -m pip download --quiet --only-binary=:all: --no-deps -d "$download" \
  "onnxruntime-gpu==$ORT_VERSION" "${CUDA_WHEELS[@]}"
mkdir -p "$gpu_ort" "$cuda"
python3 - "$download" "$gpu_ort" "$cuda" "$ORT_VERSION" "$ORT_GPU_LIBS" "$CUDA_LIBS" <<'PY'
import glob, os, sys, zipfile
download, gpu_ort, cuda, version, ort_libs, cuda_libs = sys.argv[1:7]
want_ort, want_cuda = set(ort_libs.split()), set(cuda_libs.split())

def unpack(wheel, wanted, dest, prefix):
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            base = os.path.basename(name)
            if name.startswith(prefix) and base in wanted:
                part = os.path.join(dest, base + ".part")
                with z.open(name) as src, open(part, "wb") as out:
                    while chunk := src.read(1 << 24):
                        out.write(chunk)
                os.chmod(part, 0o755)
                os.replace(part, os.path.join(dest, base))
                wanted.discard(base)

ort = glob.glob(os.path.join(download, f"onnxruntime_gpu-{version}-*.whl"))
if not ort:
    sys.exit(f"setup: no onnxruntime_gpu-{version} wheel in {download}")
unpack(ort[0], want_ort, gpu_ort, "onnxruntime/capi/")
for wheel in sorted(glob.glob(os.path.join(download, "nvidia_*.whl"))):
    unpack(wheel, want_cuda, cuda, "nvidia/")
missing = sorted(want_ort | want_cuda)
if missing:
    sys.exit("setup: the GPU wheels lack " + ", ".join(missing))
PY
for f in $ORT_GPU_LIBS; do echo "setup: installed $gpu_ort/$f"; done
for f in $CUDA_LIBS; do echo "setup: installed $cuda/$f"; done
touch "$stamp"
# The wheels are 1.8 GB; what v2l needs is unpacked.
rm -rf "$download"
