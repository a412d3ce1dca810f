"""The methods OLGA is compared with, on the same :class:`~gsoft.distributed.olga.Problem` and the same bit count.

* :func:`gd`: distributed gradient descent, every worker sending ``grad f_m(x)`` in fp32 each round;
* :func:`ef21`: EF21 (Richtarik, Sokolov, Fatkhullin 2021), each worker sending ``C(grad f_m(x) - g_m)`` and both
  sides adding it to ``g_m``;
* :func:`qsparse_local`: Qsparse-local-SGD (Basu et al. 2019) with deterministic local gradients: ``H`` local
  gradient steps from the shared point, then the compressed change with error feedback, averaged;
* :func:`aeg`: Accelerated ExtraGradient (Kovalev et al. 2022), uncompressed: OLGA's iteration with the exact
  ``grad f`` at ``x_g`` and ``x_f`` (two fp32 rounds per iteration).

The server is worker 0: its own gradients and changes are exact and cost no uplink bits. Every method records its
history after each communication round (AEG: after each iteration, two rounds).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from .compressors import Compressor, Identity, TopK
from .olga import (
    BITS_PER_BYTE,
    History,
    OLGAConfig,
    Problem,
    Recorder,
    average,
    check_number,
    fp32_bits,
    message_seed,
    prox_step,
    round_seed,
    send_fp32,
)

Tensor = torch.Tensor


def _check_lr(lr: object) -> None:
    check_number("lr", lr, 0.0, fix="1 / L is gradient descent's safe step")


def _check_compressor(compressor: object, seed: object) -> None:
    if not isinstance(compressor, Compressor) or compressor.variable_size:
        raise ValueError(f"compressor must be a fixed-size gsoft.distributed.compressors.Compressor (e.g. "
                         f"TopK(0.1)), got {compressor!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")


@dataclass
class GDConfig:
    """Distributed gradient descent."""

    #: Step size (theory: ``1 / L``, ``L`` the smoothness of ``f``).
    lr: float

    def __post_init__(self) -> None:
        _check_lr(self.lr)


@dataclass
class EF21Config:
    """EF21 with a contractive compressor."""

    #: Step size (theory: ``1 / (L + L_tilde sqrt(beta / theta))``, see :func:`ef21_theory_lr`).
    lr: float
    #: The compressor (biased contractive, e.g. ``TopK(0.1)``).
    compressor: Compressor = field(default_factory=lambda: TopK(0.1))
    #: Seeds Rand-K's coordinates when the compressor draws them.
    seed: int = 0

    def __post_init__(self) -> None:
        _check_lr(self.lr)
        _check_compressor(self.compressor, self.seed)


def ef21_theory_lr(smoothness: float, smoothness_tilde: float, ratio: float) -> float:
    """EF21's step for Top-K keeping a fraction ``ratio`` (contraction ``alpha = ratio``):
    ``1 / (L + L_tilde sqrt(beta / theta))`` with ``theta = 1 - sqrt(1 - alpha)`` and
    ``beta = (1 - alpha) / (1 - sqrt(1 - alpha))`` (Richtarik et al. 2021, Theorem 1)."""
    check_number("ratio", ratio, 0.0, 1.0, fix="the fraction of coordinates Top-K keeps")
    alpha = ratio
    if alpha >= 1:
        return 1.0 / smoothness
    theta = 1 - math.sqrt(1 - alpha)
    beta = (1 - alpha) / theta
    return 1.0 / (smoothness + smoothness_tilde * math.sqrt(beta / theta))


@dataclass
class QsparseConfig:
    """Qsparse-local-SGD with deterministic local gradients."""

    #: Local step size (theory for local GD: ``1 / L`` or smaller).
    lr: float
    #: Local gradient steps between two communications (``H``).
    local_steps: int = 4
    #: The compressor of the changes (``TopK`` with error feedback, as in Qsparse-local-SGD).
    compressor: Compressor = field(default_factory=lambda: TopK(0.1))
    #: Seeds Rand-K's coordinates when the compressor draws them.
    seed: int = 0

    def __post_init__(self) -> None:
        _check_lr(self.lr)
        if isinstance(self.local_steps, bool) or not isinstance(self.local_steps, int) or self.local_steps < 1:
            raise ValueError(f"local_steps must be an int >= 1 (H, gradient steps per round), got "
                             f"{self.local_steps!r}")
        _check_compressor(self.compressor, self.seed)


def _start(problem: Problem, x0: Optional[Tensor]) -> Tensor:
    return torch.zeros(problem.dim, dtype=torch.float64) if x0 is None else x0.clone().to(torch.float64)


def _exchange(compressor: Compressor, vector: Tensor, seed: int) -> Tensor:
    """What the server decodes from one compressed message of ``vector``."""
    dim = vector.numel()
    payload = compressor.compress(vector, shared_seed=seed)
    return compressor.decompress(payload, dim, shared_seed=seed).to(torch.float64)


def gd(problem: Problem, config: GDConfig, *, max_rounds: int, x0: Optional[Tensor] = None,
       f_star: Optional[float] = None, target: Optional[float] = None) -> History:
    """Distributed gradient descent: ``x -= lr (1/M) sum_m grad f_m(x)``, one fp32 round per step."""
    rec = Recorder(problem, "GD", f_star, target, max_rounds)
    x = _start(problem, x0)
    stop = rec.record(x)
    while not stop:
        rec.broadcast(fp32_bits(problem.dim))
        received = [problem.grad(0, x)]
        for m in range(1, problem.n_workers):
            received.append(send_fp32(problem.grad(m, x)))
            rec.send(m, fp32_bits(problem.dim))
        rec.rounds += 1
        x = x - config.lr * average(received)
        stop = rec.record(x)
    return rec.history


def ef21(problem: Problem, config: EF21Config, *, max_rounds: int, x0: Optional[Tensor] = None,
         f_star: Optional[float] = None, target: Optional[float] = None) -> History:
    """EF21: ``x -= lr g``, then each worker sends ``c_m = C(grad f_m(x) - g_m)`` and ``g_m += c_m``;
    ``g = (grad f_0(x) + sum_m g_m) / M``. The first round sends ``g_m = grad f_m(x0)`` in fp32."""
    dim, n = problem.dim, problem.n_workers
    rec = Recorder(problem, "EF21", f_star, target, max_rounds)
    bits = BITS_PER_BYTE * config.compressor.payload_bytes(dim)
    x = _start(problem, x0)
    rec.broadcast(fp32_bits(dim))
    states = [problem.grad(0, x)] + [send_fp32(problem.grad(m, x)) for m in range(1, n)]
    for m in range(1, n):
        rec.send(m, fp32_bits(dim))
    rec.rounds += 1
    stop = rec.record(x)
    while not stop:
        x = x - config.lr * average(states)
        rec.broadcast(fp32_bits(dim))
        states[0] = problem.grad(0, x)
        for m in range(1, n):
            seed = message_seed(round_seed(config.seed, rec.rounds, 0), m)
            states[m] = states[m] + _exchange(config.compressor, problem.grad(m, x) - states[m], seed)
            rec.send(m, bits)
        rec.rounds += 1
        stop = rec.record(x)
    return rec.history


def qsparse_local(problem: Problem, config: QsparseConfig, *, max_rounds: int, x0: Optional[Tensor] = None,
                  f_star: Optional[float] = None, target: Optional[float] = None) -> History:
    """Qsparse-local-SGD: from the shared ``x`` every worker takes ``H`` gradient steps on its ``f_m``; worker
    ``m >= 1`` sends ``c = C(e_m + x_m - x)`` and keeps ``e_m += x_m - x - c``;
    ``x += (server's change + sum c) / M``."""
    dim, n = problem.dim, problem.n_workers
    rec = Recorder(problem, f"Qsparse-local (H={config.local_steps})", f_star, target, max_rounds)
    bits = BITS_PER_BYTE * config.compressor.payload_bytes(dim)
    x = _start(problem, x0)
    errors = [torch.zeros(dim, dtype=torch.float64) for _ in range(n)]
    stop = rec.record(x)
    while not stop:
        rec.broadcast(fp32_bits(dim))
        total = torch.zeros(dim, dtype=torch.float64)
        for m in range(n):
            local = x.clone()
            for _ in range(config.local_steps):
                local = local - config.lr * problem.grad(m, local)
            change = local - x
            if m == 0:
                total = total + change
                continue
            change = change + errors[m]
            sent = _exchange(config.compressor, change, message_seed(round_seed(config.seed, rec.rounds, 0), m))
            errors[m] = change - sent
            rec.send(m, bits)
            total = total + sent
        rec.rounds += 1
        x = x + total / n
        stop = rec.record(x)
    return rec.history


def aeg(problem: Problem, config: OLGAConfig, *, max_rounds: int, x0: Optional[Tensor] = None,
        f_star: Optional[float] = None, target: Optional[float] = None) -> History:
    """Accelerated ExtraGradient with the exact (fp32-sent) ``grad f``: ``config``'s ``theta``, ``tau``, ``eta``,
    ``mu`` and proximal solver settings; its compressor must be ``Identity()`` (nothing else is used)."""
    if not isinstance(config.compressor, Identity):
        raise ValueError(f"aeg sends uncompressed gradients; its config's compressor must be Identity(), got "
                         f"{config.compressor.describe()} (use gsoft.distributed.olga.olga for compressed ones)")
    dim, n = problem.dim, problem.n_workers
    params = config.parameters(dim, n)
    rec = Recorder(problem, "AEG", f_star, target, max_rounds)

    def full_gradient(z: Tensor) -> Tensor:
        rec.broadcast(fp32_bits(dim))
        received = [problem.grad(0, z)]
        for m in range(1, n):
            received.append(send_fp32(problem.grad(m, z)))
            rec.send(m, fp32_bits(dim))
        rec.rounds += 1
        return average(received)

    x = _start(problem, x0)
    x_f = x.clone()
    inner_steps = 0
    stop = rec.record(x_f)
    while not stop:
        x_g = params.tau * x + (1 - params.tau) * x_f
        g_g = full_gradient(x_g)
        x_f, steps, _ = prox_step(problem, x_g, g_g - problem.grad(0, x_g), params.theta, params.inner_lr,
                                  config.inner_tol, config.inner_max_iters)
        inner_steps += steps
        g_f = full_gradient(x_f)
        x = x + params.eta * config.mu * (x_f - x) - params.eta * g_f
        stop = rec.record(x_f)
    rec.history.info.update(inner_steps=inner_steps, parameters=asdict(params))
    return rec.history
