"""What every benchmark measures and how it reports it, in one place, so that two benchmarks that print the same
column measure it the same way.

* devices: ``resolve_device``, ``device_label``, ``sync``, ``cpu_threads``;
* time: ``timed`` (one call, synchronised), ``repeat_timed``, ``interleaved_times`` (every method in turn, so that
  machine noise hits all alike), ``summary`` (median and quartiles);
* memory: ``peak_step_bytes`` (peak tensor bytes of one call: the CUDA allocator, or the CPU profiler's allocation
  events), ``saved_tensor_bytes`` (what autograd keeps for the backward), ``tensor_bytes`` / ``model_bytes`` /
  ``optimizer_state_bytes`` / ``trainable_state_bytes``;
* host overhead: ``count_ops`` (aten ops dispatched, a ``TorchDispatchMode``) and ``foreach_optimizer``;
* PEFT BOFT on any device: ``boft_fbd`` (a pure-PyTorch stand-in for PEFT's CUDA-only block-diagonal extension);
* environment: ``versions``, ``load_average``, ``progress``;
* reports: ``ratio`` / ``add_ratios`` (``<prefix>_vs_<reference>`` columns), ``check_targets`` / ``targets_text``
  (``value <= limit``, reported, never raised), ``markdown_table`` and the number formats, ``bar_panel`` and
  ``subplots`` for the plots, ``report_header`` and ``write_outputs`` (``<name>.md``, ``<name>.json`` and
  ``<name>.png`` in ``--output_dir``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import importlib
import importlib.util
import json
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Iterator, Literal, Mapping, Optional, Sequence, get_args

import torch
from torch.utils._python_dispatch import TorchDispatchMode

MiB = 2**20


# ======================================================================================================================
# Devices
# ======================================================================================================================
#: A device option: ``auto`` (CUDA when available, else the CPU), ``cpu`` or ``cuda``.
DeviceName = Literal["auto", "cpu", "cuda"]


def resolve_device(spec: str) -> torch.device:
    """``auto`` (CUDA when available, else the CPU), ``cpu`` or ``cuda``; a CUDA request without a GPU is an error."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec not in get_args(DeviceName):
        raise ValueError(f"Unknown device {spec!r}; use one of {', '.join(get_args(DeviceName))}.")
    if spec == "cuda" and not torch.cuda.is_available():
        raise ValueError("cuda asked for, but torch.cuda.is_available() is False: no CUDA GPU here; use cpu.")
    return torch.device(spec)


def device_label(device: torch.device) -> str:
    """``cuda (<GPU name>)`` or ``cpu (<processor>, <n> threads)``: the device line of every table."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    n = torch.get_num_threads()
    return f"cpu ({platform.processor() or platform.machine()}, {n} thread{'s' if n != 1 else ''})"


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so that a wall-clock interval covers the kernels."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def cpu_threads(device: torch.device, threads: Optional[int]) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` inside on a CPU (unchanged when ``threads`` is None or on a GPU); the
    previous count is restored, so several devices or benchmarks in one process do not leak their setting."""
    previous = torch.get_num_threads()
    if device.type == "cpu" and threads:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ======================================================================================================================
# Time
# ======================================================================================================================
def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call of ``fn``, synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def repeat_timed(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int = 0) -> list[float]:
    """``warmup`` untimed calls, then the seconds of each of ``reps`` timed calls."""
    for _ in range(warmup):
        fn()
    return [timed(fn, device) for _ in range(reps)]


