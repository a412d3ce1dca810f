"""The recipes' run skeleton (recipes/common/loop.py) on a tiny fake recipe: a two-layer regression on random data.

Covers: a run writes results.json with the common keys, metrics and a summary; the evaluation and checkpoint
intervals; --stop_after_steps then a resume equals the uninterrupted run bit for bit (dropout, mid-epoch, gradient
accumulation); a resume from the final checkpoint; the scheduler stepping per optimizer step in both modes; gradient
clipping; errors in the set-up as one line without a new output directory; logging once per message and process;
divergence (a non-finite loss, parameters or evaluation metric) stops the run with one line and saves nothing after
it, and a checkpoint holding non-finite values is not resumed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
import torch.nn.functional as F
from accelerate import DataLoaderConfiguration
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.loop import LoopSettings, Recipe, TrainLoop, Trainables, naming_option, run_recipe
from common.run import RESULTS_SCHEMA
from common.loop import configure_logging, error_line

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
N_EXAMPLES, BATCH = 48, 4  # 12 batches per epoch


class LinearRecipe(Recipe):
    """A fake recipe: ``Linear -> Dropout -> Linear`` fitted to a fixed random linear map; it records what the loop
    asks of it."""

    name = "linear"

    def __init__(self, fail_in: Optional[str] = None, optimizer: str = "adamw", lr_decay: float = 0.9,
                 lr: Optional[float] = None, nan_loss_at: Optional[int] = None, inf_grad_at: Optional[int] = None,
                 nan_metric_at: Optional[int] = None) -> None:
        """``nan_loss_at`` / ``inf_grad_at``: the micro-step whose loss is NaN / whose gradients are inf (the loss
        stays finite); ``nan_metric_at``: the optimizer step whose evaluation gives a NaN metric."""
        self.fail_in = fail_in
        self.optimizer_name = optimizer
        self.lr_decay = lr_decay
        self.lr = lr
        self.nan_loss_at = nan_loss_at
        self.inf_grad_at = inf_grad_at
        self.nan_metric_at = nan_metric_at
        self.micro_steps: list[int] = []
        self.evaluations: list[tuple[int, bool]] = []
        self.initial: dict[str, torch.Tensor] = {}

    def _maybe_fail(self, where: str) -> None:
        if self.fail_in == where:
            raise ValueError(f"--option 7 does not fit in {where}:\nuse 8")

    def load(self, run: TrainLoop) -> None:
        self._maybe_fail("load")

    def build(self, run: TrainLoop) -> Trainables:
        self._maybe_fail("build")
        g = torch.Generator().manual_seed(1)
        x = torch.randn(N_EXAMPLES, 4, generator=g)
        y = x @ torch.randn(4, 1, generator=g)
        self.data = (x, y)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.25), nn.Linear(8, 1))
        self.initial = {k: v.clone() for k, v in model.state_dict().items()}
        loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True,
                            generator=torch.Generator().manual_seed(0))
        if self.optimizer_name == "sgd":
            optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=self.lr or 1.0)
        else:
            optimizer = torch.optim.AdamW(model.parameters(), lr=self.lr or 1e-2)
        run.state["evaluations"] = 0
        return Trainables({"model": model}, optimizer, loader)

    def scheduler(self, run: TrainLoop, optimizer: torch.optim.Optimizer, max_steps: int) -> Any:
        self._maybe_fail("scheduler")
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.lr_decay ** step)

    def loss(self, run: TrainLoop, batch: Any, micro_step: int) -> tuple[torch.Tensor, dict[str, float]]:
        self.micro_steps.append(micro_step)
        if self.fail_in == "collective" and micro_step == 2:  # as DDP's backward hands on a dead peer's error
            raise RuntimeError("Got the following error when running the callback: CollectiveError: all_reduce "
                               "failed in process 0 of 2: a peer process is gone (it exited or crashed) ...\n\nAt:\n"
                               "  transport.py(80): collective_result")
        if self.fail_in == "runtime" and micro_step == 2:
            raise RuntimeError("an unrelated bug")
        x, y = batch
        prediction = run.models["model"](x)
        if micro_step == self.inf_grad_at:
            prediction.register_hook(lambda grad: torch.full_like(grad, float("inf")))
        loss = F.mse_loss(prediction, y)
        if micro_step == self.nan_loss_at:
            loss = loss * float("nan")
        return loss, {"micro_step": float(micro_step)}

    @torch.no_grad()
    def evaluate(self, run: TrainLoop, step: int, final: bool) -> dict[str, float]:
        self.evaluations.append((step, final))
        run.state["evaluations"] += 1
        model = run.models["model"]
        model.eval()
        mse = F.mse_loss(model(self.data[0]), self.data[1]).item()
        model.train()
        return {"mse": float("nan") if step == self.nan_metric_at else mse}

    def save(self, run: TrainLoop) -> None:
        state = run.accelerator.unwrap_model(run.models["model"]).state_dict()
        save_file({k: v.contiguous() for k, v in state.items()}, str(run.output_dir / "model.safetensors"))

    def results(self, run: TrainLoop) -> dict[str, Any]:
        return {"method": "full", "evaluations": run.state["evaluations"], "final_loss": run.last_loss}

    def summary(self, run: TrainLoop, results: dict[str, Any]) -> str:
        return f"linear: {run.step} steps, results in {run.output_dir / 'results.json'}"


def settings(out: Path, **overrides: Any) -> LoopSettings:
    """Accumulation 2 over 12 batches: 6 optimizer steps per epoch."""
    options: dict[str, Any] = dict(
        output_dir=str(out), run_config={"lr": 1e-2}, seed=0, max_steps=14, gradient_accumulation_steps=2,
        max_grad_norm=1.0, eval_steps=None, save_steps=None, logging_steps=2, progress_bar=False, tensorboard=False,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    options.update(overrides)
    return LoopSettings(**options)


def metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def checkpoints(out: Path) -> list[str]:
    root = out / "checkpoints"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def test_run_writes_results_metrics_and_summary(tmp_path, capsys):
    recipe, out = LinearRecipe(), tmp_path / "run"
    results = run_recipe(recipe, settings(out))
    written = json.loads((out / "results.json").read_text())
    assert written == json.loads(json.dumps(results))
    for key in [*RESULTS_SCHEMA, "rank_state_sha256", "comm_bytes_sent", "comm_bytes_uncompressed", "compression",
                "mixed_precision", "device", "evaluations", "final_loss"]:
        assert key in written, key
    assert written["train_steps"] == 14 and written["world_size"] == 1 and len(written["rank_state_sha256"]) == 1
    assert written["trainable_params"] == written["total_params"] == 4 * 8 + 8 + 8 + 1
    assert written["compression"] == {"method": "none", "world_size": 1} and written["comm_bytes_sent"] == 0
    assert json.loads((out / "run_config.json").read_text()) == {"lr": 1e-2}
    assert (out / "model.safetensors").is_file()
    assert "linear: 14 steps, results in" in capsys.readouterr().out
    # every micro-batch once, in order; a log line every 2 steps with the window's loss and the recipe's scalars
    assert recipe.micro_steps == list(range(28))
    records = metrics(out)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(2, 15, 2))
    assert all({"loss", "lr", "epoch", "samples_per_s", "comm_bytes_sent", "micro_step"} <= set(r) for r in train)
    assert train[-1]["micro_step"] == 27 and train[-1]["epoch"] == pytest.approx(14 / 6)
    evals = [r for r in records if "eval_mse" in r]
    assert [r["step"] for r in evals] == [6, 12, 14]


@pytest.mark.parametrize("eval_steps, save_steps, evaluations, saved", [
    (None, None, [(6, False), (12, False), (14, True)], ["step_00000006", "step_00000012"]),
    (0, None, [(14, True)], []),
    (5, 0, [(5, False), (10, False), (14, True)], []),
    (None, 4, [(6, False), (12, False), (14, True)], ["step_00000004", "step_00000008", "step_00000012"]),
])
def test_evaluation_and_checkpoint_intervals(tmp_path, eval_steps, save_steps, evaluations, saved):
    recipe, out = LinearRecipe(), tmp_path / "run"
    run_recipe(recipe, settings(out, eval_steps=eval_steps, save_steps=save_steps))
    assert recipe.evaluations == evaluations
    assert checkpoints(out) == saved


def test_max_steps_from_epochs(tmp_path):
    recipe = LinearRecipe()
    results = run_recipe(recipe, settings(tmp_path / "run", max_steps=None, num_epochs=1.5))
    assert results["train_steps"] == 9 and recipe.evaluations == [(6, False), (9, True)]


def test_stop_and_resume_equal_the_uninterrupted_run(tmp_path):
    """Stopped at step 8 (epoch 1, 4 of its batches consumed) and resumed: the same micro-batches, data order,
    dropout masks, optimizer and scheduler states, and the recipe's own trainer state."""
    common = dict(eval_steps=3, save_steps=0)
    full_recipe = LinearRecipe()
    full = run_recipe(full_recipe, settings(tmp_path / "full", **common))
    stopped_recipe = LinearRecipe()
    assert run_recipe(stopped_recipe, settings(tmp_path / "part", stop_after_steps=8, **common)) is None
    assert not (tmp_path / "part" / "results.json").exists() and checkpoints(tmp_path / "part") == ["step_00000008"]
    resumed_recipe = LinearRecipe()
    resumed = run_recipe(resumed_recipe, settings(tmp_path / "part", resume_from_checkpoint="latest", **common))
    assert stopped_recipe.micro_steps + resumed_recipe.micro_steps == full_recipe.micro_steps == list(range(28))
    assert stopped_recipe.evaluations + resumed_recipe.evaluations == full_recipe.evaluations
    assert resumed["rank_state_sha256"] == full["rank_state_sha256"]
    assert resumed["evaluations"] == full["evaluations"] == 5  # the recipe's count went through the checkpoint
    assert resumed["final_loss"] == full["final_loss"]
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("full", "part"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["0.weight"], full_recipe.initial["0.weight"])  # it trained
    # what the resumed part logged (losses, learning rates, evaluations) is what the uninterrupted run logged
    keys = ("step", "loss", "lr", "eval_mse")
    logged = {d: [tuple(r.get(k) for k in keys) for r in metrics(tmp_path / d) if r["step"] > 8] for d in ("full", "part")}
    assert logged["part"] == logged["full"] and len(logged["full"]) == 6


