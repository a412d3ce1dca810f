"""Speed and memory of GSOFT / Double GSOFT against PEFT's LoRA, OFT and BOFT on RoBERTa-sized encoders.

Usage::

    python recipes/benchmark.py adapters                      # configs/bench/adapters.yaml
    python recipes/benchmark.py adapters --quick              # smoke test, well under a minute on a CPU
    python recipes/benchmark.py adapters --models roberta-base --layers 12 --methods gsoft,lora,oft
    python recipes/benchmark.py adapters --devices cuda --autocast bf16 --methods base,gsoft,gsoft_triton,lora

Models are built from a ``RobertaConfig`` with random weights (nothing is downloaded): a RoBERTa-base-sized encoder
(hidden 768, 12 layers, 12 heads, intermediate 3072) and a MiniLM-sized one (hidden 384, 12 layers, 12 heads,
intermediate 1536), each a ``RobertaForSequenceClassification``. Every method adapts the same layers (all attention
and MLP linears of the encoder, a full-match regex that leaves the classification head alone) and every method trains
the classification head too (PEFT ``modules_to_save``); the ``base`` row trains only the head. All methods run side
by side in one process, on one fixed random batch of ``batch_size x seq_len`` tokens.

* **params**: trainable adapter parameters (the classifier head, the same for all methods, is reported separately).
* **step time**: one ``zero_grad -> forward -> loss.backward() -> AdamW.step()``, wall clock (synchronised on a GPU),
  after ``warmup`` untimed steps, in interleaved rounds (``for round: for method: steps_per_round steps``) so that
  machine noise hits every method alike; the table shows the median. In the ``base`` row nothing below the head
  trains, so its backward stops at the head: it is ~ the forward cost.
* **peak train memory**: what a train step needs on top of the frozen base weights (identical for every method and
  excluded): adapter state (every parameter and buffer the adapter adds: trainable weights, the copied head, BOFT's
  permutation matrices, ...) + AdamW state + the peak tensor bytes of one steady-state step
  (``measure.peak_step_bytes``: the CUDA allocator's peak, or the CPU profiler's allocation events). The profiled
  step is not timed.
* **unmerged / merged inference**: ``model.eval()`` forward under ``torch.no_grad`` with the adapter active, and the
  same after ``merge_and_unload()`` on a deep copy (should match ``base``); ``merge err`` is the largest |logit
  difference| between the two (fp32, without autocast: it checks the merge, not the rounding).

Two cost proxies that need no GPU and no timer (``costs: true``; the second table of each model), exact and
reproducible, so that ``tests/test_costs.py`` can hold them:

* **ops/step**: aten ops dispatched in one steady-state train step (``measure.count_ops``) after at least 2 untimed
  steps, with the foreach AdamW (the GPU default) on every device, so that a CPU count equals the GPU count of the
  torch path; a custom op (gsoft's fused Triton kernels) counts as one. On a GPU every op is at least one kernel
  launch plus host work, so a method that dispatches many more ops than LoRA is host-bound there. Counted on the
  run's device and batch (an adapter may pick its plan by the number of token rows). **adapter ops** = ops minus the
  ``base`` row's, also per adapted layer; **ops ×lora** = adapter ops / LoRA's.
* **memory proxy**: ``measure.saved_tensor_bytes`` of one forward (dropout off, frozen weights excluded) + 3 x the
  trainable parameter bytes (weights, AdamW moments): what a train step's memory grows with the batch.

Precision: ``autocast`` (``none``, ``bf16`` or ``fp16``) wraps every forward in ``torch.autocast``; weights and
optimizer state stay fp32 and the backward runs outside the context, as in mixed-precision training (no gradient
scaler: a benchmark times steps, it does not need the fp16 loss to converge).

Ratio columns divide each method's step time, peak memory, adapter ops and memory proxy by those of the ``reference``
methods. ``targets`` (for ``targets.method``) and the ``targets`` of a method entry are printed under the tables as
held or MISSED: the benchmark measures, tests assert.

CPU defaults (``device_overrides.cpu``): 2 of the 12 layers (one BOFT step costs ~10 s per RoBERTa-base layer on a
CPU; per-layer costs do not depend on depth) and 1 thread (on a shared 2-core machine OpenMP threads stall whenever
another process holds a core, which hurts methods made of many small ops the most). Override with
``--layers 12 --threads 2``.

Outputs in ``output_dir``: ``adapters.md`` (the tables), ``adapters.json`` (every sample, cost proxies, targets,
options, versions, device names) and ``adapters.png`` (step time and peak memory per device, model and method).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Literal, Optional, Sequence

import torch

from . import measure
from .options import BenchOptions, parse_options

logger = logging.getLogger("bench.adapters")

#: ``autocast`` choices and the dtype ``torch.autocast`` runs the forward in (``none``: plain fp32).
Autocast = Literal["none", "bf16", "fp16"]
AUTOCAST_DTYPES: dict[str, Optional[torch.dtype]] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: Method entry types (``method_specs[*].type``).
METHOD_TYPES = ("base", "gsoft", "lora", "oft", "boft")
#: Ratio column prefix -> the row field it divides (``<prefix>_vs_<label>`` = ours / the reference method's).
RATIO_FIELDS = {"step": "step_s", "mem": "peak_train_mem_bytes", "ops": "adapter_ops_per_step",
                "mem_proxy": "mem_proxy_bytes"}


@dataclass
class AdaptersOptions(BenchOptions):
    """Options of the adapter benchmark (defaults: configs/bench/adapters.yaml)."""

    output_dir: str = field(default="outputs/bench_adapters", metadata={"help": "Where adapters.md/.json/.png go."})
    model_configs: dict = field(
        default_factory=dict,
        metadata={"help": "Encoder sizes by name (RobertaConfig: hidden_size, num_hidden_layers, num_attention_heads, "
                          "intermediate_size, vocab_size)."},
    )
    models: list[str] = field(default_factory=list, metadata={"help": "Names of model_configs to run, in order."})
    layers: Optional[int] = field(
        default=None, metadata={"help": "Encoder depth to build (null: each model's num_hidden_layers)."}
    )
    dropout: float = field(default=0.1, metadata={"help": "Hidden and attention dropout of the encoder."})
    batch_size: int = field(default=8, metadata={"help": "Sequences per step."})
    seq_len: int = field(default=128, metadata={"help": "Tokens per sequence."})
    lr: float = field(default=1e-4, metadata={"help": "AdamW learning rate of the trainable parameters."})
    warmup: int = field(default=1, metadata={"help": "Untimed train steps per method before the first round."})
    rounds: int = field(default=5, metadata={"help": "Interleaved timing rounds (a method entry may ask for fewer)."})
    steps_per_round: int = field(
        default=2, metadata={"help": "Timed train steps per method and round (a method entry may ask for fewer)."}
    )
    infer_rounds: int = field(default=3, metadata={"help": "Interleaved inference rounds (unmerged and merged)."})
    memory: bool = field(default=True, metadata={"help": "Measure peak train memory (one profiled step per method)."})
    costs: bool = field(default=True, metadata={"help": "Measure ops/step and the saved-tensor memory proxy."})
    autocast: Autocast = field(
        default="none", metadata={"help": "Run every forward under torch.autocast in this dtype (none: fp32)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the weights and the batch."})
    threads: Optional[int] = field(
        default=None, metadata={"help": "torch.set_num_threads on the CPU (null: torch's default)."}
    )
    devices: list[measure.DeviceName] = field(
        default_factory=lambda: ["auto"], metadata={"help": "cpu, cuda or auto (cpu, plus cuda when available)."}
    )
    target_modules: str = field(
        default=r".*\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense"
                r"|output\.dense)",
        metadata={"help": "Full-match regex of the adapted linears (the same for every method)."},
    )
    head: str = field(
        default="classifier", metadata={"help": "Module trained in full by every method (modules_to_save)."}
    )
    method_specs: list[dict] = field(
        default_factory=list,
        metadata={"help": "Method entries: {key, name, type (base|gsoft|lora|oft|boft), args (PEFT config), "
                          "enabled, rounds, steps_per_round, boft_fbd (torch|peft), targets}."},
    )
    methods: list[str] = field(
        default_factory=list,
        metadata={"help": "Keys of method_specs to run (also disabled ones); empty: every enabled entry."},
    )
    reference: dict = field(
        default_factory=dict, metadata={"help": "Ratio columns: {label: method key}, e.g. {lora: lora}."}
    )
    targets: dict = field(
        default_factory=dict, metadata={"help": "{method: key, <metric>: limit}: value <= limit, reported."}
    )
    device_overrides: dict = field(default_factory=dict, metadata={"help": "Options per device type (cpu, cuda)."})
    verbose: bool = field(default=False, metadata={"help": "Log why a method failed (with the traceback)."})

    def __post_init__(self) -> None:
        unknown = [m for m in self.models if m not in self.model_configs]
        if unknown:
            raise ValueError(f"--models: unknown {unknown}; model_configs has {sorted(self.model_configs)}.")
        keys = [m.get("key") for m in self.method_specs]
        unknown = [m for m in self.methods if m not in keys]
        if unknown:
            raise ValueError(f"--methods: unknown {unknown}; method_specs has {keys}.")
        for spec in self.method_specs:
            if spec.get("type") not in METHOD_TYPES:
                raise ValueError(f"method_specs entry {spec.get('key')!r}: type {spec.get('type')!r} is not one of "
                                 f"{', '.join(METHOD_TYPES)}.")
            if spec.get("boft_fbd", "torch") not in measure.BOFT_FBD_MODES:
                raise ValueError(f"method_specs entry {spec['key']!r}: boft_fbd must be one of "
                                 f"{', '.join(measure.BOFT_FBD_MODES)}, got {spec['boft_fbd']!r}.")
        resolve_devices(self.devices)  # --devices cuda without a GPU fails here, naming the fix

    def selected_methods(self) -> list[dict[str, Any]]:
        """The named entries (disabled ones too), or every enabled one; in method_specs order."""
        if self.methods:
            return [m for m in self.method_specs if m["key"] in self.methods]
        return [m for m in self.method_specs if m.get("enabled", True)]


def resolve_devices(names: Sequence[str]) -> list[torch.device]:
    """``auto`` = the CPU, plus CUDA when available; otherwise the named devices (CUDA must exist)."""
    if list(names) == ["auto"]:
        return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return [measure.resolve_device(name) for name in names]


# ======================================================================================================================
# Models and adapters
# ======================================================================================================================
def build_base_model(spec: dict[str, Any], *, layers: Optional[int], seq_len: int, dropout: float,
                     seed: int) -> torch.nn.Module:
    """A frozen ``RobertaForSequenceClassification`` of the ``spec`` sizes with random weights."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    config = RobertaConfig(
        hidden_size=spec["hidden_size"],
        num_hidden_layers=layers or spec["num_hidden_layers"],
        num_attention_heads=spec["num_attention_heads"],
        intermediate_size=spec["intermediate_size"],
        vocab_size=spec.get("vocab_size", 50265),
        max_position_embeddings=max(514, seq_len + 2),
        type_vocab_size=1,
        pad_token_id=1,
        num_labels=2,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    torch.manual_seed(seed)
    return RobertaForSequenceClassification(config).requires_grad_(False)


