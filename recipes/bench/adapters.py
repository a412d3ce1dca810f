#!/usr/bin/env python
"""Speed and memory of GSOFT / Double GSOFT against PEFT's LoRA, OFT and BOFT on RoBERTa-sized encoders.

Usage::

    python recipes/bench_adapters.py                         # defaults from configs/bench/adapters.yaml
    python recipes/bench_adapters.py --quick                 # smoke test, well under a minute on a CPU
    python recipes/bench_adapters.py --models roberta-base --layers 12 --methods gsoft,lora,oft
    python recipes/bench_adapters.py --devices cuda --autocast bf16 --methods base,gsoft,gsoft_triton,lora

Models are built from a ``RobertaConfig`` with random weights (nothing is downloaded): a RoBERTa-base-sized encoder
(hidden 768, 12 layers, 12 heads, intermediate 3072) and a MiniLM-sized one (hidden 384, 12 layers, 12 heads,
intermediate 1536), each a ``RobertaForSequenceClassification``. Every method adapts the same layers (all attention
and MLP linears of the encoder, a full-match regex that leaves the classification head alone) and every method trains
the classification head too (PEFT ``modules_to_save``); the ``base`` row trains only the head.

What is measured, per model and method (all on one fixed random batch, ``batch_size x seq_len`` tokens):

* **params**: trainable adapter parameters (the classifier head, the same for all methods, is reported separately).
* **step time**: one ``zero_grad -> forward -> loss.backward() -> AdamW.step()``, wall clock (``perf_counter``, with
  ``torch.cuda.synchronize`` on a GPU), after ``warmup`` untimed steps. Runs are *interleaved*:
  ``for round in rounds: for method in methods: time steps_per_round steps`` so that machine noise (other
  processes, thermal / frequency changes) hits every method alike; the table shows the median over all timed steps.
  In the ``base`` row nothing below the head trains, so its backward stops at the head: it is ~ the forward cost.
* **peak train memory**: memory a train step needs *on top of the frozen base model's weights* (identical for every
  method and excluded), i.e.

      adapter state (every parameter and buffer the adapter adds to the model: trainable weights, the copied head,
      BOFT's permutation matrices, ...) + AdamW state + peak of the tensor memory allocated during one steady-state
      train step (activations saved for backward, gradients, temporaries), measured from the step's start.

  The transient part is measured exactly, tensor by tensor: on a GPU with ``torch.cuda.max_memory_allocated``
  (after ``reset_peak_memory_stats``); on a CPU from the allocation/free events that ``torch.profiler`` records with
  ``profile_memory=True`` (a running sum of bytes in time order; its maximum). This counts every tensor storage the
  PyTorch allocator hands out and nothing else: not the allocator's caching / fragmentation (glibc keeps freed memory;
  RSS-based numbers mix that in and are not reproducible in one process) and not small non-tensor scratch memory of
  BLAS/oneDNN. It is the CPU analogue of ``torch.cuda.max_memory_allocated``. The profiled step is not timed.
* **unmerged inference**: ``model.eval()`` forward under ``torch.no_grad`` with the adapter active.
* **merged inference**: the same after ``merge_and_unload()`` (on a deep copy; should match ``base``). The table
  also reports the largest |logit difference| between the merged and the unmerged model as a merge sanity check
  (always computed in fp32, without autocast, so that it checks the merge and not the rounding).

Two cost proxies that need no GPU and no timer (``costs: true``; the second table of each model). They are exact and
reproducible, so a regression test can hold them (``tests/test_costs.py``):

* **ops/step**: aten ops dispatched in one steady-state train step (``zero_grad``, forward, ``loss.backward()``,
  AdamW step), counted by a ``TorchDispatchMode`` after at least 2 untimed steps (the optimizer state exists). On a GPU
  every op is at least one kernel launch plus Python / dispatcher work, so a method that dispatches many more ops than
  LoRA is host-bound there however fast its kernels are. The counted step uses the foreach AdamW (the GPU default)
  whatever the device, so a CPU count equals the GPU count of the torch path; a custom op (gsoft's fused Triton
  kernels) counts as one op. Counted on the device of the run and on its batch (an adapter may pick its plan by the
  number of token rows, so the count can depend on the batch). **adapter ops/step** = ops/step minus the ``base``
  row's (which trains only the head), also per adapted layer, and **ops ×lora** = adapter ops / LoRA's adapter ops.
* **memory proxy**: bytes of the distinct storages autograd saves for backward in one forward (a
  ``saved_tensors_hooks`` pack hook; dropout off for this forward; storages of frozen parameters excluded, they exist
  anyway) + trainable state (3 x trainable parameter bytes: weights and the two AdamW moments). The saved tensors are
  what a train step's memory grows with the batch; ``mem proxy ×lora`` is its ratio to LoRA's. A tensor that an
  ``autograd.Function`` keeps as a ``ctx`` attribute instead of ``save_for_backward`` is not seen by the hook.

Precision: ``autocast`` (``none``, ``bf16`` or ``fp16``) wraps every forward (train steps, the memory and cost
measurements, inference) in ``torch.autocast(device_type, dtype)``; weights and optimizer state stay fp32 and the
backward runs outside the context, as in mixed-precision training (no gradient scaler: a benchmark times steps and
does not need the fp16 loss to converge). Table titles say ``fp32`` or ``autocast bf16``.

Relative columns divide each method's median step time (and peak memory, ops, memory proxy) by the reference
methods' (``reference`` in the config). Targets: the top-level ``targets`` for one method (GSOFT by default) and the
``targets`` of any method entry; each is printed under its table as held or MISSED. A missed target is reported,
never raised: the benchmark measures, tests assert.

CPU defaults (``device_overrides.cpu`` in the config): 2 of the 12 layers (one BOFT step costs ~10 s per
RoBERTa-base layer on a CPU; per-layer costs do not depend on depth) and 1 thread (on a shared 2-core machine, OpenMP
threads stall whenever another process holds a core, which hurts methods made of many small ops the most). Override
with ``--layers 12 --threads 2``.

Outputs in ``--output_dir``: ``results.json`` (every sample, cost proxies, targets, settings, versions, device
names), ``tables.md`` (the markdown tables) and ``bench_adapters_<device>.png`` (bar charts of step time and peak
memory per method and model).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import logging
import math
import os
import platform
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "bench" / "adapters.yaml"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode

logger = logging.getLogger("bench_adapters")

MiB = 2**20

# Top-level settings that may be given on the command line (LIST_KEYS: comma-separated lists).
LIST_KEYS = ("run_models", "methods_filter", "devices")
CLI_KEYS = (
    "run_models",
    "layers",
    "batch_size",
    "seq_len",
    "lr",
    "warmup",
    "rounds",
    "steps_per_round",
    "infer_rounds",
    "memory",
    "plot",
    "seed",
    "threads",
    "devices",
    "output_dir",
    "methods_filter",
    "dropout",
    "autocast",
    "costs",
)
#: ``--autocast`` choices: the dtype ``torch.autocast`` runs the forward in (``none``: plain fp32).
AUTOCAST_DTYPES: dict[str, Optional[torch.dtype]] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# ======================================================================================================================
# Settings
# ======================================================================================================================
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML settings (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="apply the config's `quick` section (smoke test)")
    p.add_argument("--models", dest="run_models", help="comma-separated model names from the config's `models`")
    p.add_argument("--methods", dest="methods_filter", help="comma-separated method keys (default: all enabled)")
    p.add_argument("--layers", type=int, help="encoder depth to build (overrides every model's num_hidden_layers)")
    p.add_argument("--batch_size", type=int)
    p.add_argument("--seq_len", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup", type=int, help="untimed train steps per method before timing")
    p.add_argument("--rounds", type=int, help="interleaved timing rounds")
    p.add_argument("--steps_per_round", type=int, help="timed train steps per method and round (upper bound)")
    p.add_argument("--infer_rounds", type=int, help="interleaved inference timing rounds")
    p.add_argument("--dropout", type=float, help="encoder hidden/attention dropout")
    p.add_argument("--memory", type=_bool, help="measure peak memory (true/false)")
    p.add_argument("--costs", type=_bool, help="measure ops/step and the saved-tensor memory proxy (true/false)")
    p.add_argument("--autocast", choices=sorted(AUTOCAST_DTYPES), help="forward under torch.autocast in this dtype")
    p.add_argument("--plot", type=_bool, help="save the PNG plot (true/false)")
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.add_argument("--devices", help="comma-separated: cpu,cuda (default from config: auto)")
    p.add_argument("--output_dir")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def load_settings(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return ``(settings, cli_overrides)``; device overrides are applied later, per device (see :func:`for_device`)."""
    with open(args.config) as f:
        settings = yaml.safe_load(f)
    settings.setdefault("methods_filter", None)
    quick = (settings.get("quick") or {}) if args.quick else {}
    settings.update(quick)
    cli: dict[str, Any] = {}
    for key in CLI_KEYS:
        value = getattr(args, key, None)
        if value is None:
            continue
        if key in LIST_KEYS and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        cli[key] = value
    settings.update(cli)
    autocast_dtype(settings.get("autocast"))  # a bad value fails here, before any model is built
    settings["quick_mode"] = bool(args.quick)
    settings["quick_keys"] = sorted(quick)
    settings["config_path"] = str(args.config)
    return settings, cli


