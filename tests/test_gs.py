"""The GS math against dense references built here from the paper's definitions (not from gsoft.gs)."""

from __future__ import annotations

import math

import pytest
import torch

from gsoft import gs


def shuffle_matrix(k: int, n: int, dtype=torch.float64) -> torch.Tensor:
    """P_(k, n) from the paper's formula sigma(i) = (i mod k) * (n / k) + floor(i / k): (P x)_i = x_sigma(i)."""
    p = torch.zeros(n, n, dtype=dtype)
    for i in range(n):
        p[i, (i % k) * (n // k) + i // k] = 1.0
    return p


def dense_gs(blocks: torch.Tensor) -> torch.Tensor:
    """Q = (P^T)^(m-1) B_m P ... P B_1, every factor as a dense matrix (torch.block_diag)."""
    m, r, b, _ = blocks.shape
    n = r * b
    p = shuffle_matrix(r, n, blocks.dtype)
    q = torch.block_diag(*blocks[0])
    for i in range(1, m):
        q = torch.block_diag(*blocks[i]) @ p @ q
    for _ in range(m - 1):
        q = p.T @ q
    return q


def random_blocks(m: int, r: int, b: int, dtype=torch.float64, orthogonal_map="cayley", std=0.3) -> torch.Tensor:
    params = torch.randn(m, r, gs.n_skew_params(b), dtype=dtype) * std
    return gs.orthogonal_blocks(params, b, orthogonal_map)


SHAPES = [(1, 4, 3), (2, 4, 4), (2, 3, 5), (2, 6, 4), (2, 8, 2), (3, 6, 4), (3, 5, 3), (4, 2, 2), (2, 1, 7)]


@pytest.mark.parametrize("m,r,b", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gs_apply_matches_dense_reference(m, r, b, dtype):
    torch.manual_seed(0)
    blocks = random_blocks(m, r, b, dtype)
    q = dense_gs(blocks)
    x = torch.randn(2, 3, r * b, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(gs.gs_apply(x, blocks), x @ q.T, atol=tol, rtol=tol)
    torch.testing.assert_close(gs.gs_apply(x, blocks, transpose=True), x @ q, atol=tol, rtol=tol)
    torch.testing.assert_close(gs.materialize(blocks), q, atol=tol, rtol=tol)


def test_two_factors_are_the_papers_p_t_l_p_r():
    torch.manual_seed(1)
    r, b = 4, 6  # b != r: the direction of P matters
    blocks = random_blocks(2, r, b)
    p = shuffle_matrix(r, r * b)
    big_r, big_l = torch.block_diag(*blocks[0]), torch.block_diag(*blocks[1])
    torch.testing.assert_close(gs.materialize(blocks), p.T @ big_l @ p @ big_r)


def test_perfect_shuffle_is_the_formula_and_its_inverse():
    x = torch.arange(24.0).view(1, 24)
    for k in (2, 3, 4, 6):
        torch.testing.assert_close(gs.perfect_shuffle(x, k), x @ shuffle_matrix(k, 24, torch.float32).T)
        torch.testing.assert_close(gs.perfect_shuffle(gs.perfect_shuffle(x, k), 24 // k), x)


def test_gs_apply_along_any_dim_and_noncontiguous():
    torch.manual_seed(2)
    blocks = random_blocks(2, 3, 4, torch.float64)
    q = gs.materialize(blocks)
    x = torch.randn(5, 12, 7, dtype=torch.float64)
    expected = torch.einsum("ij,bjk->bik", q, x)
    torch.testing.assert_close(gs.gs_apply(x, blocks, dim=1), expected)
    xt = torch.randn(12, 5, dtype=torch.float64).T  # non-contiguous rows
    torch.testing.assert_close(gs.gs_apply(xt, blocks), xt @ q.T)


def test_gs_apply_rejects_wrong_size():
    blocks = random_blocks(2, 3, 4)
    with pytest.raises(ValueError, match="cannot act on dimension"):
        gs.gs_apply(torch.randn(2, 10), blocks)


@pytest.mark.parametrize("orthogonal_map", ["cayley", "exp"])
@pytest.mark.parametrize("m,r,b", [(2, 8, 8), (3, 6, 4), (1, 4, 16)])
def test_exact_maps_are_orthogonal_in_float32(orthogonal_map, m, r, b):
    torch.manual_seed(3)
    params = torch.randn(m, r, gs.n_skew_params(b))
    params = params / params.norm(dim=-1, keepdim=True)  # parameters of norm ~1 per block
    blocks = gs.orthogonal_blocks(params, b, orthogonal_map)
    eye_b = torch.eye(b)
    assert (blocks.transpose(-1, -2) @ blocks - eye_b).abs().max() < 1e-5
    q = gs.materialize(blocks)
    assert (q.T @ q - torch.eye(r * b)).abs().max() < 1e-5


def test_cayley_is_the_closed_form_and_exp_is_matrix_exp():
    torch.manual_seed(4)
    params = torch.randn(3, gs.n_skew_params(5), dtype=torch.float64)
    k = gs.skew_symmetric(params, 5)
    eye = torch.eye(5, dtype=torch.float64)
    torch.testing.assert_close(gs.orthogonal_blocks(params, 5, "cayley"), (eye + k) @ torch.linalg.inv(eye - k))
    torch.testing.assert_close(gs.orthogonal_blocks(params, 5, "exp"), torch.linalg.matrix_exp(k))


def test_skew_parametrisation_stores_only_free_entries():
    params = torch.arange(1.0, 7.0).view(1, 6)
    k = gs.skew_symmetric(params, 4)
    torch.testing.assert_close(k, -k.transpose(-1, -2))
    assert torch.count_nonzero(k) == 12
    torch.testing.assert_close(gs.skew_params(k), params)
    with pytest.raises(ValueError, match="Expected 6 skew parameters"):
        gs.skew_symmetric(torch.zeros(1, 5), 4)


@pytest.mark.parametrize("terms", [2, 4, 6])
def test_cayley_neumann_error_bound(terms):
    """Documented bound: ||Q_neumann - Q_cayley||_2 <= ||K||_2^terms; orthogonality degrades accordingly."""
    torch.manual_seed(5)
    params = torch.randn(4, gs.n_skew_params(6), dtype=torch.float64) * 0.05
    k = gs.skew_symmetric(params, 6)
    norm_k = torch.linalg.matrix_norm(k, ord=2)
    approx = gs.orthogonal_blocks(params, 6, "cayley_neumann", neumann_terms=terms)
    exact = gs.orthogonal_blocks(params, 6, "cayley")
    err = torch.linalg.matrix_norm(approx - exact, ord=2)
    assert (err <= norm_k**terms * (1 + 1e-9) + 1e-15).all()
    ortho = torch.linalg.matrix_norm(approx.transpose(-1, -2) @ approx - torch.eye(6, dtype=torch.float64), ord=2)
    assert (ortho <= 2 * norm_k**terms + norm_k ** (2 * terms) + 1e-12).all()
    # more terms, closer to orthogonal
    if terms > 2:
        coarse = gs.orthogonal_blocks(params, 6, "cayley_neumann", neumann_terms=terms - 2)
        assert (approx - exact).abs().max() < (coarse - exact).abs().max()


@pytest.mark.parametrize("orthogonal_map", ["cayley", "cayley_neumann", "exp"])
def test_identity_at_zero(orthogonal_map):
    blocks = gs.orthogonal_blocks(torch.zeros(2, 3, gs.n_skew_params(4)), 4, orthogonal_map)
    x = torch.randn(5, 12)
    torch.testing.assert_close(gs.gs_apply(x, blocks), x)


def test_unknown_map_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown orthogonal_map 'qr'"):
        gs.orthogonal_blocks(torch.zeros(1, 1), 2, "qr")


def test_half_precision_params_are_computed_in_float32():
    params = (torch.randn(2, 3, gs.n_skew_params(4)) * 0.3).to(torch.bfloat16)
    blocks = gs.orthogonal_blocks(params, 4)
    assert blocks.dtype == torch.bfloat16
    reference = gs.orthogonal_blocks(params.float(), 4)
    torch.testing.assert_close(blocks.float(), reference, atol=1e-2, rtol=1e-2)


def test_gradients_flow_to_blocks_and_input():
    torch.manual_seed(6)
    params = (torch.randn(2, 3, gs.n_skew_params(4), dtype=torch.float64) * 0.3).requires_grad_()
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p, v: gs.gs_apply(v, gs.orthogonal_blocks(p, 4)), (params, x))


# --- structure -----------------------------------------------------------------------------------------------------
def dense_support(n: int, b: int, m: int) -> torch.Tensor:
    torch.manual_seed(7)
    return dense_gs(random_blocks(m, n // b, b)).abs() > 1e-12


@pytest.mark.parametrize("n,b", [(16, 4), (64, 4), (24, 4), (12, 2), (27, 3), (48, 8), (30, 5), (36, 6)])
def test_auto_n_factors_is_the_fewest_dense(n, b):
    r = n // b
    m = gs.auto_n_factors(r, b)
    assert m == 1 + math.ceil(math.log(r, b) - 1e-12)
    assert gs.is_dense(n, b, m) and bool(dense_support(n, b, m).all())
    if m > 1:
        assert not gs.is_dense(n, b, m - 1) and not bool(dense_support(n, b, m - 1).all())


def test_two_factors_dense_exactly_when_b_squared_covers_n():
    assert gs.is_dense(64, 8, 2) and gs.is_dense(48, 8, 2)
    assert not gs.is_dense(768, 8, 2)  # the paper's GLUE setting: 64 non-zeros per row
    assert bool(dense_support(64, 8, 2).sum(1).eq(64).all())
    assert bool(dense_support(128, 8, 2).sum(1).eq(64).all())
    assert "not dense" in gs.describe(768, 8, 2) and "n_factors=4 would be dense" in gs.describe(768, 8, 2)


def test_param_count_formula():
    assert gs.gs_param_count(768, 8, 2) == 2 * 96 * 28
    assert gs.gs_param_count(1024, 32, 2) == 2 * 32 * 32 * 31 // 2  # half the official code's 2 * n * b


# --- sizes ---------------------------------------------------------------------------------------------------------
def test_resolve_blocks_and_errors():
    assert gs.resolve_blocks(768, block_size=8) == (8, 96)
    assert gs.resolve_blocks(768, n_blocks=32) == (24, 32)
    with pytest.raises(ValueError, match=r"block_size=5 does not divide the dimension 768.*\[2, 3, 4, 6, 8"):
        gs.resolve_blocks(768, block_size=5)
    with pytest.raises(ValueError, match="n_blocks=7 does not divide"):
        gs.resolve_blocks(768, n_blocks=7)
    with pytest.raises(ValueError, match=r"Give one of `block_size` and `n_blocks` \(got neither\)"):
        gs.resolve_blocks(768)
    with pytest.raises(ValueError, match=r"only one of `block_size` and `n_blocks` \(got block_size=8, n_blocks=96\)"):
        gs.resolve_blocks(768, 8, 96)
    with pytest.raises(ValueError, match="block_size must be an int >= 2, got 1"):
        gs.resolve_blocks(768, block_size=1)
    with pytest.raises(ValueError, match=r"block_size must be an int >= 2, got 8\.0"):
        gs.resolve_blocks(768, block_size=8.0)
    with pytest.raises(ValueError, match="n_blocks must be an int >= 1, got 0"):
        gs.resolve_blocks(768, n_blocks=0)


def test_resolve_n_factors_errors():
    assert gs.resolve_n_factors("auto", 96, 8) == 4
    assert gs.resolve_n_factors(3, 96, 8) == 3
    with pytest.raises(ValueError, match="n_factors must be"):
        gs.resolve_n_factors(0, 4, 4)
    with pytest.raises(ValueError, match="needs at least 2 blocks"):
        gs.resolve_n_factors(2, 1, 16)
    assert gs.resolve_n_factors("auto", 1, 16) == 1


def test_n_factors_upper_bounds():
    with pytest.raises(ValueError, match=r"n_factors=65 is more than any layer can use: at most 64"):
        gs.check_n_factors(65)
    gs.check_n_factors(64)
    # 64 = 8 blocks of 8: 1 + log2(64) = 7 factors make any GS matrix dense, 9 have a dense rotation's parameters
    assert gs.max_n_factors(64, 8) == 9
    assert gs.resolve_n_factors(9, 8, 8) == 9
    with pytest.raises(ValueError, match=r"n_factors=10 with block_size=8 .*n_factors <= 9, or 'auto' \(= 2 here"):
        gs.resolve_n_factors(10, 8, 8)
    # large blocks: the log2 bound is the larger one (32 = 2 blocks of 16: 6 factors, not 2)
    assert gs.max_n_factors(32, 16) == 6
    for b in range(2, 40):
        for r in range(1, 300):
            assert gs.auto_n_factors(r, b) <= gs.max_n_factors(r * b, b), (r, b)


def test_neumann_terms_bound():
    gs.check_orthogonal_map("cayley_neumann", gs.MAX_NEUMANN_TERMS)
    for bad in (0, gs.MAX_NEUMANN_TERMS + 1, 5.0, True):
        with pytest.raises(ValueError, match=r"neumann_terms must be an int in \[1, 64\]"):
            gs.check_orthogonal_map("cayley_neumann", bad)


@pytest.mark.parametrize("r,b", [(8, 2), (4, 4), (16, 8), (12, 4)])
def test_grouped_two_factor_path_equals_general_path(r, b, monkeypatch):
    """Two factors with b | r use dense b^2 groups; both paths must equal the dense reference."""
    torch.manual_seed(8)
    blocks = random_blocks(2, r, b)
    q = dense_gs(blocks)
    groups = gs.two_factor_groups(blocks)
    torch.testing.assert_close(torch.block_diag(*groups), q)
    x = torch.randn(3, r * b, dtype=torch.float64)
    grouped = gs.gs_apply(x, blocks), gs.gs_apply(x, blocks, transpose=True)
    monkeypatch.setattr(gs, "GROUPED_MAX_BLOCK", 0)
    general = gs.gs_apply(x, blocks), gs.gs_apply(x, blocks, transpose=True)
    for a, c, ref in zip(grouped, general, (x @ q.T, x @ q)):
        torch.testing.assert_close(a, ref)
        torch.testing.assert_close(c, ref)


def test_inverse_transpose_blocks_invert_non_orthogonal_gs():
    torch.manual_seed(9)
    blocks = torch.randn(2, 4, 3, 3, dtype=torch.float64) + 3 * torch.eye(3, dtype=torch.float64)  # invertible
    x = torch.randn(5, 12, dtype=torch.float64)
    y = gs.gs_apply(x, blocks)
    torch.testing.assert_close(gs.gs_apply(y, gs.inverse_transpose_blocks(blocks), transpose=True), x)


@pytest.mark.parametrize("k, c", [(1, 7), (3, 4), (12, 16)])
def test_block_diagonal_products_match_dense(k, c):
    """``block_diag_apply`` is ``D x`` (``D^T x``) for the block-diagonal ``D``; ``block_diag_grad_split`` (the op's
    batched layout) is the gradient of its blocks, as autograd finds it through the dense product."""
    torch.manual_seed(0)
    blocks = torch.randn(k, c, c, dtype=torch.float64)
    dense = torch.block_diag(*blocks)
    x = torch.randn(37, k * c, dtype=torch.float64)
    grad = torch.randn(37, k * c, dtype=torch.float64)
    for transpose in (False, True):
        expected = x @ (dense if transpose else dense.T)
        torch.testing.assert_close(gs.block_diag_apply(x, blocks, transpose), expected, atol=1e-12, rtol=1e-12)
    leaf = blocks.clone().requires_grad_()
    (dense_grad,) = torch.autograd.grad(x @ torch.block_diag(*leaf).T, leaf, grad)
    batched = (grad.view(37, k, c).transpose(0, 1), x.view(37, k, c).transpose(0, 1))
    torch.testing.assert_close(gs.block_diag_grad_split(*batched), dense_grad, atol=1e-12, rtol=1e-12)


def test_row_split_block_gradient_on_gpus(monkeypatch):
    """The GPU path of ``block_diag_grad_split`` (rows in chunks, partial products summed) on the CPU, forced."""
    assert gs._row_chunks(torch.device("cpu"), 12, 4096) == 1  # a CPU has no idle multiprocessors to fill
    monkeypatch.setattr(gs, "_row_chunks", lambda device, k, rows: 4)
    g, x = torch.randn(3, 64, 5, dtype=torch.float64), torch.randn(3, 64, 5, dtype=torch.float64)
    torch.testing.assert_close(gs.block_diag_grad_split(g, x), torch.bmm(g.transpose(1, 2), x), atol=1e-12, rtol=0)


@pytest.mark.parametrize("m,r,b", [(1, 4, 3), (2, 6, 4), (3, 5, 3)])
def test_materialize_batched_matches_dense(m, r, b):
    torch.manual_seed(0)
    blocks = torch.stack([random_blocks(m, r, b) for _ in range(3)])
    torch.testing.assert_close(
        gs.materialize_batched(blocks), torch.stack([dense_gs(bl) for bl in blocks]), atol=1e-12, rtol=1e-12
    )


def _imported_modules(path, package: str) -> set[str]:
    """Every module a source file of ``package`` imports, at the top or inside functions (relative imports
    resolved)."""
    import ast
    from pathlib import Path

    found = set()
    for node in ast.walk(ast.parse(Path(path).read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = parts[: len(parts) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def test_the_math_imports_no_other_gsoft_module():
    """gsoft.gs is the bottom layer: the kernels, the backend plan and the tuner import it, never the reverse; the
    kernels import nothing above it."""
    from pathlib import Path

    imports = _imported_modules(gs.__file__, "gsoft")
    assert not {m for m in imports if m.startswith("gsoft")}, imports
    kernels = Path(gs.__file__).parent.parent / "kernels"
    for source in kernels.glob("*.py"):
        upward = {m for m in _imported_modules(source, "gsoft.kernels") if m.startswith(("gsoft.plan", "gsoft.tuner"))}
        assert not upward, f"{source.name} imports {upward}"
