"""GLUE task table and metrics for ``recipes/roberta_glue.py``.

Metrics follow GLUE's definitions (the ones the paper's table reports) and are computed with scikit-learn / scipy, so
nothing is downloaded at run time (``evaluate.load("glue", ...)`` would fetch a script from the hub).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
from scipy import stats
from sklearn import metrics as skm


@dataclass(frozen=True)
class TaskSpec:
    """What the recipe needs to know about a task: its columns, labels, metrics and evaluation splits."""

    name: str
    text_columns: tuple[str, ...]
    num_labels: Optional[int]  # 1 = regression; None = infer from the training data
    metrics: tuple[str, ...]
    main_metric: str  # the score used for best-checkpoint tracking (key of the eval dict)
    label_column: str = "label"
    label_names: Optional[tuple[str, ...]] = None  # string labels of local files map to these ids
    # eval-dict suffix -> split name; MNLI has two validation sets (matched, mismatched)
    eval_splits: dict[str, str] = field(default_factory=lambda: {"": "validation"})
    hub_dataset: Optional[tuple[str, str]] = None  # (path, config) for datasets.load_dataset

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1


def _glue(name: str, text_columns: tuple[str, ...], num_labels: int, metrics: tuple[str, ...], main: str,
          **kw: Any) -> TaskSpec:
    return TaskSpec(name, text_columns, num_labels, metrics, main, hub_dataset=("nyu-mll/glue", name), **kw)


_NLI3 = ("entailment", "neutral", "contradiction")  # the ids of GLUE's MNLI on the hub
TASKS: dict[str, TaskSpec] = {
    "cola": _glue("cola", ("sentence",), 2, ("matthews_correlation",), "matthews_correlation",
                  label_names=("unacceptable", "acceptable")),
    "sst2": _glue("sst2", ("sentence",), 2, ("accuracy",), "accuracy", label_names=("negative", "positive")),
    "mrpc": _glue("mrpc", ("sentence1", "sentence2"), 2, ("accuracy", "f1"), "accuracy",
                  label_names=("not_equivalent", "equivalent")),
    "qqp": _glue("qqp", ("question1", "question2"), 2, ("accuracy", "f1"), "accuracy",
                 label_names=("not_duplicate", "duplicate")),
    "stsb": _glue("stsb", ("sentence1", "sentence2"), 1, ("pearson", "spearmanr"), "pearson"),
    "mnli": _glue("mnli", ("premise", "hypothesis"), 3, ("accuracy",), "accuracy_matched", label_names=_NLI3,
                  eval_splits={"matched": "validation_matched", "mismatched": "validation_mismatched"}),
    "qnli": _glue("qnli", ("question", "sentence"), 2, ("accuracy",), "accuracy",
                  label_names=("entailment", "not_entailment")),
    "rte": _glue("rte", ("sentence1", "sentence2"), 2, ("accuracy",), "accuracy",
                 label_names=("entailment", "not_entailment")),
    # The offline default: a generated sentiment-with-negation task (recipes/common/glue_smoke.py).
    "smoke": TaskSpec("smoke", ("sentence",), 2, ("accuracy",), "accuracy", label_names=("negative", "positive")),
}


def get_task(name: str) -> TaskSpec:
    """The spec of a known task; unknown names fail with the list (and a close match)."""
    if name in TASKS:
        return TASKS[name]
    close = difflib.get_close_matches(str(name), [*TASKS, "custom"], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(
        f"Unknown task {name!r}{hint}. Known tasks: {', '.join(TASKS)}; or 'custom' with --train_file, "
        "--validation_file, --text_columns and --label_column for your own data."
    )


def custom_task(text_columns: list[str], label_column: str, num_labels: Optional[int]) -> TaskSpec:
    """A task over local files: accuracy (plus F1 when binary) or Pearson/Spearman for regression (num_labels 1)."""
    if not text_columns:
        raise ValueError("Task 'custom' needs --text_columns (one column, or two for sentence pairs).")
    if num_labels == 1:
        return TaskSpec("custom", tuple(text_columns), 1, ("pearson", "spearmanr"), "pearson",
                        label_column=label_column)
    metrics = ("accuracy", "f1") if num_labels == 2 else ("accuracy",)
    return TaskSpec("custom", tuple(text_columns), num_labels, metrics, "accuracy", label_column=label_column)


# ----------------------------------------------------------------------------------------------------------------------
# Metrics (GLUE's definitions)
# ----------------------------------------------------------------------------------------------------------------------
def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    return float((np.asarray(preds) == np.asarray(labels)).mean())


def f1(preds: np.ndarray, labels: np.ndarray) -> float:
    """F1 of the positive class (label 1), as GLUE reports for MRPC and QQP."""
    return float(skm.f1_score(labels, preds, average="binary", pos_label=1, zero_division=0.0))


def matthews_correlation(preds: np.ndarray, labels: np.ndarray) -> float:
    return float(skm.matthews_corrcoef(labels, preds))


def pearson(preds: np.ndarray, labels: np.ndarray) -> float:
    return float(stats.pearsonr(preds, labels)[0])


def spearmanr(preds: np.ndarray, labels: np.ndarray) -> float:
    return float(stats.spearmanr(preds, labels)[0])


METRIC_FNS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy,
    "f1": f1,
    "matthews_correlation": matthews_correlation,
    "pearson": pearson,
    "spearmanr": spearmanr,
}


def predictions_from_logits(spec: TaskSpec, logits: np.ndarray) -> np.ndarray:
    """Class ids (argmax) for classification, the squeezed score for regression."""
    logits = np.asarray(logits)
    return logits.reshape(-1) if spec.is_regression else logits.argmax(-1)


def compute_metrics(spec: TaskSpec, outputs: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """``outputs``: eval-split suffix -> (predictions, labels). Keys are ``metric`` or ``metric_<suffix>`` (MNLI:
    ``accuracy_matched``, ``accuracy_mismatched``)."""
    result: dict[str, float] = {}
    for suffix, (preds, labels) in outputs.items():
        for name in spec.metrics:
            result[f"{name}_{suffix}" if suffix else name] = METRIC_FNS[name](np.asarray(preds), np.asarray(labels))
    return result
