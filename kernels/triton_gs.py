"""Triton kernels of the GS multiply: one block-diagonal pass with the perfect shuffles folded into its indexing.

A *pass* computes, for every row ``x`` of an ``(N, n)`` matrix,

    y = S_b^out_pow · W · S_r^in_pow · x          (W block-diagonal: ``nb`` blocks of ``bs x bs``, or their transposes)

where ``S_r = P_(r, n)`` is the perfect shuffle of the GS matrix (``r`` blocks of size ``b``) and ``S_b = S_r^-1``.
The shuffles cost nothing: ``(S_r v)[p] = v[f(p)]`` with ``f(p) = (p mod r) b + p div r``, so the pass *reads*
logical input column ``p`` from physical column ``f^in_pow(p)`` and *writes* logical output column ``q`` to
``f^out_pow(q)``. Every pass reads its input once and writes its output once; nothing else touches memory.

* Two factors with ``b | r`` (the common GSOFT case): :mod:`gsoft.kernels.ops` multiplies once with the dense
  ``b^2 x b^2`` groups of :func:`gsoft.gs.two_factor_groups` (no shuffles): one pass in all.
* Anything else: ``m`` passes, one per factor (see :func:`gsoft.kernels.schedule.pass_schedule`).
* :func:`block_multiply` / :func:`block_grad` with ``blocks`` of shape ``(1, nb, c, c)`` and ``Pass(0, t, 0, 0)``
  are a plain block-diagonal multiply (and its block gradient) for any caller.

Numerics: tiles are multiplied with ``tl.dot`` and accumulated in fp32 (fp64 for fp64 inputs). fp16/bf16 inputs
meet the (fp32) blocks cast to their own dtype on tensor cores, as a half-precision ``nn.Linear`` does with its
weight; fp32 inputs follow ``torch.get_float32_matmul_precision()`` (``"highest"``: IEEE fp32, else TF32). Under
``TRITON_INTERPRET=1`` every tile is multiplied in fp32 (the interpreter's bf16 ``tl.dot`` is wrong: numpy has no
bf16). fp64 tiles (gradcheck) are multiplied by ``tl.dot`` in the interpreter and as summed products on a GPU, where
Triton 3.6 does not compile them through ``tl.dot``. Outputs have the input's dtype; block gradients are fp32 (fp64
for fp64 inputs).

Tiling. A program computes ``BLOCK_M`` rows x ``BLOCK_N`` output columns; ``tl.dot`` needs every tile side to be at
least 16, so block sizes that are not powers of two or are below 16 (``b = 3``, ``b^2 = 36``, ...) are masked.

* *Packed* (``2 bs <= BLOCK_N <= 64``): a tile holds ``BLOCK_N // bs`` whole blocks side by side and multiplies
  them in one ``tl.dot`` with the block-diagonal ``BLOCK_N x BLOCK_N`` weight tile (zeros off the blocks). Small
  blocks thus read and write full rows of ``BLOCK_N`` columns (4 x 4 blocks would otherwise move 8 bytes a row per
  program); the extra multiply-adds are free while the pass is memory-bound.
* *Per block* (otherwise): a tile covers ``BLOCK_N`` output columns of one block and loops over its input columns in
  steps of ``BLOCK_K`` (one step when ``BLOCK_K`` spans the block).

The grid is one-dimensional with the column tile fastest: consecutive programs cover neighbouring columns of the
same rows, so the DRAM pages a row tile touches are read by programs that run together.

Tile configs ``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)`` come from a heuristic per shape
(:func:`multiply_config`, :func:`grad_config`): a launch is a plain ``@triton.jit`` launch and the first call of a new
shape only compiles. Environment:

* ``GSOFT_TRITON_AUTOTUNE=1`` (read at every call): instead time every config of ``MULTIPLY_TILES`` /
  ``GRAD_TILES`` plus the heuristic's pick the first time a key (kernel, block size, number of blocks, shuffles,
  dtype, power-of-two bucket of the row count, device) is seen, and keep the fastest in memory for that key. The
  first call of each key then takes seconds; ``python recipes/benchmark.py kernels --sweep`` prints
  the same comparison.
* ``TRITON_INTERPRET=1`` (read when this module is first imported): Triton's CPU interpreter, for tests; every launch
  uses 32-wide tiles (``INTERPRETER_TILES``), which still exercise packing, the K loop and several output tiles.

This module imports Triton; :mod:`gsoft.kernels.ops` imports it only on first use.
"""

from __future__ import annotations

import os
import time
from typing import Callable, NamedTuple, Optional

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from .. import gs
from .schedule import Pass

#: Whether the kernels were decorated for Triton's CPU interpreter (``TRITON_INTERPRET=1`` when this module was
#: first imported). Triton reads the variable when ``@triton.jit`` runs, so setting it later has no effect.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

#: Opt-in autotuning, read at call time (see the module docstring).
AUTOTUNE_ENV = "GSOFT_TRITON_AUTOTUNE"

# How tiles are multiplied (a constexpr of the kernels): tl.dot in half precision, IEEE fp32, TF32 or fp64, or fp64
# products summed without tl.dot (fp64 on a GPU: Triton 3.6 failed to compile the kernels' fp64 tl.dot on an H200).
DOT_HALF, DOT_IEEE, DOT_TF32, DOT_FP64, DOT_FP64_SUM = 0, 1, 2, 3, 4

#: Row chunk of the block-gradient partial sums; a multiple of every BLOCK_M below.
GRAD_ROW_CHUNK = 256

