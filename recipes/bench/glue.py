#!/usr/bin/env python
"""Side-by-side GLUE runs: GSOFT, Double GSOFT, LoRA, OFT, BOFT and full fine-tuning on one task, one table.

    python recipes/bench_glue.py                                    # the offline smoke task, every method
    python recipes/bench_glue.py --recipe_config configs/glue/rte.yaml --methods gsoft,lora \\
        --recipe_options "{max_train_samples: 1000, num_train_epochs: 1}"

Each method is one run of ``recipes/roberta_glue.py`` (same config, same seed, same base model; only ``--method``
changes) in this process, one after the other. Prints a markdown table (trainable parameters, final and best main
metric, median step time, peak memory) and writes it with a JSON copy and a PNG plot to ``--output_dir``.
"""

from __future__ import annotations

import contextlib
import json
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]

from common import METHODS, parse_recipe_args, reset_peak_memory

import roberta_glue
from .adapters import boft_fbd  # (PEFT BOFT's CUDA-only kernel, or a pure-PyTorch stand-in)


@dataclass
class BenchGlueArgs:
    """Options of the GLUE benchmark (YAML keys and ``--key value`` flags)."""

    recipe_config: str = field(
        default=str(REPO_ROOT / "configs" / "glue" / "smoke.yaml"),
        metadata={"help": "Config of recipes/roberta_glue.py shared by every run."},
    )
    methods: list[str] = field(
        default_factory=lambda: list(METHODS),
        metadata={"help": f"Methods to run, in order (from {', '.join(METHODS)})."},
    )
    recipe_options: dict = field(
        default_factory=dict,
        metadata={"help": "Overrides of the recipe config for every run, e.g. {max_train_samples: 1000}."},
    )
    output_dir: str = field(
        default="outputs/bench_glue",
        metadata={"help": "Runs go to <output_dir>/<method>; the table, JSON and plot to <output_dir>."},
    )
    boft_fbd: str = field(
        default="torch",
        metadata={"help": "BOFT without CUDA: 'torch' runs the configured butterfly factors through a pure-PyTorch "
                          "stand-in for PEFT's CUDA extension; 'peft' keeps PEFT's behaviour (silently 1 factor)."},
    )

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}.")
        if self.boft_fbd not in ("torch", "peft"):
            raise ValueError(f"--boft_fbd must be torch or peft, got {self.boft_fbd!r}.")


def _recipe_argv(args: BenchGlueArgs, method: str) -> list[str]:
    argv = ["--config", args.recipe_config, "--method", method, "--output_dir", str(Path(args.output_dir) / method),
            "--overwrite_output_dir", "--progress_bar", "false", "--report_to", "none"]
    for key, value in args.recipe_options.items():
        argv += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]  # JSON is YAML
    return argv


def _method_label(method: str, options: dict[str, Any]) -> str:
    opts = options.get(method) or {}
    if method in ("gsoft", "double_gsoft"):
        name = "GSOFT" if method == "gsoft" else "Double GSOFT"
        size = f"b={opts['block_size']}" if "block_size" in opts else f"r={opts.get('n_blocks')}"
        return f"{name} {size} m={opts.get('n_factors', 2)}"
    if method == "lora":
        return f"LoRA r={opts.get('r', 8)}"
    if method == "oft":
        return f"OFT b={opts.get('oft_block_size', 32)}"
    if method == "boft":
        return f"BOFT b={opts.get('boft_block_size', 4)} m={opts.get('boft_n_butterfly_factor', 1)}"
    return "full fine-tuning"


def markdown_table(rows: list[dict[str, Any]], device: str, boft_mode: str = "torch") -> str:
    metric = rows[0]["main_metric"]
    lines = [
        f"| method | trainable params | lr | {metric} (final) | {metric} (best) | step ms (median) | "
        "peak memory MiB | train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        step_ms = f"{1000 * r['step_time_s_median']:.1f}" if r["step_time_s_median"] is not None else "n/a"
        lines.append(
            f"| {r['label']} | {r['trainable_params']:,} | {r['learning_rate']:.0e} | {r['eval'][metric]:.4f} | "
            f"{r['best_eval'][metric]:.4f} | "
            f"{step_ms} | {r['peak_memory_mb']:.0f} | {r['train_runtime_s']:.1f} |"
        )
    memory = ("CUDA peak allocated" if device.startswith("cuda") else
              "peak RSS of the process (watermark reset before each run), whole process incl. Python/torch")
    notes = [
        "",
        f"Task `{rows[0]['task']}`, {rows[0]['train_steps']} steps per method on `{device}` ({platform.machine()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)); trainable params include the "
        f"classification head; memory: {memory}.",
    ]
    if any(r["method"] == "boft" for r in rows) and not device.startswith("cuda"):
        notes.append(
            "BOFT on CPU: PEFT cannot build its CUDA extension and then silently uses 1 butterfly factor "
            "(block-diagonal OFT with BOFT's block size); " + (
                "here a pure-PyTorch stand-in for the extension keeps the configured factors (`--boft_fbd torch`)."
                if boft_mode == "torch" else "this table shows exactly that (`--boft_fbd peft`)."
            )
        )
    return "\n".join(lines + notes)


def plot(rows: list[dict[str, Any]], path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    metric = rows[0]["main_metric"]
    labels = [r["label"] for r in rows]
    panels = [
        (f"{metric} (final)", [r["eval"][metric] for r in rows]),
        ("median step time (ms)", [1000 * (r["step_time_s_median"] or 0.0) for r in rows]),
        ("trainable parameters", [r["trainable_params"] for r in rows]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 0.5 * len(rows) + 2))
    for ax, (title, values) in zip(axes, panels):
        ax.barh(labels, values, color="tab:blue")
        ax.set_title(title)
        ax.invert_yaxis()
    fig.suptitle(f"GLUE {rows[0]['task']}: methods side by side")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    args = parse_recipe_args(BenchGlueArgs, argv, description=__doc__)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    method_options = (yaml.safe_load(Path(args.recipe_config).read_text()) or {}).get("method_options", {})
    method_options.update(args.recipe_options.get("method_options", {}))
    rows = []
    for method in args.methods:
        reset_peak_memory("cuda" if torch.cuda.is_available() else "cpu")
        with boft_fbd(args.boft_fbd) if method == "boft" else contextlib.nullcontext():
            results = roberta_glue.main(_recipe_argv(args, method))
        rows.append({**results, "label": _method_label(method, method_options)})
    table = markdown_table(rows, rows[0]["device"], args.boft_fbd)
    print(table)
    (out / "bench_glue.md").write_text(table + "\n")
    (out / "bench_glue.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
    figure = plot(rows, out / "bench_glue.png")
    print(f"\nwrote {out / 'bench_glue.md'}, {out / 'bench_glue.json'}" + (f", {figure}" if figure else ""))
    return rows


if __name__ == "__main__":
    main()
