#!/usr/bin/env python
"""Train-step time and peak memory of GSOFT, Double GSOFT, LoRA, OFT and BOFT on a Stable Diffusion UNet.

Usage::

    python recipes/bench_dreambooth.py                       # configs/bench/dreambooth.yaml; reduced UNet on a CPU
    python recipes/bench_dreambooth.py --unet sd15 --reduced false --batch_size 4 --resolution 512   # full size (GPU)
    python recipes/bench_dreambooth.py --quick               # seconds: a tiny UNet (tests)

The UNet is built from the SD 1.5 or SD 2.1 ``UNet2DConditionModel`` config with random weights (nothing is
downloaded; timing does not depend on the weights). Each method adapts the attention projections ``to_q, to_k, to_v,
to_out.0`` with the paper's settings, read from ``method_options`` of ``configs/dreambooth/sd21.yaml`` (GSOFT r=32
blocks, Double GSOFT r=64, LoRA rank 4, BOFT r=32 m=4, OFT 32 blocks). One step is exactly the recipe's: noise and
timesteps drawn, noised latents through the UNet with text embeddings, epsilon MSE loss (``dreambooth.latent_loss``),
backward, AdamW step; the VAE and text encoder are left out (frozen, identical for every method).

Measurements: median step wall time over interleaved rounds (every method in turn, so machine noise hits all alike),
after ``warmup`` untimed steps; peak train memory above the frozen UNet weights = adapter state + AdamW state + peak
tensor memory of one step (CUDA ``max_memory_allocated``; on a CPU the profiler's allocation events, as
``bench_adapters.py``). BOFT's CUDA extension cannot build on a CPU, where PEFT silently drops to 1 butterfly factor;
by default (``boft_fbd: torch``) a pure-PyTorch stand-in keeps the configured factors.

On a CPU the default (``reduced: null`` = reduced on CPU) keeps the real layer widths (320 / 640 channels, the real
cross-attention width) but only the first two UNet blocks with one layer each, batch 1 and 128-px images: the table says
so. Outputs: ``results.json``, ``tables.md`` and ``bench_dreambooth_<device>.png`` in ``output_dir``.
"""

from __future__ import annotations

import copy
import gc
import json
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]

import torch
import yaml

from .adapters import (  # (the adapter benchmark's measurement helpers, shared)
    _loadavg,
    _restore_fbd,
    boft_fbd,
    device_label,
    optimizer_state_bytes,
    peak_step_bytes,
    summary,
    tensor_bytes,
    timed,
    versions,
)
from dreambooth import latent_loss

MiB = 2**20