def make_batch(spec: dict[str, Any], batch_size: int, seq_len: int, seed: int,
               device: torch.device) -> dict[str, torch.Tensor]:
    """A fixed random batch of token ids and labels."""
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(3, spec.get("vocab_size", 50265), (batch_size, seq_len), generator=g)
    labels = torch.randint(0, 2, (batch_size,), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device)}


def build_method_model(base: torch.nn.Module, method: dict[str, Any], target_modules: str,
                       head: str) -> torch.nn.Module:
    """A deep copy of ``base`` with the method's adapter (for ``base``: only the head trainable)."""
    import peft
    from peft import get_peft_model

    import gsoft

    model = copy.deepcopy(base)
    kind = method["type"]
    if kind == "base":
        model.requires_grad_(False)
        model.get_submodule(head).requires_grad_(True)
        return model
    config_cls = {"gsoft": gsoft.GSOFTConfig, "lora": peft.LoraConfig, "oft": peft.OFTConfig,
                  "boft": peft.BOFTConfig}[kind]
    config = config_cls(target_modules=target_modules, modules_to_save=[head], **(method.get("args") or {}))
    gsoft_logger = logging.getLogger("gsoft")
    level = gsoft_logger.level
    gsoft_logger.setLevel(logging.ERROR)  # the "not dense" notice: the table reports the structure itself
    try:
        with warnings.catch_warnings(), (measure.boft_fbd(method.get("boft_fbd", "torch")) if kind == "boft"
                                         else contextlib.nullcontext()):
            warnings.simplefilter("ignore", FutureWarning)
            return get_peft_model(model, config)
    finally:
        gsoft_logger.setLevel(level)


