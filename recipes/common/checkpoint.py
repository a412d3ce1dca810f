"""Resumable checkpoints through accelerate's ``save_state``/``load_state``, holding only what training changes, written
atomically and verified before they are resumed.

accelerate would write every weight of every prepared model each time (gigabytes for a diffusion UNet); an adapter run
only changes the trainable parameters, so a save hook keeps those (plus buffers), and loading checks that every
trainable parameter is in the file instead of trusting a non-strict load.

A save goes to ``checkpoints/.step_XXXXXXXX.partial``; once every process has written its files, the main process adds
``trainer_state.json`` and, last, :data:`MANIFEST` (each file's size and sha256), then renames the directory to
``step_XXXXXXXX``. So a ``step_*`` directory is always a finished save, and a save that dies (kill -9, a full disk)
leaves only the ``.partial`` directory, which the next save removes. Before a resume the checkpoint is compared with its
manifest: ``latest`` takes the newest intact one and warns about each newer broken one; a broken checkpoint named
explicitly is an error. A missing or damaged RNG state file (``random_states_<process>.pkl``) does not make a
checkpoint unusable: the resume goes on with a warning that it cannot be bit-identical (accelerate itself skips an
unreadable RNG state silently).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from accelerate import Accelerator
from safetensors import SafetensorError, safe_open
from torch import nn

from .run import atomic_write_json

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"
#: Written last into a checkpoint: ``{"files": {name: {"bytes": n, "sha256": hex}}, "num_processes": n}``.
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_RNG_STATE = re.compile(r"^random_states_\d+\.pkl$")
_PARTIAL = ".partial"  # a save in progress, or one that died
_REPLACED = ".replaced"  # an earlier save of the same step, while the new one takes its name
_HOOKED = "_gsoft_trainable_only_hooks"

logger = logging.getLogger(__name__)


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


# ---- writing ---------------------------------------------------------------------------------------------------------
def _sha256(path: Path, sync: bool = False) -> str:
    """The file's sha256; ``sync``: also flush it to the disk, so the manifest never describes bytes still in flight."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
        if sync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def _sync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename) to the disk; POSIX only (Windows cannot open a directory)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(directory: Union[str, Path], num_processes: int) -> Path:
    """Describe every file of ``directory`` in :data:`MANIFEST` (written last, atomically): what a finished save holds.
    ``num_processes``: the processes that wrote it (each saves its own RNG state)."""
    directory = Path(directory)
    files = {
        p.relative_to(directory).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p, sync=True)}
        for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST
    }
    atomic_write_json(directory / MANIFEST, {"files": files, "num_processes": num_processes}, durable=True)
    _sync_dir(directory)
    return directory / MANIFEST


def _publish(partial: Path, final: Path) -> None:
    """Give the finished save its ``step_*`` name; an earlier save of the same step is replaced, not merged."""
    if final.exists():
        replaced = final.with_name(f".{final.name}{_REPLACED}")
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
        os.replace(partial, final)
        shutil.rmtree(replaced)
    else:
        os.replace(partial, final)
    _sync_dir(final.parent)


