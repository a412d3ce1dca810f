"""Group-and-Shuffle (GS) orthogonal matrices: the one place where the math lives.

Conventions (docs/method.md explains them):

* A GS matrix of size ``n = n_blocks * block_size`` with ``m = n_factors`` factors is

      Q = (P^T)^(m-1) · B_m · P · B_(m-1) · ... · P · B_1

  where every ``B_i`` is block-diagonal with ``n_blocks`` orthogonal ``block_size x block_size`` blocks and
  ``P = P_(n_blocks, n)`` is the perfect shuffle. For ``m = 2`` this is the paper's ``Q = P^T L P R``
  (``R = B_1`` acts first); for ``m = 1`` it is OFT's block-diagonal rotation.
* ``P_(k, n)`` acting on a vector: reshape row-major to ``(k, n // k)``, transpose, flatten. Its inverse is
  ``P_(n // k, n)``.
* Blocks are stored as a tensor of shape ``(n_factors, n_blocks, block_size, block_size)``; ``gs_apply`` computes
  ``Q x`` for every vector ``x`` along one dimension of a tensor, without materialising ``Q``.
* Skew-symmetric blocks are parametrised by their ``b (b - 1) / 2`` strictly-upper-triangular entries, in
  ``torch.triu_indices(b, b, 1)`` order (the same order as PEFT's OFT), ``K = U - U^T``.
"""

from __future__ import annotations

import functools
from typing import Literal, Optional, Union, get_args

import torch

OrthogonalMap = Literal["cayley", "cayley_neumann", "exp"]
ORTHOGONAL_MAPS: tuple[str, ...] = get_args(OrthogonalMap)
NFactors = Union[int, Literal["auto"]]


# ----------------------------------------------------------------------------------------------------------------------
# Sizes
# ----------------------------------------------------------------------------------------------------------------------
def divisors(n: int) -> list[int]:
    """All divisors of ``n``, used to tell users which block sizes would fit a layer."""
    return [d for d in range(1, n + 1) if n % d == 0]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_sizes(block_size: Optional[int], n_blocks: Optional[int]) -> None:
    """The rules of ``block_size`` / ``n_blocks`` that hold for every dimension: exactly one of them, an int >= 2 or
    an int >= 1. :func:`resolve_blocks` adds the dimension's own rule (divisibility)."""
    if block_size is not None and n_blocks is not None:
        raise ValueError(
            f"Give only one of `block_size` and `n_blocks` (got block_size={block_size}, n_blocks={n_blocks}): the "
            "other follows per dimension from dimension = block_size * n_blocks."
        )
    if block_size is None and n_blocks is None:
        raise ValueError("Give one of `block_size` and `n_blocks` (got neither); dimension = block_size * n_blocks.")
    if block_size is not None and (not _is_int(block_size) or block_size < 2):
        raise ValueError(f"block_size must be an int >= 2, got {block_size!r}.")
    if n_blocks is not None and (not _is_int(n_blocks) or n_blocks < 1):
        raise ValueError(f"n_blocks must be an int >= 1, got {n_blocks!r}.")


def resolve_blocks(n: int, block_size: int | None = None, n_blocks: int | None = None, where: str = "") -> tuple[int, int]:
    """Turn exactly one of ``block_size`` / ``n_blocks`` into ``(block_size, n_blocks)`` for a dimension ``n``.

    Raises a ``ValueError`` that lists the sizes that would fit instead of silently adjusting them (PEFT's OFT rounds
    the block size to a neighbour with a warning; GSOFT asks for an explicit choice).
    """
    check_sizes(block_size, n_blocks)
    where = f" for {where}" if where else ""
    valid = [d for d in divisors(n) if d >= 2]
    if block_size is not None:
        if n % block_size != 0:
            raise ValueError(
                f"block_size={block_size} does not divide the dimension {n}{where}. Block sizes that would: {valid}."
            )
        return block_size, n // block_size
    if n % n_blocks != 0 or n // n_blocks < 2:
        raise ValueError(
            f"n_blocks={n_blocks} does not divide the dimension {n}{where} into blocks of size >= 2. "
            f"Numbers of blocks that would: {sorted(n // d for d in valid)}."
        )
    return n // n_blocks, n_blocks


