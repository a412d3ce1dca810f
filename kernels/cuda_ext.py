"""The optional CUDA extension (``gs_grouped.cu``): one-pass GS multiply and its gradients, for GPUs without Triton.

Built with ``torch.utils.cpp_extension.load`` the first time ``backend="cuda"`` runs (never at import; the build
takes a minute and is cached by torch under ``~/.cache/torch_extensions``). It only runs passes without folded
shuffles, so :func:`gsoft.kernels.schedule.cuda_unsupported_reason` limits it to ``n_factors = 1``, or
``n_factors = 2`` with ``b | r`` through the dense two-factor groups, with groups of at most 64.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from .. import gs
from .availability import cuda_unavailable_reason
from .schedule import Pass

SOURCE = Path(__file__).with_name("gs_grouped.cu")


@functools.lru_cache(maxsize=None)
def extension():
    """Compile (once per machine) and load the extension; a clear error if that is impossible here."""
    probe = torch.empty(0, device="cuda") if torch.cuda.is_available() else torch.empty(0)
    reason = cuda_unavailable_reason(probe)
    if reason:
        raise RuntimeError(f"Cannot build the gsoft CUDA extension: {reason}.")
    from torch.utils.cpp_extension import load

    try:
        return load(name="gsoft_gs_grouped", sources=[str(SOURCE)], extra_cuda_cflags=["-O3"], verbose=False)
    except Exception as exc:  # compiler missing or failing: say which file and why
        raise RuntimeError(f"Building the gsoft CUDA extension from {SOURCE} failed: {exc}") from exc


def _unit_columns(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(1) == 1 else t.contiguous()


def _check_pass(step: Pass) -> None:
    if step.in_pow or step.out_pow:
        raise RuntimeError("The gsoft CUDA extension has no folded shuffles; use backend='triton' for this shape.")


def block_multiply(x: torch.Tensor, blocks: torch.Tensor, step: Pass, shuffle_blocks: int, shuffle_size: int):
    """Same contract as :func:`gsoft.kernels.triton_gs.block_multiply`, for passes without shuffles."""
    _check_pass(step)
    return extension().forward(_unit_columns(x), blocks[step.factor], step.transpose_blocks)


def block_grad(grad, x, blocks, step: Pass, shuffle_blocks: int, shuffle_size: int) -> torch.Tensor:
    """Same contract as :func:`gsoft.kernels.triton_gs.block_grad`: partial sums over row chunks, added here."""
    _check_pass(step)
    n_rows = x.shape[0]
    sms = gs.cuda_multiprocessors(x.device)
    splits = max(1, min(4 * sms // max(1, blocks.shape[1]), (n_rows + 255) // 256))
    partial = extension().weight_grad(
        _unit_columns(grad.to(x.dtype)), _unit_columns(x), blocks.shape[1], step.transpose_blocks, splits
    )
    return partial.sum(0)