def count_params(model: torch.nn.Module, head: str) -> dict[str, int]:
    """Trainable parameters, split into the adapter and the (fully trained) classification head."""
    adapter = head_n = 0
    head_re = re.compile(rf"(^|\.){re.escape(head)}(\.|$)")
    for name, p in model.named_parameters():
        if p.requires_grad:
            if head_re.search(name):
                head_n += p.numel()
            else:
                adapter += p.numel()
    return {"adapter": adapter, "head": head_n, "trainable": adapter + head_n}


def adapted_linears(base: torch.nn.Module, target_modules: str) -> list[torch.nn.Linear]:
    """The linears that ``target_modules`` (a full-match regex) selects."""
    pattern = re.compile(target_modules)
    return [m for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and pattern.fullmatch(n)]


def adapted_layer_count(base: torch.nn.Module, target_modules: str) -> int:
    """The denominator of the per-layer op counts."""
    return len(adapted_linears(base, target_modules))


def expected_gsoft_params(base: torch.nn.Module, method: dict[str, Any], target_modules: str) -> int:
    """``sum over adapted layers of gs_param_count(in) [+ gs_param_count(out) if double] [+ out if scaling]``."""
    from gsoft import gs

    args = method.get("args") or {}
    total = 0
    for module in adapted_linears(base, target_modules):
        sides = [module.in_features] + ([module.out_features] if args.get("double", False) else [])
        for n in sides:
            b, r = gs.resolve_blocks(n, args.get("block_size"), args.get("n_blocks"))
            total += gs.gs_param_count(n, b, gs.resolve_n_factors(args.get("n_factors", 2), r, b))
        if args.get("scaling", True):
            total += module.out_features
    return total


