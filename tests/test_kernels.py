"""Fused GS kernels (``gsoft.kernels``) against the torch reference ``gs_apply`` and the dense matrix ``materialize``.

Without a GPU everything runs on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``, set below before the
kernels are first imported; if another module imported them earlier, they are re-imported). With a GPU the same tests
run the compiled kernels on CUDA tensors. Shapes stay small: the interpreter executes every program of the grid in
numpy. GPU-only checks are skipped with a reason.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
from peft import get_peft_model  # noqa: E402

import gsoft  # noqa: E402
from gsoft import gs  # noqa: E402

from conftest import model_output, tiny_roberta, token_inputs  # noqa: E402

triton = pytest.importorskip("triton", reason="Triton is not installed (pip install 'gsoft[kernels]')")

from gsoft.kernels import availability, ops, schedule, triton_gs  # noqa: E402

if not ON_GPU and not triton_gs.INTERPRETED:  # imported earlier without the interpreter: decorate them again
    triton_gs = importlib.reload(triton_gs)

REPO_ROOT = Path(__file__).resolve().parents[1]
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (none on this machine)")
cpu_only = pytest.mark.skipif(ON_GPU, reason="checks the CPU interpreter's dispatch rules")

pytestmark = [
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning"),
]

# (n, b, m): hidden sizes 24 / 40 / 384 / 1536, one-pass (two factors, b | r) and multi-pass plans, block sizes that
# are not powers of two, a single dense block, and m = 1, 2, 3, 5.
SHAPES = [
    (24, 2, 2),  # one pass, groups of 4 (padded to 16)
    (24, 3, 2),  # r = 8, b = 3 does not divide it: two passes, b = 3 masked
    (36, 3, 2),  # one pass, groups of 9
    (36, 6, 2),  # one pass, groups of 36 (two K steps of the interpreter's 32-wide tiles)
    (24, 4, 3),  # three passes
    (24, 2, 5),  # five passes: shuffle powers up to 4 folded into one store
    (40, 5, 1),  # OFT-style block-diagonal, b = 5
    (40, 4, 2),  # r = 10: two passes
    (40, 40, 1),  # one dense block
    (384, 8, 2),  # one pass, groups of 64
    (384, 16, 2),  # r = 24: two passes with b = 16
    (1536, 16, 2),  # one pass, groups of 256 (8 x 8 tiles)
    (1536, 32, 2),  # b = 32 > FUSED_MAX_BLOCK: two passes
]
ROWS = {10: 2, 12: 2, 16: 2, 18: 2, 24: 6, 36: 5, 40: 5, 384: 3, 1536: 2}


def _blocks(n: int, b: int, m: int, dtype: torch.dtype = torch.float32, scale: float = 0.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(n * 100 + b * 10 + m)
    skew = torch.randn(m, n // b, gs.n_skew_params(b), generator=g, dtype=torch.float64) * scale
    return gs.orthogonal_blocks(skew, b).to(DEVICE, dtype)


def _x(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(DEVICE, dtype)


def _shape_id(shape) -> str:
    return "n{}-b{}-m{}".format(*shape)


# ----------------------------------------------------------------------------------------------------------------------
# Plan and schedule
# ----------------------------------------------------------------------------------------------------------------------
def test_plans_cover_the_cases() -> None:
    assert schedule.grouped_plan(_blocks(24, 2, 2)) and schedule.grouped_plan(_blocks(1536, 16, 2))
    assert not schedule.grouped_plan(_blocks(24, 3, 2)) and not schedule.grouped_plan(_blocks(1536, 32, 2))
    assert not schedule.grouped_plan(_blocks(24, 4, 3)) and not schedule.grouped_plan(_blocks(40, 5, 1))
    # Q = S_b^(m-1) B_m S_r ... S_r B_1 and its transpose
    assert schedule.pass_schedule(3, False) == [(0, False, 0, 0), (1, False, 1, 0), (2, False, 1, 2)]
    assert schedule.pass_schedule(3, True) == [(2, True, 2, 1), (1, True, 0, 1), (0, True, 0, 0)]
    assert schedule.pass_schedule(1, True) == [(0, True, 0, 0)]
    assert [p.adjoint() for p in schedule.pass_schedule(2, False)] == [(0, True, 0, 0), (1, True, 1, 1)]
    assert ops.backend_module("triton") is triton_gs
    with pytest.raises(ValueError, match=r"Unknown fused GS backend 'tpu'; choose one of \('triton', 'cuda'\)"):
        ops.backend_module("tpu")


def _module_imports(path: Path) -> set[str]:
    """Sibling modules of ``kernels/`` that ``path`` imports, at module level or inside functions."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names.update([node.module] if node.module else [alias.name for alias in node.names])
    return names


