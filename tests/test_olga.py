"""OLGA / EF-OLGA (gsoft.distributed.olga), the baselines (gsoft.distributed.baselines) and the OLGA benchmark:
AEG as the uncompressed special case, linear convergence, exact bit counts, EF-OLGA's error at loop ends, the config's
errors, a quick benchmark run and the bits claim of docs/olga.md on a small generated problem (seconds in all)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from bench import olga as bench_olga
from gsoft.distributed.baselines import (
    EF21Config,
    GDConfig,
    QsparseConfig,
    aeg,
    ef21,
    ef21_theory_lr,
    gd,
    qsparse_local,
)
from gsoft.distributed.compressors import Cast, Identity, RandK, Significant, TopK
from gsoft.distributed.olga import (
    GradientEstimator,
    LinearModelProblem,
    OLGAConfig,
    Recorder,
    gradient,
    objective,
    olga,
    similarity,
    solve,
)

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64


def small_problem(kind: str = "logistic", workers: int = 4, rows: int = 60, dim: int = 8, seed: int = 0,
                  l2: float = 0.05) -> LinearModelProblem:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, generator=gen, dtype=F64)
    features, targets = [], []
    for _ in range(workers):
        a = torch.randn(rows, dim, generator=gen, dtype=F64)
        score = a @ w
        targets.append(torch.sign(score + 0.5 * torch.randn(rows, generator=gen, dtype=F64)) if kind == "logistic"
                       else score + 0.1 * torch.randn(rows, generator=gen, dtype=F64))
        features.append(a)
    return LinearModelProblem(features, targets, kind, l2)


def constants(problem: LinearModelProblem) -> tuple[dict, float, float]:
    """(mu, delta, smoothness for OLGAConfig), f*, f(x0) - f*."""
    x_star, f_star = solve(problem)
    x0 = torch.zeros(problem.dim, dtype=F64)
    c = {"mu": problem.strong_convexity(), "delta": similarity(problem, [x0, x_star]),
         "smoothness": max(problem.smoothness(m) for m in range(problem.n_workers))}
    return c, f_star, objective(problem, x0) - f_star


def test_identity_compression_with_p1_is_aeg():
    """OLGA with fp32 messages and a loop end after every iteration estimates grad f exactly (up to fp32 rounding):
    the same iterates as AEG, one fp32 vector more per iteration (the loop end's send)."""
    problem = small_problem()
    c, f_star, span = constants(problem)
    config = OLGAConfig(**c, compressor=Identity(), p=1.0)
    iterations = 30
    mine = olga(problem, config, max_rounds=1 + 2 * iterations, f_star=f_star)
    ref = aeg(problem, config, max_rounds=2 * iterations, f_star=f_star)
    assert len(mine.gap) == len(ref.gap) == iterations + 1
    assert ref.gap[-1] < 1e-6 * span  # the comparison covers a converging run, not just a start
    torch.testing.assert_close(torch.tensor(mine.gap), torch.tensor(ref.gap), rtol=1e-4, atol=1e-10 * span)
    fp32 = 32 * problem.dim
    assert ref.bits == [2 * fp32 * k for k in range(iterations + 1)]
    assert mine.bits == [fp32 + 3 * fp32 * k for k in range(iterations + 1)]
    assert mine.info["loops"] == iterations


@pytest.mark.parametrize("kind", ["ridge", "logistic"])
def test_aeg_and_olga_converge_linearly(kind):
    """Every window of 10 iterations divides the best gap so far by at least 2 until 1e-10 of the start."""
    problem = small_problem(kind, workers=5, rows=80, dim=10)
    c, f_star, span = constants(problem)
    runs = {"AEG": aeg(problem, OLGAConfig(**c), max_rounds=400, f_star=f_star, target=1e-10 * span),
            "OLGA": olga(problem, OLGAConfig(**c, compressor=RandK(0.3, rescale=True)), max_rounds=2000,
                         f_star=f_star, target=1e-10 * span)}
    for name, history in runs.items():
        assert history.gap[-1] <= 1e-10 * span, (name, history.gap[-1] / span)
        best = [min(history.gap[: i + 1]) for i in range(len(history.gap))]
        windows = [best[i + 10] / best[i] for i in range(0, len(best) - 10, 10)]
        assert max(windows) < 0.5, (name, windows)
        assert history.info.get("inner_capped", 0) == 0


def test_bits_are_counted_exactly():
    """d = 8 values: an fp32 vector is 32 B = 256 bit; Top-K 25% keeps 2 values and 2 int32 indices = 16 B = 128
    bit; rescaled Rand-K 25% sends 2 values = 64 bit (its coordinates come from the seed)."""
    problem = small_problem(workers=3, dim=8)
    c, f_star, _ = constants(problem)
    fp32, topk, randk = 256, 128, 64
    iterations = 6
    for compressor, message, flush in [(TopK(0.25), topk, "reset"), (TopK(0.25), topk, "send"),
                                       (RandK(0.25, rescale=True), randk, "reset")]:
        config = OLGAConfig(**c, compressor=compressor, p=0.5, error_flush=flush, seed=3)
        history = olga(problem, config, max_rounds=1 + 2 * iterations)
        loops = history.info["loops"]
        assert 0 < loops < iterations  # the coin both ended and continued loops: both paths are counted
        per_loop = fp32 * (2 if flush == "send" else 1)
        assert history.bits[-1] == fp32 + iterations * 2 * message + loops * per_loop
        assert history.rounds == [1 + 2 * k for k in range(iterations + 1)]
        # downlink: x0, then per iteration x_g, x_f and the server's own difference at each
        assert history.downlink_bits[-1] == fp32 + iterations * 4 * fp32
    rounds = 5
    assert gd(problem, GDConfig(0.1), max_rounds=rounds).bits[-1] == rounds * fp32
    assert ef21(problem, EF21Config(0.1, TopK(0.25)), max_rounds=rounds).bits[-1] == fp32 + (rounds - 1) * topk
    assert qsparse_local(problem, QsparseConfig(0.1, 3, TopK(0.25)), max_rounds=rounds).bits[-1] == rounds * topk


def test_ef_olga_error_feedback_and_loop_end():
    """Each estimate misses exactly what the workers' errors grew by (error feedback loses nothing); a loop end
    restarts every error at zero and costs one fp32 vector per worker; error_flush='send' adds the errors'."""
    problem = small_problem(workers=4, dim=12)
    c, _, _ = constants(problem)
    config = OLGAConfig(**c, compressor=TopK(0.25))
    rec = Recorder(problem, "test", None, None, 100)
    estimator = GradientEstimator(problem, config, rec)
    x0 = torch.zeros(problem.dim, dtype=F64)
    estimator.refresh(x0)
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        z = torch.randn(problem.dim, generator=gen, dtype=F64)
        carried = sum(estimator.errors[1:]) / problem.n_workers
        estimate = estimator.estimate(z, seed=step)
        grown = sum(estimator.errors[1:]) / problem.n_workers - carried
        assert float(grown.norm()) > 1e-3  # Top-K 25% dropped something
        torch.testing.assert_close(estimate + grown, gradient(problem, z), rtol=1e-5, atol=1e-6)
    assert all(float(e.norm()) > 0 for e in estimator.errors[1:])
    errors = [e.clone() for e in estimator.errors]
    before = list(rec.uplink)
    sent = estimator.flush_errors()
    torch.testing.assert_close(sent, sum(errors[1:]) / problem.n_workers, rtol=1e-6, atol=1e-7)
    estimator.refresh(z)
    assert all(float(e.norm()) == 0 for e in estimator.errors)
    assert [after - b for after, b in zip(rec.uplink, before)] == [0] + [2 * 32 * problem.dim] * 3
    # in a run: a loop end after every iteration, sending the errors: 2 messages + 2 fp32 vectors per iteration
    history = olga(problem, OLGAConfig(**c, compressor=TopK(0.25), p=1.0, error_flush="send"), max_rounds=7)
    message = 8 * TopK(0.25).payload_bytes(problem.dim)
    assert history.bits[-1] == 32 * problem.dim + 3 * (2 * message + 2 * 32 * problem.dim)


BASE = {"mu": 0.01, "delta": 0.1, "smoothness": 1.0}


@pytest.mark.parametrize("kwargs,match", [
    ({"mu": 0}, r"mu must be a finite number > 0, got 0; pass a lower bound"),
    ({"delta": float("nan")}, r"delta must be .* got nan; pass an upper bound .*similarity"),
    ({"smoothness": -1.0}, r"smoothness must be .* got -1.0"),
    ({"compressor": TopK(0.1), "error_feedback": False}, r"biased: OLGA needs an unbiased one \(RandK\(ratio, "
                                                          r"rescale=True\)\); or set error_feedback=True"),
    ({"compressor": Significant()}, r"data-dependent number of values; use TopK"),
    ({"compressor": "topk"}, r"must be a gsoft.distributed.compressors.Compressor"),
    ({"p": 1.5}, r"p must be a finite number in \(0, 1\], got 1.5"),
    ({"p": 0}, r"p must be .* got 0"),
    ({"tau": 2.0}, r"tau must be .* got 2.0; or None for min\(1, sqrt\(mu / delta_eff\) / 2\)"),
    ({"compressor": TopK(0.1), "omega": 3.0}, r"omega=3.0 .* EF-OLGA .* leave omega=None"),
    ({"error_flush": "send"}, r"error_flush='send' .* without error feedback .* leave error_flush='reset'"),
    ({"error_flush": "later"}, r"error_flush must be 'reset' or 'send', got 'later'"),
    ({"inner_max_iters": 0}, r"inner_max_iters must be an int >= 1, got 0"),
])
def test_config_errors_name_the_value_and_the_fix(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        OLGAConfig(**{**BASE, **kwargs})


@pytest.mark.parametrize("make,match", [
    (lambda: GDConfig(0.0), r"lr must be a finite number > 0, got 0.0; 1 / L is gradient descent's safe step"),
    (lambda: EF21Config(float("inf")), r"lr must be .* got inf"),
    (lambda: EF21Config(0.1, Significant()), r"compressor must be a fixed-size .*TopK\(0.1\)"),
    (lambda: QsparseConfig(0.1, local_steps=0), r"local_steps must be an int >= 1 \(H, gradient steps per round\), "
                                                r"got 0"),
    (lambda: ef21_theory_lr(1.0, 1.0, 0.0), r"ratio must be a finite number in \(0, 1\], got 0.0"),
])
def test_baseline_config_errors(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_error_feedback_follows_the_compressor():
    assert OLGAConfig(**BASE, compressor=TopK(0.1)).method == "EF-OLGA"
    assert OLGAConfig(**BASE, compressor=RandK(0.1)).method == "EF-OLGA"  # not rescaled: the biased Rand-K
    assert OLGAConfig(**BASE, compressor=RandK(0.1, rescale=True)).method == "OLGA"
    assert OLGAConfig(**BASE, compressor=RandK(0.1, rescale=True), error_feedback=True).method == "EF-OLGA"


def test_parameters_follow_aeg_with_the_compression_variance():
    """delta_eff = delta + sqrt(omega (M - 1)) / M * 2 delta for rescaled Rand-K (omega = d / k - 1); AEG's rule."""
    config = OLGAConfig(**BASE, compressor=RandK(0.1, rescale=True))
    params = config.parameters(dim=100, n_workers=5)
    assert params.omega == pytest.approx(9.0)
    assert params.delta_eff == pytest.approx(0.1 + math.sqrt(9.0 * 4) / 5 * 0.2)
    assert params.theta == pytest.approx(1 / (2 * params.delta_eff))
    assert params.tau == pytest.approx(math.sqrt(0.01 / params.delta_eff) / 2)
    assert params.eta == pytest.approx(1 / (2 * math.sqrt(0.01 * params.delta_eff)))
    assert params.p == pytest.approx(0.1)  # 10 fp32 values against 100
    exact = OLGAConfig(**BASE).parameters(dim=100, n_workers=5)
    assert (exact.omega, exact.delta_eff, exact.p) == (0.0, 0.1, 1.0)
    assert OLGAConfig(**BASE, compressor=TopK(0.1)).parameters(100, 5).p == pytest.approx(0.2)
    with pytest.raises(ValueError, match=r"no variance bound is known for .*: pass omega"):
        OLGAConfig(**BASE, compressor=Cast()).parameters(100, 5)


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_olga")
    report = bench_olga.main(["--quick", "--max_rounds", "300", "--output_dir", str(out)])
    return out, report


def test_quick_benchmark_writes_table_json_plot(bench_run):
    out, report = bench_run
    table = (out / "olga.md").read_text()
    for method in bench_olga.METHODS:
        assert f"| {bench_olga.label(method, 0.05, 4)} |" in table, method
    assert "#### digits" in table and "#### generated" in table
    saved = json.loads((out / "olga.json").read_text())
    assert [p["name"] for p in saved["problems"]] == ["digits", "generated"]
    gd_run = saved["problems"][0]["summary"]["gd"]["theory"]
    assert gd_run["bits"] == gd_run["rounds"] * 32 * saved["problems"][0]["dim"]
    assert (out / "olga.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["problems"][1]["constants"]["delta"] > 0


def test_ef_olga_needs_fewer_bits_than_ef21_and_qsparse():
    """docs/olga.md's claim on a small generated similar-data problem: EF-OLGA at its theory parameters reaches
    f - f* <= 1e-6 (f(x0) - f*) with fewer uplink bits than EF21 and Qsparse-local at any step of the benchmark's
    grid (each baseline runs until the target or until it has spent EF-OLGA's bits)."""
    config = yaml.safe_load((ROOT / "configs" / "bench" / "olga.yaml").read_text())
    ratio, local_steps, grid = config["ratio"], config["local_steps"], config["step_scales"]
    spec = bench_olga.problem_spec("small", {"source": "generated", "workers": 5, "samples": 200, "dim": 40,
                                             "decay": 1.5, "l2": 1e-3})
    problem = bench_olga.build_problem(spec)
    c = bench_olga.constants(problem)
    target = 1e-6 * (c["f0"] - c["f_star"])
    mine = bench_olga.runner("ef_olga", problem, c, 1.0, ratio, local_steps, 0)(
        max_rounds=3000, f_star=c["f_star"], target=target)
    hit = mine.first_reaching(target)
    assert hit is not None
    budget = mine.bits[hit]
    per_round = 8 * TopK(ratio).payload_bytes(problem.dim)
    for method in ("ef21", "qsparse"):
        for scale in grid:
            run = bench_olga.runner(method, problem, c, scale, ratio, local_steps, 0)
            history = run(max_rounds=budget // per_round + 2, f_star=c["f_star"], target=target)
            reached = history.first_reaching(target)
            assert reached is None or history.bits[reached] > budget, (method, scale, history.bits[reached], budget)
            assert reached is not None or history.bits[-1] >= budget or history.info.get("diverged")


@pytest.mark.parametrize("argv,match", [
    (["--problems", "{x: {source: mnist}}"], r"problem 'x': source must be one of digits, breast_cancer, generated"),
    (["--problems", "{x: {source: digits, loss: ridge}}"], r"digits is a classification set; ridge runs on source: "
                                                           r"generated"),
    (["--problems", "{x: {sampels: 10}}"], r"problem 'x': unknown keys \['sampels'\]"),
    (["--ratio", "2"], r"--ratio must be in \(0, 1\]"),
    (["--sweep", "{problem: nope}"], r"--sweep's problem 'nope' is not one of --problems"),
    (["--ablation", "{problem: digits, ratio: [0.1]}"], r"--ablation has unknown keys \['ratio'\]"),
])
def test_benchmark_option_errors(argv, match):
    with pytest.raises(SystemExit, match=match):
        bench_olga.parse(argv)
