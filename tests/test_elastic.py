"""Elastic runs: a checkpoint resumes on another number of processes, one process included, and a recipe launched by
torchrun's elastic agent survives a worker killed with SIGKILL.

- N -> 1: ``SingleProcessState`` (what a one-process run registers in a compression state's place) makes the one
  process what a synchronisation of the N would have made: the replicas' mean parameters and optimizer moments under
  local steps, the residual of compressed updates added, residuals of gradients or momentum and difference-feedback
  references dropped, all said in one warning.
- 1 -> N: ``CompressionState.load_state_dict`` of a one-process state starts fresh from the loaded model.
- The GLUE recipe under ``torchrun --max-restarts``: a worker killed after the first checkpoint; the agent restarts the
  group, which resumes from the newest intact checkpoint and ends bit-identical to an uninterrupted run (resuming on as
  many processes restores every process's model, optimizer, RNG and compression state). The same checkpoint then
  resumes on 1 process, and a one-process checkpoint on 2.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from common.communication import check_checkpoint_processes, check_world_size_on_resume
from conftest import RECIPES, free_port, frozen_base_mlp, trainable
from gsoft.distributed import CompressionConfig, register_compression
from gsoft.distributed.state import SingleProcessState, is_single_process_state, one_process_resume
from test_roberta_glue import TINY

IN, HIDDEN, OUT = 8, 16, 2
#: register_compression's advice against compressed gradients under AdamW: these tests want that state anyway
GRADIENTS_UNDER_ADAMW = pytest.mark.filterwarnings("ignore:.*-compressed gradients under AdamW",
                                                   "ignore:gdsec under AdamW")


@pytest.fixture
def one_process_group(tmp_path):
    """A one-process gloo group: ``register_compression`` needs a DDP model; the states are then relabelled as
    written by several processes."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _records(caplog, logger: str = "gsoft.distributed.state") -> list[logging.LogRecord]:
    """What ``logger`` logged (other loggers may reach the capture too, e.g. INFO lines once a recipe run in the
    same process has set the root logger's level)."""
    return [r for r in caplog.records if r.name == logger]


def _model() -> nn.Module:
    return frozen_base_mlp(IN, HIDDEN, OUT)



def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(trainable(model), lr=1e-2)


def _steps(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, IN, generator=g)
        loss = nn.functional.mse_loss(model(x), torch.sin(x[:, :OUT]))
        opt.zero_grad()
        loss.backward()
        opt.step()


def _saved_state(**config) -> dict:
    """A trained compression state as ``state_dict`` writes it (one process; the tests relabel it)."""
    ddp = DDP(_model())
    opt = _optimizer(ddp.module)
    state = register_compression(ddp, CompressionConfig(**config), optimizer=opt)
    _steps(ddp, opt, 3)
    return state.state_dict()


def _two_processes(saved: dict, shift: float = 0.5) -> dict:
    """``saved`` as if two processes had written it: the second one's per-process tensors (parameters, optimizer
    moments, error-feedback state) are the first one's plus ``shift``."""
    second = copy.deepcopy(saved["ranks"][0])
    for piece in second.get("feedback", {}).values():
        for name in piece:
            piece[name] = piece[name] + shift
    local = second.get("local") or {}
    if "params" in local:
        local["params"] = local["params"] + shift
        for param_state in local["optimizer_state"]:
            for key in ("exp_avg", "exp_avg_sq"):
                param_state[key] = param_state[key] + shift
    return dict(saved, world_size=2, ranks=[saved["ranks"][0], second])


def _one_process(saved: dict) -> tuple[nn.Module, torch.optim.Optimizer, SingleProcessState]:
    """A one-process run's model and optimizer as accelerate leaves them after loading the checkpoint (the main
    process's model and optimizer state), with its ``SingleProcessState``."""
    model = _model()
    opt = _optimizer(model)
    _steps(model, opt, 1, seed=5)  # an optimizer state to be replaced
    local = saved["ranks"][0].get("local") or {}
    if "params" in local:
        with torch.no_grad():
            offset = 0
            for p in trainable(model):
                p.copy_(local["params"][offset: offset + p.numel()].view_as(p))
                offset += p.numel()
    return model, opt, SingleProcessState(model, opt)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in trainable(model)])


