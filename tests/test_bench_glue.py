"""The GLUE benchmark (``python recipes/benchmark.py glue``): every method of the GLUE recipe on a tiny smoke task, in
one process."""

from __future__ import annotations

import importlib
import json

from common.methods import METHODS


def test_bench_glue_runs_every_method_and_writes_table_and_plot(tmp_path):
    bench = importlib.import_module("bench.glue")
    options = ("{smoke_data: {n_train: 64, n_validation: 32}, base_pretrain_steps: 2, max_steps: 2, "
               "per_device_train_batch_size: 16, eval_steps: 2, logging_steps: 1}")
    rows = bench.main(["--recipe_options", options, "--output_dir", str(tmp_path)])["rows"]
    assert [r["method"] for r in rows] == list(METHODS)
    params = {r["method"]: r["trainable_params"] for r in rows}
    assert params["full"] > params["double_gsoft"] > params["gsoft"] > 0
    table = (tmp_path / "glue.md").read_text()
    for label in ("GSOFT b=8 m=2", "Double GSOFT b=8 m=2", "LoRA r=8", "OFT b=16", "BOFT b=8 m=2", "full fine-tuning"):
        assert f"| {label} |" in table
    assert "stand-in" in table  # the BOFT-on-CPU note
    assert (tmp_path / "glue.png").stat().st_size > 0
    assert len(json.loads((tmp_path / "glue.json").read_text())["rows"]) == len(METHODS)
    assert (tmp_path / "full" / "model" / "config.json").is_file()  # full fine-tuning saves the whole model
    assert (tmp_path / "boft" / "adapter" / "adapter_config.json").is_file()
