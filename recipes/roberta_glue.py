#!/usr/bin/env python
"""Fine-tune RoBERTa (or any encoder) on GLUE with GSOFT, Double GSOFT, LoRA, OFT, BOFT or full fine-tuning.

    accelerate launch recipes/roberta_glue.py --config configs/glue/rte.yaml [--key value ...]
    accelerate launch recipes/roberta_glue.py --config configs/glue/smoke.yaml      # offline, ~1 minute on a CPU
    python recipes/roberta_glue.py --config configs/glue/smoke.yaml --method lora  # plain python works too
    accelerate launch --multi_gpu --num_processes 2 recipes/roberta_glue.py --config configs/glue/smoke.yaml \
        --grad_compression topk --compression_ratio 0.01 --compress updates         # compressed AdamW updates

Modelled on transformers' ``run_glue_no_trainer.py``: accelerate for devices, mixed precision, gradient accumulation
and data parallelism; PEFT's ``get_peft_model`` through ``common.apply_method``. Every run writes
``<output_dir>/results.json`` (schema in the README), ``metrics.jsonl``, resumable checkpoints, and the adapter
(``save_pretrained``, loadable with ``PeftModel.from_pretrained``).

With several processes, what they exchange goes through ``gsoft.distributed.register_compression`` (also for the
default ``--grad_compression none``, so the fp32 baseline's bytes are counted the same way): compressed adapter
gradients every step (``--compress gradients``), or each process's own optimizer steps, averaged as compressed
parameter deltas every ``--local_steps H`` steps (``--compress updates``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

import datasets
import transformers
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import ProjectConfiguration, gather_object, set_seed
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    PreTrainedTokenizerBase,
    get_scheduler,
)

from common import (  # (importing gsoft registers GSOFT with PEFT)
    METHODS,
    CommunicationArgs,
    MetricsLogger,
    StepTimer,
    accelerator_kwargs,
    apply_method,
    check_communication_args,
    communication_results,
    config_to_dict,
    count_parameters,
    discard_new_output_dir_on_error,
    leave_process_group,
    load_checkpoint,
    parse_recipe_args,
    peak_memory_mb,
    prepare_output_dir,
    resolve_checkpoint,
    resume_position,
    save_checkpoint,
    setup_communication,
    tensorboard_available,
    trainable_state_sha256,
    write_results,
)
from gsoft.tuner import TARGET_MODULES_MAPPING

from common import glue_smoke
from common.glue_data import encode_labels, load_raw_datasets
from common.glue_tasks import TaskSpec, compute_metrics, predictions_from_logits

logger = logging.getLogger("roberta_glue")

BASE_MODEL_DIR = "base_model"  # a model built from --model_config (and its tokenizer) is saved here, then loaded
GSOFT_METHODS = ("gsoft", "double_gsoft")


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
        metadata={"help": "Custom data: number of classes (1 = regression); null = inferred. GLUE tasks fix it."},
    )
    smoke_data: dict = field(
        default_factory=dict,
        metadata={"help": "Task smoke only: keyword arguments of glue_smoke.smoke_datasets (n_train, n_validation, "
                          "seed, noise)."},
    )
    max_train_samples: Optional[int] = field(
        default=None,
        metadata={"help": "Use only the first N training examples (quick tries)."},
    )
    max_eval_samples: Optional[int] = field(
        default=None,
        metadata={"help": "Use only the first N examples of each evaluation split."},
    )
    max_seq_length: int = field(
        default=128,
        metadata={"help": "Truncate inputs to this many tokens (batches are padded dynamically)."},
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
                          "--base_pretrain_label_column (a stand-in for pretraining)."},
    )
    base_pretrain_label_column: Optional[str] = field(
        default=None,
        metadata={"help": "Label column of the training data for the stand-in pretraining."},
    )
    base_pretrain_learning_rate: float = field(
        default=1e-3,
        metadata={"help": "Learning rate of the stand-in pretraining."},
    )
    classifier_dropout: Optional[float] = field(
        default=None,
        metadata={"help": "Dropout of the classification head; null = the model config's."},
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
        metadata={"help": "Layers to adapt; null = all attention and MLP linears (GSOFT's default for the "
                          "architecture), the same for every method."},
    )
    # --- optimisation ---
    learning_rate: float = field(
        default=8e-4,
        metadata={"help": "Peak learning rate (AdamW) of methods not in --method_learning_rates."},
    )
    method_learning_rates: dict = field(
        default_factory=dict,
        metadata={"help": "Peak learning rate per method, e.g. {lora: 5e-4, full: 2e-5}: methods need different ones "
                          "(the paper tunes it per method)."},
    )
    weight_decay: float = field(
        default=0.0,
        metadata={"help": "AdamW weight decay (not applied to biases, norms and 1-D scales)."},
    )
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    max_grad_norm: Optional[float] = field(default=1.0, metadata={"help": "Gradient clipping norm; null = none."})
    num_train_epochs: float = field(
        default=3.0,
        metadata={"help": "Training epochs (ignored when --max_steps is set)."},
    )
    max_steps: Optional[int] = field(
        default=None,
        metadata={"help": "Total optimizer steps; overrides --num_train_epochs."},
    )
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps."})
    lr_scheduler_type: str = field(
        default="linear",
        metadata={"help": "transformers scheduler name: linear, cosine, constant_with_warmup, ..."},
    )
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Training batch size per process."})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Evaluation batch size per process."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    mixed_precision: Optional[str] = field(
        default=None,
        metadata={"help": "no, fp16 or bf16; null = accelerate launch's setting (the paper: fp16)."},
    )
    seed: int = field(
        default=42,
        metadata={"help": "Seed of model head initialisation, data order, dropout, and the shared seed of the "
                          "gradient compression (Rand-K coordinates, the geometric local-steps schedule)."},
    )
    # --- run ---
    output_dir: str = field(
        default="outputs/glue/run",
        metadata={"help": "Where results.json, metrics.jsonl, checkpoints and the adapter go."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace an output directory that holds another run."},
    )
    resume_from_checkpoint: Optional[str] = field(
        default=None,
        metadata={"help": "'latest' or a checkpoint directory; continues with identical results."},
    )
    eval_steps: Optional[int] = field(
        default=None,
        metadata={"help": "Evaluate every N optimizer steps; null = every epoch. Always at the end."},
    )
    save_steps: Optional[int] = field(
        default=None,
        metadata={"help": "Checkpoint every N steps; null = at every evaluation."},
    )
    checkpoints_total_limit: Optional[int] = field(
        default=2,
        metadata={"help": "Keep only the newest N checkpoints; null = all."},
    )
    save_best: bool = field(
        default=True,
        metadata={"help": "Save the adapter with the best main metric to <output_dir>/best."},
    )
    logging_steps: int = field(default=10, metadata={"help": "Log loss, learning rate and throughput every N steps."})
    report_to: str = field(
        default="tensorboard",
        metadata={"help": "tensorboard (when installed; metrics.jsonl is always written) or none."},
    )
    progress_bar: bool = field(default=True, metadata={"help": "tqdm progress bar on the main process."})
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})
    torch_num_threads: Optional[int] = field(
        default=None,
        metadata={"help": "CPU threads of torch per process; null = torch's default. Tiny models run fastest with 1."},
    )
    stop_after_steps: Optional[int] = field(
        default=None,
        metadata={"help": "Debugging: checkpoint and exit after N steps, as if interrupted (no results.json)."},
    )

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"--method {self.method!r} is not one of {', '.join(METHODS)}.")
        if self.mixed_precision not in (None, "no", "fp16", "bf16"):
            raise ValueError(f"--mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}.")
        if self.report_to not in ("tensorboard", "none"):
            raise ValueError(f"--report_to must be tensorboard or none, got {self.report_to!r}.")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "max_seq_length", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("max_steps", "eval_steps", "save_steps", "stop_after_steps", "max_train_samples",
                     "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be >= 1 or null, got {value}.")
        unknown = sorted(set(self.method_learning_rates) - set(METHODS))
        if unknown:
            raise ValueError(
                f"--method_learning_rates has unknown methods {unknown}; choose from {', '.join(METHODS)}."
            )
        if self.base_pretrain_steps and not (self.model_config and self.base_pretrain_label_column):
            raise ValueError("--base_pretrain_steps needs --model_config and --base_pretrain_label_column.")


@dataclass
class GlueArgs(CommunicationArgs, _GlueOptions):
    """All options of the recipe (YAML keys and ``--key value`` flags): its own, then the communication ones."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_communication_args(self)


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
    model.base_model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def load_model(args: GlueArgs, source: str, spec: TaskSpec) -> torch.nn.Module:
    """The sequence-classification model for the task (a new head on the encoder at ``source``)."""
    kwargs: dict[str, Any] = {"num_labels": spec.num_labels, "cache_dir": args.cache_dir,
                              "problem_type": "regression" if spec.is_regression else "single_label_classification"}
    if spec.label_names and not spec.is_regression:
        kwargs["id2label"] = dict(enumerate(spec.label_names))
        kwargs["label2id"] = {name: i for i, name in enumerate(spec.label_names)}
    if args.classifier_dropout is not None:
        kwargs["classifier_dropout"] = args.classifier_dropout
    set_seed(args.seed)  # the new head's initialisation: identical on every process and on resume
    return AutoModelForSequenceClassification.from_pretrained(source, **kwargs)


