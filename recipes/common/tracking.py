"""Metrics that survive the run: JSON lines always (no extra dependency, easy to plot or diff), tensorboard too when
it is installed."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from typing import Any, Union

from accelerate import Accelerator


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None


def _flat_hparams(config: dict[str, Any], prefix: str = "") -> dict[str, Union[int, float, str, bool]]:
    """Tensorboard's hparams take scalars only: flatten mappings (``a.b``), stringify the rest."""
    flat: dict[str, Union[int, float, str, bool]] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat_hparams(value, f"{name}."))
        elif isinstance(value, (int, float, str, bool)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


class MetricsLogger:
    """``log(metrics, step)`` appends a JSON line to ``output_dir/metrics.jsonl`` on the main process and forwards to
    accelerate's trackers when the Accelerator was created with ``log_with``."""

    def __init__(
        self,
        accelerator: Accelerator,
        output_dir: Union[str, Path],
        project_name: str,
        config: dict[str, Any],
        tensorboard: bool = True,
    ) -> None:
        self.accelerator = accelerator
        self.path = Path(output_dir) / "metrics.jsonl"
        self.trackers = bool(tensorboard and accelerator.log_with)
        if self.trackers:
            accelerator.init_trackers(project_name, config=_flat_hparams(config))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.accelerator.is_main_process:
            record = {"step": step, "time": round(time.time(), 3), **metrics}
            with self.path.open("a") as f:
                f.write(json.dumps(record, default=float) + "\n")
        if self.trackers:
            scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            self.accelerator.log(scalars, step=step)

    def close(self) -> None:
        if self.trackers:
            self.accelerator.end_training()
