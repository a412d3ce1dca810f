"""Train-step time and peak memory of GSOFT, Double GSOFT, LoRA, OFT and BOFT on a Stable Diffusion UNet.

Usage::

    python recipes/benchmark.py dreambooth                  # configs/bench/dreambooth.yaml; reduced UNet on a CPU
    python recipes/benchmark.py dreambooth --unet sd15 --reduced false --batch_size 4 --resolution 512  # GPU
    python recipes/benchmark.py dreambooth --quick          # seconds: a tiny UNet (tests)

The UNet is built from the SD 1.5 or SD 2.1 ``UNet2DConditionModel`` config with random weights (nothing is
downloaded; timing does not depend on the weights). Each method adapts the attention projections ``to_q, to_k, to_v,
to_out.0`` with the paper's settings, read from ``method_options`` of ``method_config`` (GSOFT r=32 blocks, Double
GSOFT r=64, LoRA rank 4, BOFT r=32 m=4, OFT 32 blocks). One step is exactly the recipe's: noise and timesteps drawn,
noised latents through the UNet with text embeddings, epsilon MSE loss (``dreambooth.latent_loss``), backward, AdamW
step; the VAE and text encoder are left out (frozen, identical for every method). The methods run side by side in
one process.

Measurements: median step wall time over interleaved rounds (every method in turn, so that machine noise hits all
alike), after ``warmup`` untimed steps; peak train memory above the frozen UNet weights = adapter state + AdamW state
+ peak tensor memory of one step (``measure.peak_step_bytes``). Ratio columns divide by the ``reference`` methods;
``targets`` are reported as held or MISSED. BOFT's CUDA extension cannot build on a CPU, where PEFT silently drops to
1 butterfly factor; by default (``boft_fbd: torch``) a pure-PyTorch stand-in keeps the configured factors.

On a CPU the default (``reduced: null`` = reduced on a CPU) keeps the real layer widths (320 / 640 channels, the real
cross-attention width) but only the first two UNet blocks with one layer each, batch 1 and 128-px images: the table
says so. Outputs in ``output_dir``: ``dreambooth.md``, ``dreambooth.json`` and ``dreambooth.png``.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import torch
import yaml

from common.methods import METHODS, PEFT_METHODS, apply_method
from common.run import count_parameters
from dreambooth import latent_loss

from . import measure
from .options import TrainStepOptions, parse_options, repo_path


@dataclass
class DreamboothOptions(TrainStepOptions):
    """Options of the DreamBooth UNet benchmark (defaults: configs/bench/dreambooth.yaml)."""

    output_dir: str = field(default="outputs/bench_dreambooth", metadata={"help": "Where dreambooth.md/.json/.png go."})
    unet: str = field(default="sd21", metadata={"help": "Key of unet_configs: sd15 or sd21."})
    unet_configs: dict = field(default_factory=dict, metadata={"help": "UNet2DConditionModel configs by name."})
    reduced: Optional[bool] = field(
        default=None, metadata={"help": "Apply `reduce` to the UNet config (null: on a CPU only)."}
    )
    reduce: dict = field(default_factory=dict, metadata={"help": "UNet config overrides of the reduced UNet."})
    method_config: str = field(
        default="configs/dreambooth/sd21.yaml",
        metadata={"help": "Recipe YAML whose method_options are used (relative: to the working directory or the "
                          "repository)."},
    )
    methods: list[Literal[METHODS]] = field(
        default_factory=lambda: list(PEFT_METHODS),
        metadata={"help": f"Methods to run, in order (from {', '.join(METHODS)})."},
    )
    target_modules: list[str] = field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"], metadata={"help": "UNet layers adapted."}
    )
    batch_size: int = field(default=4, metadata={"help": "Images per step (the paper: 4)."})
    resolution: int = field(default=512, metadata={"help": "Image side in pixels (latents are resolution / 8)."})
    text_len: int = field(default=77, metadata={"help": "Text tokens per prompt (CLIP: 77)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "UNet gradient checkpointing."})
    boft_fbd: measure.BoftFbd = field(
        default="torch", metadata={"help": "torch: pure-PyTorch BOFT block-diagonal op; peft: PEFT's (CPU: m = 1)."}
    )
    reference: dict = field(default_factory=lambda: {"boft": "boft", "lora": "lora"},
                            metadata={"help": "Ratio columns: {label: method}."})
    targets: dict = field(
        default_factory=lambda: {"method": "gsoft", "step_vs_boft": 0.5, "mem_vs_boft": 1.0, "step_vs_lora": 1.2},
        metadata={"help": "{method: name, <metric>: limit}: value <= limit, reported."},
    )

    def __post_init__(self) -> None:
        if self.unet not in self.unet_configs:
            raise ValueError(f"--unet: unknown {self.unet!r}; unet_configs has {sorted(self.unet_configs)}.")
        self.method_config = str(repo_path(self.method_config))
        super().__post_init__()


def unet_config(options: DreamboothOptions, device: torch.device) -> tuple[dict[str, Any], bool]:
    """The UNet config to build and whether it is the reduced one."""
    config = dict(options.unet_configs[options.unet])
    reduced = options.reduced if options.reduced is not None else device.type == "cpu"
    if reduced:
        config.update(options.reduce)
    return config, reduced


def method_options(options: DreamboothOptions) -> dict[str, dict[str, Any]]:
    """The recipe config's ``method_options`` (the paper's settings per method)."""
    return yaml.safe_load(Path(options.method_config).read_text()).get("method_options", {})


def build_models(options: DreamboothOptions, config: dict[str, Any],
                 device: torch.device) -> tuple[torch.nn.Module, dict[str, torch.nn.Module]]:
    """The frozen base UNet and one adapted deep copy per method (``common.apply_method``)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(options.seed)
    base = UNet2DConditionModel(**config).to(device).requires_grad_(False)
    if options.gradient_checkpointing:
        base.enable_gradient_checkpointing()
    method_opts = method_options(options)
    models = {}
    for method in options.methods:
        with warnings.catch_warnings(), measure.boft_fbd(options.boft_fbd):
            warnings.simplefilter("ignore")
            models[method] = apply_method(copy.deepcopy(base), method, list(options.target_modules),
                                          options=dict(method_opts.get(method) or {})).train()
    return base, models