def adapt(model: torch.nn.Module, args: GlueArgs) -> torch.nn.Module:
    """Apply ``--method``. All methods adapt the same layers (GSOFT's default for the architecture unless
    ``--target_modules``), and the task head is trained and saved with the adapter (``task_type="SEQ_CLS"``)."""
    target_modules = args.target_modules
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


def _format(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


# ----------------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------------
def build(args: GlueArgs, accelerator: Accelerator, raw: datasets.DatasetDict, spec: TaskSpec,
          out: Path) -> tuple[str, PreTrainedTokenizerBase, datasets.DatasetDict, torch.nn.Module]:
    """Base model (built from ``--model_config`` once, into the output directory, or loaded), tokenizer, tokenized
    data and the adapted model; returns ``(base model source, tokenizer, tokenized data, model)``."""
    source = args.model_name_or_path
    if args.model_config:
        source = str((out / BASE_MODEL_DIR).resolve())
        with accelerator.main_process_first():
            if accelerator.is_main_process and not (Path(source) / "config.json").is_file():
                build_base_model(args, raw, spec, Path(source))
    tokenizer_source = args.tokenizer_name if args.tokenizer_name and not args.model_config else source
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, cache_dir=args.cache_dir)
    with accelerator.main_process_first():
        tokenized = tokenize(raw, tokenizer, spec, args.max_seq_length)
    return source, tokenizer, tokenized, adapt(load_model(args, source, spec), args)