def test_kernel_modules_import_without_cycles() -> None:
    """No module of ``kernels/`` imports one that imports it back (also lazily): the shape rules live in
    ``schedule``, which imports none of its siblings."""
    graph = {p.stem: _module_imports(p) for p in (REPO_ROOT / "kernels").glob("*.py")}
    assert graph["schedule"] == set() and "ops" not in graph["availability"]

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        return any(n == target or (n not in seen and reaches(n, target, seen | {n})) for n in graph.get(start, ()))

    cycles = [name for name in graph if reaches(name, name, set())]
    assert not cycles, {name: graph[name] for name in cycles}


# ----------------------------------------------------------------------------------------------------------------------
# Tile heuristic, direct launches of the passes, opt-in autotuning
# ----------------------------------------------------------------------------------------------------------------------
def _power_of_two(v: int) -> bool:
    return v >= 1 and v & (v - 1) == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_heuristic_configs_are_valid(dtype) -> None:
    """Every pick is launchable: tile sides >= 16 and powers of two, packed tiles hold >= 2 whole blocks in one K
    step, other tiles fit their padded block, gradient row steps divide the row chunk."""
    for c in (2, 3, 4, 5, 6, 8, 9, 16, 32, 36, 48, 64, 100, 128, 256, 512):
        for n_blocks in (1, 12, 64, 1024):
            for rows in (1, 5, 100, 4096, 65536, 1 << 20):
                for pick in (triton_gs.multiply_config(rows, c, n_blocks, dtype),
                             triton_gs.grad_config(rows, c, n_blocks, dtype)):  # fmt: skip
                    bm, bn, bk, warps, stages = pick
                    assert all(side >= 16 and _power_of_two(side) for side in (bm, bn, bk)), (c, rows, pick)
                    assert warps in (1, 2, 4, 8) and stages >= 1, pick
                    if triton_gs.packed(c, pick):
                        assert bk == bn and 2 * c <= bn, (c, pick)
                    else:
                        assert bn <= triton_gs.padded(c) and bk <= triton_gs.padded(c), (c, pick)
                grad = triton_gs.grad_config(rows, c, n_blocks, dtype)
                assert triton_gs.GRAD_ROW_CHUNK % grad.block_m == 0


