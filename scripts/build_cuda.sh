#!/usr/bin/env bash
# Build the CUDA wheel of innerpissa (`maturin build -F cuda`) on a machine with no GPU and no system CUDA.
#
# The CUDA compiler comes from PyPI (nvidia-cuda-nvcc and the packages it needs), pinned to the toolkit the GPU
# machine runs (default 13.0: the lent H200s have driver 580 = CUDA 13.0 and torch 2.11+cu130, whose nvidia-*
# packages hold libcublas.so.13, libnvrtc.so.13, libcurand.so.10 and libcudart.so.13). No GPU is needed here:
#   - the compute capability is named (CUDA_COMPUTE_CAP, default 90 = H100/H200) instead of detected;
#   - candle links the CUDA libraries dynamically (cudarc's `dynamic-linking`). The link needs files with the
#     right sonames, not the code: libcudart and libcurand are the real ones from PyPI; libcuda (the driver),
#     libcublas, libcublasLt and libnvrtc are empty stubs built here and kept as dependencies
#     (--no-as-needed), so the extension resolves their symbols from the real libraries at import on the GPU
#     machine (scripts/gpu_check.sh puts torch's nvidia/*/lib folders on LD_LIBRARY_PATH).
# The wheel is abi3 (Python ≥ 3.10; -F on the command line replaces pyproject's features, so they are named again),
# so it installs on the GPU machine's Python 3.12. It is not built in CI.
#
#   bash scripts/build_cuda.sh [OUT_DIR]        (default dist-cuda/; log in OUT_DIR/build.log)
#   CUDA_VERSION=13.0 CUDA_COMPUTE_CAP=90 PYTHON=.venv/bin/python  (environment, with their defaults)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="$(realpath -m "${1:-dist-cuda}")"
PY="${PYTHON:-$PWD/.venv/bin/python}"
CUDA_VERSION="${CUDA_VERSION:-13.0}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
[ -x "$PY" ] || { echo "build_cuda: no $PY; run: bash scripts/setup.sh --dev (or set PYTHON=)" >&2; exit 1; }
case "$CUDA_VERSION" in
  # one line per toolkit: nvcc nvvm crt runtime cccl curand (versions of the PyPI packages of that release)
  13.0) PKGS=(nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
              nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-curand==10.4.5.25) ;;
  *) echo "build_cuda: CUDA_VERSION=$CUDA_VERSION has no package pins here; add a line to this script's case" >&2
     exit 1 ;;
esac
PREFIX="$HOME/.cache/innerpissa/cuda-$CUDA_VERSION"
TK="$PREFIX/nvidia/cu${CUDA_VERSION%%.*}"
if [ ! -x "$TK/bin/nvcc" ] || [ ! -d "$TK/nvvm" ]; then
  echo "build_cuda: installing the CUDA $CUDA_VERSION compiler from PyPI into $PREFIX"
  rm -rf "$PREFIX"
  "$PY" -m pip install -q --no-deps --target "$PREFIX" "${PKGS[@]}"
fi
"$TK/bin/nvcc" --version | tail -1

# link-time stand-ins: real libcudart/libcurand, empty stubs with the right sonames for the rest
STUBS="$PREFIX/link"
mkdir -p "$STUBS"
ln -sf "$TK/lib/libcudart.so.13" "$STUBS/libcudart.so"
ln -sf "$TK/lib/libcurand.so.10" "$STUBS/libcurand.so"
for spec in cuda:1 cublas:13 cublasLt:13 nvrtc:13; do
  name="${spec%%:*}" major="${spec##*:}"
  [ -f "$STUBS/lib$name.so" ] || echo "" | gcc -shared -x c - -Wl,-soname,"lib$name.so.$major" -o "$STUBS/lib$name.so"
done

export PATH="$TK/bin:$PATH" CUDA_HOME="$TK" CUDA_PATH="$TK"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/innerpissa/target-cuda}"  # keeps the CPU build's cache
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-$(nproc)}"
# link flags for the extension only (maturin passes args after `--` to `cargo rustc` for the final crate): in
# RUSTFLAGS they would also link build scripts against the stubs, which then cannot start here (no libcuda.so.1)
# --auditwheel skip: the CUDA libraries must not be copied into the wheel (the GPU machine's driver and torch's
# nvidia packages supply them at import), and the stubs would make maturin's repair fail.
LINK=(-L "native=$STUBS" -C link-arg=-Wl,--no-as-needed)
for lib in cuda cublas cublasLt nvrtc curand cudart; do LINK+=(-C "link-arg=-l$lib"); done
mkdir -p "$OUT"
start=$(date +%s)
echo "build_cuda: maturin build --release -F cuda (sm_$CUDA_COMPUTE_CAP, CUDA $CUDA_VERSION); log $OUT/build.log"
if ! "$PY" -m maturin build --release -F cuda,pyo3/abi3-py310,pyo3/extension-module --auditwheel skip --out "$OUT" -- "${LINK[@]}" >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log" >&2
  echo "build_cuda: failed after $(( $(date +%s) - start )) s; full log in $OUT/build.log" >&2
  exit 1
fi
secs=$(( $(date +%s) - start ))
WHEEL="$(ls -t "$OUT"/innerpissa-*.whl | head -1)"
SO="$(mktemp -d)"
(cd "$SO" && "$PY" -m zipfile -e "$WHEEL" . && find . -name '_rust*.so' -exec readelf -d {} \; | grep NEEDED) || true
rm -rf "$SO"
echo "build_cuda: built $(basename "$WHEEL") ($(du -h "$WHEEL" | cut -f1)) in $secs s on $(nproc) cores"
