"""The DreamBooth benchmark (``python recipes/benchmark.py dreambooth``) in --quick mode: every method's UNet train
step on a reduced UNet, in one process."""

from __future__ import annotations

from pathlib import Path


def test_bench_quick(tmp_path: Path) -> None:
    from bench import dreambooth as bench_dreambooth

    result = bench_dreambooth.main(["--quick", "--output_dir", str(tmp_path)])
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"gsoft", "double_gsoft", "lora", "oft", "boft"}
    assert all(r["step_s"]["median"] > 0 and r["trainable_params"] > 0 for r in rows.values())
    assert (tmp_path / "dreambooth.json").is_file() and "| method |" in (tmp_path / "dreambooth.md").read_text()