def test_heuristic_follows_the_h200_plan() -> None:
    """The shape classes of the docstring: whole 64-wide blocks with 4 warps, wide K-looped tiles for c = 256,
    packed 64-wide tiles for small blocks, and ``MULTIPLY_WAVES`` waves of programs when the rows allow it."""
    bf16 = torch.bfloat16
    for rows, n in ((1024, 768), (4096, 768), (16384, 3072), (65536, 4096)):
        tiles = triton_gs.multiply_config(rows, 64, n // 64, bf16)
        assert (tiles.block_n, tiles.block_k, tiles.num_warps) == (64, 64, 4) and 64 <= tiles.block_m <= 128
        programs = triton.cdiv(rows, tiles.block_m) * triton_gs.column_tiles(64, n // 64, tiles)
        assert programs >= triton_gs.MULTIPLY_WAVES * 132 or tiles.block_m == 64, (rows, n, tiles)
    assert triton_gs.multiply_config(1024, 64, 12, bf16).block_m == 64
    big = triton_gs.multiply_config(65536, 256, 16, bf16)
    assert big.block_n in (128, 256) and big.block_k == 64 and big.block_m == 128 and big.num_warps == 8
    assert triton_gs.multiply_config(65536, 4, 1024, bf16).block_n == 64  # 16 blocks of 4 per tile
    assert triton_gs.multiply_config(5, 64, 12, bf16).block_m == 16  # a tiny batch: no 128-row tiles


def _shuffle_cols(n: int, r: int, b: int, power: int) -> torch.Tensor:
    """``f^power`` of every column: ``f(p) = (p mod r) b + p div r``."""
    cols = torch.arange(n)
    for _ in range(power):
        cols = (cols % r) * b + cols // r
    return cols


def _reference_pass(x, blocks, step, r, b):
    """One pass in float64 with explicit index maps: ``y[f^out(q)] = (W v)[q]``, ``v[p] = x[f^in(p)]``."""
    rows, n = x.shape
    w = blocks[step.factor].double()
    w = w.transpose(-1, -2) if step.transpose_blocks else w
    nb, c, _ = w.shape
    v = x.double()[:, _shuffle_cols(n, r, b, step.in_pow).to(x.device)]
    u = torch.einsum("kij,nkj->nki", w, v.view(rows, nb, c)).reshape(rows, n)
    y = torch.empty_like(u)
    y[:, _shuffle_cols(n, r, b, step.out_pow).to(x.device)] = u
    return y


def _reference_grad(g, x, blocks, step, r, b):
    """``dW`` of one pass in float64: ``sum_rows dy_i v_j``, ``dy`` read through ``f^out``, ``v`` through ``f^in``."""
    rows, n = x.shape
    nb, c = blocks.shape[1], blocks.shape[2]
    dy = g.double()[:, _shuffle_cols(n, r, b, step.out_pow).to(x.device)].view(rows, nb, c)
    v = x.double()[:, _shuffle_cols(n, r, b, step.in_pow).to(x.device)].view(rows, nb, c)
    dw = torch.einsum("nki,nkj->kij", dy, v)
    return dw.transpose(-1, -2) if step.transpose_blocks else dw


# (rows, c, n_blocks, m): c = 64 and 256 (the GSOFT groups), odd sizes 3 / 6 / 36, packed small blocks 4 / 16, rows
# that are not multiples of the tiles; m = 2 passes fold shuffles of r = n_blocks blocks of size c.
DIRECT = [(70, 64, 3, 1), (33, 256, 1, 1), (37, 3, 7, 1), (21, 6, 5, 2), (45, 36, 2, 1), (50, 4, 12, 2), (19, 16, 4, 2)]


@pytest.mark.parametrize("transpose", [False, True], ids=["W", "WT"])
@pytest.mark.parametrize("case", DIRECT, ids=lambda c: "rows{}-c{}-nb{}-m{}".format(*c))
def test_direct_launch_matches_reference(case, transpose: bool) -> None:
    """``block_multiply`` / ``block_grad`` called directly (one block-diagonal pass, and passes with folded
    shuffles), with strided activations and non-contiguous blocks, against float64 index-map references."""
    rows, c, nb, m = case
    n = nb * c
    blocks = torch.randn(m, nb, c, c, generator=torch.Generator().manual_seed(c), dtype=torch.float64) / c**0.5
    blocks = blocks.to(DEVICE, torch.float32).transpose(-1, -2).contiguous().transpose(-1, -2)  # not contiguous
    x = _x(n, rows, seed=1).T  # column-major rows
    g = _x(rows, 2 * n, seed=2)[:, ::2]  # every other column
    steps = [schedule.Pass(0, transpose, 0, 0)] + ([schedule.Pass(1, transpose, 1, 1)] if m > 1 else [])
    for step in steps:
        y = triton_gs.block_multiply(x, blocks, step, nb, c)
        assert y.dtype == x.dtype and y.is_contiguous()
        torch.testing.assert_close(y.double(), _reference_pass(x, blocks, step, nb, c), atol=2e-5, rtol=1e-5)
        dw = triton_gs.block_grad(g, x, blocks, step, nb, c)
        assert dw.shape == (nb, c, c) and dw.dtype == torch.float32
        torch.testing.assert_close(dw.double(), _reference_grad(g, x, blocks, step, nb, c), atol=1e-4, rtol=1e-5)


def test_direct_launch_half_precision_and_errors() -> None:
    """bf16 activations with fp32 blocks (fp32 accumulation, bf16 output); bad shapes are named."""
    x = _x(40, 48, dtype=torch.bfloat16)
    blocks = torch.randn(1, 3, 16, 16, dtype=torch.float64).to(DEVICE, torch.float32)
    step = schedule.Pass(0, False, 0, 0)
    y = triton_gs.block_multiply(x, blocks, step, 1, 1)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), _reference_pass(x, blocks, step, 1, 1), atol=5e-2, rtol=2e-2)
    dw = triton_gs.block_grad(x.float(), x, blocks, step, 1, 1)  # an fp32 grad is read in x's dtype
    torch.testing.assert_close(dw.double(), _reference_grad(x, x, blocks, step, 1, 1), atol=0.2, rtol=2e-2)
    with pytest.raises(ValueError, match=r"x must be \(rows, n_blocks \* bs\) = \(N, 48\).*got \(40, 47\)"):
        triton_gs.block_multiply(x[:, :47], blocks, step, 1, 1)
    with pytest.raises(ValueError, match="pass factor 1 is out of range for 1 factor"):
        triton_gs.block_grad(x, x, blocks, schedule.Pass(1, False, 0, 0), 1, 1)


