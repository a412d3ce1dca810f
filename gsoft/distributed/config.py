"""``CompressionConfig``: what data-parallel processes send each other, checked once when it is made.

:func:`gsoft.distributed.register_compression` takes one. The options that depend on the process group (bf16 needs
a backend that all-reduces it) and on the optimizer (``compress="updates"`` needs one) are checked there.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

from .compressors import (
    CHUNK_METHODS,
    COMPRESSORS,
    DEFAULT_RATIO,
    RATIO_METHODS,
    Compressor,
    build_compressor,
    check_ratio,
)
from .feedback import SCHEMES, build_feedback

#: The compression methods: the compressors, and torch's PowerSGD hook.
METHODS: tuple[str, ...] = (*COMPRESSORS, "powersgd")
#: ``error_feedback`` values: ``auto`` (:func:`resolve_error_feedback`) or a scheme.
ERROR_FEEDBACKS: tuple[str, ...] = ("auto", *SCHEMES)
#: What is compressed: each step's gradients, the parameter updates of one or more local steps, or Adam's momentum
#: after a warm-up (1-bit Adam, :mod:`gsoft.distributed.momentum`).
TARGETS: tuple[str, ...] = ("gradients", "updates", "momentum")
#: How many local steps separate two averages: always ``local_steps``, or a geometric number with that mean.
SCHEDULES: tuple[str, ...] = ("fixed", "geometric")
#: How gathered payloads (``int8``, ``sign``, ``topk``) travel: ``auto`` (:meth:`CompressionConfig.collective_for`),
#: ``allgather`` or ``two_stage``.
COLLECTIVES: tuple[str, ...] = ("auto", "allgather", "two_stage")
#: The methods whose payloads cannot be added up and have a fixed size: they are gathered, or sent in two stages.
GATHERED_METHODS: tuple[str, ...] = ("int8", "sign", "topk")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def resolve_compress(compress: Optional[str], local_steps: int) -> str:
    """``None``: ``updates`` when ``local_steps > 1`` (only updates can wait several steps), else ``gradients``."""
    if compress is None:
        return "updates" if local_steps > 1 else "gradients"
    if compress not in TARGETS:
        raise ValueError(f"unknown compress {compress!r}; choose one of {', '.join(TARGETS)}")
    if compress in ("gradients", "momentum") and local_steps > 1:
        raise ValueError(f"local_steps={local_steps} averages parameter updates, not {compress}: pass "
                         f"compress='updates' (or leave it unset).")
    return compress


def is_adaptive(optimizer: Any) -> bool:
    """Whether ``optimizer`` (or the torch optimizer an accelerate wrapper holds) is Adam-type (Adam, AdamW, NAdam,
    RAdam, Adamax, 8-bit and fused variants): it normalises each coordinate by its own second moment."""
    if optimizer is None:
        return False
    inner = getattr(optimizer, "optimizer", optimizer)
    return "adam" in type(inner).__name__.lower()


def resolve_error_feedback(method: str, error_feedback: str, compress: str = "gradients") -> str:
    """``auto``: classic EF for the biased compressors, for gradients and updates alike. For updates the sum of what
    is applied equals the sum of the optimizer's steps (with it Top-K 1% under AdamW reaches the uncompressed
    accuracy on the GLUE smoke task, with EF21 it does not); for stochastic gradients plain EF21 diverges
    (Fatkhullin et al., NeurIPS 2023: it needs momentum) while EF converges. The torch hook's own error feedback for
    PowerSGD; nothing for the unbiased ones; gdsec is its own scheme (reference and error correction)."""
    if error_feedback not in ERROR_FEEDBACKS:
        raise ValueError(f"unknown error_feedback {error_feedback!r}; choose one of {', '.join(ERROR_FEEDBACKS)}")
    if method == "gdsec":
        if error_feedback != "auto":
            raise ValueError(f"gdsec keeps its own per-worker reference (GD-SEC's scheme, which carries what it dropped), so "
                             f"error_feedback={error_feedback!r} does not apply; leave it at 'auto'.")
        return "gdsec"
    if method == "powersgd":
        if error_feedback == "ef21":
            raise ValueError("powersgd uses torch's PowerSGD hook, whose error feedback is classic EF; pass "
                             "error_feedback 'ef' (the default under 'auto') or 'none'.")
        return "ef" if error_feedback == "auto" else error_feedback
    if error_feedback == "auto":
        if build_compressor(method).biased:
            return "ef"
        return "none"
    return error_feedback


@dataclass(frozen=True)
class CompressionConfig:
    """The settings of :func:`gsoft.distributed.register_compression`; every value is checked here.

    ``compress`` and ``error_feedback`` may be left to defaults that follow the other options; :attr:`target` and
    :attr:`feedback` are what they resolve to, :meth:`options` every setting in effect (what results report).
    """

    #: One of :data:`METHODS`: ``none`` (fp32, counted like the others), ``fp16``, ``bf16``, ``int8`` (scaled, one
    #: scale per ``chunk_size`` values), ``sign`` (1 bit + scale), ``topk``, ``randk`` (shared-seed coordinates, no
    #: indices sent), ``gdsec`` (GD-SEC: the components of the gradient difference above a threshold tied to the
    #: model's change) or ``powersgd`` (torch's hook).
    method: str = "topk"
    #: Fraction of coordinates ``topk``/``randk`` send, in (0, 1]; None = 0.01. ``gdsec`` sends what its
    #: ``threshold`` selects and the other methods every coordinate: a ratio given to them is reported as unused (a
    #: warning at registration).
    compression_ratio: Optional[float] = None
    #: One of :data:`ERROR_FEEDBACKS` (see :func:`resolve_error_feedback` for ``auto``).
    error_feedback: str = "auto"
    #: ``gradients``: the DDP hook compresses each gradient bucket every step. ``updates``: no gradient
    #: communication; each process applies its optimizer to its own gradient, and the compressed parameter deltas
    #: are averaged after every ``local_steps`` optimizer steps. Updates suit adaptive optimizers: AdamW normalises
    #: each coordinate, so a sparse or stale compressed gradient becomes full-size steps in stale directions, while a
    #: compressed update keeps the optimizer's own step sizes. None: ``updates`` when ``local_steps > 1``, else
    #: ``gradients``, except that :func:`gsoft.distributed.register_compression` picks ``updates`` for a biased
    #: compressor under an Adam-type optimizer (:meth:`for_optimizer`). An explicit value is kept.
    compress: Optional[str] = None
    #: ``compress="momentum"``: plain Adam steps on fp32 all-reduced gradients before the second moment is frozen
    #: and only the compressed momentum travels (1-bit Adam's warm-up), >= 1.
    momentum_warmup_steps: int = 10
    #: H >= 1 optimizer steps between averages of the updates (1 = communicate every step).
    local_steps: int = 1
    #: One of :data:`SCHEDULES`: every H steps, or random intervals with mean H (``geometric``, as in OLGA).
    local_steps_schedule: str = "fixed"
    #: The shared seed of Rand-K's coordinates and of the local-step schedule; equal on every process.
    seed: int = 0
    #: With compressed updates, > 0: each process keeps what it has not sent yet in its own replica instead of
    #: restarting from the average after every round, and every ``reset_steps`` optimizer steps (and at every
    #: synchronisation point) the replicas are averaged with an fp16 all-reduce (CSER,
    #: :mod:`gsoft.distributed.partial_sync`). 0: replicas restart from the average after every round
    #: (Qsparse-local-SGD).
    reset_steps: int = 0
    #: ``int8`` / ``sign``: values per scale.
    chunk_size: int = 1024
    #: ``gdsec``: GD-SEC's ``beta``, the step of the per-worker state towards what was sent, in (0, 1].
    beta: float = 1.0
    #: ``gdsec``: GD-SEC's ``xi`` >= 0: a component of a worker's gradient difference is sent when its magnitude
    #: exceeds ``threshold / workers * ||x^k - x^{k-1}||_2`` (:class:`~gsoft.distributed.feedback.GDSECFeedback`).
    threshold: float = 1.0
    #: One of :data:`COLLECTIVES`, for the gathered methods (:data:`GATHERED_METHODS`). ``allgather``: every process
    #: receives every payload, so each sends ``(p - 1) x`` its payload, which grows with the number of processes
    #: ``p``. ``two_stage``: a compressed reduce-scatter (process ``j`` receives everyone's compressed chunk ``j``
    #: and averages it) then a compressed all-gather of the averaged chunks, with error feedback at both stages, as
    #: 1-bit Adam does: ``2 (p - 1) / p x`` the payload, under twice the payload whatever ``p``. ``auto``:
    #: ``two_stage`` from 3 processes on, ``allgather`` with 2 (the same bytes, and one compression instead of two).
    collective: str = "auto"
    #: ``powersgd``: rank of the low-rank gradient approximation, >= 1.
    powersgd_rank: int = 4
    #: ``powersgd``: uncompressed all-reduce steps before compression starts (at least 2 with error feedback).
    powersgd_start_iter: int = 10

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown compression method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not (_is_int(self.local_steps) and self.local_steps >= 1):
            raise ValueError(f"local_steps must be an integer >= 1 (1 = communicate every step), got "
                             f"{self.local_steps!r}")
        if self.local_steps_schedule not in SCHEDULES:
            raise ValueError(f"unknown local_steps_schedule {self.local_steps_schedule!r}; choose one of "
                             f"{', '.join(SCHEDULES)}")
        if self.compression_ratio is not None:
            check_ratio(self.compression_ratio)
        if not (_is_int(self.momentum_warmup_steps) and self.momentum_warmup_steps >= 1):
            raise ValueError(f"momentum_warmup_steps must be an integer >= 1 (plain Adam steps before its second "
                             f"moment is frozen), got {self.momentum_warmup_steps!r}")
        if not (_is_int(self.reset_steps) and self.reset_steps >= 0):
            raise ValueError(f"reset_steps must be an integer >= 0 (optimizer steps between error resets; 0 = none), "
                             f"got {self.reset_steps!r}")
        if self.reset_steps > 0:
            if self.compress in ("gradients", "momentum") or self.method in ("gdsec", "powersgd"):
                raise ValueError(f"reset_steps={self.reset_steps} resets the errors of compressed updates; it does "
                                 f"not apply to compressed gradients or momentum ({self.method}, compress="
                                 f"{self.compress!r}). Pass compress='updates', or leave reset_steps at 0.")
            if self.error_feedback not in ("auto", "ef"):
                raise ValueError(f"reset_steps={self.reset_steps} keeps error feedback's residual in each replica "
                                 f"(CSER), which is classic EF: error_feedback={self.error_feedback!r} does not "
                                 f"apply; leave it at 'auto' or pass 'ef'.")
            if not self.compressor().biased:
                raise ValueError(f"reset_steps={self.reset_steps} keeps error feedback's residual in each replica, "
                                 f"and {self.method} is unbiased (no error feedback, no residual): use topk, randk "
                                 f"or sign, or leave reset_steps at 0.")
        if self.collective not in COLLECTIVES:
            raise ValueError(f"unknown collective {self.collective!r}; choose one of {', '.join(COLLECTIVES)}")
        feedback = self.feedback  # resolves (and so checks) compress and error_feedback
        if self.method == "powersgd":
            if self.target != "gradients":
                raise ValueError(f"powersgd compresses gradients inside torch's DDP hook; it cannot compress "
                                 f"{self.target} or be combined with local_steps > 1. Use topk, randk, int8 or sign "
                                 f"for those.")
            if not (_is_int(self.powersgd_rank) and self.powersgd_rank >= 1):
                raise ValueError(f"powersgd_rank must be an integer >= 1, got {self.powersgd_rank!r}")
            if not (_is_int(self.powersgd_start_iter) and self.powersgd_start_iter >= 0):
                raise ValueError(f"powersgd_start_iter must be an integer >= 0, got {self.powersgd_start_iter!r}")
        else:
            if self.method == "gdsec" and self.target != "gradients":
                raise ValueError(f"gdsec compresses gradient differences against the model's change (GD-SEC); it "
                                 f"cannot compress {self.target} or be combined with local_steps > 1. Use topk, "
                                 f"randk, int8 or sign for those.")
            build_feedback(feedback, self.compressor(), beta=self.beta, threshold=self.threshold)  # their checks
        if self.collective == "two_stage":
            if self.method not in GATHERED_METHODS:
                raise ValueError(f"collective='two_stage' is for the gathered methods ({', '.join(GATHERED_METHODS)}); "
                                 f"{self.method} is all-reduced or variable-size: leave collective at 'auto'.")
            if feedback not in ("ef", "none"):
                raise ValueError(f"collective='two_stage' compresses the averaged chunks again with the stage's own "
                                 f"error feedback, which keeps EF's sum but not {feedback}'s per-worker references "
                                 f"in step: use error_feedback 'ef' (the default) or 'none', or collective "
                                 f"'allgather'.")

    def adaptive_default(self, optimizer: Any) -> bool:
        """Whether ``compress`` is unset and :meth:`for_optimizer` turns it into ``updates`` for ``optimizer``: a biased
        compressor (sign, topk, randk) under an Adam-type optimizer (:func:`is_adaptive`), one step per round. Such
        an optimizer normalises each coordinate, so sparse or stale gradient estimates become full-size steps in
        stale directions (Top-K 1% + EF21 gradients stay near chance on the GLUE smoke task); compressed updates
        with EF keep its step sizes and reach the uncompressed accuracy there. gdsec is a gradient method and
        powersgd compresses gradients inside torch's hook: they stay on gradients."""
        return (self.compress is None and self.local_steps == 1 and self.method not in ("gdsec", "powersgd")
                and self.compressor().biased and is_adaptive(optimizer))

    def for_optimizer(self, optimizer: Any) -> "CompressionConfig":
        """This config with ``compress='updates'`` when :meth:`adaptive_default` says so, else itself."""
        return replace(self, compress="updates") if self.adaptive_default(optimizer) else self

    def collective_for(self, world_size: int) -> str:
        """How this method's payloads travel among ``world_size`` processes: ``allreduce`` (summable payloads, and
        PowerSGD), ``allgather`` (variable-size payloads; the gathered methods when asked, or with 2 processes
        under ``auto``) or ``two_stage``."""
        if self.method not in GATHERED_METHODS:
            return "allgather" if self.method == "gdsec" else "allreduce"
        if self.collective == "auto":  # two stages keep EF's sum, not other schemes' per-process references
            return "two_stage" if world_size > 2 and self.feedback in ("ef", "none") else "allgather"
        return self.collective

    @property
    def target(self) -> str:
        """``compress`` resolved: ``gradients`` or ``updates``."""
        return resolve_compress(self.compress, self.local_steps)

    @property
    def feedback(self) -> str:
        """``error_feedback`` resolved: ``none``, ``ef``, ``ef21`` or ``gdsec`` (GD-SEC's own scheme)."""
        return resolve_error_feedback(self.method, self.error_feedback, self.target)

    @property
    def ratio(self) -> Optional[float]:
        """The fraction of coordinates sent by a selecting method (None for the others)."""
        if self.method not in RATIO_METHODS:
            return None
        return DEFAULT_RATIO if self.compression_ratio is None else self.compression_ratio

    @property
    def start_iter(self) -> int:
        """``powersgd_start_iter``, at least 2 with error feedback: torch's PowerSGD needs 2 uncompressed steps before
        its error feedback starts (DDP rebuilds its buckets after the first)."""
        return max(self.powersgd_start_iter, 2) if self.feedback == "ef" else self.powersgd_start_iter

    def compressor(self) -> Compressor:
        """A new compressor for this method (every method but ``powersgd``)."""
        return build_compressor(self.method, compression_ratio=self.ratio or DEFAULT_RATIO,
                                chunk_size=self.chunk_size)

    def options(self) -> dict[str, Any]:
        """The settings in effect, by name, with only those that the method uses (for ``results.json``)."""
        target = self.target
        options: dict[str, Any] = {"compress": target, "error_feedback": self.feedback,
                                   "local_steps": self.local_steps, "seed": self.seed}
        if self.method in RATIO_METHODS:
            options["compression_ratio"] = self.ratio
        if self.method == "gdsec":
            options.update(beta=self.beta, threshold=self.threshold)
        if self.method in CHUNK_METHODS:
            options["chunk_size"] = self.chunk_size
        if self.method in GATHERED_METHODS:
            options["collective"] = self.collective
        if target == "updates":
            options["local_steps_schedule"] = self.local_steps_schedule
        if target == "momentum":
            options["momentum_warmup_steps"] = self.momentum_warmup_steps
        if self.reset_steps:
            options["reset_steps"] = self.reset_steps
        if self.method == "powersgd":
            options.update(powersgd_rank=self.powersgd_rank, powersgd_start_iter=self.start_iter)
        return options