def _residual(resume, model: nn.Module) -> torch.Tensor:
    """The mean residual in the model's parameter order (zeros where none)."""
    return torch.cat([resume.residual.get(n, torch.zeros(p.numel())).reshape(-1)
                      for n, p in model.named_parameters() if p.requires_grad])


# ----------------------------------------------------------------------------------------------------------------------
# N -> 1
# ----------------------------------------------------------------------------------------------------------------------
def test_two_to_one_with_compressed_updates_is_the_synchronisation(one_process_group, caplog):
    saved = _saved_state(method="topk", compression_ratio=0.25, compress="updates", local_steps=2)
    two = _two_processes(saved)
    resume = one_process_resume(two)
    first = saved["ranks"][0]["local"]
    assert torch.allclose(resume.params, first["params"] + 0.25)
    assert resume.applies_residual and resume.residual and not resume.dropped
    assert resume.replica_spread == pytest.approx(0.25 * first["params"].numel() ** 0.5, rel=1e-5)
    model, opt, stand_in = _one_process(saved)
    with caplog.at_level(logging.WARNING, logger="gsoft.distributed.state"):
        stand_in.load_state_dict(two)
    expected = first["params"] + 0.25 + _residual(resume, model)
    assert torch.allclose(_flat(model), expected)
    for p, param_state in zip(trainable(model), first["optimizer_state"]):
        assert torch.allclose(opt.state[p]["exp_avg"], param_state["exp_avg"] + 0.25)
        assert torch.allclose(opt.state[p]["exp_avg_sq"], param_state["exp_avg_sq"] + 0.25)
        assert torch.equal(opt.state[p]["step"], param_state["step"])
    [record] = _records(caplog)
    message = record.getMessage()
    assert "compression state of 2 processes (topk, compress updates) resumed in one process" in message, message
    assert "the trained parameters are the mean of the 2 replicas" in message
    assert "residual of the updates (parameter deltas not sent yet; norm" in message
    assert "of the parameters' norm) is added to the parameters" in message


@GRADIENTS_UNDER_ADAMW
def test_two_to_one_with_compressed_gradients_drops_the_residual_and_says_how_large(one_process_group, caplog):
    saved = _saved_state(method="topk", compression_ratio=0.25, compress="gradients")
    two = _two_processes(saved, shift=1.0)
    model, _, stand_in = _one_process(saved)
    before = _flat(model).clone()
    with caplog.at_level(logging.WARNING, logger="gsoft.distributed.state"):
        stand_in.load_state_dict(two)
    assert torch.equal(_flat(model), before)  # the replicas were identical: accelerate's model is theirs
    resume = one_process_resume(two)
    norm = float(_residual(resume, model).norm())
    assert norm > 0
    [record] = _records(caplog)
    message = record.getMessage()
    assert f"the mean error-feedback residual of the gradients (norm {norm:.3g}, " in message, message
    assert "is dropped: one process has no compressed exchange to send it through" in message
    assert "mean of the 2 replicas" not in message


@GRADIENTS_UNDER_ADAMW
def test_two_to_one_drops_difference_feedback_references(one_process_group, caplog):
    two = _two_processes(_saved_state(method="topk", compression_ratio=0.25, error_feedback="ef21",
                                      compress="gradients"))
    resume = one_process_resume(two)
    assert not resume.residual and [d.split(" (")[0] for d in resume.dropped] == [
        "the reference of ef21", "the reference_mean of ef21"]
    model, _, stand_in = _one_process(two)
    with caplog.at_level(logging.WARNING, logger="gsoft.distributed.state"):
        stand_in.load_state_dict(two)
    assert "per-process references are dropped (the reference of ef21 (norm" in _records(caplog)[0].getMessage()


