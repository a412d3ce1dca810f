"""The communication benchmark (``python recipes/benchmark.py comm``): the --quick pipeline over loopback (two real
2-process jobs of the GLUE recipe, ~1 minute on 2 cores), the "no root / no ip netns" exit, and the pure helpers that
turn logs into numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bench import comm
from bench.options import parse_options

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "recipes" / "benchmark.py"


def test_quick_no_netns_writes_table_json_plot(tmp_path):
    out = tmp_path / "bench"
    done = subprocess.run([sys.executable, str(SCRIPT), "comm", "--quick", "--no_netns", "--output_dir", str(out)],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("comm.md", "comm.json", "comm.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "comm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "comm.json").read_text())
    rows = summary["settings"]
    ref, topk = rows["fp32 all-reduce"], rows["Top-K 1%"]
    assert ref["compression"]["method"] == "none" and topk["compression"]["method"] == "topk"
    assert 0 < topk["counted_bytes_per_step"] < ref["counted_bytes_per_step"]
    # fp32 all-reduce over 2 workers sends 4 bytes per trainable parameter per step
    assert ref["counted_bytes_per_step"] == 4 * ref["trainable_params"]
    assert ref["wire_bytes_per_step"]["unthrottled"] is None  # loopback: not measured, not made up
    table = (out / "comm.md").read_text()
    assert "| Top-K 1% |" in table and table in done.stdout
    assert summary["targets"]["topk_1pct_bytes_reduction"]["reduction"] == pytest.approx(
        ref["counted_bytes_per_step"] / topk["counted_bytes_per_step"])


def test_without_root_says_why_and_writes_nothing(tmp_path, monkeypatch, capsys):
    out = tmp_path / "bench"
    monkeypatch.setenv(comm.SIMULATE_NO_NETNS_ENV, "1")
    assert comm.main(["--output_dir", str(out)]) is None
    printed = capsys.readouterr().out
    assert "cannot run here" in printed and "--no_netns" in printed and "Nothing was written" in printed
    assert not out.exists()


def test_not_root_reason(monkeypatch):
    monkeypatch.delenv(comm.SIMULATE_NO_NETNS_ENV, raising=False)
    monkeypatch.setattr(comm.os, "geteuid", lambda: 1000)
    assert "needs root" in comm.netns_unavailable_reason() and "uid 1000" in comm.netns_unavailable_reason()


class _Sampler:
    """Counters that grow 1000 bytes per second from t=0 (both workers together)."""

    def at(self, t):
        return 1000.0 * t


def test_steady_state_skips_warmup_and_evaluation_windows():
    # logs every 4 steps; steps take 1 s, except the window holding the evaluation at step 8 (+5 s)
    records = []
    t = 0.0
    for step in range(4, 21, 4):
        t += 4.0 + (5.0 if step == 12 else 0.0)
        records.append({"step": step, "time": t, "loss": 0.1, "comm_bytes_sent": 100 * step})
        if step == 8:
            records.append({"step": step, "time": t + 5.0, "eval_accuracy": 0.7})
    job = {"records": records, "sampler": _Sampler()}
    ss = comm.steady_state(job, warmup_steps=8)
    # windows 8-12 (evaluation) and 4-8 (warm-up) are skipped: 12-16, 16-20 remain
    assert ss["window_steps"] == 8 and ss["step_s"] == pytest.approx(1.0)
    assert ss["counted_bytes_per_step"] == pytest.approx(100.0)
    assert ss["wire_bytes_per_step"] == pytest.approx(1000.0 / 2)  # per worker


def test_metric_at_is_the_last_evaluation_reached():
    curve = [(20, 0.6), (40, 0.8), (60, 0.9)]
    assert comm.metric_at(curve, 10) is None
    assert comm.metric_at(curve, 40) == 0.8
    assert comm.metric_at(curve, 59.5) == 0.8
    assert comm.metric_at(curve, 1000) == 0.9


def test_quick_overrides_merge_mapping_options_key_by_key(tmp_path):
    """``recipe`` (a ``merge`` option) takes --quick's entries key by key and the command line's on top; other options,
    such as the compared settings, are replaced whole."""
    config = tmp_path / "comm.yaml"
    config.write_text(yaml.safe_dump({
        "recipe": {"task": "smoke", "max_seq_length": 32, "learning_rate": 0.002, "smoke_data": {"n_train": 4000}},
        "setting_specs": {"fp32": {"grad_compression": "none"}, "fp16": {"grad_compression": "fp16"},
                          "int8": {"grad_compression": "int8"}},
        "quick_overrides": {"recipe": {"smoke_data": {"n_train": 400, "n_validation": 100}},
                            "setting_specs": {"fp32": {"grad_compression": "none"}}},
    }))
    options = parse_options(comm.CommOptions, "comm", ["--config", str(config), "--quick",
                                                       "--recipe.learning_rate", "0.01"], None)
    assert options.recipe == {"task": "smoke", "max_seq_length": 32, "learning_rate": 0.01,
                              "smoke_data": {"n_train": 400, "n_validation": 100}}
    assert options.setting_specs == {"fp32": {"grad_compression": "none"}}
    with pytest.raises(SystemExit, match="setting 'bad' needs recipe options \\['grad_compresion'\\]"):
        parse_options(comm.CommOptions, "comm", ["--config", str(config), "--setting_specs",
                                                 "{bad: {grad_compresion: none}}"], None)