@pytest.mark.parametrize("case", [(9, 4, 6), (7, 36, 2)], ids=["packed", "k-loop"])
def test_fp64_summed_products(case, monkeypatch) -> None:
    """The GPU's fp64 path (products summed without ``tl.dot``), run by the interpreter."""
    if ON_GPU:
        assert triton_gs.dot_mode(torch.float64) == triton_gs.DOT_FP64_SUM
    monkeypatch.setattr(triton_gs, "dot_mode", lambda dtype: triton_gs.DOT_FP64_SUM)
    rows, c, nb = case
    x, g = _x(rows, nb * c, dtype=torch.float64), _x(rows, nb * c, dtype=torch.float64, seed=4)
    blocks = torch.randn(2, nb, c, c, dtype=torch.float64).to(DEVICE)
    step = schedule.Pass(1, True, 1, 1)
    y = triton_gs.block_multiply(x, blocks, step, nb, c)
    torch.testing.assert_close(y, _reference_pass(x, blocks, step, nb, c), atol=1e-12, rtol=1e-12)
    dw = triton_gs.block_grad(g, x, blocks, step, nb, c)
    torch.testing.assert_close(dw, _reference_grad(g, x, blocks, step, nb, c), atol=1e-12, rtol=1e-12)


def test_grad_partial_sums_over_row_chunks(monkeypatch) -> None:
    """The GPU path's row chunks (partial sums added in torch), forced under the interpreter."""
    monkeypatch.setattr(triton_gs, "grad_splits", lambda rows, programs, sms, **kwargs: 3)
    x, g = _x(600, 40), _x(600, 40, seed=5)
    blocks = torch.randn(2, 10, 4, 4, dtype=torch.float64).to(DEVICE, torch.float32)
    step = schedule.Pass(1, True, 1, 0)
    dw = triton_gs.block_grad(g, x, blocks, step, 10, 4)
    torch.testing.assert_close(dw.double(), _reference_grad(g, x, blocks, step, 10, 4), atol=1e-4, rtol=1e-5)


