"""Damaged checkpoints (recipes/common/checkpoint.py through the loop of tests/test_loop.py's fake recipe).

Covers: a checkpoint is written atomically (a save that dies leaves no step directory) with a manifest of its files'
sizes and sha256 written last; a truncated or altered model, optimizer, scheduler or trainer state, or a missing
manifest, makes ``latest`` fall back to the newest intact checkpoint with a warning naming the broken one (and the
resumed run still equals the uninterrupted one bit for bit); a broken checkpoint named explicitly, no intact one
under ``latest``, or a file that matches its manifest but does not parse, is one error line; a missing or damaged RNG state resumes with a warning that the resume is not
bit-identical; ``checkpoints_total_limit`` never keeps a broken checkpoint in place of an intact one.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from common.checkpoint import MANIFEST, resolve_checkpoint, save_checkpoint, write_manifest
from common.loop import run_recipe
from test_loop import LinearRecipe, checkpoints, settings

COMMON: dict[str, Any] = dict(eval_steps=3, save_steps=2)  # checkpoints at steps 2, 4, 6, ...


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, Any]:
    return run_recipe(LinearRecipe(), settings(tmp_path_factory.mktemp("full") / "run", **COMMON))


@pytest.fixture
def stopped(tmp_path) -> Path:
    """A run stopped after step 6: checkpoints at steps 2, 4 and 6."""
    out = tmp_path / "run"
    assert run_recipe(LinearRecipe(), settings(out, stop_after_steps=6, **COMMON)) is None
    assert checkpoints(out) == ["step_00000002", "step_00000004", "step_00000006"]
    return out


def _step(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step_{step:08d}"


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _resume(out: Path, recipe: LinearRecipe, spec: str = "latest", **overrides: Any) -> dict[str, Any]:
    return run_recipe(recipe, settings(out, resume_from_checkpoint=spec, **{**COMMON, **overrides}))


def _error(out: Path, spec: str = "latest") -> str:
    with pytest.raises(SystemExit) as info:
        _resume(out, LinearRecipe(), spec)
    message = str(info.value.code)
    assert "\n" not in message and message.startswith("linear: error: "), message
    return message


def test_a_checkpoint_lists_its_files_in_a_manifest(stopped):
    path = _step(stopped, 6)
    manifest = json.loads((path / MANIFEST).read_text())
    files = sorted(p.name for p in path.iterdir() if p.name != MANIFEST)
    assert sorted(manifest["files"]) == files and "trainer_state.json" in files and "random_states_0.pkl" in files
    import hashlib

    for name, entry in manifest["files"].items():
        data = (path / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert manifest["num_processes"] == 1


@pytest.mark.parametrize("damage", [
    ("model.safetensors", _truncate, "model.safetensors has"),
    ("optimizer.bin", _truncate, "optimizer.bin has"),
    ("scheduler.bin", _truncate, "scheduler.bin has"),
    ("trainer_state.json", _truncate, "trainer_state.json has"),
    ("model.safetensors", _flip_a_byte, "model.safetensors does not match its sha256"),
    (MANIFEST, lambda path: path.unlink(), f"no {MANIFEST}"),
], ids=["model", "optimizer", "scheduler", "trainer_state", "bit_flip", "no_manifest"])
def test_latest_falls_back_to_the_newest_intact_checkpoint(stopped, uninterrupted, caplog, damage):
    name, corrupt, reason = damage
    corrupt(_step(stopped, 6) / name)
    recipe = LinearRecipe()
    with caplog.at_level(logging.WARNING):
        resumed = _resume(stopped, recipe)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "broken" in r.getMessage()]
    assert len(warnings) == 1 and str(_step(stopped, 6)) in warnings[0] and reason in warnings[0], warnings
    assert str(_step(stopped, 4)) in warnings[0]  # where it resumes from
    assert recipe.micro_steps[0] == 8  # step 4, not 6
    assert resumed["rank_state_sha256"] == uninterrupted["rank_state_sha256"]  # still exact
    assert resumed["final_loss"] == uninterrupted["final_loss"]
    assert MANIFEST in {p.name for p in _step(stopped, 6).iterdir()}  # step 6 was saved again, intact


def test_a_broken_checkpoint_named_explicitly_is_one_line(stopped):
    path = _step(stopped, 6)
    _truncate(path / "model.safetensors")
    message = _error(stopped, str(path))
    assert message.startswith(f"linear: error: --resume_from_checkpoint {str(path)!r} is broken: model.safetensors "
                              "has "), message
    assert "'latest'" in message  # what to do instead


def test_a_file_that_matches_its_manifest_but_does_not_parse_is_one_line(stopped):
    """Damaged before the manifest was written (or the manifest rewritten by hand): the parser's error, in one line
    naming the checkpoint."""
    path = _step(stopped, 6)
    _truncate(path / "optimizer.bin")
    write_manifest(path, 1)
    message = _error(stopped, str(path))
    assert message.startswith(f"linear: error: checkpoint {path} could not be loaded: "), message


def test_latest_without_an_intact_checkpoint_is_one_line(stopped):
    for step in (2, 4, 6):
        _truncate(_step(stopped, step) / "optimizer.bin")
    message = _error(stopped)
    assert message.startswith("linear: error: --resume_from_checkpoint latest: no intact checkpoint in"), message
    assert all(f"step_{s:08d}" in message for s in (2, 4, 6))


@pytest.mark.parametrize("damage", ["missing", "garbage"])
def test_a_damaged_rng_state_resumes_with_a_warning_that_it_is_not_exact(stopped, caplog, damage):
    rng = _step(stopped, 6) / "random_states_0.pkl"
    if damage == "missing":
        rng.unlink()
    else:
        rng.write_bytes(b"not a pickle" * 10)
    recipe = LinearRecipe()
    with caplog.at_level(logging.WARNING):
        resumed = _resume(stopped, recipe)
    assert recipe.micro_steps[0] == 12  # the model, optimizer and data position of step 6 are intact: used
    warnings = [r.getMessage() for r in caplog.records if "bit-identical" in r.getMessage()]
    assert len(warnings) == 1 and "random_states_0.pkl" in warnings[0] and str(_step(stopped, 6)) in warnings[0]
    assert resumed["train_steps"] == 14


def test_an_interrupted_save_leaves_no_step_directory(tmp_path, monkeypatch, caplog):
    """A save that dies part-way (kill -9, a full disk) leaves only its temporary directory, which ``latest``
    ignores and the next save removes."""
    out = tmp_path / "run"
    save_state = Accelerator.save_state

    def dies_at_step_6(self, output_dir=None, **kwargs):
        location = save_state(self, output_dir, **kwargs)
        if "00000006" in str(output_dir):
            raise OSError(28, "No space left on device")
        return location

    monkeypatch.setattr(Accelerator, "save_state", dies_at_step_6)
    with pytest.raises(SystemExit, match="No space left on device"):
        run_recipe(LinearRecipe(), settings(out, **COMMON))
    monkeypatch.undo()
    assert checkpoints(out) == [".step_00000006.partial", "step_00000002", "step_00000004"]
    recipe = LinearRecipe()
    with caplog.at_level(logging.WARNING):
        _resume(out, recipe)
    assert recipe.micro_steps[0] == 8
    assert any(".step_00000006.partial" in r.getMessage() for r in caplog.records)
    assert checkpoints(out) == [f"step_{s:08d}" for s in range(2, 15, 2)]


def _tiny_setup() -> tuple[Accelerator, nn.Module]:
    accelerator = Accelerator(cpu=True)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model


def test_total_limit_never_keeps_a_broken_checkpoint_in_place_of_an_intact_one(tmp_path, caplog):
    accelerator, _ = _tiny_setup()
    for step in (1, 2):
        save_checkpoint(accelerator, tmp_path, step, {})
    shutil.copytree(_step(tmp_path, 2), _step(tmp_path, 9))  # a newer checkpoint, then damaged
    _truncate(_step(tmp_path, 9) / "model.safetensors")
    with caplog.at_level(logging.WARNING):
        save_checkpoint(accelerator, tmp_path, 3, {}, total_limit=2)
    assert checkpoints(tmp_path) == ["step_00000002", "step_00000003"]
    assert any("step_00000009" in r.getMessage() and "broken" in r.getMessage() for r in caplog.records)
    assert resolve_checkpoint(tmp_path, "latest") == _step(tmp_path, 3)


def test_saving_a_step_again_replaces_it(tmp_path):
    accelerator, model = _tiny_setup()
    save_checkpoint(accelerator, tmp_path, 1, {"attempt": 1})
    save_checkpoint(accelerator, tmp_path, 1, {"attempt": 2})
    assert checkpoints(tmp_path) == ["step_00000001"]
    assert json.loads((_step(tmp_path, 1) / "trainer_state.json").read_text()) == {"attempt": 2, "step": 1}
