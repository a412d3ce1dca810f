"""Train-step time and peak memory of QGSOFT (GSOFT on a 4-bit base) against QLoRA and PEFT's OFT on the same base.

Usage::

    python recipes/benchmark.py quantized                   # configs/bench/quantized.yaml; 2 decoder layers on a CPU
    python recipes/benchmark.py quantized --layers 16 --batch_size 4 --seq_len 512      # a Llama-3.2-1B-sized run, GPU
    python recipes/benchmark.py quantized --quick           # seconds: a tiny decoder (tests)

The decoder is a ``LlamaForCausalLM`` built from ``model_configs[model]`` with random weights (nothing is downloaded;
timing and memory do not depend on the weights), saved once to a temporary directory and loaded for every method
the way QLoRA users load a model: ``from_pretrained(quantization_config=BitsAndBytesConfig(...))`` then
``peft.prepare_model_for_kbit_training``. Every method adapts the same layers (all attention and MLP projections).

Equal trainable budget: LoRA's rank is set from ``match_params`` (default ``gsoft``): the rank whose LoRA has as many
trainable parameters as that method (``lora_rank``: the nearest whole rank, at least 1). The table gives each method's
parameters, so the match can be read off.

One step: ``zero_grad``, causal-LM loss of a fixed random batch of ``batch_size x seq_len`` tokens, backward, AdamW
step. Measurements: median step wall time over interleaved rounds (every method in turn, so that machine noise hits
all alike), after ``warmup`` untimed steps; peak train memory above the frozen quantized weights = adapter state +
AdamW state + the peak tensor memory of one step (``measure.peak_step_bytes``: the CUDA allocator's peak, or the CPU
profiler's allocation events). Ratio columns divide by the ``reference`` methods; ``targets`` are reported as held
or MISSED.

Outputs in ``output_dir``: ``quantized.md``, ``quantized.json`` and ``quantized.png``.
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Sequence

import torch

from common.methods import METHODS, apply_method
from gsoft import plan

from . import measure
from .options import TrainStepOptions, parse_options

#: The quantization kinds: bitsandbytes 4-bit NormalFloat, 4-bit float, and 8-bit integers.
Quantization = Literal["nf4", "fp4", "int8"]


@dataclass
class QuantizedOptions(TrainStepOptions):
    """Options of the quantized-base benchmark (defaults: configs/bench/quantized.yaml)."""

    output_dir: str = field(default="outputs/bench_quantized", metadata={"help": "Where quantized.md/.json/.png go."})
    model: str = field(default="llama-1b", metadata={"help": "Key of model_configs."})
    model_configs: dict = field(default_factory=dict, metadata={"help": "LlamaConfig keyword arguments by name."})
    layers: Optional[int] = field(
        default=None, metadata={"help": "Decoder layers built (null: the config's num_hidden_layers)."}
    )
    quantization: Quantization = field(default="nf4", metadata={"help": "nf4, fp4 (4-bit) or int8."})
    double_quant: bool = field(default=True, metadata={"help": "4-bit: quantize the quantization constants too."})
    compute_dtype: Literal["auto", "float32", "bfloat16"] = field(
        default="auto", metadata={"help": "4-bit compute dtype (auto: bfloat16 on a GPU, float32 on a CPU)."}
    )
    methods: list[Literal[METHODS]] = field(
        default_factory=lambda: ["gsoft", "double_gsoft", "lora", "oft"],
        metadata={"help": f"Methods to run, in order (from {', '.join(m for m in METHODS if m != 'full')})."},
    )
    method_options: dict = field(default_factory=dict, metadata={"help": "Config options per method."})
    match_params: Optional[str] = field(
        default="gsoft",
        metadata={"help": "LoRA's rank gives it as many trainable parameters as this method (null: method_options)."},
    )
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata={"help": "Layers adapted by every method."},
    )
    batch_size: int = field(default=4, metadata={"help": "Sequences per step."})
    seq_len: int = field(default=512, metadata={"help": "Tokens per sequence."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "prepare_model_for_kbit_training's."})
    matrix_forms: Literal["device", "cuda"] = field(
        default="device",
        metadata={"help": "device: GS matrix forms by the run's device (gsoft.plan.matrix_form); cuda: the CUDA rules "
                          "on any device, so a CPU run measures the memory of the forms a GPU run uses."},
    )
    reference: dict = field(default_factory=lambda: {"lora": "lora"},
                            metadata={"help": "Ratio columns: {label: method}."})
    targets: dict = field(
        default_factory=lambda: {"method": "gsoft", "mem_vs_lora": 1.1},
        metadata={"help": "{method: name, <metric>: limit}: value <= limit, reported."},
    )

    def __post_init__(self) -> None:
        if self.model not in self.model_configs:
            raise ValueError(f"--model: unknown {self.model!r}; model_configs has {sorted(self.model_configs)}.")
        if "full" in self.methods:
            raise ValueError("--methods: 'full' cannot train a quantized base; choose adapter methods.")
        if self.match_params is not None and self.match_params not in self.methods:
            raise ValueError(f"--match_params {self.match_params!r} is not in --methods {self.methods}; add it, or "
                             "set --match_params null to take LoRA's rank from method_options.")
        super().__post_init__()


def quantization_config(options: QuantizedOptions, device: torch.device) -> Any:
    """The ``BitsAndBytesConfig`` every method's base is loaded with."""
    from transformers import BitsAndBytesConfig

    if options.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = options.compute_dtype
    if compute == "auto":
        compute = "bfloat16" if device.type == "cuda" else "float32"
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=options.quantization,
                              bnb_4bit_use_double_quant=options.double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, compute))


