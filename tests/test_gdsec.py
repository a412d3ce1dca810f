"""GD-SEC (gsoft.distributed.GDSECFeedback) on a convex problem split over two in-process workers: GD's loss with a
small fraction of GD's transmitted components, nothing sent once the gradient stops changing, no cap on the count."""

from __future__ import annotations

import pytest
import torch

from gsoft.distributed import CompressionConfig, GDSECFeedback, Significant, TopK, mean_decoded, simulate_round

M, D, N = 2, 100, 400
TARGET = 1e-4  # suboptimality to reach, relative to the starting point's


def _problem():
    """Least squares over M workers; columns scaled from 1 to 10^-1.5 (curvatures spread over three decades)."""
    gen = torch.Generator().manual_seed(0)
    scales = torch.logspace(0, -1.5, D, dtype=torch.float64)
    a = [torch.randn(N, D, generator=gen, dtype=torch.float64) * scales for _ in range(M)]
    x_true = torch.randn(D, generator=gen, dtype=torch.float64)
    b = [am @ x_true + 0.1 * torch.randn(N, generator=gen, dtype=torch.float64) for am in a]
    hess = sum(am.T @ am / N for am in a) / M
    x_star = torch.linalg.solve(hess, sum(am.T @ bm / N for am, bm in zip(a, b)) / M)

    def loss(x: torch.Tensor) -> float:
        return float(sum(0.5 * ((am @ x - bm) ** 2).mean() for am, bm in zip(a, b)) / M)

    def grads(x: torch.Tensor) -> list[torch.Tensor]:
        return [(am.T @ (am @ x - bm) / N).float() for am, bm in zip(a, b)]

    return loss, grads, loss(x_star), 1.0 / torch.linalg.eigvalsh(hess).max().item()


def _gd_steps(loss, grads, target: float, lr: float) -> int:
    x, steps = torch.zeros(D, dtype=torch.float64), 0
    while loss(x) > target:
        x = x - lr * sum(g.double() for g in grads(x)) / M
        steps += 1
    return steps


def _gdsec(loss, grads, target: float, lr: float, *, threshold: float, beta: float, max_steps: int):
    """Steps and transmitted components until the loss reaches ``target`` (steps None if it does not)."""
    workers = [GDSECFeedback(Significant(), beta=beta, threshold=threshold) for _ in range(M)]
    x, previous, sent = torch.zeros(D, dtype=torch.float64), None, 0
    for step in range(max_steps):
        if loss(x) <= target:
            return step, sent
        change = 0.0 if previous is None else float((x - previous).norm())
        for w in workers:
            w.set_model_change(change, M)
        payloads = [w.message("g", g) for w, g in zip(workers, grads(x))]
        sent += sum(p[0].numel() for p in payloads)
        mean = mean_decoded(workers[0].compressor, payloads, D)
        outs = [w.update("g", mean.clone()) for w in workers]
        assert all(torch.equal(o, outs[0]) for o in outs[1:])
        previous, x = x, x - lr * outs[0].double()
    return None, sent


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_gdsec_reaches_gds_loss_with_under_a_tenth_of_its_components(beta):
    loss, grads, f_star, lr = _problem()
    target = f_star + TARGET * (loss(torch.zeros(D, dtype=torch.float64)) - f_star)
    gd_steps = _gd_steps(loss, grads, target, lr)
    steps, sent = _gdsec(loss, grads, target, lr, threshold=0.5, beta=beta, max_steps=3 * gd_steps)
    assert steps is not None, f"GD-SEC (beta {beta}) did not reach GD's loss in {3 * gd_steps} steps"
    gd_components = gd_steps * M * D
    assert sent <= 0.1 * gd_components, (sent, gd_components)
    # threshold 0 sends every change: GD's iterates (up to float32 messages), so GD's step count
    exact_steps, _ = _gdsec(loss, grads, target, lr, threshold=0.0, beta=1.0, max_steps=2 * gd_steps)
    assert exact_steps is not None and abs(exact_steps - gd_steps) <= 2, (exact_steps, gd_steps)


def test_gdsec_sends_nothing_when_the_gradient_stops_changing():
    g = [torch.randn(D, generator=torch.Generator().manual_seed(m)) for m in range(M)]
    workers = [GDSECFeedback(Significant(), beta=1.0, threshold=1.0) for _ in range(M)]
    for w in workers:
        w.set_model_change(0.0, M)
    first = simulate_round(workers, g)[0]
    assert torch.allclose(first, sum(g) / M)
    for change in (0.0, 3.0):  # the same gradients again, with the model still or moving
        for w in workers:
            w.set_model_change(change, M)
        payloads = [w.message(0, x) for w, x in zip(workers, g)]
        assert [p[0].numel() for p in payloads] == [0] * M  # 0 components: nothing changed
        means = [w.update(0, mean_decoded(w.compressor, payloads, D)) for w in workers]
        assert all(torch.equal(m, first) for m in means)  # the running state H is the last gradient
    # a changed gradient sends exactly the components above (threshold / M) * change
    w = workers[0]
    w.set_model_change(2.0, M)  # cutoff 1.0
    bumped = g[0].clone()
    bumped[[5, 17]] += torch.tensor([1.5, -0.5])
    values, index = w.message(0, bumped)
    assert index.tolist() == [5] and torch.allclose(values, torch.tensor([1.5]))


def test_gdsec_has_no_count_cap_and_takes_the_papers_parameters():
    config = CompressionConfig("gdsec", threshold=0.25, beta=0.5)
    assert config.ratio is None and "compression_ratio" not in config.options()
    assert (config.options()["threshold"], config.options()["beta"]) == (0.25, 0.5)
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    assert Significant(cutoff=0.0).compress(x)[0].numel() == 1000  # everything that changed, not 1 %
    with pytest.raises(ValueError, match="beta must be in"):
        CompressionConfig("gdsec", beta=1.5)
    with pytest.raises(TypeError, match="Significant"):
        GDSECFeedback(TopK(0.1))
