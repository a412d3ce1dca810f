"""``register_compression``: compressed adapter gradients (or compressed local-step deltas) for a DDP model.

DDP hands each gradient bucket to a communication hook; buckets hold only parameters that need gradients (the
adapter, not the frozen model) and are sums, not means, of nothing yet: the hook must return the mean over
processes. The compressor and error feedback state live per bucket, keyed by the names of the bucket's
parameters, because DDP rebuilds its buckets after the first iteration: the state of a rebuilt bucket is
assembled from the old buckets' pieces, and the same per-parameter pieces are what checkpoints hold.
"""

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Hashable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as torch_powersgd
from torch.nn.parallel import DistributedDataParallel

from .compressors import build_compressor
from .feedback import Feedback, build_feedback
from .transport import Exchange, allreduce_wire_bytes, shared_seed

if TYPE_CHECKING:
    from .local_steps import LocalSteps

# no ``from __future__ import annotations`` here: DDP checks the hooks' annotations at registration
logger = logging.getLogger(__name__)

METHODS = ("none", "fp16", "bf16", "int8", "sign", "topk", "randk", "powersgd", "gdsec")
ERROR_FEEDBACKS = ("auto", "none", "ef", "ef21")
SCHEDULES = ("fixed", "geometric")
TARGETS = ("gradients", "updates")
#: the methods that send a fraction (``compression_ratio``) of the coordinates, and that fraction's default
RATIO_METHODS = ("topk", "randk", "gdsec")
DEFAULT_RATIO = 0.01


def resolve_error_feedback(method: str, error_feedback: str, compress: str = "gradients") -> str:
    """``auto``: for gradients, EF21 for the biased compressors (exact convergence under heterogeneous data); for
    updates, classic EF (the sum of what is applied equals the sum of the optimizer's steps, which is what made
    Top-K 1% under AdamW reach the uncompressed accuracy on the GLUE smoke task, where EF21 did not); the torch
    hook's own error feedback for PowerSGD; nothing for the unbiased ones; gdsec is its own (reference) scheme."""
    if error_feedback not in ERROR_FEEDBACKS:
        raise ValueError(f"unknown error_feedback {error_feedback!r}; choose one of {', '.join(ERROR_FEEDBACKS)}")
    if method == "gdsec":
        if error_feedback not in ("auto", "ef21"):
            raise ValueError(f"gdsec keeps its own per-worker reference (GD-SEC's difference scheme), so "
                             f"error_feedback={error_feedback!r} does not apply; leave it at 'auto'.")
        return "difference"
    if method == "powersgd":
        if error_feedback == "ef21":
            raise ValueError("powersgd uses torch's PowerSGD hook, whose error feedback is classic EF; pass "
                             "error_feedback 'ef' (the default under 'auto') or 'none'.")
        return "ef" if error_feedback == "auto" else error_feedback
    if error_feedback == "auto":
        if method in ("sign", "topk", "randk"):
            return "ef" if compress == "updates" else "ef21"
        return "none"
    return error_feedback


def resolve_compress(compress: Optional[str], local_steps: int) -> str:
    """``None``: ``updates`` when ``local_steps > 1`` (only updates can wait several steps), else ``gradients``."""
    if compress is None:
        return "updates" if local_steps > 1 else "gradients"
    if compress not in TARGETS:
        raise ValueError(f"unknown compress {compress!r}; choose gradients or updates")
    if compress == "gradients" and local_steps > 1:
        raise ValueError(f"local_steps={local_steps} averages parameter updates, not gradients: pass "
                         f"compress='updates' (or leave it unset).")
    return compress


