"""Failures of data-parallel runs: a peer process that is gone, and a resume with another number of processes.

A gone peer: every collective path of gsoft.distributed raises a clear error instead of returning a result.

One spawn of two gloo processes covers every compression method and every collective path (DDP gradient hooks,
PowerSGD, local-step averaging, the checkpoint gather). Each case gets its own process group, so a failed collective
in one case leaves the others intact. Both processes build every case and take two good steps together, then:

- ``silent``: process 1 stays alive but skips the collective; process 0's collective times out (a short per-group
  timeout, set only after the set-up), as when a peer hangs or never joins;
- ``exited``: process 1 exits; process 0's collective finds the connection closed (or times out), as when a peer
  crashes or is killed.

Process 0 records what each failing call did (raised, with which message, or returned); the tests read that.

Another number of processes: a one-process and a two-process accelerate run, set up as the recipes set them up, each
resume the other's checkpoint (``common.checkpoint``): the one process takes over the two processes' compression
state, the two processes start theirs fresh (tests/test_elastic.py checks what each holds; several processes on
another number of several: tests/test_two_stage.py).
"""

from __future__ import annotations

import datetime
import json
import os
import time
import traceback
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from conftest import free_port, run_spawned
from gsoft.distributed import CompressionConfig, collective_failure, register_compression
from gsoft.distributed.transport import PEER_GONE

WORLD = 2
SET_UP_TIMEOUT = datetime.timedelta(seconds=300)  # set-up and coordination: generous on a loaded machine
FAILING_TIMEOUT = datetime.timedelta(seconds=1)  # what a silent peer costs per case (set after the set-up)
JOIN_TIMEOUT_S = 600
PHASES = ("silent", "exited")
GOOD_STEPS = 2  # DDP rebuilds its buckets in the second; PowerSGD compresses from the third (start_iter 2)

#: case -> (method, CompressionConfig options, what process 0 calls, the collective the error must name)
CASES: dict[str, tuple[str, dict[str, Any], str, str]] = {
    "none": ("none", {}, "step", "all_reduce"),
    "fp16": ("fp16", {}, "step", "all_reduce"),
    "int8": ("int8", {}, "step", "all_gather"),
    "sign": ("sign", {}, "step", "all_gather"),
    "topk": ("topk", {"compression_ratio": 0.25}, "step", "all_gather"),
    "randk": ("randk", {"compression_ratio": 0.25}, "step", "all_reduce"),
    "gdsec": ("gdsec", {"compression_ratio": 0.25}, "step", "all_gather"),
    "powersgd": ("powersgd", {"powersgd_start_iter": GOOD_STEPS}, "step", "PowerSGD"),
    "powersgd_uncompressed": ("powersgd", {"powersgd_start_iter": 100}, "step", "PowerSGD"),
    "updates": ("topk", {"compress": "updates"}, "step", "all_gather"),
    "local_steps": ("int8", {"local_steps": 3}, "synchronize", "all_gather"),
    "two_stage": ("topk", {"collective": "two_stage"}, "step", "stage 1 of the two-stage exchange"),
    "two_stage_local_steps": ("sign", {"local_steps": 3, "collective": "two_stage"}, "synchronize",
                              "stage 1 of the two-stage exchange"),
    "checkpoint": ("topk", {}, "state_dict", "all_gather_object"),
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 2))
    model[0].requires_grad_(False)
    return model


def _build(rank: int, method: str, options: dict[str, Any]) -> dict[str, Any]:
    """A DDP model with compression on its own process group, after two good steps together."""
    group = dist.new_group(backend="gloo", timeout=SET_UP_TIMEOUT)
    model = _model()
    ddp = DDP(model, process_group=group)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    state = register_compression(ddp, CompressionConfig(method, **options), optimizer=opt, process_group=group)
    case = {"group": group, "ddp": ddp, "opt": opt, "state": state}
    for step in range(GOOD_STEPS):
        _step(case, rank, step)
    return case


def _step(case: dict[str, Any], rank: int, step: int) -> None:
    g = torch.Generator().manual_seed(100 * rank + step)
    x = torch.randn(16, 8, generator=g)
    loss = nn.functional.mse_loss(case["ddp"](x), torch.sin(x[:, :2]))
    case["opt"].zero_grad()
    loss.backward()
    case["opt"].step()


