"""Compressed communication for data-parallel adapter training.

- :mod:`.compressors`: fp16/bf16 casts, int8 (QSGD-style), 1-bit sign, Top-K, Rand-K (shared seed), GD-SEC's
  significant-component selection; pure functions of tensors and seeds with exact payload sizes.
- :mod:`.feedback`: error feedback around any compressor (none / EF / EF21 / GD-SEC's reference and error correction).
- :mod:`.transport`: all_reduce or all_gather of payloads, the bytes they put on the wire, and
  :class:`CollectiveError` when a peer process is gone.
- :mod:`.config`: :class:`CompressionConfig`, the settings (checked when made).
- :mod:`.state`: :class:`CompressionState`, the counters and per-process state of one model (and its checkpoints).
- :mod:`.hooks`: :func:`register_compression`, the DDP communication hooks (and torch's PowerSGD, counted).
- :mod:`.local_steps`: H local steps between compressed parameter averages (Qsparse-local-SGD).
- :mod:`.partial_sync`: compressed updates with each process's unsent residual kept in its replica and periodic
  error resets (CSER).
- :mod:`.momentum`: ``compress="momentum"``, Adam with a frozen second moment and a compressed momentum (1-bit Adam).
- :mod:`.volunteer`: peers of a hivemind swarm training one adapter over the internet (``hivemind.Optimizer`` with
  every averaging round accounted for, checked codecs, counted bytes); imported on its own, hivemind being optional.
- :mod:`.olga` and :mod:`.baselines`: OLGA / EF-OLGA, and GD, EF21, Qsparse-local-SGD and AEG, in process on strongly
  convex problems split over workers (docs/olga.md).
"""

from .compressors import (
    Cast,
    Compressor,
    Identity,
    Int8,
    RandK,
    Sign,
    Sharded,
    Significant,
    TopK,
    build_compressor,
)
from .config import (
    COLLECTIVES,
    ERROR_FEEDBACKS,
    METHODS,
    SCHEDULES,
    TARGETS,
    CompressionConfig,
    resolve_compress,
    resolve_error_feedback,
)
from .feedback import (
    DifferenceFeedback,
    ErrorFeedback,
    Feedback,
    GDSECFeedback,
    build_feedback,
    mean_decoded,
    simulate_round,
)
from .hooks import register_compression
from .local_steps import LocalSteps
from .momentum import CompressedMomentum
from .partial_sync import PartialSync
from .state import CompressionState
from .transport import (
    CollectiveError,
    Exchange,
    TwoStageExchange,
    allgather_wire_bytes,
    allreduce_wire_bytes,
    collective_failure,
)

__all__ = [
    "COLLECTIVES",
    "Cast",
    "CollectiveError",
    "CompressedMomentum",
    "CompressionConfig",
    "CompressionState",
    "Compressor",
    "DifferenceFeedback",
    "ERROR_FEEDBACKS",
    "ErrorFeedback",
    "Exchange",
    "Feedback",
    "GDSECFeedback",
    "Identity",
    "Int8",
    "LocalSteps",
    "METHODS",
    "PartialSync",
    "RandK",
    "SCHEDULES",
    "Sharded",
    "Sign",
    "Significant",
    "TARGETS",
    "TopK",
    "TwoStageExchange",
    "allgather_wire_bytes",
    "allreduce_wire_bytes",
    "build_compressor",
    "build_feedback",
    "collective_failure",
    "mean_decoded",
    "register_compression",
    "resolve_compress",
    "resolve_error_feedback",
    "simulate_round",
]