@dataclass
class CompressionState:
    """What ``register_compression`` returns: settings, counters and the per-process compression state.

    ``bytes_sent``: bytes this process sent (ring formulas, see :mod:`gsoft.distributed.transport`);
    ``bytes_uncompressed``: what an fp32 (bucket dtype) gradient all-reduce would have sent for the same optimizer
    steps; ``steps``: optimizer steps seen; ``syncs``: communication rounds (``steps`` unless local steps).
    """

    method: str
    options: dict[str, Any]
    world_size: int
    rank: int
    bytes_sent: int = 0
    bytes_uncompressed: int = 0
    payload_bytes: int = 0
    steps: int = 0
    syncs: int = 0
    feedback: Optional[Feedback] = None
    group: Optional[dist.ProcessGroup] = None
    local: Optional["LocalSteps"] = None
    powersgd: Optional[torch_powersgd.PowerSGDState] = None
    serialize_collectives: bool = False
    _layouts: dict[Hashable, list[tuple[str, int]]] = field(default_factory=dict)
    _seen: set = field(default_factory=set)
    _param_names: dict[int, str] = field(default_factory=dict)
    _loaded_pieces: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    _device: torch.device = torch.device("cpu")

    @property
    def ratio(self) -> float:
        """``bytes_uncompressed / bytes_sent`` so far (how many times fewer bytes)."""
        return self.bytes_uncompressed / self.bytes_sent if self.bytes_sent else float("nan")

    def summary(self) -> dict[str, Any]:
        """For results.json: the settings and the counters."""
        return {"method": self.method, **self.options, "world_size": self.world_size, "steps": self.steps,
                "syncs": self.syncs, "bytes_sent": self.bytes_sent, "bytes_uncompressed": self.bytes_uncompressed,
                "payload_bytes": self.payload_bytes}

    def synchronize(self) -> None:
        """Local steps: average the replicas now (compressed, with error feedback). A no-op otherwise."""
        if self.local is not None:
            self.local.synchronize()

    # ---- bucket state: keyed by the bucket's parameter names, rebuilt from pieces when DDP re-buckets ----
    def bucket_key(self, bucket: dist.GradBucket) -> Hashable:
        layout = [(self._param_names[id(p)], p.numel()) for p in bucket.parameters()]
        key = tuple(name for name, _ in layout)
        if key not in self._layouts:
            self._layouts[key] = layout
            if self.feedback is not None and self.feedback.state_names:
                self._adopt(key, bucket.buffer().device)
        self._seen.add(key)
        return key

    def _pieces(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per-parameter views of the feedback state: ``{param_name: {state_name: tensor}}``; pieces loaded from a
        checkpoint count until a bucket has taken them over (a checkpoint saved right after loading one keeps them)."""
        pieces: dict[str, dict[str, torch.Tensor]] = dict(self._loaded_pieces)
        for key, state in self.feedback.states.items():
            layout = self._layouts.get(key)
            if layout is None:  # loaded from a checkpoint: already per parameter
                continue
            offset = 0
            for name, numel in layout:
                pieces[name] = {s: t[offset: offset + numel] for s, t in state.items()}
                offset += numel
        return pieces

    def _adopt(self, key: Hashable, device: torch.device) -> None:
        pieces = self._pieces()
        layout = self._layouts[key]
        if not any(name in pieces for name, _ in layout):
            return
        total = sum(n for _, n in layout)
        state = {}
        for s in self.feedback.state_names:
            flat = torch.zeros(total, dtype=torch.float32, device=device)
            offset = 0
            for name, numel in layout:
                if name in pieces:
                    flat[offset: offset + numel] = pieces[name][s].to(flat.device)
                offset += numel
            state[s] = flat
        self.feedback.states[key] = state

    def start_round(self, key: Hashable, x: torch.Tensor, sizes: list[int], seed: int,
                    tensor_ids: Optional[Sequence[int]] = None) -> torch.futures.Future[torch.Tensor]:
        """One counted exchange of ``x`` (made of tensors of ``sizes``, named by ``tensor_ids``) through the feedback
        and compressor; the future holds the mean of every process's decoded message (gradient buckets and
        local-step deltas alike)."""
        compressor = self.feedback.compressor_for(sizes, tensor_ids)
        exchange = Exchange(compressor, x.numel(), group=self.group, shared_seed=seed)
        payload = self.feedback.message(key, x, sizes=sizes, tensor_ids=tensor_ids, shared_seed=seed,
                                        private_seed=shared_seed(seed, self.rank))
        fut = exchange.start(payload)
        self.bytes_sent += exchange.bytes_sent
        self.payload_bytes += exchange.payload_bytes
        return fut

    def count_bucket(self, bucket: dist.GradBucket, *, step: bool) -> None:
        """What an fp32 (bucket dtype) all-reduce of this bucket would send; with ``step``, the last bucket of a
        backward ends an optimizer step that communicated."""
        buffer = bucket.buffer()
        self.bytes_uncompressed += allreduce_wire_bytes(buffer.numel() * buffer.element_size(), self.world_size)
        if step and bucket.is_last():
            self.steps += 1
            self.syncs += 1

    def end_iteration(self) -> None:
        for key in list(self.feedback.states if self.feedback else []):
            if key not in self._seen and key in self._layouts:
                del self.feedback.states[key]  # a bucket layout DDP replaced
        self._seen.clear()

    # ---- checkpointing (accelerate's register_for_checkpointing calls these on every process) ----
    def state_dict(self) -> dict[str, Any]:
        """Every process's state, gathered (collective): compression state differs per process, and accelerate
        writes custom state from the main process only."""
        own: dict[str, Any] = {"counters": {k: getattr(self, k) for k in
                                            ("bytes_sent", "bytes_uncompressed", "payload_bytes", "steps", "syncs")}}
        if self.feedback is not None:
            pieces = self._pieces()
            own["feedback"] = {n: {s: t.detach().cpu().clone() for s, t in d.items()} for n, d in pieces.items()}
        if self.local is not None:
            own["local"] = self.local.state_dict()
        if self.powersgd is not None:
            own["powersgd"] = {k: v for k, v in self.powersgd.__getstate__().items()}
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, own, group=self.group)
        return {"method": self.method, "options": self.options, "world_size": self.world_size, "ranks": gathered}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("method") != self.method or state.get("world_size") != self.world_size:
            raise ValueError(
                f"checkpointed gradient compression ({state.get('method')!r} on {state.get('world_size')} "
                f"processes) does not match this run ({self.method!r} on {self.world_size}); resume with the same "
                f"--grad_compression and number of processes."
            )
        own = state["ranks"][self.rank]
        for k, v in own["counters"].items():
            setattr(self, k, v)
        if self.feedback is not None:
            self._loaded_pieces = own.get("feedback", {})
            self.feedback.states.clear()
            for key in self._layouts:
                self._adopt(key, self._device)
        if self.local is not None:
            self.local.load_state_dict(own["local"])
        if self.powersgd is not None:
            group = self.powersgd.process_group
            self.powersgd.__setstate__(own["powersgd"])
            self.powersgd.process_group = group


def _compression_hook(state: CompressionState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    buffer = bucket.buffer()
    key = state.bucket_key(bucket)
    layout = state._layouts[key]
    # seeds per step and parameter name, not per bucket: DDP's bucket layout changes after the first step, and a
    # resumed run starts from the initial layout again (PerTensor)
    fut = state.start_round(key, buffer, [numel for _, numel in layout],
                            shared_seed(state.options["seed"], state.steps),
                            tensor_ids=[shared_seed(name) for name, _ in layout])
    state.count_bucket(bucket, step=True)
    if bucket.is_last():
        state.end_iteration()
    return fut.then(lambda f: state.feedback.update(key, f.value()).to(buffer.dtype))


def _local_hook(state: CompressionState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Local steps: no gradient communication; parameters are averaged every H steps instead."""
    state.count_bucket(bucket, step=False)  # LocalSteps counts the optimizer steps
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def _powersgd_split(ps: torch_powersgd.PowerSGDState, bucket: dist.GradBucket, size: int) -> tuple[int, int, int]:
    """Bytes of the three all-reduces of torch's ``powerSGD_hook`` for this bucket (uncompressed tensors, Ps, Qs),
    split as the hook splits them."""
    plain = ps_sum = qs_sum = 0
    for tensor in bucket.gradients():
        n, m = tensor.shape[0], tensor.numel() // max(tensor.shape[0], 1)
        rank = min(n, m, ps.matrix_approximation_rank)
        if torch_powersgd._should_compress(n, m, rank, ps.min_compression_rate)[0]:
            ps_sum += n * rank
            qs_sum += m * rank
        else:
            plain += tensor.numel()
    return plain * size, ps_sum * size, qs_sum * size


