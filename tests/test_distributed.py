"""gsoft.distributed: compressors, error feedback, DDP hooks and local steps.

Three layers, cheapest first:

1. compressor units: payload layouts and byte sizes against hand-written formulas, round-trip properties, pack/unpack;
2. algorithm tests: :func:`simulate_round` (the same math as the DDP hook, in one process) on least-squares and
   logistic-regression problems whose workers have different local optima, so that only a correct error-feedback
   scheme reaches the joint optimum and Top-K without feedback measurably does not;
3. real 2-process DDP on gloo: one spawn (two processes cost ~5 s to start) runs every case in
   :func:`conftest.spawn_cases`, each rank writes what it saw to a file, and the tests below compare the ranks and check the
   byte counters against the formulas. Bad options are checked in this process on a 1-process gloo group.
"""

from __future__ import annotations

import copy
import hashlib
import math
import warnings
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from conftest import spawn_cases
from gsoft.distributed import (
    METHODS,
    Cast,
    DifferenceFeedback,
    ErrorFeedback,
    Feedback,
    Identity,
    Int8,
    RandK,
    Sign,
    Significant,
    TopK,
    CompressionConfig,
    build_compressor,
    register_compression,
    resolve_compress,
    resolve_error_feedback,
    simulate_round,
)
from gsoft.distributed.transport import pack, unpack

SIZES = [1, 7, 1000, 1025, 4099]
CHUNK = 1024


def _ceil(a: float) -> int:
    return math.ceil(a)


def _k(n: int, ratio: float) -> int:
    """Kept coordinates of Top-K / Rand-K / the GD-SEC cap: ceil(ratio * n) clamped to [1, n]."""
    return min(n, max(1, math.ceil(ratio * n)))


def _expected_bytes(name: str, n: int, ratio: float) -> int:
    """The payload size of one worker, written out by hand (values, indices, scales)."""
    if name == "none":
        return 4 * n
    if name in ("fp16", "bf16"):
        return 2 * n
    if name == "int8":
        return n + 4 * _ceil(n / CHUNK)
    if name == "sign":
        return _ceil(n / 8) + 4 * _ceil(n / CHUNK)
    if name == "topk":
        return 8 * _k(n, ratio)
    if name == "randk":
        return 4 * _k(n, ratio)
    if name == "gdsec":  # the largest possible payload: every component (no cap)
        return 8 * n
    raise AssertionError(name)


# ------------------------------------------------------------------------------------------------------------------
# 1. compressor units
# ------------------------------------------------------------------------------------------------------------------

UNIT_METHODS = ["none", "fp16", "bf16", "int8", "sign", "topk", "randk", "gdsec"]


