"""Smoke test of the adapter benchmark (``python recipes/benchmark.py adapters``): a tiny model in --quick mode,
in-process (a few seconds): every table, column and adapters.json field exists, including the cost proxies (ops per
step, memory proxy) and autocast."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bench import adapters, measure
from gsoft import gs

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG = REPO_ROOT / "configs" / "bench" / "adapters.yaml"

# hidden 32, 2 layers: every adapted layer is 32 -> 32 (query, key, value, attention.output.dense),
# 32 -> 64 (intermediate.dense) or 64 -> 32 (output.dense)
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 100}
LAYER_SHAPES = [(32, 32)] * 4 + [(32, 64), (64, 32)]  # (in, out) per encoder layer


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
    config["model_configs"] = {"tiny": TINY}
    config["models"] = ["tiny"]
    (tmp / "adapters.yaml").write_text(yaml.safe_dump(config))
    out_dir = tmp / "out"
    from peft.tuners.boft import layer as boft_layer

    peft_fbd = boft_layer.get_fbd_cuda  # PEFT's own loader: the run installs a stand-in and must put this back
    argv = [
        "--config", str(tmp / "adapters.yaml"), "--quick", "--models", "tiny", "--layers", "2",
        "--batch_size", "2", "--seq_len", "16", "--rounds", "2", "--steps_per_round", "1", "--warmup", "1",
        "--infer_rounds", "1", "--devices", "cpu", "--output_dir", str(out_dir),
    ]
    report = adapters.main(argv)
    return config, out_dir, report, peft_fbd


def test_outputs_exist_and_list_every_method(bench_run):
    config, out_dir, report, _ = bench_run
    enabled = [m for m in config["method_specs"] if m.get("enabled", True)]
    data = json.loads((out_dir / "adapters.json").read_text())
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

    table = (out_dir / "adapters.md").read_text()
    for method in enabled:
        assert method["name"] in table
    assert "Targets for `gsoft`" in table
    assert (out_dir / "adapters.png").stat().st_size > 0


def test_cost_proxies_in_results_and_tables(bench_run):
    config, out_dir, _, _ = bench_run
    result = json.loads((out_dir / "adapters.json").read_text())["devices"]["cpu"]["models"]["tiny"]
    assert result["autocast"] == "none" and result["costs_device"] == "cpu"
    assert result["adapted_layers"] == 2 * len(LAYER_SHAPES)
    rows = {row["key"]: row for row in result["rows"]}
    for key, row in rows.items():
        assert row["ops_per_step"] > 0 and row["saved_bytes"] > 0, key
        assert row["mem_proxy_bytes"] == row["saved_bytes"] + row["trainable_state_bytes"], key
        assert row["adapter_ops_per_step"] == row["ops_per_step"] - rows["base"]["ops_per_step"], key
        assert row["relative"]["ops_vs_lora"] is not None and row["relative"]["mem_proxy_vs_lora"] > 0, key
        if key != "base":
            assert row["adapter_ops_per_step"] > 0, key
    assert rows["base"]["adapter_ops_per_step"] == 0
    assert rows["lora"]["relative"]["ops_vs_lora"] == 1.0 and rows["lora"]["relative"]["mem_proxy_vs_lora"] == 1.0
    # the trainable state is 3 x the trainable parameters (fp32: 4 bytes each)
    assert rows["lora"]["trainable_state_bytes"] == 3 * 4 * rows["lora"]["params"]["trainable"]

    checked = {(t["method"], t["metric"]): t for t in result["targets"]}
    for method in config["method_specs"]:
        for metric, limit in (method.get("targets") or {}).items():
            if method["key"] in rows:
                assert checked[method["key"], metric]["limit"] == limit
    assert {("gsoft", "ops_vs_lora"), ("gsoft", "mem_proxy_vs_lora"), ("double_gsoft", "ops_vs_lora")} <= set(checked)
    for t in checked.values():
        assert t["ok"] is (t["value"] <= t["limit"])

    table = (out_dir / "adapters.md").read_text()
    assert "### tiny — cpu" in table and "— fp32" in table
    for column in ("ops/step", "adapter ops/step", "per adapted layer", "ops ×lora", "saved MiB", "mem proxy ×lora"):
        assert f" {column} |" in table, column
    lines = table.splitlines()
    double = next(line for line in lines if line.startswith("Targets for `double_gsoft`:") and "ops_" in line)
    assert "ops_vs_lora = " in double and "mem_proxy_vs_lora = " in double and "Targets held:" in table


def test_autocast_bf16_is_recorded(tmp_path):
    """A bf16 run: every forward under autocast, the precision in adapters.json and the table title."""
    config = yaml.safe_load(CONFIG.read_text())
    config["model_configs"] = {"tiny": TINY}
    (tmp_path / "adapters.yaml").write_text(yaml.safe_dump(config))
    argv = [
        "--config", str(tmp_path / "adapters.yaml"), "--quick", "--models", "tiny", "--methods", "base,gsoft,lora",
        "--autocast", "bf16", "--rounds", "1", "--infer_rounds", "1", "--memory", "false", "--plot", "false",
        "--devices", "cpu", "--output_dir", str(tmp_path / "out"),
    ]
    report = adapters.main(argv)
    result = report["devices"]["cpu"]["models"]["tiny"]
    assert report["options"]["autocast"] == "bf16" and result["autocast"] == "bf16"
    assert all(row["error"] is None for row in result["rows"]), [row["error"] for row in result["rows"]]
    assert "— autocast bf16" in (tmp_path / "out" / "adapters.md").read_text()
    with pytest.raises(ValueError, match="Unknown autocast 'int8'.*bf16"):
        adapters.autocast_dtype("int8")


def test_gsoft_params_match_gs_param_count(bench_run):
    config, _, report, _ = bench_run
    rows = {row["key"]: row for row in report["devices"]["cpu"]["models"]["tiny"]["rows"]}
    methods = {m["key"]: m for m in config["method_specs"]}
    for key in ("gsoft", "double_gsoft"):
        expected = _gsoft_expected(methods[key]["args"], layers=2)
        assert rows[key]["params"]["adapter"] == expected, key
        assert rows[key]["expected_adapter_params"] == expected and rows[key]["param_formula_ok"], key
    # b=8, m=2 on n=32: 2 factors x 4 blocks x 28 = 224 per 32-wide input; the 64-wide input has 448
    assert gs.gs_param_count(32, 8, 2) == 224 and gs.gs_param_count(64, 8, 2) == 448


def test_boft_fbd_patch_is_undone(bench_run):
    from peft.tuners.boft import layer as boft_layer

    *_, peft_fbd = bench_run
    assert boft_layer.get_fbd_cuda is peft_fbd and peft_fbd.__module__ == "peft.tuners.boft.layer"


def test_boft_fbd_blocks_nest_and_restore():
    """``measure.boft_fbd``: the stand-in inside ``torch``, PEFT's own loader inside ``peft``, each block restoring
    what was there before it; an unknown mode names the choices."""
    from peft.tuners.boft import layer as boft_layer

    own = boft_layer.get_fbd_cuda
    with measure.boft_fbd("torch"):
        assert boft_layer.get_fbd_cuda() is measure.TorchFastBlockDiag
        with measure.boft_fbd("peft"):
            assert boft_layer.get_fbd_cuda is own
        assert boft_layer.get_fbd_cuda() is measure.TorchFastBlockDiag
    assert boft_layer.get_fbd_cuda is own
    with pytest.raises(ValueError, match="Unknown BOFT fbd mode 'cuda'; use one of torch, peft"):
        with measure.boft_fbd("cuda"):
            pass
    assert boft_layer.get_fbd_cuda is own


def test_torch_block_diagonal_stand_in_matches_dense():
    """The stand-in's forward is ``torch.block_diag`` of each factor's blocks; its backward the diagonal blocks."""
    import torch

    x = torch.randn(2, 3, 4, 4)
    (out,) = measure.TorchFastBlockDiag.forward(x)
    for i in range(2):
        assert torch.equal(out[i], torch.block_diag(*x[i]))
    g = torch.randn(2, 12, 12)
    (back,) = measure.TorchFastBlockDiag.backward(g, x)
    assert back.shape == x.shape
    for i in range(2):
        for d in range(3):
            assert torch.equal(back[i, d], g[i, 4 * d:4 * d + 4, 4 * d:4 * d + 4])
