"""Data for ``recipes/roberta_glue.py``: GLUE from the hub, local CSV/TSV/JSON-lines files, or the generated smoke
task; column checks and label encoding with errors that say what to change.

A local file is read and checked line by line before ``datasets`` loads it, so that every problem (not UTF-8, a header
without examples, a row with the wrong number of fields, an empty label or text, a line that is not JSON, a missing
column) is one error that starts with the file's name, gives the line and says what to fix.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from datasets import ClassLabel, Dataset, DatasetDict, Value, load_dataset

from . import glue_smoke
from .glue_tasks import TaskSpec, custom_task, get_task

_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json"}
#: The option that names each local split's file.
FILE_OPTIONS = {"train": "--train_file", "validation": "--validation_file",
                "validation_mismatched": "--validation_mismatched_file"}
_JSON_EXAMPLE = '{"sentence": "a fine film", "label": 1}'


def _local_format(path: str, option: str) -> tuple[str, dict[str, Any]]:
    """``datasets``' loader name and keyword arguments for a local file."""
    suffix = Path(path).suffix.lower()
    if suffix not in _FORMATS:
        raise ValueError(f"{option} {path}: unsupported file type {suffix!r}; use .csv, .tsv, .json or .jsonl "
                         "(JSON lines).")
    if not Path(path).is_file():
        raise ValueError(f"{option} {path}: no such file; check the path.")
    if _FORMATS[suffix] == "json":
        return "json", {}
    # GLUE's own TSVs contain unbalanced quotes: read tab-separated files without quoting. Cells stay text as
    # written: pandas would otherwise read words such as NA, null or n/a as missing values.
    kwargs: dict[str, Any] = {"keep_default_na": False}
    if suffix == ".tsv":
        kwargs.update(delimiter="\t", quoting=csv.QUOTE_NONE)
    return "csv", kwargs


def _problem(path: str, where: str, what: str) -> ValueError:
    return ValueError(f"{path}: {where}{': ' if where else ''}{what}")


def _decode(path: str) -> str:
    """The file's text; not UTF-8 (a latin-1 export, say) is an error naming the first bad line."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise _problem(path, "", f"line {line} is not UTF-8 (byte 0x{data[exc.start]:02x}); save the file as UTF-8 "
                                 "(e.g. iconv -f latin1 -t utf-8 old.csv > new.csv).") from None


def _check_columns(path: str, have: Sequence[str], text_columns: Sequence[str], label_column: str) -> None:
    missing = [c for c in (*text_columns, label_column) if c not in have]
    if missing:
        raise _problem(path, "", f"column(s) {missing} not found; it has columns {list(have)}. Set --text_columns "
                                 "and --label_column to match your data, or rename the columns.")


def _check_cell(path: str, where: str, column: str, value: Any, is_label: bool, label_kind: dict[str, Any]) -> None:
    """One example's text or label: present, not empty; a text is a string; labels are all numbers or all names."""
    role = "label" if is_label else "text"
    if value is None or (isinstance(value, str) and not value.strip()):
        raise _problem(path, where, f"the {role} {column!r} is empty; fill it in or remove the example (every "
                                    f"example needs a {role}).")
    if not is_label:
        if not isinstance(value, str):
            raise _problem(path, where, f"the text {column!r} is {value!r}, not a string; write it in quotes.")
        return
    if isinstance(value, (bool, list, dict)):
        raise _problem(path, where, f"the label {column!r} is {value!r}; use a class number, a class name or (for "
                                    "regression) a score.")
    kind = "string" if isinstance(value, str) else "number"
    first = label_kind.setdefault("kind", (kind, where))
    if first[0] != kind:
        raise _problem(path, where, f"the label {column!r} is a {kind} but {first[1]}'s is a {first[0]}; use one kind "
                                    "for every label (all class numbers or all class names).")