def interleaved_times(
    steps: Mapping[str, Callable[[], Any]],
    device: torch.device,
    rounds: Mapping[str, int],
    steps_per_round: Mapping[str, int],
    bar: Any = None,
    failed: Optional[Callable[[str, BaseException], None]] = None,
) -> dict[str, list[float]]:
    """``for round: for key: time steps_per_round[key] calls of steps[key]`` (a key takes part in its first
    ``rounds[key]`` rounds): machine noise (other processes, clock changes) then hits every method alike.

    A step that raises ends that key's timing: the exception goes to ``failed(key, exc)``, or propagates when
    ``failed`` is None. ``bar`` (see :func:`progress`) advances once per timed call."""
    samples: dict[str, list[float]] = {key: [] for key in steps}
    live = list(steps)
    for r in range(max(rounds.values(), default=0)):
        for key in list(live):
            if r >= rounds[key]:
                continue
            if bar is not None:
                bar.set_postfix_str(f"round {r + 1} {key}")
            for _ in range(steps_per_round[key]):
                try:
                    samples[key].append(timed(steps[key], device))
                except Exception as exc:
                    if failed is None:
                        raise
                    failed(key, exc)
                    live.remove(key)
                    break
                if bar is not None:
                    bar.update()
    return samples


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (``q`` in [0, 1]); NaN for no values."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary(samples: Sequence[float]) -> dict[str, float]:
    """Median, quartiles, minimum and count of timing samples (tables show the median: robust to a stray slow run)."""
    return {
        "median": percentile(samples, 0.5),
        "p25": percentile(samples, 0.25),
        "p75": percentile(samples, 0.75),
        "min": min(samples) if samples else float("nan"),
        "n": len(samples),
    }


# ======================================================================================================================
# Memory
# ======================================================================================================================
def tensor_bytes(tensors: Iterable[Any]) -> int:
    """Bytes of the distinct storages of ``tensors`` (views and shared storages count once; non-tensors skipped)."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        key = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers."""
    return tensor_bytes(list(model.parameters()) + list(model.buffers()))


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of an optimizer's state tensors (AdamW: the two moments and the step counters)."""
    return tensor_bytes(v for state in opt.state.values() for v in state.values())


