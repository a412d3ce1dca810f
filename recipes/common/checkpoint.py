"""Resumable checkpoints through accelerate's ``save_state``/``load_state``, holding only what training changes.

accelerate would write every weight of every prepared model each time (gigabytes for a diffusion UNet); an adapter run
only changes the trainable parameters, so a save hook keeps those (plus buffers), and loading checks that every
trainable parameter is in the file instead of trusting a non-strict load.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any, Optional, Union

from accelerate import Accelerator
from safetensors import safe_open
from torch import nn

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_HOOKED = "_gsoft_trainable_only_hooks"


def _trainable_keys(model: nn.Module) -> set[str]:
    keys = {name for name, p in model.named_parameters() if p.requires_grad}
    keys |= {name for name, _ in model.named_buffers()}
    return keys


def _keep_trainable(models: list[nn.Module], weights: list[dict[str, Any]], output_dir: str) -> None:
    for i, (model, state) in enumerate(zip(models, weights)):
        keep = _trainable_keys(model)
        weights[i] = {k: v for k, v in state.items() if k in keep}


def _install_hooks(accelerator: Accelerator) -> None:
    if not getattr(accelerator, _HOOKED, False):
        accelerator.register_save_state_pre_hook(_keep_trainable)
        setattr(accelerator, _HOOKED, True)


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: Union[str, Path],
    step: int,
    trainer_state: dict[str, Any],
    *,
    total_limit: Optional[int] = None,
) -> Path:
    """Save ``output_dir/checkpoints/step_XXXXXXXX`` (call on every process): trainable weights, optimizer,
    scheduler, RNG states, registered objects, and ``trainer_state.json``; keep the newest ``total_limit``."""
    _install_hooks(accelerator)
    path = Path(output_dir) / CHECKPOINTS / f"step_{step:08d}"
    accelerator.wait_for_everyone()
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        state = dict(trainer_state, step=step)
        (path / TRAINER_STATE).write_text(json.dumps(state, indent=2, sort_keys=True, default=str) + "\n")
        if total_limit is not None and total_limit > 0:
            for old in _list_checkpoints(Path(output_dir))[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


def _list_checkpoints(output_dir: Path) -> list[Path]:
    root = output_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / TRAINER_STATE).is_file()]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(output_dir: Union[str, Path], spec: Optional[str]) -> Optional[Path]:
    """``None``/``""`` -> no resume; ``"latest"`` -> newest complete checkpoint of ``output_dir`` (``None`` if there
    is none yet, so a job restarted with ``latest`` just starts); otherwise the given checkpoint directory."""
    if not spec:
        return None
    if spec == "latest":
        found = _list_checkpoints(Path(output_dir))
        return found[-1] if found else None
    path = Path(spec)
    if not (path / TRAINER_STATE).is_file():
        raise ValueError(
            f"--resume_from_checkpoint {spec!r} is not a checkpoint directory (no {TRAINER_STATE}); pass 'latest' or "
            f"one of the step_* directories under {Path(output_dir) / CHECKPOINTS}."
        )
    return path


def resume_position(step: int, batches_per_epoch: int, gradient_accumulation_steps: int) -> tuple[int, int]:
    """Where optimizer step ``step`` leaves the data: ``(epoch, micro-batches of that epoch already consumed)``.

    Pass the second number to ``accelerator.skip_first_batches`` in that epoch. An epoch ends with a partial
    accumulation window when ``batches_per_epoch`` is not a multiple of the accumulation (accelerate syncs at the end
    of the loader), so an epoch has ``ceil(batches / accumulation)`` optimizer steps.
    """
    if batches_per_epoch < 1 or gradient_accumulation_steps < 1:
        raise ValueError(f"need batches_per_epoch >= 1 and gradient_accumulation_steps >= 1, got "
                         f"{batches_per_epoch}, {gradient_accumulation_steps}")
    steps_per_epoch = math.ceil(batches_per_epoch / gradient_accumulation_steps)
    epoch, steps_in_epoch = divmod(step, steps_per_epoch)
    return epoch, steps_in_epoch * gradient_accumulation_steps


def load_checkpoint(accelerator: Accelerator, path: Union[str, Path]) -> dict[str, Any]:
    """Restore a :func:`save_checkpoint` directory into the prepared objects; returns its trainer state."""
    _install_hooks(accelerator)
    path = Path(path)
    for i, model in enumerate(accelerator._models):
        file = path / (f"model_{i}.safetensors" if i else "model.safetensors")
        if not file.is_file():
            raise ValueError(f"Checkpoint {path} has no {file.name}; it was not written by this recipe.")
        with safe_open(str(file), framework="pt") as f:
            saved = set(f.keys())
        wanted = {name for name, p in model.named_parameters() if p.requires_grad}
        missing = sorted(wanted - saved)
        if missing:
            raise ValueError(
                f"Checkpoint {path} does not match the model: {len(missing)} trainable parameters are missing "
                f"(e.g. {missing[:3]}). Was it made with another --method or adapter settings?"
            )
    accelerator.load_state(str(path), strict=False)
    return json.loads((path / TRAINER_STATE).read_text())
