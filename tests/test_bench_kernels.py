"""Smoke test of recipes/bench_kernels.py: tiny shapes on the CPU, in-process (a few seconds)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import importlib

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "recipes" / "bench_kernels.py"


def _load_script():
    return importlib.import_module("bench.kernels")


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("bench_kernels")
    bench = _load_script()
    argv = [
        "--quick", "--device", "cpu", "--hidden", "32", "--tokens", "64", "--reps", "2", "--warmup", "1",
        "--output_dir", str(out_dir),
    ]  # fmt: skip
    return out_dir, bench.main(argv)


def test_every_method_is_timed_or_marked(bench_run):
    out_dir, report = bench_run
    rows = report["result"]["rows"]
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}
    for row in rows:
        if row["method"] in ("triton", "cuda"):
            assert row["skipped"] == "needs GPU"
            continue
        assert row["skipped"] is None, row
        assert len(row["samples"]) == 2 and row["ms"] > 0 and row["gbps"] > 0, row
    assert all(r["vs_reference"] == 1.0 for r in rows if r["method"] == "torch")
    saved = json.loads((out_dir / "results.json").read_text())
    assert len(saved["result"]["rows"]) == len(rows)
    table = (out_dir / "tables.md").read_text()
    assert "| 32 | 64 | fp32 | fwd | gsoft Triton | needs GPU |" in table
    assert "PEFT BOFT butterfly" in table and "pending" in table and "CPU run" in table
    assert (out_dir / "bench_kernels_cpu.png").stat().st_size > 0


def test_boft_stand_in_is_undone(bench_run):
    from peft.tuners.boft import layer as boft_layer

    bench_adapters = sys.modules["bench_adapters"]
    assert boft_layer.get_fbd_cuda is bench_adapters._ORIGINAL_GET_FBD_CUDA
