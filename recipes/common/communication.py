"""Communication options of the recipes (``--grad_compression``, ``--local_steps``, ...) and their wiring to
``gsoft.distributed.register_compression``, written once for every recipe.

Why here and not in each recipe: the options, their validation messages, the single-process warning, the
synchronisation points and the results.json fields must mean the same thing in the GLUE and the DreamBooth recipe
(the README documents them once).

A recipe's options dataclass gets the fields by inheriting :class:`CommunicationArgs` *first*, with its own fields in
a base class after it, so that ``--help`` lists the recipe's options first and the communication section last::

    @dataclass
    class _MyOptions: ...                                   # the recipe's own fields

    @dataclass
    class MyArgs(CommunicationArgs, _MyOptions):
        def __post_init__(self):
            ...                                             # the recipe's checks
            check_communication_args(self)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from gsoft.distributed import (
    COLLECTIVES,
    ERROR_FEEDBACKS,
    METHODS,
    SCHEDULES,
    TARGETS,
    CompressionConfig,
    CompressionState,
    register_compression,
)
from gsoft.distributed.state import SingleProcessState

from .checkpoint import MANIFEST

logger = logging.getLogger(__name__)
_GUARDED = "_gsoft_world_size_guard"
_CUSTOM_STATE = re.compile(r"^custom_checkpoint_\d+\.pkl$")  # accelerate's name for a registered object's state


@dataclass
class CommunicationArgs:
    """What data-parallel processes exchange (``gsoft.distributed``; ignored in a single process)."""

    grad_compression: str = field(
        default="none",
        metadata={"help": f"What processes send each step: {', '.join(METHODS)}. none = fp32 all-reduce (bytes "
                          "counted like the others); fp16/bf16 casts (bf16 needs NCCL, gloo cannot all-reduce it); "
                          "int8 scaled quantisation; sign 1 bit + scale; topk values + int32 indices; randk values "
                          "only (shared-seed indices); powersgd (torch's hook, --powersgd_rank); gdsec the "
                          "components of the gradient difference above --gdsec_threshold (GD-SEC). Ignored in a "
                          "single process."},
    )
    compression_ratio: Optional[float] = field(
        default=None,
        metadata={"help": "Fraction of coordinates topk and randk send, in (0, 1] (0.01: 1%); null = 0.01. "
                          "gdsec sends what --gdsec_threshold selects and the other methods every coordinate: they "
                          "warn that it is unused."},
    )
    error_feedback: str = field(
        default="auto",
        metadata={"help": f"{' | '.join(ERROR_FEEDBACKS)}: auto = ef for sign/topk/randk (gradients or updates) and "
                          "powersgd, gdsec's own reference scheme for gdsec, none for the "
                          "rest. ef21 is plain EF21, which diverges on stochastic gradients."},
    )
    compress: Optional[str] = field(
        default=None,
        metadata={"help": f"{' or '.join(TARGETS)}: what --grad_compression compresses. gradients: each "
                          "gradient bucket, every step (DDP hook). updates: each process takes its own AdamW step "
                          "and the parameter deltas are averaged, compressed with error feedback, every "
                          "--local_steps steps. momentum: 1-bit Adam (AdamW on fp32 gradients for "
                          "--momentum_warmup_steps, then its second moment frozen and its momentum compressed). Default: updates when --local_steps > 1 or when a biased "
                          "method (sign, topk, randk) runs under AdamW (said once at startup), else gradients. With "
                          "AdamW, Top-K 1% needs updates: as gradients (EF21) it stayed near chance on the GLUE "
                          "smoke task (README)."},
    )
    local_steps: int = field(
        default=1,
        metadata={"help": "H > 1: no gradient communication; every H optimizer steps the replicas average their "
                          "parameter deltas, compressed with --grad_compression and its error feedback. Evaluations "
                          "and validation images (and the final save) are synchronisation points too. 1 = "
                          "communicate every step."},
    )
    momentum_warmup_steps: int = field(
        default=10,
        metadata={"help": "--compress momentum: plain AdamW steps on fp32 all-reduced gradients before AdamW's second "
                          "moment is frozen and only its compressed momentum travels (1-bit Adam).", "min": 1},
    )
    reset_steps: int = field(
        default=0,
        metadata={"help": "With compressed updates of topk, randk or sign, N > 0: each process keeps what it has not "
                          "sent yet in its own replica and the replicas are averaged (fp16) every N optimizer steps "
                          "and at every evaluation and the end (CSER). 0 = replicas restart from the average after "
                          "every round.", "min": 0},
    )
    local_steps_schedule: str = field(
        default="fixed",
        metadata={"help": f"{' or '.join(SCHEDULES)}: every H steps, or random intervals with mean H "
                          "(geometric, as in OLGA; drawn with --seed, equal on every process)."},
    )
    gdsec_threshold: float = field(
        default=1.0,
        metadata={"help": "--grad_compression gdsec: GD-SEC's xi >= 0; a process sends a component of its gradient "
                          "difference when it exceeds xi / processes * ||change of the adapter weights in the last "
                          "step||. 0 sends every change."},
    )
    gdsec_beta: float = field(
        default=1.0,
        metadata={"help": "--grad_compression gdsec: GD-SEC's beta in (0, 1], the step of each process's "
                          "transmitted state towards what it sent."},
    )
    collective: str = field(
        default="auto",
        metadata={"help": f"{' | '.join(COLLECTIVES)}: how int8, sign and topk payloads travel. allgather: each "
                          "process sends (p - 1) x its payload; two_stage: compressed reduce-scatter then "
                          "all-gather with error feedback at both stages (1-bit Adam's), 2 (p - 1) / p x the "
                          "payload. auto = two_stage from 3 processes on."},
    )
    powersgd_rank: int = field(
        default=4,
        metadata={"help": "--grad_compression powersgd: rank of the low-rank gradient approximation."},
    )


def compression_config(args: CommunicationArgs, seed: int = 0) -> CompressionConfig:
    """The library's :class:`~gsoft.distributed.CompressionConfig` for these options; making it checks them, and an
    error names the options as given on the command line (``--grad_compression`` is the config's ``method``)."""
    try:
        return CompressionConfig(
            method=args.grad_compression, compression_ratio=args.compression_ratio, error_feedback=args.error_feedback,
            compress=args.compress, local_steps=args.local_steps, local_steps_schedule=args.local_steps_schedule,
            threshold=args.gdsec_threshold, beta=args.gdsec_beta, collective=args.collective,
            reset_steps=args.reset_steps,
            momentum_warmup_steps=args.momentum_warmup_steps,
            powersgd_rank=args.powersgd_rank, seed=seed,
        )
    except ValueError as exc:
        given = [f"--{f.name} {getattr(args, f.name)}" for f in dataclasses.fields(CommunicationArgs)
                 if getattr(args, f.name) != f.default]  # an error needs at least one option off its default
        raise ValueError(f"{' '.join(given)}: {exc}") from exc


def check_communication_args(args: CommunicationArgs) -> None:
    """Reject bad or contradictory communication options before any work (call from the recipe's
    ``__post_init__``): the library's config checks them (:func:`compression_config`)."""
    compression_config(args)


class Communication:
    """The compression states of a run's trained DDP models (one per model, all sharing the optimizer), seen as one.

    ``bytes_sent`` / ``bytes_uncompressed`` add up over the models (each model's buckets, or its local-step deltas,
    are counted by its own state, once); :meth:`synchronize` averages every model now (local steps; a no-op
    otherwise). With one model, :meth:`summary` is that state's ``summary()``; with several, one entry per model.
    """

    def __init__(self, states: Mapping[str, CompressionState]) -> None:
        if not states:
            raise ValueError("Communication needs at least one compression state")
        self.states = dict(states)

    @property
    def bytes_sent(self) -> int:
        return sum(s.bytes_sent for s in self.states.values())

    @property
    def bytes_uncompressed(self) -> int:
        return sum(s.bytes_uncompressed for s in self.states.values())

    def synchronize(self) -> None:
        """Local steps: average the replicas now, so that evaluation and saving see one model (collective: call it
        on every process, in the same places)."""
        for state in self.states.values():
            state.synchronize()

    def summary(self) -> dict[str, Any]:
        if len(self.states) == 1:
            return next(iter(self.states.values())).summary()
        return {name: state.summary() for name, state in self.states.items()}

    def register_for_checkpointing(self, accelerator: Any) -> None:
        """Checkpoints carry every state (error-feedback buffers, local-step references, each process's optimizer
        state with ``--compress updates``, byte counters): call before ``load_checkpoint``. The states are
        registered one by one (a one-model run writes one custom checkpoint file, as a bare state would). They hold
        one entry per process; another number of processes gets their mean, one process their synchronisation
        (``gsoft.distributed.state.SingleProcessState``), and a one-process checkpoint starts them fresh
        (:func:`check_world_size_on_resume`, which :func:`setup_communication` installs, refuses only powersgd on
        another number of processes)."""
        for state in self.states.values():
            accelerator.register_for_checkpointing(state)


def checkpoint_processes(path: Union[str, Path]) -> Optional[int]:
    """How many processes wrote the checkpoint at ``path``: the count in its manifest (``common.checkpoint`` writes
    one with every save and refuses to resume a checkpoint without it), or None when it has no manifest."""
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        return None
    try:
        written = json.loads(manifest.read_text())["num_processes"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{manifest} is unreadable ({type(exc).__name__}: {exc}); resume from another "
                         "checkpoint.") from exc
    if isinstance(written, bool) or not isinstance(written, int) or written < 1:
        raise ValueError(f"{manifest}: num_processes is {written!r}, not a number of processes; resume from another "
                         "checkpoint.")
    return written


def _custom_state_files(path: Union[str, Path]) -> int:
    """How many ``custom_checkpoint_<i>.pkl`` files (accelerate's registered objects: the compression states) the
    checkpoint at ``path`` holds."""
    return sum(1 for p in Path(path).iterdir() if _CUSTOM_STATE.match(p.name))


def check_checkpoint_processes(path: Union[str, Path], num_processes: int,
                               method: str = "none") -> Optional[str]:
    """Whether the checkpoint at ``path`` resumes on ``num_processes`` processes under ``--grad_compression method``.

    None: written by as many processes (or without a manifest, which ``load_checkpoint`` refuses on its own). A
    warning to log once: written by another number of processes; it resumes, not bit-identically. Several processes
    on both sides: ``CompressionState.load_state_dict`` averages each process's compression state over the saved
    processes. Several into one: ``SingleProcessState`` makes the one process what a synchronisation of the saved ones
    would have made (and logs what it applied or dropped). One into several: the compression state starts fresh from
    the loaded model. accelerate restores the RNG state of the processes whose file exists and leaves the others at
    their start-up seeding. A ValueError for powersgd (torch's per-process state is not carried)."""
    written = checkpoint_processes(path)
    if written is None or written == num_processes:
        return None
    plural = "es" if written > 1 else ""
    if method == "powersgd":
        launch = (f"{written} processes (accelerate launch --multi_gpu --num_processes {written} ...)" if written > 1
                  else "1 process (python or accelerate launch --num_processes 1)")
        raise ValueError(
            f"checkpoint {path} was written by {written} process{plural} and this run has {num_processes}: torch's "
            f"PowerSGD keeps per-process error buffers and low-rank factors that are not carried to another number of "
            f"processes. Resume with {launch}, or start a new run: drop --resume_from_checkpoint and pass "
            f"--overwrite_output_dir (which deletes this run's checkpoints) or another --output_dir."
        )
    if num_processes == 1:
        state = (f"the compression state of the {written} processes becomes this process's as their synchronisation "
                 f"would have made it (with local steps the replicas' mean parameters and optimizer moments; what "
                 f"happens to error-feedback residuals is logged when it loads)")
    elif written == 1:
        state = ("the compression state starts fresh from the loaded model (no error-feedback residuals, every "
                 "replica the loaded model, byte and step counters from 0; --compress momentum warms up again)")
    else:
        state = (f"each process's compression state (error-feedback residuals; with --compress updates its "
                 f"parameters and optimizer moments) is the mean over the {written} saved processes, which keeps the "
                 f"residual the model is owed")
    first, last = sorted((written, num_processes))
    extra = f"process {first}" if last - first == 1 else f"processes {first}-{last - 1}"
    rng = (f"{extra} {'has' if last - first == 1 else 'have'} no saved random state (the run's start-up seeding "
           f"stays)" if num_processes > written else f"the saved random states of {extra} are not used")
    return (f"checkpoint {path} was written by {written} process{plural} and this run has {num_processes}: resuming, "
            f"but not bit-identically to an uninterrupted run. {state[0].upper()}{state[1:]}; a step now takes "
            f"{num_processes} x --per_device_train_batch_size examples instead of {written} x, and the step count, "
            f"learning-rate schedule and data position continue from the saved step with this run's steps per "
            f"epoch; {rng}.")


def check_world_size_on_resume(accelerator: Any, method: str = "none", states: Optional[int] = None) -> None:
    """Make ``accelerator.load_state`` check the checkpoint first, before it loads anything: its number of
    processes (:func:`check_checkpoint_processes`: another number resumes with one warning from the main process,
    powersgd is refused) and, with ``states``, that it holds that many compression states (one per trained model,
    whatever the number of processes); once per accelerator."""
    if getattr(accelerator, _GUARDED, False):
        return

    def check(models: Any, input_dir: str) -> None:
        warning = check_checkpoint_processes(input_dir, accelerator.num_processes, method)
        found = _custom_state_files(input_dir)
        if states is not None and found != states:
            raise ValueError(
                f"checkpoint {input_dir} holds {found} compression state{'s' if found != 1 else ''} "
                f"(custom_checkpoint_*.pkl) and this run trains {states} model{'s' if states != 1 else ''}, each "
                f"with one: it was written by a run that trained other models, or by a one-process run of a gsoft "
                f"version that saved none. Resume it with the setup and version that wrote it, or start a new run "
                f"(drop --resume_from_checkpoint and pass --overwrite_output_dir or another --output_dir).")
        if warning is not None and accelerator.is_main_process:
            logger.warning(warning)

    accelerator.register_load_state_pre_hook(check)
    setattr(accelerator, _GUARDED, True)


def setup_communication(
    args: CommunicationArgs,
    accelerator: Any,
    models: Union[nn.Module, Mapping[str, nn.Module]],
    optimizer: torch.optim.Optimizer,
    seed: int,
) -> Optional[Communication]:
    """Several processes: ``register_compression`` on every prepared DDP model (``models``: one, or ``{name:
    model}``), also for ``none`` (an fp32 all-reduce whose bytes are counted like the compressed ones, the baseline to
    compare with). One process: nothing to communicate, so ``None`` (and a warning when compression or local steps
    were asked for); each model's ``SingleProcessState`` is registered for checkpointing here, so a checkpoint holds
    one compression state per model whatever the number of processes (the caller registers the returned
    :class:`Communication`'s with :meth:`Communication.register_for_checkpointing`).

    Several models may share ``optimizer``: with ``--compress updates`` each state adds its own step post-hook to it,
    which averages only its own model's parameters; all processes run the hooks in registration order, so the
    collectives match and the replicas stay identical (tests/test_dreambooth.py checks it).

    With one process or several, ``accelerator.load_state`` then checks the checkpoint's number of processes and
    compression states (:func:`check_world_size_on_resume`): another number of processes resumes with a warning,
    powersgd on another number is refused."""
    named = dict(models) if isinstance(models, Mapping) else {"model": models}
    check_world_size_on_resume(accelerator, args.grad_compression, states=len(named))
    if accelerator.num_processes == 1:
        if args.grad_compression != "none" or args.local_steps > 1:
            logger.warning("--grad_compression %s --local_steps %d: a single process has nothing to communicate, "
                           "so they are ignored (launch several: accelerate launch --multi_gpu --num_processes N).",
                           args.grad_compression, args.local_steps)
        for name, model in named.items():
            accelerator.register_for_checkpointing(
                SingleProcessState(accelerator.unwrap_model(model), optimizer, name=name))
        return None
    config = compression_config(args, seed)
    states = {}
    for name, model in named.items():
        try:
            states[name] = register_compression(model, config, optimizer=optimizer)
        except (ValueError, TypeError) as exc:  # e.g. bf16 on gloo: the recipe's one-line error
            raise ValueError(f"--grad_compression {args.grad_compression}: {exc}") from exc
    return Communication(states)


def communication_results(comm: Optional[Communication]) -> dict[str, Any]:
    """The results.json fields: bytes this (the main) process sent, what fp32 gradient all-reduces would have sent
    for the same optimizer steps, and the settings and counters (``{"method": "none", "world_size": 1}`` alone)."""
    return {
        "comm_bytes_sent": comm.bytes_sent if comm is not None else 0,
        "comm_bytes_uncompressed": comm.bytes_uncompressed if comm is not None else 0,
        "compression": comm.summary() if comm is not None else {"method": "none", "world_size": 1},
    }


def trainable_state_sha256(*models: nn.Module) -> str:
    """Hash of the trained parameters of ``models`` (in order): equal on every data-parallel process when the
    replicas stayed in sync, so results.json can show it (``rank_state_sha256``, one per process)."""
    digest = hashlib.sha256()
    for model in models:
        for name, param in sorted(model.named_parameters()):
            if param.requires_grad:
                digest.update(name.encode())
                digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