def auto_n_factors(n_blocks: int, block_size: int) -> int:
    """Fewest GS factors giving a dense matrix: ``1 + ceil(log_b r)`` (computed in integers, no float rounding)."""
    check_sizes(block_size, None)
    k, reach = 0, 1
    while reach < n_blocks:
        reach *= block_size
        k += 1
    return 1 + k


#: Upper bound of ``n_factors`` whatever the layer: ``1 + ceil(log_b r)`` factors make a GS matrix dense, which is
#: at most 64 for every block size >= 2 and dimension below 2^63. Each layer bounds it further by its own size
#: (:func:`max_n_factors`); this bound refuses absurd values before any layer is built.
MAX_N_FACTORS = 64


def check_n_factors(n_factors: NFactors) -> None:
    """``n_factors`` is an int in ``[1, MAX_N_FACTORS]`` or ``"auto"``."""
    if n_factors == "auto":
        return
    if not _is_int(n_factors) or n_factors < 1:
        raise ValueError(f"n_factors must be an int >= 1 or 'auto', got {n_factors!r}.")
    if n_factors > MAX_N_FACTORS:
        raise ValueError(
            f"n_factors={n_factors} is more than any layer can use: at most {MAX_N_FACTORS} (1 + log2 of the dimension "
            "factors already make a GS matrix dense). Use n_factors='auto' (the fewest that give a dense matrix) or a "
            "small int such as 2."
        )