def _unfinished(root: Path) -> list[Path]:
    """Directories left by saves that died (``.partial``) or were replacing an earlier one (``.replaced``)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(".step_") and p.name.endswith((_PARTIAL, _REPLACED)))


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: Union[str, Path],
    step: int,
    trainer_state: dict[str, Any],
    *,
    total_limit: Optional[int] = None,
) -> Path:
    """Save ``output_dir/checkpoints/step_XXXXXXXX`` atomically (call on every process): trainable weights, optimizer,
    scheduler, RNG states, registered objects, ``trainer_state.json`` and the :data:`MANIFEST`; keep the newest
    ``total_limit`` intact checkpoints. The caller makes sure the state is worth saving (finite)."""
    _install_hooks(accelerator)
    root = Path(output_dir) / CHECKPOINTS
    final = root / f"step_{step:08d}"
    partial = root / f".{final.name}{_PARTIAL}"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for stale in _unfinished(root):
            shutil.rmtree(stale)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = dict(trainer_state, step=step)
        (partial / TRAINER_STATE).write_text(json.dumps(state, indent=2, sort_keys=True, default=str) + "\n")
        write_manifest(partial, accelerator.num_processes)
        _publish(partial, final)
        if total_limit is not None and total_limit > 0:
            _prune(root, final, total_limit)
    accelerator.wait_for_everyone()
    return final


def _prune(root: Path, newest: Path, total_limit: int) -> None:
    """Keep ``newest`` and the newest ``total_limit - 1`` other intact checkpoints; the rest go, broken ones included
    (``latest`` never resumes them), so a broken checkpoint never takes the place of an intact one."""
    others = [p for p in _step_dirs(root) if p != newest]
    checks = {p: verify_checkpoint(p, hashes=False) for p in others}
    intact = [p for p in others if checks[p].intact]
    keep = set(intact[max(0, len(intact) - (total_limit - 1)):]) if total_limit > 1 else set()
    for path in others:
        if path in keep:
            continue
        if not checks[path].intact:
            logger.warning("removing the broken checkpoint %s (%s): --checkpoints_total_limit %d keeps intact ones",
                           path, checks[path].describe(), total_limit)
        shutil.rmtree(path)


# ---- checking --------------------------------------------------------------------------------------------------------
@dataclass
class CheckpointCheck:
    """What :func:`verify_checkpoint` found in a checkpoint directory."""

    path: Path
    """The checkpoint directory."""
    problems: list[str] = field(default_factory=list)
    """What makes it unusable: no manifest (an unfinished save), missing, truncated or altered files."""
    rng_problems: list[str] = field(default_factory=list)
    """Missing or altered RNG state files: it resumes, but not bit-identically."""

    @property
    def intact(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        return "; ".join(self.problems)

    def warn_rng(self) -> None:
        """Log that a resume from this checkpoint cannot be bit-identical, when its RNG states are damaged."""
        if self.rng_problems:
            logger.warning(
                "checkpoint %s: %s; the model, optimizer, scheduler and data position resume, but the random draws "
                "(dropout, noise) of those processes continue from the run's start-up seeding instead, so the resumed "
                "run is not bit-identical to an uninterrupted one", self.path, "; ".join(self.rng_problems))


def verify_checkpoint(path: Union[str, Path], *, hashes: bool = True) -> CheckpointCheck:
    """Compare a checkpoint directory with its :data:`MANIFEST`: every file present with its size and (``hashes``)
    sha256, and ``trainer_state.json`` readable. ``hashes=False`` is the quick check (sizes only)."""
    path = Path(path)
    check = CheckpointCheck(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = {str(name): (int(entry["bytes"]), str(entry["sha256"])) for name, entry in manifest["files"].items()}
    except FileNotFoundError:
        check.problems.append(f"no {MANIFEST}, which a finished save writes last")
        return check
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        check.problems.append(f"{MANIFEST} is unreadable ({type(exc).__name__}: {exc})")
        return check
    if TRAINER_STATE not in files:
        check.problems.append(f"its {MANIFEST} lists no {TRAINER_STATE}")
    for name, (size, sha256) in sorted(files.items()):
        file = path / name
        if not file.is_file():
            issue = f"{name} is missing"
        elif file.stat().st_size != size:
            issue = f"{name} has {file.stat().st_size:,} bytes instead of {size:,} (truncated or overwritten)"
        elif hashes and _sha256(file) != sha256:
            issue = f"{name} does not match its sha256 (altered after the save)"
        else:
            continue
        (check.rng_problems if _RNG_STATE.match(Path(name).name) else check.problems).append(issue)
    if check.intact:
        try:
            state = json.loads((path / TRAINER_STATE).read_text())
            if not isinstance(state, dict) or not isinstance(state.get("step"), int):
                raise ValueError("no integer 'step'")
        except (OSError, ValueError) as exc:
            check.problems.append(f"{TRAINER_STATE} is unreadable ({exc})")
    return check


def _step_dirs(root: Path) -> list[Path]:
    """The ``step_*`` directories under ``root``, oldest step first (intact or not)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def newest_intact_checkpoint(output_dir: Union[str, Path], *, hashes: bool = False) -> Optional[Path]:
    """The newest checkpoint of ``output_dir`` that passes :func:`verify_checkpoint` (quick by default), or None."""
    for path in reversed(_step_dirs(Path(output_dir) / CHECKPOINTS)):
        if verify_checkpoint(path, hashes=hashes).intact:
            return path
    return None