def test_autotune_is_opt_in_and_cached(monkeypatch) -> None:
    """``GSOFT_TRITON_AUTOTUNE=1``, read at call time: the first call of a key times the candidates and keeps the
    fastest; later calls reuse it; without the variable nothing is timed."""
    monkeypatch.setattr(triton_gs, "TUNED", {})
    timed = []
    real_time = triton_gs._time
    monkeypatch.setattr(triton_gs, "_time", lambda fn, device: timed.append(1) or real_time(fn, device))
    x, g = _x(40, 48), _x(40, 48, seed=3)
    blocks = torch.randn(1, 3, 16, 16, dtype=torch.float64).to(DEVICE, torch.float32)
    step = schedule.Pass(0, True, 0, 0)
    triton_gs.block_multiply(x, blocks, step, 1, 1)
    assert timed == [] and triton_gs.TUNED == {}

    monkeypatch.setenv(triton_gs.AUTOTUNE_ENV, "1")
    for _ in range(2):
        y = triton_gs.block_multiply(x, blocks, step, 1, 1)
        dw = triton_gs.block_grad(g, x, blocks, step, 1, 1)
    torch.testing.assert_close(y.double(), _reference_pass(x, blocks, step, 1, 1), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(dw.double(), _reference_grad(g, x, blocks, step, 1, 1), atol=1e-4, rtol=1e-5)
    assert sorted(key[0] for key in triton_gs.TUNED) == ["grad", "multiply"]
    sms = triton_gs.sm_count(x.device)
    candidates = {k: triton_gs.autotune_candidates(k, 40, 16, 3, x.dtype, sms) for k in ("multiply", "grad")}
    assert len(timed) == len(candidates["multiply"]) + len(candidates["grad"])
    for key, tiles in triton_gs.TUNED.items():
        assert tiles in candidates[key[0]]
    if not ON_GPU:
        assert candidates["multiply"] == triton_gs.space(triton_gs.INTERPRETER_AUTOTUNE_TILES, 16)


# ----------------------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("transpose", [False, True], ids=["Qx", "QTx"])
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_forward_matches_torch_and_dense(shape, transpose: bool) -> None:
    n, b, m = shape
    blocks = _blocks(n, b, m)
    x = _x(ROWS[n], n)
    y = gsoft.gs_apply(x, blocks, transpose=transpose, backend="triton")
    torch.testing.assert_close(y, gsoft.gs_apply(x, blocks, transpose=transpose), atol=2e-5, rtol=1e-5)
    dense = gs.materialize(blocks.double())
    expected = x.double() @ (dense if transpose else dense.T)  # rows: y = Q x  <=>  Y = X Q^T
    torch.testing.assert_close(y.double(), expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "leading", [(1,), (0,), (2, 1, 3), (1, 1, 1, 1)], ids=["batch1", "empty", "ragged", "ones"]
)
@pytest.mark.parametrize("shape", [(24, 2, 2), (24, 4, 3)], ids=_shape_id)
def test_leading_shapes(shape, leading) -> None:
    n, b, m = shape
    blocks = _blocks(n, b, m)
    x = _x(*leading, n)
    y = gsoft.gs_apply(x, blocks, backend="triton")
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y, gsoft.gs_apply(x, blocks), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(24, 2, 2), (24, 3, 2), (40, 4, 3)], ids=_shape_id)
def test_other_dims_and_non_contiguous_inputs(shape) -> None:
    n, b, m = shape
    blocks = _blocks(n, b, m)
    base = _x(3, 2 * n, 4)
    cases = {
        "dim=1 of (B, n, L)": (base[:, :n, :], 1),  # strided feature axis, sliced: no reshape-view possible
        "dim=0 of (n, B)": (base[:, :n, 0].T, 0),
        "every other column": (base.transpose(1, 2)[..., ::2], -1),
        "column-major rows": (base[:, :n, 0].T.contiguous().T, -1),  # strides (1, 3): a view, no copy
    }
    for label, (x, dim) in cases.items():
        assert not x.is_contiguous(), label
        for transpose in (False, True):
            y = gsoft.gs_apply(x, blocks, dim=dim, transpose=transpose, backend="triton")
            ref = gsoft.gs_apply(x, blocks, dim=dim, transpose=transpose)
            torch.testing.assert_close(y, ref, atol=2e-5, rtol=1e-5, msg=f"{label} transpose={transpose}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", [(24, 2, 2), (40, 4, 3), (384, 8, 2)], ids=_shape_id)
def test_half_precision_activations(shape, dtype) -> None:
    """fp16/bf16 activations with fp32 blocks: fp32 accumulation, output and input gradient in the activation dtype,
    block gradient in fp32; close to the fp32 reference up to the activation dtype's rounding."""
    n, b, m = shape
    blocks = _blocks(n, b, m).requires_grad_()
    x = _x(4, n, dtype=dtype).requires_grad_()
    y = gsoft.gs_apply(x, blocks, backend="triton")
    assert y.dtype == dtype
    g = _x(4, n, seed=1)
    (y.float() * g).sum().backward()

    x32 = x.detach().float().requires_grad_()
    blocks32 = blocks.detach().clone().requires_grad_()
    y32 = gsoft.gs_apply(x32, blocks32)
    (y32 * g).sum().backward()
    tol = {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.float16 else {"atol": 8e-2, "rtol": 5e-2}
    torch.testing.assert_close(y.float(), y32, **tol)
    assert x.grad.dtype == dtype and blocks.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad.float(), x32.grad, **tol)
    torch.testing.assert_close(blocks.grad, blocks32.grad, atol=tol["atol"] * 4, rtol=tol["rtol"])


# ----------------------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------------------
GRADCHECK_SHAPES = [(12, 2, 2), (18, 3, 2), (12, 3, 2), (16, 4, 3), (10, 5, 1)]


@pytest.mark.parametrize("transpose", [False, True], ids=["Qx", "QTx"])
@pytest.mark.parametrize("shape", GRADCHECK_SHAPES, ids=_shape_id)
def test_gradcheck_float64(shape, transpose: bool) -> None:
    """Input and block gradients of the custom op (and, for two factors, through the dense groups) in float64."""
    n, b, m = shape
    blocks = _blocks(n, b, m, dtype=torch.float64).requires_grad_()
    x = _x(2, n, dtype=torch.float64).requires_grad_()

    def fn(x, blocks):
        return gsoft.gs_apply(x, blocks, transpose=transpose, backend="triton")

    assert torch.autograd.gradcheck(fn, (x, blocks), fast_mode=True)