def test_resume_from_the_final_checkpoint_evaluates_and_finishes(tmp_path):
    out = tmp_path / "run"
    first = run_recipe(LinearRecipe(), settings(out, max_steps=6, save_steps=6))
    (out / "results.json").unlink()  # as if it had been stopped right after its last checkpoint
    recipe = LinearRecipe()
    again = run_recipe(recipe, settings(out, max_steps=6, save_steps=6, resume_from_checkpoint="latest"))
    assert recipe.micro_steps == [] and recipe.evaluations == [(6, True)]
    assert again["train_steps"] == 6 and again["rank_state_sha256"] == first["rank_state_sha256"]
    assert again["final_loss"] is None and (out / "results.json").is_file()


@pytest.mark.parametrize("per_micro_batch", [False, True])
def test_scheduler_steps_once_per_optimizer_step(tmp_path, per_micro_batch):
    """Stepped after the optimizer step, or after every micro-batch (diffusers' style): accelerate then skips the
    micro-batches that do not step the optimizer, so both count optimizer steps."""
    out = tmp_path / "run"
    run_recipe(LinearRecipe(lr_decay=0.5), settings(out, max_steps=3, logging_steps=1,
                                                   scheduler_per_micro_batch=per_micro_batch))
    lrs = [r["lr"] for r in metrics(out) if "lr" in r]
    assert lrs == pytest.approx([1e-2 * 0.5, 1e-2 * 0.25, 1e-2 * 0.125])