# ======================================================================================================================
# One train step and its costs
# ======================================================================================================================
def autocast_dtype(mode: Optional[str]) -> Optional[torch.dtype]:
    """The dtype of an ``autocast`` setting (None for ``none``); an unknown setting names the choices."""
    key = "none" if mode is None else str(mode).lower()
    if key not in AUTOCAST_DTYPES:
        raise ValueError(f"Unknown autocast {mode!r}; use one of {sorted(AUTOCAST_DTYPES)} (e.g. --autocast bf16).")
    return AUTOCAST_DTYPES[key]


def autocast_context(device: torch.device, mode: Optional[str]) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for a forward on ``device``, or nothing for ``none`` (plain fp32)."""
    dtype = autocast_dtype(mode)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def precision_label(mode: Optional[str]) -> str:
    return "fp32" if autocast_dtype(mode) is None else f"autocast {str(mode).lower()}"


def loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], autocast: Optional[str] = None) -> torch.Tensor:
    """The classification loss of one forward, under autocast when asked."""
    with autocast_context(batch["input_ids"].device, autocast):
        return model(**batch).loss


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
               autocast: Optional[str] = None, zero_grad: bool = True) -> None:
    """``zero_grad -> forward -> backward -> step``; only the forward runs under autocast (mixed precision)."""
    if zero_grad:
        opt.zero_grad(set_to_none=True)
    loss(model, batch, autocast).backward()
    opt.step()


def count_step_ops(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
                   autocast: Optional[str] = None, untimed_steps: int = 2,
                   warm_batch: Optional[dict[str, torch.Tensor]] = None) -> int:
    """aten ops of one steady-state train step (zero_grad, forward, backward, foreach AdamW step).

    ``untimed_steps`` uncounted steps come first so that the optimizer state exists; they run on ``warm_batch``
    (default: ``batch``), which may be small: the state does not depend on the batch, the count may (an adapter can
    pick its plan by the number of rows). The model's parameters move: count on a model whose weights do not matter."""
    with measure.foreach_optimizer(opt):
        for _ in range(untimed_steps):
            train_step(model, opt, batch if warm_batch is None else warm_batch, autocast)
        ops = measure.count_ops(lambda: train_step(model, opt, batch, autocast))
    opt.zero_grad(set_to_none=True)
    return ops


def measure_costs(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
                  autocast: Optional[str] = None, untimed_steps: int = 2) -> dict[str, int]:
    """Both cost proxies of one model: ops per train step and the memory proxy (saved tensors + trainable state)."""
    ops = count_step_ops(model, opt, batch, autocast, untimed_steps)
    saved = measure.saved_tensor_bytes(model, lambda: loss(model, batch, autocast))
    state = measure.trainable_state_bytes(model)
    return {"ops_per_step": ops, "saved_bytes": saved, "trainable_state_bytes": state, "mem_proxy_bytes": saved + state}


def merge_and_unload_copy(model: torch.nn.Module) -> tuple[torch.nn.Module, Optional[str]]:
    """``merge_and_unload()`` on a deep copy; returns ``(merged_model, note)``.

    PEFT 0.21.2's generic ``BaseTuner._replace_module`` (used by OFT and BOFT, not LoRA) fails to unload a
    ``modules_to_save`` head without a ``.weight`` (``RobertaClassificationHead``). Then each
    ``ModulesToSaveWrapper`` is swapped for its trained copy first (what unloading does with it) and the merge runs
    again; the note says so in the row.
    """
    merged = copy.deepcopy(model)
    if not hasattr(merged, "merge_and_unload"):
        return merged, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return merged.merge_and_unload(), None
        except AttributeError as exc:
            if "has no attribute 'weight'" not in str(exc):
                raise
            from peft.utils.other import ModulesToSaveWrapper

            merged = copy.deepcopy(model)
            for name, module in list(merged.named_modules()):
                if isinstance(module, ModulesToSaveWrapper):
                    parent_name, _, child = name.rpartition(".")
                    parent = merged.get_submodule(parent_name) if parent_name else merged
                    setattr(parent, child, module.modules_to_save[module.active_adapters[0]])
            note = ("merge_and_unload: PEFT 0.21.2 fails to unload the modules_to_save head (no .weight); "
                    "head unwrapped manually before merging")
            return merged.merge_and_unload(), note


