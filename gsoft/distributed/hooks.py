"""``register_compression``: compressed adapter gradients (or compressed local-step deltas) for a DDP model.

DDP hands each gradient bucket to a communication hook; buckets hold only parameters that need gradients (the
adapter, not the frozen model) and are sums, not means, of nothing yet: the hook must return the mean over
processes. The hooks keep their state in a :class:`~gsoft.distributed.state.CompressionState`.
"""

import logging
import warnings
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as torch_powersgd
from torch.nn.parallel import DistributedDataParallel

from .compressors import RATIO_METHODS, Identity
from .config import CompressionConfig, is_adaptive
from .feedback import GDSECFeedback, build_feedback
from .local_steps import LocalSteps
from .momentum import CompressedMomentum
from .partial_sync import PartialSync
from .state import CompressionState
from .transport import (
    Exchange,
    allgather_wire_bytes,
    allreduce_wire_bytes,
    chained_result,
    collective_result,
    shared_seed,
)

# no ``from __future__ import annotations`` here: DDP checks the hooks' annotations at registration
logger = logging.getLogger(__name__)


def _compression_hook(state: CompressionState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    buffer = bucket.buffer()
    if isinstance(state.feedback, GDSECFeedback) and not state._seen:  # the first bucket of this backward
        state.feedback.set_model_change(state.model_change(), state.world_size)
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
    return fut.then(lambda f: state.feedback.update(key, chained_result(f)).to(buffer.dtype))


def _local_hook(state: CompressionState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Local steps: no gradient communication; parameters are averaged every H steps instead."""
    state.count_bucket(bucket, step=False)  # LocalSteps counts the optimizer steps
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def _momentum_hook(state: CompressionState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Momentum mode: an fp32 all-reduce of the gradients during the warm-up (plain Adam); afterwards each process
    keeps its own gradient, and the optimizer step exchanges the compressed momentum instead."""
    state.count_bucket(bucket, step=False)  # CompressedMomentum counts the optimizer steps
    buffer = bucket.buffer()
    if state.local.frozen:
        fut: torch.futures.Future = torch.futures.Future()
        fut.set_result(buffer)
        return fut
    exchange = Exchange(Identity(), buffer.numel(), group=state.group,
                        label="a gradient bucket, the momentum mode's fp32 warm-up")
    fut = exchange.start((buffer,))
    state.bytes_sent += exchange.bytes_sent
    state.payload_bytes += exchange.payload_bytes
    return fut.then(lambda f: chained_result(f).to(buffer.dtype))


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
        operation = (f"PowerSGD's uncompressed all_reduce of a gradient bucket (before iteration "
                     f"{ps.start_powerSGD_iter})")
    else:
        split = _powersgd_split(ps, bucket, buffer.element_size())
        operation = f"PowerSGD's all_reduces of a gradient bucket (rank {ps.matrix_approximation_rank})"
    state.bytes_sent += sum(allreduce_wire_bytes(b, state.world_size) for b in split)
    state.payload_bytes += sum(split)
    state.count_bucket(bucket, step=True)
    fut = torch_powersgd.powerSGD_hook(ps, bucket)
    if state.serialize_collectives:
        # torch's hook issues its Q all-reduce from a completion callback; with several buckets on gloo the two
        # processes can then issue collectives in different orders (gloo then fails with "Received data size doesn't
        # match" when an evaluation changes the timing). Waiting keeps one order, at the cost of overlap.
        collective_result(fut, operation, state.group)
    # torch's callbacks read their futures: a failed all-reduce arrives here as an error, raised again with its name
    return fut.then(lambda f: collective_result(f, operation, state.group))


#: The notices this process has given (each is given once per process).
_ANNOUNCED: set[str] = set()


def _announce_once(message: str) -> None:
    """``message`` as a UserWarning, the first time this process sees it."""
    if message not in _ANNOUNCED:
        _ANNOUNCED.add(message)
        warnings.warn(message, UserWarning, stacklevel=3)


def _warn_if_allgather_exceeds_allreduce(state: CompressionState, method: str) -> None:
    """An all-gathered payload of ``B`` bytes costs each process ``(p - 1) B``, while an fp32 all-reduce of ``n``
    values costs ``2 (p - 1) / p * 4 n``: gathering is worse once ``B > 8 n / p``. Variable-size payloads (gdsec)
    depend on the data, so they are not judged here."""
    sizes = [p.numel() for p in state._trained]
    compressor = state.feedback.compressor_for(sizes)
    if state.options.get("collective") != "allgather" or compressor.variable_size or not sizes:
        return
    numel, world = sum(sizes), state.world_size
    payload = compressor.payload_bytes(numel)
    gathered, reduced = allgather_wire_bytes(payload, world), allreduce_wire_bytes(4 * numel, world)
    if gathered > reduced:
        warnings.warn(f"{method} is exchanged by all_gather: each of the p = {world} processes sends (p - 1) x its "
                      f"payload = {world - 1} x {payload} = {gathered} bytes per round, more than an fp32 all_reduce "
                      f"of the same {numel} values, 2 (p - 1) / p x 4 n = {reduced} bytes (all_gather is worse once "
                      f"the payload exceeds 8 n / p bytes). Use fewer processes, a smaller compression_ratio, or an "
                      f"all-reduced method (randk, fp16, bf16).", UserWarning, stacklevel=3)


def _backend(group: Optional[dist.ProcessGroup]) -> str:
    return str(dist.get_backend(group)).lower()


def register_compression(
    model: nn.Module,
    config: CompressionConfig,
    *,
    optimizer: Optional[torch.optim.Optimizer] = None,
    process_group: Optional[dist.ProcessGroup] = None,
) -> CompressionState:
    """Compress what a DDP model (e.g. the one ``accelerator.prepare`` returns) sends between processes, as ``config``
    says (:class:`~gsoft.distributed.config.CompressionConfig`).

    ``optimizer``: needed when ``config.target`` is ``updates`` (its steps trigger the averaging; call
    ``state.synchronize()`` before evaluating or saving). With ``compress`` unset, an Adam-type optimizer and a biased
    compressor, the updates are compressed (:meth:`CompressionConfig.for_optimizer`, said once per process); an
    explicit ``compress='gradients'`` is kept, with a warning. ``process_group``: the group to communicate in (default: the global one).
    """
    if not isinstance(config, CompressionConfig):
        raise TypeError(f"register_compression takes a CompressionConfig, got {type(config).__name__}: "
                        f"register_compression(model, CompressionConfig(method={config!r}, ...)).")
    if isinstance(model, nn.parallel.DataParallel) or not isinstance(model, DistributedDataParallel):
        raise TypeError(
            f"register_compression needs a DistributedDataParallel model, got {type(model).__name__}. With "
            f"accelerate, pass the model that accelerator.prepare returns when launched with several processes "
            f"(accelerate launch --multi_gpu --num_processes N); a single process has nothing to communicate."
        )
    adaptive = config.adaptive_default(optimizer)
    if adaptive:
        config = config.for_optimizer(optimizer)
    method, compress, feedback_name = config.method, config.target, config.feedback
    group = process_group
    backend = _backend(group)
    if method == "bf16" and backend == "gloo":
        raise ValueError("bf16 gradient compression all-reduces bf16 tensors, which the gloo backend cannot do "
                         "(no bf16 all-reduce). Use fp16 or int8 on gloo (CPU), or bf16 with NCCL.")
    if config.reset_steps and compress != "updates":
        raise ValueError(f"reset_steps={config.reset_steps} resets the errors of compressed updates, and {method} "
                         f"compresses gradients here (no Adam-type optimizer to pick updates for): pass "
                         f"compress='updates' as well, or leave reset_steps unset.")
    if compress in ("updates", "momentum") and optimizer is None:
        raise ValueError(f"compress={compress!r} acts on optimizer steps (local_steps > 1 too): pass the optimizer "
                         f"(register_compression(model, config, optimizer=optimizer)).")
    if config.compression_ratio is not None and method not in RATIO_METHODS:
        warnings.warn(f"compression_ratio={config.compression_ratio} is not used by {method}, which sends every "
                      f"coordinate (only {', '.join(RATIO_METHODS)} select a fraction of them).", UserWarning,
                      stacklevel=2)
    options = config.options()
    if "collective" in options:  # resolved for this process group's size
        options["collective"] = config.collective_for(dist.get_world_size(group))
    state = CompressionState(method=method, options=options, world_size=dist.get_world_size(group),
                             rank=dist.get_rank(group), group=group)
    state._param_names = {id(p): n for n, p in model.module.named_parameters()}
    state._device = next((p.device for p in model.module.parameters() if p.requires_grad), torch.device("cpu"))

    if method == "powersgd":
        if config.start_iter != config.powersgd_start_iter:
            warnings.warn(f"powersgd_start_iter {config.powersgd_start_iter} raised to {config.start_iter}: torch's "
                          "PowerSGD needs 2 vanilla all-reduce steps before error feedback starts (DDP rebuilds its "
                          "buckets after the first).", UserWarning, stacklevel=2)
        state.powersgd = torch_powersgd.PowerSGDState(
            process_group=group, matrix_approximation_rank=config.powersgd_rank, start_powerSGD_iter=config.start_iter,
            use_error_feedback=feedback_name == "ef", warm_start=feedback_name == "ef", random_seed=config.seed)
        state.serialize_collectives = backend == "gloo"
        hook = _powersgd_hook
    else:
        compressor = config.compressor()
        if compressor.biased and feedback_name == "none":
            warnings.warn(f"{method} without error feedback is biased: expect a worse optimum than uncompressed "
                          "training (error_feedback 'ef21' or 'ef' corrects it).", UserWarning, stacklevel=2)
        state.feedback = build_feedback(feedback_name, compressor, beta=config.beta, threshold=config.threshold)
        state._trained = [p for p in model.module.parameters() if p.requires_grad]
        _warn_if_allgather_exceeds_allreduce(state, method)
        hook = _compression_hook
        if compress == "gradients" and compressor.biased and is_adaptive(optimizer):
            inner = type(getattr(optimizer, "optimizer", optimizer)).__name__
            if method == "gdsec":
                warnings.warn(f"gdsec under {inner}: GD-SEC sends the gradient-difference components above threshold "
                              f"/ processes x ||model change||, a rule made for gradient descent, whose change scales "
                              f"with the gradients; {inner} normalises every coordinate, so its change does not, and "
                              f"threshold={config.threshold} can drop nearly everything (measured: 0.26% of fp32's "
                              f"bytes and chance accuracy in the communication benchmark). Lower the threshold "
                              f"(--gdsec_threshold) until it sends what you need, or use topk or sign, which compress "
                              f"{inner}'s updates.", UserWarning, stacklevel=2)
            else:
                warnings.warn(f"{method}-compressed gradients under {inner}: the optimizer normalises every "
                              "coordinate, so sparse or stale gradient estimates become full-size steps (measured in "
                              "the communication benchmark: Top-K 1% + EF of the gradients ends 18 points behind "
                              "fp32, of the updates at fp32's accuracy). compress='updates' compresses the optimizer's "
                              "steps instead.", UserWarning, stacklevel=2)
        if compress == "momentum":
            state.local = CompressedMomentum(state, model.module, optimizer, config.momentum_warmup_steps)
            hook = _momentum_hook
        if compress == "updates":
            if config.reset_steps:
                state.local = PartialSync(state, model.module, optimizer, config.local_steps,
                                          config.local_steps_schedule, config.seed, config.reset_steps)
            else:
                state.local = LocalSteps(state, model.module, optimizer, config.local_steps,
                                         config.local_steps_schedule, config.seed)
            hook = _local_hook
    if adaptive:
        _announce_once(f"{method} under {type(getattr(optimizer, 'optimizer', optimizer)).__name__} with compress "
                       f"unset: compressing the optimizer's updates with error feedback (compress='updates', "
                       f"error_feedback={feedback_name!r}), not its gradients; an Adam-type optimizer turns "
                       f"sparse or stale compressed gradients into full-size steps. Pass compress='gradients' "
                       f"(--compress gradients) to compress gradients anyway.")
    logger.info("gradient compression of %s: %s %s", type(model.module).__name__, method, options)
    try:
        model.register_comm_hook(state, hook)
    except RuntimeError as exc:
        if state.local is not None:  # a refused registration must not average parameters after optimizer steps
            state.local.remove()
        raise RuntimeError(f"could not register the compression hook ({exc}); a DDP model takes one communication "
                           f"hook, register_compression once per model.") from exc
    return state