def _rows_csv(path: str, text: str, kwargs: dict[str, Any]) -> Iterator[tuple[str, dict[str, str]]]:
    """(line, cells by column) of a CSV/TSV file, after checking its header and the field count of every row."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=kwargs.get("delimiter", ","),
                        quoting=kwargs.get("quoting", csv.QUOTE_MINIMAL))
    try:
        rows = [(reader.line_num, row) for row in reader if row]
    except csv.Error as exc:
        raise _problem(path, f"line {reader.line_num}", f"{exc}; check the quoting of that line.") from None
    if not rows:
        raise _problem(path, "", "the file is empty; it needs a header row naming the columns and one example per "
                                 "line.")
    (_, header), body = rows[0], rows[1:]
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise _problem(path, "", f"the header names column {name!r} twice; give every column its own name.")
        seen.add(name)
    if not body:
        raise _problem(path, "", f"only a header row ({', '.join(header)}) and no examples; add one example per "
                                 "line.")
    for line, row in body:
        if len(row) != len(header):
            raise _problem(path, "", f"line {line} has {len(row)} field{'s' if len(row) != 1 else ''} but the header "
                                     f"has {len(header)} ({', '.join(header)}); check the delimiter and the quoting "
                                     "of that line.")
        yield f"line {line}", dict(zip(header, row))


def _rows_json(path: str, text: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(line or record, object) of a JSON-lines file, or of a JSON array of objects."""
    if text.lstrip().startswith("["):  # one JSON array of objects, which datasets also reads
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _problem(path, "", f"not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
                                     f"write one object per line instead, such as {_JSON_EXAMPLE}.") from None
        numbered = [(f"record {i}", record) for i, record in enumerate(records, 1)]
    else:
        numbered = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                numbered.append((f"line {i}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise _problem(path, "", f"line {i} is not valid JSON ({exc.msg} at column {exc.colno}); each line "
                                         f"must be one JSON object, such as {_JSON_EXAMPLE}.") from None
    if not numbered:
        raise _problem(path, "", f"the file is empty; it needs one JSON object per line, such as {_JSON_EXAMPLE}.")
    for where, record in numbered:
        if not isinstance(record, dict):
            raise _problem(path, "", f"{where} is not a JSON object but {type(record).__name__} {record!r:.60}; each "
                                     f"example must be an object, such as {_JSON_EXAMPLE}.")
        yield where, record


def check_local_file(path: str, option: str, text_columns: Sequence[str], label_column: str) -> tuple[str, dict]:
    """Read a local data file once and check it (see the module docstring); ``datasets``' loader name and keyword
    arguments for it."""
    fmt, kwargs = _local_format(path, option)
    text = _decode(path)
    if not text.strip():
        raise _problem(path, "", "the file is empty; it needs a header row naming the columns and one example per "
                                 "line." if fmt == "csv" else
                       f"the file is empty; it needs one JSON object per line, such as {_JSON_EXAMPLE}.")
    rows = _rows_csv(path, text, kwargs) if fmt == "csv" else _rows_json(path, text)
    columns = (*text_columns, label_column)
    label_kind: dict[str, Any] = {}
    have: Optional[list[str]] = None
    for where, record in rows:
        if have is None:  # the first example (CSV: the header) fixes the columns
            have = list(record)
            _check_columns(path, have, text_columns, label_column)
        for column in columns:
            if column not in record:
                raise _problem(path, "", f"{where} has no {column!r} key (it has {', '.join(record)}); every example "
                                         "needs every text column and the label.")
            _check_cell(path, where, column, record[column], column == label_column, label_kind)
    return fmt, kwargs


def load_local_file(path: str, option: str, text_columns: Sequence[str], label_column: str,
                    cache_dir: Optional[str] = None) -> Dataset:
    """One checked local file as a dataset, its text columns as strings (a column of numbers stays text)."""
    fmt, kwargs = check_local_file(path, option, text_columns, label_column)
    try:
        data = load_dataset(fmt, data_files={"data": path}, cache_dir=cache_dir, **kwargs)["data"]
    except Exception as exc:  # what the checks above do not foresee: still one line that names the file
        cause = exc
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        raise _problem(path, "", f"datasets cannot read it ({type(cause).__name__}: {cause}); check that it is "
                                 f"{'comma- or tab-separated text' if fmt == 'csv' else 'JSON lines'}.") from exc
    for column in text_columns:
        if data.features[column] != Value("string"):
            data = data.cast_column(column, Value("string"))
    return data


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
        # Each file is checked and loaded on its own: an error names it, and columns the task does not use may differ.
        raw = DatasetDict({split: load_local_file(path, FILE_OPTIONS[split], spec.text_columns, spec.label_column,
                                                  cache_dir)
                           for split, path in files.items()})
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
