"""Side-by-side GLUE runs: GSOFT, Double GSOFT, LoRA, OFT, BOFT and full fine-tuning on one task, one table.

    python recipes/benchmark.py glue                                # configs/bench/glue.yaml: the offline smoke task
    python recipes/benchmark.py glue --quick                        # a few steps per method (tests)
    python recipes/benchmark.py glue --recipe_config configs/glue/rte.yaml --methods gsoft,lora \\
        --recipe_options "{max_train_samples: 1000, num_train_epochs: 1}"

Each method is one run of ``recipes/roberta_glue.py`` (``roberta_glue.main``; same config, same seed, same base
model; only ``--method`` changes) in this process, one after the other. Prints a markdown table (trainable
parameters, final and best main metric, median step time, peak memory, and step time, memory and parameters against
the ``reference`` methods) and writes it with a JSON copy and a plot: ``glue.md``, ``glue.json`` and ``glue.png`` in
``output_dir``, each run's own outputs in ``output_dir/<method>``.
"""

from __future__ import annotations

import dataclasses
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Optional, Sequence

import torch
import yaml

import roberta_glue
from common.methods import GSOFT_METHODS, METHODS
from common.run import reset_peak_memory

from . import measure
from .options import BenchOptions, option_flags, parse_options, repo_path

#: Ratio column prefix -> the row field it divides.
RATIO_FIELDS = {"step": "step_time_s_median", "mem": "peak_memory_mb", "params": "trainable_params"}


@dataclass
class GlueOptions(BenchOptions):
    """Options of the GLUE benchmark (defaults: configs/bench/glue.yaml)."""

    output_dir: str = field(
        default="outputs/bench_glue",
        metadata={"help": "Runs go to <output_dir>/<method>; glue.md, glue.json and glue.png to <output_dir>."},
    )
    recipe_config: str = field(
        default="configs/glue/smoke.yaml",
        metadata={"help": "Config of recipes/roberta_glue.py shared by every run (relative: to the working directory "
                          "or the repository)."},
    )
    methods: list[Literal[METHODS]] = field(
        default_factory=lambda: list(METHODS),
        metadata={"help": f"Methods to run, in order (from {', '.join(METHODS)})."},
    )
    recipe_options: dict = field(
        default_factory=dict,
        metadata={"help": "Overrides of the recipe config for every run, e.g. {max_train_samples: 1000}.",
                  "merge": True},
    )
    boft_fbd: measure.BoftFbd = field(
        default="torch",
        metadata={"help": "BOFT without CUDA: 'torch' runs the configured butterfly factors through a pure-PyTorch "
                          "stand-in for PEFT's CUDA extension; 'peft' keeps PEFT's behaviour (silently 1 factor)."},
    )
    reference: dict = field(default_factory=lambda: {"lora": "lora"},
                            metadata={"help": "Ratio columns: {label: method}."})

    def __post_init__(self) -> None:
        self.recipe_config = str(repo_path(self.recipe_config))
        unknown = unknown_recipe_options(self.recipe_options)
        if unknown:
            raise ValueError(f"--recipe_options: {unknown} are not options of recipes/roberta_glue.py "
                             "(python recipes/roberta_glue.py --help lists them).")

    def recipe_argv(self, method: str) -> list[str]:
        """The recipe's command line for the run of ``method``."""
        return ["--config", self.recipe_config, "--method", method, "--output_dir", str(Path(self.output_dir) / method),
                "--overwrite_output_dir", "--progress_bar", "false", "--report_to", "none",
                *option_flags(self.recipe_options)]


def unknown_recipe_options(options: Iterable[str]) -> list[str]:
    """The names in ``options`` that ``recipes/roberta_glue.py`` has no option for (checked before any run)."""
    return sorted(set(options) - {f.name for f in dataclasses.fields(roberta_glue.GlueArgs)})


def method_label(method: str, options: dict[str, Any]) -> str:
    opts = options.get(method) or {}
    if method in GSOFT_METHODS:
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


