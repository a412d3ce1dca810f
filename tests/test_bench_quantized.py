"""The quantized-base benchmark (``python recipes/benchmark.py quantized``) in --quick mode: QGSOFT, Double QGSOFT,
QLoRA at GSOFT's trainable-parameter budget and PEFT's OFT on one 4-bit tiny decoder, in one process."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_bench_quick(tmp_path: Path) -> None:
    from bench import quantized as bench_quantized

    result = bench_quantized.main(["--quick", "--output_dir", str(tmp_path)])
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["gsoft", "double_gsoft", "lora", "oft"]
    assert all(r["step_s"]["median"] > 0 and r["peak_train_mem_bytes"] > 0 for r in rows.values())
    # LoRA's rank gives it GSOFT's trainable parameters (to within one rank's worth)
    per_rank = 2 * 1024  # tiny: in + out summed over q, k, v, o (64->64, 64->32 twice, 64->64), gate, up, down, x 2 layers
    assert abs(rows["lora"]["trainable_params"] - rows["gsoft"]["trainable_params"]) <= per_rank // 2
    assert rows["lora"]["relative"]["mem_vs_lora"] == 1.0
    assert (tmp_path / "quantized.json").is_file() and "| method |" in (tmp_path / "quantized.md").read_text()


def test_match_params_must_be_a_run_method(tmp_path: Path) -> None:
    from bench import quantized as bench_quantized

    with pytest.raises(SystemExit):
        bench_quantized.main(["--quick", "--methods", "lora", "--output_dir", str(tmp_path)])


def test_matrix_forms_cuda_applies_the_cuda_rules_on_a_cpu_run_only_inside() -> None:
    """--matrix_forms cuda: inside the run a CPU picks the forms a GPU would (two factors of b = 16 as dense groups,
    CUDA's grouped limit; the CPU's is b = 8), and the CPU's own rules are back afterwards."""
    import torch

    from bench import quantized as bench_quantized
    from gsoft import plan

    options = bench_quantized.parse_options(bench_quantized.QuantizedOptions, "quantized",
                                            ["--quick", "--matrix_forms", "cuda", "--device", "cpu"], None)
    cpu = torch.device("cpu")
    before = (dict(plan.DENSE_MAX), dict(plan.GROUPED_MAX_BLOCK))
    assert plan.matrix_form(2, 32, 16, "cpu") == "factors"
    with bench_quantized.matrix_forms(options, cpu):
        assert plan.matrix_form(2, 32, 16, "cpu") == plan.matrix_form(2, 32, 16, "cuda") == "groups"
        assert plan.matrix_form(2, 20, 64, "cpu") == "dense"  # n = 1280: CUDA's dense bound
    assert (dict(plan.DENSE_MAX), dict(plan.GROUPED_MAX_BLOCK)) == before
