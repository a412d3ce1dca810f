"""Which backend multiplies activations by a GS matrix: the rule, resolved once per layer, device and dtype.

Backends:

* ``"torch"``: batched matmuls from :mod:`gsoft.gs` (the reference; every device).
* ``"triton"``: the fused kernels of :mod:`gsoft.kernels`; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``
  (Triton's interpreter, for tests). Activations may be fp16/bf16/fp32/fp64 with fp32 blocks; accumulation is fp32.
* ``"cuda"``: the optional CUDA extension (one-pass shapes only), compiled on first use.
* ``"auto"``: the rule of :data:`AUTO_RULE`.

An explicit fused backend that cannot run raises a ``RuntimeError`` that says why; nothing falls back silently.
This module imports :mod:`gsoft.gs` (the math) and, lazily, :mod:`gsoft.kernels`; neither imports it back.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch

from . import gs

logger = logging.getLogger(__name__)

Backend = Literal["auto", "torch", "triton", "cuda"]
BACKENDS: tuple[str, ...] = ("auto", "torch", "triton", "cuda")

#: What ``"auto"`` picks, per device type. GSOFT layers fold the input rotation into the frozen weight in the
#: forward and spend two block-diagonal multiplies per layer in the backward, so the choice only decides who runs
#: those; "torch" (batched GEMMs) is the choice that is never slower end-to-end on the devices measured
#: (docs/benchmarks.md). An explicit ``backend="triton"`` still selects the fused kernels.
AUTO_RULE: dict[str, str] = {"cpu": "torch", "cuda": "torch"}

_AUTO_CHOICES_LOGGED: set[tuple[str, str]] = set()


def resolve_backend(backend: str, x: torch.Tensor, blocks: torch.Tensor | None = None) -> str:
    """The backend (``"torch"``, ``"triton"`` or ``"cuda"``) that multiplies ``x`` (by ``blocks``) here."""
    if backend == "torch":
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"Unknown GS backend {backend!r}; choose one of {BACKENDS}.")
    if backend == "auto":
        choice = AUTO_RULE.get(x.device.type, "torch")
        if choice != "torch":
            from .kernels.availability import unavailable_reason

            if unavailable_reason(choice, x, blocks):
                choice = "torch"
        if (choice, x.device.type) not in _AUTO_CHOICES_LOGGED:
            _AUTO_CHOICES_LOGGED.add((choice, x.device.type))
            logger.info("GS backend 'auto' uses %r for tensors on %r.", choice, x.device.type)
        return choice
    from .kernels.availability import unavailable_reason

    reason = unavailable_reason(backend, x, blocks)
    if reason:
        raise RuntimeError(f"GS backend {backend!r} cannot run: {reason}. Use backend='torch' or 'auto'.")
    return backend


def gs_apply(
    x: torch.Tensor, blocks: torch.Tensor, dim: int = -1, transpose: bool = False, backend: Backend = "torch"
) -> torch.Tensor:
    """``Q x`` (``Q^T x``) for every vector of ``x`` along ``dim`` with the given backend; differentiable.

    ``"torch"`` is :func:`gsoft.gs.gs_apply` (``x`` and ``blocks`` share a dtype). The fused backends take
    activations in their own dtype with fp32 blocks and return ``x``'s dtype.
    """
    chosen = resolve_backend(backend, x, blocks)
    if chosen == "torch":
        return gs.gs_apply(x, blocks, dim=dim, transpose=transpose)
    from .kernels.ops import gs_multiply

    m, r, b, b2 = blocks.shape
    if b != b2:
        raise ValueError(f"GS blocks must be square, got shape {tuple(blocks.shape)}.")
    rows, restore = gs.as_rows(x, r * b, dim, f" (n_blocks={r} x block_size={b})")
    return restore(gs_multiply(rows, blocks, transpose, chosen))