def trainable_state_bytes(model: torch.nn.Module) -> int:
    """3 x the trainable parameter bytes: the weights and AdamW's two moments (gradients are transient)."""
    return 3 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def peak_step_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak tensor bytes allocated by one call of ``fn`` above what was allocated when it started.

    On a GPU ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. On a CPU the allocation and free
    events that ``torch.profiler`` records with ``profile_memory=True``, summed in time order (their maximum): every
    tensor storage the PyTorch allocator hands out and nothing else, neither the allocator's caching nor BLAS scratch
    memory, so it is reproducible in one process where RSS is not. The CPU analogue of ``max_memory_allocated``."""
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
    except AttributeError as exc:
        raise RuntimeError(
            f"torch {torch.__version__}'s profiler has no kineto_results.events(), which the CPU peak memory reads; "
            "measure without it (--memory false) or on a GPU."
        ) from exc
    allocations = sorted(
        (e.start_ns(), e.nbytes())
        for e in events
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    running = peak = 0
    for _, nbytes in allocations:
        running += nbytes
        peak = max(peak, running)
    return peak


def peak_train_memory(train_step: Callable[[], Any], model: torch.nn.Module, opt: torch.optim.Optimizer,
                      frozen_bytes: int, device: torch.device) -> dict[str, int]:
    """What one train step needs on top of the frozen weights (``frozen_bytes``, the same for every method):
    adapter state (the model's parameters and buffers beyond the frozen ones) + optimizer state + the peak tensor
    bytes of ``train_step`` (forward, backward, optimizer step; the gradients are freed first, so they count)."""
    opt.zero_grad(set_to_none=True)
    gc.collect()
    peak = peak_step_bytes(train_step, device)
    adapter, state = model_bytes(model) - frozen_bytes, optimizer_state_bytes(opt)
    return {"adapter_state_bytes": adapter, "optimizer_state_bytes": state, "peak_step_bytes": peak,
            "peak_train_mem_bytes": adapter + state + peak}


@contextlib.contextmanager
def dropout_off(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Every dropout module at p = 0 inside (RoBERTa's attention reads its dropout module's p as well), restored
    after. Dropout masks are saved tensors of the base model, the same for every method: they only dilute ratios."""
    modules = [m for m in model.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]
    saved = [m.p for m in modules]
    for m in modules:
        m.p = 0.0
    try:
        yield model
    finally:
        for m, p in zip(modules, saved):
            m.p = p


def saved_tensor_bytes(model: torch.nn.Module, forward: Callable[[], Any]) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``forward()`` runs ``model`` (dropout off).

    Storages of frozen parameters are excluded (they are in memory anyway); autocast's low-precision copies of them
    are counted. A tensor that an ``autograd.Function`` keeps as a ``ctx`` attribute instead of
    ``save_for_backward`` is not seen. The output (and with it the graph) is dropped: no backward runs."""
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
        output = forward()
    del output
    return total


# ======================================================================================================================
# Host overhead: dispatched ops
# ======================================================================================================================
class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched while active. Each is at least one kernel launch on a GPU, plus Python and
    dispatcher work on the host, so the count measures a step's host overhead without a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's hook signature
        self.count += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], Any]) -> int:
    """aten ops dispatched by one call of ``fn`` (a custom op, such as a fused Triton kernel, counts as one)."""
    with OpCounter() as counter:
        fn()
    return counter.count


@contextlib.contextmanager
def foreach_optimizer(opt: torch.optim.Optimizer) -> Iterator[torch.optim.Optimizer]:
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


# ======================================================================================================================
# PEFT BOFT without its CUDA extension
# ======================================================================================================================
#: ``boft_fbd`` modes: ``torch`` = the pure-PyTorch stand-in, ``peft`` = PEFT's own extension loader.
BoftFbd = Literal["torch", "peft"]
BOFT_FBD_MODES = get_args(BoftFbd)


class TorchFastBlockDiag:
    """Pure-PyTorch stand-in for PEFT's CUDA-only ``fbd_cuda`` extension (same signatures and results).

    PEFT's extension does not build on current toolchains, and without it PEFT silently drops BOFT to one butterfly
    factor; with the stand-in the configured factors run on any device.
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


def _torch_fbd() -> type[TorchFastBlockDiag]:
    return TorchFastBlockDiag


_PEFT_GET_FBD_CUDA: list[Callable[[], Any]] = []  # PEFT's own loader, kept at the first boft_fbd


@contextlib.contextmanager
def boft_fbd(mode: str) -> Iterator[None]:
    """Inside, PEFT's BOFT takes its block-diagonal op from ``torch``: :class:`TorchFastBlockDiag`, or ``peft``: its
    own ``get_fbd_cuda`` (on a CPU it fails to build and PEFT sets ``boft_n_butterfly_factor=1``). PEFT looks the op
    up while building a layer and at every forward and backward, so a benchmark runs whole BOFT steps inside; blocks
    nest, and each restores what was installed before it."""
    if mode not in BOFT_FBD_MODES:
        raise ValueError(f"Unknown BOFT fbd mode {mode!r}; use one of {', '.join(BOFT_FBD_MODES)}.")
    from peft.tuners.boft import layer as boft_layer

    previous = boft_layer.get_fbd_cuda
    if not _PEFT_GET_FBD_CUDA:
        _PEFT_GET_FBD_CUDA.append(previous)  # the first block is entered outside every other: PEFT's own loader
    boft_layer.get_fbd_cuda = _torch_fbd if mode == "torch" else _PEFT_GET_FBD_CUDA[0]
    try:
        with warnings.catch_warnings():
            if mode == "peft":
                warnings.simplefilter("ignore")  # "Failed to load the CUDA extension", once per layer
            yield
    finally:
        boft_layer.get_fbd_cuda = previous


def boft_factors_used(model: torch.nn.Module) -> list[int]:
    """The butterfly factor counts of a PEFT BOFT model's layers (PEFT silently uses 1 without its extension)."""
    return sorted({p.shape[0] for n, p in model.named_parameters() if "boft_R" in n and p.requires_grad})


# ======================================================================================================================
# Environment
# ======================================================================================================================
def versions(*extra: str) -> dict[str, str]:
    """Versions of Python, torch, transformers, peft, gsoft and of the optional ``extra`` packages ("not installed"
    where absent), plus the platform."""
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "gsoft", *extra):
        if name in extra and importlib.util.find_spec(name) is None:
            out[name] = "not installed"
        else:
            out[name] = getattr(importlib.import_module(name), "__version__", "unknown")
    out["platform"] = platform.platform()
    return out