def _failing_call(case: dict[str, Any], action: str) -> Callable[[], Any]:
    if action == "step":
        return lambda: _step(case, 0, GOOD_STEPS)
    if action == "synchronize":
        return case["state"].synchronize
    return case["state"].state_dict


def _outcome(call: Callable[[], Any]) -> dict[str, Any]:
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - what was raised is the result
        return {"raised": type(exc).__name__, "message": str(exc), "is_runtime_error": isinstance(exc, RuntimeError)}
    return {"raised": None, "message": "returned without an error"}


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=SET_UP_TIMEOUT)
    results: dict[str, Any] = {}
    try:
        built = {phase: {name: _build(rank, method, options) for name, (method, options, _, _) in CASES.items()}
                 for phase in PHASES}
        for phase in PHASES:
            for case in built[phase].values():
                case["group"].set_timeout(FAILING_TIMEOUT)
        dist.barrier()
        if rank == 1:
            dist.barrier()  # silent: process 0's collectives in the "silent" groups time out meanwhile
            os._exit(0)  # exited: the "exited" groups' connections close
        for phase in PHASES:
            results[phase] = {name: _outcome(_failing_call(built[phase][name], CASES[name][2])) for name in CASES}
            if phase == "silent":
                dist.barrier()
    except Exception:  # noqa: BLE001 - reported by the tests
        results["error"] = traceback.format_exc()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    os._exit(0)  # the default group lost its peer: nothing left to tear down cleanly


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("peer_gone")
    port = free_port()
    codes = run_spawned([(_worker, (rank, port, str(out))) for rank in range(WORLD)], JOIN_TIMEOUT_S)
    assert codes == [0, 0], f"workers exited with {codes}"
    results = json.loads((out / "rank0.json").read_text())
    assert "error" not in results, results["error"]
    return results


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("name", list(CASES))
def test_a_gone_peer_raises_a_clear_error(outcomes, phase, name):
    outcome = outcomes[phase][name]
    message = outcome["message"]
    assert outcome["raised"] is not None, f"{name}: the failed collective returned a result instead of raising"
    assert outcome["is_runtime_error"], outcome
    assert "a peer process is gone" in message, message
    assert CASES[name][3] in message, message  # the operation
    assert "process 0 of 2" in message, message
    underlying = message.split("Underlying error: ", 1)
    assert len(underlying) == 2 and underlying[1].strip(), message
    if phase == "silent":
        assert "Timed out" in underlying[1], message  # gloo's own words
    # what a script prints: the error without torch's callback prefixes and tracebacks, starting with the operation
    failure = collective_failure(RuntimeError(message))
    assert failure is not None and str(failure).startswith(CASES[name][3]), str(failure)
    assert "\nAt:\n" not in str(failure) and PEER_GONE in str(failure)
    assert collective_failure(RuntimeError("CUDA out of memory")) is None


# ------------------------------------------------------------------------------------------------------------------
# resuming with another number of processes: the recipes' checkpoints (common.checkpoint) through accelerate
# ------------------------------------------------------------------------------------------------------------------


def _wait_for(flag: str) -> None:
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while not os.path.exists(flag):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{flag} did not appear")
        time.sleep(0.2)


def _accelerate_run(rank: int, world: int, port: int, out_dir: str, resume: str, save: str) -> None:
    """One process of a ``world``-process accelerate run set up as the recipes set it up (prepare, then
    ``setup_communication`` and ``register_for_checkpointing``): resume the checkpoint ``resume`` once its
    ``<resume>.ready`` flag is there (what the resume raised goes to ``<out_dir>/resume<world>_<rank>.json``), take a
    step, save a checkpoint as ``save`` and flag it ready."""
    from accelerate import Accelerator

    from common.checkpoint import load_checkpoint
    from common.communication import CommunicationArgs, setup_communication

    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    acc = Accelerator(cpu=True)
    assert acc.num_processes == world, acc.num_processes
    model = _model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model, opt = acc.prepare(model, opt)
    comm = setup_communication(CommunicationArgs(grad_compression="topk", compress="updates"), acc, model, opt, seed=0)
    if comm is not None:
        comm.register_for_checkpointing(acc)
    if world == 1:  # the one-process run saves first; the two-process run resumes it meanwhile
        _save_and_flag(acc, save, rank)
    _wait_for(f"{resume}.ready")
    outcome = _outcome(lambda: load_checkpoint(acc, resume))
    with open(os.path.join(out_dir, f"resume{world}_{rank}.json"), "w") as f:
        json.dump(outcome, f)
    if world > 1:
        _save_and_flag(acc, save, rank)
    acc.end_training()