@dataclass
class BenchArgs:
    """Options of recipes/bench_dreambooth.py (defaults in configs/bench/dreambooth.yaml)."""

    unet: str = field(default="sd21", metadata={"help": "Key of unet_configs: sd15 or sd21."})
    unet_configs: dict = field(default_factory=dict, metadata={"help": "UNet2DConditionModel configs by name."})
    reduced: Optional[bool] = field(
        default=None, metadata={"help": "Apply `reduce` to the UNet config (null: on a CPU only)."}
    )
    reduce: dict = field(default_factory=dict, metadata={"help": "UNet config overrides of the reduced UNet."})
    method_config: str = field(
        default="configs/dreambooth/sd21.yaml", metadata={"help": "Recipe YAML whose method_options are used."}
    )
    methods: list[str] = field(
        default_factory=lambda: ["gsoft", "double_gsoft", "lora", "oft", "boft"], metadata={"help": "Methods to run."}
    )
    target_modules: list[str] = field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"], metadata={"help": "UNet layers adapted."}
    )
    batch_size: int = field(default=4, metadata={"help": "Images per step (the paper: 4)."})
    resolution: int = field(default=512, metadata={"help": "Image side in pixels (latents are resolution / 8)."})
    text_len: int = field(default=77, metadata={"help": "Text tokens per prompt (CLIP: 77)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "UNet gradient checkpointing."})
    warmup: int = field(default=1, metadata={"help": "Untimed steps per method first."})
    rounds: int = field(default=3, metadata={"help": "Interleaved timing rounds."})
    steps_per_round: int = field(default=2, metadata={"help": "Timed steps per method and round."})
    memory: bool = field(default=True, metadata={"help": "Measure peak memory (one extra step per method)."})
    boft_fbd: str = field(
        default="torch", metadata={"help": "torch: pure-PyTorch BOFT block-diagonal op; peft: PEFT's (CPU: m = 1)."}
    )
    threads: Optional[int] = field(default=None, metadata={"help": "torch threads on a CPU (null: torch's default)."})
    device: Optional[str] = field(default=None, metadata={"help": "cuda or cpu (default: cuda when available)."})
    device_overrides: dict = field(default_factory=dict, metadata={"help": "Per device type option overrides."})
    quick: bool = field(default=False, metadata={"help": "Apply quick_overrides: a tiny run for tests."})
    quick_overrides: dict = field(default_factory=dict, metadata={"help": "Options of --quick."})
    seed: int = field(default=0, metadata={"help": "Seed of weights and inputs."})
    output_dir: str = field(default="outputs/bench_dreambooth", metadata={"help": "Where tables and plots go."})


def parse(argv: Optional[Sequence[str]]) -> BenchArgs:
    """YAML defaults < device overrides < quick overrides < command line."""
    from common import parse_recipe_args

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv:
        argv = ["--config", str(REPO_ROOT / "configs" / "bench" / "dreambooth.yaml"), *argv]
    args = parse_recipe_args(BenchArgs, argv, description=__doc__.split("\n\n")[0])
    given = _cli_keys(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    layers = [args.device_overrides.get(torch.device(device).type, {})]
    if args.quick:
        layers.append(args.quick_overrides)
    for overrides in layers:
        for key, value in (overrides or {}).items():
            if key not in given:
                setattr(args, key, value)
    args.device = device
    return args


def _cli_keys(argv: list[str]) -> set[str]:
    """Options set on the command line (they win over device and quick overrides)."""
    keys, skip = set(), False
    for a in argv:
        if skip:
            skip = False
        elif a == "--config":
            skip = True
        elif a.startswith("--"):
            keys.add(a[2:].split("=")[0].split(".")[0].replace("-", "_"))
    return keys


def unet_config(args: BenchArgs) -> tuple[dict[str, Any], bool]:
    if args.unet not in args.unet_configs:
        raise ValueError(f"Unknown --unet {args.unet!r}; choose one of {sorted(args.unet_configs)}.")
    config = dict(args.unet_configs[args.unet])
    reduced = args.reduced if args.reduced is not None else torch.device(args.device).type == "cpu"
    if reduced:
        config.update(args.reduce)
    return config, reduced


def method_options(args: BenchArgs) -> dict[str, dict[str, Any]]:
    path = Path(args.method_config)
    path = path if path.is_absolute() or path.is_file() else REPO_ROOT / path
    return yaml.safe_load(path.read_text()).get("method_options", {})


def build_models(args: BenchArgs, config: dict[str, Any]) -> tuple[torch.nn.Module, dict[str, torch.nn.Module]]:
    """The frozen base UNet and one adapted deep copy per method (``common.apply_method``)."""
    from diffusers import UNet2DConditionModel

    from common import apply_method

    torch.manual_seed(args.seed)
    base = UNet2DConditionModel(**config).to(args.device).requires_grad_(False)
    if args.gradient_checkpointing:
        base.enable_gradient_checkpointing()
    options = method_options(args)
    models = {}
    for method in args.methods:
        with warnings.catch_warnings(), boft_fbd(args.boft_fbd if method == "boft" else "torch"):
            warnings.simplefilter("ignore")
            models[method] = apply_method(copy.deepcopy(base), method, list(args.target_modules),
                                          options=dict(options.get(method) or {})).train()
    return base, models


def describe(method: str, options: dict[str, Any], model: torch.nn.Module) -> str:
    opts = ", ".join(f"{k}={v}" for k, v in options.items())
    if method == "boft":
        used = sorted({p.shape[0] for n, p in model.named_parameters() if "boft_R" in n})
        if used and used != [options.get("boft_n_butterfly_factor", 1)]:
            opts += f" (PEFT used m={used})"
    return f"{method} ({opts})"


def run(args: BenchArgs) -> dict[str, Any]:
    import diffusers
    from diffusers import DDPMScheduler

    from common import count_parameters

    if args.threads and torch.device(args.device).type == "cpu":
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config, reduced = unet_config(args)
    base, models = build_models(args, config)
    options = method_options(args)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    side = args.resolution // 8
    g = torch.Generator(device=device).manual_seed(args.seed)
    latents = torch.randn(args.batch_size, config.get("in_channels", 4), side, side, generator=g, device=device)
    embeds = torch.randn(args.batch_size, args.text_len, config["cross_attention_dim"], generator=g, device=device)
    base_bytes = tensor_bytes(list(base.parameters()) + list(base.buffers()))
    opts = {m: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5, weight_decay=0.01)
            for m, model in models.items()}

    def step(method: str) -> None:
        opts[method].zero_grad(set_to_none=True)
        loss, _ = latent_loss(latents, args.batch_size, unet=models[method], noise_scheduler=scheduler,
                              prompt_embeds=embeds, generator=torch.Generator(device=device).manual_seed(1))
        loss.backward()
        opts[method].step()

    load_start = _loadavg()
    for method in models:
        for _ in range(args.warmup):
            step(method)
    times: dict[str, list[float]] = {m: [] for m in models}
    for _ in range(args.rounds):
        for method in models:
            times[method] += [timed(lambda m=method: step(m), device) for _ in range(args.steps_per_round)]
    rows = []
    for method, model in models.items():
        trainable, _ = count_parameters(model)
        adapter_bytes = tensor_bytes(list(model.parameters()) + list(model.buffers())) - base_bytes
        peak = peak_step_bytes(lambda m=method: step(m), device) if args.memory else None
        rows.append({
            "method": method,
            "name": describe(method, options.get(method) or {}, model),
            "trainable_params": trainable,
            "step_ms": 1000 * summary(times[method])["median"],
            "step_s": summary(times[method]),
            "peak_train_mib": None if peak is None else (peak + adapter_bytes + optimizer_state_bytes(opts[method])) / MiB,
        })
        gc.collect()
    ref = {r["method"]: r for r in rows}
    for row in rows:
        for other in ("boft", "lora"):
            if other in ref:
                row[f"step_vs_{other}"] = row["step_ms"] / ref[other]["step_ms"]
                if row["peak_train_mib"] and ref[other]["peak_train_mib"]:
                    row[f"mem_vs_{other}"] = row["peak_train_mib"] / ref[other]["peak_train_mib"]
    blocks = config["block_out_channels"]
    return {
        "device": device_label(device),
        "unet": args.unet,
        "reduced": reduced,
        "unet_config": config,
        "unet_params": sum(p.numel() for p in base.parameters()),
        "blocks": list(blocks),
        "batch_size": args.batch_size,
        "resolution": args.resolution,
        "text_len": args.text_len,
        "rounds": args.rounds,
        "steps_per_round": args.steps_per_round,
        "loadavg": [load_start, _loadavg()],
        "rows": rows,
        "versions": {**versions(), "diffusers": diffusers.__version__},
    }


def markdown(result: dict[str, Any]) -> str:
    size = "reduced" if result["reduced"] else "full-size"
    head = (
        f"#### {result['unet']} UNet ({size}: blocks {result['blocks']}, {result['unet_params'] / 1e6:.0f}M params) "
        f"— {result['device']}\n\nbatch {result['batch_size']} x {result['resolution']} px "
        f"(latents {result['resolution'] // 8}), {result['text_len']} text tokens; to_q/k/v/out.0 adapted; median of "
        f"{result['rounds'] * result['steps_per_round']} interleaved steps; load average {result['loadavg'][0]} -> "
        f"{result['loadavg'][1]}. Memory: adapter + AdamW state + peak step tensors, frozen UNet weights excluded.\n"
    )
    lines = [head, "| method | params | step ms | ×BOFT | ×LoRA | peak train MiB | mem ×BOFT | mem ×LoRA |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]

    def f(x: Optional[float], fmt: str) -> str:
        return "–" if x is None else format(x, fmt)

    for r in result["rows"]:
        lines.append(
            f"| {r['name']} | {r['trainable_params']:,} | {r['step_ms']:.0f} | {f(r.get('step_vs_boft'), '.2f')}x | "
            f"{f(r.get('step_vs_lora'), '.2f')}x | {f(r['peak_train_mib'], '.0f')} | {f(r.get('mem_vs_boft'), '.2f')}x | "
            f"{f(r.get('mem_vs_lora'), '.2f')}x |"
        )
    g = next((r for r in result["rows"] if r["method"] == "gsoft"), None)
    if g and "step_vs_boft" in g and "step_vs_lora" in g:
        ok = lambda v, lim: "ok" if v is not None and v <= lim else "MISSED"  # noqa: E731
        lines.append(
            f"\nTargets for gsoft: step ≤ 0.5x BOFT: {g['step_vs_boft']:.2f}x ({ok(g['step_vs_boft'], 0.5)}); "
            f"memory ≤ BOFT: {f(g.get('mem_vs_boft'), '.2f')}x ({ok(g.get('mem_vs_boft'), 1.0)}); "
            f"step ≤ 1.2x LoRA: {g['step_vs_lora']:.2f}x ({ok(g['step_vs_lora'], 1.2)})"
        )
    return "\n".join(lines) + "\n"


def save_plot(result: dict[str, Any], path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = result["rows"]
    names = [r["method"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.2))
    a.bar(names, [r["step_ms"] for r in rows], color="tab:blue")
    a.set_ylabel("train step, ms (median)")
    b.bar(names, [r["peak_train_mib"] or 0 for r in rows], color="tab:orange")
    b.set_ylabel("peak train memory, MiB")
    size = "reduced" if result["reduced"] else "full-size"
    fig.suptitle(f"DreamBooth step on {result['unet']} UNet ({size}) — {result['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    import gsoft  # noqa: F401  (registers GSOFT with PEFT)

    args = parse(argv)
    try:
        result = run(args)
    finally:
        _restore_fbd()  # leave PEFT's BOFT as we found it (main() may run inside a test session)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(result)
    print(table)
    (out / "tables.md").write_text(table)
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    tag = "cuda" if torch.device(args.device).type == "cuda" else "cpu"
    save_plot(result, out / f"bench_dreambooth_{tag}.png")
    return result


if __name__ == "__main__":
    main()