# ======================================================================================================================
# One model on one device
# ======================================================================================================================
def _short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ").replace("|", "/")
    return text if len(text) <= 160 else text[:157] + "..."


class _Run:
    """The methods of one model being measured: their rows, models and optimizers; a method whose train step fails
    stops being measured (its row keeps the error and what was measured before)."""

    def __init__(self, base: torch.nn.Module, options: AdaptersOptions, device: torch.device) -> None:
        self.options = options
        self.rows: list[dict[str, Any]] = []
        self.by_key: dict[str, dict[str, Any]] = {}
        self.entries: dict[str, dict[str, Any]] = {}
        for method in options.selected_methods():
            row = {"key": method["key"], "name": method["name"], "type": method["type"],
                   "args": method.get("args") or {}, "error": None, "phase_errors": {}, "notes": []}
            if method["type"] == "boft":
                row["boft_fbd"] = method.get("boft_fbd", "torch")
            self.rows.append(row)
            self.by_key[method["key"]] = row
            try:
                model = self._build(base, method, row).to(device).train()
                opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=options.lr)
                self.entries[method["key"]] = {"model": model, "opt": opt, "merged": None}
            except Exception as exc:  # a broken method becomes a table row, not a crash
                row["error"] = _short_error(exc)
                logger.debug("building %s failed", method["key"], exc_info=True)
        self.live = list(self.entries)

    def _build(self, base: torch.nn.Module, method: dict[str, Any], row: dict[str, Any]) -> torch.nn.Module:
        options = self.options
        model = build_method_model(base, method, options.target_modules, options.head)
        row["params"] = count_params(model, options.head)
        if method["type"] == "gsoft":
            row["expected_adapter_params"] = expected_gsoft_params(base, method, options.target_modules)
            row["param_formula_ok"] = row["expected_adapter_params"] == row["params"]["adapter"]
        if method["type"] == "boft":
            row["boft_butterfly_factors_used"] = factors = measure.boft_factors_used(model)
            asked = (method.get("args") or {}).get("boft_n_butterfly_factor", 1)
            if factors and factors != [asked]:
                row["notes"].append(f"PEFT used boft_n_butterfly_factor={factors} instead of {asked} (no fbd_cuda)")
        return model

    def attempt(self, key: str, phase: str, fn: Callable[[], Any], fatal: bool = True) -> Any:
        """``fn()``; an exception is recorded in the row (and, if ``fatal``, ends the method's measurements)."""
        try:
            return fn()
        except Exception as exc:
            self.failed(key, exc, phase, fatal)
            return None

    def failed(self, key: str, exc: BaseException, phase: str = "train", fatal: bool = True) -> None:
        self.by_key[key]["phase_errors"][phase] = _short_error(exc)
        logger.debug("%s: %s failed", key, phase, exc_info=exc)
        if fatal and key in self.live:
            self.live.remove(key)