def test_two_to_one_without_compression_state_to_merge_is_silent(one_process_group, caplog):
    two = _two_processes(_saved_state(method="none"))
    model, _, stand_in = _one_process(two)
    before = _flat(model).clone()
    with caplog.at_level(logging.WARNING, logger="gsoft.distributed.state"):
        stand_in.load_state_dict(two)
    assert torch.equal(_flat(model), before) and not _records(caplog)


def test_two_to_one_refuses_powersgd_and_a_model_of_another_size(one_process_group):
    saved = _saved_state(method="topk", compression_ratio=0.25, compress="updates", local_steps=2)
    with pytest.raises(ValueError, match="PowerSGD state was written by 2 processes and this run has 1.*Resume with "
                                         "2 processes"):
        one_process_resume(dict(_two_processes(saved), method="powersgd"))
    bigger = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT + 1))
    bigger[0].requires_grad_(False)
    stand_in = SingleProcessState(bigger, _optimizer(bigger))
    with pytest.raises(ValueError, match="holds 34 parameters in 2 tensors and this model trains 51 in 2: resume it "
                                         "with the model and adapter settings that wrote it"):
        stand_in.load_state_dict(_two_processes(saved))


def test_one_process_state_round_trips_as_a_no_op(one_process_group):
    model, opt, stand_in = _one_process(_saved_state(method="none"))
    state = stand_in.state_dict()
    assert is_single_process_state(state) and state["world_size"] == 1
    before = _flat(model).clone()
    stand_in.load_state_dict(state)
    assert torch.equal(_flat(model), before)


# ----------------------------------------------------------------------------------------------------------------------
# 1 -> N
# ----------------------------------------------------------------------------------------------------------------------
@GRADIENTS_UNDER_ADAMW
@pytest.mark.parametrize("config", [
    dict(method="topk", compression_ratio=0.25, compress="updates", local_steps=2),
    dict(method="topk", compression_ratio=0.25, compress="updates", reset_steps=4),
    dict(method="topk", compression_ratio=0.25, compress="gradients"),
    dict(method="gdsec"),
], ids=["local_steps", "cser", "gradients", "gdsec"])
def test_one_to_several_starts_fresh_from_the_loaded_model(one_process_group, config):
    ddp = DDP(_model())
    opt = _optimizer(ddp.module)
    state = register_compression(ddp, CompressionConfig(**config), optimizer=opt)
    _steps(ddp, opt, 3)
    assert state.steps == 3 and state.state_dict()["ranks"][0].get("feedback")  # one process sends 0 bytes
    with torch.no_grad():  # the model accelerate loaded from the one-process checkpoint
        for p in trainable(ddp.module):
            p.add_(1.0)
    loaded = _flat(ddp.module).clone()
    state.load_state_dict(SingleProcessState(ddp.module, opt).state_dict())
    fresh = state.state_dict()
    own = fresh["ranks"][0]
    assert own["counters"] == dict(bytes_sent=0, bytes_uncompressed=0, payload_bytes=0, steps=0, syncs=0)
    assert not own.get("feedback") and "previous_parameters" not in own
    assert torch.equal(_flat(ddp.module), loaded)
    if "params" in (own.get("local") or {}):
        assert torch.equal(own["local"]["reference"], loaded) and own["local"]["since_sync"] == 0
        assert own["local"].get("since_reset", 0) == 0
    _steps(ddp, opt, 2)  # and it trains on
    assert torch.isfinite(_flat(ddp.module)).all()


def test_one_to_several_refuses_powersgd(one_process_group):
    ddp = DDP(_model())
    state = register_compression(ddp, CompressionConfig("powersgd"))
    with pytest.raises(ValueError, match="PowerSGD state was written by 1 process and this run has 1: .*Resume "
                                         "with 1 process,"):
        state.load_state_dict(SingleProcessState(ddp.module, None).state_dict())


