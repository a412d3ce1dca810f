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

Numerics: tiles are multiplied with ``tl.dot`` and accumulated in fp32 (fp64 for fp64 inputs). fp16/bf16 inputs
meet the (fp32) blocks cast to their own dtype on tensor cores, as a half-precision ``nn.Linear`` does with its
weight; fp32 inputs follow ``torch.get_float32_matmul_precision()`` (``"highest"``: IEEE fp32, else TF32). Under
``TRITON_INTERPRET=1`` every tile is multiplied in fp32 (the interpreter's bf16 ``tl.dot`` is wrong: numpy has no
bf16). Outputs have the input's dtype; block gradients are fp32 (fp64 for fp64 inputs).

Tiles ``BLOCK_M x BLOCK_N`` of the output loop over ``BLOCK_K`` input columns of their block; ``tl.dot`` needs every
tile side to be at least 16, so block sizes that are not powers of two or are below 16 (``b = 3``, ``b^2 = 36``, ...)
are masked. This module imports Triton; :mod:`gsoft.kernels.ops` imports it only on first use.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .schedule import Pass

#: Whether the kernels were decorated for Triton's CPU interpreter (``TRITON_INTERPRET=1`` when this module was
#: first imported). Triton reads the variable when ``@triton.jit`` runs, so setting it later has no effect.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# tl.dot modes (a constexpr of the kernels)
DOT_HALF, DOT_IEEE, DOT_TF32, DOT_FP64 = 0, 1, 2, 3

#: Row chunk of the block-gradient partial sums; a multiple of every BLOCK_M below.
GRAD_ROW_CHUNK = 256


# ----------------------------------------------------------------------------------------------------------------------
# Autotuning
# ----------------------------------------------------------------------------------------------------------------------
def _configs(tiles: list[tuple[int, int, int, int, int]]) -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s) for bm, bn, bk, w, s in tiles
    ]


#: Tile space of the multiply (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). BLOCK_N / BLOCK_K are clipped to the
#: padded block size (``_clip_to_block``), so small blocks (b^2 <= 64) get one output tile and one K step: every
#: activation is read and written exactly once. Keyed on the block size, the number of blocks, the folded shuffles and
#: the dtypes (not on the row count, so new batch shapes do not retune).
MULTIPLY_TILES = [
    (32, 32, 32, 4, 2),
    (64, 64, 64, 4, 2),
    (128, 64, 64, 4, 3),
    (64, 128, 64, 4, 3),
    (128, 128, 32, 8, 3),
    (128, 256, 32, 8, 3),
    (256, 64, 32, 8, 3),
]
#: Tile space of the block gradient: (rows per step, BLOCK_N, BLOCK_K, warps, stages); rows are reduced per program
#: over a chunk of ``GRAD_ROW_CHUNK`` rows, the chunks' partial sums are added in torch (deterministic, no atomics).
GRAD_TILES = [
    (32, 32, 32, 4, 2),
    (64, 64, 64, 4, 2),
    (128, 64, 64, 8, 3),
    (64, 128, 32, 8, 3),
]
#: The interpreter runs one config (no benchmarking); 32-wide tiles keep it fast and still exercise the K loop and
#: several output tiles per block for b^2 > 32.
INTERPRETER_TILES = [(32, 32, 32, 4, 1)]