@pytest.mark.parametrize("transpose", [False, True], ids=["Qx", "QTx"])
@pytest.mark.parametrize("shape", [(24, 2, 2), (40, 4, 3), (384, 8, 2), (384, 16, 2), (40, 40, 1)], ids=_shape_id)
def test_gradients_match_torch_float32(shape, transpose: bool) -> None:
    n, b, m = shape
    g = _x(ROWS[n], n, seed=3)
    grads = {}
    for backend in ("torch", "triton"):
        blocks = _blocks(n, b, m).requires_grad_()
        x = _x(ROWS[n], n).requires_grad_()
        (gsoft.gs_apply(x, blocks, transpose=transpose, backend=backend) * g).sum().backward()
        grads[backend] = (x.grad, blocks.grad)
    for got, want in zip(grads["triton"], grads["torch"]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_only_needed_gradients_are_computed() -> None:
    blocks = _blocks(24, 4, 3)
    x = _x(5, 24).requires_grad_()
    gsoft.gs_apply(x, blocks, backend="triton").sum().backward()  # blocks need no gradient
    torch.testing.assert_close(x.grad, gs.materialize(blocks).sum(0).expand(5, 24), atol=1e-5, rtol=1e-5)
    blocks.requires_grad_()
    y = gsoft.gs_apply(x.detach(), blocks, backend="triton")
    (grad_blocks,) = torch.autograd.grad(y.sum(), blocks)
    assert grad_blocks.shape == blocks.shape and grad_blocks.abs().sum() > 0


def test_torch_compile_fullgraph() -> None:
    """The custom op traces without graph breaks (fake tensors, autograd) and matches eager."""
    torch._dynamo.reset()
    blocks = _blocks(24, 2, 2).requires_grad_()
    blocks3 = _blocks(24, 4, 3).requires_grad_()
    x = _x(2, 3, 24).requires_grad_()

    def fn(x, blocks, blocks3):
        h = gsoft.gs_apply(x, blocks, backend="triton")
        return gsoft.gs_apply(h.sin(), blocks3, transpose=True, backend="triton").square().sum()

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    out = compiled(x, blocks, blocks3)
    grads = torch.autograd.grad(out, (x, blocks, blocks3))
    ref = fn(x, blocks, blocks3)
    ref_grads = torch.autograd.grad(ref, (x, blocks, blocks3))
    torch.testing.assert_close(out, ref)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


def test_gradient_checkpointing_recomputes_the_op() -> None:
    from torch.utils.checkpoint import checkpoint

    blocks = _blocks(24, 4, 3).requires_grad_()
    x = _x(4, 24).requires_grad_()

    def fn(x, blocks):
        return gsoft.gs_apply(x, blocks, backend="triton").tanh()

    grads = {}
    for label, run in (("plain", fn), ("checkpointed", lambda *a: checkpoint(fn, *a, use_reentrant=False))):
        x.grad = blocks.grad = None
        run(x, blocks).sum().backward()
        grads[label] = (x.grad.clone(), blocks.grad.clone())
    for got, want in zip(grads["checkpointed"], grads["plain"]):
        torch.testing.assert_close(got, want)


# ----------------------------------------------------------------------------------------------------------------------
# The tuner
# ----------------------------------------------------------------------------------------------------------------------
def _peft_roberta(backend: str, **config):
    config = gsoft.GSOFTConfig(init_weights=False, backend=backend, **config)
    return get_peft_model(tiny_roberta(), config).to(DEVICE)


@pytest.mark.parametrize(
    "config",
    [{"block_size": 4}, {"block_size": 4, "double": True}, {"block_size": 16, "n_factors": 3}],
    ids=["gsoft-b4", "double-b4", "gsoft-b16-m3"],
)
def test_tuner_triton_matches_torch(config) -> None:
    """``GSOFTConfig(backend="triton")`` on the CPU interpreter: same outputs and gradients as ``backend="torch"``."""
    inputs = {k: v.to(DEVICE) for k, v in token_inputs(batch=2, length=5).items()}
    results = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)  # the same random adapter for both
        model = _peft_roberta(backend, **config)
        model.train()
        logits = model_output(model, inputs)
        logits.square().sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results[backend] = (logits.detach(), grads)
    layer = next(m for m in model.modules() if isinstance(m, gsoft.tuner.GSOFTLayer))
    assert layer.gsoft_in["default"].backend == "triton"
    torch.testing.assert_close(results["triton"][0], results["torch"][0], atol=1e-4, rtol=1e-4)
    assert results["triton"][1].keys() == results["torch"][1].keys()
    for name, grad in results["torch"][1].items():
        torch.testing.assert_close(results["triton"][1][name], grad, atol=1e-4, rtol=1e-4, msg=name)