def load_average() -> Optional[list[float]]:
    """The 1, 5 and 15 minute load averages (other processes slow a timing run down); None on platforms without."""
    if not hasattr(os, "getloadavg"):
        return None
    return [round(x, 2) for x in os.getloadavg()]


def progress(total: int, desc: str) -> Any:
    """A tqdm bar on stderr (``update()``, ``set_postfix_str()``, ``close()``) for the benchmarks' long loops."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)


# ======================================================================================================================
# Ratios and targets
# ======================================================================================================================
def ratio(value: Optional[float], reference: Optional[float]) -> Optional[float]:
    """``value / reference``; None when either is missing or NaN, or the reference is 0."""
    if value is None or reference is None or math.isnan(value) or math.isnan(reference) or reference == 0:
        return None
    return value / reference


def _number(row: Optional[Mapping[str, Any]], name: str) -> Optional[float]:
    """A row's number; a timing summary (a mapping with a median) gives its median."""
    if row is None or row.get(name) is None:
        return None
    value = row[name]
    return value["median"] if isinstance(value, Mapping) else value


def add_ratios(
    rows: Sequence[dict[str, Any]],
    references: Mapping[str, str],
    fields: Mapping[str, str],
    key: str = "key",
    group: Optional[Callable[[Mapping[str, Any]], Hashable]] = None,
) -> None:
    """``row["relative"]["<prefix>_vs_<label>"]`` = the row's ``fields[prefix]`` / that of the row whose ``key`` is
    ``references[label]`` (in the same ``group``, e.g. the same shape), for every prefix and label; None where either
    side is missing. A row's own reference gets 1.0: the column shows which row the others are measured against."""
    by_id = {((group(r) if group else None), r[key]): r for r in rows}
    for row in rows:
        where = group(row) if group else None
        relative = row.setdefault("relative", {})
        for label, ref_key in references.items():
            ref = by_id.get((where, ref_key))
            for prefix, name in fields.items():
                relative[f"{prefix}_vs_{label}"] = ratio(_number(row, name), _number(ref, name))


def target_specs(targets: Mapping[str, Any], method_specs: Sequence[Mapping[str, Any]] = ()) -> dict[str, dict]:
    """``{method key: {metric: limit}}`` from a ``targets`` option (``{method: key, <metric>: limit, ...}``) and the
    ``targets`` of method entries (``{key, targets: {metric: limit}}``; these win)."""
    top = dict(targets)
    method = top.pop("method", None)
    specs: dict[str, dict] = {method: top} if method is not None else {}
    for entry in method_specs:
        specs.setdefault(entry["key"], {}).update(entry.get("targets") or {})
    return {key: metrics for key, metrics in specs.items() if metrics}


def check_targets(rows: Sequence[Mapping[str, Any]], specs: Mapping[str, Mapping[str, float]],
                  key: str = "key") -> list[dict[str, Any]]:
    """Every target ``{method key: {metric: limit}}`` of a method in ``rows``: a metric is a key of the row's
    ``relative`` and holds when ``value <= limit`` (``ok`` None when the value was not measured)."""
    by_key = {r[key]: r for r in rows}
    out = []
    for method, metrics in specs.items():
        if method not in by_key:
            continue
        for metric, limit in metrics.items():
            value = (by_key[method].get("relative") or {}).get(metric)
            out.append({"method": method, "metric": metric, "value": value, "limit": limit,
                        "ok": None if value is None else value <= limit})
    return out