def _x(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("ratio", [0.01, 0.3])
@pytest.mark.parametrize("name", UNIT_METHODS)
def test_payload_matches_layout_and_byte_formula(name, ratio, n):
    c = build_compressor(name, compression_ratio=ratio, chunk_size=CHUNK)
    assert c.payload_bytes(n) == _expected_bytes(name, n, ratio)
    payload = c.compress(_x(n), shared_seed=3, private_seed=5)
    layout = c.layout(n)
    assert len(payload) == len(layout)
    for t, (dtype, count) in zip(payload, layout):
        assert t.dtype == dtype and t.dim() == 1
        if c.variable_size:
            assert 1 <= t.numel() <= count
        else:
            assert t.numel() == count
    if c.variable_size:
        assert payload[0].numel() == payload[1].numel()
        assert sum(t.numel() * t.element_size() for t in payload) <= _expected_bytes(name, n, ratio)
    else:
        assert sum(t.numel() * t.element_size() for t in payload) == _expected_bytes(name, n, ratio)
    decoded = c.decompress(payload, n, shared_seed=3)
    assert decoded.shape == (n,) and decoded.dtype == torch.float32 and torch.isfinite(decoded).all()


@pytest.mark.parametrize("name", UNIT_METHODS)
def test_zero_vector_decodes_to_zero(name):
    c = build_compressor(name, compression_ratio=0.1)
    x = torch.zeros(1025)
    out = c.decompress(c.compress(x, shared_seed=1, private_seed=2), x.numel(), shared_seed=1)
    assert torch.equal(out, x)


@pytest.mark.parametrize("n", SIZES)
def test_identity_exact_and_half_precision_close(n):
    x = _x(n) * 10
    c = Identity()
    assert torch.equal(c.decompress(c.compress(x), n), x)
    fp16 = Cast(torch.float16)
    err = (fp16.decompress(fp16.compress(x), n) - x).abs()
    assert (err <= 1e-3 * x.abs()).all()  # fp16: 11-bit mantissa, relative error <= 2^-11
    bf16 = Cast(torch.bfloat16)
    err = (bf16.decompress(bf16.compress(x), n) - x).abs()
    assert (err <= 8e-3 * x.abs()).all()  # bf16: 8-bit mantissa, relative error <= 2^-8


@pytest.mark.parametrize("n", [7, 1025, 4099])
def test_int8_per_element_error_within_chunk_scale_and_unbiased(n):
    x = _x(n) * torch.linspace(0.1, 5.0, n)  # chunks with different scales
    c = Int8(CHUNK)
    n_chunks = _ceil(n / CHUNK)
    padded = torch.zeros(n_chunks * CHUNK)
    padded[:n] = x.abs()
    scale = (padded.view(n_chunks, CHUNK).amax(dim=1) / 127.0).repeat_interleave(CHUNK)[:n]
    codes, scales = c.compress(x, private_seed=0)
    assert torch.allclose(scales, padded.view(n_chunks, CHUNK).amax(dim=1) / 127.0)
    seeds = 400
    total = torch.zeros(n, dtype=torch.float64)
    for s in range(seeds):
        out = c.decompress(c.compress(x, private_seed=s), n)
        assert ((out - x).abs() <= scale * (1 + 1e-5)).all()  # one quantisation step at most
        total += out.double()
    bias = (total / seeds - x.double()).abs() / scale.double()
    # stochastic rounding: the mean of S draws has std <= scale / (2 sqrt(S)) = scale / 40 per element; rounding to
    # nearest would leave a mean |error| of ~scale / 4, flooring ~scale / 2
    assert bias.mean() < 0.03 and bias.max() < 0.25
    # and two private seeds really give different roundings
    assert not torch.equal(c.compress(x, private_seed=0)[0], c.compress(x, private_seed=1)[0])


@pytest.mark.parametrize("n", SIZES)
def test_sign_decodes_to_chunk_mean_magnitude_times_sign(n):
    x = _x(n) * torch.linspace(0.1, 5.0, n)
    c = Sign(CHUNK)
    out = c.decompress(c.compress(x), n)
    expected = torch.empty(n)
    for start in range(0, n, CHUNK):
        part = x[start: start + CHUNK]
        expected[start: start + CHUNK] = part.abs().mean() * torch.where(part >= 0, 1.0, -1.0)
    assert torch.allclose(out, expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("ratio", [0.01, 0.3])
def test_topk_keeps_exactly_the_k_largest_magnitudes(n, ratio):
    x = _x(n)
    c = TopK(ratio)
    values, index = c.compress(x)
    k = _k(n, ratio)
    assert set(index.tolist()) == set(torch.topk(x.abs(), k).indices.tolist())
    assert torch.equal(values, x[index.long()])
    out = c.decompress((values, index), n)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[index.long()] = True
    assert torch.equal(out[mask], x[mask]) and (out[~mask] == 0).all()


@pytest.mark.parametrize("n", [1000, 1025, 4099])
def test_randk_indices_follow_the_shared_seed(n):
    x = _x(n)
    a, b = RandK(0.05), RandK(0.05)
    k = _k(n, 0.05)
    ia, ib = a.indices(n, 11, x.device), b.indices(n, 11, x.device)
    assert torch.equal(ia, ib) and ia.unique().numel() == k
    assert not torch.equal(set_sorted(ia), set_sorted(a.indices(n, 12, x.device)))
    # the private seed plays no role: two workers agree without sending indices
    pa, pb = a.compress(x, shared_seed=11, private_seed=0), b.compress(x * 2, shared_seed=11, private_seed=9)
    out = b.decompress(pa, n, shared_seed=11)
    assert torch.equal(out[ia], x[ia]) and out.count_nonzero() <= k
    # summable: the sum of payloads decodes to the sum of the decodes
    summed = a.decompress((pa[0] + pb[0],), n, shared_seed=11)
    assert torch.allclose(summed, a.decompress(pa, n, shared_seed=11) + a.decompress(pb, n, shared_seed=11))
    # rescale=True is unbiased: the mean over many shared seeds approaches x
    r = RandK(0.05, rescale=True)
    mean = sum(r.decompress(r.compress(x, shared_seed=s), n, shared_seed=s) for s in range(400)) / 400
    assert (mean - x).abs().mean() < 0.25 * x.abs().mean()


def set_sorted(t: torch.Tensor) -> torch.Tensor:
    return t.sort().values


def test_significant_sends_every_component_above_the_cutoff_and_no_more():
    """No cap on the count: every component above the cutoff, and nothing for a vector that is all below it."""
    n = 1000
    x = _x(n) * 0.01
    x[[3, 50, 700]] = torch.tensor([5.0, -2.0, 0.6])
    c = Significant(cutoff=0.5)
    values, index = c.compress(x)
    assert sorted(index.tolist()) == [3, 50, 700] and torch.equal(values, x[index.long()])
    out = c.decompress((values, index), n)
    assert torch.equal(out[[3, 50, 700]], x[[3, 50, 700]]) and out.count_nonzero() == 3
    y = _x(n, 1).sign() * (1.0 + torch.rand(n, generator=torch.Generator().manual_seed(2)))
    assert c.compress(y)[1].numel() == n  # everything above the cutoff: all of it (the capped rule sent 1%)
    assert c.compress(torch.full((n,), 0.5))[1].numel() == 0  # strictly above
    assert Significant().compress(torch.zeros(n))[0].numel() == 0


@pytest.mark.parametrize("n", [1, 7, 1025])
@pytest.mark.parametrize("name", UNIT_METHODS)
def test_pack_unpack_round_trip(name, n):
    c = build_compressor(name, compression_ratio=0.3)
    payload = c.compress(_x(n), shared_seed=1, private_seed=2)
    layout = Significant.layout_for(payload[0].numel()) if c.variable_size else c.layout(n)
    buffer = pack(payload)
    assert buffer.dtype == torch.uint8 and buffer.numel() == sum(t.numel() * t.element_size() for t in payload)
    back = unpack(buffer, layout)
    assert len(back) == len(payload)
    for a, b in zip(back, payload):
        assert a.dtype == b.dtype and torch.equal(a, b)
    with pytest.raises(ValueError, match="bytes"):
        unpack(torch.cat([buffer, buffer[:1]]), layout)


# ------------------------------------------------------------------------------------------------------------------
# 2. algorithms: simulate_round on problems with heterogeneous workers
# ------------------------------------------------------------------------------------------------------------------

M, D = 4, 30


def _least_squares():
    """Worker m: 0.5/n ||A_m x - b_m||^2 with its targets shifted by its own offset, so local optima differ."""
    g = torch.Generator().manual_seed(0)
    x_true = torch.randn(D, generator=g, dtype=torch.float64)
    problems = []
    for m in range(M):
        a = torch.randn(60, D, generator=g, dtype=torch.float64)
        shift = (m - 1.5) * 3.0 * torch.randn(D, generator=g, dtype=torch.float64)
        b = a @ (x_true + shift) + 0.1 * torch.randn(60, generator=g, dtype=torch.float64)
        problems.append((a, b))
    hess = sum(a.T @ a / a.shape[0] for a, _ in problems) / M
    rhs = sum(a.T @ b / a.shape[0] for a, b in problems) / M
    x_star = torch.linalg.solve(hess, rhs)

    def grads(x):
        x = x.double()
        return [(a.T @ (a @ x - b) / a.shape[0]).float() for a, b in problems]

    return grads, x_star, torch.linalg.eigvalsh(hess).max().item()


def _logistic():
    """Worker m: mean logistic loss on its own labels (drawn around a shifted model) + 0.5 lam ||x||^2."""
    g = torch.Generator().manual_seed(1)
    lam = 0.05
    problems = []
    for m in range(M):
        a = torch.randn(80, D, generator=g, dtype=torch.float64)
        w = torch.randn(D, generator=g, dtype=torch.float64) * (1 + m)
        y = (torch.rand(80, generator=g, dtype=torch.float64) < torch.sigmoid(a @ w)).double()
        problems.append((a, y))

    def grad64(x, a, y):
        return a.T @ (torch.sigmoid(a @ x) - y) / a.shape[0] + lam * x

    x_star = torch.zeros(D, dtype=torch.float64)
    for _ in range(30):  # Newton on the joint problem
        grad = sum(grad64(x_star, a, y) for a, y in problems) / M
        hess = sum(a.T @ (a * (torch.sigmoid(a @ x_star) * (1 - torch.sigmoid(a @ x_star)))[:, None]) / a.shape[0]
                   for a, y in problems) / M + lam * torch.eye(D, dtype=torch.float64)
        x_star = x_star - torch.linalg.solve(hess, grad)
    assert (sum(grad64(x_star, a, y) for a, y in problems) / M).norm() < 1e-12
    smooth = torch.linalg.eigvalsh(sum(a.T @ a / a.shape[0] for a, _ in problems) / M).max().item() / 4 + lam

    def grads(x):
        return [grad64(x.double(), a, y).float() for a, y in problems]

    return grads, x_star, smooth


def _run_gd(problem, make_worker, steps: int) -> float:
    """Plain GD with step 0.5 / L on the mean of the workers' compressed gradients; relative error to x*."""
    grads, x_star, smooth = problem
    workers = [make_worker() for _ in range(M)]
    x = torch.zeros(D)
    lr = 0.5 / smooth
    for step in range(steps):
        outs = simulate_round(workers, grads(x), key="g", shared_seed=step, private_seeds=[step * M + m for m in
                                                                                             range(M)])
        for o in outs[1:]:
            assert torch.equal(o, outs[0])  # every worker gets the same update
        x = x - lr * outs[0]
    return ((x.double() - x_star).norm() / x_star.norm()).item()


RATIO = 0.1
ALGORITHMS = {
    "none": lambda: Feedback(Identity()),
    "topk_ef21": lambda: DifferenceFeedback(TopK(RATIO), name="ef21"),
    "topk_nofeedback": lambda: Feedback(TopK(RATIO)),
}


@pytest.fixture(scope="module", params=["least_squares", "logistic"])
def problem(request):
    return _least_squares() if request.param == "least_squares" else _logistic()


@pytest.mark.parametrize("algorithm", ["none", "topk_ef21"])
def test_feedback_schemes_reach_the_uncompressed_optimum(problem, algorithm):
    err = _run_gd(problem, ALGORITHMS[algorithm], 1500)
    assert err < 1e-4, f"{algorithm}: relative error to x* {err:.2e}"


def test_topk_without_feedback_misses_the_optimum(problem):
    err = _run_gd(problem, ALGORITHMS["topk_nofeedback"], 1500)
    assert err > 1e-2, f"Top-K without error feedback got to {err:.2e} of x*: the test problem is too easy"


def test_classic_ef_is_a_different_scheme_from_ef21():
    """EF keeps an error buffer (x + e - D(C(x + e))), EF21 a reference; one round on the same input differs."""
    x = _x(100)
    ef, ef21 = ErrorFeedback(TopK(0.1)), DifferenceFeedback(TopK(0.1))
    ef.message("k", x)
    ef21.message("k", x)
    kept = TopK(0.1).decompress(TopK(0.1).compress(x), 100)
    assert torch.allclose(ef.states["k"]["error"], x - kept)
    assert torch.allclose(ef21.states["k"]["reference"], kept)


# ------------------------------------------------------------------------------------------------------------------
# 3-5. two processes, DDP on gloo: one spawn runs every case, each rank writes what it saw
# ------------------------------------------------------------------------------------------------------------------

WORLD = 2
IN, HIDDEN, OUT = 16, 64, 4
DDP_RATIO = 0.1
STEPS = 5
PS_START = 2


def _model() -> nn.Module:
    """Frozen first layer, trainable 64x64 (PowerSGD compresses it at rank 4) and 64x4 layers; 4420 trainable."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh(),
                          nn.Linear(HIDDEN, OUT))
    model[0].requires_grad_(False)
    return model


def _trainable(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def _digest(model: nn.Module) -> str:
    return hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in _trainable(model))).hexdigest()


def _batch(rank: int, step: int, fixed: bool = False):
    g = torch.Generator().manual_seed(1000 * rank + (0 if fixed else step))
    x = torch.randn(32, IN, generator=g)
    return x, torch.sin(x[:, :OUT] * 2) + rank * 0.3


def _train(ddp, opt, state, rank, steps, first_step=0, fixed=False, record=None):
    losses = []
    for step in range(first_step, first_step + steps):
        x, y = _batch(rank, step, fixed)
        loss = nn.functional.mse_loss(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if record is not None:
            record.append((state.steps, state.syncs, state.bytes_sent, _digest(ddp.module)))
    return losses


def _case_plain(rank, method, steps=STEPS, bucket_cap_mb=None, fixed=False, **options):
    model = _model()
    ddp = DDP(model) if bucket_cap_mb is None else DDP(model, bucket_cap_mb=bucket_cap_mb)
    opt = torch.optim.SGD(_trainable(model), lr=0.05)
    state = register_compression(ddp, CompressionConfig(method, compression_ratio=DDP_RATIO, **options), optimizer=opt)
    per_step: list = []
    buckets_first = None
    losses = []
    for i in range(steps):
        losses += _train(ddp, opt, state, rank, 1, first_step=i, fixed=fixed, record=per_step)
        if i == 0 and state.feedback is not None:
            buckets_first = sorted(map(str, state.feedback.states))
    state.synchronize()
    return {"digest": _digest(model), "summary": state.summary(), "per_step": per_step, "losses": losses,
            "numel": sum(p.numel() for p in _trainable(model)),
            "buckets_first": buckets_first,
            "buckets_last": sorted(map(str, state.feedback.states)) if state.feedback is not None else None}


def _make(rank, method, bucket_cap_mb=None, momentum=0.9, **options):
    model = _model()
    ddp = DDP(model) if bucket_cap_mb is None else DDP(model, bucket_cap_mb=bucket_cap_mb)
    opt = torch.optim.SGD(_trainable(model), lr=0.05, momentum=momentum)
    state = register_compression(ddp, CompressionConfig(method, compression_ratio=DDP_RATIO, **options), optimizer=opt)
    return model, ddp, opt, state


def _case_resume(rank, method, main_optimizer_only=False, **options):
    """6 uninterrupted steps vs 3 steps, checkpoint, fresh DDP + register + load, 3 more steps.

    ``main_optimizer_only``: every process loads rank 0's optimizer state, as accelerate's checkpoints give it; with
    local steps the compression state must restore each process's own moments."""
    model, ddp, opt, state = _make(rank, method, **options)
    _train(ddp, opt, state, rank, 6)
    state.synchronize()
    straight = {"digest": _digest(model), "summary": state.summary()}

    model, ddp, opt, state = _make(rank, method, **options)
    _train(ddp, opt, state, rank, 3)
    ckpt = {"params": [p.detach().clone() for p in _trainable(model)], "opt": copy.deepcopy(opt.state_dict()),
            "comp": state.state_dict()}
    ckpt = torch.load(_roundtrip(ckpt), weights_only=False)  # as a checkpoint file would give it back
    model, ddp, opt, state = _make(rank, method, **options)
    with torch.no_grad():
        for p, saved in zip(_trainable(model), ckpt["params"]):
            p.copy_(saved)
    if main_optimizer_only:
        main = [ckpt["opt"]]
        dist.broadcast_object_list(main, src=0)
        opt.load_state_dict(main[0])
    else:
        opt.load_state_dict(ckpt["opt"])
    state.load_state_dict(ckpt["comp"])
    roundtrip = _same(state.state_dict(), ckpt["comp"])  # saving right after loading keeps everything
    _train(ddp, opt, state, rank, 3, first_step=3)
    state.synchronize()
    return {"straight": straight, "resumed": {"digest": _digest(model), "summary": state.summary()},
            "roundtrip": roundtrip}


def _same(a: Any, b: Any) -> bool:
    """Deep equality of nested containers of tensors (bitwise for tensors)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _roundtrip(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


LOCAL_LR, LOCAL_H, LOCAL_STEPS = 0.1, 4, 400


def _similar_data():
    """Two workers' least squares: targets from the same model, each perturbed by 0.1 * noise (similar, not equal)."""
    g = torch.Generator().manual_seed(7)
    d, n = 20, 200
    x_true = torch.randn(d, generator=g)
    data = []
    for _ in range(WORLD):
        a = torch.randn(n, d, generator=g)
        b = a @ (x_true + 0.1 * torch.randn(d, generator=g)) + 0.1 * torch.randn(n, generator=g)
        data.append((a, b))
    return data


def _joint_loss(data, w: torch.Tensor) -> float:
    a_all = torch.cat([a for a, _ in data]).double()
    b_all = torch.cat([b for _, b in data]).double()
    return 0.5 * ((a_all @ w.double() - b_all) ** 2).mean().item()


def _case_local_convergence(rank):
    """Full-batch GD on linear least squares, two workers with similar data, H = 4, Top-K 25 % + EF21 deltas."""
    data = _similar_data()
    model = nn.Linear(data[0][0].shape[1], 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    ddp = DDP(model)
    opt = torch.optim.SGD(model.parameters(), lr=LOCAL_LR)
    config = CompressionConfig("topk", compression_ratio=0.25, error_feedback="ef21", local_steps=LOCAL_H)
    state = register_compression(ddp, config, optimizer=opt)
    a, b = data[rank]
    between = None
    for step in range(LOCAL_STEPS):
        loss = 0.5 * ((ddp(a)[:, 0] - b) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 1:
            between = _digest(model)
    state.synchronize()
    return {"digest": _digest(model), "w": model.weight.detach()[0].clone(), "between": between,
            "summary": state.summary()}


def _cases() -> dict[str, Any]:
    cases: dict[str, Any] = {}
    for method in METHODS:
        if method in ("bf16", "topk", "powersgd"):
            continue
        cases[method] = lambda r, m=method: _case_plain(r, m)
    for fb in ("ef", "ef21", "none"):
        cases[f"topk_{fb}"] = lambda r, fb=fb: _case_plain(r, "topk", error_feedback=fb)
    cases["powersgd"] = lambda r: _case_plain(r, "powersgd", powersgd_start_iter=PS_START)
    cases["buckets"] = lambda r: _case_plain(r, "topk", steps=30, bucket_cap_mb=0.001, fixed=True)
    cases["local_fixed"] = lambda r: _case_plain(r, "topk", steps=7, local_steps=3)
    cases["local_geometric"] = lambda r: _case_plain(r, "topk", steps=12, local_steps=3,
                                                     local_steps_schedule="geometric", seed=4)
    cases["resume_topk"] = lambda r: _case_resume(r, "topk")
    for method in ("topk", "randk", "int8"):  # randk/int8 draw from per-tensor seeds
        cases[f"resume_{method}_buckets"] = lambda r, m=method: _case_resume(r, m, bucket_cap_mb=0.001)
    cases["resume_local"] = lambda r: _case_resume(r, "topk", main_optimizer_only=True, local_steps=2)
    cases["local_convergence"] = _case_local_convergence
    return cases


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    return spawn_cases(tmp_path_factory.mktemp("ddp"), WORLD, _cases)


def _case(results, name):
    per_rank = [r[name] for r in results]
    for r in per_rank:
        assert "error" not in r, r.get("error")
    return per_rank


SIZES = (HIDDEN * HIDDEN, HIDDEN, HIDDEN * OUT, OUT)  # the trainable tensors, all in one DDP bucket
NUMEL = sum(SIZES)  # 4420


def _step_bytes(method: str) -> int:
    """What one process sends per step for the one-bucket model; p = 2, so the ring all_reduce (2(p-1)/p B) and
    all_gather ((p-1) B) both send exactly the payload. Selecting and scaling compressors work per tensor
    (``PerTensor``), so their payload is the sum over the bucket's tensors; casts are elementwise."""
    if method in ("none", "fp16", "bf16"):
        return _expected_bytes(method, NUMEL, DDP_RATIO)
    return sum(_expected_bytes(method, n, DDP_RATIO) for n in SIZES)


PLAIN_CASES = ["none", "fp16", "int8", "sign", "topk_ef", "topk_ef21", "topk_none", "randk", "gdsec", "powersgd"]


def test_every_method_is_covered():
    assert set(METHODS) - {"bf16"} == {c.split("_")[0] for c in PLAIN_CASES}


@pytest.mark.parametrize("name", PLAIN_CASES)
def test_ddp_replicas_identical_and_bytes_match_formula(ddp_results, name):
    r0, r1 = _case(ddp_results, name)
    assert r0["numel"] == NUMEL
    assert r0["digest"] == r1["digest"], f"{name}: replicas differ after {STEPS} steps"
    assert r0["losses"] != r1["losses"]  # the ranks did see different data
    start = _model()
    assert r0["digest"] != _digest(start)  # and training moved the weights
    method = name.split("_")[0]
    s = r0["summary"]
    assert r1["summary"] == s  # same settings, counters and bytes on both processes
    assert s["steps"] == s["syncs"] == STEPS
    assert s["bytes_uncompressed"] == STEPS * 4 * NUMEL
    if method == "powersgd":
        # before start_iter: a vanilla fp32 all-reduce; after: uncompressed small tensors + P + Q (rank 4), fp32
        plain = HIDDEN + HIDDEN * OUT + OUT  # 64x64's bias, the 64x4 layer (not worth compressing)
        p_q = HIDDEN * 4 + HIDDEN * 4
        expected = PS_START * 4 * NUMEL + (STEPS - PS_START) * 4 * (plain + p_q)
        assert s["bytes_sent"] == expected
        assert s["powersgd_start_iter"] == PS_START
    elif method == "gdsec":
        deltas = [b - a for (_, _, a, _), (_, _, b, _) in zip([(0, 0, 0, "")] + r0["per_step"], r0["per_step"])]
        head = 4 + 4 * len(SIZES)  # the exchanged total count, then one int32 count per tensor in the payload
        for delta in deltas:  # then 8 bytes per component of the largest message, none up to every one
            assert (delta - head) % 8 == 0 and head <= delta <= head + 8 * NUMEL, deltas
        assert deltas[0] == head + 8 * NUMEL  # the first step's model change is 0: every nonzero component
        assert min(deltas) < head + 8 * NUMEL  # later steps select
        assert r1["summary"]["bytes_sent"] == s["bytes_sent"]  # both pad to the same largest count
    else:
        assert s["bytes_sent"] == STEPS * _step_bytes(method), (s, _step_bytes(method))
    if name.startswith("topk"):
        assert s["error_feedback"] == name.split("_")[1]


def test_ddp_topk_feedback_variants_differ(ddp_results):
    """EF, EF21 and no feedback are really different updates (a flag that is ignored would make them equal)."""
    digests = {fb: _case(ddp_results, f"topk_{fb}")[0]["digest"] for fb in ("ef", "ef21", "none")}
    assert len(set(digests.values())) == 3


def test_ddp_several_buckets_rebuilt(ddp_results):
    r0, r1 = _case(ddp_results, "buckets")
    assert r0["digest"] == r1["digest"]
    assert len(r0["buckets_last"]) > 1, r0["buckets_last"]  # several buckets with their own feedback state
    assert r0["buckets_first"] != r0["buckets_last"]  # DDP rebuilt them after the first step
    s = r0["summary"]
    assert s["steps"] == 30 and s["bytes_uncompressed"] == 30 * 4 * NUMEL
    for r in (r0, r1):  # the same batch every step (SGD lr 0.05): Top-K 10 % + EF21 must keep lowering the loss
        losses = r["losses"]
        assert losses[-1] < 0.85 * losses[0], losses
        assert sum(b < a for a, b in zip(losses, losses[1:])) >= 25, losses


@pytest.mark.parametrize("name", ["local_fixed", "local_geometric"])
def test_ddp_local_steps(ddp_results, name):
    r0, r1 = _case(ddp_results, name)
    assert r0["digest"] == r1["digest"]  # after synchronize()
    steps = len(r0["per_step"])
    s = r0["summary"]
    assert s["steps"] == steps and s["local_steps"] == 3
    assert s["bytes_uncompressed"] == steps * 4 * NUMEL
    payload = _step_bytes("topk")
    prev_syncs, prev_bytes = 0, 0
    sync_steps = []
    for (step, syncs, sent, _), (_, _, _, other) in zip(r0["per_step"], r1["per_step"]):
        assert sent - prev_bytes == (syncs - prev_syncs) * payload  # bytes only at synchronisations
        if syncs > prev_syncs:
            sync_steps.append(step)
        prev_syncs, prev_bytes = syncs, sent
    assert s["bytes_sent"] == s["syncs"] * payload
    # between synchronisations the replicas train on their own data and differ
    local = [a[3] != b[3] for a, b, prev in zip(r0["per_step"], r1["per_step"], [(0, 0)] + r0["per_step"])
             if a[1] == prev[1]]
    assert local and all(local)
    if name == "local_fixed":
        assert sync_steps == [3, 6] and s["syncs"] == 3  # 7 steps: at 3 and 6, then synchronize() for the 7th
    else:
        assert s["local_steps_schedule"] == "geometric"
        gaps = [b - a for a, b in zip([0] + sync_steps, sync_steps)]
        assert len(sync_steps) >= 2 and gaps != [3] * len(gaps), gaps  # random intervals, not every 3rd step


@pytest.mark.parametrize("name", ["resume_topk", "resume_local"])
def test_ddp_resume_bit_identical(ddp_results, name):
    for r in _case(ddp_results, name):
        assert r["roundtrip"]
        assert r["resumed"]["digest"] == r["straight"]["digest"]
        assert r["resumed"]["summary"] == r["straight"]["summary"]


@pytest.mark.parametrize("method", ["topk", "randk", "int8"])
def test_ddp_resume_with_rebuilt_buckets(ddp_results, method):
    """Several buckets: the fresh DDP model of a resumed run starts from DDP's initial bucket layout again and rebuilds
    it after its first step, so its buckets group parameters differently from the uninterrupted run's at that step.
    Compression is per parameter (feedback state, selection, and the seeds of Rand-K's coordinates and int8's
    rounding, derived from the parameter's name), so the resumed run is still bit-identical to the uninterrupted one."""
    for r in _case(ddp_results, f"resume_{method}_buckets"):
        assert r["roundtrip"]
        assert r["resumed"]["digest"] == r["straight"]["digest"]
        assert r["resumed"]["summary"] == r["straight"]["summary"]


def _local_gd_uncompressed(data) -> torch.Tensor:
    """The same local GD (H steps per worker, then the plain average), without compression, in this process."""
    ref = torch.zeros(data[0][0].shape[1])
    xs = [ref.clone() for _ in data]
    for step in range(LOCAL_STEPS):
        xs = [x - LOCAL_LR * a.T @ (a @ x - b) / a.shape[0] for x, (a, b) in zip(xs, data)]
        if (step + 1) % LOCAL_H == 0:
            ref = sum(xs) / len(xs)
            xs = [ref.clone() for _ in data]
    return ref


def test_ddp_local_steps_converge_under_data_similarity(ddp_results):
    r0, r1 = _case(ddp_results, "local_convergence")
    assert r0["digest"] == r1["digest"]  # after synchronize()
    assert r0["between"] != r1["between"]  # local steps really are local
    assert r0["summary"]["syncs"] == LOCAL_STEPS // LOCAL_H
    data = _similar_data()
    a_all = torch.cat([a for a, _ in data]).double()
    b_all = torch.cat([b for _, b in data]).double()
    f_star = _joint_loss(data, torch.linalg.lstsq(a_all, b_all[:, None]).solution[:, 0])
    f0 = _joint_loss(data, torch.zeros(a_all.shape[1]))
    f = _joint_loss(data, r0["w"])
    f_local = _joint_loss(data, _local_gd_uncompressed(data))
    # Local GD's fixed point is off x* by the client drift (O(lr^2 H^2) times the workers' dissimilarity): here
    # (f_local - f*) / f* = 9.0e-4 without any compression, against f0 / f* ~ 190 at the start. The compressed
    # deltas with EF21 must reach that same point (1e-5 relative: float32 arithmetic), hence within 2e-3 of f*.
    assert f0 / f_star > 100
    assert abs(f - f_local) / f_star < 1e-5, (f, f_local, f_star)
    assert 0 <= (f - f_star) / f_star < 2e-3, (f, f_star)


# ------------------------------------------------------------------------------------------------------------------
# 6. bad options: a 1-process gloo group in this process
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single_group(tmp_path_factory):
    store = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _ddp1() -> tuple[DDP, torch.optim.Optimizer]:
    model = _model()
    return DDP(model), torch.optim.SGD(_trainable(model), lr=0.1)


@pytest.mark.parametrize("method", ["topk", "randk", "gdsec"])
@pytest.mark.parametrize("ratio", [0, -0.1, 1.5])
def test_bad_ratio(single_group, method, ratio):
    ddp, _ = _ddp1()
    with pytest.raises(ValueError, match=r"compression_ratio.*" + str(ratio).replace(".", r"\.")):
        register_compression(ddp, CompressionConfig(method, compression_ratio=ratio))


def test_ratio_default_and_unused_ratio_warned(single_group):
    """Only topk/randk select a fraction of coordinates: the default is 0.01 for them, and a ratio passed to a
    method that sends everything is said to be unused instead of being silently ignored (a UserWarning: shown once
    per process and call site, like every notice of the library)."""
    ddp, _ = _ddp1()
    assert register_compression(ddp, CompressionConfig("randk")).options["compression_ratio"] == 0.01
    with pytest.warns(UserWarning, match="compression_ratio=0.05 is not used by int8"):
        state = register_compression(_ddp1()[0], CompressionConfig("int8", compression_ratio=0.05))
    assert "compression_ratio" not in state.options
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        register_compression(_ddp1()[0], CompressionConfig("fp16"))
        register_compression(_ddp1()[0], CompressionConfig("topk", compression_ratio=0.05))
    assert not [w for w in caught if "is not used" in str(w.message)]


def test_unknown_method_lists_choices(single_group):
    ddp, _ = _ddp1()
    with pytest.raises(ValueError) as info:
        register_compression(ddp, CompressionConfig("top-k"))
    assert "'top-k'" in str(info.value)
    for m in METHODS:
        assert m in str(info.value)


def test_bf16_on_gloo_refused(single_group):
    ddp, _ = _ddp1()
    with pytest.raises(ValueError, match="gloo"):
        register_compression(ddp, CompressionConfig("bf16"))


def test_non_ddp_model(single_group):
    with pytest.raises(TypeError, match="DistributedDataParallel.*Sequential"):
        register_compression(_model(), CompressionConfig("topk"))
    with pytest.raises(TypeError, match="DataParallel"):
        register_compression(nn.DataParallel(_model()), CompressionConfig("topk"))
    with pytest.raises(TypeError, match=r"takes a CompressionConfig, got str.*CompressionConfig\(method='topk'"):
        register_compression(_ddp1()[0], "topk")


def test_local_steps_options(single_group):
    ddp, opt = _ddp1()
    with pytest.raises(ValueError, match="optimizer"):
        register_compression(ddp, CompressionConfig("topk", local_steps=3))
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match=r"local_steps.*" + str(bad).replace(".", r"\.")):
            CompressionConfig("topk", local_steps=bad)
    with pytest.raises(ValueError, match="local_steps_schedule.*'poisson'"):
        CompressionConfig("topk", local_steps=3, local_steps_schedule="poisson")
    with pytest.raises(ValueError, match="powersgd.*local_steps"):
        CompressionConfig("powersgd", local_steps=3)


def test_bad_error_feedback(single_group):
    ddp, _ = _ddp1()
    with pytest.raises(ValueError, match="gdsec.*'ef'"):
        register_compression(ddp, CompressionConfig("gdsec", error_feedback="ef"))
    with pytest.raises(ValueError, match="'ef22'.*ef21"):
        register_compression(ddp, CompressionConfig("topk", error_feedback="ef22"))
    with pytest.raises(ValueError, match="powersgd.*'ef'"):
        register_compression(ddp, CompressionConfig("powersgd", error_feedback="ef21"))


def test_register_twice(single_group):
    ddp, opt = _ddp1()
    register_compression(ddp, CompressionConfig("topk", local_steps=2), optimizer=opt)
    hooks = len(opt._optimizer_step_post_hooks)
    with pytest.raises(RuntimeError, match="once"):
        register_compression(ddp, CompressionConfig("topk", local_steps=2), optimizer=opt)
    # the refused registration must not leave its local-step averaging hooked on the optimizer
    assert len(opt._optimizer_step_post_hooks) == hooks


def test_checkpointed_state_of_another_world_size_loads_and_another_method_is_refused(single_group):
    """A state written by 2 processes loads into 1 (each per-process state averaged, tests/test_two_stage.py checks
    what that keeps); another method's state is refused."""
    ddp, opt = _ddp1()
    state = register_compression(ddp, CompressionConfig("topk", local_steps=2), optimizer=opt)
    _train(ddp, opt, state, 0, 3)
    saved = state.state_dict()
    two = dict(saved, world_size=2, ranks=[copy.deepcopy(saved["ranks"][0]) for _ in range(2)])  # two processes
    for piece in two["ranks"][1]["feedback"].values():  # the local-step delta's error, per parameter
        piece["error"] = piece["error"] + 2.0
    state.load_state_dict(two)
    merged = state.state_dict()["ranks"][0]
    for name, piece in saved["ranks"][0]["feedback"].items():
        assert torch.allclose(merged["feedback"][name]["error"], piece["error"] + 1.0)
    assert torch.equal(merged["local"]["reference"], saved["ranks"][0]["local"]["reference"])
    with pytest.raises(ValueError, match="is for method='randk', compress='updates', error_feedback='ef' and this "
                                         "run has method='topk'"):
        state.load_state_dict(dict(saved, method="randk"))
    state.load_state_dict(saved)  # the matching one loads


def test_per_tensor_gives_every_tensor_its_share():
    """A bucket mixing a large-gradient head with a small-gradient adapter (the GLUE smoke task: ~200x): one Top-K
    over the bucket would send only the head; per tensor each gets ceil(ratio * n_i) and its own int8 scales."""
    from gsoft.distributed.compressors import PerTensor

    sizes = [300, 1000, 7]
    x = torch.randn(sum(sizes), generator=torch.Generator().manual_seed(0))
    x[:300] *= 200.0  # the "head"
    for base in (TopK(0.05), Int8(64), Sign(64), RandK(0.05)):
        c = PerTensor(base, sizes)
        payload = c.compress(x, shared_seed=1, private_seed=2)
        assert [(t.dtype, t.numel()) for t in payload] == list(c.layout(x.numel()))
        assert c.payload_bytes(x.numel()) == sum(base.payload_bytes(n) for n in sizes)
        y = c.decompress(payload, x.numel(), shared_seed=1)
        small = torch.split(y, sizes)[1]
        assert (small != 0).any(), base.name  # the small tensor is not drowned by the large one
        if isinstance(base, TopK):
            assert [int((p != 0).sum()) for p in torch.split(y, sizes)] == [_k(n, 0.05) for n in sizes]
    glob = TopK(0.05)
    y = glob.decompress(glob.compress(x), x.numel())
    assert not torch.split(y, sizes)[1].any()  # what per-tensor selection fixes
    sig = PerTensor(Significant(cutoff=0.0), sizes)  # one count per tensor in front
    payload = sig.compress(x)
    assert payload[0].tolist() == [int(n) for n in payload[0]] and len(payload[0]) == len(sizes)
    assert torch.split(sig.decompress(payload, x.numel()), sizes)[1].any()


def test_per_tensor_seeds_follow_tensor_ids_not_grouping():
    """What a tensor draws (Rand-K's coordinates, int8's stochastic rounding) depends on the round's seed and the
    tensor's id, not on which other tensors share its bucket or where it sits: DDP regroups parameters after its
    first step and again after a resume. Without ids the seeds follow positions, and regrouping changes them."""
    from gsoft.distributed.compressors import PerTensor

    sizes, ids = [500, 40, 300], [11, 7, 3]
    x = torch.randn(sum(sizes), generator=torch.Generator().manual_seed(0))
    parts = torch.split(x, sizes)
    for base in (RandK(0.05), Int8(64)):
        together = PerTensor(base, sizes, ids)
        y = together.decompress(together.compress(x, shared_seed=5, private_seed=9), x.numel(), shared_seed=5)
        # regrouped: the last tensor alone in one bucket, the first two (reversed) in another
        alone = PerTensor(base, sizes[2:], ids[2:])
        pair = PerTensor(base, [sizes[1], sizes[0]], [ids[1], ids[0]])
        x_pair = torch.cat([parts[1], parts[0]])
        y_alone = alone.decompress(alone.compress(parts[2], shared_seed=5, private_seed=9), sizes[2], shared_seed=5)
        y_pair = pair.decompress(pair.compress(x_pair, shared_seed=5, private_seed=9), x_pair.numel(), shared_seed=5)
        out = torch.split(y, sizes)
        assert torch.equal(out[2], y_alone), base.name
        assert torch.equal(out[0], y_pair[sizes[1]:]) and torch.equal(out[1], y_pair[:sizes[1]]), base.name
        by_position = PerTensor(base, sizes[2:])  # no ids: seeds from positions
        y_pos = by_position.decompress(by_position.compress(parts[2], shared_seed=5, private_seed=9), sizes[2],
                                       shared_seed=5)
        assert not torch.equal(y_pos, y_alone), base.name
    with pytest.raises(ValueError, match="2 tensor ids for 3 tensors"):
        PerTensor(TopK(0.1), sizes, [1, 2])


def test_compress_target_defaults_and_errors():
    """Local steps can only average updates; one step defaults to gradients; auto feedback follows the target."""
    assert resolve_compress(None, 1) == "gradients"
    assert resolve_compress(None, 4) == "updates"
    assert resolve_compress("updates", 1) == "updates"
    with pytest.raises(ValueError, match="local_steps=4 averages parameter updates"):
        resolve_compress("gradients", 4)
    with pytest.raises(ValueError, match="unknown compress 'weights'"):
        resolve_compress("weights", 1)
    # never plain EF21 on (stochastic) gradients: auto is EF for both targets
    assert resolve_error_feedback("topk", "auto", "gradients") == "ef"
    assert resolve_error_feedback("sign", "auto", "gradients") == "ef"
    assert resolve_error_feedback("topk", "auto", "updates") == "ef"
    assert resolve_error_feedback("topk", "ef21", "gradients") == "ef21"
    assert resolve_error_feedback("int8", "auto", "updates") == "none"


def test_config_checks_every_option_when_made():
    """CompressionConfig checks every option when it is made, with the compressors' and schemes' own rules, before any
    process group exists; its resolved settings are what results report."""
    with pytest.raises(ValueError, match=r"compression_ratio must be in \(0, 1\].*got 1\.5"):
        CompressionConfig("int8", compression_ratio=1.5)  # out of range even where it is unused
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1.*got 0"):
        CompressionConfig("sign", chunk_size=0)
    with pytest.raises(ValueError, match=r"gdsec threshold must be a finite number >= 0.*got -1"):
        CompressionConfig("gdsec", threshold=-1)
    with pytest.raises(ValueError, match="gdsec compresses gradient differences.*cannot compress updates"):
        CompressionConfig("gdsec", local_steps=2)
    with pytest.raises(ValueError, match=r"beta must be in \(0, 1\], got 0"):
        CompressionConfig("gdsec", beta=0)
    with pytest.raises(ValueError, match="powersgd_rank must be an integer >= 1, got 0"):
        CompressionConfig("powersgd", powersgd_rank=0)
    with pytest.raises(ValueError, match="unknown compress 'weights'; choose one of gradients, updates"):
        CompressionConfig("topk", compress="weights")
    config = CompressionConfig("gdsec", compression_ratio=0.2, threshold=0.5, beta=0.5)
    assert (config.target, config.feedback, config.ratio) == ("gradients", "gdsec", None)
    assert config.options() == {"compress": "gradients", "error_feedback": "gdsec", "local_steps": 1, "seed": 0,
                                "beta": 0.5, "threshold": 0.5}
    assert CompressionConfig("powersgd", powersgd_start_iter=1).options()["powersgd_start_iter"] == 2
    assert CompressionConfig("powersgd", error_feedback="none", powersgd_start_iter=1).start_iter == 1
    assert CompressionConfig("int8").options()["chunk_size"] == 1024 and CompressionConfig("int8").ratio is None


def _ddp_adamw() -> tuple[DDP, torch.optim.Optimizer]:
    model = _model()
    return DDP(model), torch.optim.AdamW(_trainable(model), lr=1e-3)


def test_adam_with_biased_compressor_defaults_to_updates_with_ef(single_group, monkeypatch):
    """compress unset + AdamW + a biased compressor: the updates are compressed with EF, said once per process."""
    from gsoft.distributed import hooks

    monkeypatch.setattr(hooks, "_ANNOUNCED", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ddp, opt = _ddp_adamw()
        state = register_compression(ddp, CompressionConfig("topk"), optimizer=opt)
        register_compression(_ddp_adamw()[0], CompressionConfig("topk"), optimizer=_ddp_adamw()[1])
    notices = [w for w in caught if "compressing the optimizer's updates" in str(w.message)]
    assert len(notices) == 1 and "compress='updates', error_feedback='ef'" in str(notices[0].message)
    assert not [w for w in caught if "compressed gradients under" in str(w.message)]
    assert state.options["compress"] == "updates" and state.options["error_feedback"] == "ef"
    assert state.local is not None and state.summary()["compress"] == "updates"


def test_gdsec_under_adamw_warns_that_its_threshold_is_gradient_descents(single_group):
    ddp, opt = _ddp_adamw()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        register_compression(ddp, CompressionConfig("gdsec", threshold=0.5), optimizer=opt)
    messages = [str(w.message) for w in caught if "gdsec under AdamW" in str(w.message)]
    assert len(messages) == 1 and "threshold=0.5 can drop nearly everything" in messages[0]
    assert "--gdsec_threshold" in messages[0]
    assert not [w for w in caught if "compressed gradients under" in str(w.message)]  # not the generic advice
    ddp, opt = _ddp1()  # SGD: GD-SEC's own setting, nothing to say
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        register_compression(ddp, CompressionConfig("gdsec"), optimizer=opt)
    assert not [w for w in caught if "gdsec under" in str(w.message)]


def test_sgd_or_explicit_gradients_keep_gradients(single_group, monkeypatch):
    """SGD keeps the gradient hook (with EF under auto); an explicit compress='gradients' under AdamW is kept, with
    its warning; unbiased compressors under AdamW stay on gradients."""
    from gsoft.distributed import hooks

    monkeypatch.setattr(hooks, "_ANNOUNCED", set())
    ddp, opt = _ddp1()
    state = register_compression(ddp, CompressionConfig("topk"), optimizer=opt)
    assert state.options["compress"] == "gradients" and state.options["error_feedback"] == "ef"
    assert state.local is None
    ddp, opt = _ddp_adamw()
    with pytest.warns(UserWarning, match="topk-compressed gradients under AdamW"):
        state = register_compression(ddp, CompressionConfig("topk", compress="gradients"), optimizer=opt)
    assert state.options["compress"] == "gradients" and state.local is None
    ddp, opt = _ddp_adamw()
    assert register_compression(ddp, CompressionConfig("int8"), optimizer=opt).options["compress"] == "gradients"
    assert not hooks._ANNOUNCED
    config = CompressionConfig("sign")
    assert config.for_optimizer(_ddp_adamw()[1]).target == "updates" and config.target == "gradients"
    assert config.for_optimizer(None) is config


def test_summable_payload_is_divided_before_the_sum():
    """fp16 all-reduce at p = 4 of values near fp16's maximum: dividing first keeps the sum (the mean) finite."""
    from gsoft.distributed.transport import divided_for_sum

    payloads = [torch.full((8,), 60000.0).to(torch.float16) for _ in range(4)]
    assert torch.isinf(sum(payloads)).all()  # what summing first would give
    mean = sum(divided_for_sum(t, 4)[0] for t in payloads)
    assert mean.dtype == torch.float16 and torch.isfinite(mean).all() and torch.equal(mean, payloads[0])
    assert torch.equal(payloads[0], torch.full((8,), 60000.0).to(torch.float16))  # the payload itself is untouched


def test_randk_indices_on_the_tensors_device_and_shared():
    x = torch.randn(1000)
    a, b = RandK(0.1), RandK(0.1)  # two processes' compressors
    index = a.indices(x.numel(), 7, x.device)
    assert index.device == x.device and torch.equal(index, b.indices(x.numel(), 7, x.device))
    assert not torch.equal(index, a.indices(x.numel(), 8, x.device))


@pytest.mark.parametrize("method,world,collective,warned", [
    ("int8", 2, "allgather", False), ("int8", 8, "allgather", True), ("sign", 48, "allgather", False),
    ("sign", 80, "allgather", True), ("topk", 16, "allgather", False), ("randk", 200, "allreduce", False),
    ("int8", 8, "two_stage", False)])
def test_allgather_costlier_than_fp32_allreduce_is_warned(method, world, collective, warned):
    """All-gather sends (p - 1) x payload per process, an fp32 all-reduce 2 (p - 1) / p x 4 n: warned past 8 n / p;
    the two-stage collective sends under twice the payload and is not warned about."""
    from gsoft.distributed import CompressionState, build_feedback
    from gsoft.distributed.hooks import _warn_if_allgather_exceeds_allreduce

    state = CompressionState(method=method, options={"collective": collective}, world_size=world, rank=0)
    state.feedback = build_feedback("none", build_compressor(method, chunk_size=1024))
    state._trained = [torch.zeros(4096), torch.zeros(100)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _warn_if_allgather_exceeds_allreduce(state, method)
    messages = [str(w.message) for w in caught if "exchanged by all_gather" in str(w.message)]
    assert bool(messages) == warned, messages
    if warned:
        assert f"p = {world} processes sends (p - 1) x its payload" in messages[0] and "8 n / p" in messages[0]
