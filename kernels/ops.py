"""The fused GS multiply as PyTorch custom ops (``torch.ops.gsoft.*``) with autograd, for the Triton and CUDA backends.

:func:`gs_multiply` is what :func:`gsoft.gs_apply` calls for ``backend="triton" | "cuda"``. It picks the plan:

* ``m = 2`` with ``b | r`` and ``b <= FUSED_MAX_BLOCK``: ``Q`` is block-diagonal with ``r / b`` dense ``b^2 x b^2``
  groups (:func:`gsoft.gs.two_factor_groups`). The groups are built in torch (tiny: ``n b^2`` entries), so torch's
  autograd maps their gradient back to both block factors; the kernel multiplies the activations by the groups in
  **one pass** (read once, write once).
* otherwise (``m != 2``, ``b`` not dividing ``r``, or ``b^2`` so large that the dense groups would make the multiply
  compute-bound): **m passes**, one per factor, each reading and writing the activations once, with the perfect
  shuffles folded into the passes' load/store indices (:func:`gsoft.kernels.schedule.pass_schedule`).

The ops are registered with ``torch.library.custom_op`` plus ``register_fake`` and ``register_autograd``, so
``torch.compile`` traces through them without a graph break (Inductor calls them as opaque kernels) and gradient
checkpointing simply re-runs them. The backward computes ``dx = Q^T g`` with the same pass kernels (adjoint passes)
and the block gradients with a row-reduction kernel (per-program partial sums added in torch: deterministic). The
multi-pass plan saves only its input and *recomputes* the ``m - 1`` intermediate activations in the backward instead
of keeping them alive between forward and backward.
"""

from __future__ import annotations

import torch

from .. import gs
from .availability import check_fused_backend
from .schedule import Pass, grouped_plan, pass_schedule


def gs_multiply(x: torch.Tensor, blocks: torch.Tensor, transpose: bool, backend: str) -> torch.Tensor:
    """``Q x`` (``Q^T x``) for the rows of ``x`` (``(N, n)``, any strides) with a fused backend; differentiable."""
    m, r, b, _ = blocks.shape
    if grouped_plan(blocks):
        groups = gs.two_factor_groups(blocks)
        return torch.ops.gsoft.gs_multiply(x, groups.unsqueeze(0), r, b, transpose, backend)
    return torch.ops.gsoft.gs_multiply(x, blocks, r, b, transpose, backend)


# ----------------------------------------------------------------------------------------------------------------------
# Backend implementations of one pass and its block gradient
# ----------------------------------------------------------------------------------------------------------------------
def backend_module(backend: str):
    """The module of a fused backend: ``triton_gs`` or ``cuda_ext``, both with ``block_multiply(x, blocks, step,
    shuffle_blocks, shuffle_size)`` and ``block_grad(grad, x, blocks, step, shuffle_blocks, shuffle_size)``. Imported
    on first use (Triton, the extension's build)."""
    check_fused_backend(backend)
    if backend == "triton":
        from . import triton_gs

        return triton_gs
    from . import cuda_ext

    return cuda_ext


def _schedule(blocks: torch.Tensor, transpose: bool) -> list[Pass]:
    return pass_schedule(blocks.shape[0], transpose)


def _check(x: torch.Tensor, blocks: torch.Tensor) -> None:
    m, nb, bs, bs2 = blocks.shape
    if x.ndim != 2 or x.shape[1] != nb * bs or bs != bs2:
        raise ValueError(f"gs_multiply: x {tuple(x.shape)} does not match blocks {tuple(blocks.shape)}.")


@torch.library.custom_op("gsoft::gs_multiply", mutates_args=())
def _gs_multiply_op(
    x: torch.Tensor, blocks: torch.Tensor, shuffle_blocks: int, shuffle_size: int, transpose: bool, backend: str
) -> torch.Tensor:
    """All passes of ``Q x``: ``blocks`` is ``(m, nb, bs, bs)``; the shuffles are those of ``shuffle_blocks`` blocks
    of size ``shuffle_size`` (unused for one pass)."""
    _check(x, blocks)
    impl = backend_module(backend)
    blocks = blocks.contiguous()
    h = x
    for step in _schedule(blocks, transpose):  # at least one pass: the result never aliases x
        h = impl.block_multiply(h, blocks, step, shuffle_blocks, shuffle_size)
    return h


@_gs_multiply_op.register_fake
def _(x, blocks, shuffle_blocks, shuffle_size, transpose, backend):
    return x.new_empty(x.shape)


@torch.library.custom_op("gsoft::gs_multiply_backward", mutates_args=())
def _gs_multiply_backward_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    blocks: torch.Tensor,
    shuffle_blocks: int,
    shuffle_size: int,
    transpose: bool,
    backend: str,
    need_x: bool,
    need_blocks: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, dblocks)`` of :func:`_gs_multiply_op`. Recomputes the intermediate activations of the multi-pass plan
    (one extra pass each) instead of having saved them. Unneeded outputs are returned empty."""
    _check(x, blocks)
    impl = backend_module(backend)
    blocks = blocks.contiguous()
    grad = grad.to(x.dtype)
    schedule = _schedule(blocks, transpose)
    inputs = [x]
    if need_blocks:
        for step in schedule[:-1]:
            inputs.append(impl.block_multiply(inputs[-1], blocks, step, shuffle_blocks, shuffle_size))
    grad_blocks = torch.zeros(blocks.shape, dtype=blocks.dtype, device=blocks.device) if need_blocks else None
    g = grad
    for i in reversed(range(len(schedule))):
        step = schedule[i]
        if need_blocks:
            grad_blocks[step.factor] = impl.block_grad(g, inputs[i], blocks, step, shuffle_blocks, shuffle_size)
        if need_x or i > 0:
            g = impl.block_multiply(g, blocks, step.adjoint(), shuffle_blocks, shuffle_size)
    grad_x = g if need_x else x.new_empty(0)  # with need_x, g went through at least one adjoint pass
    return grad_x, (grad_blocks if need_blocks else blocks.new_empty(0))


@_gs_multiply_backward_op.register_fake
def _(grad, x, blocks, shuffle_blocks, shuffle_size, transpose, backend, need_x, need_blocks):
    grad_x = x.new_empty(x.shape) if need_x else x.new_empty(0)
    grad_blocks = blocks.new_empty(blocks.shape) if need_blocks else blocks.new_empty(0)
    return grad_x, grad_blocks


def _setup_context(ctx, inputs, output) -> None:
    x, blocks, shuffle_blocks, shuffle_size, transpose, backend = inputs
    ctx.save_for_backward(x, blocks)
    ctx.args = (shuffle_blocks, shuffle_size, transpose, backend)


def _backward(ctx, grad):
    x, blocks = ctx.saved_tensors
    need_x, need_blocks = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_x, grad_blocks = torch.ops.gsoft.gs_multiply_backward(grad, x, blocks, *ctx.args, need_x, need_blocks)
    return (grad_x if need_x else None), (grad_blocks if need_blocks else None), None, None, None, None


_gs_multiply_op.register_autograd(_backward, setup_context=_setup_context)
