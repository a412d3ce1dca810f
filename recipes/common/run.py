"""Run bookkeeping shared by the recipes: output directories that protect earlier runs, one results.json schema (never
holding NaN), honest step timing and peak memory, and the finiteness checks of trained state."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Union

import torch
from torch import nn

#: The keys every recipe's ``results.json`` has; recipes add their own (``task``, ``eval``, ...) next to them.
RESULTS_SCHEMA: dict[str, str] = {
    "method": "gsoft | double_gsoft | lora | oft | boft | full",
    "trainable_params": "parameters updated by the optimiser (adapter + any modules_to_save)",
    "total_params": "all parameters of the trained model, frozen ones included",
    "train_steps": "optimizer steps taken (after gradient accumulation), resumed steps included",
    "train_runtime_s": "wall-clock seconds of the training loop in this process (excludes set-up; after a resume "
    "only the resumed part)",
    "step_time_s_median": "median seconds per optimizer step (first step excluded as warm-up)",
    "peak_memory_mb": "CUDA: peak allocated tensor memory; CPU: peak resident memory of the process (MiB)",
    "world_size": "number of data-parallel processes",
}

#: Options that may change between runs in one output directory without making it a different run.
VOLATILE_KEYS = frozenset(
    {
        "output_dir",
        "overwrite_output_dir",
        "resume_from_checkpoint",
        "stop_after_steps",
        "logging_steps",
        "eval_steps",
        "save_steps",
        "checkpointing_steps",
        "checkpoints_total_limit",
        "validation_steps",
        "report_to",
        "initial_peers",  # a hivemind peer may rejoin its swarm through any running peer, from another address
        "host_maddrs",
        "announce_maddrs",
        "min_peers",
        "peer_wait_timeout",
        "dataloader_num_workers",
        "num_workers",
        "progress_bar",
    }
)

RUN_CONFIG = "run_config.json"
RESULTS = "results.json"


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)``; PEFT models count their frozen base and adapters once (PEFT's own counter)."""
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
        return int(trainable), int(total)
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


class StepTimer:
    """Times optimizer steps (``with timer: ...``); synchronises the device so GPU steps are not undercounted."""

    def __init__(self, device: Union[torch.device, str], warmup: int = 1) -> None:
        self.device = torch.device(device)
        self.warmup = warmup
        self.times: list[float] = []
        self._start: Optional[float] = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        """Open a step; with gradient accumulation call it at the first micro-batch of the optimizer step."""
        self._sync()
        self._start = time.perf_counter()

    def stop(self) -> None:
        """Close the step opened by :meth:`start` (e.g. when ``accelerator.sync_gradients`` is true)."""
        if self._start is None:
            raise RuntimeError("StepTimer.stop() without a matching start()")
        self._sync()
        self.times.append(time.perf_counter() - self._start)
        self._start = None

    @property
    def running(self) -> bool:
        return self._start is not None

    def __enter__(self) -> "StepTimer":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def median_s(self) -> Optional[float]:
        timed = self.times[self.warmup :] or self.times
        return statistics.median(timed) if timed else None


