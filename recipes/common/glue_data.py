"""Data for ``recipes/roberta_glue.py``: GLUE from the hub, local CSV/TSV/JSON-lines files, or the generated smoke
task; column checks and label encoding with errors that say what to change."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from typing import Any, Optional

from datasets import ClassLabel, DatasetDict, Value, load_dataset

from . import glue_smoke
from .glue_tasks import TaskSpec, custom_task, get_task

_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json"}


def _local_format(path: str) -> tuple[str, dict[str, Any]]:
    suffix = Path(path).suffix.lower()
    if suffix not in _FORMATS:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; use .csv, .tsv, .json or .jsonl (JSON lines).")
    if not Path(path).is_file():
        raise ValueError(f"Data file {path!r} not found.")
    # GLUE's own TSVs contain unbalanced quotes: read tab-separated files without quoting.
    return _FORMATS[suffix], ({"delimiter": "\t", "quoting": csv.QUOTE_NONE} if suffix == ".tsv" else {})


def load_raw_datasets(
    task: str,
    *,
    train_file: Optional[str] = None,
    validation_file: Optional[str] = None,
    validation_mismatched_file: Optional[str] = None,
    text_columns: Optional[list[str]] = None,
    label_column: Optional[str] = None,
    num_labels: Optional[int] = None,
    smoke_data: Optional[dict[str, Any]] = None,
    cache_dir: Optional[str] = None,
) -> tuple[DatasetDict, TaskSpec]:
    """The raw splits (``train`` and the task's evaluation splits) and the task spec, with column overrides applied.

    Local files win over the hub; ``task="custom"`` needs them. The hub is only contacted for a GLUE task without
    local files, so the smoke task and local files work offline.
    """
    if task == "custom":
        if not (train_file and validation_file):
            raise ValueError("Task 'custom' needs --train_file and --validation_file.")
        spec = custom_task(list(text_columns or []), label_column or "label", num_labels)
    else:
        spec = get_task(task)
        overrides: dict[str, Any] = {}
        if text_columns:
            overrides["text_columns"] = tuple(text_columns)
        if label_column:
            overrides["label_column"] = label_column
        spec = dataclasses.replace(spec, **overrides)
    if len(spec.text_columns) not in (1, 2):
        raise ValueError(f"--text_columns takes one column or two (a sentence pair), got {list(spec.text_columns)}.")

    if train_file or validation_file:
        if not (train_file and validation_file):
            raise ValueError("Give both --train_file and --validation_file (local data replaces the whole task data).")
        files = {"train": train_file, "validation": validation_file}
        eval_splits = {"": "validation"}
        if validation_mismatched_file:
            if task != "mnli":
                raise ValueError("--validation_mismatched_file only applies to --task mnli.")
            files["validation_mismatched"] = validation_mismatched_file
            eval_splits = {"matched": "validation", "mismatched": "validation_mismatched"}
        elif task == "mnli":
            eval_splits = {"matched": "validation"}
        formats = {split: _local_format(path) for split, path in files.items()}
        if len({fmt for fmt, _ in formats.values()}) != 1 or len({str(kw) for _, kw in formats.values()}) != 1:
            raise ValueError(f"Local data files must share one format, got {files}.")
        fmt, kwargs = next(iter(formats.values()))
        raw = load_dataset(fmt, data_files=files, cache_dir=cache_dir, **kwargs)
        spec = dataclasses.replace(spec, eval_splits=eval_splits)
    elif spec.name == "smoke":
        raw = glue_smoke.smoke_datasets(**(smoke_data or {}))
    elif spec.hub_dataset is not None:
        try:
            raw = load_dataset(*spec.hub_dataset, cache_dir=cache_dir)
        except Exception as exc:  # offline, no cache, hub error: say what to do instead
            raise ValueError(
                f"Could not load GLUE task {spec.name!r} from the hub ({type(exc).__name__}: {exc}). Without internet, "
                "pass the task's files with --train_file/--validation_file, or run the offline --task smoke."
            ) from exc
    else:  # pragma: no cover - every task in the table has a source
        raise ValueError(f"Task {spec.name!r} has no data source; pass --train_file and --validation_file.")

    splits = ["train", *spec.eval_splits.values()]
    for split in splits:
        if split not in raw:
            raise ValueError(f"The data has no {split!r} split (it has {list(raw)}).")
        missing = [c for c in (*spec.text_columns, spec.label_column) if c not in raw[split].column_names]
        if missing:
            raise ValueError(
                f"Column(s) {missing} not found in the {split!r} data of task {spec.name!r}; it has columns "
                f"{raw[split].column_names}. Set --text_columns and --label_column to match your data."
            )
    return DatasetDict({split: raw[split] for split in splits}), spec


def encode_labels(raw: DatasetDict, spec: TaskSpec, num_labels: Optional[int] = None) -> tuple[DatasetDict, TaskSpec]:
    """Make the label column model-ready (class ids, or floats for regression) and fix ``spec.num_labels``.

    String labels map to the task's label names (or, for custom data, the sorted names seen in training). A label the
    task does not have, or ``--num_labels`` that disagrees with the task or the data, is an error naming both counts.
    """
    col = spec.label_column
    if num_labels is not None and spec.num_labels is not None and num_labels != spec.num_labels:
        raise ValueError(
            f"Label count mismatch: --num_labels {num_labels}, but task {spec.name!r} has {spec.num_labels} labels"
            f"{' (' + ', '.join(spec.label_names) + ')' if spec.label_names else ''}."
        )
    wanted = spec.num_labels if spec.num_labels is not None else num_labels
    feature = raw["train"].features[col]

    if wanted == 1:  # regression
        raw = raw.cast_column(col, Value("float32"))
        return raw, dataclasses.replace(spec, num_labels=1)

    names: Optional[tuple[str, ...]] = None
    if isinstance(feature, ClassLabel):
        names = tuple(feature.names)
        seen = None
    else:
        seen = sorted({v for split in raw.values() for v in split[col]}, key=str)
        if any(isinstance(v, float) and not float(v).is_integer() for v in seen):
            if wanted is None:  # non-integer labels in custom data: a regression task
                raw = raw.cast_column(col, Value("float32"))
                return raw, custom_task(list(spec.text_columns), col, 1)
            raise ValueError(
                f"Label column {col!r} holds non-integer values {seen[:5]} but the task is a classification."
            )
        if any(isinstance(v, str) for v in seen):
            names = spec.label_names or tuple(str(v) for v in sorted({v for v in raw["train"][col]}, key=str))
            unknown = [v for v in seen if str(v) not in names]
            if unknown:
                raise ValueError(
                    f"Label count mismatch: label column {col!r} holds {unknown} which task {spec.name!r} does not "
                    f"have (its {len(names)} labels: {list(names)})."
                )
            index = {name: i for i, name in enumerate(names)}
            raw = raw.map(lambda ex: {col: index[str(ex[col])]}, desc="encoding labels")
            seen = sorted(index[str(v)] for v in seen)

    n_data = len(names) if names is not None else int(max(seen)) + 1
    n = wanted if wanted is not None else n_data
    bad = [v for v in (seen or []) if not 0 <= int(v) < n]
    if n_data > n or bad:
        raise ValueError(
            f"Label count mismatch: task {spec.name!r} has {n} labels but the data holds "
            f"{len(names) if names is not None else len(seen)} distinct labels "
            f"({list(names) if names is not None else seen}); "
            "set --num_labels (custom data) or check --label_column."
        )
    raw = raw.cast_column(col, ClassLabel(num_classes=n, names=list(names) if names and len(names) == n else None))
    label_names = names if names and len(names) == n else spec.label_names
    if spec.name == "custom":  # its metrics depend on the class count (F1 when binary)
        spec = custom_task(list(spec.text_columns), col, n)
    return raw, dataclasses.replace(spec, num_labels=n, label_names=label_names)