def _powersgd_hook(state: CompressionState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    ps = state.powersgd
    buffer = bucket.buffer()
    if ps.iter < ps.start_powerSGD_iter:  # torch's vanilla all-reduce of the bucket
        split: tuple[int, ...] = (buffer.numel() * buffer.element_size(),)
    else:
        split = _powersgd_split(ps, bucket, buffer.element_size())
    state.bytes_sent += sum(allreduce_wire_bytes(b, state.world_size) for b in split)
    state.payload_bytes += sum(split)
    state.count_bucket(bucket, step=True)
    fut = torch_powersgd.powerSGD_hook(ps, bucket)
    if state.serialize_collectives:
        # torch's hook issues its Q all-reduce from a completion callback; with several buckets on gloo the two
        # processes can then issue collectives in different orders (seen: "Received data size doesn't match" after
        # an evaluation changed the timing). Waiting keeps one order, at the cost of overlap.
        fut.wait()
    return fut


def _backend(group: Optional[dist.ProcessGroup]) -> str:
    return str(dist.get_backend(group)).lower()


def register_compression(
    model: nn.Module,
    method: str = "topk",
    *,
    compression_ratio: Optional[float] = None,
    error_feedback: str = "auto",
    compress: Optional[str] = None,
    local_steps: int = 1,
    local_steps_schedule: str = "fixed",
    optimizer: Optional[torch.optim.Optimizer] = None,
    seed: int = 0,
    chunk_size: int = 1024,
    beta: float = 1.0,
    threshold: float = 0.1,
    powersgd_rank: int = 4,
    powersgd_start_iter: int = 10,
    process_group: Optional[dist.ProcessGroup] = None,
) -> CompressionState:
    """Compress what a DDP model (e.g. the one ``accelerator.prepare`` returns) sends between processes.

    - ``method``: ``none`` (fp32, counted), ``fp16``, ``bf16``, ``int8``, ``sign``, ``topk``, ``randk``,
      ``powersgd`` (torch's hook, ``powersgd_rank``, ``powersgd_start_iter``) or ``gdsec``.
    - ``compression_ratio``: fraction of coordinates ``topk``/``randk``/``gdsec`` send, in (0, 1]; default 0.01.
      The other methods send every coordinate, so a ratio given to them is reported as unused (a warning).
    - ``error_feedback``: ``auto | none | ef | ef21`` (see :func:`resolve_error_feedback`).
    - ``compress``: ``gradients`` (the DDP hook compresses each gradient bucket; the default with one local step)
      or ``updates``: no gradient communication; each process applies its optimizer to its own gradient and the
      compressed parameter deltas are averaged after every ``local_steps`` optimizer steps (the default when
      ``local_steps > 1``). Updates suit adaptive optimizers: AdamW normalises each coordinate, so a sparse or
      stale compressed gradient becomes full-size steps in stale directions, while a compressed update keeps the
      optimizer's own step sizes. Needs ``optimizer`` (its step triggers the averaging); call
      ``state.synchronize()`` before evaluating or saving.
    - ``local_steps``: H optimizer steps between averages (``local_steps_schedule='geometric'``: random intervals
      with mean H, as in OLGA).
    - ``seed``: the shared seed of Rand-K's coordinates and of the local-step schedule; equal on every process.
    """
    if method not in METHODS:
        raise ValueError(f"unknown gradient compression {method!r}; choose one of {', '.join(METHODS)}")
    if isinstance(model, nn.parallel.DataParallel) or not isinstance(model, DistributedDataParallel):
        raise TypeError(
            f"register_compression needs a DistributedDataParallel model, got {type(model).__name__}. With "
            f"accelerate, pass the model that accelerator.prepare returns when launched with several processes "
            f"(accelerate launch --multi_gpu --num_processes N); a single process has nothing to communicate."
        )
    if not (isinstance(local_steps, int) and local_steps >= 1):
        raise ValueError(f"local_steps must be an integer >= 1 (1 = communicate every step), got {local_steps!r}")
    if local_steps_schedule not in SCHEDULES:
        raise ValueError(f"unknown local_steps_schedule {local_steps_schedule!r}; choose fixed or geometric")
    compress = resolve_compress(compress, local_steps)
    feedback_name = resolve_error_feedback(method, error_feedback, compress)
    group = process_group
    backend = _backend(group)
    if method == "bf16" and backend == "gloo":
        raise ValueError("bf16 gradient compression all-reduces bf16 tensors, which the gloo backend cannot do "
                         "(no bf16 all-reduce). Use fp16 or int8 on gloo (CPU), or bf16 with NCCL.")
    options: dict[str, Any] = {"compress": compress, "error_feedback": feedback_name, "local_steps": local_steps,
                               "seed": seed}
    if method in RATIO_METHODS:
        compression_ratio = DEFAULT_RATIO if compression_ratio is None else compression_ratio
        options["compression_ratio"] = compression_ratio
    elif compression_ratio is not None:
        logger.warning("compression_ratio=%s is not used by %s, which sends every coordinate (only %s select a "
                       "fraction of them).", compression_ratio, method, ", ".join(RATIO_METHODS))
    if method == "gdsec":
        options.update(beta=beta, threshold=threshold)
    if method in ("int8", "sign"):
        options["chunk_size"] = chunk_size
    if compress == "updates":
        options["local_steps_schedule"] = local_steps_schedule
    state = CompressionState(method=method, options=options, world_size=dist.get_world_size(group),
                             rank=dist.get_rank(group), group=group)
    state._param_names = {id(p): n for n, p in model.module.named_parameters()}
    state._device = next((p.device for p in model.module.parameters() if p.requires_grad), torch.device("cpu"))

    if method == "powersgd":
        if compress == "updates":
            raise ValueError("powersgd compresses gradients inside torch's DDP hook; it cannot compress updates or "
                             "be combined with local_steps > 1. Use topk, randk, int8 or sign for those.")
        if not (isinstance(powersgd_rank, int) and powersgd_rank >= 1):
            raise ValueError(f"powersgd_rank must be an integer >= 1, got {powersgd_rank!r}")
        start = max(powersgd_start_iter, 2) if feedback_name == "ef" else powersgd_start_iter
        if start != powersgd_start_iter:
            logger.warning("powersgd_start_iter %d raised to %d: torch's PowerSGD needs 2 vanilla all-reduce steps "
                           "before error feedback starts (DDP rebuilds its buckets after the first).",
                           powersgd_start_iter, start)
        state.powersgd = torch_powersgd.PowerSGDState(
            process_group=group, matrix_approximation_rank=powersgd_rank, start_powerSGD_iter=start,
            use_error_feedback=feedback_name == "ef", warm_start=feedback_name == "ef", random_seed=seed)
        options.update(powersgd_rank=powersgd_rank, powersgd_start_iter=start)
        state.serialize_collectives = backend == "gloo"
        hook = _powersgd_hook
    else:
        compressor = build_compressor(method, compression_ratio=compression_ratio, chunk_size=chunk_size,
                                      threshold=threshold)
        if compressor.biased and feedback_name == "none":
            logger.warning("%s without error feedback is biased: expect a worse optimum than uncompressed "
                           "training (error_feedback 'ef21' or 'ef' corrects it).", method)
        state.feedback = build_feedback(feedback_name, compressor, beta=beta)
        hook = _compression_hook
        inner = getattr(optimizer, "optimizer", optimizer)
        if compress == "gradients" and compressor.biased and "adam" in type(inner).__name__.lower():
            logger.warning("%s-compressed gradients under %s: the optimizer normalises every coordinate, so sparse "
                           "or stale gradient estimates become full-size steps (measured: Top-K 1%% + EF21 stays "
                           "near chance on the GLUE smoke task). compress='updates' (--compress updates) compresses "
                           "the optimizer's steps instead and reached the uncompressed accuracy there.", method,
                           type(inner).__name__)
        if compress == "updates":
            if optimizer is None:
                raise ValueError("compress='updates' (and local_steps > 1) averages parameters after optimizer "
                                 "steps: pass the optimizer (register_compression(model, ..., optimizer=optimizer)).")
            from .local_steps import LocalSteps

            state.local = LocalSteps(state, model.module, optimizer, local_steps, local_steps_schedule, seed)
            hook = _local_hook
    logger.info("gradient compression: %s %s", method, options)
    try:
        model.register_comm_hook(state, hook)
    except RuntimeError as exc:
        if state.local is not None:  # a refused registration must not average parameters after optimizer steps
            state.local._handle.remove()
        raise RuntimeError(f"could not register the compression hook ({exc}); a DDP model takes one communication "
                           f"hook, register_compression once per model.") from exc
    return state