def _save_and_flag(acc: Any, save: str, rank: int) -> None:
    from common.checkpoint import save_checkpoint

    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(rank))
    model, opt = acc._models[0], acc._optimizers[0]
    acc.backward(nn.functional.mse_loss(model(x), torch.sin(x[:, :2])))
    opt.step()
    path = save_checkpoint(acc, save, 1, {})
    if acc.is_main_process:
        open(f"{path}.ready", "w").close()


@pytest.fixture(scope="module")
def resumes(tmp_path_factory) -> dict[str, Any]:
    """A one-process and a two-process run at once, each resuming the other's checkpoint: what each resume raised."""
    out = tmp_path_factory.mktemp("world_size")
    checkpoint = "checkpoints/step_00000001"
    one, two = str(out / "one" / checkpoint), str(out / "two" / checkpoint)
    port = free_port()
    jobs = [(_accelerate_run, (0, 1, port, str(out), two, str(out / "one")))]
    jobs += [(_accelerate_run, (rank, 2, port, str(out), one, str(out / "two"))) for rank in range(2)]
    codes = run_spawned(jobs, JOIN_TIMEOUT_S)
    assert codes == [0, 0, 0], f"workers exited with {codes}"
    return {name: json.loads((out / f"{name}.json").read_text()) for name in ("resume2_0", "resume2_1", "resume1_0")}


@pytest.mark.parametrize("name", ["resume1_0", "resume2_0", "resume2_1"])
def test_resuming_with_one_process_on_either_side_works(resumes, name):
    assert resumes[name]["raised"] is None, resumes[name]


def test_checkpoint_processes_come_from_the_manifest(tmp_path):
    from common.checkpoint import MANIFEST
    from common.communication import check_checkpoint_processes, checkpoint_processes

    assert checkpoint_processes(tmp_path) is None  # no manifest: load_checkpoint refuses it on its own
    assert check_checkpoint_processes(tmp_path, 3) is None
    (tmp_path / MANIFEST).write_text(json.dumps({"files": {}, "num_processes": 3}))
    assert checkpoint_processes(tmp_path) == 3
    assert check_checkpoint_processes(tmp_path, 3) is None
    (tmp_path / MANIFEST).write_text(json.dumps({"files": {}, "num_processes": "4"}))
    with pytest.raises(ValueError, match="num_processes is '4', not a number of processes"):
        checkpoint_processes(tmp_path)
    (tmp_path / MANIFEST).write_text("{")
    with pytest.raises(ValueError, match="is unreadable"):
        checkpoint_processes(tmp_path)


def test_several_processes_resume_on_another_number_with_a_warning_but_powersgd_is_refused(tmp_path):
    from common.checkpoint import MANIFEST
    from common.communication import check_checkpoint_processes

    (tmp_path / MANIFEST).write_text(json.dumps({"files": {}, "num_processes": 4}))
    warning = check_checkpoint_processes(tmp_path, 2, "topk")
    assert warning.startswith(f"checkpoint {tmp_path} was written by 4 processes and this run has 2: resuming, but "
                              "not bit-identically"), warning
    assert "mean over the 4 saved processes" in warning and "2 x --per_device_train_batch_size" in warning
    assert warning.endswith("the saved random states of processes 2-3 are not used.")
    (tmp_path / MANIFEST).write_text(json.dumps({"files": {}, "num_processes": 2}))
    assert check_checkpoint_processes(tmp_path, 3, "sign").endswith("process 2 has no saved random state (the run's "
                                                                    "start-up seeding stays).")
    with pytest.raises(ValueError, match="written by 2 processes and this run has 3: torch's PowerSGD keeps "
                                         "per-process error buffers.*Resume with 2 processes"):
        check_checkpoint_processes(tmp_path, 3, "powersgd")
    assert "becomes this process's as their synchronisation would have made it" in check_checkpoint_processes(
        tmp_path, 1, "none")