def bench_model(model_name: str, spec: dict[str, Any], options: AdaptersOptions,
                device: torch.device) -> dict[str, Any]:
    """Every measurement of one model on one device, the methods side by side."""
    load_start = measure.load_average()
    started = time.perf_counter()
    base = build_base_model(spec, layers=options.layers, seq_len=options.seq_len, dropout=options.dropout,
                            seed=options.seed)
    autocast = options.autocast
    print(f"\n== {model_name} on {measure.device_label(device)}: hidden {spec['hidden_size']}, "
          f"{base.config.num_hidden_layers} of {spec['num_hidden_layers']} layers, {spec['num_attention_heads']} "
          f"heads, intermediate {spec['intermediate_size']}; batch {options.batch_size} x seq {options.seq_len}; "
          f"{precision_label(autocast)}; load average {load_start}", flush=True)
    batch = make_batch(spec, options.batch_size, options.seq_len, options.seed, device)
    run = _Run(base, options, device)
    print(f"   built {len(run.live)}/{len(run.rows)} methods in {time.perf_counter() - started:.1f}s", flush=True)
    print_param_counts(run.rows)
    methods = {m["key"]: m for m in options.selected_methods()}
    rounds = {k: max(1, min(options.rounds, methods[k].get("rounds", options.rounds))) for k in run.live}
    per_round = {k: max(1, min(options.steps_per_round, methods[k].get("steps_per_round", options.steps_per_round)))
                 for k in run.live}
    phases = options.warmup + int(options.memory) + int(options.costs) + 1 + 2 * options.infer_rounds
    bar = measure.progress(len(run.live) * phases + sum(rounds[k] * per_round[k] for k in run.live),
                           f"{model_name}/{device.type}")

    def each(phase: str, fn: Callable[[str, dict[str, Any], dict[str, Any]], None]) -> None:
        for key in list(run.live):
            bar.set_postfix_str(f"{phase} {key}")
            fn(key, run.entries[key], run.by_key[key])
            bar.update()

    # warm-up, interleaved too (first-call costs, allocator growth, AdamW state creation)
    for _ in range(options.warmup):
        each("warmup", lambda k, e, r: run.attempt(k, "train", lambda: train_step(e["model"], e["opt"], batch,
                                                                                  autocast)))
    frozen_bytes = measure.model_bytes(base)
    if options.memory:  # one profiled, untimed, steady-state train step per method
        def memory(key: str, entry: dict[str, Any], row: dict[str, Any]) -> None:
            model, opt = entry["model"], entry["opt"]
            step = lambda: train_step(model, opt, batch, autocast, zero_grad=False)  # noqa: E731
            row.update(run.attempt(key, "memory", lambda: measure.peak_train_memory(step, model, opt, frozen_bytes,
                                                                                    device), fatal=False) or {})

        each("memory", memory)
    if options.costs:  # ops per train step and the saved-tensor memory proxy (untimed)
        done = options.warmup + int(options.memory)  # optimizer steps every live method has taken

        def costs(key: str, entry: dict[str, Any], row: dict[str, Any]) -> None:
            entry["opt"].zero_grad(set_to_none=True)
            row.update(run.attempt(key, "costs", lambda: measure_costs(
                entry["model"], entry["opt"], batch, autocast, untimed_steps=max(0, 2 - done)), fatal=False) or {})
            gc.collect()

        each("costs", costs)
    steps = {k: (lambda e=run.entries[k]: train_step(e["model"], e["opt"], batch, autocast)) for k in run.live}
    train_samples = measure.interleaved_times(steps, device, rounds, per_round, bar, failed=run.failed)
    infer_batch = {k: v for k, v in batch.items() if k != "labels"}

    def merge(key: str, entry: dict[str, Any], row: dict[str, Any]) -> None:
        entry["opt"].zero_grad(set_to_none=True)
        entry["model"].eval()

        def merged_copy() -> torch.nn.Module:
            merged, note = merge_and_unload_copy(entry["model"])
            row["notes"] += [note] if note else []
            merged.eval()
            with torch.no_grad():
                a = entry["model"](**infer_batch).logits.float()
                b = merged(**infer_batch).logits.float()
            row["merge_max_abs_err"] = (a - b).abs().max().item()
            row["logit_max_abs"] = a.abs().max().item()
            return merged

        entry["merged"] = run.attempt(key, "merge", merged_copy, fatal=False)

    each("merge", merge)
    infer: dict[str, list[float]] = {f"{k}/{which}": [] for k in run.live for which in ("unmerged", "merged")}
    for _ in range(options.infer_rounds):
        for which in ("unmerged", "merged"):
            def forward(key: str, entry: dict[str, Any], row: dict[str, Any], which: str = which) -> None:
                model = entry["model"] if which == "unmerged" else entry["merged"]
                if model is None:
                    return

                def fwd() -> None:
                    with torch.no_grad(), autocast_context(device, autocast):
                        model(**infer_batch)

                dt = run.attempt(key, f"infer_{which}", lambda: measure.timed(fwd, device), fatal=False)
                infer[f"{key}/{which}"] += [] if dt is None else [dt]

            each(f"infer {which}", forward)
    bar.close()

    for key in run.entries:  # whatever was measured, also before a method failed
        row = run.by_key[key]
        for name, samples in (("step", train_samples.get(key)), ("infer_unmerged", infer.get(f"{key}/unmerged")),
                              ("infer_merged", infer.get(f"{key}/merged"))):
            if samples:
                row[f"{name}_s"] = measure.summary(samples)
                row[f"{name}_samples_s"] = samples
        if row["phase_errors"]:
            row["error"] = "; ".join(f"{phase}: {err}" for phase, err in row["phase_errors"].items())
    adapted = adapted_layer_count(base, options.target_modules)
    add_cost_columns(run.rows, adapted)
    measure.add_ratios(run.rows, options.reference, RATIO_FIELDS)
    result = {
        "model": model_name,
        "spec": spec,
        "layers_built": base.config.num_hidden_layers,
        "batch_size": options.batch_size,
        "seq_len": options.seq_len,
        "autocast": autocast,
        "adapted_layers": adapted,
        "costs_device": device.type if options.costs else None,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "base_model_bytes": frozen_bytes,
        "load_average_start": load_start,
        "load_average_end": measure.load_average(),
        "rows": run.rows,
        "targets": measure.check_targets(run.rows, measure.target_specs(options.targets, options.method_specs)),
    }
    run.entries.clear()
    gc.collect()
    return result