# ----------------------------------------------------------------------------------------------------------------------
# the checks before a load
# ----------------------------------------------------------------------------------------------------------------------
def _checkpoint(tmp_path: Path, processes: int, custom_states: int) -> Path:
    from common.checkpoint import MANIFEST

    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / MANIFEST).write_text(json.dumps({"files": {}, "num_processes": processes}))
    for i in range(custom_states):
        (tmp_path / f"custom_checkpoint_{i}.pkl").write_bytes(b"")
    return tmp_path


def test_one_process_on_either_side_resumes_with_one_warning_and_powersgd_is_refused(tmp_path):
    two = _checkpoint(tmp_path / "two", 2, 1)
    warning = check_checkpoint_processes(two, 1, "topk")
    assert warning.startswith(f"checkpoint {two} was written by 2 processes and this run has 1: resuming, but not "
                              "bit-identically to an uninterrupted run. The compression state of the 2 processes "
                              "becomes this process's as their synchronisation would have made it"), warning
    assert "1 x --per_device_train_batch_size examples instead of 2 x" in warning
    assert warning.endswith("the saved random states of process 1 are not used.")
    one = _checkpoint(tmp_path / "one", 1, 1)
    warning = check_checkpoint_processes(one, 3, "sign")
    assert warning.startswith(f"checkpoint {one} was written by 1 process and this run has 3: resuming, but not "
                              "bit-identically to an uninterrupted run. The compression state starts fresh from the "
                              "loaded model (no error-feedback residuals, every replica the loaded model"), warning
    assert warning.endswith("processes 1-2 have no saved random state (the run's start-up seeding stays).")
    for path, running in ((two, 1), (one, 2)):
        with pytest.raises(ValueError, match="PowerSGD keeps per-process error buffers.*Resume with"):
            check_checkpoint_processes(path, running, "powersgd")


class _Accelerator:
    """What ``check_world_size_on_resume`` uses of an accelerator."""

    def __init__(self, num_processes: int) -> None:
        self.num_processes, self.is_main_process, self.hooks = num_processes, True, []

    def register_load_state_pre_hook(self, hook) -> None:
        self.hooks.append(hook)


def test_a_checkpoint_without_one_compression_state_per_model_is_refused_before_loading(tmp_path):
    acc = _Accelerator(1)
    check_world_size_on_resume(acc, "none", states=2)
    check_world_size_on_resume(acc, "none", states=2)  # once per accelerator
    [hook] = acc.hooks
    hook([], str(_checkpoint(tmp_path / "ok", 2, 2)))
    with pytest.raises(ValueError, match=r"holds 0 compression states \(custom_checkpoint_\*.pkl\) and this run "
                                         r"trains 2 models, each with one: .*a one-process run of a gsoft version "
                                         r"that saved none"):
        hook([], str(_checkpoint(tmp_path / "old", 1, 0)))


def test_one_agent_joins_the_process_group_under_a_prefix_of_its_restart(monkeypatch):
    """What a worker of torch's elastic agent finds: the agent's store (a server here) and its restart count. The
    group's store keeps every key under ``gsoft/attempt_<restart>/``, apart from the previous attempt's."""
    from common.run import join_elastic_process_group

    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    joined: list[dict] = []
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kwargs: joined.append(dict(kwargs, backend=backend)))
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    assert not join_elastic_process_group() and not joined  # not under an agent
    for name, value in dict(TORCHELASTIC_RESTART_COUNT="2", TORCHELASTIC_USE_AGENT_STORE="True",
                            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                            GROUP_WORLD_SIZE="1").items():
        monkeypatch.setenv(name, value)
    assert join_elastic_process_group()
    [call] = joined
    assert call["backend"] == "gloo" and call["rank"] == 0 and call["world_size"] == 1
    call["store"].set("probe", "1")
    assert server.check(["gsoft/attempt_2/probe"]) and server.get("gsoft/attempt_2/probe") == b"1"