def max_n_factors(n: int, block_size: int) -> int:
    """Most GS factors that make sense for dimension ``n``: beyond ``1 + ceil(log2 n)`` factors (which make a GS
    matrix of any block size dense) and beyond ``(n - 1) // (b - 1)`` (where it has more free parameters,
    ``m n (b - 1) / 2``, than a dense ``n x n`` rotation, ``n (n - 1) / 2``), more factors only cost memory and time."""
    return max(1 + (n - 1).bit_length(), (n - 1) // (block_size - 1))


def resolve_n_factors(n_factors: NFactors, n_blocks: int, block_size: int, where: str = "") -> int:
    """Validate ``n_factors`` (an int >= 1 or ``"auto"``) for one dimension and return it as an int."""
    check_n_factors(n_factors)
    if n_factors == "auto":
        return auto_n_factors(n_blocks, block_size)
    where = f" for {where}" if where else ""
    if n_factors > 1 and n_blocks == 1:
        raise ValueError(
            f"n_factors={n_factors} needs at least 2 blocks, but block_size={block_size} covers the whole dimension"
            f"{where}: one factor is already a dense rotation. Use n_factors=1 or 'auto', or a smaller block_size."
        )
    limit = max_n_factors(n_blocks * block_size, block_size)
    if n_factors > limit:
        raise ValueError(
            f"n_factors={n_factors} with block_size={block_size}{where} is more than this size can use: more than "
            "1 + log2 of the dimension (which make any GS matrix dense) and more free parameters than a dense "
            f"rotation. Use n_factors <= {limit}, or 'auto' "
            f"(= {auto_n_factors(n_blocks, block_size)} here, the fewest that give a dense matrix)."
        )
    return n_factors


def gs_param_count(n: int, block_size: int, n_factors: int) -> int:
    """Trainable skew parameters of one GS matrix: ``n_factors * n_blocks * b (b - 1) / 2``."""
    return n_factors * (n // block_size) * n_skew_params(block_size)


def n_skew_params(block_size: int) -> int:
    """Free entries of one ``b x b`` skew-symmetric block."""
    return block_size * (block_size - 1) // 2


# ----------------------------------------------------------------------------------------------------------------------
# Orthogonal blocks
# ----------------------------------------------------------------------------------------------------------------------
def skew_symmetric(params: torch.Tensor, block_size: int) -> torch.Tensor:
    """``(..., b(b-1)/2)`` free entries -> ``(..., b, b)`` skew-symmetric matrices ``K = U - U^T``."""
    if params.shape[-1] != n_skew_params(block_size):
        raise ValueError(
            f"Expected {n_skew_params(block_size)} skew parameters per block of size {block_size}, "
            f"got {params.shape[-1]}."
        )
    rows, cols = torch.triu_indices(block_size, block_size, 1, device=params.device)
    upper = params.new_zeros(*params.shape[:-1], block_size, block_size)
    upper[..., rows, cols] = params
    return upper - upper.transpose(-1, -2)


def skew_params(skew: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`skew_symmetric`: the strictly-upper entries of ``(..., b, b)`` matrices."""
    rows, cols = torch.triu_indices(skew.shape[-1], skew.shape[-1], 1, device=skew.device)
    return skew[..., rows, cols]


#: Most terms of the ``cayley_neumann`` series. Its error is ``||K||_2^t``: at ``||K||_2 <= 1/2`` 53 terms already
#: reach float64 precision, at ``||K||_2 >= 1`` no number of terms converges, and each term is one more batched
#: matmul per rebuild, so more terms only cost time.
MAX_NEUMANN_TERMS = 64


def check_orthogonal_map(orthogonal_map: str, neumann_terms: int = 5) -> None:
    """``orthogonal_map`` is one of :data:`ORTHOGONAL_MAPS`; ``neumann_terms`` (used by ``cayley_neumann``) an int
    in ``[1, MAX_NEUMANN_TERMS]``."""
    if orthogonal_map not in ORTHOGONAL_MAPS:
        raise ValueError(f"Unknown orthogonal_map {orthogonal_map!r}; choose one of {ORTHOGONAL_MAPS}.")
    if not _is_int(neumann_terms) or not 1 <= neumann_terms <= MAX_NEUMANN_TERMS:
        raise ValueError(
            f"neumann_terms must be an int in [1, {MAX_NEUMANN_TERMS}], got {neumann_terms!r}: the series' error is "
            f"||K||^neumann_terms, so {MAX_NEUMANN_TERMS} terms reach float64 precision wherever it converges; use "
            "orthogonal_map='cayley' for the exact map."
        )


def skew_norm_bound(params: torch.Tensor, block_size: int) -> torch.Tensor:
    """An upper bound of the spectral norm of every skew-symmetric block, ``(..., b(b-1)/2)`` -> ``(...)``, within a
    factor ``b^(1/8)`` of it: ``||K^4||_F^(1/4)`` (``K`` is normal, so ``||K^4||_2 = ||K||_2^4``). Two batched
    matmuls, no decomposition; NaN where ``params`` has NaN, inf where ``K^4`` overflows."""
    skew = skew_symmetric(_at_least_float32(params), block_size)
    square = skew @ skew
    return torch.linalg.matrix_norm(square @ square).pow(0.25)


def orthogonal_from_skew(
    skew: torch.Tensor, orthogonal_map: OrthogonalMap = "cayley", neumann_terms: int = 5
) -> torch.Tensor:
    """Map skew-symmetric ``K`` (``(..., b, b)``) to orthogonal blocks.

    * ``cayley`` (exact): ``(I + K)(I - K)^{-1}``, one batched ``torch.linalg.solve``.
    * ``cayley_neumann`` (approximate): ``(I + K)(I + K + ... + K^(t-1))`` with ``t = neumann_terms``. It equals the
      exact Cayley map times ``(I - K^t)``, so ``||Q - Q_cayley||_2 <= ||K||_2^t``: accurate while ``||K||_2 << 1``,
      which is the fine-tuning regime (K starts at zero), and not orthogonal for large K.
    * ``exp`` (exact): ``torch.matrix_exp(K)``.
    """
    check_orthogonal_map(orthogonal_map, neumann_terms)
    eye = torch.eye(skew.shape[-1], dtype=skew.dtype, device=skew.device)
    if orthogonal_map == "cayley":
        return torch.linalg.solve(eye - skew, eye + skew)
    if orthogonal_map == "cayley_neumann":
        series = eye.expand_as(skew)
        power = eye.expand_as(skew)
        for _ in range(1, neumann_terms):
            power = power @ skew
            series = series + power
        return (eye + skew) @ series
    return torch.linalg.matrix_exp(skew)


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def inverse_transpose_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """``B^{-T}`` per block, so that ``gs_apply(., inverse_transpose_blocks(B), transpose=True)`` applies ``Q_B^{-1}``
    (the shuffles are permutations). Equals ``B`` for exactly orthogonal blocks; unmerging needs it because
    ``cayley_neumann`` blocks are only approximately orthogonal. Computed in at least float32."""
    return torch.linalg.inv(_at_least_float32(blocks)).transpose(-1, -2).to(blocks.dtype)


def orthogonal_blocks(
    params: torch.Tensor, block_size: int, orthogonal_map: OrthogonalMap = "cayley", neumann_terms: int = 5
) -> torch.Tensor:
    """Free skew parameters ``(..., b(b-1)/2)`` -> orthogonal blocks ``(..., b, b)`` in the parameters' dtype.

    Computed in at least float32 with autocast off: a Cayley solve in fp16/bf16 loses orthogonality (and CPUs have
    no half-precision solve).
    """
    compute = _at_least_float32(params)
    with torch.autocast(device_type=params.device.type, enabled=False):
        blocks = orthogonal_from_skew(skew_symmetric(compute, block_size), orthogonal_map, neumann_terms)
    return blocks.to(params.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Applying GS matrices
# ----------------------------------------------------------------------------------------------------------------------
def perfect_shuffle(x: torch.Tensor, k: int) -> torch.Tensor:
    """Apply ``P_(k, n)`` to the rows of ``x`` (shape ``(N, n)``): reshape to ``(k, n/k)``, transpose, flatten."""
    rows, n = x.shape
    return x.view(rows, k, n // k).transpose(1, 2).reshape(rows, n)


def block_diag_apply(x: torch.Tensor, blocks: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """``y = B x`` (``B^T x``) for rows ``x`` of shape ``(N, r * b)`` and block-diagonal ``B`` given as ``(r, b, b)``
    blocks: one batched matmul over the blocks (rows viewed as ``(r, N, b)``), then one copy back to ``(N, r b)``."""
    rows, n = x.shape
    r, b, _ = blocks.shape
    h = torch.bmm(x.reshape(rows, r, b).transpose(0, 1), blocks if transpose else blocks.transpose(1, 2))
    return h.transpose(0, 1).reshape(rows, n)


#: Largest block size for which two-factor GS matrices are applied through their dense groups (see
#: :func:`two_factor_groups`): tiny b x b batched multiplies run at a fraction of GEMM speed, while the groups cost b
#: times the arithmetic; measured on CPU, grouping wins for b <= 8 and loses at b = 16.
GROUPED_MAX_BLOCK = 8


def two_factor_groups(blocks: torch.Tensor) -> torch.Tensor:
    """For ``n_factors = 2`` and ``b | r``: ``Q = P^T B_2 P B_1`` is block-diagonal with ``r / b`` dense blocks of size
    ``b^2``; returns them as ``(r / b, b^2, b^2)``.

    Group ``h`` owns the first-factor blocks ``h b + l``; row ``i`` of their outputs meets in the second-factor block
    ``i H + h`` (``H = r / b``), and the final ``P^T`` puts its row ``p`` at block ``h b + p``, offset ``i``:
    ``G[h, (p, i), (l, j)] = B_2[i H + h, p, l] · B_1[h b + l, i, j]``.
    """
    _, r, b, _ = blocks.shape
    groups = r // b
    first = blocks[0].view(groups, b, b, b)  # [h, l, i, j]: block h*b + l, row i, column j
    second = blocks[1].view(b, groups, b, b)  # [i, h, p, l]: block i*H + h, row p, column l
    return torch.einsum("ihpl,hlij->hpilj", second, first).reshape(groups, b * b, b * b)


def grouped(n_factors: int, n_blocks: int, block_size: int, max_block: Optional[int] = None) -> bool:
    """Whether a GS matrix is applied through its dense two-factor groups (:func:`two_factor_groups`): two factors,
    ``b | r``, and ``b`` at most ``max_block`` (default :data:`GROUPED_MAX_BLOCK`, the CPU reference's limit; the
    device plans of :mod:`gsoft.plan` and the fused kernels pass their own)."""
    limit = GROUPED_MAX_BLOCK if max_block is None else max_block
    return n_factors == 2 and n_blocks % block_size == 0 and block_size <= limit


def block_diag_grad_split(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``sum_rows grad_h^T x_h`` for batches ``(k, N, c)`` of rows (the block gradient of :func:`block_diag_apply` in its
    batched layout), ``(k, c, c)``.

    With few blocks and many rows one batched matmul has too little parallel work for a GPU (k output tiles, each
    a reduction over all N rows), so on CUDA the rows are split into chunks whose partial products are summed.
    """
    k, rows, c = grad.shape
    chunks = _row_chunks(grad.device, k, rows)
    if chunks == 1:
        return torch.bmm(grad.transpose(1, 2), x)
    n = rows // chunks
    g = grad.view(k, chunks, n, c).permute(1, 0, 3, 2)  # (chunks, k, c, n)
    return torch.matmul(g, x.view(k, chunks, n, c).transpose(0, 1)).sum(0)


_SM_COUNTS: dict[int, int] = {}


def cuda_multiprocessors(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (cached: the property query is slow), for work split across the GPU."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


def _row_chunks(device: torch.device, k: int, rows: int) -> int:
    """Row chunks for :func:`block_diag_grad_split`: 1 off CUDA and for a single block (one GEMM, which cuBLAS splits
    itself); on CUDA enough ``k x chunks`` products for about two waves of the GPU's multiprocessors, chunks of at
    least 256 rows, a divisor of ``rows``."""
    if device.type != "cuda" or k == 1:
        return 1
    target = min(rows // 256, -(-2 * cuda_multiprocessors(device) // k))
    for chunks in range(max(target, 1), 0, -1):
        if rows % chunks == 0:
            return chunks
    return 1


def gs_apply(x: torch.Tensor, blocks: torch.Tensor, dim: int = -1, transpose: bool = False) -> torch.Tensor:
    """Compute ``Q x`` (or ``Q^T x`` with ``transpose=True``) for every vector of ``x`` along ``dim``: the reference.

    ``blocks`` has shape ``(n_factors, n_blocks, b, b)``; ``x`` and ``blocks`` share a dtype. Works for any leading
    shape and never builds the dense ``n x n`` matrix: each factor is a batched block multiply, each shuffle a
    reshape/transpose (two factors with ``b | r`` and small ``b`` go through their dense groups,
    :func:`two_factor_groups`). :func:`gsoft.plan.gs_apply` adds the fused backends on top of this.
    """
    m, r, b, b2 = blocks.shape
    if b != b2:
        raise ValueError(f"GS blocks must be square, got shape {tuple(blocks.shape)}.")
    h, restore = as_rows(x, r * b, dim, f" (n_blocks={r} x block_size={b})")
    if grouped(m, r, b):
        h = block_diag_apply(h, two_factor_groups(blocks), transpose)
    elif not transpose:
        for i in range(m):
            if i > 0:
                h = perfect_shuffle(h, r)
            h = block_diag_apply(h, blocks[i])
        for _ in range(m - 1):
            h = perfect_shuffle(h, b)
    else:
        blocks_t = blocks.transpose(-1, -2)
        for _ in range(m - 1):
            h = perfect_shuffle(h, r)
        for i in reversed(range(m)):
            h = block_diag_apply(h, blocks_t[i])
            if i > 0:
                h = perfect_shuffle(h, b)
    return restore(h)


def as_rows(x: torch.Tensor, n: int, dim: int = -1, what: str = ""):
    """``x`` as rows ``(N, n)`` of its vectors along ``dim``, and the function that puts rows of that shape back into
    ``x``'s layout. Raises if that dimension is not of size ``n``."""
    move = dim not in (-1, x.ndim - 1)
    moved = x.movedim(dim, -1) if move else x
    if moved.shape[-1] != n:
        raise ValueError(
            f"GS matrix of size {n}{what} cannot act on dimension {dim} of size {moved.shape[-1]} "
            f"(input shape {tuple(x.shape)})."
        )

    def restore(rows: torch.Tensor) -> torch.Tensor:
        y = rows.reshape(moved.shape)
        return y.movedim(-1, dim) if move else y

    return moved.reshape(-1, n), restore


def materialize(blocks: torch.Tensor) -> torch.Tensor:
    """The dense ``n x n`` matrix ``Q`` (for merging small layers and for tests)."""
    m, r, b, _ = blocks.shape
    eye = torch.eye(r * b, dtype=blocks.dtype, device=blocks.device)
    # Rows of the identity through Q^T give the rows of Q.
    return gs_apply(eye, blocks, transpose=True)


def materialize_batched(blocks: torch.Tensor) -> torch.Tensor:
    """The dense matrices ``Q`` ``(L, n, n)`` of ``L`` GS matrices of one shape, blocks ``(L, m, r, b, b)``:
    :func:`materialize` for many at once (a handful of batched ops whatever ``L``)."""
    count, m, r, b, _ = blocks.shape
    n = r * b

    def shuffle(h: torch.Tensor, k: int) -> torch.Tensor:
        return h.view(count, n, k, n // k).transpose(-1, -2).reshape(count, n, n)

    # rows of the identity through Q^T are the rows of Q (the transposed branch of gs_apply, batched)
    h = torch.eye(n, dtype=blocks.dtype, device=blocks.device).expand(count, n, n)
    blocks_t = blocks.transpose(-1, -2)
    for _ in range(m - 1):
        h = shuffle(h, r)
    for i in reversed(range(m)):
        h = torch.einsum("lnkj,lkij->lnki", h.reshape(count, n, r, b), blocks_t[:, i]).reshape(count, n, n)
        if i > 0:
            h = shuffle(h, b)
    return h


# ----------------------------------------------------------------------------------------------------------------------
# Structure
# ----------------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def is_dense(n: int, block_size: int, n_factors: int) -> bool:
    """Whether a GS matrix with these sizes has no structural zeros (generic orthogonal blocks).

    Exact and cheap (O(n^2 m) on the CPU): after the first factor every output depends on whole first-factor blocks,
    so it suffices to push one input per block through ``gs_apply`` with positive (averaging) blocks and check that
    every output sees every block.
    """
    r = n // block_size
    if r == 1:
        return True
    if block_size ** n_factors < n:  # each factor at most multiplies a row's support by b
        return False
    blocks = torch.full((n_factors, r, block_size, block_size), 1.0 / block_size)
    probes = torch.zeros(r, n)
    probes[torch.arange(r), torch.arange(r) * block_size] = 1.0
    return bool((gs_apply(probes, blocks) > 0).all())


def describe(n: int, block_size: int, n_factors: int) -> str:
    """A one-line summary for logs, e.g. ``n=768 b=8 r=96 m=2 (not dense: 64/768 non-zeros per row)``."""
    r = n // block_size
    dense = is_dense(n, block_size, n_factors)
    if dense:
        return f"n={n} block_size={block_size} n_blocks={r} n_factors={n_factors} (dense)"
    nnz = min(n, block_size**n_factors)
    return (
        f"n={n} block_size={block_size} n_blocks={r} n_factors={n_factors} (not dense: at most {nnz}/{n} non-zeros "
        f"per row; n_factors={auto_n_factors(r, block_size)} would be dense)"
    )