def for_device(settings: dict[str, Any], cli: dict[str, Any], device: str) -> dict[str, Any]:
    """Settings for one device: ``device_overrides[device]``, unless --quick or a command-line flag set the key."""
    s = dict(settings)
    quick_keys = set(settings.get("quick_keys") or ())
    for key, value in ((settings.get("device_overrides") or {}).get(device) or {}).items():
        if key not in cli and key not in quick_keys:
            s[key] = value
    return s


def resolve_devices(spec: Any) -> list[str]:
    if spec in (None, "auto"):
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    devices = [spec] if isinstance(spec, str) else list(spec)
    for d in devices:
        if d not in ("cpu", "cuda"):
            raise ValueError(f"Unknown device {d!r}; use cpu or cuda.")
        if d == "cuda" and not torch.cuda.is_available():
            raise ValueError("--devices cuda, but torch.cuda.is_available() is False.")
    return devices


def selected_methods(settings: dict[str, Any]) -> list[dict[str, Any]]:
    methods = settings["methods"]
    wanted = settings.get("methods_filter")
    if wanted:
        known = {m["key"] for m in methods}
        unknown = [w for w in wanted if w not in known]
        if unknown:
            raise ValueError(f"Unknown method key(s) {unknown}; known: {sorted(known)}.")
        return [m for m in methods if m["key"] in wanted]  # an explicit choice also runs disabled methods
    return [m for m in methods if m.get("enabled", True)]


# ======================================================================================================================
# Models and adapters
# ======================================================================================================================
def build_base_model(spec: dict[str, Any], settings: dict[str, Any]) -> torch.nn.Module:
    from transformers import RobertaConfig, RobertaForSequenceClassification

    layers = settings.get("layers") or spec["num_hidden_layers"]
    config = RobertaConfig(
        hidden_size=spec["hidden_size"],
        num_hidden_layers=layers,
        num_attention_heads=spec["num_attention_heads"],
        intermediate_size=spec["intermediate_size"],
        vocab_size=spec.get("vocab_size", 50265),
        max_position_embeddings=max(514, settings["seq_len"] + 2),
        type_vocab_size=1,
        pad_token_id=1,
        num_labels=2,
        hidden_dropout_prob=settings.get("dropout", 0.1),
        attention_probs_dropout_prob=settings.get("dropout", 0.1),
    )
    torch.manual_seed(settings["seed"])
    model = RobertaForSequenceClassification(config)
    model.requires_grad_(False)
    return model


def make_batch(spec: dict[str, Any], settings: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(settings["seed"] + 1)
    ids = torch.randint(3, spec.get("vocab_size", 50265), (settings["batch_size"], settings["seq_len"]), generator=g)
    labels = torch.randint(0, 2, (settings["batch_size"],), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device)}


class _TorchFastBlockDiag:
    """Pure-PyTorch stand-in for PEFT's CUDA-only ``fbd_cuda`` extension (same signatures and results).

    ``forward(x)``: ``(N, D, H, H)`` blocks -> ``[(N, D*H, D*H)]`` block-diagonal matrices.
    ``backward(g, x)``: ``[(N, D, H, H)]``, the diagonal blocks of ``g``.
    """

    @staticmethod
    def forward(x: torch.Tensor) -> list[torch.Tensor]:
        n, d, h, _ = x.shape
        out = x.new_zeros(n, d * h, d * h)
        out.view(n, d, h, d, h).diagonal(dim1=1, dim2=3).copy_(x.permute(0, 2, 3, 1))
        return [out]

    @staticmethod
    def backward(grad: torch.Tensor, x: torch.Tensor) -> list[torch.Tensor]:
        n, d, h, _ = x.shape
        return [grad.reshape(n, d, h, d, h).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2).contiguous()]