def _clip_to_block(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Clip BLOCK_N / BLOCK_K to the padded block size and drop the duplicates this makes."""
    padded = named_args["BLOCK_PAD"]
    seen, kept = set(), []
    for config in configs:
        kw = dict(config.kwargs)
        kw["BLOCK_N"] = min(kw["BLOCK_N"], padded)
        kw["BLOCK_K"] = min(kw["BLOCK_K"], padded)
        key = (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], config.num_warps, config.num_stages)
        if key not in seen:
            seen.add(key)
            kept.append(triton.Config(kw, num_warps=config.num_warps, num_stages=config.num_stages))
    return kept


_TUNE_KEY = ["block_size", "n_blocks", "shuffle_blocks", "IN_POW", "OUT_POW", "TRANSPOSE_BLOCKS", "DOT_MODE"]


def _autotune(tiles: list[tuple[int, int, int, int, int]]):
    """Autotune over ``tiles`` (the one interpreter config under ``TRITON_INTERPRET``), clipped to the block size."""
    return triton.autotune(
        configs=_configs(INTERPRETER_TILES if INTERPRETED else tiles),
        key=_TUNE_KEY,
        prune_configs_by={"early_config_prune": _clip_to_block},
    )


# ----------------------------------------------------------------------------------------------------------------------
# Kernels. They use only builtins of triton.language, none of its @triton.jit helpers (tl.cdiv, tl.zeros, ...): those
# are decorated when Triton is first imported, so under TRITON_INTERPRET=1 set later (a test session in which some
# other module imported Triton first) the interpreter could not run them.
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


@_autotune(MULTIPLY_TILES)
@triton.jit
def _block_multiply_kernel(
    x_ptr, w_ptr, y_ptr,
    n_rows, stride_xm, stride_xn, stride_ym,
    block_size, n_blocks, shuffle_blocks, shuffle_size,
    BLOCK_PAD: tl.constexpr, IN_POW: tl.constexpr, OUT_POW: tl.constexpr, TRANSPOSE_BLOCKS: tl.constexpr,
    DOT_MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One program: rows ``[pid_m BLOCK_M, +BLOCK_M)`` x output columns ``[tile BLOCK_N, +BLOCK_N)`` of one block."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    n_tiles = (block_size + BLOCK_N - 1) // BLOCK_N
    block = pid_n // n_tiles
    tile = pid_n % n_tiles

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    out_local = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    out_ok = out_local < block_size
    w_block = w_ptr + block.to(tl.int64) * block_size * block_size

    if DOT_MODE == 3:
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float64)
    else:
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, block_size, BLOCK_K):
        in_local = k0 + tl.arange(0, BLOCK_K)
        in_ok = in_local < block_size
        src = _shuffled(block * block_size + in_local, shuffle_blocks, shuffle_size, IN_POW)
        x = _load_tile(x_ptr, rows64, row_ok, src, in_ok, stride_xm, stride_xn)
        # w[j, i] = W[i, j] (y_i = sum_j W_ij x_j), or W[j, i] for the transposed blocks
        if TRANSPOSE_BLOCKS:
            w_offsets = in_local[:, None] * block_size + out_local[None, :]
        else:
            w_offsets = out_local[None, :] * block_size + in_local[:, None]
        w = tl.load(w_block + w_offsets, mask=in_ok[:, None] & out_ok[None, :], other=0.0)
        if DOT_MODE == 0:
            acc = tl.dot(x, w.to(x.dtype), acc)
        elif DOT_MODE == 1:
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        elif DOT_MODE == 2:
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="tf32")
        else:
            acc = tl.dot(x.to(tl.float64), w.to(tl.float64), acc)

    dst = _shuffled(block * block_size + out_local, shuffle_blocks, shuffle_size, OUT_POW)
    tl.store(
        y_ptr + rows64[:, None] * stride_ym + dst[None, :].to(tl.int64),
        acc.to(y_ptr.dtype.element_ty),
        mask=row_ok[:, None] & out_ok[None, :],
    )


@_autotune(GRAD_TILES)
@triton.jit
def _block_grad_kernel(
    g_ptr, x_ptr, out_ptr,
    n_rows, rows_per_split, stride_gm, stride_gn, stride_xm, stride_xn,
    block_size, n_blocks, shuffle_blocks, shuffle_size,
    BLOCK_PAD: tl.constexpr, IN_POW: tl.constexpr, OUT_POW: tl.constexpr, TRANSPOSE_BLOCKS: tl.constexpr,
    DOT_MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Partial ``dW[block, i, j] = sum_rows dy_i v_j`` over one chunk of rows, for one ``BLOCK_N x BLOCK_K`` tile.

    ``dy`` is the gradient of the pass output read through ``f^OUT_POW``, ``v`` the pass input read through
    ``f^IN_POW``; with ``TRANSPOSE_BLOCKS`` the pass used ``W^T`` and the tile is stored transposed.
    """
    split = tl.program_id(0)
    pid = tl.program_id(1)
    tiles_n = (block_size + BLOCK_N - 1) // BLOCK_N
    tiles_k = (block_size + BLOCK_K - 1) // BLOCK_K
    block = pid // (tiles_n * tiles_k)
    tile_n = (pid // tiles_k) % tiles_n
    tile_k = pid % tiles_k

    out_local = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    out_ok = out_local < block_size
    in_local = tile_k * BLOCK_K + tl.arange(0, BLOCK_K)
    in_ok = in_local < block_size
    dst = _shuffled(block * block_size + out_local, shuffle_blocks, shuffle_size, OUT_POW)
    src = _shuffled(block * block_size + in_local, shuffle_blocks, shuffle_size, IN_POW)

    if DOT_MODE == 3:
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
        if DOT_MODE == 0:
            acc = tl.dot(tl.trans(dy), v.to(dy.dtype), acc)
        elif DOT_MODE == 1:
            acc = tl.dot(tl.trans(dy.to(tl.float32)), v.to(tl.float32), acc, input_precision="ieee")
        elif DOT_MODE == 2:
            acc = tl.dot(tl.trans(dy.to(tl.float32)), v.to(tl.float32), acc, input_precision="tf32")
        else:
            acc = tl.dot(tl.trans(dy.to(tl.float64)), v.to(tl.float64), acc)

    base = out_ptr + (split.to(tl.int64) * n_blocks + block) * block_size * block_size
    if TRANSPOSE_BLOCKS:
        offsets = in_local[None, :] * block_size + out_local[:, None]
    else:
        offsets = out_local[:, None] * block_size + in_local[None, :]
    tl.store(base + offsets, acc.to(out_ptr.dtype.element_ty), mask=out_ok[:, None] & in_ok[None, :])


# ----------------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------------
def dot_mode(dtype: torch.dtype) -> int:
    """How tiles of this input dtype meet the blocks in ``tl.dot`` (see the module docstring)."""
    if dtype == torch.float64:
        return DOT_FP64
    if INTERPRETED:
        return DOT_IEEE
    if dtype in (torch.float16, torch.bfloat16):
        return DOT_HALF
    return DOT_IEEE if torch.get_float32_matmul_precision() == "highest" else DOT_TF32


def _padded(block_size: int) -> int:
    return max(16, triton.next_power_of_2(block_size))


def block_multiply(
    x: torch.Tensor, blocks: torch.Tensor, step: Pass, shuffle_blocks: int, shuffle_size: int
) -> torch.Tensor:
    """One pass over the rows of ``x`` (``(N, n)``, any strides) with ``blocks[step.factor]``; a new contiguous
    ``(N, n)`` tensor in ``x``'s dtype."""
    n_rows, n = x.shape
    _, n_blocks, block_size, _ = blocks.shape
    y = torch.empty((n_rows, n), dtype=x.dtype, device=x.device)
    if n_rows == 0:
        return y
    w = blocks[step.factor]

    def grid(meta):
        return (triton.cdiv(n_rows, meta["BLOCK_M"]), n_blocks * triton.cdiv(block_size, meta["BLOCK_N"]))

    _block_multiply_kernel[grid](
        x, w, y,
        n_rows, x.stride(0), x.stride(1), y.stride(0),
        block_size, n_blocks, shuffle_blocks, shuffle_size,
        _padded(block_size), step.in_pow, step.out_pow, step.transpose_blocks, dot_mode(x.dtype),
    )  # fmt: skip
    return y


def _n_splits(n_rows: int, programs_per_split: int, device: torch.device) -> int:
    """Row chunks of the block gradient: enough programs to fill the GPU, one chunk under the interpreter."""
    chunks = triton.cdiv(n_rows, GRAD_ROW_CHUNK)
    if INTERPRETED or device.type != "cuda":
        return 1
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(chunks, triton.cdiv(target, max(1, programs_per_split))))


def block_grad(
    grad: torch.Tensor, x: torch.Tensor, blocks: torch.Tensor, step: Pass, shuffle_blocks: int, shuffle_size: int
) -> torch.Tensor:
    """Gradient of one pass w.r.t. its blocks, ``(n_blocks, bs, bs)``; fp32 (fp64 for fp64 inputs)."""
    n_rows, _ = x.shape
    _, n_blocks, block_size, _ = blocks.shape
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if n_rows == 0:
        return torch.zeros((n_blocks, block_size, block_size), dtype=acc_dtype, device=x.device)
    padded = _padded(block_size)
    min_tiles = triton.cdiv(block_size, min(padded, 128)) ** 2
    splits = _n_splits(n_rows, n_blocks * min_tiles, x.device)
    rows_per_split = triton.cdiv(triton.cdiv(n_rows, splits), GRAD_ROW_CHUNK) * GRAD_ROW_CHUNK
    splits = triton.cdiv(n_rows, rows_per_split)
    partial = torch.empty((splits, n_blocks, block_size, block_size), dtype=acc_dtype, device=x.device)

    def grid(meta):
        tiles = triton.cdiv(block_size, meta["BLOCK_N"]) * triton.cdiv(block_size, meta["BLOCK_K"])
        return (splits, n_blocks * tiles)

    _block_grad_kernel[grid](
        grad, x, partial,
        n_rows, rows_per_split, grad.stride(0), grad.stride(1), x.stride(0), x.stride(1),
        block_size, n_blocks, shuffle_blocks, shuffle_size,
        padded, step.in_pow, step.out_pow, step.transpose_blocks, dot_mode(x.dtype),
    )  # fmt: skip
    return partial[0] if splits == 1 else partial.sum(0)


# ----------------------------------------------------------------------------------------------------------------------
# Compile check without a GPU
# ----------------------------------------------------------------------------------------------------------------------
_DOT_MODES = {"fp16": DOT_HALF, "bf16": DOT_HALF, "fp32": DOT_IEEE, "tf32": DOT_TF32, "fp64": DOT_FP64}


def compile_check(
    capability: int = 90,
    dtypes: tuple[str, ...] = ("fp16", "bf16", "fp32", "tf32", "fp64"),
    block_pad: int = 256,
    all_tiles: bool = True,
) -> dict[str, int]:
    """Compile both kernels to cubins for a GPU of this compute capability on any machine (Triton ships ptxas):
    catches code that the CPU interpreter accepts but the GPU compiler rejects. ``all_tiles=False`` compiles the first
    tile config only. Returns ``{variant: cubin bytes}``. Needs the kernels decorated for the GPU
    (``TRITON_INTERPRET`` unset when this module was imported)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if INTERPRETED:
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset when gsoft.kernels.triton_gs is imported.")
    sizes = {}
    for dtype in dtypes:
        io = "fp32" if dtype == "tf32" else dtype
        acc = "fp64" if dtype == "fp64" else "fp32"
        for kernel, tiles, pointers in (
            (_block_multiply_kernel, MULTIPLY_TILES, {"x_ptr": io, "w_ptr": "fp32", "y_ptr": io}),
            (_block_grad_kernel, GRAD_TILES, {"g_ptr": io, "x_ptr": io, "out_ptr": acc}),
        ):
            jit_fn = kernel.fn
            for config in _clip_to_block(_configs(tiles if all_tiles else tiles[:1]), {"BLOCK_PAD": block_pad}):
                constexprs = {"BLOCK_PAD": block_pad, "IN_POW": 1, "OUT_POW": 2, "TRANSPOSE_BLOCKS": True,
                              "DOT_MODE": _DOT_MODES[dtype], **config.kwargs}  # fmt: skip
                signature = {
                    name: "constexpr" if name in constexprs else f"*{pointers[name]}" if name in pointers else "i32"
                    for name in jit_fn.arg_names
                }
                compiled = triton.compile(
                    ASTSource(jit_fn, signature, constexprs),
                    target=GPUTarget("cuda", capability, 32),
                    options={"num_warps": config.num_warps, "num_stages": config.num_stages},
                )
                tile = "x".join(str(config.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
                sizes[f"{jit_fn.__name__}/{dtype}/{tile}/w{config.num_warps}s{config.num_stages}"] = len(
                    compiled.asm["cubin"]
                )
    return sizes