@pytest.mark.parametrize("max_grad_norm", [None, 1e-3])
def test_gradient_clipping(tmp_path, max_grad_norm):
    recipe = LinearRecipe(optimizer="sgd", lr_decay=1.0)  # plain SGD, lr 1: the update is the gradient
    run_recipe(recipe, settings(tmp_path / "run", max_steps=1, gradient_accumulation_steps=1,
                                max_grad_norm=max_grad_norm))
    trained = load_file(str(tmp_path / "run" / "model.safetensors"))
    update = torch.cat([(trained[k] - recipe.initial[k]).flatten() for k in trained]).norm().item()
    if max_grad_norm is None:
        assert update > 1e-2
    else:
        assert update == pytest.approx(max_grad_norm, rel=1e-3)


@pytest.mark.parametrize("where", ["load", "build", "scheduler"])
def test_set_up_errors_are_one_line_without_a_new_output_dir(tmp_path, where):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        run_recipe(LinearRecipe(fail_in=where), settings(out))
    assert info.value.code == f"linear: error: --option 7 does not fit in {where}: use 8"
    assert not out.exists()


def test_a_dead_peer_is_one_line_and_other_runtime_errors_pass_through(tmp_path):
    with pytest.raises(SystemExit) as info:
        run_recipe(LinearRecipe(fail_in="collective"), settings(tmp_path / "a"))
    assert info.value.code == ("linear: error: all_reduce failed in process 0 of 2: a peer process is gone (it exited "
                               "or crashed) ...")
    with pytest.raises(RuntimeError, match="an unrelated bug"):
        run_recipe(LinearRecipe(fail_in="runtime"), settings(tmp_path / "b"))