def test_tuner_triton_with_gradient_checkpointing() -> None:
    inputs = {k: v.to(DEVICE) for k, v in token_inputs(batch=2, length=5).items()}
    grads = {}
    for label in ("plain", "checkpointed"):
        torch.manual_seed(0)
        base = tiny_roberta()
        if label == "checkpointed":
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        config = gsoft.GSOFTConfig(block_size=4, init_weights=False, backend="triton")
        model = get_peft_model(base, config).to(DEVICE)
        model.train()
        model_output(model, inputs).square().sum().backward()
        grads[label] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    for name, grad in grads["plain"].items():
        torch.testing.assert_close(grads["checkpointed"][name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_config_backend_validation_and_configs_without_it(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"Unknown GS backend 'gpu'; choose one of \('auto', 'torch', 'triton', 'cuda'\)"):
        gsoft.GSOFTConfig(block_size=4, backend="gpu")
    config = gsoft.GSOFTConfig(block_size=4, backend="triton")
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["backend"] == "triton"
    del saved["backend"]  # an adapter config without the field loads with the default
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))
    loaded = gsoft.GSOFTConfig.from_pretrained(tmp_path)
    assert loaded.backend == "auto" and loaded.block_size == 4


# ----------------------------------------------------------------------------------------------------------------------
# Dispatch and errors
# ----------------------------------------------------------------------------------------------------------------------
def _dispatch():
    """The module that defines :func:`gsoft.gs_apply` (its backend rules and log)."""
    return sys.modules[gsoft.gs_apply.__module__]


def test_auto_uses_torch_on_cpu_and_logs_once(caplog, monkeypatch) -> None:
    dispatch = _dispatch()
    monkeypatch.setattr(dispatch, "_AUTO_CHOICES_LOGGED", set())
    blocks, x = _blocks(24, 2, 2).cpu(), _x(3, 24).cpu()
    with caplog.at_level(logging.INFO, logger=dispatch.__name__):
        assert dispatch.resolve_backend("auto", x, blocks) == "torch"
        torch.testing.assert_close(gsoft.gs_apply(x, blocks, backend="auto"), gsoft.gs_apply(x, blocks))
    messages = [r.getMessage() for r in caplog.records if "backend 'auto'" in r.getMessage()]
    assert len(messages) == 1 and "'torch'" in messages[0]


@cpu_only
def test_explicit_backends_that_cannot_run_say_why(monkeypatch) -> None:
    blocks, x = _blocks(24, 2, 2).cpu(), _x(3, 24).cpu()
    with pytest.raises(ValueError, match="Unknown GS backend 'tpu'"):
        gsoft.gs_apply(x, blocks, backend="tpu")
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run: .*CUDA tensors"):
        gsoft.gs_apply(x, blocks, backend="cuda")
    monkeypatch.setattr(availability, "interpreter_enabled", lambda: False)
    with pytest.raises(RuntimeError, match="already compiled for the GPU when TRITON_INTERPRET=1 was set"):
        gsoft.gs_apply(x, blocks, backend="triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run: .*need a CUDA GPU.*TRITON_INTERPRET=1"):
        gsoft.gs_apply(x, blocks, backend="triton")
    monkeypatch.setattr(availability, "triton_installed", lambda: False)
    with pytest.raises(RuntimeError, match="Triton is not installed"):
        gsoft.gs_apply(x, blocks, backend="triton")


def test_unsupported_dtype_and_cuda_shapes_are_named() -> None:
    x = torch.zeros(2, 24, dtype=torch.int32)
    assert "not supported" in availability.triton_unavailable_reason(x)
    assert schedule.cuda_unsupported_reason(_blocks(24, 2, 2)) is None
    assert schedule.cuda_unsupported_reason(_blocks(40, 5, 1)) is None
    reason = schedule.cuda_unsupported_reason(_blocks(24, 4, 3))
    assert "n_factors=3" in reason and "backend='triton'" in reason


