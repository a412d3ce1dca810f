#!/usr/bin/env python
"""Fine-tune RoBERTa (or any encoder) on GLUE with GSOFT, Double GSOFT, LoRA, OFT, BOFT or full fine-tuning.

    accelerate launch -q recipes/roberta_glue.py --config configs/glue/rte.yaml [--key value ...]
    accelerate launch -q recipes/roberta_glue.py --config configs/glue/smoke.yaml   # offline, ~1 minute on a CPU
    python recipes/roberta_glue.py --config configs/glue/smoke.yaml --method lora  # plain python works too

The manual (options, outputs, results.json, several processes) is recipes/README.md with recipes/roberta_glue.md.

Modelled on transformers' ``run_glue_no_trainer.py``. This file holds what is GLUE's own: the data (hub GLUE, local
files or the generated smoke task), the tokenizer and base model (loaded, or built from ``--model_config``), the
adapter (``common.apply_method``), the loss and the task's metrics, the adapter saved with ``save_pretrained``
(loadable with ``PeftModel.from_pretrained``). The run itself (accelerate, resume, communication between processes,
checkpoints, logging, results.json) is the recipes' shared skeleton, ``common.run_recipe``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from common.extras import needs

with needs("glue", "roberta_glue"):  # a missing package is one line naming the extra that installs it
    import datasets
    import transformers
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import (
        AutoConfig,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        PretrainedConfig,
        PreTrainedTokenizerBase,
        get_scheduler,
    )

    from gsoft.export import writing_dir
    from gsoft.tuner import TARGET_MODULES_MAPPING

    from common.args import (
        MIXED_PRECISIONS,
        SEED_RANGE,
        check_model_path,
        check_options,
        parse_recipe_args,
    )
    from common.communication import CommunicationArgs, check_communication_args
    from common.loop import (
        LoopOptions, Recipe, TrainLoop, Trainables, format_metrics, naming_option, run_recipe,
    )
    from common.methods import GSOFT_METHODS, METHODS, apply_method, check_method_choice, target_modules_value
    from common.volunteer import VolunteerArgs, loop_class, volunteer_config
    from common import glue_smoke
    from common.glue_data import encode_labels, load_raw_datasets
    from common.glue_tasks import TaskSpec, compute_metrics, predictions_from_logits

NAME = "roberta_glue"
logger = logging.getLogger(NAME)

BASE_MODEL_DIR = "base_model"  # a model built from --model_config (and its tokenizer) is saved here, then loaded
#: transformers' schedules that the recipe can drive: built from the warm-up and total steps alone, stepped without a
#: metric (reduce_lr_on_plateau, greedy and the min-lr / warmup-stable-decay ones need more).
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt")
#: Files of a saved tokenizer; a local model directory with none of them has no tokenizer of its own.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "merges.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.model")


@dataclass
class _GlueOptions:
    """The recipe's own options; :class:`GlueArgs` adds the communication ones (``common.CommunicationArgs``)."""

    # --- data ---
    task: str = field(
        default="smoke",
        metadata={"help": "cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, smoke (offline, generated), or custom (local "
                          "files)."},
    )
    train_file: Optional[str] = field(
        default=None,
        metadata={"help": "Local training data (.csv, .tsv, .json/.jsonl JSON lines); replaces the hub data."},
    )
    validation_file: Optional[str] = field(
        default=None,
        metadata={"help": "Local validation data, same format as --train_file (MNLI: the matched set)."},
    )
    validation_mismatched_file: Optional[str] = field(
        default=None,
        metadata={"help": "MNLI only: local mismatched validation data."},
    )
    text_columns: list[str] = field(
        default_factory=list,
        metadata={"help": "Text column(s), one or a sentence pair; empty = the task's (GLUE's names)."},
    )
    label_column: Optional[str] = field(default=None, metadata={"help": "Label column; null = the task's ('label')."})
    num_labels: Optional[int] = field(
        default=None,
        metadata={"help": "Custom data: number of classes (1 = regression); null = inferred. GLUE tasks fix it.",
                  "min": 1},
    )
    smoke_data: dict = field(
        default_factory=dict,
        metadata={"help": "Task smoke only: keyword arguments of glue_smoke.smoke_datasets (n_train, n_validation, "
                          "seed, noise)."},
    )
    max_train_samples: Optional[int] = field(
        default=None,
        metadata={"help": "Use only the first N training examples (quick tries).", "min": 1},
    )
    max_eval_samples: Optional[int] = field(
        default=None,
        metadata={"help": "Use only the first N examples of each evaluation split.", "min": 1},
    )
    max_seq_length: int = field(
        default=128,
        metadata={"help": "Truncate inputs to this many tokens (batches are padded dynamically).", "min": 1},
    )
    cache_dir: Optional[str] = field(
        default=None,
        metadata={"help": "Cache directory for datasets and models from the hub."},
    )
    # --- model ---
    model_name_or_path: str = field(
        default="roberta-base",
        metadata={"help": "Hub name or local directory of the encoder (ignored with --model_config)."},
    )
    model_config: dict = field(
        default_factory=dict,
        metadata={"help": "Build a randomly initialised model from this config instead (needs model_type, e.g. "
                          "{model_type: roberta, hidden_size: 64}); saved to <output_dir>/base_model."},
    )
    tokenizer_name: Optional[str] = field(
        default=None,
        metadata={"help": "Tokenizer hub name or directory; null = the model's, or with --model_config a word-level "
                          "tokenizer trained on the training texts."},
    )
    base_pretrain_steps: int = field(
        default=0,
        metadata={"help": "With --model_config: first train the whole model this many steps on "
                          "--base_pretrain_label_column (a stand-in for pretraining).", "min": 0},
    )
    base_pretrain_label_column: Optional[str] = field(
        default=None,
        metadata={"help": "Label column of the training data for the stand-in pretraining."},
    )
    base_pretrain_learning_rate: float = field(
        default=1e-3,
        metadata={"help": "Learning rate of the stand-in pretraining.", "above": 0},
    )
    classifier_dropout: Optional[float] = field(
        default=None,
        metadata={"help": "Dropout of the classification head; null = the model config's.", "min": 0, "below": 1},
    )
    # --- method ---
    method: str = field(default="gsoft", metadata={"help": f"One of {', '.join(METHODS)}."})
    method_options: dict = field(
        default_factory=dict,
        metadata={"help": "Per-method config options, {gsoft: {block_size: 8}, lora: {r: 8}, ...}; the entry of "
                          "--method is used."},
    )
    target_modules: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Layers to adapt (names / suffixes, or one regex as a single item); null = all attention "
                          "and MLP linears (GSOFT's default for the architecture), the same for every method."},
    )
    # --- optimisation ---
    learning_rate: float = field(
        default=8e-4,
        metadata={"help": "Peak learning rate (AdamW) of methods not in --method_learning_rates.", "above": 0},
    )
    method_learning_rates: dict = field(
        default_factory=dict,
        metadata={"help": "Peak learning rate per method, e.g. {lora: 5e-4, full: 2e-5}: methods need different ones "
                          "(the paper tunes it per method)."},
    )
    weight_decay: float = field(
        default=0.0,
        metadata={"help": "AdamW weight decay (not applied to biases, norms and 1-D scales).", "min": 0},
    )
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1.", "min": 0, "below": 1})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2.", "min": 0, "below": 1})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon.", "min": 0})
    max_grad_norm: Optional[float] = field(default=1.0, metadata={"help": "Gradient clipping norm; null = none.",
                                                                  "above": 0})
    num_train_epochs: float = field(
        default=3.0,
        metadata={"help": "Training epochs (--max_steps, when set, takes precedence).", "above": 0},
    )
    max_steps: Optional[int] = field(
        default=None,
        metadata={"help": "Total optimizer steps; overrides --num_train_epochs.", "min": 1},
    )
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps.", "min": 0})
    lr_scheduler_type: str = field(
        default="linear",
        metadata={"help": "transformers' learning-rate schedule.", "choices": LR_SCHEDULERS},
    )
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Training batch size per process.",
                                                                   "min": 1})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Evaluation batch size per process.",
                                                                  "min": 1})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step.",
                                                                  "min": 1})
    mixed_precision: Optional[str] = field(
        default=None,
        metadata={"help": "null = accelerate launch's setting (the paper: fp16).", "choices": MIXED_PRECISIONS},
    )
    seed: int = field(
        default=42,
        metadata={"help": "Seed of model head initialisation, data order, dropout, and the shared seed of the "
                          "gradient compression (Rand-K coordinates, the geometric local-steps schedule).",
                  **SEED_RANGE},
    )
    # --- run ---
    output_dir: str = field(
        default="outputs/glue/run",
        metadata={"help": "Where results.json, metrics.jsonl, checkpoints and the adapter go."},
    )
    save_best: bool = field(
        default=True,
        metadata={"help": "Save the adapter with the best main metric to <output_dir>/best."},
    )

    def __post_init__(self) -> None:
        check_options(self)
        check_method_choice(self.method, self.method_learning_rates)
        if self.base_pretrain_steps and not (self.model_config and self.base_pretrain_label_column):
            raise ValueError("--base_pretrain_steps needs --model_config and --base_pretrain_label_column.")


