"""Which backend multiplies activations by a GS matrix: the rule, resolved once per layer, device and dtype.

Backends:

* ``"torch"``: batched matmuls from :mod:`gsoft.gs` (the reference; every device).
* ``"triton"``: the fused kernels of :mod:`gsoft.kernels`; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``
  (Triton's interpreter, for tests). Activations may be fp16/bf16/fp32/fp64 with fp32 blocks; accumulation is fp32.
* ``"cuda"``: the optional CUDA extension (one-pass shapes only), compiled on first use.
* ``"auto"``: the rule of :data:`AUTO_RULE`.

:func:`matrix_form` is the other per-device rule: how a GS matrix is built and applied (block-diagonal groups, one
dense block, or one pass per factor); :func:`in_form` and :func:`diagonal_blocks` give a matrix's layout in its form.

An explicit fused backend that cannot run raises a ``RuntimeError`` that says why; nothing falls back silently.
This module imports :mod:`gsoft.gs` (the math), :mod:`gsoft.kernels.availability` (which imports neither Triton nor
the extension) and, lazily, :mod:`gsoft.kernels.ops`; none of them imports it back.
"""

from __future__ import annotations

import logging
from typing import Literal, get_args

import torch

from . import gs
from .kernels.availability import FusedBackend, unavailable_reason

logger = logging.getLogger(__name__)

Backend = Literal["auto", "torch", FusedBackend]
BACKENDS: tuple[str, ...] = get_args(Backend)


def check_backend(backend: str) -> None:
    """``backend`` is one of :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise ValueError(
            f"Unknown GS backend {backend!r}; choose one of {BACKENDS} ('auto' follows gsoft.plan.AUTO_RULE)."
        )


#: What ``"auto"`` picks, per device type. GSOFT layers fold the input rotation into the frozen weight in the
#: forward and multiply activations only in the backward (two block-diagonal products per layer), so the backend only
#: decides who runs those. Measured on an H200 (docs/benchmarks.md), the torch path is faster end to end than the
#: Triton kernels there: RoBERTa-base step 1.19x LoRA against 1.35x (fp32), 1.25x against 1.29x (bf16); each Triton
#: launch costs 25-60 us of host time in a step that is host-bound. ``backend="triton"`` still selects the kernels.
AUTO_RULE: dict[str, str] = {"cpu": "torch", "cuda": "torch"}

#: Largest block size whose two factors run as their dense groups (``b^2`` wide, :func:`gsoft.gs.two_factor_groups`),
#: per device type: on a CPU the groups' ``b^2`` multiply-adds per feature stop paying off above b = 8; a GPU runs the
#: batched GEMM of 256-wide groups at about 80 % of its memory bandwidth (H200, cuBLAS).
GROUPED_MAX_BLOCK: dict[str, int] = {"cpu": gs.GROUPED_MAX_BLOCK, "cuda": 16}
#: Largest dimension whose GS matrix runs as one dense ``n x n`` block on each device type when it is not grouped.
#: On a GPU one GEMM of ``n`` multiply-adds per feature beats the factored form's ``2m`` passes of small block
#: multiplies with shuffles in between (each a kernel over the whole activation); on a CPU the arithmetic counts.
#: The bound is memory: a dense rotation and its gradient are ``n^2`` floats each, kept for the whole step, where the
#: factors are ``m n b``. 1280 keeps the Stable Diffusion UNets' attention widths (320-1280) dense; at Llama-3.2-1B's
#: 2048 the dense form took a 4-bit GSOFT step's peak memory to 2.88x QLoRA's, against 1.09x with the factors
#: (``python recipes/benchmark.py quantized --matrix_forms cuda``, measured on a CPU; docs/quantized.md).
DENSE_MAX: dict[str, int] = {"cpu": 0, "cuda": 1280}
Form = Literal["blocks", "groups", "dense", "factors"]


def matrix_form(n_factors: int, n_blocks: int, block_size: int, device_type: str) -> Form:
    """How a GS matrix with these sizes is built and applied on a device type:

    * ``"blocks"``: one factor, its ``(r, b, b)`` blocks (one block-diagonal multiply);
    * ``"groups"``: two factors with ``b | r`` as their dense groups ``(r / b, b^2, b^2)`` (one block-diagonal multiply);
    * ``"dense"``: the whole matrix as one ``(1, n, n)`` block (one GEMM);
    * ``"factors"``: the blocks ``(m, r, b, b)``, one pass per factor.

    The first three are block-diagonal (:func:`block_diagonal`); see :data:`GROUPED_MAX_BLOCK` and
    :data:`DENSE_MAX` for the device rules.
    """
    if n_factors == 1:
        return "blocks"
    if gs.grouped(n_factors, n_blocks, block_size, GROUPED_MAX_BLOCK.get(device_type, gs.GROUPED_MAX_BLOCK)):
        return "groups"
    if n_blocks * block_size <= DENSE_MAX.get(device_type, 0):
        return "dense"
    return "factors"


def block_diagonal(form: Form) -> bool:
    """Whether a matrix of this form is one block-diagonal multiply (all forms but ``"factors"``)."""
    return form != "factors"


def diagonal_blocks(form: Form, n_blocks: int, block_size: int) -> int:
    """Number ``k`` of diagonal blocks of a block-diagonal form: ``r`` ("blocks"), ``r / b`` ("groups"), 1 ("dense")."""
    if form == "blocks":
        return n_blocks
    if form == "groups":
        return n_blocks // block_size
    if form == "dense":
        return 1
    raise ValueError(f"A GS matrix of form {form!r} is not block-diagonal.")


def in_form(blocks: torch.Tensor, form: Form) -> torch.Tensor:
    """One matrix's blocks ``(m, r, b, b)`` in the layout of ``form``: the diagonal blocks ``(k, c, c)`` of the
    block-diagonal forms, or the blocks themselves for "factors"."""
    if form == "blocks":
        return blocks[0]
    if form == "groups":
        return gs.two_factor_groups(blocks)
    if form == "dense":
        return gs.materialize(blocks).unsqueeze(0)
    return blocks


_AUTO_CHOICES_LOGGED: set[tuple[str, str]] = set()


def resolve_backend(backend: str, x: torch.Tensor, blocks: torch.Tensor | None = None) -> str:
    """The backend (``"torch"``, ``"triton"`` or ``"cuda"``) that multiplies ``x`` (by ``blocks``) here."""
    if backend == "torch":
        return "torch"
    check_backend(backend)
    if backend == "auto":
        choice = AUTO_RULE.get(x.device.type, "torch")
        if choice != "torch" and unavailable_reason(choice, x, blocks):
            choice = "torch"
        if (choice, x.device.type) not in _AUTO_CHOICES_LOGGED:
            _AUTO_CHOICES_LOGGED.add((choice, x.device.type))
            logger.info("GS backend 'auto' uses %r for tensors on %r.", choice, x.device.type)
        return choice
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