def train(args: GlueArgs) -> Optional[dict[str, Any]]:
    """Run the recipe; returns the results (also written to results.json), or None after ``--stop_after_steps``."""
    logging_config = ProjectConfiguration(project_dir=args.output_dir,
                                          logging_dir=str(Path(args.output_dir) / "tensorboard"))
    use_tb = args.report_to == "tensorboard" and tensorboard_available()
    accelerator = Accelerator(
        **accelerator_kwargs(  # multi-process launches on a machine without GPUs become one gloo job
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            mixed_precision=args.mixed_precision,
            log_with="tensorboard" if use_tb else None,
            project_config=logging_config,
            # the scheduler counts optimizer steps, whatever the number of processes
            step_scheduler_with_optimizer=False,
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        )
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if accelerator.is_main_process else logging.ERROR, force=True)
    transformers.utils.logging.set_verbosity_error()  # "newly initialized head" is expected here
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one INFO line per file of every checkpoint
    if args.torch_num_threads:
        torch.set_num_threads(args.torch_num_threads)
    if not accelerator.is_main_process:
        datasets.disable_progress_bars()

    # ---- data first: its errors (columns, labels, unknown task) leave no output directory behind ----
    with accelerator.main_process_first():
        raw, spec = load_raw_datasets(
            args.task, train_file=args.train_file, validation_file=args.validation_file,
            validation_mismatched_file=args.validation_mismatched_file, text_columns=args.text_columns,
            label_column=args.label_column, num_labels=args.num_labels, smoke_data=args.smoke_data,
            cache_dir=args.cache_dir,
        )
        raw, spec = encode_labels(raw, spec, args.num_labels)
    if args.max_train_samples is not None:
        raw["train"] = raw["train"].select(range(min(args.max_train_samples, len(raw["train"]))))
    if args.max_eval_samples is not None:
        for split in spec.eval_splits.values():
            raw[split] = raw[split].select(range(min(args.max_eval_samples, len(raw[split]))))

    run_config = config_to_dict(args)
    out = Path(args.output_dir)
    fresh = not (out.is_dir() and any(out.iterdir()))
    prepare_output_dir(out, run_config, overwrite=args.overwrite_output_dir, resume=bool(args.resume_from_checkpoint),
                       is_main_process=accelerator.is_main_process, barrier=accelerator.wait_for_everyone)
    accelerator.wait_for_everyone()
    resume_path = resolve_checkpoint(out, args.resume_from_checkpoint)
    # e.g. a block size that does not fit: the corrected re-run must not meet "a different run" in the directory
    with discard_new_output_dir_on_error(out, fresh, accelerator.is_main_process):
        source, tokenizer, tokenized, model = build(args, accelerator, raw, spec, out)
    trainable, total = count_parameters(model)
    logger.info("task %s (%d train examples), method %s: %s trainable of %s parameters", spec.name,
                len(tokenized["train"]), args.method, f"{trainable:,}", f"{total:,}")

    collate = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if accelerator.mixed_precision != "no" else None)
    train_loader = DataLoader(tokenized["train"], shuffle=True, collate_fn=collate,
                              batch_size=args.per_device_train_batch_size, num_workers=args.num_workers,
                              generator=torch.Generator().manual_seed(args.seed))  # not the global RNG: see resume
    eval_loaders = {
        suffix: DataLoader(tokenized[split], collate_fn=collate, batch_size=args.per_device_eval_batch_size,
                           num_workers=args.num_workers, generator=torch.Generator())
        for suffix, split in spec.eval_splits.items()
    }

    learning_rate = float(args.method_learning_rates.get(args.method, args.learning_rate))
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
    )
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    with discard_new_output_dir_on_error(out, fresh, accelerator.is_main_process):  # e.g. bf16 on gloo
        comm = setup_communication(args, accelerator, model, optimizer, seed=args.seed)

    def synchronize() -> None:
        """Local steps: average the replicas now, so evaluation and saving see one model (a no-op otherwise)."""
        if comm is not None:
            comm.synchronize()

    eval_loaders = {k: accelerator.prepare(v) for k, v in eval_loaders.items()}
    steps_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    max_steps = args.max_steps or math.ceil(args.num_train_epochs * steps_per_epoch)
    num_epochs = math.ceil(max_steps / steps_per_epoch)
    scheduler = accelerator.prepare(get_scheduler(args.lr_scheduler_type, optimizer,
                                                  num_warmup_steps=args.warmup_steps, num_training_steps=max_steps))
    eval_every = args.eval_steps or steps_per_epoch
    save_every = args.save_steps or eval_every

    # ---- resume ----
    step, skip_batches, start_epoch = 0, 0, 0
    state: dict[str, Any] = {"best_eval": None, "best_step": None}
    # error-feedback buffers, local-step references, each process's optimizer state (with --compress updates) and
    # byte counters resume too; loaded after accelerate's own (main process) optimizer state, so theirs win
    if comm is not None:
        comm.register_for_checkpointing(accelerator)
    if resume_path is not None:
        state = load_checkpoint(accelerator, resume_path)
        step = state.pop("step")
        start_epoch, skip_batches = resume_position(step, len(train_loader), args.gradient_accumulation_steps)
        logger.info("resumed from %s at step %d (epoch %d, skipping %d batches)", resume_path, step, start_epoch,
                    skip_batches)

    metrics_log = MetricsLogger(accelerator, out, "roberta_glue", run_config, tensorboard=use_tb)
    timer = StepTimer(accelerator.device)
    progress = tqdm(total=max_steps, initial=step, desc=f"{spec.name}/{args.method}",
                    disable=not (accelerator.is_main_process and args.progress_bar))
    main_metric = spec.main_metric
    final_eval: Optional[dict[str, float]] = None
    window_loss, window_count, window_start, window_samples = 0.0, 0, time.perf_counter(), 0
    train_start = time.perf_counter()
    model.train()
    for epoch in range(start_epoch, num_epochs):
        if step >= max_steps:
            break
        train_loader.set_epoch(epoch)
        loader = train_loader
        if epoch == start_epoch and skip_batches:
            loader = accelerator.skip_first_batches(train_loader, skip_batches)
        for batch in loader:
            if not timer.running:
                timer.start()
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            window_loss += loss.detach().float()  # a tensor: no device sync per micro-batch
            window_count += 1
            window_samples += batch["input_ids"].shape[0] * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            timer.stop()
            step += 1
            progress.update(1)

            if step % args.logging_steps == 0 or step == max_steps:
                elapsed = time.perf_counter() - window_start
                mean_loss = accelerator.reduce(window_loss / window_count, "mean").item()
                record = {"loss": mean_loss, "lr": scheduler.get_last_lr()[0], "epoch": step / steps_per_epoch,
                          "samples_per_s": window_samples / elapsed,
                          "comm_bytes_sent": comm.bytes_sent if comm is not None else 0}
                metrics_log.log(record, step)
                progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{record['lr']:.2e}")
                window_loss, window_count, window_start, window_samples = 0.0, 0, time.perf_counter(), 0

            if step % eval_every == 0 or step == max_steps:
                synchronize()  # evaluation points are synchronisation points with --local_steps
                final_eval = evaluate(model, eval_loaders, spec, accelerator)
                metrics_log.log({f"eval_{k}": v for k, v in final_eval.items()}, step)
                logger.info("step %d: %s", step, _format(final_eval))
                best = state["best_eval"]
                if best is None or final_eval[main_metric] > best[main_metric]:
                    state["best_eval"], state["best_step"] = final_eval, step
                    if args.save_best and accelerator.is_main_process:
                        save_trained(accelerator.unwrap_model(model), tokenizer, out / "best")
            interrupted = args.stop_after_steps is not None and step >= args.stop_after_steps
            if step % save_every == 0 or interrupted:
                save_checkpoint(accelerator, out, step, state, total_limit=args.checkpoints_total_limit)
            if interrupted:
                logger.info("--stop_after_steps %d: checkpointed and stopping (resume with "
                            "--resume_from_checkpoint latest)", args.stop_after_steps)
                progress.close()
                metrics_log.close()
                return None
            if step >= max_steps:
                break
    progress.close()
    train_runtime = time.perf_counter() - train_start
    synchronize()  # normally a no-op here: the last step was evaluated
    if final_eval is None:  # resumed from the final checkpoint: nothing left to train
        final_eval = evaluate(model, eval_loaders, spec, accelerator)

    unwrapped = accelerator.unwrap_model(model)
    hashes = gather_object([trainable_state_sha256(unwrapped)])
    saved_to = out / ("model" if args.method == "full" else "adapter")
    if accelerator.is_main_process:
        save_trained(unwrapped, tokenizer, saved_to)
    results = {
        "task": spec.name,
        "method": args.method,
        "main_metric": main_metric,
        "eval": final_eval,
        "best_eval": state["best_eval"],
        "best_step": state["best_step"],
        "trainable_params": trainable,
        "total_params": total,
        "train_steps": step,
        "train_runtime_s": round(train_runtime, 3),
        "step_time_s_median": timer.median_s,
        "peak_memory_mb": round(peak_memory_mb(accelerator.device), 1),
        "world_size": accelerator.num_processes,
        "train_samples": len(tokenized["train"]),
        "learning_rate": learning_rate,
        "base_model": source,
        "saved_to": str(saved_to),
        "rank_state_sha256": list(hashes),
        "mixed_precision": accelerator.mixed_precision,
        "device": str(accelerator.device),
        **communication_results(comm),
    }
    if accelerator.is_main_process:
        write_results(out, results)
        print(f"final eval ({spec.name}, {args.method}, {step} steps): {_format(final_eval)}; best "
              f"{main_metric} {state['best_eval'][main_metric]:.4f} at step {state['best_step']}; results in "
              f"{out / 'results.json'}", flush=True)
        if comm is not None:
            print(f"communication ({results['compression']['method']}): {comm.bytes_sent:,} bytes sent by this "
                  f"process, {comm.bytes_uncompressed:,} for fp32 all-reduces of the same steps", flush=True)
    metrics_log.close()
    accelerator.wait_for_everyone()
    return results


def save_trained(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, path: Path) -> None:
    """``save_pretrained`` of the adapter (or the whole model for ``full``) plus the tokenizer, so evaluation and
    ``PeftModel.from_pretrained`` use exactly what training used."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def main(argv: Optional[list[str]] = None) -> Optional[dict[str, Any]]:
    args = parse_recipe_args(GlueArgs, argv, description=__doc__)
    try:
        results = train(args)
    except ValueError as exc:  # configuration and data errors: one readable line, not a traceback
        raise SystemExit(f"roberta_glue: error: {exc}") from exc
    leave_process_group()
    return results


if __name__ == "__main__":
    main()