def test_several_agents_sharing_their_store_get_one_warning_naming_the_fix(monkeypatch, caplog):
    from common.run import join_elastic_process_group

    for name, value in dict(TORCHELASTIC_RESTART_COUNT="0", TORCHELASTIC_USE_AGENT_STORE="True", RANK="0",
                            WORLD_SIZE="2", GROUP_WORLD_SIZE="2").items():
        monkeypatch.setenv(name, value)
    with caplog.at_level(logging.WARNING, logger="common.run"):
        assert not join_elastic_process_group() and not dist.is_initialized()
    [record] = _records(caplog, "common.run")
    assert "2 elastic agents share one store" in record.getMessage()
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in record.getMessage()
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # that fix: a store per round, nothing to do
    assert not join_elastic_process_group()


# ----------------------------------------------------------------------------------------------------------------------
# the GLUE recipe under torchrun's elastic agent
# ----------------------------------------------------------------------------------------------------------------------
#: TINY in 2 processes: 6 steps per epoch. Top-K 1% of the updates: every process keeps its own error-feedback residual,
#: which a restart must restore. The checkpoints at 20, 40 and 60 (the newest 2 are kept).
ELASTIC = [*TINY, "--max_steps", "60", "--save_steps", "20", "--eval_steps", "60", "--grad_compression", "topk",
           "--compression_ratio", "0.01"]
#: A guard against a hung group, not a time limit (the whole fixture takes about a minute on 2 idle cores).
RUN_TIMEOUT_S = 600
TORCHRUN = Path(sys.executable).with_name("torchrun")


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _torchrun(out: Path, *options: str, restarts: int = 2) -> list[str]:
    """The elastic launch of the brief: one agent, 2 workers, c10d rendezvous on loopback, up to ``restarts``
    restarts of the group."""
    return [str(TORCHRUN), "--nnodes", "1:1", "--nproc_per_node", "2", "--max-restarts", str(restarts),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
            str(RECIPES / "roberta_glue.py"), *ELASTIC, "--output_dir", str(out), *options]


def _run(cmd: list[str], log: Path) -> int:
    with log.open("w") as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(), timeout=RUN_TIMEOUT_S).returncode


def _kill_a_worker(agent: subprocess.Popen, ready: Path, out: Path, killed: list[dict]) -> None:
    """Once ``ready`` exists, SIGKILL the agent's highest-numbered worker; records what it killed and which
    checkpoints of ``out`` existed then."""
    import psutil

    while not ready.exists():
        if agent.poll() is not None:
            return
        time.sleep(0.02)
    workers = [c for c in psutil.Process(agent.pid).children() if "roberta_glue.py" in " ".join(c.cmdline())]
    victim = max(workers, key=lambda c: c.pid)
    os.kill(victim.pid, signal.SIGKILL)
    killed.append({"pid": victim.pid, "checkpoints": sorted(p.name for p in (out / "checkpoints").glob("step_*"))})


