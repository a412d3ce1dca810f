"""Plans and passes of a fused GS multiply: pure shape rules, shared by the op layer, the CUDA backend and the
availability checks. Imports nothing from ``gsoft.kernels`` (nor Triton), only :mod:`gsoft.gs`'s grouping rule, so any
of them can import it.

A pass computes ``y = S_b^out_pow · W · S_r^in_pow · x`` for every row (see :mod:`gsoft.kernels.triton_gs`):
a block-diagonal multiply whose perfect shuffles are folded into the read and write indices,
``(S_r v)[p] = v[f(p)]`` with ``f(p) = (p mod r) b + p div r``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .. import gs

#: Largest block size of the one-pass plan for two factors. Each activation costs ``2 b^2`` flops there against
#: ``4 b`` for two passes: up to b = 16 the single pass stays memory-bound on a current GPU (fp16 tensor cores), so
#: saving a read and a write wins; from b = 32 on the dense groups would make it compute-bound.
FUSED_MAX_BLOCK = 16

#: Largest group / block size the CUDA extension handles (its tiles keep a whole ``b^2 x b^2`` group in shared memory).
CUDA_MAX_GROUP = 64


def grouped_plan(blocks: torch.Tensor) -> bool:
    """Whether ``blocks`` (``(m, r, b, b)``) run as one pass over the dense two-factor groups."""
    m, r, b, _ = blocks.shape
    return gs.grouped(m, r, b, FUSED_MAX_BLOCK)


def cuda_unsupported_reason(blocks: torch.Tensor) -> Optional[str]:
    """Why the CUDA extension cannot run these blocks (it only has the one-pass kernel), or None."""
    m, r, b, _ = blocks.shape
    size = b * b if grouped_plan(blocks) else b
    if (m == 1 or grouped_plan(blocks)) and size <= CUDA_MAX_GROUP:
        return None
    return (
        f"the CUDA extension only runs one block-diagonal pass with blocks of at most {CUDA_MAX_GROUP} (n_factors=1, "
        f"or n_factors=2 with block_size | n_blocks and block_size^2 <= {CUDA_MAX_GROUP}); got n_factors={m}, "
        f"n_blocks={r}, block_size={b}. Use backend='triton' or 'torch'."
    )


class Pass(NamedTuple):
    """One block-diagonal pass: which factor, whether its blocks are transposed, and the folded shuffle powers."""

    factor: int
    transpose_blocks: bool
    in_pow: int
    out_pow: int

    def adjoint(self) -> "Pass":
        """The pass computing ``pass^T g``: shuffles swap sides, blocks transpose."""
        return Pass(self.factor, not self.transpose_blocks, self.out_pow, self.in_pow)


def pass_schedule(n_factors: int, transpose: bool) -> list[Pass]:
    """The passes of ``Q x`` (or ``Q^T x``), mirroring :func:`gsoft.gs.gs_apply`'s loops with the shuffles folded.

    ``Q = S_b^(m-1) B_m S_r ... S_r B_1``: pass ``i`` reads through ``S_r`` (``i > 0``) and the last one writes through
    ``S_b^(m-1)``. ``Q^T = B_1^T S_b ... S_b B_m^T S_r^(m-1)``: the first pass reads through ``S_r^(m-1)``, every pass
    but the last writes through ``S_b``.
    """
    m = n_factors
    if not transpose:
        return [Pass(i, False, 1 if i > 0 else 0, m - 1 if i == m - 1 else 0) for i in range(m)]
    return [Pass(m - 1 - t, True, m - 1 if t == 0 else 0, 1 if t < m - 1 else 0) for t in range(m)]