def markdown(rows: list[dict[str, Any]], options: GlueOptions) -> str:
    metric, device = rows[0]["main_metric"], rows[0]["device"]
    refs = list(options.reference)
    header = ["method", "trainable params", *[f"params ×{k}" for k in refs], "lr", f"{metric} (final)",
              f"{metric} (best)", "step ms (median)", *[f"step ×{k}" for k in refs], "peak memory MiB",
              *[f"mem ×{k}" for k in refs], "train s"]
    cells = [[r["label"], f"{r['trainable_params']:,}",
              *[measure.fmt_ratio(r["relative"][f"params_vs_{k}"]) for k in refs],
              f"{r['learning_rate']:.0e}", f"{r['eval'][metric]:.4f}", f"{r['best_eval'][metric]:.4f}",
              measure.fmt_ms(r["step_time_s_median"]),
              *[measure.fmt_ratio(r["relative"][f"step_vs_{k}"]) for k in refs],
              f"{r['peak_memory_mb']:.0f}", *[measure.fmt_ratio(r["relative"][f"mem_vs_{k}"]) for k in refs],
              f"{r['train_runtime_s']:.1f}"] for r in rows]
    memory = ("CUDA peak allocated" if device.startswith("cuda") else
              "peak RSS of the process (watermark reset before each run), whole process incl. Python/torch")
    text = measure.markdown_table(header, cells) + (
        f"\nTask `{rows[0]['task']}`, {rows[0]['train_steps']} steps per method on `{device}` ({platform.machine()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)); trainable params include the "
        f"classification head; memory: {memory}.\n"
    )
    if any(r["method"] == "boft" for r in rows) and not device.startswith("cuda"):
        text += ("BOFT on CPU: PEFT cannot build its CUDA extension and then silently uses 1 butterfly factor "
                 "(block-diagonal OFT with BOFT's block size); " + (
                     "here a pure-PyTorch stand-in for the extension keeps the configured factors (`--boft_fbd torch`)."
                     if options.boft_fbd == "torch" else "this table shows exactly that (`--boft_fbd peft`).") + "\n")
    return text


def plot(rows: list[dict[str, Any]]) -> Any:
    metric = rows[0]["main_metric"]
    labels = [r["label"] for r in rows]
    panels = [
        (f"{metric} (final)", [r["eval"][metric] for r in rows], "{:.3f}"),
        ("median step time (ms)", [1000 * (r["step_time_s_median"] or 0.0) for r in rows], "{:.0f}"),
        ("trainable parameters", [r["trainable_params"] for r in rows], "{:,}"),
    ]
    fig, axes = measure.subplots(1, len(panels), 5 * len(panels), 0.5 * len(rows) + 2)
    for ax, (title, values, fmt) in zip(axes[0], panels):
        measure.bar_panel(ax, labels, values, title, title, fmt=fmt)
    fig.suptitle(f"GLUE {rows[0]['task']}: methods side by side")
    return fig


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run every method; returns the report that is also written to ``<output_dir>/glue.json``."""
    options = parse_options(GlueOptions, "glue", argv, __doc__)
    method_options = (yaml.safe_load(Path(options.recipe_config).read_text()) or {}).get("method_options", {})
    method_options.update(options.recipe_options.get("method_options", {}))
    rows = []
    for i, method in enumerate(options.methods):
        print(f"[glue] {i + 1}/{len(options.methods)}: {method} ...", flush=True)
        reset_peak_memory("cuda" if torch.cuda.is_available() else "cpu")
        with measure.boft_fbd(options.boft_fbd):
            results = roberta_glue.main(options.recipe_argv(method))
        rows.append({**results, "label": method_label(method, method_options)})
        print(f"[glue] {method}: {results['main_metric']} {results['eval'][results['main_metric']]:.4f} after "
              f"{results['train_steps']} steps", flush=True)
    measure.add_ratios(rows, options.reference, RATIO_FIELDS, key="method")
    table = markdown(rows, options)
    print("\n" + table)
    report = {**measure.report_header("glue", options), "rows": rows}
    measure.write_outputs(options.output_dir, "glue", table, report, plot(rows) if options.plot else None)
    return report