_ORIGINAL_GET_FBD_CUDA: Optional[Callable] = None


@contextlib.contextmanager
def boft_fbd(mode: str):
    """``torch``: PEFT's BOFT uses :class:`_TorchFastBlockDiag` (installed for good: the BOFT forward looks it up at
    every call). ``peft``: PEFT's own ``get_fbd_cuda`` while the model is built (on a CPU it fails and PEFT sets
    ``boft_n_butterfly_factor=1``)."""
    global _ORIGINAL_GET_FBD_CUDA
    from peft.tuners.boft import layer as boft_layer

    if _ORIGINAL_GET_FBD_CUDA is None:
        _ORIGINAL_GET_FBD_CUDA = boft_layer.get_fbd_cuda
    if mode == "torch":
        boft_layer.get_fbd_cuda = lambda: _TorchFastBlockDiag
        yield
        return
    if mode != "peft":
        raise ValueError(f"Unknown BOFT fbd mode {mode!r}; use 'torch' or 'peft'.")
    previous = boft_layer.get_fbd_cuda
    boft_layer.get_fbd_cuda = _ORIGINAL_GET_FBD_CUDA
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Failed to load the CUDA extension" once per layer
            yield
    finally:
        boft_layer.get_fbd_cuda = previous


def head_module(model: torch.nn.Module, name: str) -> torch.nn.Module:
    return model.get_submodule(name)


def build_method_model(
    base: torch.nn.Module, method: dict[str, Any], settings: dict[str, Any]
) -> torch.nn.Module:
    """A deep copy of ``base`` with the method's adapter (or, for ``base``, only the head trainable)."""
    import peft
    from peft import get_peft_model

    import gsoft

    model = copy.deepcopy(base)
    kind = method["type"]
    if kind == "base":
        model.requires_grad_(False)
        head_module(model, settings["head"]).requires_grad_(True)
        return model
    common = {"target_modules": settings["target_modules"], "modules_to_save": [settings["head"]]}
    args = dict(method.get("args") or {})
    config_cls = {
        "gsoft": gsoft.GSOFTConfig,
        "lora": peft.LoraConfig,
        "oft": peft.OFTConfig,
        "boft": peft.BOFTConfig,
    }.get(kind)
    if config_cls is None:
        raise ValueError(f"Unknown method type {kind!r}")
    config = config_cls(**common, **args)
    gsoft_logger = logging.getLogger("gsoft")
    level = gsoft_logger.level
    gsoft_logger.setLevel(logging.ERROR)  # "not dense" notice; we report the structure ourselves
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            if kind == "boft":
                with boft_fbd(method.get("fbd", "torch")):
                    return get_peft_model(model, config)
            return get_peft_model(model, config)
    finally:
        gsoft_logger.setLevel(level)


def count_params(model: torch.nn.Module, head: str) -> dict[str, int]:
    """Trainable parameters, split into the adapter and the (fully trained) classification head."""
    adapter = head_n = 0
    head_re = re.compile(rf"(^|\.){re.escape(head)}(\.|$)")
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if head_re.search(name):
            head_n += p.numel()
        else:
            adapter += p.numel()
    return {"adapter": adapter, "head": head_n, "trainable": adapter + head_n}


def expected_gsoft_params(base: torch.nn.Module, method: dict[str, Any], settings: dict[str, Any]) -> int:
    """``sum over adapted layers of gs_param_count(in) [+ gs_param_count(out) if double] [+ out if scaling]``."""
    from gsoft import gs

    args = method.get("args") or {}
    pattern = re.compile(settings["target_modules"])
    total = 0
    for name, module in base.named_modules():
        if not isinstance(module, torch.nn.Linear) or not pattern.fullmatch(name):
            continue
        sides = [module.in_features] + ([module.out_features] if args.get("double", False) else [])
        for n in sides:
            b, r = gs.resolve_blocks(n, args.get("block_size"), args.get("n_blocks"))
            m = gs.resolve_n_factors(args.get("n_factors", 2), r, b)
            total += gs.gs_param_count(n, b, m)
        if args.get("scaling", True):
            total += module.out_features
    return total


def tensor_bytes(tensors) -> int:
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        key = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def model_bytes(model: torch.nn.Module) -> int:
    return tensor_bytes(list(model.parameters()) + list(model.buffers()))


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    return tensor_bytes(v for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor))


# ======================================================================================================================
# Measurements
# ======================================================================================================================
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast_dtype(mode: Optional[str]) -> Optional[torch.dtype]:
    """The dtype of an ``autocast`` setting (``None`` for ``none``); an unknown setting names the choices."""
    key = "none" if mode is None else str(mode).lower()
    if key not in AUTOCAST_DTYPES:
        raise ValueError(f"Unknown autocast {mode!r}; use one of {sorted(AUTOCAST_DTYPES)} (e.g. --autocast bf16).")
    return AUTOCAST_DTYPES[key]


