#!/usr/bin/env bash
# The wheel as a user gets it: build it with maturin, install it into a fresh virtual environment, then run
# `ipissa --help`, a 2-step `ipissa train` and an `ipissa eval` of a tiny random Llama from that install.
#
# The fresh environment installs the wheel with --no-deps and borrows the dependencies of the development
# environment (.venv, made by scripts/setup.sh) through a path file, so the check needs no download; the
# wheel's declared requirements are then checked against what is installed. The development checkout's own (editable)
# innerpissa is not visible: the package, its data files and the native extension all come from the wheel.
#   DATA=path: evaluation data (default ../shared/data)   KEEP=1: keep the temporary folder
set -euo pipefail
cd "$(dirname "$0")/.."
DEV_PY="$PWD/.venv/bin/python"
DATA="$(realpath "${DATA:-../shared/data}")"
[ -x "$DEV_PY" ] || { echo "wheel_smoke: no .venv; run: bash scripts/setup.sh --dev" >&2; exit 1; }
[ -d "$DATA" ] || { echo "wheel_smoke: evaluation data not found at $DATA; set DATA=path" >&2; exit 1; }
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/innerpissa/target}"
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
TMP="$(mktemp -d)"
[ "${KEEP:-}" = 1 ] || trap 'rm -rf "$TMP"' EXIT
start=$(date +%s)

"$DEV_PY" -m maturin build --release --quiet --out "$TMP/dist"
WHEEL="$(ls "$TMP"/dist/innerpissa-*.whl)"
echo "wheel_smoke: built $(basename "$WHEEL") ($(du -h "$WHEEL" | cut -f1)) in $(( $(date +%s) - start )) s"

BASE_PY="$("$DEV_PY" -c 'import sys; print(sys._base_executable)')"
"$BASE_PY" -m venv "$TMP/venv"
PY="$TMP/venv/bin/python"
DEPS="$("$DEV_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$DEPS" > "$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_dev_dependencies.pth"
"$PY" -m pip install -q --no-deps "$WHEEL"
"$PY" - <<'EOF'
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

import innerpissa, innerpissa._rust, innerpissa.pairs

# the wheel's declared requirements are met (pip check would also judge the --no-deps model packages of .venv)
for line in metadata.requires("innerpissa") or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    have = metadata.version(req.name)
    assert req.specifier.contains(have, prereleases=True), f"wheel requires {req}, environment has {have}"
where = Path(innerpissa.__file__).parent
assert "site-packages" in str(where) and "/python/innerpissa" not in str(where), f"not the wheel: {where}"
assert innerpissa.pairs.SUFFIXES and innerpissa._rust.Branch.base() == innerpissa._rust.Branch.base()
print("wheel_smoke: innerpissa", innerpissa.__version__, "imported from", where)
EOF

IPISSA="$TMP/venv/bin/ipissa"
"$IPISSA" --help >/dev/null
# A tiny random Llama with a word-level tokenizer and a chat template (the tests' own builders), saved as a model
# directory.
"$PY" - "$TMP/tiny" "$PWD/tests" <<'EOF'
import sys

sys.path.insert(0, sys.argv[2])
from conftest import tiny_llama, word_tokenizer

from innerpissa.pairs import HONESTY_PERSONAS, NEUTRAL_INSTRUCTION, SUFFIXES, persona_instruction

texts = [*SUFFIXES, NEUTRAL_INSTRUCTION] + [persona_instruction(s, p) for p in HONESTY_PERSONAS for s in (True, False)]
tok = word_tokenizer(texts)
tiny_llama(vocab_size=len(tok)).save_pretrained(sys.argv[1])
tok.save_pretrained(sys.argv[1])
EOF
"$IPISSA" train --model "$TMP/tiny" --steps 2 --n-pairs 40 --out "$TMP/run" --threads 2 >/dev/null
"$IPISSA" eval --adapter "$TMP/run/adapter" --model "$TMP/tiny" --engine torch --data-dir "$DATA" \
  --methods innerpissa,mean-diff --n-target 8 --n-other 2 --n-dd 4 --out "$TMP/eval" --threads 2 >/dev/null
for f in "$TMP/run/adapter/adapter_model.safetensors" "$TMP/eval/report.md" "$TMP/eval/results.json"; do
  [ -s "$f" ] || { echo "wheel_smoke: $f missing after train/eval" >&2; exit 1; }
done
echo "wheel_smoke: passed in $(( $(date +%s) - start )) s (build, install, --help, train, eval)"