@cpu_only
def test_tuner_explicit_triton_without_interpreter_fails_loudly(monkeypatch) -> None:
    model = _peft_roberta("triton", block_size=4)
    monkeypatch.setattr(availability, "interpreter_enabled", lambda: False)
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run"):
        model_output(model, token_inputs(batch=1, length=3))


# ----------------------------------------------------------------------------------------------------------------------
# Packaging and GPU compilation without a GPU
# ----------------------------------------------------------------------------------------------------------------------
def test_kernels_ship_inside_gsoft() -> None:
    import gsoft.kernels as kernels_package

    assert Path(kernels_package.__file__).parent == REPO_ROOT / "kernels"
    assert (Path(kernels_package.__file__).parent / "gs_grouped.cu").is_file()


def test_repo_root_kernels_dir_does_not_pose_as_the_hub_kernels_package() -> None:
    """From a checkout's root, transformers' probe for the Hub ``kernels`` package must still say "not available"."""
    code = "from transformers.utils.import_utils import is_kernels_available; print(is_kernels_available())"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


def _gpu_compiler_available() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception:
        return False
    return Path(triton.__file__).parent.joinpath("backends", "nvidia", "bin", "ptxas").exists()


@pytest.mark.skipif(not _gpu_compiler_available(), reason="Triton's NVIDIA backend (ptxas) is not installed")
def test_triton_kernels_compile_for_sm90() -> None:
    """Compile both kernels to cubins for an H100 / H200 (sm_90) without a GPU, in a process without the interpreter,
    with every config the heuristic picks for bf16 with packed (c = 4), whole-block (64) and K-looped (256) tiles,
    for fp32 at c = 64 and for fp64 (summed products) at c = 4 and 64: catches code the interpreter accepts but the compiler rejects
    (dot shapes, casts, int64 offsets, tensor sizes)."""
    code = (
        "from gsoft.kernels import triton_gs as t; "
        "sizes = t.compile_check(90, ('bf16',), block_sizes=(4, 64, 256), configs='heuristic'); "
        "sizes.update(t.compile_check(90, ('fp32',), block_sizes=(64,), configs='heuristic')); "
        "sizes.update(t.compile_check(90, ('fp64',), block_sizes=(4, 64), configs='heuristic')); "
        "cases = [(t.torch.bfloat16, c) for c in (4, 64, 256)] + [(t.torch.float32, 64)] "
        "+ [(t.torch.float64, c) for c in (4, 64)]; "
        "picks = sum(len(p) for d, c in cases for p in t.heuristic_picks(c, d)); "
        "print(len(sizes), picks, min(sizes.values()))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    count, picks, smallest = map(int, out.stdout.split())
    assert count == picks >= 12 and smallest > 10_000


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_cuda_extension_kernels_compile(tmp_path) -> None:
    """The CUDA kernels compile (without torch's headers, which a CPU build of torch lacks)."""
    source = REPO_ROOT / "kernels" / "gs_grouped.cu"
    cmd = ["nvcc", "-c", "-std=c++17", "-DGSOFT_KERNELS_ONLY", "-arch=sm_80", str(source), "-o", str(tmp_path / "k.o")]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "k.o").stat().st_size > 10_000


# ----------------------------------------------------------------------------------------------------------------------
# On a GPU
# ----------------------------------------------------------------------------------------------------------------------
@needs_gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("shape", [(768, 8, 2), (1024, 32, 2), (768, 4, 3), (768, 16, 1)], ids=_shape_id)
def test_gpu_backends_match_torch(backend: str, shape) -> None:
    n, b, m = shape
    blocks = _blocks(n, b, m).cuda()
    if backend == "cuda" and schedule.cuda_unsupported_reason(blocks):
        pytest.skip(schedule.cuda_unsupported_reason(blocks))
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
        x = _x(300, n).cuda().to(dtype).requires_grad_()
        w = blocks.clone().requires_grad_()
        y = gsoft.gs_apply(x, w, backend=backend)
        y.float().square().sum().backward()
        x32 = x.detach().float().requires_grad_()
        w32 = blocks.clone().requires_grad_()
        y32 = gsoft.gs_apply(x32, w32)
        y32.square().sum().backward()
        torch.testing.assert_close(y.float(), y32, atol=tol, rtol=tol)
        torch.testing.assert_close(x.grad.float(), x32.grad, atol=tol * 4, rtol=tol)
        torch.testing.assert_close(w.grad, w32.grad, atol=tol * 300, rtol=tol)