def _killed_twice(out: Path, log: Path) -> tuple[int, list[dict]]:
    """The elastic run, with one worker killed twice: once as soon as a step is logged (no checkpoint yet: the
    restarted group starts again from step 0 in the same directory), and once the first checkpoint exists (the next
    group resumes from it)."""
    killed: list[dict] = []
    with log.open("w") as f:
        agent = subprocess.Popen(_torchrun(out, "--resume_from_checkpoint", "latest"), stdout=f,
                                 stderr=subprocess.STDOUT, env=_env())
        try:
            _kill_a_worker(agent, out / "metrics.jsonl", out, killed)
            _kill_a_worker(agent, out / "checkpoints" / "step_00000020" / "manifest.json", out, killed)
            code = agent.wait(timeout=RUN_TIMEOUT_S)
        finally:
            if agent.poll() is None:
                agent.kill()
    return code, killed


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def elastic(tmp_path_factory) -> dict[str, Path]:
    """An uninterrupted elastic run, the same run with a worker killed twice, its checkpoint resumed on 1 process,
    and that run's checkpoint resumed on 2."""
    root = tmp_path_factory.mktemp("elastic")
    runs = {name: root / name for name in ("full", "killed", "one", "two")}
    codes = {"full": _run(_torchrun(runs["full"], "--resume_from_checkpoint", "latest"), root / "full.log")}
    codes["killed"], killed = _killed_twice(runs["killed"], root / "killed.log")
    # 2 -> 1 from the killed run's step 40, on to step 80; then 1 -> 2 from the one-process step 60
    one = [sys.executable, str(RECIPES / "roberta_glue.py"), *ELASTIC, "--max_steps", "80", "--eval_steps", "80",
           "--output_dir", str(runs["one"]),
           "--resume_from_checkpoint", str(runs["killed"] / "checkpoints" / "step_00000040")]
    codes["one"] = _run(one, root / "one.log")
    codes["two"] = _run(_torchrun(runs["two"], "--max_steps", "80", "--eval_steps", "80", "--resume_from_checkpoint",
                                  str(runs["one"] / "checkpoints" / "step_00000060"), restarts=0), root / "two.log")
    logs = {name: (root / f"{name}.log").read_text() for name in runs}
    for name, code in codes.items():
        assert code == 0, f"{name}: exit code {code}\n{logs[name][-4000:]}"
    return {"runs": runs, "logs": logs, "killed": killed}


def test_a_killed_worker_is_restarted_and_the_run_ends_as_an_uninterrupted_one(elastic):
    """The agent restarts the group after each SIGKILL; the first restart finds no checkpoint and starts again in
    the same directory, the second resumes from step 20; resuming on as many processes restores every process's
    model, optimizer, RNG and compression state, so the final state is bit-identical to the uninterrupted run's."""
    log, (first, second) = elastic["logs"]["killed"], elastic["killed"]
    assert first["checkpoints"] == [] and "step_00000020" in second["checkpoints"], elastic["killed"]
    # the agent saw both kills and restarted twice: it reports the first worker it finds failed, the killed one
    # (-9) or, when the survivor's collective already failed, the survivor aborting on the broken connection (-6)
    assert len(re.findall(r"failed \(exitcode: -(?:9|6)\)", log)) == 2, log[-4000:]
    assert "torch elastic restart 2 of at most 2" in log
    resumed = re.findall(r"resumed from (\S+) at step (\d+)", log)
    assert len(resumed) == 1 and int(resumed[0][1]) >= 20, resumed
    full, killed = _results(elastic["runs"]["full"]), _results(elastic["runs"]["killed"])
    assert killed["train_steps"] == full["train_steps"] == 60 and killed["world_size"] == 2
    assert killed["rank_state_sha256"] == full["rank_state_sha256"]
    assert len(set(full["rank_state_sha256"])) == 1
    assert killed["eval"] == full["eval"] and killed["compression"] == full["compression"]


def test_a_two_process_checkpoint_resumes_on_one_and_that_one_on_two(elastic):
    one, two = _results(elastic["runs"]["one"]), _results(elastic["runs"]["two"])
    assert one["world_size"] == 1 and one["train_steps"] == 80 and 0.0 <= one["eval"]["accuracy"] <= 1.0
    log = elastic["logs"]["one"]
    assert "was written by 2 processes and this run has 1: resuming, but not bit-identically" in log
    assert "model: compression state of 2 processes (topk, compress updates) resumed in one process: the trained " \
           "parameters are the mean of the 2 replicas (identical: they had just synchronised)" in log
    assert "(parameter deltas not sent yet; norm " in log and "is added to the parameters." in log
    assert two["world_size"] == 2 and two["train_steps"] == 80 and len(set(two["rank_state_sha256"])) == 1
    assert "was written by 1 process and this run has 2: resuming, but not bit-identically" in elastic["logs"]["two"]
    assert two["compression"]["steps"] == 20  # the compression state started fresh at step 60
