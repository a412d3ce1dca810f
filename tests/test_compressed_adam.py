"""Compression under Adam: the momentum mode (1-bit Adam) and compressed updates with error reset (CSER).

One 2-process gloo spawn runs every DDP case (each rank writes what it saw); the tests compare the ranks with each
other and with in-process references of the same mathematics.
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Any

import pytest
import torch
import torch.distributed as dist
from conftest import frozen_base_mlp, spawn_cases, trainable
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from gsoft.distributed import CompressionConfig, register_compression
from gsoft.distributed.momentum import CompressedMomentum
from gsoft.distributed.partial_sync import PartialSync
from gsoft.distributed.transport import allreduce_wire_bytes

WORLD = 2
IN, HIDDEN, OUT = 8, 32, 2
LR = 0.01
WARMUP = 3
STEPS = 8


def _model() -> nn.Module:
    return frozen_base_mlp(IN, HIDDEN, OUT)



def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in trainable(model)]).clone()


def _digest(model: nn.Module) -> str:
    return hashlib.sha256(_flat(model).numpy().tobytes()).hexdigest()


def _batch(rank: int, step: int):
    g = torch.Generator().manual_seed(100 * rank + step)
    x = torch.randn(16, IN, generator=g)
    return x, torch.sin(2 * x[:, :OUT]) + 0.5 * rank


def _loss(model: nn.Module, rank: int, step: int) -> torch.Tensor:
    x, y = _batch(rank, step)
    return nn.functional.mse_loss(model(x), y)


def _adamw(params) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=LR, weight_decay=0.01)


# ---- the DDP cases ------------------------------------------------------------------------------------------------

def _case_momentum(rank: int, method: str) -> dict[str, Any]:
    model = _model()
    ddp = DDP(model)
    opt = _adamw(trainable(model))
    state = register_compression(ddp, CompressionConfig(method, compression_ratio=0.1, compress="momentum",
                                                        momentum_warmup_steps=WARMUP), optimizer=opt)
    digests, bytes_per_step, variance = [], [], []
    for step in range(STEPS):
        before = state.bytes_sent
        opt.zero_grad()
        _loss(ddp, rank, step).backward()
        opt.step()
        bytes_per_step.append(state.bytes_sent - before)
        digests.append(_digest(model))
        variance.append(opt.state[trainable(model)[0]]["exp_avg_sq"].clone())
    return {"digests": digests, "bytes": bytes_per_step, "variance": variance, "params": _flat(model),
            "summary": state.summary(), "numel": _flat(model).numel(),
            "variance_steps": {opt.state[p].get("variance_step") for p in trainable(model)}}


def _case_cser(rank: int) -> dict[str, Any]:
    """Top-K 10 % updates with a reset every 4 steps; what the replicas are after every step."""
    model = _model()
    ddp = DDP(model)
    opt = _adamw(trainable(model))
    stepped: list[torch.Tensor] = []  # after each AdamW step, before the round (hooks run in registration order)
    opt.register_step_post_hook(lambda *_: stepped.append(_flat(model)))
    state = register_compression(ddp, CompressionConfig("topk", compression_ratio=0.1, compress="updates",
                                                        reset_steps=4), optimizer=opt)
    replicas, bytes_per_step = [], []
    for step in range(STEPS + 1):
        before = state.bytes_sent
        opt.zero_grad()
        _loss(ddp, rank, step).backward()
        opt.step()
        replicas.append(_flat(model))
        bytes_per_step.append(state.bytes_sent - before)
    state.synchronize()  # a pending reset: one model everywhere
    return {"replicas": replicas, "stepped": stepped, "bytes": bytes_per_step, "final": _digest(model),
            "reference": state.local.reference.clone(), "summary": state.summary(),
            "local": type(state.local).__name__}


def _case_updates_default(rank: int) -> dict[str, Any]:
    """compress left unset, Top-K under AdamW: compressed updates restarting from the average (no resets), said
    once."""
    model = _model()
    ddp = DDP(model)
    opt = _adamw(trainable(model))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = register_compression(ddp, CompressionConfig("topk", compression_ratio=0.01), optimizer=opt)
    return {"local": type(state.local).__name__, "options": state.options,
            "said": [str(w.message) for w in caught if "compress unset" in str(w.message)]}


def _train(ddp, opt, rank: int, steps: range, scheduler=None) -> None:
    for step in steps:
        opt.zero_grad()
        _loss(ddp, rank, step).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def _case_resume(rank: int, **options) -> dict[str, Any]:
    """8 uninterrupted steps against 5 steps, a checkpoint (rank 0's optimizer state, as accelerate saves it), a
    fresh DDP model, and 3 more steps: the same bits."""
    config = CompressionConfig("topk", compression_ratio=0.1, **options)

    def make():
        model = _model()
        ddp = DDP(model)
        opt = _adamw(trainable(model))
        state = register_compression(ddp, config, optimizer=opt)
        # a learning rate that changes every step: a mode that kept the groups of before a load would use stale ones
        return model, ddp, opt, state, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))

    model, ddp, opt, state, sched = make()
    _train(ddp, opt, rank, range(5), sched)
    state.synchronize()  # what a save point does
    _train(ddp, opt, rank, range(5, STEPS), sched)
    state.synchronize()
    straight = _digest(model)

    model, ddp, opt, state, sched = make()
    _train(ddp, opt, rank, range(5), sched)
    state.synchronize()  # a save point
    saved = {"params": _flat(model), "opt": [opt.state_dict()], "sched": sched.state_dict(),
             "comp": state.state_dict()}
    dist.broadcast_object_list(saved["opt"], src=0)
    model, ddp, opt, state, sched = make()
    with torch.no_grad():
        offset = 0
        for p in trainable(model):
            p.copy_(saved["params"][offset: offset + p.numel()].view_as(p))
            offset += p.numel()
    opt.load_state_dict(saved["opt"][0])
    sched.load_state_dict(saved["sched"])
    state.load_state_dict(saved["comp"])
    _train(ddp, opt, rank, range(5, STEPS), sched)
    state.synchronize()
    return {"straight": straight, "resumed": _digest(model)}


def _cases() -> dict[str, Any]:
    return {"momentum_none": lambda r: _case_momentum(r, "none"),
            "momentum_topk": lambda r: _case_momentum(r, "topk"),
            "momentum_sign": lambda r: _case_momentum(r, "sign"),
            "cser": _case_cser,
            "updates_default": _case_updates_default,
            "resume_momentum": lambda r: _case_resume(r, compress="momentum", momentum_warmup_steps=WARMUP),
            "resume_cser": lambda r: _case_resume(r, compress="updates", reset_steps=3)}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return spawn_cases(tmp_path_factory.mktemp("adam"), WORLD, _cases)


def _case(results, name) -> list[dict[str, Any]]:
    per_rank = [r[name] for r in results]
    for r in per_rank:
        assert "error" not in r, r.get("error")
    return per_rank


# ---- momentum mode --------------------------------------------------------------------------------------------------

def _reference_momentum() -> torch.Tensor:
    """1-bit Adam without compression, in one process: AdamW on the mean gradient for WARMUP steps, then the mean
    momentum with the second moment (and its bias correction) frozen."""
    models = [_model() for _ in range(WORLD)]
    params = trainable(models[0])
    opt = _adamw(params)
    beta1, beta2 = opt.param_groups[0]["betas"]
    for step in range(STEPS):
        grads = []
        for rank, model in enumerate(models):
            with torch.no_grad():
                for p, q in zip(trainable(model), params):
                    p.copy_(q)
            model.zero_grad()
            _loss(model, rank, step).backward()
            grads.append([p.grad.clone() for p in trainable(model)])
        mean = [sum(g[i] for g in grads) / WORLD for i in range(len(params))]
        if step < WARMUP:
            for p, g in zip(params, mean):
                p.grad = g
            opt.step()
            continue
        with torch.no_grad():
            for p, g in zip(params, mean):
                s = opt.state[p]
                s["exp_avg"].lerp_(g, 1 - beta1)
                s["step"] += 1
                p.mul_(1 - LR * 0.01)
                denom = (s["exp_avg_sq"] / (1 - beta2 ** WARMUP)).sqrt() + opt.param_groups[0]["eps"]
                p.addcdiv_(s["exp_avg"], denom, value=-LR / (1 - beta1 ** float(s["step"])))
    return torch.cat([p.detach().reshape(-1) for p in params])


def test_momentum_without_compression_is_adam_with_a_frozen_variance(results):
    ranks = _case(results, "momentum_none")
    assert torch.allclose(ranks[0]["params"], _reference_momentum(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", ["none", "topk", "sign"])
def test_momentum_replicas_identical_and_variance_frozen_after_warmup(results, method):
    ranks = _case(results, f"momentum_{method}")
    assert ranks[0]["digests"] == ranks[1]["digests"]
    variance = ranks[0]["variance"]
    assert not torch.equal(variance[WARMUP - 2], variance[WARMUP - 1])  # it moves during the warm-up
    for later in variance[WARMUP:]:
        assert torch.equal(later, variance[WARMUP - 1])  # and never again
    assert ranks[0]["variance_steps"] == {float(WARMUP)}  # its bias correction stops at Adam's step count then


def test_momentum_bytes_dense_warmup_then_compressed(results):
    from gsoft.distributed.compressors import PerTensor, build_compressor

    ranks = _case(results, "momentum_topk")
    numel = ranks[0]["numel"]
    sizes = [HIDDEN * OUT, OUT]
    dense = allreduce_wire_bytes(4 * numel, WORLD)
    payload = PerTensor(build_compressor("topk", compression_ratio=0.1), sizes).payload_bytes(numel)
    assert ranks[0]["bytes"] == [dense] * WARMUP + [payload] * (STEPS - WARMUP)  # p = 2: all_gather sends it once
    summary = ranks[0]["summary"]
    assert summary["compress"] == "momentum" and summary["momentum_warmup_steps"] == WARMUP
    assert summary["steps"] == STEPS and summary["bytes_uncompressed"] == STEPS * dense


def test_momentum_compression_error_stays_bounded(results):
    """Top-K 10 % of the momentum with error feedback ends near the uncompressed run (8 steps, same data)."""
    exact = _case(results, "momentum_none")[0]["params"]
    for method in ("topk", "sign"):
        got = _case(results, f"momentum_{method}")[0]["params"]
        moved = (exact - _flat(_model())).norm()
        assert (got - exact).norm() < 0.5 * moved, method


# ---- compressed updates with error reset (CSER) ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["resume_momentum", "resume_cser"])
def test_resume_is_bit_identical(results, name):
    """The momentum mode's error buffers and CSER's reset counter come back from a checkpoint: the resumed run ends
    where the uninterrupted one does, on every process."""
    ranks = _case(results, name)
    assert ranks[0]["straight"] == ranks[0]["resumed"] == ranks[1]["resumed"]


def test_cser_replicas_differ_between_resets_and_agree_at_them(results):
    ranks = _case(results, "cser")
    assert ranks[0]["local"] == "PartialSync"
    for step in range(STEPS + 1):
        same = torch.equal(ranks[0]["replicas"][step], ranks[1]["replicas"][step])
        assert same == ((step + 1) % 4 == 0), step  # reset after steps 4 and 8
    assert ranks[0]["final"] == ranks[1]["final"]
    assert torch.equal(ranks[0]["reference"], ranks[1]["reference"])


def test_cser_reset_makes_every_replica_their_mean(results):
    """Between resets each replica is the reference plus its own unsent residual; the reset averages the residuals
    (fp16), so every process restarts from the mean of the replicas."""
    ranks = _case(results, "cser")
    mean_last = (ranks[0]["replicas"][STEPS] + ranks[1]["replicas"][STEPS]) / 2  # step 9: no reset yet
    assert not torch.equal(ranks[0]["replicas"][STEPS], ranks[1]["replicas"][STEPS])
    assert torch.allclose(ranks[0]["reference"], mean_last, atol=1e-4)  # synchronize() reset them


def test_cser_rounds_keep_the_mean_of_the_replicas(results):
    """A round swaps each replica's sent part for the mean of what was sent, so the mean of the replicas is what it
    was after the AdamW steps: compression delays the averaging, it loses nothing. A reset makes every replica that
    mean (fp16 residuals)."""
    ranks = _case(results, "cser")
    for step in range(STEPS + 1):
        stepped = (ranks[0]["stepped"][step] + ranks[1]["stepped"][step]) / 2
        after = [r["replicas"][step] for r in ranks]
        if (step + 1) % 4:
            assert torch.allclose((after[0] + after[1]) / 2, stepped, atol=1e-6), step
        else:
            assert torch.allclose(after[0], stepped, atol=1e-4), step


def test_cser_bytes_rounds_plus_fp16_resets(results):
    from gsoft.distributed.compressors import PerTensor, build_compressor

    ranks = _case(results, "cser")
    numel = HIDDEN * OUT + OUT
    payload = PerTensor(build_compressor("topk", compression_ratio=0.1), [HIDDEN * OUT, OUT]).payload_bytes(numel)
    reset = allreduce_wire_bytes(2 * numel, WORLD)
    expected = [payload + (reset if (step + 1) % 4 == 0 else 0) for step in range(STEPS + 1)]
    assert ranks[0]["bytes"] == expected
    assert ranks[0]["summary"]["reset_steps"] == 4


def test_updates_without_resets_is_the_default_for_topk_under_adamw(results):
    ranks = _case(results, "updates_default")
    assert ranks[0]["local"] == "LocalSteps" and "reset_steps" not in ranks[0]["options"]
    assert ranks[0]["options"]["compress"] == "updates"
    assert len(ranks[0]["said"]) == 1 and "compress='updates', error_feedback='ef'" in ranks[0]["said"][0]


def test_partial_sync_needs_a_reset_interval():
    with pytest.raises(ValueError, match="reset_steps must be an integer >= 1"):
        PartialSync(None, nn.Linear(1, 1), None, 1, "fixed", 0, 0)


# ---- options -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(compress="momentum", local_steps=2), "local_steps=2 averages parameter updates, not momentum"),
    (dict(compress="momentum", momentum_warmup_steps=0), "momentum_warmup_steps must be an integer >= 1"),
    (dict(compress="gradients", reset_steps=5), "reset_steps=5 resets the errors of compressed updates"),
    (dict(compress="updates", reset_steps=-1), "reset_steps must be an integer >= 0"),
    (dict(compress="updates", reset_steps=3, error_feedback="ef21"), "keeps error feedback's residual"),
    (dict(compress="updates", reset_steps=None), "reset_steps must be an integer >= 0"),
])
def test_bad_options_name_the_value_and_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CompressionConfig("topk", **kwargs)


@pytest.mark.parametrize("method", ["powersgd", "gdsec"])
def test_momentum_is_for_the_compressors(method):
    with pytest.raises(ValueError, match="cannot compress momentum"):
        CompressionConfig(method, compress="momentum")


def test_momentum_needs_adam():
    from gsoft.distributed.momentum import check_optimizer

    model = _model()
    with pytest.raises(ValueError, match="needs torch.optim.Adam or AdamW, got SGD"):
        check_optimizer(torch.optim.SGD(trainable(model), lr=0.1))
    with pytest.raises(ValueError, match=r"amsgrad=True\) is not supported"):
        check_optimizer(torch.optim.Adam(trainable(model), amsgrad=True))
    assert isinstance(check_optimizer(_adamw(trainable(model))), torch.optim.AdamW)
    assert CompressedMomentum.__doc__
