"""OLGA and EF-OLGA: an accelerated similarity method with compressed uplinks, local steps and a proximal server step.

For ``min f(x) = (1/M) sum_m f_m(x)`` over ``M`` workers in a star (the server is worker 0 and holds ``f_0``), ``f``
``mu``-strongly convex, each ``f_m`` ``L``-smooth and ``||hess f_m(x) - hess f(x)|| <= delta``. The methods are
Bylinkin and Beznosikov's, "Accelerated Methods with Compressed Communications for Distributed Optimization Problems
under Data Similarity" (AAAI 2025, arXiv 2412.16414). This module is written from the method's description, without
the paper's text at hand; the rule below is this module's precise definition. It builds on Accelerated
ExtraGradient (AEG) for data similarity (Kovalev, Beznosikov, Borodich, Gasnikov, Scutari, NeurIPS 2022).

One iteration, from ``x = x_f = w = x0`` (round 1 sends every ``grad f_m(w)`` in fp32):

1. ``x_g = tau x + (1 - tau) x_f``;
2. the gradient estimate at ``x_g``: with ``Delta_m = grad f_m(x_g) - grad f_m(w)``, the server broadcasts its own
   ``Delta_0``, every worker ``m >= 1`` sends ``Q(Delta_m - Delta_0)`` (``relative``; ``Q(Delta_m)`` without it)
   and the server forms ``G_g = grad f(w) + (1/M) [Delta_0 + sum_m (decoded message + Delta_0)]``;
3. the server's proximal step with the similarity control variate, by local steps (no communication):
   ``x_f ~ argmin_z A(z) = f_0(z) + <G_g - grad f_0(x_g), z> + ||z - x_g||^2 / (2 theta)``, gradient descent on
   ``A`` from ``x_g`` until ``||grad A(z)|| <= inner_tol ||z - x_g|| / theta`` (Kovalev et al.'s relative
   inexactness, ``inner_tol = 1/3``) or ``inner_max_iters`` steps;
4. ``G_f``, the estimate at ``x_f``, as in 2;
5. ``x = x + eta mu (x_f - x) - eta G_f``;
6. with probability ``p`` (a shared, seeded coin: loops of geometric length, mean ``1/p``) the loop ends:
   ``w = x_f`` and every worker sends ``grad f_m(w)`` in fp32.

OLGA uses an unbiased compressor (``RandK(ratio, rescale=True)``), the reference point ``w`` reducing its variance
as the iterates settle. EF-OLGA uses a biased one (``TopK(ratio)``) with error feedback: worker ``m`` keeps ``e_m``,
sends ``c = C(e_m + message)`` in steps 2 and 4 and keeps ``e_m = e_m + message - c``; a loop end sets ``e_m = 0``
(:attr:`OLGAConfig.error_flush`). The parameters ``theta``, ``tau``, ``eta`` follow AEG's theory with ``delta``
raised by the compression variance (:meth:`OLGAConfig.parameters`).

Every vector crosses the "wire" as a compressor's payload: a message is ``compressor.payload_bytes(d)`` bytes and
an uncompressed vector ``4 d`` bytes (fp32 through :class:`Identity`, as :mod:`gsoft.distributed` counts it), and
the receiver gets what the payload decodes to. Iterates and gradients are float64. Uplink bits are counted per
worker; the server's broadcasts (downlink) are counted separately.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from typing import Iterable, Literal, Optional, Protocol, Sequence, runtime_checkable

import torch

from .compressors import Compressor, Identity, Int8, RandK

Tensor = torch.Tensor


# ======================================================================================================================
# Problems
# ======================================================================================================================
@runtime_checkable
class Problem(Protocol):
    """``f(x) = (1/M) sum_m f_m(x)`` through per-worker oracles; worker 0 is the server."""

    n_workers: int
    dim: int

    def loss(self, m: int, x: Tensor) -> float:
        """``f_m(x)``."""

    def grad(self, m: int, x: Tensor) -> Tensor:
        """``grad f_m(x)`` (float64, shape ``(dim,)``)."""

    def hessian(self, m: int, x: Tensor) -> Tensor:
        """``hess f_m(x)`` (float64, ``(dim, dim)``): used only to estimate constants and to solve for ``f*``."""


@dataclass
class LinearModelProblem:
    """l2-regularised logistic (labels in {-1, +1}) or ridge regression, with worker ``m`` holding rows
    ``features[m]`` and ``targets[m]``:

    * logistic: ``f_m(x) = mean_i log(1 + exp(-b_i a_i^T x)) + l2/2 ||x||^2``;
    * ridge: ``f_m(x) = mean_i (a_i^T x - b_i)^2 / 2 + l2/2 ||x||^2``.
    """

    features: Sequence[Tensor]
    targets: Sequence[Tensor]
    kind: Literal["logistic", "ridge"] = "logistic"
    l2: float = 1e-3

    def __post_init__(self) -> None:
        if self.kind not in ("logistic", "ridge"):
            raise ValueError(f"kind must be 'logistic' or 'ridge', got {self.kind!r}")
        if not self.features or len(self.features) != len(self.targets):
            raise ValueError(f"one feature matrix and one target vector per worker, got {len(self.features)} and "
                             f"{len(self.targets)}")
        if not (isinstance(self.l2, (int, float)) and self.l2 > 0):
            raise ValueError(f"l2 must be > 0 (it makes f strongly convex), got {self.l2!r}")
        self.features = [a.to(torch.float64) for a in self.features]
        self.targets = [b.to(torch.float64).reshape(-1) for b in self.targets]
        dims = {a.shape[1] for a in self.features}
        if len(dims) != 1 or any(a.shape[0] != b.numel() or a.shape[0] == 0
                                 for a, b in zip(self.features, self.targets)):
            raise ValueError("every worker needs a non-empty (n_m, d) feature matrix with one target per row, the "
                             f"same d everywhere; got shapes {[tuple(a.shape) for a in self.features]} and "
                             f"{[b.numel() for b in self.targets]} targets")
        if self.kind == "logistic" and any(not bool(((b == 1) | (b == -1)).all()) for b in self.targets):
            raise ValueError("logistic regression needs labels in {-1, +1}; map {0, 1} labels with 2 b - 1")
        self.n_workers = len(self.features)
        self.dim = dims.pop()

    def loss(self, m: int, x: Tensor) -> float:
        a, b = self.features[m], self.targets[m]
        z = a @ x
        data = (torch.nn.functional.softplus(-b * z).mean() if self.kind == "logistic"
                else 0.5 * ((z - b) ** 2).mean())
        return float(data + 0.5 * self.l2 * (x @ x))

    def grad(self, m: int, x: Tensor) -> Tensor:
        a, b = self.features[m], self.targets[m]
        z = a @ x
        r = -b * torch.sigmoid(-b * z) if self.kind == "logistic" else z - b
        return a.T @ r / a.shape[0] + self.l2 * x

    def hessian(self, m: int, x: Tensor) -> Tensor:
        a = self.features[m]
        if self.kind == "logistic":
            s = torch.sigmoid(a @ x)
            weights = s * (1 - s)
        else:
            weights = torch.ones(a.shape[0], dtype=a.dtype)
        return (a.T * weights) @ a / a.shape[0] + self.l2 * torch.eye(self.dim, dtype=a.dtype)

    def smoothness(self, m: Optional[int] = None) -> float:
        """``L`` of ``f_m`` (of ``f`` when ``m`` is None), a global bound: ``lambda_max(A^T A) / n`` (``/ 4`` for
        logistic, whose weights ``s (1 - s)`` are at most 1/4) ``+ l2``, ``A`` the rows of ``m`` (or all rows)."""
        a = self.features[m] if m is not None else torch.cat(list(self.features))
        scale = 0.25 if self.kind == "logistic" else 1.0
        return scale * float(torch.linalg.eigvalsh(a.T @ a / a.shape[0])[-1]) + self.l2

    def strong_convexity(self) -> float:
        """``mu``, global: ``l2`` for logistic (its data term's curvature vanishes far out), ``lambda_min`` of the
        Hessian for ridge."""
        if self.kind == "logistic":
            return float(self.l2)
        a = torch.cat(list(self.features))
        return float(torch.linalg.eigvalsh(a.T @ a / a.shape[0])[0]) + self.l2


def average(tensors: Iterable[Tensor]) -> Tensor:
    """The mean of the tensors (float64 sums, in order)."""
    items = list(tensors)
    return sum(items[1:], items[0].clone()) / len(items)


def objective(problem: Problem, x: Tensor) -> float:
    """``f(x)``."""
    return sum(problem.loss(m, x) for m in range(problem.n_workers)) / problem.n_workers


def gradient(problem: Problem, x: Tensor) -> Tensor:
    """``grad f(x)``."""
    return average(problem.grad(m, x) for m in range(problem.n_workers))


def similarity(problem: Problem, points: Sequence[Tensor]) -> float:
    """``delta`` estimated as ``max over points and m of ||hess f_m(x) - hess f(x)||_2`` (exact Hessians; for a
    quadratic one point gives the exact value, otherwise it is the largest value seen at ``points``)."""
    worst = 0.0
    for x in points:
        hessians = [problem.hessian(m, x) for m in range(problem.n_workers)]
        mean = average(hessians)
        worst = max(worst, max(float(torch.linalg.matrix_norm(h - mean, ord=2)) for h in hessians))
    return worst


def solve(problem: Problem, x0: Optional[Tensor] = None, tol: float = 1e-15,
          max_iters: int = 100) -> tuple[Tensor, float]:
    """``(x*, f*)`` by Newton's method with exact Hessians and a backtracking line search, until half the squared
    Newton decrement (``f(x) - f*`` to second order) is at most ``tol * max(1, |f(x)|)`` (float64 rounding of ``f``
    is about 1e-17 of it); an error when ``max_iters`` steps do not get there."""
    x = torch.zeros(problem.dim, dtype=torch.float64) if x0 is None else x0.clone().to(torch.float64)
    fx = objective(problem, x)
    decrement = math.inf
    for _ in range(max_iters):
        g = gradient(problem, x)
        step = torch.linalg.solve(average(problem.hessian(m, x) for m in range(problem.n_workers)), g)
        decrement = 0.5 * float(g @ step)
        if decrement <= tol * max(1.0, abs(fx)):
            return x - step, objective(problem, x - step)
        t = 1.0
        while True:
            candidate = x - t * step
            fc = objective(problem, candidate)
            if fc <= fx - 0.25 * t * float(g @ step) or t < 1e-12:
                break
            t *= 0.5
        x, fx = candidate, fc
    raise RuntimeError(f"Newton did not reach a decrement of {tol:.3g} in {max_iters} steps ({decrement:.3g}); "
                       "raise max_iters or tol")


# ======================================================================================================================
# Wire accounting and histories
# ======================================================================================================================
BITS_PER_BYTE = 8
#: Uncompressed vectors travel as fp32.
FP32 = Identity()


def fp32_bits(dim: int) -> int:
    """Bits of one uncompressed vector of ``dim`` values (fp32, as the library counts it)."""
    return BITS_PER_BYTE * FP32.payload_bytes(dim)


def send_fp32(x: Tensor) -> Tensor:
    """What the receiver of an uncompressed vector gets: ``x`` rounded to fp32, back in float64."""
    return FP32.decompress(FP32.compress(x), x.numel()).to(torch.float64)


@dataclass
class History:
    """What a run records after every iteration: the communication rounds so far, uplink bits sent per worker
    (the most any worker sent; every non-server worker sends the same here), downlink bits broadcast by the server,
    ``f(x) - f*`` (``f(x)`` when ``f*`` is not given) and ``||grad f(x)||`` at the method's output point."""

    method: str
    rounds: list[int] = field(default_factory=list)
    bits: list[int] = field(default_factory=list)
    downlink_bits: list[int] = field(default_factory=list)
    gap: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def first_reaching(self, target: float) -> Optional[int]:
        """The first record index with ``gap <= target`` (None when never)."""
        return next((i for i, g in enumerate(self.gap) if g <= target), None)

    def as_dict(self) -> dict:
        return {"method": self.method, "rounds": self.rounds, "bits": self.bits, "downlink_bits": self.downlink_bits,
                "gap": self.gap, "grad_norm": self.grad_norm, "info": self.info}


#: A run whose ``f(x) - f*`` grows past this multiple of its first value stops as diverged.
DIVERGED = 1e8


class Recorder:
    """Counts bits per worker and appends records to a :class:`History`; says when to stop (``max_rounds`` reached,
    ``f(x) - f* <= target``, or diverged: not finite, or past :data:`DIVERGED` times its first value, marked
    ``info["diverged"]``)."""

    def __init__(self, problem: Problem, method: str, f_star: Optional[float], target: Optional[float],
                 max_rounds: int):
        if isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds < 1:
            raise ValueError(f"max_rounds must be an int >= 1 (communication rounds), got {max_rounds!r}")
        if target is not None and f_star is None:
            raise ValueError("a target on f(x) - f* needs f_star (e.g. from gsoft.distributed.olga.solve)")
        self.problem, self.f_star, self.target, self.max_rounds = problem, f_star, target, max_rounds
        self.uplink = [0] * problem.n_workers
        self.downlink = 0
        self.rounds = 0
        self.history = History(method)

    def send(self, m: int, bits: int) -> None:
        """Worker ``m >= 1`` sends ``bits`` to the server (the server, worker 0, sends nothing uplink)."""
        if m == 0:
            raise ValueError("worker 0 is the server: its own gradients do not travel")
        self.uplink[m] += bits

    def broadcast(self, bits: int) -> None:
        self.downlink += bits

    def record(self, x: Tensor) -> bool:
        """Record ``x``; True when the run should stop (target reached, round budget spent, or not finite)."""
        h = self.history
        fx = objective(self.problem, x)
        gap = fx - self.f_star if self.f_star is not None else fx
        h.rounds.append(self.rounds)
        h.bits.append(max(self.uplink))
        h.downlink_bits.append(self.downlink)
        h.gap.append(gap)
        h.grad_norm.append(float(gradient(self.problem, x).norm()))
        if not math.isfinite(gap) or (self.f_star is not None and gap > DIVERGED * max(h.gap[0], 1e-300)):
            h.info["diverged"] = True
            return True
        return self.rounds >= self.max_rounds or (self.target is not None and gap <= self.target)


def unbiased(compressor: Compressor) -> bool:
    """Whether ``decompress(compress(x))`` equals ``x`` in expectation (Rand-K only when rescaled)."""
    return not compressor.biased


def round_seed(seed: int, iteration: int, stage: int) -> int:
    """The seed of one communication round (``stage`` tells rounds of one iteration apart)."""
    return (seed * 1_000_003 + iteration) * 7 + stage


def message_seed(round_seed: int, worker: int) -> int:
    """The seed of one worker's message in a round (Rand-K's coordinates): different per worker, so the server's
    average of ``M - 1`` messages has ``1 / (M - 1)`` of one message's variance; the server derives the same seed
    to decode."""
    return round_seed * 10_007 + worker


# ======================================================================================================================
# OLGA / EF-OLGA
# ======================================================================================================================
def variance_factor(compressor: Compressor, dim: int) -> Optional[float]:
    """``omega`` with ``E||Q(v) - v||^2 <= omega ||v||^2`` for the unbiased compressors whose bound is known
    (Identity: 0; rescaled Rand-K: ``d / k - 1``; int8 with stochastic rounding: ``chunk / (4 * 127^2)``); None
    for the others."""
    if isinstance(compressor, Identity):
        return 0.0
    if isinstance(compressor, RandK) and compressor.rescale:
        return dim / (compressor.payload_bytes(dim) // 4) - 1.0
    if isinstance(compressor, Int8):
        return min(compressor.chunk_size, dim) / (4.0 * 127**2)
    return None


def check_number(name: str, value: object, low: float, high: float = math.inf, low_open: bool = True,
                 fix: str = "") -> None:
    """A ``ValueError`` naming ``name``, the accepted range, ``value`` and ``fix`` unless ``value`` is a finite
    number above ``low`` (or equal to it when not ``low_open``) and at most ``high``."""
    finite = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if finite and (value > low if low_open else value >= low) and value <= high:
        return
    if math.isfinite(high):
        span = f"in {'(' if low_open else '['}{low:g}, {high:g}]"
    else:
        span = f"{'>' if low_open else '>='} {low:g}"
    raise ValueError(f"{name} must be a finite number {span}, got {value!r}" + (f"; {fix}" if fix else ""))


@dataclass(frozen=True)
class Parameters:
    """The numbers one run uses, resolved from an :class:`OLGAConfig` for a problem's ``dim`` and ``n_workers``."""

    omega: float  # the compressor's variance factor (0 under error feedback: no variance term)
    delta_eff: float  # the similarity the defaults use: delta + sqrt(omega (M - 1)) / M * L_Q
    theta: float
    tau: float
    eta: float
    p: float
    inner_lr: float


@dataclass
class OLGAConfig:
    """Settings of :func:`olga`. ``mu``, ``delta`` and ``smoothness`` describe the problem; ``theta``, ``tau``,
    ``eta`` and ``p`` default to AEG's theory (Kovalev et al. 2022) with ``L_p = delta_eff`` (see
    :meth:`parameters`)."""

    #: ``mu``: strong convexity of ``f`` (a lower bound).
    mu: float
    #: ``delta``: Hessian similarity, ``||hess f_m - hess f|| <= delta`` (an upper bound; see :func:`similarity`).
    delta: float
    #: ``L``: smoothness of every ``f_m`` (an upper bound). Sets the proximal solver's step ``1 / (L + 1/theta)``
    #: and, when ``relative`` is off, the Lipschitz bound of the compressed differences.
    smoothness: float
    #: The uplink compressor: unbiased (``RandK(ratio, rescale=True)``) gives OLGA, biased (``TopK(ratio)``) with
    #: error feedback gives EF-OLGA; ``Identity()`` sends fp32.
    compressor: Compressor = field(default_factory=Identity)
    #: Error feedback (EF-OLGA). None: on exactly when the compressor is biased.
    error_feedback: Optional[bool] = None
    #: True: worker ``m`` compresses ``Delta_m - Delta_0``, its gradient change since ``w`` minus the server's (which
    #: the server broadcasts, counted as downlink), and the server adds ``Delta_0`` back. Under similarity this
    #: difference is ``2 delta``-Lipschitz in ``z - w`` where ``Delta_m`` alone is ``L``-Lipschitz, so the
    #: compression error shrinks with ``delta``. False: ``Delta_m`` itself is compressed.
    relative: bool = True
    #: ``omega``, the unbiased compressor's variance factor (``E||Q(v) - v||^2 <= omega ||v||^2``); None: from
    #: :func:`variance_factor`. Not used under error feedback.
    omega: Optional[float] = None
    #: Probability that a loop ends after an iteration; None: the compressor's payload over an fp32 vector's
    #: (capped at 1), so that loop ends cost about one compressed message per iteration on average.
    p: Optional[float] = None
    #: What EF-OLGA does with its errors at a loop end: ``reset`` (set to zero, nothing sent) or ``send`` (sent
    #: uncompressed, and the server moves ``x -= eta (1/M) sum_m e_m``, the undelivered part of its steps).
    error_flush: Literal["reset", "send"] = "reset"
    #: Proximal parameter ``theta``; None: ``1 / (2 delta_eff)``.
    theta: Optional[float] = None
    #: Momentum weight ``tau`` in (0, 1]; None: ``min(1, sqrt(mu / delta_eff) / 2)``.
    tau: Optional[float] = None
    #: Step ``eta``; None: ``min(1 / (2 mu), 1 / (2 sqrt(mu delta_eff)))``.
    eta: Optional[float] = None
    #: The proximal solve stops when ``||grad A(z)|| <= inner_tol ||z - x_g|| / theta``.
    inner_tol: float = 1.0 / 3.0
    #: Gradient steps of one proximal solve at most (solves that hit the cap are counted in the history's info).
    inner_max_iters: int = 1000
    #: Seeds the loop coin and Rand-K's coordinates.
    seed: int = 0

    def __post_init__(self) -> None:
        check_number("mu", self.mu, 0.0,
                     fix="pass a lower bound on f's strong convexity (l2 for regularised logistic regression)")
        check_number("delta", self.delta, 0.0,
                     fix="pass an upper bound on ||hess f_m - hess f|| (gsoft.distributed.olga.similarity "
                         "estimates it)")
        check_number("smoothness", self.smoothness, 0.0, fix="pass an upper bound on every f_m's L")
        if not isinstance(self.compressor, Compressor):
            raise TypeError(f"compressor must be a gsoft.distributed.compressors.Compressor (e.g. TopK(0.1) or "
                            f"RandK(0.1, rescale=True)), got {type(self.compressor).__name__}")
        if self.compressor.variable_size:
            raise ValueError(f"compressor {self.compressor.describe()} sends a data-dependent number of values; use "
                             "TopK(ratio) (EF-OLGA) or RandK(ratio, rescale=True) (OLGA)")
        for name in ("error_feedback", "relative"):
            value = getattr(self, name)
            if not (isinstance(value, bool) or (name == "error_feedback" and value is None)):
                raise TypeError(f"{name} must be True or False{' or None' if name == 'error_feedback' else ''}, got "
                                f"{value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}")
        if self.error_feedback is None:
            self.error_feedback = not unbiased(self.compressor)
        if not self.error_feedback and not unbiased(self.compressor):
            raise ValueError(f"compressor {self.compressor.describe()} is biased: OLGA needs an unbiased one "
                             "(RandK(ratio, rescale=True)); or set error_feedback=True (EF-OLGA)")
        if self.omega is not None:
            if self.error_feedback:
                raise ValueError(f"omega={self.omega!r} is the variance of an unbiased compressor; EF-OLGA (error "
                                 "feedback) does not use it: leave omega=None")
            check_number("omega", self.omega, 0.0, low_open=False, fix="E||Q(v) - v||^2 <= omega ||v||^2")
        if self.p is not None:
            check_number("p", self.p, 0.0, 1.0,
                         fix="the chance that a loop ends after an iteration; None for the default")
        if self.error_flush not in ("reset", "send"):
            raise ValueError(f"error_flush must be 'reset' or 'send', got {self.error_flush!r}")
        if self.error_flush == "send" and not self.error_feedback:
            raise ValueError("error_flush='send' sends EF-OLGA's errors; without error feedback there are none: "
                             "leave error_flush='reset'")
        for name in ("theta", "eta"):
            if getattr(self, name) is not None:
                check_number(name, getattr(self, name), 0.0, fix="or None for the default")
        if self.tau is not None:
            check_number("tau", self.tau, 0.0, 1.0, fix="or None for min(1, sqrt(mu / delta_eff) / 2)")
        check_number("inner_tol", self.inner_tol, 0.0, fix="1/3 is Kovalev et al.'s criterion")
        if isinstance(self.inner_max_iters, bool) or not isinstance(self.inner_max_iters, int) \
                or self.inner_max_iters < 1:
            raise ValueError(f"inner_max_iters must be an int >= 1, got {self.inner_max_iters!r}")

    @property
    def method(self) -> str:
        return "EF-OLGA" if self.error_feedback else "OLGA"

    def parameters(self, dim: int, n_workers: int) -> Parameters:
        """The run's numbers. Unbiased compression adds to ``delta`` the Lipschitz-type bound of the estimate's
        error, ``sqrt(omega (M - 1)) / M * L_Q`` (``E||estimate - exact||^2 <= omega (M - 1) / M^2 * L_Q^2
        ||z - w||^2``, with ``L_Q = 2 delta`` when ``relative``, else ``smoothness``); ``theta``, ``tau`` and
        ``eta`` follow AEG's rule with that ``delta_eff``. Error feedback adds nothing (its error is not noise)."""
        omega = 0.0
        if not self.error_feedback:
            known = variance_factor(self.compressor, dim)
            omega = self.omega if self.omega is not None else known
            if omega is None:
                raise ValueError(f"no variance bound is known for {self.compressor.describe()}: pass omega "
                                 "(E||Q(v) - v||^2 <= omega ||v||^2)")
        lipschitz = 2.0 * self.delta if self.relative else self.smoothness
        delta_eff = self.delta + math.sqrt(omega * (n_workers - 1)) / n_workers * lipschitz
        theta = self.theta if self.theta is not None else 1.0 / (2.0 * delta_eff)
        tau = self.tau if self.tau is not None else min(1.0, math.sqrt(self.mu / delta_eff) / 2.0)
        eta = self.eta if self.eta is not None else \
            min(1.0 / (2.0 * self.mu), 1.0 / (2.0 * math.sqrt(self.mu * delta_eff)))
        p = self.p if self.p is not None else min(1.0, self.compressor.payload_bytes(dim) / FP32.payload_bytes(dim))
        return Parameters(omega=omega, delta_eff=delta_eff, theta=theta, tau=tau, eta=eta, p=p,
                          inner_lr=1.0 / (self.smoothness + 1.0 / theta))


def prox_step(problem: Problem, x_g: Tensor, shift: Tensor, theta: float, lr: float, tol: float,
              max_iters: int) -> tuple[Tensor, int, bool]:
    """Approximately ``argmin_z f_0(z) + <shift, z> + ||z - x_g||^2 / (2 theta)`` by gradient descent from ``x_g``
    with step ``lr``, until ``||grad A(z)|| <= tol ||z - x_g|| / theta``; returns ``(z, steps taken, whether the
    criterion held)`` (False: ``max_iters`` steps were not enough)."""
    z = x_g.clone()
    for steps in range(max_iters + 1):
        grad_a = problem.grad(0, z) + shift + (z - x_g) / theta
        if steps > 0 and float(grad_a.norm()) <= tol * float((z - x_g).norm()) / theta:
            return z, steps, True
        if steps < max_iters:
            z = z - lr * grad_a
    return z, max_iters, False


class GradientEstimator:
    """OLGA's uplink: the gradient estimate at a point from the workers' compressed messages (steps 2 and 4), the
    loop ends' uncompressed sends (step 6), the fp32 reference gradients at ``w`` both sides keep and the workers'
    error buffers ``errors[m]`` (EF-OLGA); every message is counted in the :class:`Recorder`."""

    def __init__(self, problem: Problem, config: OLGAConfig, rec: Recorder):
        self.problem, self.config, self.rec = problem, config, rec
        dim = problem.dim
        self.message_bits = BITS_PER_BYTE * config.compressor.payload_bytes(dim)
        self.errors = [torch.zeros(dim, dtype=torch.float64) for _ in range(problem.n_workers)]
        self.known: list[Tensor] = []
        self.mean = torch.zeros(dim, dtype=torch.float64)

    def refresh(self, w: Tensor) -> None:
        """A loop end: ``w`` becomes the reference, every worker sends ``grad f_m(w)`` in fp32 (each side keeps the
        fp32 value as the reference, so both subtract the same vector) and the error buffers restart at zero."""
        problem, dim = self.problem, self.problem.dim
        self.known = [problem.grad(0, w)] + [send_fp32(problem.grad(m, w)) for m in range(1, problem.n_workers)]
        self.mean = average(self.known)
        for m in range(1, problem.n_workers):
            self.rec.send(m, fp32_bits(dim))
            self.errors[m].zero_()

    def flush_errors(self) -> Tensor:
        """``error_flush='send'``: every worker sends its error in fp32; returns their sum divided by ``M`` (the server
        keeps no error)."""
        dim = self.problem.dim
        total = torch.zeros(dim, dtype=torch.float64)
        for m in range(1, self.problem.n_workers):
            total = total + send_fp32(self.errors[m])
            self.rec.send(m, fp32_bits(dim))
        return total / self.problem.n_workers

    def estimate(self, z: Tensor, seed: int) -> Tensor:
        """``grad f(w) + (1/M) [Delta_0 + sum_m decoded messages]`` with ``Delta_m = grad f_m(z) - grad f_m(w)``
        (each message plus ``Delta_0`` when ``relative``, which the server broadcasts first)."""
        problem, config, comp, dim = self.problem, self.config, self.config.compressor, self.problem.dim
        own = problem.grad(0, z) - self.known[0]
        base = torch.zeros(dim, dtype=torch.float64)
        if config.relative:
            self.rec.broadcast(fp32_bits(dim))
            base = send_fp32(own)
        total = own.clone()
        for m in range(1, problem.n_workers):
            message = problem.grad(m, z) - self.known[m] - base
            if config.error_feedback:
                message = message + self.errors[m]
            seed_m = message_seed(seed, m)
            decoded = comp.decompress(comp.compress(message, shared_seed=seed_m), dim, shared_seed=seed_m)
            decoded = decoded.to(torch.float64)
            if config.error_feedback:
                self.errors[m] = message - decoded
            self.rec.send(m, self.message_bits)
            total = total + decoded + base
        return self.mean + total / problem.n_workers


def olga(problem: Problem, config: OLGAConfig, *, max_rounds: int, x0: Optional[Tensor] = None,
         f_star: Optional[float] = None, target: Optional[float] = None) -> History:
    """Run OLGA / EF-OLGA for ``max_rounds`` communication rounds, or until ``f(x_f) - f* <= target``. Round 1
    sends ``grad f_m(x0)``; each iteration has two rounds (the estimates at ``x_g`` and at ``x_f``; a loop end's
    uncompressed send goes with the second, the coin being shared), and an iteration is not split, so an even
    ``max_rounds`` ends one round past it. Returns the :class:`History` of ``x_f``."""
    dim, n = problem.dim, problem.n_workers
    params = config.parameters(dim, n)
    rec = Recorder(problem, config.method, f_star, target, max_rounds)
    coin = random.Random(config.seed)
    uplink = GradientEstimator(problem, config, rec)
    x = torch.zeros(dim, dtype=torch.float64) if x0 is None else x0.clone().to(torch.float64)
    x_f = x.clone()
    rec.broadcast(fp32_bits(dim))
    rec.rounds += 1
    uplink.refresh(x_f)
    counts = {"iterations": 0, "loops": 0, "inner_steps": 0, "inner_capped": 0}
    stop = rec.record(x_f)
    while not stop:
        k = counts["iterations"]
        x_g = params.tau * x + (1 - params.tau) * x_f
        rec.broadcast(fp32_bits(dim))
        rec.rounds += 1
        g_g = uplink.estimate(x_g, round_seed(config.seed, k, 0))
        x_f, steps, solved = prox_step(problem, x_g, g_g - problem.grad(0, x_g), params.theta, params.inner_lr,
                                       config.inner_tol, config.inner_max_iters)
        counts["inner_steps"] += steps
        counts["inner_capped"] += not solved
        rec.broadcast(fp32_bits(dim))
        rec.rounds += 1
        g_f = uplink.estimate(x_f, round_seed(config.seed, k, 1))
        x = x + params.eta * config.mu * (x_f - x) - params.eta * g_f
        if coin.random() < params.p:
            counts["loops"] += 1
            if config.error_feedback and config.error_flush == "send":
                x = x - params.eta * uplink.flush_errors()
            uplink.refresh(x_f)
        counts["iterations"] += 1
        stop = rec.record(x_f)
    rec.history.info.update(counts, parameters=asdict(params), compressor=config.compressor.describe(),
                            error_feedback=config.error_feedback, relative=config.relative,
                            error_flush=config.error_flush)
    return rec.history