def autocast_context(device: torch.device, mode: Optional[str]) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for a forward on ``device``, or nothing for ``none`` (plain fp32)."""
    dtype = autocast_dtype(mode)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def precision_label(mode: Optional[str]) -> str:
    dtype = autocast_dtype(mode)
    return "fp32" if dtype is None else f"autocast {str(mode).lower()}"


def _batch_device(batch: dict[str, torch.Tensor]) -> torch.device:
    return next(iter(batch.values())).device


def train_step(
    model: torch.nn.Module, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor], autocast: Optional[str] = None
) -> None:
    """``zero_grad -> forward -> backward -> step``; only the forward runs under autocast (mixed precision)."""
    opt.zero_grad(set_to_none=True)
    with autocast_context(_batch_device(batch), autocast):
        loss = model(**batch).loss
    loss.backward()
    opt.step()


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def peak_step_bytes(fn: Callable[[], Any], device: torch.device) -> Optional[int]:
    """Peak tensor memory allocated by ``fn`` above what was allocated when it started (see module docstring)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
        fn()
    try:
        events = prof.profiler.kineto_results.events()
        mem = sorted(
            (e.start_ns(), e.nbytes())
            for e in events
            if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
        )
    except AttributeError:  # pragma: no cover - private profiler API moved
        logger.warning("torch.profiler memory events not available in this torch version; no memory numbers.")
        return None
    running = peak = 0
    for _, nbytes in mem:
        running += nbytes
        peak = max(peak, running)
    return peak


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched while active. Each is at least one kernel launch on a GPU, plus Python and
    dispatcher work on the host, so the count measures a step's host overhead without a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's hook signature
        self.count += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def foreach_optimizer(opt: torch.optim.Optimizer):
    """The multi-tensor (foreach) implementation for the steps inside: the GPU default, and the same op sequence on
    every device (a CPU optimizer otherwise loops over the parameters, one set of ops per tensor)."""
    saved = [group.get("foreach") for group in opt.param_groups]
    for group in opt.param_groups:
        group["foreach"] = True
    try:
        yield opt
    finally:
        for group, value in zip(opt.param_groups, saved):
            group["foreach"] = value


def count_step_ops(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    autocast: Optional[str] = None,
    untimed_steps: int = 2,
    warm_batch: Optional[dict[str, torch.Tensor]] = None,
) -> int:
    """aten ops dispatched in one steady-state train step (zero_grad, forward, backward, foreach AdamW step).

    ``untimed_steps`` uncounted steps come first so that the optimizer state exists (the first step also creates it);
    they run on ``warm_batch`` (default: ``batch``), which may be small: the state does not depend on the batch. The
    count may (an adapter can pick its plan by the number of rows), so ``batch`` is the shape that matters. The
    model's parameters move: count on a model whose weights do not matter."""
    with foreach_optimizer(opt):
        for _ in range(untimed_steps):
            train_step(model, opt, batch if warm_batch is None else warm_batch, autocast)
        with OpCounter() as counter:
            train_step(model, opt, batch, autocast)
    opt.zero_grad(set_to_none=True)
    return counter.count


@contextlib.contextmanager
def dropout_off(model: torch.nn.Module):
    """Every dropout at p = 0 inside (RoBERTa's attention reads its dropout module's p as well), restored after.
    Dropout masks are saved tensors of the base model, the same for every method: they would only dilute the ratios
    of the memory proxy."""
    modules = [m for m in model.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]
    saved = [m.p for m in modules]
    for m in modules:
        m.p = 0.0
    try:
        yield model
    finally:
        for m, p in zip(modules, saved):
            m.p = p


def saved_tensor_bytes(model: torch.nn.Module, batch: dict[str, torch.Tensor], autocast: Optional[str] = None) -> int:
    """Bytes of the distinct storages autograd saves for backward in one forward (dropout off). Storages of frozen
    parameters are excluded (they are in memory anyway); autocast's low-precision copies of them are counted."""
    frozen = {p.untyped_storage().data_ptr() for p in model.parameters() if not p.requires_grad}
    seen: set[int] = set()
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        storage = t.untyped_storage()
        key = storage.data_ptr()  # saved tensors stay alive until the graph is freed: no address is reused meanwhile
        if key not in seen and key not in frozen:
            seen.add(key)
            total += storage.nbytes()
        return t

    with dropout_off(model), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with autocast_context(_batch_device(batch), autocast):
            loss = model(**batch).loss
    del loss  # frees the graph and its saved tensors; no backward needed
    return total


def trainable_state_bytes(model: torch.nn.Module) -> int:
    """3 x the trainable parameter bytes: the weights and AdamW's two moments (gradients are transient)."""
    return 3 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def measure_costs(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    autocast: Optional[str] = None,
    untimed_steps: int = 2,
) -> dict[str, int]:
    """Both cost proxies of one model (see the module docstring): ops per train step and the memory proxy."""
    ops = count_step_ops(model, opt, batch, autocast, untimed_steps)
    saved = saved_tensor_bytes(model, batch, autocast)
    state = trainable_state_bytes(model)
    return {"ops_per_step": ops, "saved_bytes": saved, "trainable_state_bytes": state, "mem_proxy_bytes": saved + state}


def adapted_layer_count(base: torch.nn.Module, settings: dict[str, Any]) -> int:
    """Linear layers that ``target_modules`` (a full-match regex) selects: the denominator of the per-layer ops."""
    pattern = re.compile(settings["target_modules"])
    return sum(isinstance(m, torch.nn.Linear) and bool(pattern.fullmatch(n)) for n, m in base.named_modules())


def percentile(values: list[float], q: float) -> float:
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary(samples: list[float]) -> dict[str, float]:
    return {
        "median": percentile(samples, 0.5),
        "p25": percentile(samples, 0.25),
        "p75": percentile(samples, 0.75),
        "min": min(samples) if samples else float("nan"),
        "n": len(samples),
    }


def _progress(total: int, desc: str):
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)
    except ImportError:  # pragma: no cover
        class _Plain:
            def __init__(self) -> None:
                self.n = 0

            def update(self, k: int = 1) -> None:
                self.n += k
                print(f"  {desc}: {self.n}/{total}", file=sys.stderr, flush=True)

            def set_postfix_str(self, s: str) -> None:
                pass

            def close(self) -> None:
                pass

        return _Plain()


def _short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ").replace("|", "/")
    return text if len(text) <= 160 else text[:157] + "..."