def resolve_checkpoint(output_dir: Union[str, Path], spec: Optional[str]) -> Optional[Path]:
    """The checkpoint to resume, verified against its manifest (sizes and sha256; run it on one process).

    ``None``/``""``: no resume. ``"latest"``: the newest intact checkpoint of ``output_dir``, with a warning for each
    newer broken one; ``None`` when there is no checkpoint yet (a job restarted with ``latest`` just starts); an error
    when there are checkpoints but none is intact. Otherwise the given directory, which must be an intact checkpoint.
    A checkpoint with damaged RNG states is used, with a warning (:meth:`CheckpointCheck.warn_rng`)."""
    if not spec:
        return None
    root = Path(output_dir) / CHECKPOINTS
    if spec == "latest":
        for stale in _unfinished(root):
            logger.warning("ignoring %s: a save that did not finish (the next save removes it)", stale)
        broken: list[CheckpointCheck] = []
        for path in reversed(_step_dirs(root)):
            check = verify_checkpoint(path)
            if check.intact:
                for bad in broken:
                    logger.warning("checkpoint %s is broken (%s); resuming from %s, the newest intact checkpoint",
                                   bad.path, bad.describe(), path)
                check.warn_rng()
                return path
            broken.append(check)
        if not broken:
            return None
        details = "; ".join(f"{bad.path.name}: {bad.describe()}" for bad in broken)
        raise ValueError(
            f"--resume_from_checkpoint latest: no intact checkpoint in {root} ({details}). Delete the broken "
            "checkpoints to start again from step 0, or pass --overwrite_output_dir."
        )
    path = Path(spec)
    if not ((path / MANIFEST).is_file() or (path / TRAINER_STATE).is_file()):
        raise ValueError(
            f"--resume_from_checkpoint {spec!r} is not a checkpoint directory (no {MANIFEST} or {TRAINER_STATE}); "
            f"pass 'latest' or one of the step_* directories under {root}."
        )
    check = verify_checkpoint(path)
    if not check.intact:
        raise ValueError(
            f"--resume_from_checkpoint {spec!r} is broken: {check.describe()}. Resume from another checkpoint: "
            f"'latest' takes the newest intact one under {root}."
        )
    check.warn_rng()
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
    """Restore a :func:`save_checkpoint` directory into the prepared objects; returns its trainer state.

    The files are checked against the manifest by size here (on every process; :func:`resolve_checkpoint` checks the
    hashes once), so a broken checkpoint is one error naming the file, never a parser's traceback."""
    _install_hooks(accelerator)
    path = Path(path)
    check = verify_checkpoint(path, hashes=False)
    if not check.intact:
        raise ValueError(f"checkpoint {path} is broken: {check.describe()}. Resume from another checkpoint "
                         "('latest' takes the newest intact one).")
    for i, model in enumerate(accelerator._models):
        file = path / (f"model_{i}.safetensors" if i else "model.safetensors")
        if not file.is_file():
            raise ValueError(f"Checkpoint {path} has no {file.name}; it was not written by this recipe.")
        try:
            with safe_open(str(file), framework="pt") as f:
                saved = set(f.keys())
        except SafetensorError as exc:
            raise ValueError(f"checkpoint {path}: {file.name} is not a readable safetensors file ({exc}).") from exc
        wanted = {name for name, p in model.named_parameters() if p.requires_grad}
        missing = sorted(wanted - saved)
        if missing:
            raise ValueError(
                f"Checkpoint {path} does not match the model: {len(missing)} trainable parameters are missing "
                f"(e.g. {missing[:3]}). Was it made with another --method or adapter settings?"
            )
    try:
        accelerator.load_state(str(path), strict=False)
    except (OSError, EOFError, RuntimeError, KeyError, pickle.UnpicklingError, SafetensorError) as exc:
        raise ValueError(f"checkpoint {path} could not be loaded: {type(exc).__name__}: {exc}") from exc
    return json.loads((path / TRAINER_STATE).read_text())
