#!/usr/bin/env bash
# The GPU check in two halves (benches/gpu_check.py says what it measures):
#
#   bash scripts/gpu_check.sh prepare      here (Rust toolchain, network): the CUDA wheel (scripts/build_cuda.sh)
#                                          and the check folder (tiny GGUF, adapter, tokenizer) in dist-cuda/
#   bash scripts/gpu_check.sh run          on the GPU machine (PyTorch, transformers, peft there; no Rust, no
#                                          network): installs the wheel into /tmp/site and runs the check;
#                                          OUT=folder for gpu_check.md/json (default gpu-check/). < 10 min on an H200.
#
# With the `device` tool: carry dist-cuda (the wheel and the check folder, a few MiB) and run
#   bash scripts/gpu_check.sh run
# then paste OUT/gpu_check.md into docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  prepare)
    bash scripts/build_cuda.sh dist-cuda
    "${PYTHON:-.venv/bin/python}" benches/gpu_check.py --prepare dist-cuda/check
    du -sh dist-cuda
    ;;
  run)
    PY="${PYTHON:-python3}"
    WHEEL="$(ls -t dist-cuda/innerpissa-*.whl 2>/dev/null | head -1)"
    [ -n "$WHEEL" ] || { echo "gpu_check: no dist-cuda/innerpissa-*.whl; run 'bash scripts/gpu_check.sh prepare' first" >&2; exit 1; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHEEL"
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    # the CUDA libraries the extension links (libcublas, libnvrtc, libcurand, libcudart) come with torch's nvidia-*
    # packages; the driver's libcuda from the system
    LIBS="$("$PY" - <<'EOF'
import glob, os, site
dirs = set()
for root in site.getsitepackages():
    for f in glob.glob(os.path.join(root, "nvidia", "**", "lib*.so*"), recursive=True):
        dirs.add(os.path.dirname(f))
print(":".join(sorted(dirs)))
EOF
)"
    export LD_LIBRARY_PATH="$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    "$PY" benches/gpu_check.py --device cuda --check-dir dist-cuda/check --out "${OUT:-gpu-check}" "${@:2}"
    ;;
  *)
    echo "usage: bash scripts/gpu_check.sh prepare|run [gpu_check.py options]" >&2
    exit 2
    ;;
esac