def merge_and_unload_copy(model: torch.nn.Module) -> tuple[torch.nn.Module, Optional[str]]:
    """``merge_and_unload()`` on a deep copy; returns ``(merged_model, note)``.

    PEFT 0.21.2's generic ``BaseTuner._replace_module`` (used by OFT and BOFT, not LoRA) fails to unload a
    ``modules_to_save`` head without a ``.weight`` (``RobertaClassificationHead``): ``AttributeError: ... has no
    attribute 'weight'``. Then we swap each ``ModulesToSaveWrapper`` for its trained copy first (exactly what unloading
    does with it) and merge again, and say so in the row's notes.
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
            note = (
                "merge_and_unload: PEFT 0.21.2 fails to unload the modules_to_save head (no .weight); "
                "head unwrapped manually before merging"
            )
            return merged.merge_and_unload(), note


def _loadavg() -> Optional[list[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def bench_model(
    model_name: str, spec: dict[str, Any], settings: dict[str, Any], device: torch.device
) -> dict[str, Any]:
    """All measurements for one model on one device."""
    methods = selected_methods(settings)
    head = settings["head"]
    load_start = _loadavg()
    t_build = time.perf_counter()
    base = build_base_model(spec, settings)
    base_bytes = model_bytes(base)
    depth = base.config.num_hidden_layers
    adapted_layers = adapted_layer_count(base, settings)
    autocast = settings.get("autocast")
    print(
        f"\n== {model_name} on {device_label(device)}: hidden {spec['hidden_size']}, {depth} of "
        f"{spec['num_hidden_layers']} layers, {spec['num_attention_heads']} heads, intermediate "
        f"{spec['intermediate_size']}; batch {settings['batch_size']} x seq {settings['seq_len']}; "
        f"{precision_label(autocast)}; load average {load_start}",
        flush=True,
    )
    batch = make_batch(spec, settings, device)

    rows: list[dict[str, Any]] = []
    by_key: dict[str, dict[str, Any]] = {}
    entries: dict[str, dict[str, Any]] = {}  # key -> model, optimizer, samples (kept if the method fails later)
    for method in methods:
        row: dict[str, Any] = {"key": method["key"], "name": method["name"], "type": method["type"],
                               "args": method.get("args") or {}, "error": None, "phase_errors": {}, "notes": []}
        if method["type"] == "boft":
            row["fbd"] = method.get("fbd", "torch")
        rows.append(row)
        by_key[method["key"]] = row
        try:
            model = build_method_model(base, method, settings).to(device)
            model.train()
            row["params"] = count_params(model, head)
            if method["type"] == "gsoft":
                row["expected_adapter_params"] = expected_gsoft_params(base, method, settings)
                row["param_formula_ok"] = row["expected_adapter_params"] == row["params"]["adapter"]
            if method["type"] == "boft":
                factors = {p.shape[0] for n, p in model.named_parameters() if "boft_R" in n and p.requires_grad}
                row["boft_butterfly_factors_used"] = sorted(factors)
                asked = (method.get("args") or {}).get("boft_n_butterfly_factor", 1)
                if factors and factors != {asked}:
                    row["notes"].append(
                        f"PEFT used boft_n_butterfly_factor={sorted(factors)} instead of {asked} (no fbd_cuda)"
                    )
            row["adapter_state_bytes"] = model_bytes(model) - base_bytes
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings["lr"])
            entries[method["key"]] = {"model": model, "opt": opt, "train": [], "unmerged": [], "merged": [],
                                      "merged_model": None}
        except Exception as exc:  # noqa: BLE001 - a broken method becomes a table row, not a crash
            row["error"] = _short_error(exc)
            logger.debug("building %s failed", method["key"], exc_info=True)
    live = list(entries)  # methods still being measured, in table order
    print(f"   built {len(live)}/{len(methods)} methods in {time.perf_counter() - t_build:.1f}s", flush=True)
    print_param_counts(rows)

    def attempt(key: str, phase: str, fn: Callable[[], Any], fatal: bool = True) -> Any:
        """Run ``fn``; on an exception record it in the row (and stop measuring the method if ``fatal``)."""
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001
            by_key[key]["phase_errors"][phase] = _short_error(exc)
            logger.debug("%s: %s failed", key, phase, exc_info=True)
            if fatal and key in live:
                live.remove(key)
            return None

    def per_method(name: str) -> dict[str, int]:
        return {m["key"]: max(1, min(settings[name], m.get(name, settings[name]))) for m in methods}

    steps_per_round, rounds_of = per_method("steps_per_round"), per_method("rounds")
    costs = settings.get("costs", True)
    total = len(live) * (settings["warmup"] + int(settings["memory"]) + int(costs) + 1 + 2 * settings["infer_rounds"])
    total += sum(steps_per_round[k] * rounds_of[k] for k in live)
    bar = _progress(total, f"{model_name}/{device.type}")

    # ---- warmup, interleaved too (first-call costs, allocator growth, AdamW state creation) ----
    for _ in range(settings["warmup"]):
        for key in list(live):
            entry = entries[key]
            bar.set_postfix_str(f"warmup {key}")
            attempt(key, "train", lambda: train_step(entry["model"], entry["opt"], batch, autocast))
            bar.update()

    # ---- peak memory: one profiled, untimed, steady-state train step per method ----
    if settings["memory"]:
        for key in list(live):
            entry, row = entries[key], by_key[key]
            bar.set_postfix_str(f"memory {key}")
            entry["opt"].zero_grad(set_to_none=True)
            gc.collect()

            def step_without_zero_grad(entry=entry) -> None:
                with autocast_context(device, autocast):
                    loss = entry["model"](**batch).loss
                loss.backward()
                entry["opt"].step()

            peak = attempt(key, "memory", lambda: peak_step_bytes(step_without_zero_grad, device), fatal=False)
            row["peak_step_bytes"] = peak
            row["optimizer_state_bytes"] = optimizer_state_bytes(entry["opt"])
            if peak is not None:
                row["peak_train_mem_bytes"] = row["adapter_state_bytes"] + row["optimizer_state_bytes"] + peak
            bar.update()

    # ---- cost proxies: ops per train step and the saved-tensor memory proxy (untimed) ----
    if costs:
        done = settings["warmup"] + int(settings["memory"])  # optimizer steps already taken by every live method
        for key in list(live):
            entry, row = entries[key], by_key[key]
            bar.set_postfix_str(f"costs {key}")
            entry["opt"].zero_grad(set_to_none=True)

            def costs_of(entry=entry) -> dict[str, int]:
                return measure_costs(entry["model"], entry["opt"], batch, autocast, untimed_steps=max(0, 2 - done))

            row.update(attempt(key, "costs", costs_of, fatal=False) or {})
            gc.collect()
            bar.update()

    # ---- interleaved train-step timing ----
    for r in range(settings["rounds"]):
        for key in list(live):
            if r >= rounds_of[key]:
                continue
            entry = entries[key]
            bar.set_postfix_str(f"round {r + 1} train {key}")
            for _ in range(steps_per_round[key]):
                step = lambda: timed(  # noqa: E731
                    lambda: train_step(entry["model"], entry["opt"], batch, autocast), device
                )
                dt = attempt(key, "train", step)
                if dt is None:
                    break
                entry["train"].append(dt)
                bar.update()

    # ---- inference: unmerged vs merged (merge_and_unload on a deep copy of the trained model) ----
    infer_batch = {k: v for k, v in batch.items() if k != "labels"}
    for key in list(live):
        entry = entries[key]
        bar.set_postfix_str(f"merge {key}")
        entry["opt"].zero_grad(set_to_none=True)
        entry["model"].eval()

        def merge(entry=entry, key=key) -> torch.nn.Module:
            merged, note = merge_and_unload_copy(entry["model"])
            if note:
                by_key[key]["notes"].append(note)
            merged.eval()
            with torch.no_grad():
                a = entry["model"](**infer_batch).logits.float()
                b = merged(**infer_batch).logits.float()
            by_key[key]["merge_max_abs_err"] = (a - b).abs().max().item()
            by_key[key]["logit_max_abs"] = a.abs().max().item()
            return merged

        entry["merged_model"] = attempt(key, "merge", merge, fatal=False)
        bar.update()

    for _ in range(settings["infer_rounds"]):
        for key in list(live):
            entry = entries[key]
            bar.set_postfix_str(f"infer {key}")
            for which in ("unmerged", "merged"):
                model = entry["model"] if which == "unmerged" else entry["merged_model"]
                if model is not None:

                    def fwd(model=model) -> None:
                        with torch.no_grad(), autocast_context(device, autocast):
                            model(**infer_batch)

                    dt = attempt(key, f"infer_{which}", lambda: timed(fwd, device), fatal=False)
                    if dt is not None:
                        entry[which].append(dt)
                bar.update()
    bar.close()

    # ---- collect (including whatever was measured before a method failed) ----
    for key, entry in entries.items():
        row = by_key[key]
        for field, samples in (("step", entry["train"]), ("infer_unmerged", entry["unmerged"]),
                               ("infer_merged", entry["merged"])):
            if samples:
                row[f"{field}_s"] = summary(samples)
                row[f"{field}_samples_s"] = samples
        if row["phase_errors"]:
            row["error"] = "; ".join(f"{phase}: {err}" for phase, err in row["phase_errors"].items())
    add_cost_columns(rows, adapted_layers)
    add_relative(rows, settings)
    result = {
        "model": model_name,
        "spec": spec,
        "layers_built": depth,
        "batch_size": settings["batch_size"],
        "seq_len": settings["seq_len"],
        "autocast": str(autocast or "none").lower(),
        "adapted_layers": adapted_layers,
        "costs_device": device.type if costs else None,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "base_model_bytes": base_bytes,
        "load_average_start": load_start,
        "load_average_end": _loadavg(),
        "rows": rows,
    }
    result["targets"] = check_targets(rows, settings)
    entries.clear()
    del base
    gc.collect()
    return result


def add_cost_columns(rows: list[dict[str, Any]], adapted_layers: int) -> None:
    """``adapter_ops_per_step`` (ops minus the ``base`` row's, which trains only the head) and the same per adapted
    layer; left out when the run has no ``base`` row or a method has no op count."""
    base = next((r for r in rows if r["type"] == "base" and r.get("ops_per_step") is not None), None)
    if base is None:
        return
    for row in rows:
        if row.get("ops_per_step") is None:
            continue
        row["adapter_ops_per_step"] = row["ops_per_step"] - base["ops_per_step"]
        row["adapter_ops_per_layer"] = row["adapter_ops_per_step"] / adapted_layers if adapted_layers else None


#: relative column prefix -> the row field it divides (``<prefix>_vs_<label>`` = ours / the reference method's).
RELATIVE_FIELDS = {
    "step": "step_s",
    "mem": "peak_train_mem_bytes",
    "ops": "adapter_ops_per_step",
    "mem_proxy": "mem_proxy_bytes",
}


def _value(row: Optional[dict[str, Any]], field: str) -> Optional[float]:
    """A row's number (the median of a timing summary); None if absent, NaN or not measured."""
    if row is None or row.get(field) is None:
        return None
    value = row[field]["median"] if isinstance(row[field], dict) else row[field]
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def add_relative(rows: list[dict[str, Any]], settings: dict[str, Any]) -> None:
    """``<prefix>_vs_<label>`` = a method's value / the reference method's, for every RELATIVE_FIELDS entry and
    every ``reference`` of the config (None when either side is missing or the reference is 0)."""
    by_key = {r["key"]: r for r in rows}
    for row in rows:
        rel: dict[str, Optional[float]] = {}
        for label, ref_key in (settings.get("reference") or {}).items():
            for prefix, field in RELATIVE_FIELDS.items():
                ours, ref = _value(row, field), _value(by_key.get(ref_key), field)
                rel[f"{prefix}_vs_{label}"] = ours / ref if ours is not None and ref else None
        row["relative"] = rel


def target_specs(settings: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Method key -> {metric: limit}: the top-level ``targets`` (for ``targets.method``) merged with the ``targets``
    of each method entry. A metric is a key of a row's ``relative`` (``step_vs_lora``, ``ops_vs_lora``, ...)."""
    specs: dict[str, dict[str, float]] = {}
    top = dict(settings.get("targets") or {})
    key = top.pop("method", None)
    if key is not None:
        specs[key] = top
    for method in settings.get("methods") or []:
        for metric, limit in (method.get("targets") or {}).items():
            specs.setdefault(method["key"], {})[metric] = limit
    return specs


def check_targets(rows: list[dict[str, Any]], settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target of a method in this run: value, limit and ``ok`` (None when the value was not measured).
    Reported, never raised."""
    by_key = {r["key"]: r for r in rows}
    out = []
    for key, metrics in target_specs(settings).items():
        if key not in by_key:
            continue
        for name, limit in metrics.items():
            value = (by_key[key].get("relative") or {}).get(name)
            out.append({"method": key, "metric": name, "value": value, "limit": limit,
                        "ok": None if value is None else value <= limit})
    return out


# ======================================================================================================================
# Reporting
# ======================================================================================================================
def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    n = torch.get_num_threads()
    return f"cpu ({platform.processor() or platform.machine()}, {n} thread{'s' if n != 1 else ''})"


def print_param_counts(rows: list[dict[str, Any]]) -> None:
    print("   trainable parameters (adapter only; the classifier head is trained by every method):")
    for row in rows:
        if row.get("error"):
            print(f"     {row['name']:<42} ERROR {row['error']}")
            continue
        extra = ""
        if "expected_adapter_params" in row:
            extra = f"  (gs_param_count formula: {row['expected_adapter_params']:,}, " + (
                "match)" if row["param_formula_ok"] else "MISMATCH)"
            )
        if row.get("boft_butterfly_factors_used"):
            extra += f"  (butterfly factors actually used: {row['boft_butterfly_factors_used']})"
        print(f"     {row['name']:<42} {row['params']['adapter']:>12,}  head {row['params']['head']:,}{extra}")
    sys.stdout.flush()


def _fmt_ms(s: Optional[dict[str, float]]) -> str:
    if not s or s.get("n", 0) == 0:
        return "-"
    return f"{1000 * s['median']:.0f}" if s["median"] >= 0.1 else f"{1000 * s['median']:.1f}"


def _fmt_ratio(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _fmt_mib(b: Optional[float]) -> str:
    return "-" if b is None else f"{b / MiB:.0f}" if b >= 10 * MiB else f"{b / MiB:.1f}"


def markdown_table(result: dict[str, Any], device_name: str, settings: dict[str, Any]) -> str:
    spec = result["spec"]
    refs = settings.get("reference") or {}
    threads = f"; {result['threads']} CPU thread(s)" if result.get("threads") else ""
    title = (
        f"### {result['model']} — {device_name} — {precision_label(result.get('autocast'))}\n\n"
        f"hidden {spec['hidden_size']}, {result['layers_built']} of {spec['num_hidden_layers']} layers, "
        f"{spec['num_attention_heads']} heads, intermediate {spec['intermediate_size']}; batch "
        f"{result['batch_size']} x seq {result['seq_len']}; medians of interleaved rounds "
        f"(n = timed steps per method){threads}; load average {result.get('load_average_start')} -> "
        f"{result.get('load_average_end')}. Memory: adapter state + AdamW state + peak step tensors, frozen "
        f"weights ({result['base_model_bytes'] / MiB:.0f} MiB) excluded.\n\n"
    )
    head = ["method", "adapter params", "step ms (n)"] + [f"step ×{k}" for k in refs] + [
        "peak train MiB", "mem ×lora", "infer unmerged ms", "infer merged ms", "merge err"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for row in result["rows"]:
        if row.get("error") and "step_s" not in row:
            lines.append(f"| {row['name']} | ERROR: {row['error']} |" + " |" * (len(head) - 2))
            continue
        rel = row.get("relative") or {}
        name = row["name"] + (f" (error: {row['error']})" if row.get("error") else "")
        cells = [
            name,
            f"{row['params']['adapter']:,}",
            f"{_fmt_ms(row.get('step_s'))} ({row.get('step_s', {}).get('n', 0)})",
            *[_fmt_ratio(rel.get(f"step_vs_{k}")) for k in refs],
            _fmt_mib(row.get("peak_train_mem_bytes")),
            _fmt_ratio(rel.get("mem_vs_lora")),
            _fmt_ms(row.get("infer_unmerged_s")),
            _fmt_ms(row.get("infer_merged_s")),
            "-" if row.get("merge_max_abs_err") is None else f"{row['merge_max_abs_err']:.1e}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    text = title + "\n".join(lines) + "\n"
    notes: dict[str, list[str]] = {}
    for row in result["rows"]:
        for note in row.get("notes") or []:
            notes.setdefault(note, []).append(row["name"])
    for note, names in notes.items():
        text += f"\nNote ({', '.join(names)}): {note}.\n"
    text += targets_text([t for t in result.get("targets") or [] if not _is_cost_metric(t["metric"])])
    if any(row.get("ops_per_step") is not None or row.get("mem_proxy_bytes") is not None for row in result["rows"]):
        text += "\n" + cost_table(result)
        text += targets_text([t for t in result.get("targets") or [] if _is_cost_metric(t["metric"])])
    return text


def _is_cost_metric(metric: str) -> bool:
    return metric.startswith(("ops_", "mem_proxy_"))


def targets_text(targets: list[dict[str, Any]]) -> str:
    """One line per method (``Targets for `gsoft`: metric = value (≤ limit: ok | MISSED | n/a); ...``), then a
    line that counts the held and names the missed ones."""
    if not targets:
        return ""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for t in targets:
        by_method.setdefault(t["method"], []).append(t)
    text = "\n"
    for method, items in by_method.items():
        text += f"Targets for `{method}`: " + "; ".join(
            f"{t['metric']} = {_fmt_ratio(t['value'])} (≤ {t['limit']}: "
            f"{'ok' if t['ok'] else 'MISSED' if t['ok'] is not None else 'n/a'})"
            for t in items
        ) + "\n"
    held = sum(t["ok"] is True for t in targets)
    missed = [f"{t['method']} {t['metric']} {_fmt_ratio(t['value'])} > {t['limit']}"
              for t in targets if t["ok"] is False]
    text += f"\nTargets held: {held} of {len(targets)}" + (f"; MISSED: {', '.join(missed)}" if missed else "") + ".\n"
    return text


def cost_table(result: dict[str, Any]) -> str:
    """The cost proxies of one model: ops per train step (total, adapter, per adapted layer, ×lora) and the memory
    proxy (saved tensors + trainable state, ×lora)."""
    where = result.get("costs_device") or "?"
    title = (
        f"Cost proxies — {result['model']}, {precision_label(result.get('autocast'))}: aten ops dispatched per train "
        f"step (forward, backward, foreach AdamW step; counted on the {where}); adapter ops = ops − the base row's, "
        f"per adapted layer = / {result.get('adapted_layers')} adapted linears. Memory proxy = bytes autograd saves "
        f"in one forward (distinct storages, dropout off, frozen weights excluded) + 3 × trainable parameter bytes "
        f"(weights, AdamW moments).\n\n"
    )
    head = ["method", "ops/step", "adapter ops/step", "per adapted layer", "ops ×lora", "saved MiB", "state MiB",
            "mem proxy MiB", "mem proxy ×lora"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for row in result["rows"]:
        rel = row.get("relative") or {}
        per_layer = row.get("adapter_ops_per_layer")
        cells = [
            row["name"],
            _fmt_int(row.get("ops_per_step")),
            _fmt_int(row.get("adapter_ops_per_step")),
            "-" if per_layer is None else f"{per_layer:.1f}",
            _fmt_ratio(rel.get("ops_vs_lora")),
            _fmt_mib(row.get("saved_bytes")),
            _fmt_mib(row.get("trainable_state_bytes")),
            _fmt_mib(row.get("mem_proxy_bytes")),
            _fmt_ratio(rel.get("mem_proxy_vs_lora")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return title + "\n".join(lines) + "\n"


def _fmt_int(x: Optional[int]) -> str:
    return "-" if x is None else f"{x:,}"


def _log_if_spread(ax, values: list[float]) -> str:
    """Log scale when one bar (BOFT on a CPU) would flatten all others."""
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > 30:
        ax.set_xscale("log")
        return ", log scale"
    return ""


def save_plot(device_results: dict[str, Any], device_name: str, path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; no plot (pip install matplotlib).")
        return None
    models = list(device_results.values())
    fig, axes = plt.subplots(len(models), 2, figsize=(13, 3.6 * len(models)), squeeze=False)
    for i, res in enumerate(models):
        rows = [r for r in res["rows"] if "step_s" in r]
        names = [r["name"] for r in rows]
        ypos = list(range(len(rows)))
        med = [1000 * r["step_s"]["median"] for r in rows]
        lo = [1000 * (r["step_s"]["median"] - r["step_s"]["p25"]) for r in rows]
        hi = [1000 * (r["step_s"]["p75"] - r["step_s"]["median"]) for r in rows]
        ax = axes[i][0]
        ax.barh(ypos, med, xerr=[lo, hi], color="tab:blue", capsize=3)
        ax.set_yticks(ypos, names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("train step, ms (median, IQR)" + _log_if_spread(ax, med))
        ax.set_title(f"{res['model']} ({res['layers_built']} layers) — step time", fontsize=10)
        for y, v in zip(ypos, med):
            ax.text(v, y, f" {v:.0f}", va="center", fontsize=7)
        mem = [(r.get("peak_train_mem_bytes") or 0) / MiB for r in rows]
        ax = axes[i][1]
        ax.barh(ypos, mem, color="tab:orange")
        ax.set_yticks(ypos, names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("peak train memory above frozen weights, MiB" + _log_if_spread(ax, mem))
        ax.set_title(f"{res['model']} — peak memory", fontsize=10)
        for y, v in zip(ypos, mem):
            ax.text(v, y, f" {v:.0f}", va="center", fontsize=7)
    fig.suptitle(f"PEFT adapters on {device_name}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def versions() -> dict[str, str]:
    import peft
    import transformers

    import gsoft

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "gsoft": getattr(gsoft, "__version__", "?"),
        "platform": platform.platform(),
    }


# ======================================================================================================================
# Main
# ======================================================================================================================
def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run the benchmark; returns the report that is also written to ``<output_dir>/results.json``."""
    try:
        return _main(argv)
    finally:
        _restore_fbd()  # leave PEFT's BOFT as we found it (main() may run inside a test session)


def _restore_fbd() -> None:
    if _ORIGINAL_GET_FBD_CUDA is not None:
        from peft.tuners.boft import layer as boft_layer

        boft_layer.get_fbd_cuda = _ORIGINAL_GET_FBD_CUDA


def _main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    settings, cli = load_settings(args)
    import gsoft  # noqa: F401 - registers GSOFT with PEFT

    out_dir = Path(settings["output_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    devices = resolve_devices(settings.get("devices"))
    unknown = [m for m in settings["run_models"] if m not in settings["models"]]
    if unknown:
        raise ValueError(f"Unknown model(s) {unknown}; known: {sorted(settings['models'])}.")

    started = time.perf_counter()
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name if argv is None else "main"] + (sys.argv[1:] if argv is None
                                                                                     else list(argv))),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "versions": versions(),
        "settings": settings,
        "memory_definition": "adapter params+buffers + AdamW state + peak tensor bytes allocated during one "
        "steady-state train step (torch.profiler memory events on CPU, cuda.max_memory_allocated on GPU); "
        "frozen base weights excluded",
        "ops_definition": "aten ops dispatched (TorchDispatchMode) in one steady-state train step: zero_grad, forward, "
        "loss.backward, foreach AdamW step, after >= 2 untimed steps, on the device of the run; adapter ops = ops - "
        "the base row's",
        "mem_proxy_definition": "bytes of the distinct storages autograd saves for backward in one forward "
        "(saved_tensors_hooks; dropout off; frozen parameters' storages excluded) + 3 x trainable parameter bytes",
        "devices": {},
    }
    tables: list[str] = []
    for dev in devices:
        s = for_device(settings, cli, dev)
        device = torch.device(dev)
        default_threads = torch.get_num_threads()
        if dev == "cpu" and s.get("threads"):
            torch.set_num_threads(int(s["threads"]))
        name = device_label(device)
        report["devices"][dev] = {"name": name, "settings": {k: s[k] for k in CLI_KEYS if k in s}, "models": {}}
        for model_name in s["run_models"]:
            result = bench_model(model_name, s["models"][model_name], s, device)
            report["devices"][dev]["models"][model_name] = result
            table = markdown_table(result, name, s)
            tables.append(table)
            print("\n" + table, flush=True)
            _write_outputs(out_dir, report, tables)
        if s.get("plot", True) and report["devices"][dev]["models"]:
            path = save_plot(report["devices"][dev]["models"], name, out_dir / f"bench_adapters_{dev}.png")
            if path:
                report["devices"][dev]["plot"] = str(path)
        torch.set_num_threads(default_threads)
    report["wall_s"] = time.perf_counter() - started
    _write_outputs(out_dir, report, tables)
    print(f"\nwrote {out_dir / 'results.json'}, {out_dir / 'tables.md'}"
          + "".join(f", {d['plot']}" for d in report["devices"].values() if d.get("plot"))
          + f" in {report['wall_s']:.0f}s", flush=True)
    return report


def _write_outputs(out_dir: Path, report: dict[str, Any], tables: list[str]) -> None:
    with open(out_dir / "results.json", "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(out_dir / "tables.md", "w") as f:
        f.write(f"<!-- {report['command']} ({report['date']}) -->\n\n" + "\n".join(tables))


if __name__ == "__main__":
    main()