def targets_text(targets: Sequence[Mapping[str, Any]]) -> str:
    """One line per method (``Targets for `gsoft`: metric = value (≤ limit: ok | MISSED | n/a); ...``), then one that
    counts the held targets and names the missed ones. A miss is reported here, never raised."""
    if not targets:
        return ""
    by_method: dict[str, list[Mapping[str, Any]]] = {}
    for t in targets:
        by_method.setdefault(t["method"], []).append(t)
    text = "\n"
    for method, items in by_method.items():
        text += f"Targets for `{method}`: " + "; ".join(
            f"{t['metric']} = {fmt_ratio(t['value'])} (≤ {t['limit']}: "
            f"{'ok' if t['ok'] else 'MISSED' if t['ok'] is not None else 'n/a'})"
            for t in items
        ) + "\n"
    held = sum(t["ok"] is True for t in targets)
    missed = [f"{t['method']} {t['metric']} {fmt_ratio(t['value'])} > {t['limit']}"
              for t in targets if t["ok"] is False]
    text += f"\nTargets held: {held} of {len(targets)}" + (f"; MISSED: {', '.join(missed)}" if missed else "") + ".\n"
    return text


# ======================================================================================================================
# Tables
# ======================================================================================================================
def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: Optional[str] = None) -> str:
    """A markdown table; ``align`` has one letter per column, ``l`` (names) or ``r`` (numbers); default: the first
    column left, the others right."""
    align = align or "l" + "r" * (len(header) - 1)
    if len(align) != len(header) or set(align) - {"l", "r"}:
        raise ValueError(f"align {align!r} needs one l or r per column of {list(header)}")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def fmt_ratio(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}x"


def fmt_ms(seconds: Optional[float]) -> str:
    """Milliseconds, three significant figures at most; ``-`` when not measured."""
    if seconds is None or math.isnan(seconds):
        return "-"
    ms = 1000 * seconds
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.3g}"


def fmt_mib(nbytes: Optional[float]) -> str:
    return "-" if nbytes is None else f"{nbytes / MiB:.0f}" if nbytes >= 10 * MiB else f"{nbytes / MiB:.1f}"


def fmt_int(x: Optional[int]) -> str:
    return "-" if x is None else f"{x:,}"