def add_cost_columns(rows: list[dict[str, Any]], adapted_layers: int) -> None:
    """``adapter_ops_per_step`` (ops minus the ``base`` row's, which trains only the head) and the same per adapted
    layer; left out when the run has no ``base`` row or a method has no op count."""
    base = next((r for r in rows if r["type"] == "base" and r.get("ops_per_step") is not None), None)
    if base is None:
        return
    for row in rows:
        if row.get("ops_per_step") is not None:
            row["adapter_ops_per_step"] = row["ops_per_step"] - base["ops_per_step"]
            row["adapter_ops_per_layer"] = row["adapter_ops_per_step"] / adapted_layers if adapted_layers else None


# ======================================================================================================================
# Reporting
# ======================================================================================================================
def print_param_counts(rows: list[dict[str, Any]]) -> None:
    print("   trainable parameters (adapter only; the classifier head is trained by every method):")
    for row in rows:
        if row.get("error"):
            print(f"     {row['name']:<42} ERROR {row['error']}")
            continue
        extra = ""
        if "expected_adapter_params" in row:
            extra = (f"  (gs_param_count formula: {row['expected_adapter_params']:,}, "
                     f"{'match' if row['param_formula_ok'] else 'MISMATCH'})")
        if row.get("boft_butterfly_factors_used"):
            extra += f"  (butterfly factors actually used: {row['boft_butterfly_factors_used']})"
        print(f"     {row['name']:<42} {row['params']['adapter']:>12,}  head {row['params']['head']:,}{extra}",
              flush=True)


def _is_cost_metric(metric: str) -> bool:
    return metric.startswith(("ops_", "mem_proxy_"))


def model_tables(result: dict[str, Any], device_name: str, options: AdaptersOptions) -> str:
    """The speed and memory table of one model, its notes and targets, then its cost table."""
    spec, refs = result["spec"], list(options.reference)
    threads = f"; {result['threads']} CPU thread(s)" if result.get("threads") else ""
    text = (
        f"### {result['model']} — {device_name} — {precision_label(result['autocast'])}\n\n"
        f"hidden {spec['hidden_size']}, {result['layers_built']} of {spec['num_hidden_layers']} layers, "
        f"{spec['num_attention_heads']} heads, intermediate {spec['intermediate_size']}; batch "
        f"{result['batch_size']} x seq {result['seq_len']}; medians of interleaved rounds "
        f"(n = timed steps per method){threads}; load average {result['load_average_start']} -> "
        f"{result['load_average_end']}. Memory: adapter state + AdamW state + peak step tensors, frozen "
        f"weights ({result['base_model_bytes'] / measure.MiB:.0f} MiB) excluded.\n\n"
    )
    header = ["method", "adapter params", "step ms (n)", *[f"step ×{k}" for k in refs], "peak train MiB", "mem ×lora",
              "infer unmerged ms", "infer merged ms", "merge err"]
    cells = []
    for row in result["rows"]:
        if row.get("error") and "step_s" not in row:
            cells.append([row["name"], f"ERROR: {row['error']}"] + [""] * (len(header) - 2))
            continue
        rel = row.get("relative") or {}
        cells.append([
            row["name"] + (f" (error: {row['error']})" if row.get("error") else ""),
            f"{row['params']['adapter']:,}",
            f"{measure.fmt_ms(row.get('step_s', {}).get('median'))} ({row.get('step_s', {}).get('n', 0)})",
            *[measure.fmt_ratio(rel.get(f"step_vs_{k}")) for k in refs],
            measure.fmt_mib(row.get("peak_train_mem_bytes")),
            measure.fmt_ratio(rel.get("mem_vs_lora")),
            measure.fmt_ms(row.get("infer_unmerged_s", {}).get("median")),
            measure.fmt_ms(row.get("infer_merged_s", {}).get("median")),
            "-" if row.get("merge_max_abs_err") is None else f"{row['merge_max_abs_err']:.1e}",
        ])
    text += measure.markdown_table(header, cells)
    notes: dict[str, list[str]] = {}
    for row in result["rows"]:
        for note in row.get("notes") or []:
            notes.setdefault(note, []).append(row["name"])
    for note, names in notes.items():
        text += f"\nNote ({', '.join(names)}): {note}.\n"
    text += measure.targets_text([t for t in result["targets"] if not _is_cost_metric(t["metric"])])
    if any(row.get("ops_per_step") is not None or row.get("mem_proxy_bytes") is not None for row in result["rows"]):
        text += "\n" + cost_table(result)
        text += measure.targets_text([t for t in result["targets"] if _is_cost_metric(t["metric"])])
    return text