def peak_memory_mb(device: Union[torch.device, str]) -> float:
    """Peak memory in MiB: allocated tensors on CUDA; on CPU the process's peak resident set (the whole process, so
    compare runs of the same recipe, not against GPU numbers)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def reset_peak_memory(device: Union[torch.device, str]) -> None:
    """Start a new peak for :func:`peak_memory_mb`, so several runs in one process (benchmarks) are measured apart.

    CUDA: the allocator's peak counters. CPU on Linux: writing ``5`` to ``/proc/self/clear_refs`` resets the peak-RSS
    watermark that ``getrusage`` reports; elsewhere the CPU peak keeps growing over the process's life.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def leave_process_group() -> None:
    """End a multi-process run together: a process that exits while another still holds gloo's connections can abort
    ("terminate called without an active exception", SIGABRT after the final results are written). A no-op in a
    single process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def accelerator_kwargs(**kwargs: Any) -> dict[str, Any]:
    """Keyword arguments for ``Accelerator`` that make ``accelerate launch --multi_gpu --num_processes N`` on a
    machine without GPUs one N-process gloo job (MULTI_CPU) instead of N independent single-process runs writing the
    same output directory: accelerate only picks MULTI_CPU when ``cpu=True``. Under torch's elastic agent (torchrun,
    and accelerate launch, which runs it) that gloo job's process group is joined here, per restart
    (:func:`join_elastic_process_group`); accelerate then uses it."""
    launched_many = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if launched_many and not torch.cuda.is_available():
        kwargs.setdefault("cpu", True)
        join_elastic_process_group()
    return kwargs


#: Set by torch's elastic agent in every worker: how many times this agent has restarted its worker group.
RESTART_COUNT = "TORCHELASTIC_RESTART_COUNT"
#: torch's switch that gives every rendezvous round a store of its own (set where torchrun runs).
FRESH_STORES = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


def join_elastic_process_group() -> bool:
    """Under one torch elastic agent that shares its store with the workers (torchrun's default), initialise the
    default gloo process group with its keys under a prefix of this restart (``gsoft/attempt_<restart count>/``);
    whether it did. Under several agents sharing their store, warn that a restart can fail or hang (see below) and
    name the fix.

    Why: the agent hands every restart of the worker group the same store (``MASTER_ADDR:MASTER_PORT``), and the gloo
    group's full-mesh connection reads each peer's address from keys that do not change between restarts, so a
    restarted process can read an address of the previous attempt's dead processes: it fails with "Gloo
    connectFullMesh failed ... Connection refused" (one more restart used up) or waits for a connection that never
    comes, until the group's 30-minute timeout. One agent's restart count is the same in all its workers, so a prefix
    per restart keeps every attempt's keys apart. Several agents count restarts each on their own (a restart for a
    membership change is not counted), so no prefix is shared by a round's workers: there, torch's
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (a new store for every round) is the fix."""
    attempt = os.environ.get(RESTART_COUNT)
    if (attempt is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
            or not torch.distributed.is_available() or torch.distributed.is_initialized()):
        return False
    if int(os.environ.get("GROUP_WORLD_SIZE", "1")) > 1:
        if os.environ.get("RANK") == "0":
            logging.getLogger(__name__).warning(
                "%s elastic agents share one store with their workers across restarts: a restarted worker group can "
                "read the gloo addresses of the previous one and fail to connect, or wait for the process group's "
                "timeout. Launch torchrun with %s=1 in its environment (a new store for every rendezvous round).",
                os.environ["GROUP_WORLD_SIZE"], FRESH_STORES)
        return False
    store, rank, world_size = next(torch.distributed.rendezvous("env://"))
    torch.distributed.init_process_group(
        "gloo", store=torch.distributed.PrefixStore(f"gsoft/attempt_{attempt}", store), rank=rank,
        world_size=world_size)
    return True


def atomic_write_json(path: Path, data: Any, *, durable: bool = False) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file and a rename, so readers see the old file or the
    whole new one; ``durable`` also flushes it to disk before the rename (a checkpoint's manifest)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def _comparable(config: dict[str, Any], volatile: Iterable[str]) -> dict[str, Any]:
    skip = set(volatile)
    # Round-trip through JSON so tuples vs lists and paths vs strings compare equal.
    return json.loads(json.dumps({k: v for k, v in config.items() if k not in skip}, sort_keys=True, default=str))


@contextlib.contextmanager
def discard_new_output_dir_on_error(output_dir: Union[str, Path], new: bool,
                                   is_main_process: bool = True) -> Iterator[None]:
    """Remove ``output_dir`` when the block fails and the directory was created by this run (``new``): a refused
    option (a block size that does not fit, bf16 on gloo) is fixed and the run started again, which must not meet
    "a directory holding another run" from :func:`prepare_output_dir`. The directory is first renamed away (one
    atomic step), then deleted: a process killed meanwhile (an elastic agent stopping the group after a peer died)
    leaves it whole or gone, never a directory without its ``run_config.json`` that every restart would refuse."""
    try:
        yield
    except Exception:
        if new and is_main_process:
            out = Path(output_dir)
            doomed = out.with_name(f".{out.name}.discarded-{os.getpid()}")
            shutil.rmtree(doomed, ignore_errors=True)  # an earlier process's with this id
            with contextlib.suppress(FileNotFoundError):
                os.replace(out, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        raise


def prepare_output_dir(
    output_dir: Union[str, Path],
    run_config: dict[str, Any],
    *,
    overwrite: bool,
    resume: bool,
    is_main_process: bool = True,
    volatile_keys: Iterable[str] = (),
    barrier: Optional[Callable[[], None]] = None,
) -> Path:
    """Create ``output_dir`` for this run, refusing to mix it with a different one.

    A directory holding another run (a different ``run_config.json``, ignoring :data:`VOLATILE_KEYS`), a finished
    run of the same config (``results.json``) when not resuming, or foreign files is refused unless
    ``overwrite``, which deletes it first (only directories a recipe made, or empty ones). Call it on every process
    with the processes' ``barrier`` (``accelerator.wait_for_everyone``): all check the directory as they found it,
    so they refuse it together, then wait for each other, and only then does the main process write.
    """
    out = Path(output_dir)
    volatile = VOLATILE_KEYS | set(volatile_keys)
    if overwrite and resume:
        raise ValueError("--overwrite_output_dir and --resume_from_checkpoint contradict each other: pick one.")
    existing = out / RUN_CONFIG
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output_dir {str(out)!r} exists and is not a directory.")
    contents = list(out.iterdir()) if out.is_dir() else []
    if contents and not existing.is_file():
        raise ValueError(
            f"--output_dir {str(out)!r} is not empty and was not made by a gsoft recipe (no {RUN_CONFIG}); "
            "choose another --output_dir. (--overwrite_output_dir only deletes directories a recipe made.)"
        )
    if contents and not overwrite:
        try:
            previous = json.loads(existing.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{existing} is unreadable ({exc}); use --overwrite_output_dir or another --output_dir.")
        old, new = _comparable(previous, volatile), _comparable(run_config, volatile)
        if old != new:
            changed = sorted(k for k in set(old) | set(new) if old.get(k, "<unset>") != new.get(k, "<unset>"))
            detail = ", ".join(f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in changed[:5])
            raise ValueError(
                f"--output_dir {str(out)!r} already holds a different run ({detail}"
                f"{', ...' if len(changed) > 5 else ''}). Pass --overwrite_output_dir to replace it, or choose "
                "another --output_dir."
            )
        if (out / RESULTS).is_file() and not resume:
            raise ValueError(
                f"--output_dir {str(out)!r} already holds a finished run of this config ({RESULTS}). Pass "
                "--overwrite_output_dir to run it again, or --resume_from_checkpoint latest to continue it."
            )
    if barrier is not None:
        barrier()  # nobody changes the directory before every process has looked at it
    if is_main_process:
        if contents and overwrite:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / RUN_CONFIG, run_config)
    return out


def write_results(output_dir: Union[str, Path], results: dict[str, Any]) -> Path:
    """Write ``results.json`` (flat, sorted keys) after checking the common keys of :data:`RESULTS_SCHEMA` and that
    no number in it is NaN or infinite (the training loop stops a diverged run before; this is the last gate)."""
    missing = [key for key in RESULTS_SCHEMA if key not in results]
    if missing:
        raise ValueError(f"results are missing the common keys {missing} (see common.run.RESULTS_SCHEMA).")
    bad = nonfinite_numbers(results)
    if bad:
        raise ValueError(f"results.json not written: it would hold non-finite values ({', '.join(bad[:5])}).")
    path = Path(output_dir) / RESULTS
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, results)
    return path


# ---- finiteness ------------------------------------------------------------------------------------------------------
def format_nonfinite(value: float) -> str:
    """``NaN``, ``inf`` or ``-inf`` for messages; other numbers as ``repr`` gives them."""
    if math.isnan(value):
        return "NaN"
    return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)


def nonfinite_numbers(value: Any, key: str = "") -> list[str]:
    """``key = NaN`` for every NaN or infinite float in a nest of mappings and sequences (dotted keys)."""
    if isinstance(value, float):
        return [] if math.isfinite(value) else [f"{key or 'value'} = {format_nonfinite(value)}"]
    if isinstance(value, Mapping):
        return [bad for k, v in value.items() for bad in nonfinite_numbers(v, f"{key}.{k}" if key else str(k))]
    if isinstance(value, (list, tuple)):
        return [bad for i, v in enumerate(value) for bad in nonfinite_numbers(v, f"{key}[{i}]")]
    return []


def all_finite(tensors: Iterable[torch.Tensor], device: Union[torch.device, str]) -> torch.Tensor:
    """Whether every element of the floating-point ``tensors`` is finite, as a 0-dim bool tensor on ``device``,
    without a device sync: a caller combines it with other flags and reads them together."""
    flags = [torch.isfinite(t.detach()).all().to(device) for t in tensors if t.is_floating_point()]
    return torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool, device=device)


def nonfinite_names(named: Iterable[tuple[str, torch.Tensor]], limit: int = 3) -> list[str]:
    """The names of the first ``limit`` floating-point tensors holding NaN or inf. One device sync per tensor: for
    messages once something is known to be wrong, and for a one-off check such as a resumed state."""
    found: list[str] = []
    for name, tensor in named:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor.detach()).all()):
            found.append(name)
            if len(found) >= limit:
                break
    return found
