"""Smoke test of the kernel benchmark (``python recipes/benchmark.py kernels``): tiny shapes on the CPU, in-process
(a few seconds)."""

from __future__ import annotations

import json

import pytest
import yaml

from bench import kernels


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("bench_kernels")
    from peft.tuners.boft import layer as boft_layer

    peft_fbd = boft_layer.get_fbd_cuda  # PEFT's own loader: the BOFT row installs a stand-in and must put this back
    argv = [
        "--quick", "--device", "cpu", "--hidden", "32", "--tokens", "64", "--reps", "2", "--warmup", "1",
        "--output_dir", str(out_dir),
    ]  # fmt: skip
    return out_dir, kernels.main(argv), peft_fbd


def test_every_method_is_timed_or_marked(bench_run):
    out_dir, report, _ = bench_run
    rows = report["result"]["rows"]
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}
    for row in rows:
        if row["method"] in ("triton", "cuda"):
            assert row["skipped"] == "needs GPU"
            continue
        assert row["skipped"] is None, row
        assert len(row["samples"]) == 2 and row["ms"] > 0 and row["gbps"] > 0, row
    assert all(r["relative"]["ms_vs_torch"] == 1.0 for r in rows if r["method"] == "torch")
    saved = json.loads((out_dir / "kernels.json").read_text())
    assert len(saved["result"]["rows"]) == len(rows)
    table = (out_dir / "kernels.md").read_text()
    assert "| 32 | 64 | fp32 | fwd | gsoft Triton | needs GPU |" in table
    assert "PEFT BOFT butterfly" in table and "pending" in table and "CPU run" in table
    assert (out_dir / "kernels.png").stat().st_size > 0


def test_boft_stand_in_is_undone(bench_run):
    from peft.tuners.boft import layer as boft_layer

    *_, peft_fbd = bench_run
    assert boft_layer.get_fbd_cuda is peft_fbd and peft_fbd.__module__ == "peft.tuners.boft.layer"


def test_option_layers_config_device_quick_command_line(tmp_path):
    """The config < device_overrides[cpu] < quick_overrides (with --quick) < the command line; the command line is
    kept for the report, and a layer that sets an unknown option is an error naming it."""
    config = tmp_path / "kernels.yaml"
    config.write_text(yaml.safe_dump({"device": "cpu", "reps": 20, "warmup": 3, "hidden": [64],
                                      "device_overrides": {"cpu": {"reps": 5, "warmup": 2}},
                                      "quick_overrides": {"reps": 3, "hidden": [32, 48]}}))
    plain = kernels.parse(["--config", str(config)])
    assert (plain.reps, plain.warmup, plain.hidden) == (5, 2, [64])
    quick = kernels.parse(["--config", str(config), "--quick"])
    assert (quick.reps, quick.warmup, quick.hidden) == (3, 2, [32, 48])
    argv = ["--config", str(config), "--quick", "--reps", "7", "--warmup", "1"]
    flags = kernels.parse(argv)
    assert (flags.reps, flags.warmup, flags.hidden, flags.argv) == (7, 1, [32, 48], argv)
    config.write_text(yaml.safe_dump({"device": "cpu", "quick_overrides": {"repz": 3}}))
    with pytest.raises(SystemExit, match="quick_overrides .* sets 'repz'.*did you mean reps"):
        kernels.parse(["--config", str(config), "--quick"])
    with pytest.raises(SystemExit, match="--methods: expected one of"):
        kernels.parse(["--config", str(config), "--methods", "torch,fast"])
