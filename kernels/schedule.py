"""The passes of a fused GS multiply (no Triton needed: the CUDA backend and the op layer share it).

A pass computes ``y = S_b^out_pow · W · S_r^in_pow · x`` for every row (see :mod:`gsoft.kernels.triton_gs`):
a block-diagonal multiply whose perfect shuffles are folded into the read and write indices,
``(S_r v)[p] = v[f(p)]`` with ``f(p) = (p mod r) b + p div r``.
"""

from __future__ import annotations

from typing import NamedTuple


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