def describe(method: str, options: dict[str, Any], model: torch.nn.Module) -> str:
    opts = ", ".join(f"{k}={v}" for k, v in options.items())
    if method == "boft":
        used = measure.boft_factors_used(model)
        if used and used != [options.get("boft_n_butterfly_factor", 1)]:
            opts += f" (PEFT used m={used})"
    return f"{method} ({opts})"


def run(options: DreamboothOptions, device: torch.device) -> dict[str, Any]:
    """Every method's train step on one UNet, side by side."""
    from diffusers import DDPMScheduler

    config, reduced = unet_config(options, device)
    base, models = build_models(options, config, device)
    method_opts = method_options(options)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    side = options.resolution // 8
    g = torch.Generator(device=device).manual_seed(options.seed)
    latents = torch.randn(options.batch_size, config.get("in_channels", 4), side, side, generator=g, device=device)
    embeds = torch.randn(options.batch_size, options.text_len, config["cross_attention_dim"], generator=g,
                         device=device)
    frozen_bytes = measure.model_bytes(base)
    opts = {m: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5, weight_decay=0.01)
            for m, model in models.items()}

    def step(method: str, zero_grad: bool = True) -> None:
        if zero_grad:
            opts[method].zero_grad(set_to_none=True)
        loss, _ = latent_loss(latents, options.batch_size, unet=models[method], noise_scheduler=scheduler,
                              prompt_embeds=embeds, generator=torch.Generator(device=device).manual_seed(1))
        loss.backward()
        opts[method].step()

    load_start = measure.load_average()
    measured = measure.train_step_rows(step, models, opts, options, frozen_bytes, device,
                                       f"{options.unet}/{device.type}")
    rows = [{"method": method, "name": describe(method, method_opts.get(method) or {}, model),
             "trainable_params": count_parameters(model)[0], **measured[method]} for method, model in models.items()]
    measure.add_ratios(rows, options.reference, {"step": "step_s", "mem": "peak_train_mem_bytes"}, key="method")
    return {
        "device": measure.device_label(device),
        "unet": options.unet,
        "reduced": reduced,
        "unet_config": config,
        "unet_params": sum(p.numel() for p in base.parameters()),
        "blocks": list(config["block_out_channels"]),
        "batch_size": options.batch_size,
        "resolution": options.resolution,
        "text_len": options.text_len,
        "rounds": options.rounds,
        "steps_per_round": options.steps_per_round,
        "loadavg": [load_start, measure.load_average()],
        "rows": rows,
        "targets": measure.check_targets(rows, measure.target_specs(options.targets), key="method"),
    }


def markdown(result: dict[str, Any], options: DreamboothOptions) -> str:
    size = "reduced" if result["reduced"] else "full-size"
    text = (
        f"#### {result['unet']} UNet ({size}: blocks {result['blocks']}, {result['unet_params'] / 1e6:.0f}M params) "
        f"— {result['device']}\n\nbatch {result['batch_size']} x {result['resolution']} px "
        f"(latents {result['resolution'] // 8}), {result['text_len']} text tokens; {', '.join(options.target_modules)} "
        f"adapted; median of {result['rounds'] * result['steps_per_round']} interleaved steps; load average "
        f"{result['loadavg'][0]} -> {result['loadavg'][1]}. Memory: adapter + AdamW state + peak step tensors, frozen "
        f"UNet weights excluded.\n\n"
    )
    return (text + measure.step_memory_table(result["rows"], list(options.reference))
            + measure.targets_text(result["targets"]))


def plot(result: dict[str, Any]) -> Any:
    size = "reduced" if result["reduced"] else "full-size"
    return measure.step_memory_plot(result["rows"],
                                    f"DreamBooth step on {result['unet']} UNet ({size}) — {result['device']}")


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the benchmark; returns the report that is also written to ``<output_dir>/dreambooth.json``."""
    import gsoft  # noqa: F401  (registers GSOFT with PEFT)

    options = parse_options(DreamboothOptions, "dreambooth", argv, __doc__,
                            device_of=lambda o: measure.resolve_device(o.device).type)
    device = measure.resolve_device(options.device)
    with measure.boft_fbd(options.boft_fbd), measure.cpu_threads(device, options.threads):
        result = run(options, device)
    table = markdown(result, options)
    print("\n" + table)
    report = {**measure.report_header("dreambooth", options, "diffusers"), **result}
    measure.write_outputs(options.output_dir, "dreambooth", table, report, plot(result) if options.plot else None)
    return report