#: Multiprocessors the heuristic plans for when it is not told the device's (an H200 / H100 SXM has 132).
DEFAULT_SMS = 132
#: Waves of programs (per multiprocessor) below which the multiply takes 64-row instead of 128-row tiles. Measured on
#: an H200 (``python recipes/benchmark.py kernels --sweep``): at 4096 x 768 (c = 64) 128-row tiles in 2.9 waves beat
#: 64-row ones in 5.8.
MULTIPLY_WAVES = 2
#: Waves of programs the block gradient's row chunks aim for.
GRAD_WAVES = 4
#: Half-precision passes over at least this many rows get their weights cast to the activation dtype once per call
#: (an exact no-op for the result: the kernel casts them anyway), halving the weight traffic from L2 that every
#: row tile repeats and letting the weight tiles stream like the activations (H200, 65536 x 4096: 6 % faster with
#: c = 16, 27 % with c = 256). Smaller passes are bound by launches, which the extra cast would add to.
PRECAST_MIN_ROWS = 8192


class Tiles(NamedTuple):
    """A launch config: ``block_m`` rows (per step of the gradient's row loop) x ``block_n`` output columns, K steps
    of ``block_k`` (the gradient's ``dW`` tile is ``block_n x block_k``), Triton's warps and pipeline stages."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int

    def label(self) -> str:
        return f"{self.block_m}x{self.block_n}x{self.block_k} w{self.num_warps} s{self.num_stages}"


# ----------------------------------------------------------------------------------------------------------------------
# Tile spaces (autotuning and the sweep) and the heuristic
# ----------------------------------------------------------------------------------------------------------------------
#: Multiply configs timed by ``GSOFT_TRITON_AUTOTUNE=1`` and ``python recipes/benchmark.py kernels --sweep``,
#: normalised per block size (:func:`normalize`): packed tiles for small blocks, whole-block tiles up to ``c = 64``, K loops beyond.
MULTIPLY_TILES = [
    Tiles(64, 64, 64, 4, 2),
    Tiles(128, 64, 64, 4, 2),
    Tiles(128, 128, 64, 8, 3),
    Tiles(128, 256, 64, 8, 3),
    Tiles(256, 128, 64, 8, 3),
]
#: Block-gradient configs: ``(rows per step, BLOCK_N, BLOCK_K, warps, stages)``. Each program reduces one chunk of
#: rows (a multiple of ``GRAD_ROW_CHUNK``); the chunks' partial sums are added in torch (deterministic, no atomics).
GRAD_TILES = [
    Tiles(64, 64, 64, 4, 3),
    Tiles(128, 64, 64, 4, 3),
    Tiles(64, 32, 32, 4, 3),
    Tiles(64, 128, 64, 8, 3),
]
#: The interpreter's one config: 32-wide tiles keep it fast and still exercise packing (``c <= 16``), the K loop and
#: several output tiles per block (``c > 32``).
INTERPRETER_TILES = Tiles(32, 32, 32, 4, 1)
#: What ``GSOFT_TRITON_AUTOTUNE=1`` chooses between under the interpreter (timed on the CPU: tests only).
INTERPRETER_AUTOTUNE_TILES = [INTERPRETER_TILES, Tiles(16, 16, 16, 4, 1)]


def _cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` in plain Python (``triton.cdiv`` goes through Triton's constexpr machinery: slow per call)."""
    return -(-a // b)


def _next_pow2(v: int) -> int:
    return 1 << max(0, v - 1).bit_length()


def padded(block_size: int) -> int:
    """The smallest power of two >= ``block_size`` that ``tl.dot`` accepts (>= 16)."""
    return max(16, _next_pow2(block_size))


#: Widest packed tile: its one K step multiplies a ``BLOCK_N x BLOCK_N`` weight tile, mostly zeros (measured on an
#: H200: 128-wide packed tiles run at 50-60 % of the speed of 64-wide ones in bf16, and spill in fp32).
PACKED_MAX = 64


def packed(block_size: int, tiles: Tiles) -> bool:
    """Whether a tile holds several whole blocks side by side (see the module docstring)."""
    return 2 * block_size <= min(tiles.block_n, PACKED_MAX)


def normalize(tiles: Tiles, block_size: int) -> Tiles:
    """The config a launch really uses for this block size: packed tiles are at most ``PACKED_MAX`` wide and take
    one K step as wide as the tile; per-block tiles are clipped to the padded block (no wider than what they cover)."""
    if packed(block_size, tiles):
        width = min(tiles.block_n, PACKED_MAX)
        return tiles._replace(block_n=width, block_k=width)
    pad = padded(block_size)
    return tiles._replace(block_n=min(tiles.block_n, pad), block_k=min(tiles.block_k, pad))


def column_tiles(block_size: int, n_blocks: int, tiles: Tiles) -> int:
    """Programs per row tile of the multiply (and per row chunk of the gradient, times its K tiles)."""
    if packed(block_size, tiles):
        return _cdiv(n_blocks, tiles.block_n // block_size)
    return n_blocks * _cdiv(block_size, tiles.block_n)


def grad_splits(n_rows: int, programs_per_split: int, n_sms: int, interpreted: Optional[bool] = None) -> int:
    """Row chunks of the block gradient: enough programs for ``GRAD_WAVES`` waves, each chunk a multiple of
    ``GRAD_ROW_CHUNK`` rows; one under the interpreter (no parallelism to gain there)."""
    if INTERPRETED if interpreted is None else interpreted:
        return 1
    chunks = _cdiv(n_rows, GRAD_ROW_CHUNK)
    return max(1, min(chunks, _cdiv(GRAD_WAVES * n_sms, max(1, programs_per_split))))


def _grad_programs_per_split(block_size: int, n_blocks: int, tiles: Tiles) -> int:
    if packed(block_size, tiles):
        return column_tiles(block_size, n_blocks, tiles)
    return column_tiles(block_size, n_blocks, tiles) * _cdiv(block_size, tiles.block_k)


def _rows_tile(n_rows: int, programs_per_row_tile: int, n_sms: int, choices: tuple[int, ...], floor: int) -> int:
    """The largest row tile (from ``choices``, descending) that still gives ``MULTIPLY_WAVES`` waves of programs,
    else the smallest; never far beyond the row count (a 5-row batch gets ``floor``-row tiles)."""
    target = MULTIPLY_WAVES * n_sms
    pick = next((bm for bm in choices if _cdiv(n_rows, bm) * programs_per_row_tile >= target), choices[-1])
    return max(floor, min(pick, _next_pow2(n_rows)))


def multiply_config(
    n_rows: int, block_size: int, n_blocks: int, dtype: torch.dtype, n_sms: int = DEFAULT_SMS
) -> Tiles:
    """Tiles of one pass over ``n_rows`` rows with ``n_blocks`` blocks of ``block_size``, for a GPU with ``n_sms``
    multiprocessors. Planned for an H200 (132 SMs, ~4.3 TB/s, bf16 tensor cores) and checked there with
    ``python recipes/benchmark.py kernels --sweep``:

    ============================  ===================================  ===============================================
    shape class                   config (BM, BN, BK, warps, stages)   why
    ============================  ===================================  ===============================================
    fp16/bf16, ``c <= 64``        (128, 64, 64, 4, 2)                  memory-bound (2c flop/element): a program
                                                                       reads and writes 64 whole columns once (packed
                                                                       for c <= 32), no K loop; 70-86 % of HBM from
                                                                       16384 rows on
    fp16/bf16, ``c > 64``         (128, 128, 64, 8, 3)                 GEMM-like tiles with pipelined K steps; for
                                                                       c = 256 the fastest of the space (52 % of HBM;
                                                                       cuBLAS' batched GEMM reaches 81 %)
    fp32, ``c <= 32``             (128, 32, 32, 4, 2)                  IEEE fp32 runs on FMA units: narrower packed
                                                                       tiles waste fewer multiply-adds
    fp32, ``c > 32``              (128, 64, 64, 4, 2)                  a whole block for c <= 64; for c = 256 within
                                                                       5 % of the fastest config measured (FMA-bound)
    fp64                          (32, 16, 16, 4, 2)                   gradcheck only: products summed in registers
    ============================  ===================================  ===============================================

    ``BM`` drops to 64 when 128-row tiles would give fewer than ``MULTIPLY_WAVES`` waves of programs, and to the row
    count for tiny batches (at least 16; 32 for fp64).
    """
    pad = padded(block_size)
    if dtype == torch.float64:
        tiles = Tiles(32, 16, 16, 4, 2)
    elif dtype == torch.float32:
        tiles = Tiles(128, 32, 32, 4, 2) if pad <= 32 else Tiles(128, 64, 64, 4, 2)
    elif pad <= 64:
        tiles = Tiles(128, 64, 64, 4, 2)
    else:
        tiles = Tiles(128, 128, 64, 8, 3)
    tiles = normalize(tiles, block_size)
    choices = (tiles.block_m, 64) if tiles.block_m > 64 else (tiles.block_m,)
    floor = 32 if dtype == torch.float64 else 16
    programs = column_tiles(block_size, n_blocks, tiles)
    return tiles._replace(block_m=_rows_tile(n_rows, programs, n_sms, choices, floor))


def grad_config(n_rows: int, block_size: int, n_blocks: int, dtype: torch.dtype, n_sms: int = DEFAULT_SMS) -> Tiles:
    """Tiles of the block gradient: ``BLOCK_N x BLOCK_K`` of ``dW`` per program, ``BLOCK_M`` rows per step of its
    row loop (pipelined over ``num_stages``). Parallelism comes from the row chunks (:func:`grad_splits`), so the
    tiles only keep each program's loads wide:

    ============================  ===================================  ===============================================
    shape class                   config (BM, BN, BK, warps, stages)   why
    ============================  ===================================  ===============================================
    fp16/bf16, ``c <= 64``        (64-128, 64, 64, 4, 3)               packed / whole-block 64 x 64 tiles: every
                                                                       activation read once; 128-row steps once a
                                                                       program reduces >= 4096 rows (else too few
                                                                       steps to pipeline)
    fp16/bf16, ``c > 64``         (64, 128, 64, 8, 3)                  128 x 64 tiles of dW: each activation column
                                                                       read c / 128 or c / 64 times, neighbours in L2
    fp32, ``c <= 32``             (64, 32, 32, 4, 3)                   FMA units: narrow packed tiles
    fp32, ``c = 33..64``          (64, 64, 64, 4, 3)
    fp32, ``c > 64``              (64, 128, 64, 8, 3)
    fp64                          (32, 16, 16, 4, 2)
    ============================  ===================================  ===============================================
    """
    pad = padded(block_size)
    if dtype == torch.float64:
        return normalize(Tiles(32, 16, 16, 4, 2), block_size)
    if pad > 64:
        return normalize(Tiles(64, 128, 64, 8, 3), block_size)
    if dtype == torch.float32:
        return normalize(Tiles(64, 32, 32, 4, 3) if pad <= 32 else Tiles(64, 64, 64, 4, 3), block_size)
    tiles = normalize(Tiles(64, 64, 64, 4, 3), block_size)
    splits = grad_splits(n_rows, _grad_programs_per_split(block_size, n_blocks, tiles), n_sms, interpreted=False)
    return tiles._replace(block_m=128) if n_rows >= 4096 * splits else tiles


def space(tiles: list[Tiles], block_size: int, extra: Optional[Tiles] = None) -> list[Tiles]:
    """``tiles`` (and ``extra``) normalised for this block size, without the duplicates that makes."""
    kept: list[Tiles] = []
    for t in [*tiles, *([extra] if extra else [])]:
        t = normalize(t, block_size)
        if t not in kept:
            kept.append(t)
    return kept


# ----------------------------------------------------------------------------------------------------------------------
# Kernels. They use only builtins of triton.language, none of its @triton.jit helpers (tl.cdiv, tl.zeros, ...): those
# are decorated when Triton is first imported, so under TRITON_INTERPRET=1 set later (a test session in which some
# other module imported Triton first) the interpreter could not run them. Helpers decorated here are fine.
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit
def _shuffled(cols, shuffle_blocks, shuffle_size, POW: tl.constexpr):
    """Physical column of logical column ``cols`` behind ``POW`` perfect shuffles: ``f^POW(cols)``."""
    for _ in tl.static_range(POW):
        cols = (cols % shuffle_blocks) * shuffle_size + cols // shuffle_blocks
    return cols


@triton.jit
def _load_tile(ptr, rows64, row_ok, cols, col_ok, stride_m, stride_n):
    """A ``rows x cols`` tile of a strided matrix, zeros outside the masks."""
    offsets = rows64[:, None] * stride_m + cols[None, :].to(tl.int64) * stride_n
    return tl.load(ptr + offsets, mask=row_ok[:, None] & col_ok[None, :], other=0.0)


@triton.jit
def _add(a, b):
    """The combine function of a sum reduction (``tl.sum`` is a @triton.jit helper of Triton's own; see above)."""
    return a + b


@triton.jit
def _mma(a, b, acc, DOT_MODE: tl.constexpr):
    """``acc + a @ b`` in the precision of ``DOT_MODE`` (see the module docstring)."""
    if DOT_MODE == 0:
        acc = tl.dot(a, b.to(a.dtype), acc)
    elif DOT_MODE == 1:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif DOT_MODE == 2:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32")
    elif DOT_MODE == 3:
        acc = tl.dot(a.to(tl.float64), b.to(tl.float64), acc)
    else:
        acc += tl.reduce(a.to(tl.float64)[:, :, None] * b.to(tl.float64)[None, :, :], 1, _add)
    return acc


@triton.jit
def _packed_lanes(tile, block_size, n_blocks, LANES: tl.constexpr):
    """Global columns of the ``LANES`` lanes of packed column tile ``tile`` (``LANES // bs`` whole blocks) and
    which of them exist."""
    lanes = tl.arange(0, LANES)
    per_tile = LANES // block_size
    cols = tile * per_tile * block_size + lanes
    return cols, (lanes < per_tile * block_size) & (cols < n_blocks * block_size)


@triton.jit
def _block_multiply_kernel(
    x_ptr, w_ptr, y_ptr,
    n_rows, stride_xm, stride_xn, stride_ym,
    block_size, n_blocks, shuffle_blocks, shuffle_size,
    IN_POW: tl.constexpr, OUT_POW: tl.constexpr, TRANSPOSE_BLOCKS: tl.constexpr, DOT_MODE: tl.constexpr,
    PACKED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One program: rows ``[pid_m BLOCK_M, +BLOCK_M)`` x one column tile (several whole blocks when ``PACKED``,
    else ``BLOCK_N`` columns of one block). Column tiles vary fastest along the 1-D grid."""
    pid = tl.program_id(0)
    if PACKED:
        col_tiles = (n_blocks + BLOCK_N // block_size - 1) // (BLOCK_N // block_size)
    else:
        n_tiles = (block_size + BLOCK_N - 1) // BLOCK_N
        col_tiles = n_blocks * n_tiles
    pid_m = pid // col_tiles
    pid_c = pid % col_tiles

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    if DOT_MODE >= 3:
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float64)
    else:
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)

    if PACKED:
        # BLOCK_K == BLOCK_N: the input columns are the output columns' blocks; W's tile is block-diagonal.
        out_cols, out_ok = _packed_lanes(pid_c, block_size, n_blocks, BLOCK_N)
        in_cols, in_ok = _packed_lanes(pid_c, block_size, n_blocks, BLOCK_K)
        x = _load_tile(x_ptr, rows64, row_ok, _shuffled(in_cols, shuffle_blocks, shuffle_size, IN_POW), in_ok,
                       stride_xm, stride_xn)  # fmt: skip
        out_block = out_cols // block_size
        in_block = in_cols // block_size
        out_local = out_cols - out_block * block_size
        in_local = in_cols - in_block * block_size
        # w[j, i] = W[i, j] (y_i = sum_j W_ij x_j), or W[j, i] for the transposed blocks; zero across blocks
        w_base = out_block[None, :] * block_size * block_size
        if TRANSPOSE_BLOCKS:
            w_offsets = w_base + in_local[:, None] * block_size + out_local[None, :]
        else:
            w_offsets = w_base + out_local[None, :] * block_size + in_local[:, None]
        w_ok = in_ok[:, None] & out_ok[None, :] & (in_block[:, None] == out_block[None, :])
        w = tl.load(w_ptr + w_offsets, mask=w_ok, other=0.0)
        acc = _mma(x, w, acc, DOT_MODE)
    else:
        block = pid_c // n_tiles
        out_local = (pid_c % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        out_ok = out_local < block_size
        out_cols = block * block_size + out_local
        w_block = w_ptr + block.to(tl.int64) * block_size * block_size
        for k0 in range(0, block_size, BLOCK_K):
            in_local = k0 + tl.arange(0, BLOCK_K)
            in_ok = in_local < block_size
            src = _shuffled(block * block_size + in_local, shuffle_blocks, shuffle_size, IN_POW)
            x = _load_tile(x_ptr, rows64, row_ok, src, in_ok, stride_xm, stride_xn)
            if TRANSPOSE_BLOCKS:
                w_offsets = in_local[:, None] * block_size + out_local[None, :]
            else:
                w_offsets = out_local[None, :] * block_size + in_local[:, None]
            w = tl.load(w_block + w_offsets, mask=in_ok[:, None] & out_ok[None, :], other=0.0)
            acc = _mma(x, w, acc, DOT_MODE)

    dst = _shuffled(out_cols, shuffle_blocks, shuffle_size, OUT_POW)
    tl.store(
        y_ptr + rows64[:, None] * stride_ym + dst[None, :].to(tl.int64),
        acc.to(y_ptr.dtype.element_ty),
        mask=row_ok[:, None] & out_ok[None, :],
    )


@triton.jit
def _block_grad_kernel(
    g_ptr, x_ptr, out_ptr,
    n_rows, rows_per_split, stride_gm, stride_gn, stride_xm, stride_xn,
    block_size, n_blocks, shuffle_blocks, shuffle_size,
    IN_POW: tl.constexpr, OUT_POW: tl.constexpr, TRANSPOSE_BLOCKS: tl.constexpr, DOT_MODE: tl.constexpr,
    PACKED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Partial ``dW[block, i, j] = sum_rows dy_i v_j`` over one chunk of rows, for one ``BLOCK_N x BLOCK_K`` tile
    (the diagonal blocks of a packed tile). Tiles vary fastest along the 1-D grid, row chunks slowest.

    ``dy`` is the gradient of the pass output read through ``f^OUT_POW``, ``v`` the pass input read through
    ``f^IN_POW``; with ``TRANSPOSE_BLOCKS`` the pass used ``W^T`` and the tile is stored transposed.
    """
    pid = tl.program_id(0)
    if PACKED:
        col_tiles = (n_blocks + BLOCK_N // block_size - 1) // (BLOCK_N // block_size)
    else:
        tiles_n = (block_size + BLOCK_N - 1) // BLOCK_N
        tiles_k = (block_size + BLOCK_K - 1) // BLOCK_K
        col_tiles = n_blocks * tiles_n * tiles_k
    split = pid // col_tiles
    pid_c = pid % col_tiles

    if PACKED:
        out_cols, out_ok = _packed_lanes(pid_c, block_size, n_blocks, BLOCK_N)
        in_cols, in_ok = _packed_lanes(pid_c, block_size, n_blocks, BLOCK_K)
    else:
        block = pid_c // (tiles_n * tiles_k)
        out_local = ((pid_c // tiles_k) % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_local = (pid_c % tiles_k) * BLOCK_K + tl.arange(0, BLOCK_K)
        out_ok = out_local < block_size
        in_ok = in_local < block_size
        out_cols = block * block_size + out_local
        in_cols = block * block_size + in_local
    dst = _shuffled(out_cols, shuffle_blocks, shuffle_size, OUT_POW)
    src = _shuffled(in_cols, shuffle_blocks, shuffle_size, IN_POW)

    if DOT_MODE >= 3:
        acc = tl.full((BLOCK_N, BLOCK_K), 0.0, tl.float64)
    else:
        acc = tl.full((BLOCK_N, BLOCK_K), 0.0, tl.float32)
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, n_rows)
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        rows64 = rows.to(tl.int64)
        dy = _load_tile(g_ptr, rows64, row_ok, dst, out_ok, stride_gm, stride_gn)
        v = _load_tile(x_ptr, rows64, row_ok, src, in_ok, stride_xm, stride_xn)
        acc = _mma(tl.trans(dy), v, acc, DOT_MODE)

    # dW[block, i, j] sits at (block bs + i) bs + j of the (n_blocks, bs, bs) slice of this split
    out_block = out_cols // block_size
    in_block = in_cols // block_size
    out_local = out_cols - out_block * block_size
    in_local = in_cols - in_block * block_size
    base = out_ptr + split.to(tl.int64) * n_blocks * block_size * block_size
    if TRANSPOSE_BLOCKS:
        offsets = out_block[:, None] * block_size * block_size + in_local[None, :] * block_size + out_local[:, None]
    else:
        offsets = out_block[:, None] * block_size * block_size + out_local[:, None] * block_size + in_local[None, :]
    ok = out_ok[:, None] & in_ok[None, :] & (out_block[:, None] == in_block[None, :])
    tl.store(base + offsets, acc.to(out_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------------------------------
# Launches with given tiles
# ----------------------------------------------------------------------------------------------------------------------
def dot_mode(dtype: torch.dtype) -> int:
    """How tiles of this input dtype meet the blocks in ``tl.dot`` (see the module docstring)."""
    if dtype == torch.float64:
        return DOT_FP64 if INTERPRETED else DOT_FP64_SUM
    if INTERPRETED:
        return DOT_IEEE
    if dtype in (torch.float16, torch.bfloat16):
        return DOT_HALF
    return DOT_IEEE if torch.get_float32_matmul_precision() == "highest" else DOT_TF32


def launch_multiply(
    tiles: Tiles, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, step: Pass, shuffle_blocks: int, shuffle_size: int
) -> None:
    """``y = pass(x)`` with ``w`` the ``(nb, bs, bs)`` contiguous blocks of the pass and ``y`` contiguous."""
    n_rows = x.shape[0]
    n_blocks, block_size, _ = w.shape
    tiles = normalize(tiles, block_size)
    grid = (_cdiv(n_rows, tiles.block_m) * column_tiles(block_size, n_blocks, tiles),)
    _block_multiply_kernel[grid](
        x, w, y,
        n_rows, x.stride(0), x.stride(1), y.stride(0),
        block_size, n_blocks, shuffle_blocks, shuffle_size,
        IN_POW=step.in_pow, OUT_POW=step.out_pow, TRANSPOSE_BLOCKS=step.transpose_blocks, DOT_MODE=dot_mode(x.dtype),
        PACKED=packed(block_size, tiles), BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip




def launch_grad(
    tiles: Tiles, grad: torch.Tensor, x: torch.Tensor, n_blocks: int, block_size: int, step: Pass,
    shuffle_blocks: int, shuffle_size: int, n_sms: int,
) -> torch.Tensor:  # fmt: skip
    """``(n_blocks, bs, bs)`` gradient of one pass: per-chunk partial sums, added here."""
    n_rows = x.shape[0]
    tiles = normalize(tiles, block_size)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    per_split = _grad_programs_per_split(block_size, n_blocks, tiles)
    splits = grad_splits(n_rows, per_split, n_sms)
    rows_per_split = _cdiv(_cdiv(n_rows, splits), GRAD_ROW_CHUNK) * GRAD_ROW_CHUNK
    splits = _cdiv(n_rows, rows_per_split)
    # packed tiles store only their diagonal blocks: every entry of every block is written exactly once
    partial = torch.empty((splits, n_blocks, block_size, block_size), dtype=acc_dtype, device=x.device)
    _block_grad_kernel[(splits * per_split,)](
        grad, x, partial,
        n_rows, rows_per_split, grad.stride(0), grad.stride(1), x.stride(0), x.stride(1),
        block_size, n_blocks, shuffle_blocks, shuffle_size,
        IN_POW=step.in_pow, OUT_POW=step.out_pow, TRANSPOSE_BLOCKS=step.transpose_blocks, DOT_MODE=dot_mode(x.dtype),
        PACKED=packed(block_size, tiles), BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip
    return partial[0] if splits == 1 else partial.sum(0)


# ----------------------------------------------------------------------------------------------------------------------
# Config choice: heuristic, interpreter, or opt-in autotuning
# ----------------------------------------------------------------------------------------------------------------------
#: Autotuned tiles per key (see the module docstring); filled only with ``GSOFT_TRITON_AUTOTUNE=1``.
TUNED: dict[tuple, Tiles] = {}


def autotune_enabled() -> bool:
    """``GSOFT_TRITON_AUTOTUNE`` set to anything but ``""`` / ``"0"``, read at every call."""
    return os.environ.get(AUTOTUNE_ENV, "0") not in ("", "0")


def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (cached); ``DEFAULT_SMS`` elsewhere (the interpreter)."""
    if device.type != "cuda":
        return DEFAULT_SMS
    return gs.cuda_multiprocessors(device)


def _time(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call: ``do_bench``'s median on a GPU, one timed call on the CPU (interpreter tests)."""
    if device.type == "cuda":
        return triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median") * 1e-3
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _autotuned(key: tuple, candidates: list[Tiles], run: Callable[[Tiles], object], device: torch.device) -> Tiles:
    """The fastest of ``candidates`` for ``key``: timed once, then remembered. Configs that do not compile or fit
    (shared memory, registers) are skipped."""
    if key not in TUNED:
        timings = {}
        for tiles in candidates:
            try:
                timings[tiles] = _time(lambda: run(tiles), device)
            except OutOfResources:
                continue
        if not timings:
            raise RuntimeError(f"No tile config of {candidates} fits this GPU for {key}.")
        TUNED[key] = min(timings, key=timings.get)
    return TUNED[key]


#: Heuristic picks per shape, so that a steady-state launch computes nothing twice (cleared when it grows large:
#: row counts that vary every step would otherwise add a key each).
_DEFAULTS: dict[tuple, Tiles] = {}


def default_tiles(kernel: str, n_rows: int, block_size: int, n_blocks: int, dtype: torch.dtype, n_sms: int) -> Tiles:
    """The tiles a launch uses without autotuning: the interpreter's, else the heuristic's (cached per shape)."""
    if INTERPRETED:
        return normalize(INTERPRETER_TILES, block_size)
    key = (kernel, n_rows, block_size, n_blocks, dtype, n_sms)
    tiles = _DEFAULTS.get(key)
    if tiles is None:
        if len(_DEFAULTS) > 4096:
            _DEFAULTS.clear()
        pick = multiply_config if kernel == "multiply" else grad_config
        tiles = _DEFAULTS[key] = pick(n_rows, block_size, n_blocks, dtype, n_sms)
    return tiles


def autotune_candidates(
    kernel: str, n_rows: int, block_size: int, n_blocks: int, dtype: torch.dtype, n_sms: int
) -> list[Tiles]:
    """What ``GSOFT_TRITON_AUTOTUNE=1`` times: the kernel's tile space and the heuristic's pick, normalised for the
    block size (``INTERPRETER_AUTOTUNE_TILES`` under the interpreter)."""
    if INTERPRETED:
        return space(INTERPRETER_AUTOTUNE_TILES, block_size)
    if kernel == "multiply":
        pick, tile_space = multiply_config(n_rows, block_size, n_blocks, dtype, n_sms), MULTIPLY_TILES
    else:
        pick, tile_space = grad_config(n_rows, block_size, n_blocks, dtype, n_sms), GRAD_TILES
    # fp64 sums its products in registers: the spaces' tiles would exceed Triton's largest tensor (2^20 elements)
    return [pick] if dtype == torch.float64 else space(tile_space, block_size, pick)


def _tune_key(kernel: str, x: torch.Tensor, n_blocks: int, block_size: int, step: Pass, shuffle: tuple) -> tuple:
    bucket = _next_pow2(x.shape[0])
    return (kernel, str(x.device), x.dtype, dot_mode(x.dtype), block_size, n_blocks, *shuffle, *step[1:], bucket)


def _check_pass(x: torch.Tensor, blocks: torch.Tensor, step: Pass, what: str) -> None:
    """Shape errors of a direct call, named (``gsoft.kernels.ops`` checks the same before its passes)."""
    if blocks.ndim != 4 or blocks.shape[2] != blocks.shape[3]:
        raise ValueError(f"{what}: blocks must be (n_factors, n_blocks, bs, bs), got {tuple(blocks.shape)}.")
    if x.ndim != 2 or x.shape[1] != blocks.shape[1] * blocks.shape[2]:
        raise ValueError(
            f"{what}: x must be (rows, n_blocks * bs) = (N, {blocks.shape[1] * blocks.shape[2]}) for blocks "
            f"{tuple(blocks.shape)}, got {tuple(x.shape)}; reshape x to 2-D first."
        )
    if not 0 <= step.factor < blocks.shape[0]:
        raise ValueError(f"{what}: pass factor {step.factor} is out of range for {blocks.shape[0]} factor(s).")


def pass_weights(blocks: torch.Tensor, step: Pass, x: torch.Tensor, mode: int) -> torch.Tensor:
    """The pass's blocks, contiguous, on ``x``'s device; cast once to ``x``'s dtype when the kernel would cast every
    tile anyway and enough row tiles reread them (``PRECAST_MIN_ROWS``)."""
    w = blocks[step.factor]
    if mode == DOT_HALF and x.shape[0] >= PRECAST_MIN_ROWS:
        w = w.to(x.dtype)
    return w.contiguous()


def block_multiply(
    x: torch.Tensor, blocks: torch.Tensor, step: Pass, shuffle_blocks: int, shuffle_size: int
) -> torch.Tensor:
    """One pass over the rows of ``x`` (``(N, n)``, any strides) with ``blocks[step.factor]``; a new contiguous
    ``(N, n)`` tensor in ``x``'s dtype. ``blocks`` is ``(m, nb, bs, bs)``, any strides, fp32 (any float dtype)."""
    _check_pass(x, blocks, step, "block_multiply")
    n_rows, n = x.shape
    _, n_blocks, block_size, _ = blocks.shape
    y = torch.empty((n_rows, n), dtype=x.dtype, device=x.device)
    if n_rows == 0:
        return y
    w = pass_weights(blocks, step, x, dot_mode(x.dtype))

    def run(tiles: Tiles) -> None:
        launch_multiply(tiles, x, w, y, step, shuffle_blocks, shuffle_size)

    run(_tiles("multiply", x, n_blocks, block_size, step, (shuffle_blocks, shuffle_size), run, sm_count(x.device)))
    return y


def block_grad(
    grad: torch.Tensor, x: torch.Tensor, blocks: torch.Tensor, step: Pass, shuffle_blocks: int, shuffle_size: int
) -> torch.Tensor:
    """Gradient of one pass w.r.t. its blocks, ``(n_blocks, bs, bs)``; fp32 (fp64 for fp64 inputs). ``grad`` is the
    gradient of the pass output, ``x``'s shape, any strides; it is read in ``x``'s dtype (cast if it has another),
    as the multiply's tiles are."""
    _check_pass(x, blocks, step, "block_grad")
    if grad.shape != x.shape:
        raise ValueError(f"block_grad: grad {tuple(grad.shape)} must have x's shape {tuple(x.shape)}.")
    if grad.dtype != x.dtype:
        grad = grad.to(x.dtype)
    n_rows, _ = x.shape
    _, n_blocks, block_size, _ = blocks.shape
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if n_rows == 0:
        return torch.zeros((n_blocks, block_size, block_size), dtype=acc_dtype, device=x.device)
    n_sms = sm_count(x.device)

    def run(tiles: Tiles) -> torch.Tensor:
        return launch_grad(tiles, grad, x, n_blocks, block_size, step, shuffle_blocks, shuffle_size, n_sms)

    return run(_tiles("grad", x, n_blocks, block_size, step, (shuffle_blocks, shuffle_size), run, n_sms))


def _tiles(kind: str, x: torch.Tensor, n_blocks: int, block_size: int, step: Pass, shuffles: tuple[int, int], run,
           n_sms: int) -> Tiles:  # fmt: skip
    """The tiles of one launch: the heuristic's, or with ``GSOFT_TRITON_AUTOTUNE=1`` the fastest candidate (timed with
    ``run`` once per key)."""
    n_rows = x.shape[0]
    if autotune_enabled():
        candidates = autotune_candidates(kind, n_rows, block_size, n_blocks, x.dtype, n_sms)
        return _autotuned(_tune_key(kind, x, n_blocks, block_size, step, shuffles), candidates, run, x.device)
    return default_tiles(kind, n_rows, block_size, n_blocks, x.dtype, n_sms)


# ----------------------------------------------------------------------------------------------------------------------
# Compile check without a GPU
# ----------------------------------------------------------------------------------------------------------------------
_DOT_MODES = {"fp16": DOT_HALF, "bf16": DOT_HALF, "fp32": DOT_IEEE, "tf32": DOT_TF32, "fp64": DOT_FP64_SUM}
_TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "tf32": torch.float32,
                 "fp64": torch.float64}  # fmt: skip
#: Row counts and block counts over which :func:`heuristic_picks` collects the heuristic's distinct configs.
HEURISTIC_ROWS = (1, 64, 4096, 65536)
HEURISTIC_BLOCKS = (1, 12, 64)


def heuristic_picks(block_size: int, dtype: torch.dtype) -> tuple[list[Tiles], list[Tiles]]:
    """The distinct ``(multiply, grad)`` configs the heuristic picks for this block size over ``HEURISTIC_ROWS`` x
    ``HEURISTIC_BLOCKS``: what a GPU compiles for it."""
    multiply, grad = [], []
    for rows in HEURISTIC_ROWS:
        for blocks in HEURISTIC_BLOCKS:
            for picks, tiles in ((multiply, multiply_config(rows, block_size, blocks, dtype)),
                                 (grad, grad_config(rows, block_size, blocks, dtype))):  # fmt: skip
                if tiles not in picks:
                    picks.append(tiles)
    return multiply, grad


def _compile(kernel, tiles: Tiles, block_size: int, dtype: str, pointers: dict[str, str], capability: int) -> int:
    """Cubin bytes of one kernel variant compiled for ``sm_<capability>`` (folded shuffles and transposed blocks:
    the most index arithmetic)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jit_fn = kernel
    constexprs = {"IN_POW": 1, "OUT_POW": 2, "TRANSPOSE_BLOCKS": True, "DOT_MODE": _DOT_MODES[dtype],
                  "PACKED": packed(block_size, tiles), "BLOCK_M": tiles.block_m, "BLOCK_N": tiles.block_n,
                  "BLOCK_K": tiles.block_k}  # fmt: skip
    signature = {
        name: "constexpr" if name in constexprs else f"*{pointers[name]}" if name in pointers else "i32"
        for name in jit_fn.arg_names
    }
    compiled = triton.compile(
        ASTSource(jit_fn, signature, constexprs),
        target=GPUTarget("cuda", capability, 32),
        options={"num_warps": tiles.num_warps, "num_stages": tiles.num_stages},
    )
    return len(compiled.asm["cubin"])


def compile_check(
    capability: int = 90,
    dtypes: tuple[str, ...] = ("fp16", "bf16", "fp32", "tf32", "fp64"),
    block_sizes: tuple[int, ...] = (4, 64, 256),
    configs: str = "all",
) -> dict[str, int]:
    """Compile both kernels to cubins for a GPU of this compute capability on any machine (Triton ships ptxas):
    catches code that the CPU interpreter accepts but the GPU compiler rejects. For every block size (4: packed
    tiles, 64: a whole block per tile, 256: K loops) and dtype, ``configs`` selects the tiles: ``"all"`` (both tile
    spaces and the heuristic's picks), ``"heuristic"`` (:func:`heuristic_picks`) or ``"first"`` (the first config of
    each space); fp64 compiles the heuristic's picks only. Returns ``{variant: cubin bytes}``. Needs the kernels
    decorated for the GPU (``TRITON_INTERPRET`` unset when this module was imported)."""
    if INTERPRETED:
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset when gsoft.kernels.triton_gs is imported.")
    if configs not in ("all", "heuristic", "first"):
        raise ValueError(f"compile_check: configs={configs!r}; choose 'all', 'heuristic' or 'first'.")
    sizes = {}
    for dtype in dtypes:
        io = "fp32" if dtype == "tf32" else dtype
        acc = "fp64" if dtype == "fp64" else "fp32"
        for block_size in block_sizes:
            picks = heuristic_picks(block_size, _TORCH_DTYPES[dtype])
            for kernel, tile_space, pick, pointers in (
                (_block_multiply_kernel, MULTIPLY_TILES, picks[0], {"x_ptr": io, "w_ptr": "fp32", "y_ptr": io}),
                (_block_grad_kernel, GRAD_TILES, picks[1], {"g_ptr": io, "x_ptr": io, "out_ptr": acc}),
            ):
                if dtype == "fp64":  # summed products: only its own small tiles fit (see autotune_candidates)
                    chosen = pick
                else:
                    chosen = {"all": tile_space + pick, "heuristic": pick, "first": tile_space[:1]}[configs]
                for tiles in space(chosen, block_size):
                    name = f"{kernel.fn.__name__}/{dtype}/c{block_size}/{tiles.label().replace(' ', '/')}"
                    sizes[name] = _compile(kernel, tiles, block_size, dtype, pointers, capability)
    return sizes