def cost_table(result: dict[str, Any]) -> str:
    """The cost proxies of one model: ops per train step (total, adapter, per adapted layer, ×lora) and the memory
    proxy (saved tensors + trainable state, ×lora)."""
    title = (
        f"Cost proxies — {result['model']}, {precision_label(result['autocast'])}: aten ops dispatched per train "
        f"step (forward, backward, foreach AdamW step; counted on the {result['costs_device']}); adapter ops = ops − "
        f"the base row's, per adapted layer = / {result['adapted_layers']} adapted linears. Memory proxy = bytes "
        f"autograd saves in one forward (distinct storages, dropout off, frozen weights excluded) + 3 × trainable "
        f"parameter bytes (weights, AdamW moments).\n\n"
    )
    header = ["method", "ops/step", "adapter ops/step", "per adapted layer", "ops ×lora", "saved MiB", "state MiB",
              "mem proxy MiB", "mem proxy ×lora"]
    cells = []
    for row in result["rows"]:
        rel = row.get("relative") or {}
        per_layer = row.get("adapter_ops_per_layer")
        cells.append([
            row["name"],
            measure.fmt_int(row.get("ops_per_step")),
            measure.fmt_int(row.get("adapter_ops_per_step")),
            "-" if per_layer is None else f"{per_layer:.1f}",
            measure.fmt_ratio(rel.get("ops_vs_lora")),
            measure.fmt_mib(row.get("saved_bytes")),
            measure.fmt_mib(row.get("trainable_state_bytes")),
            measure.fmt_mib(row.get("mem_proxy_bytes")),
            measure.fmt_ratio(rel.get("mem_proxy_vs_lora")),
        ])
    return title + measure.markdown_table(header, cells)


def plot(report: dict[str, Any]) -> Any:
    """Step time (median, IQR) and, when measured, peak train memory per method; a row per device and model."""
    panels = [(device["name"], res) for device in report["devices"].values() for res in device["models"].values()]
    memory = any(r.get("peak_train_mem_bytes") is not None for _, res in panels for r in res["rows"])
    fig, axes = measure.subplots(len(panels), 1 + memory, 6.5 * (1 + memory), 3.6 * len(panels))
    for (device_name, res), ax_row in zip(panels, axes):
        rows = [r for r in res["rows"] if "step_s" in r]
        names = [r["name"] for r in rows]
        med = [1000 * r["step_s"]["median"] for r in rows]
        iqr = ([1000 * (r["step_s"]["median"] - r["step_s"]["p25"]) for r in rows],
               [1000 * (r["step_s"]["p75"] - r["step_s"]["median"]) for r in rows])
        where = f"{res['model']} ({res['layers_built']} layers), {device_name}"
        measure.bar_panel(ax_row[0], names, med, "train step, ms (median, IQR)", f"{where} — step time", errors=iqr)
        if memory:
            measure.bar_panel(ax_row[1], names, [(r.get("peak_train_mem_bytes") or 0) / measure.MiB for r in rows],
                              "peak train memory above frozen weights, MiB", f"{where} — peak memory",
                              color="tab:orange")
    fig.suptitle("PEFT adapters side by side", fontsize=11)
    return fig


# ======================================================================================================================
# Main
# ======================================================================================================================
def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the benchmark; returns the report that is also written to ``<output_dir>/adapters.json``."""
    options = parse_options(AdaptersOptions, "adapters", argv, __doc__)
    logging.basicConfig(level=logging.DEBUG if options.verbose else logging.WARNING, format="%(name)s: %(message)s")
    import gsoft  # noqa: F401 - registers GSOFT with PEFT

    devices = resolve_devices(options.devices)
    started = time.perf_counter()
    report = {**measure.report_header("adapters", options), "devices": {}}
    tables: list[str] = []
    with measure.boft_fbd("torch"):
        for device in devices:
            opts = parse_options(AdaptersOptions, "adapters", argv, __doc__, device_of=lambda _: device.type)
            with measure.cpu_threads(device, opts.threads):
                name = measure.device_label(device)
                entry = report["devices"][device.type] = {"name": name, "options": asdict(opts), "models": {}}
                for model_name in opts.models:
                    entry["models"][model_name] = result = bench_model(model_name, opts.model_configs[model_name],
                                                                       opts, device)
                    tables.append(model_tables(result, name, opts))
                    print("\n" + tables[-1], flush=True)
                    measure.write_outputs(options.output_dir, "adapters", "\n".join(tables), report, announce=False)
    report["wall_s"] = time.perf_counter() - started
    figure = plot(report) if options.plot and tables else None
    measure.write_outputs(options.output_dir, "adapters", "\n".join(tables), report, figure)
    return report