def test_set_up_error_keeps_an_earlier_run(tmp_path):
    out = tmp_path / "run"
    assert run_recipe(LinearRecipe(), settings(out, stop_after_steps=2)) is None
    with pytest.raises(SystemExit, match="linear: error: --option 7 does not fit in build"):
        run_recipe(LinearRecipe(fail_in="build"), settings(out, resume_from_checkpoint="latest"))
    assert checkpoints(out) == ["step_00000002"]  # a directory this run did not create stays


def test_output_dir_of_another_run_is_refused_in_one_line(tmp_path):
    out = tmp_path / "run"
    run_recipe(LinearRecipe(), settings(out, max_steps=2))
    with pytest.raises(SystemExit) as info:
        run_recipe(LinearRecipe(), settings(out, max_steps=2, run_config={"lr": 1.0}))
    assert str(info.value.code).startswith("linear: error: --output_dir") and "different run" in str(info.value.code)
    assert (out / "results.json").is_file()


def test_error_line_and_naming_option():
    assert error_line("x", OSError("We couldn't connect.\nCheck your connection.")) == \
        "x: error: We couldn't connect. Check your connection."
    with pytest.raises(OSError, match="^--model 'org/name': not found$"):
        with naming_option("--model", "org/name"):
            raise FileNotFoundError("not found")
    with pytest.raises(ValueError, match="^--model 'm': bad$"):
        with naming_option("--model", "m"):
            raise ValueError("bad")
    with pytest.raises(RuntimeError):  # not a recipe error: left alone, traceback and all
        with naming_option("--model", "m"):
            raise RuntimeError("bug")