def save_base(options: QuantizedOptions, directory: str) -> dict[str, Any]:
    """Build the random full-precision decoder, save it to ``directory``; returns its config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(options.model_configs[options.model])
    if options.layers is not None:
        config["num_hidden_layers"] = options.layers
    torch.manual_seed(options.seed)
    LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(directory)
    return config


def load_base(directory: str, options: QuantizedOptions, device: torch.device) -> torch.nn.Module:
    """The quantized base, prepared as for QLoRA."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, quantization_config=quantization_config(options, device),
                                                 device_map={"": device}, dtype=torch.float32)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=options.gradient_checkpointing)


def lora_rank(target_params: int, base: torch.nn.Module, target_modules: Sequence[str]) -> int:
    """The LoRA rank whose adapters of ``target_modules`` have about ``target_params`` parameters: each adapted layer
    costs ``r * (in + out)``."""
    per_rank = sum(m.in_features + m.out_features for name, m in base.named_modules()
                   if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in target_modules)
    if per_rank == 0:
        raise ValueError(f"--target_modules {list(target_modules)} match no linear layer of the model.")
    return max(1, round(target_params / per_rank))


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_models(options: QuantizedOptions, directory: str,
                 device: torch.device) -> tuple[dict[str, torch.nn.Module], dict[str, dict[str, Any]]]:
    """One freshly loaded quantized base per method, adapted, and the options each was built with; LoRA is built
    last when its rank is matched to another method."""
    order = sorted(options.methods, key=lambda m: m == "lora" and options.match_params is not None)
    models: dict[str, torch.nn.Module] = {}
    used: dict[str, dict[str, Any]] = {}
    for method in order:
        method_opts = dict(options.method_options.get(method) or {})
        base = load_base(directory, options, device)
        if method == "lora" and options.match_params is not None:
            method_opts["r"] = lora_rank(trainable(models[options.match_params]), base, options.target_modules)
            method_opts.setdefault("lora_alpha", 2 * method_opts["r"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            models[method] = apply_method(base, method, list(options.target_modules), options=method_opts).train()
        used[method] = method_opts
    return {m: models[m] for m in options.methods}, used


@contextlib.contextmanager
def matrix_forms(options: QuantizedOptions, device: torch.device) -> Any:
    """With ``matrix_forms: cuda``, the device's form rules replaced by the CUDA ones while the block runs."""
    if options.matrix_forms == "device" or device.type == "cuda":
        yield
        return
    saved = (plan.DENSE_MAX.get(device.type), plan.GROUPED_MAX_BLOCK.get(device.type))
    plan.DENSE_MAX[device.type] = plan.DENSE_MAX["cuda"]
    plan.GROUPED_MAX_BLOCK[device.type] = plan.GROUPED_MAX_BLOCK["cuda"]
    try:
        yield
    finally:
        for table, value in zip((plan.DENSE_MAX, plan.GROUPED_MAX_BLOCK), saved):
            if value is None:
                table.pop(device.type, None)
            else:
                table[device.type] = value


def run(options: QuantizedOptions, device: torch.device) -> dict[str, Any]:
    """Every method's train step on the same quantized decoder, side by side."""
    with tempfile.TemporaryDirectory(prefix="gsoft-bench-quantized-") as directory:
        config = save_base(options, directory)
        frozen = load_base(directory, options, device)
        frozen_bytes = measure.model_bytes(frozen)
        base_params = sum(p.numel() for p in frozen.parameters())
        del frozen
        models, used = build_models(options, directory, device)
    g = torch.Generator().manual_seed(options.seed)
    ids = torch.randint(0, config["vocab_size"], (options.batch_size, options.seq_len), generator=g).to(device)
    opts = {m: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            for m, model in models.items()}

    def step(method: str, zero_grad: bool = True) -> None:
        if zero_grad:
            opts[method].zero_grad(set_to_none=True)
        models[method](input_ids=ids, labels=ids).loss.backward()
        opts[method].step()

    load_start = measure.load_average()
    measured = measure.train_step_rows(step, models, opts, options, frozen_bytes, device,
                                       f"{options.model}/{device.type}")
    rows = []
    for method, model in models.items():
        opts_text = ", ".join(f"{k}={v}" for k, v in used[method].items())
        rows.append({"method": method, "name": f"{method} ({opts_text})" if opts_text else method,
                     "trainable_params": trainable(model), **measured[method]})
    measure.add_ratios(rows, options.reference, {"step": "step_s", "mem": "peak_train_mem_bytes"}, key="method")
    return {
        "device": measure.device_label(device),
        "model": options.model,
        "model_config": config,
        "base_params": base_params,
        "frozen_bytes": frozen_bytes,
        "quantization": options.quantization,
        "matrix_forms": options.matrix_forms,
        "batch_size": options.batch_size,
        "seq_len": options.seq_len,
        "rounds": options.rounds,
        "steps_per_round": options.steps_per_round,
        "loadavg": [load_start, measure.load_average()],
        "rows": rows,
        "targets": measure.check_targets(rows, measure.target_specs(options.targets), key="method"),
    }


def markdown(result: dict[str, Any], options: QuantizedOptions) -> str:
    config = result["model_config"]
    size = (f"{config['num_hidden_layers']} layers, hidden {config['hidden_size']}, {result['base_params'] / 1e6:.0f}M "
            f"params, {measure.fmt_mib(result['frozen_bytes'])} MiB quantized")
    steps = result["rounds"] * result["steps_per_round"]
    text = (
        f"#### {result['model']} decoder, {result['quantization']} base ({size}) — {result['device']}\n\n"
        f"batch {result['batch_size']} x {result['seq_len']} tokens; {', '.join(options.target_modules)} adapted; GS "
        f"matrix forms of the {result['matrix_forms']} rules; median of {steps} interleaved steps; load average "
        f"{result['loadavg'][0]} -> {result['loadavg'][1]}. Memory: adapter + AdamW state + peak step tensors, frozen "
        "quantized weights excluded.\n\n"
    )
    return (text + measure.step_memory_table(result["rows"], list(options.reference))
            + measure.targets_text(result["targets"]))


def plot(result: dict[str, Any]) -> Any:
    return measure.step_memory_plot(
        result["rows"], f"Train step on a {result['quantization']} {result['model']} decoder — {result['device']}")


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the benchmark; returns the report that is also written to ``<output_dir>/quantized.json``."""
    import gsoft  # noqa: F401  (registers GSOFT with PEFT)

    options = parse_options(QuantizedOptions, "quantized", argv, __doc__,
                            device_of=lambda o: measure.resolve_device(o.device).type)
    device = measure.resolve_device(options.device)
    with measure.cpu_threads(device, options.threads), matrix_forms(options, device):
        result = run(options, device)
    table = markdown(result, options)
    print("\n" + table)
    report = {**measure.report_header("quantized", options, "transformers", "bitsandbytes"), **result}
    measure.write_outputs(options.output_dir, "quantized", table, report, plot(result) if options.plot else None)
    return report
