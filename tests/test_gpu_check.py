"""The GPU check script (benches/gpu_check.py) run end to end on the CPU with tiny shapes, so that the script a GPU
session runs has run before: prepare the check folder, then the torch parity, Rust parity and timing parts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(tmp_path):
    script = ROOT / "benches" / "gpu_check.py"
    check, out = tmp_path / "check", tmp_path / "out"
    subprocess.run([sys.executable, str(script), "--prepare", str(check)], check=True)
    assert {"tiny.gguf", "adapter", "tokenizer"} <= {p.name for p in check.iterdir()}
    args = ["--device", "cpu", "--check-dir", str(check), "--out", str(out), "--quick", "--steps", "3"]
    subprocess.run([sys.executable, str(script), *args], check=True)
    res = json.loads((out / "gpu_check.json").read_text())
    rows = res["torch_parity"]
    assert {(r["arch"], r["dtype"]) for r in rows} == {
        (a, d) for a in ("llama", "gemma3") for d in ("float32", "bfloat16")
    }
    for r in rows:
        assert r["c0_identical"] and r["unmerge_exact"]
        if r["dtype"] == "float32":  # the same computation on the same device: equal up to float rounding
            assert r["base_vs_cpu_fp32"] == 0.0
            assert r["c+1_vs_cpu_fp32"] < 1e-4 and r["merge+1_vs_hook"] < 1e-3
        else:  # bf16 rounds: non-zero, and bounded
            assert 0.0 < r["base_vs_cpu_fp32"] < 1.0
    rust = res["rust_parity"]
    assert rust["max_abs_diff_nats"] == 0.0 and rust["c1_moves_nats"] > 0.01
    t = res["timing"]
    assert t["shape"] == "tiny-llama" and t["step_s"] > 0 and t["sweep_point_s"] > 0
    assert "| tiny-llama |" in (out / "gpu_check.md").read_text()