@dataclass
class GlueArgs(VolunteerArgs, CommunicationArgs, LoopOptions, _GlueOptions):
    """All options of the recipe (YAML keys and ``--key value`` flags): its own, then the communication ones, then
    the hivemind ones."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_communication_args(self)
        volunteer_config(self)


# ----------------------------------------------------------------------------------------------------------------------
# Data, tokenizer, model
# ----------------------------------------------------------------------------------------------------------------------
def tokenize(raw: datasets.DatasetDict, tokenizer: PreTrainedTokenizerBase, spec: TaskSpec, max_length: int,
             keep: tuple[str, ...] = ()) -> datasets.DatasetDict:
    """Token ids per example (padding happens per batch); the label column becomes ``labels``."""

    def encode(batch: dict[str, list]) -> dict[str, Any]:
        return tokenizer(*(batch[c] for c in spec.text_columns), truncation=True, max_length=max_length)

    keep_columns = {spec.label_column, *keep}
    tokenized = datasets.DatasetDict({
        split: ds.map(encode, batched=True, desc=f"tokenizing {split}",
                      remove_columns=[c for c in ds.column_names if c not in keep_columns])
        for split, ds in raw.items()
    })
    return tokenized.rename_column(spec.label_column, "labels")


def build_base_model(args: GlueArgs, raw: datasets.DatasetDict, spec: TaskSpec, path: Path) -> None:
    """Build the ``--model_config`` model (and tokenizer), optionally pre-train it as a stand-in, and save both to
    ``path`` so that every process, a resumed run and ``PeftModel.from_pretrained`` later load the same base."""
    if "model_type" not in args.model_config:
        raise ValueError(f"--model_config needs a model_type (e.g. roberta), got {args.model_config}.")
    if args.tokenizer_name:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name, cache_dir=args.cache_dir)
    else:
        texts = (text for column in spec.text_columns for text in raw["train"][column])
        tokenizer = glue_smoke.train_word_level_tokenizer(texts, model_max_length=args.max_seq_length)
    options = dict(args.model_config)
    options.setdefault("vocab_size", len(tokenizer))
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        token_id = getattr(tokenizer, name, None)
        if token_id is not None:
            options.setdefault(name, token_id)
    aux = args.base_pretrain_label_column
    if aux and aux not in raw["train"].column_names:
        raise ValueError(f"--base_pretrain_label_column {aux!r} is not a column of the training data "
                         f"({raw['train'].column_names}).")
    num_aux = len(set(raw["train"][aux])) if aux else 2
    config = AutoConfig.for_model(**options, num_labels=num_aux)
    set_seed(args.seed)
    model = AutoModelForSequenceClassification.from_config(config)
    if args.base_pretrain_steps:
        train = tokenize(raw, tokenizer, spec, args.max_seq_length, keep=(aux,))["train"]
        start = time.perf_counter()
        loss = glue_smoke.pretrain_stand_in(
            model, train, DataCollatorWithPadding(tokenizer), aux, steps=args.base_pretrain_steps,
            learning_rate=args.base_pretrain_learning_rate, batch_size=args.per_device_train_batch_size, seed=args.seed,
        )
        logger.info("stand-in pretraining of the base model on %r: %d steps in %.1f s, final loss %.4f",
                    aux, args.base_pretrain_steps, time.perf_counter() - start, loss)
    # Only the encoder is the "pretrained" model: the task head is created fresh when it is loaded, as for roberta-base.
    # Written beside ``path`` and renamed into place: a process killed mid-write (an elastic restart) leaves no
    # half-written base that every restart would find and fail to load; a leftover without config.json (the caller
    # builds only then) is replaced.
    with writing_dir(path, overwrite=True) as partial:
        model.base_model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)


def model_config(args: GlueArgs, source: str, spec: TaskSpec) -> PretrainedConfig:
    """The config of the task's model: the encoder's at ``source`` with the task's head. Fetched once and passed to
    the tokenizer and the model, so a hub name that cannot be fetched fails here, with one set of retry messages."""
    kwargs: dict[str, Any] = {"num_labels": spec.num_labels,
                              "problem_type": "regression" if spec.is_regression else "single_label_classification"}
    if spec.label_names and not spec.is_regression:
        kwargs["id2label"] = dict(enumerate(spec.label_names))
        kwargs["label2id"] = {name: i for i, name in enumerate(spec.label_names)}
    if args.classifier_dropout is not None:
        kwargs["classifier_dropout"] = args.classifier_dropout
    return AutoConfig.from_pretrained(source, cache_dir=args.cache_dir, **kwargs)


MODEL_LOCATION = "pass a hub name such as roberta-base or a local directory saved with save_pretrained"


def check_model_source(args: GlueArgs) -> None:
    """Refuse a local model or tokenizer directory that does not exist, and a local model directory without tokenizer
    files when no ``--tokenizer_name`` is given: transformers would otherwise build a tokenizer of a handful of
    special tokens from the model config, and every input would become the same few ids."""
    check_model_path(args.tokenizer_name, "--tokenizer_name", MODEL_LOCATION)
    if args.model_config:
        return
    check_model_path(args.model_name_or_path, "--model_name_or_path", MODEL_LOCATION)
    directory = Path(args.model_name_or_path).expanduser()
    if args.tokenizer_name or not directory.is_dir():
        return
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(
            f"--model_name_or_path {args.model_name_or_path!r}: no tokenizer files in this directory (none of "
            f"{', '.join(TOKENIZER_FILES)}); pass --tokenizer_name (a hub name or directory), or save the model's "
            "tokenizer there with tokenizer.save_pretrained."
        )


def load_tokenizer(args: GlueArgs, source: str, config: PretrainedConfig) -> PreTrainedTokenizerBase:
    """``--tokenizer_name``, or the tokenizer saved with the model at ``source`` (reusing its fetched config)."""
    if args.tokenizer_name and not args.model_config:
        return AutoTokenizer.from_pretrained(args.tokenizer_name, cache_dir=args.cache_dir)
    return AutoTokenizer.from_pretrained(source, config=config, cache_dir=args.cache_dir)


def load_model(args: GlueArgs, source: str, config: PretrainedConfig) -> torch.nn.Module:
    """The sequence-classification model for the task (a new head on the encoder at ``source``)."""
    set_seed(args.seed)  # the new head's initialisation: identical on every process and on resume
    return AutoModelForSequenceClassification.from_pretrained(source, config=config, cache_dir=args.cache_dir)


def adapt(model: torch.nn.Module, args: GlueArgs) -> torch.nn.Module:
    """Apply ``--method``. All methods adapt the same layers (GSOFT's default for the architecture unless
    ``--target_modules``), and the task head is trained and saved with the adapter (``task_type="SEQ_CLS"``)."""
    target_modules = target_modules_value(args.target_modules)
    if target_modules is None and args.method not in GSOFT_METHODS:
        target_modules = TARGET_MODULES_MAPPING.get(model.config.model_type)
    try:
        return apply_method(model, args.method, target_modules, task_type="SEQ_CLS",
                            options=args.method_options.get(args.method))
    except ValueError as exc:
        raise ValueError(f"--method {args.method} with options {args.method_options.get(args.method)}: {exc}") from exc


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: torch.nn.Module, loaders: dict[str, DataLoader], spec: TaskSpec,
             accelerator: Optional[Accelerator] = None) -> dict[str, float]:
    """The task's metrics on every evaluation split (gathered across processes without duplicated samples)."""
    was_training = model.training
    model.eval()
    outputs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for suffix, loader in loaders.items():
        logits_all, labels_all = [], []
        for batch in loader:
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            labels = batch["labels"]
            if accelerator is not None:
                logits, labels = accelerator.gather_for_metrics((logits, labels))
            logits_all.append(logits.float().cpu().numpy())
            labels_all.append(labels.cpu().numpy())
        preds = predictions_from_logits(spec, np.concatenate(logits_all))
        outputs[suffix] = (preds, np.concatenate(labels_all))
    model.train(was_training)
    return compute_metrics(spec, outputs)