@pytest.fixture
def root_logging():
    """Restore the root logger after a test that configures it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_main_process_logs_each_message_once(root_logging, capsys):
    configure_logging(is_main_process=True)
    configure_logging(is_main_process=True)  # a second recipe in the same process: still one handler
    logging.getLogger("linear").info("an info line")
    library = logging.getLogger("fake_library")  # like huggingface_hub: its own handler, and it propagates
    own = logging.StreamHandler(sys.stderr)
    library.addHandler(own)
    try:
        logging.getLogger("fake_library.download").warning("Retrying in 1s")
    finally:
        library.removeHandler(own)
    err = capsys.readouterr().err
    assert err.count("an info line") == 1 and err.count("Retrying in 1s") == 1, err


def test_other_processes_log_errors_only():
    """configure_logging(False) in a fresh process: warnings, library notices and progress bars are dropped, errors
    stay."""
    code = (
        "import logging, warnings\n"
        "from common.loop import configure_logging\n"
        "configure_logging(is_main_process=False)\n"
        "logging.getLogger('linear').warning('a warning')\n"
        "logging.getLogger('linear').error('an error')\n"
        "warnings.warn('a python warning')\n"
        "import transformers\n"
        "transformers.utils.logging.get_logger('transformers.x').warning('a transformers notice')\n"
        "import huggingface_hub\n"
        "logging.getLogger('huggingface_hub.x').warning('a hub notice')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(RECIPES)}
    for variable in ("TRANSFORMERS_VERBOSITY", "HF_HUB_VERBOSITY"):
        env.pop(variable, None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "an error" in proc.stderr
    for dropped in ("a warning", "a python warning", "a transformers notice", "a hub notice"):
        assert dropped not in proc.stderr, proc.stderr


# ---- divergence ------------------------------------------------------------------------------------------------------
def _all_finite(path: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(str(path)).values())


def _diverged(out: Path, recipe: LinearRecipe, **overrides: Any) -> str:
    with pytest.raises(SystemExit) as info:
        run_recipe(recipe, settings(out, **overrides))
    message = str(info.value.code)
    assert "\n" not in message and message.startswith("linear: error: "), message
    assert not (out / "results.json").exists() and not (out / "model.safetensors").exists()
    for name in checkpoints(out):
        assert _all_finite(out / "checkpoints" / name / "model.safetensors"), name
    return message


def test_nan_loss_stops_at_the_next_check_and_names_its_step(tmp_path):
    """NaN at micro-step 6 (optimizer step 4): checked without a device sync per micro-batch, found at the log of
    step 5, reported as step 4; the checkpoint of step 3 is the last one and nothing is saved after it."""
    out = tmp_path / "run"
    message = _diverged(out, LinearRecipe(nan_loss_at=6), save_steps=3, logging_steps=5, eval_steps=0)
    assert message.startswith("linear: error: the loss became NaN at step 4 (of 14; peak learning rate 0.01)"), message
    assert "lower --learning_rate" in message
    assert f"the last good checkpoint is {out / 'checkpoints' / 'step_00000003'}" in message
    assert checkpoints(out) == ["step_00000003"]
    assert math.isnan([r for r in metrics(out) if "loss" in r][-1]["loss"])  # the log line of step 5 is written


def test_non_finite_gradients_stop_the_run(tmp_path):
    """Inf gradients at step 3 with a finite loss: clipping turns them into NaN parameters, found at step 3."""
    out = tmp_path / "run"
    message = _diverged(out, LinearRecipe(inf_grad_at=4), logging_steps=1, save_steps=2, eval_steps=0)
    assert message.startswith("linear: error: the trained parameters became NaN at step 3 (e.g. '0.weight', "), message
    assert "the loss stayed finite" in message and "step_00000002" in message
    assert checkpoints(out) == ["step_00000002"]


def test_a_learning_rate_far_too_high_diverges_with_advice(tmp_path):
    out = tmp_path / "run"
    message = _diverged(out, LinearRecipe(optimizer="sgd", lr=1e4, lr_decay=1.0), max_grad_norm=None, save_steps=0,
                        eval_steps=0)
    assert "peak learning rate 10000" in message
    assert "lower --learning_rate" in message and "clip the gradients with --max_grad_norm" in message
    assert "no checkpoint was saved" in message


def test_non_finite_evaluation_metric_stops_before_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    message = _diverged(out, LinearRecipe(nan_metric_at=6))
    assert message.startswith("linear: error: the evaluation at step 6 gave mse = NaN"), message
    assert checkpoints(out) == []  # step 6 is the first checkpoint: refused


def _rewrite_manifest(checkpoint: Path) -> None:
    """Make a hand-edited checkpoint consistent again, as one written with those values would be."""
    if (checkpoint / "manifest.json").is_file():
        from common.checkpoint import write_manifest

        write_manifest(checkpoint, json.loads((checkpoint / "manifest.json").read_text())["num_processes"])


@pytest.mark.parametrize("poisoned", ["model", "optimizer"])
def test_resume_from_a_checkpoint_with_non_finite_values_is_refused(tmp_path, poisoned):
    out = tmp_path / "run"
    assert run_recipe(LinearRecipe(), settings(out, stop_after_steps=2)) is None
    checkpoint = out / "checkpoints" / "step_00000002"
    if poisoned == "model":
        weights = load_file(str(checkpoint / "model.safetensors"))
        weights["0.weight"][0, 0] = float("nan")
        save_file(weights, str(checkpoint / "model.safetensors"))
    else:
        state = torch.load(checkpoint / "optimizer.bin", weights_only=True)
        state["state"][0]["exp_avg_sq"][0, 0] = float("inf")
        torch.save(state, checkpoint / "optimizer.bin")
    _rewrite_manifest(checkpoint)
    with pytest.raises(SystemExit) as info:
        run_recipe(LinearRecipe(), settings(out, resume_from_checkpoint="latest"))
    message = str(info.value.code)
    assert message.startswith(f"linear: error: checkpoint {checkpoint} holds non-finite values"), message
    assert ("'0.weight'" if poisoned == "model" else "optimizer state of '0.weight' (exp_avg_sq)") in message
    assert not (out / "results.json").exists()


def test_results_with_non_finite_values_are_not_written(tmp_path):
    from common.run import write_results

    row = {key: 1 for key in RESULTS_SCHEMA} | {"eval": {"accuracy": float("nan")}}
    with pytest.raises(ValueError, match=r"eval\.accuracy = NaN"):
        write_results(tmp_path, row)
    assert not (tmp_path / "results.json").exists()