def fmt_bytes(nbytes: Optional[float]) -> str:
    """Decimal units (MB, KB, B), as network rates are quoted; ``n/a`` when not measured."""
    if nbytes is None:
        return "n/a"
    for unit, scale in (("MB", 1e6), ("KB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes:.0f} B"


# ======================================================================================================================
# Plots
# ======================================================================================================================
def subplots(rows: int, cols: int, width: float, height: float) -> tuple[Any, Any]:
    """A figure of ``rows x cols`` axes (always a 2-D array) on matplotlib's file-only backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, cols, figsize=(width, height), squeeze=False)


def bar_panel(ax: Any, labels: Sequence[str], values: Sequence[float], xlabel: str, title: str,
              errors: Optional[tuple[Sequence[float], Sequence[float]]] = None, color: str = "tab:blue",
              fmt: str = "{:.0f}") -> None:
    """Horizontal bars, one per method (top to bottom in table order), each labelled with its value; a log scale
    when one bar would flatten the others (BOFT on a CPU)."""
    ypos = list(range(len(labels)))
    ax.barh(ypos, values, xerr=errors, color=color, capsize=3 if errors else 0)
    ax.set_yticks(ypos, labels, fontsize=8)
    ax.invert_yaxis()
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > 30:
        from matplotlib.ticker import NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # decade labels only: minor labels overlap
        xlabel += ", log scale"
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    for y, v in zip(ypos, values):
        ax.text(v, y, " " + fmt.format(v), va="center", fontsize=7)


# ======================================================================================================================
# Results
# ======================================================================================================================
def train_step_rows(step: Callable[[str, bool], Any], models: Mapping[str, torch.nn.Module],
                    opts: Mapping[str, torch.optim.Optimizer], options: Any, frozen_bytes: int,
                    device: torch.device, label: str) -> dict[str, dict[str, Any]]:
    """Every model's train step, side by side, as ``options`` (a :class:`bench.options.TrainStepOptions`) say:
    ``warmup`` untimed steps each, then ``rounds`` interleaved rounds of ``steps_per_round`` timed steps, then (with
    ``memory``) one profiled step each (:func:`peak_train_memory`). ``step(method, zero_grad)`` runs one step of that
    method. Per method: ``step_s`` (:func:`summary`), ``step_samples_s`` and the peak memory keys."""
    bar = progress(len(models) * (options.warmup + options.rounds * options.steps_per_round + int(options.memory)),
                   label)
    for method in models:
        for _ in range(options.warmup):
            bar.set_postfix_str(f"warmup {method}")
            step(method, True)
            bar.update()
    times = interleaved_times({m: (lambda m=m: step(m, True)) for m in models}, device,
                              dict.fromkeys(models, options.rounds),
                              dict.fromkeys(models, options.steps_per_round), bar)
    rows: dict[str, dict[str, Any]] = {}
    for method, model in models.items():
        row = rows[method] = {"step_s": summary(times[method]), "step_samples_s": times[method]}
        if options.memory:
            bar.set_postfix_str(f"memory {method}")
            row.update(peak_train_memory(lambda m=method: step(m, False), model, opts[method], frozen_bytes, device))
            bar.update()
    bar.close()
    return rows


def step_memory_table(rows: Sequence[Mapping[str, Any]], refs: Sequence[str]) -> str:
    """The table of a side-by-side train-step benchmark: parameters, step time, peak train memory and their ratios
    to the ``refs`` (rows with ``name``, ``trainable_params`` and :func:`add_ratios`' ``relative``)."""
    header = ["method", "params", "step ms", *[f"step ×{k}" for k in refs], "peak train MiB",
              *[f"mem ×{k}" for k in refs]]
    cells = [[r["name"], f"{r['trainable_params']:,}", fmt_ms(r["step_s"]["median"]),
              *[fmt_ratio(r["relative"][f"step_vs_{k}"]) for k in refs],
              fmt_mib(r.get("peak_train_mem_bytes")),
              *[fmt_ratio(r["relative"][f"mem_vs_{k}"]) for k in refs]] for r in rows]
    return markdown_table(header, cells)


def step_memory_plot(rows: Sequence[Mapping[str, Any]], title: str) -> Any:
    """Step time and peak train memory per method, two bar panels."""
    names = [r["method"] for r in rows]
    fig, axes = subplots(1, 2, 11, 0.4 * len(rows) + 2)
    bar_panel(axes[0][0], names, [1000 * r["step_s"]["median"] for r in rows], "train step, ms (median)",
              "step time")
    bar_panel(axes[0][1], names, [(r.get("peak_train_mem_bytes") or 0) / MiB for r in rows],
              "peak train memory above frozen weights, MiB", "peak memory", color="tab:orange")
    fig.suptitle(title, fontsize=10)
    return fig


def report_header(name: str, options: Any, *extra_packages: str) -> dict[str, Any]:
    """What every ``<name>.json`` starts with: the benchmark, its command line, date, versions and options."""
    return {
        "benchmark": name,
        "command": " ".join(["python", "recipes/benchmark.py", name, *getattr(options, "argv", [])]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(*extra_packages),
        "options": dataclasses.asdict(options),
    }


def write_outputs(output_dir: str | Path, name: str, table: str, report: Mapping[str, Any], figure: Any = None,
                  announce: bool = True) -> list[Path]:
    """Write ``<name>.md`` (the tables as printed), ``<name>.json`` (every number) and, given a matplotlib figure,
    ``<name>.png`` into ``output_dir``; says where unless ``announce`` is false (intermediate writes)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.md", out / f"{name}.json"]
    paths[0].write_text(table)
    paths[1].write_text(json.dumps(report, indent=1, default=str) + "\n")
    if figure is not None:
        import matplotlib.pyplot as plt

        figure.tight_layout()
        paths.append(out / f"{name}.png")
        figure.savefig(paths[-1], dpi=110)
        plt.close(figure)
    if announce:
        print("wrote " + ", ".join(str(p) for p in paths), flush=True)
    return paths