def save_trained(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, path: Path) -> None:
    """``save_pretrained`` of the adapter (or the whole model for ``full``) plus the tokenizer, so evaluation and
    ``PeftModel.from_pretrained`` use exactly what training used."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


# ----------------------------------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------------------------------
class GlueRecipe(Recipe):
    """GLUE's parts of the run: the data, model and adapter, the classification loss, the task's metrics at every
    evaluation (the best one's adapter kept in ``best/``), the adapter (or model) saved to ``adapter/`` (``model/``)."""

    name = NAME

    def __init__(self, args: GlueArgs) -> None:
        self.args = args
        self.learning_rate = float(args.method_learning_rates.get(args.method, args.learning_rate))
        self.saved_to = Path(args.output_dir) / ("model" if args.method == "full" else "adapter")
        self.final_eval: Optional[dict[str, float]] = None

    def load(self, run: TrainLoop) -> None:
        """The data (and a hub model's config): their errors come before the output directory is claimed."""
        args = self.args
        transformers.utils.logging.set_verbosity_error()  # "newly initialized head" is expected here
        check_model_source(args)
        with run.main_process_first():  # the main process downloads, the others read its cache
            raw, spec = load_raw_datasets(
                args.task, train_file=args.train_file, validation_file=args.validation_file,
                validation_mismatched_file=args.validation_mismatched_file, text_columns=args.text_columns,
                label_column=args.label_column, num_labels=args.num_labels, smoke_data=args.smoke_data,
                cache_dir=args.cache_dir,
            )
            raw, spec = encode_labels(raw, spec, args.num_labels)
            self.config = None
            if not args.model_config:
                with naming_option("--model_name_or_path", args.model_name_or_path):
                    self.config = model_config(args, args.model_name_or_path, spec)
        if args.max_train_samples is not None:
            raw["train"] = raw["train"].select(range(min(args.max_train_samples, len(raw["train"]))))
        if args.max_eval_samples is not None:
            for split in spec.eval_splits.values():
                raw[split] = raw[split].select(range(min(args.max_eval_samples, len(raw[split]))))
        self.raw, self.spec = raw, spec

    def build(self, run: TrainLoop) -> Trainables:
        """Base model (built from ``--model_config`` once, into the output directory, or loaded), tokenizer, tokenized
        data, the adapted model and AdamW."""
        args, acc, spec = self.args, run.accelerator, self.spec
        self.source = args.model_name_or_path
        with run.main_process_first():
            if args.model_config:
                self.source = str((run.output_dir / BASE_MODEL_DIR).resolve())
                if acc.is_main_process and not (Path(self.source) / "config.json").is_file():
                    build_base_model(args, self.raw, spec, Path(self.source))
                self.config = model_config(args, self.source, spec)
            self.tokenizer = load_tokenizer(args, self.source, self.config)
            tokenized = tokenize(self.raw, self.tokenizer, spec, args.max_seq_length)
            model = adapt(load_model(args, self.source, self.config), args)
        self.train_samples = len(tokenized["train"])
        logger.info("task %s (%d train examples), method %s", spec.name, self.train_samples, args.method)
        collate = DataCollatorWithPadding(self.tokenizer,
                                          pad_to_multiple_of=8 if acc.mixed_precision != "no" else None)
        train_loader = DataLoader(tokenized["train"], shuffle=True, collate_fn=collate,
                                  batch_size=args.per_device_train_batch_size, num_workers=args.num_workers,
                                  generator=torch.Generator().manual_seed(args.seed))  # not the global RNG: resume
        self.eval_loaders = {
            suffix: DataLoader(tokenized[split], collate_fn=collate, batch_size=args.per_device_eval_batch_size,
                               num_workers=args.num_workers, generator=torch.Generator())
            for suffix, split in spec.eval_splits.items()
        }
        decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]  # biases, norms, 1-D scales
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
        )
        run.state.update(best_eval=None, best_step=None)
        return Trainables({"model": model}, optimizer, train_loader)

    def on_prepared(self, run: TrainLoop) -> None:
        self.eval_loaders = {k: run.accelerator.prepare(v) for k, v in self.eval_loaders.items()}

    def scheduler(self, run: TrainLoop, optimizer: torch.optim.Optimizer,
                  max_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
        return get_scheduler(self.args.lr_scheduler_type, optimizer, num_warmup_steps=self.args.warmup_steps,
                             num_training_steps=max_steps)

    def loss(self, run: TrainLoop, batch: dict[str, torch.Tensor],
             micro_step: int) -> tuple[torch.Tensor, dict[str, float]]:
        return run.models["model"](**batch).loss, {}

    def evaluate(self, run: TrainLoop, step: int, final: bool) -> dict[str, float]:
        """The task's metrics; a new best also saves its adapter to ``best/`` (``--save_best``)."""
        scores = evaluate(run.models["model"], self.eval_loaders, self.spec, run.accelerator)  # the module's function
        main_metric, best = self.spec.main_metric, run.state["best_eval"]
        if best is None or scores[main_metric] > best[main_metric]:
            run.state.update(best_eval=scores, best_step=step)
            if self.args.save_best and run.accelerator.is_main_process:
                save_trained(run.accelerator.unwrap_model(run.models["model"]), self.tokenizer,
                             run.output_dir / "best")
        self.final_eval = scores
        return scores

    def save(self, run: TrainLoop) -> None:
        save_trained(run.accelerator.unwrap_model(run.models["model"]), self.tokenizer, self.saved_to)

    def results(self, run: TrainLoop) -> dict[str, Any]:
        return {
            "task": self.spec.name,
            "method": self.args.method,
            "main_metric": self.spec.main_metric,
            "eval": self.final_eval,
            "best_eval": run.state["best_eval"],
            "best_step": run.state["best_step"],
            "train_samples": self.train_samples,
            "learning_rate": self.learning_rate,
            "base_model": self.source,
            "saved_to": str(self.saved_to),
        }

    def summary(self, run: TrainLoop, results: dict[str, Any]) -> str:
        main_metric = self.spec.main_metric
        return (f"final eval ({self.spec.name}, {self.args.method}, {run.step} steps): {format_metrics(self.final_eval)}"
                f"; best {main_metric} {results['best_eval'][main_metric]:.4f} at step {results['best_step']}; "
                f"results in {run.output_dir / 'results.json'}")


def main(argv: Optional[list[str]] = None) -> Optional[dict[str, Any]]:
    """Run the recipe; returns the results (also written to results.json), or None after ``--stop_after_steps``."""
    args = parse_recipe_args(GlueArgs, argv, description=__doc__, prog=NAME)
    return run_recipe(GlueRecipe(args), args.loop_settings(volunteer=volunteer_config(args)), loop_class(args))


if __name__ == "__main__":
    main()
