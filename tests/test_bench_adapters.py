"""Smoke test of recipes/bench_adapters.py: a tiny model in --quick mode, in-process (a few seconds)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from gsoft import gs
from conftest import load_recipe

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "recipes" / "bench_adapters.py"
CONFIG = REPO_ROOT / "configs" / "bench" / "adapters.yaml"

# hidden 32, 2 layers: every adapted layer is 32 -> 32 (query, key, value, attention.output.dense),
# 32 -> 64 (intermediate.dense) or 64 -> 32 (output.dense)
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 100}
LAYER_SHAPES = [(32, 32)] * 4 + [(32, 64), (64, 32)]  # (in, out) per encoder layer


def _load_script():
    return load_recipe("bench_adapters")


def _gsoft_expected(args: dict, layers: int) -> int:
    b, m, double = args["block_size"], args.get("n_factors", 2), args.get("double", False)
    per_layer = 0
    for n_in, n_out in LAYER_SHAPES:
        per_layer += gs.gs_param_count(n_in, b, m) + n_out  # rotation of the input + magnitude vector
        if double:
            per_layer += gs.gs_param_count(n_out, b, m)
    return layers * per_layer


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    config = yaml.safe_load(CONFIG.read_text())
    config["models"] = {"tiny": TINY}
    config["run_models"] = ["tiny"]
    (tmp / "adapters.yaml").write_text(yaml.safe_dump(config))
    out_dir = tmp / "out"
    bench = _load_script()
    argv = [
        "--config", str(tmp / "adapters.yaml"), "--quick", "--models", "tiny", "--layers", "2",
        "--batch_size", "2", "--seq_len", "16", "--rounds", "2", "--steps_per_round", "1", "--warmup", "1",
        "--infer_rounds", "1", "--devices", "cpu", "--output_dir", str(out_dir),
    ]
    report = bench.main(argv)
    return config, out_dir, report


def test_outputs_exist_and_list_every_method(bench_run):
    config, out_dir, report = bench_run
    enabled = [m for m in config["methods"] if m.get("enabled", True)]
    data = json.loads((out_dir / "results.json").read_text())
    result = data["devices"]["cpu"]["models"]["tiny"]
    assert result["layers_built"] == 2 and result["seq_len"] == 16
    rows = {row["key"]: row for row in result["rows"]}
    assert list(rows) == [m["key"] for m in enabled]
    for key, row in rows.items():
        assert row["error"] is None, (key, row["error"])
        assert row["step_s"]["n"] == 2 and row["step_s"]["median"] > 0, key
        assert row["infer_unmerged_s"]["n"] == 1 and row["infer_merged_s"]["n"] == 1, key
        assert row["peak_train_mem_bytes"] > 0, key
        assert row["merge_max_abs_err"] < 1e-3 * max(1.0, row["logit_max_abs"]), key
    assert rows["base"]["params"]["adapter"] == 0
    assert rows["boft"]["boft_butterfly_factors_used"] == [2]  # the pure-torch fbd stand-in keeps m=2 on a CPU
    assert rows["gsoft"]["relative"]["step_vs_oft"] > 0 and rows["lora"]["relative"]["step_vs_lora"] == 1.0

    table = (out_dir / "tables.md").read_text()
    for method in enabled:
        assert method["name"] in table
    assert "Targets for `gsoft`" in table
    assert (out_dir / "bench_adapters_cpu.png").stat().st_size > 0


def test_gsoft_params_match_gs_param_count(bench_run):
    config, _, report = bench_run
    rows = {row["key"]: row for row in report["devices"]["cpu"]["models"]["tiny"]["rows"]}
    methods = {m["key"]: m for m in config["methods"]}
    for key in ("gsoft", "double_gsoft"):
        expected = _gsoft_expected(methods[key]["args"], layers=2)
        assert rows[key]["params"]["adapter"] == expected, key
        assert rows[key]["expected_adapter_params"] == expected and rows[key]["param_formula_ok"], key
    # b=8, m=2 on n=32: 2 factors x 4 blocks x 28 = 224 per 32-wide input; the 64-wide input has 448
    assert gs.gs_param_count(32, 8, 2) == 224 and gs.gs_param_count(64, 8, 2) == 448


def test_boft_fbd_patch_is_undone(bench_run):
    from peft.tuners.boft import layer as boft_layer

    bench = sys.modules["bench_adapters"]
    assert boft_layer.get_fbd_cuda is bench._ORIGINAL_GET_FBD_CUDA
