#!/usr/bin/env python
"""Fine-tune a decoder LLM (Llama, Mistral, Qwen2/3, Gemma) on prompt/completion pairs or texts with GSOFT, Double
GSOFT, LoRA, OFT, BOFT or full fine-tuning, optionally on a 4-bit or 8-bit (bitsandbytes) base.

    accelerate launch -q recipes/causal_lm.py --config configs/causal_lm/smoke.yaml   # offline, under a minute on a CPU
    accelerate launch -q recipes/causal_lm.py --config configs/causal_lm/llama.yaml [--load_in_4bit]
        # with train_file and validation_file set to your JSON lines (in the YAML or as --train_file ...)

The manual (data format, options, outputs, 4-bit, what is refused) is recipes/causal_lm.md.

This file holds what is the causal LM's own: the data (local JSON lines, ``common.causal_lm_data``, or the generated
smoke task, ``common.causal_lm_smoke``), the tokenizer and base model (loaded, quantized, or built from
``--model_config``), the adapter (``common.apply_method``), evaluation (loss, perplexity, greedy exact match), and the
adapter saved with ``save_pretrained`` (loadable with ``PeftModel.from_pretrained``). The run itself (accelerate,
resume, communication between processes, checkpoints, logging, results.json) is the recipes' shared skeleton,
``common.run_recipe``.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader

from common.extras import needs

with needs("glue", "causal_lm"):  # the same packages as the GLUE recipe: a missing one is one line naming the extra
    import transformers
    from accelerate.utils import set_seed
    from datasets import Dataset
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        GenerationConfig,
        PretrainedConfig,
        PreTrainedTokenizerBase,
        get_scheduler,
    )

    from gsoft.export import writing_dir
    from gsoft.tuner import TARGET_MODULES_MAPPING

    from common import causal_lm_smoke, glue_smoke
    from common.args import (
        MIXED_PRECISIONS,
        SEED_RANGE,
        check_model_path,
        check_options,
        parse_recipe_args,
    )
    from common.causal_lm_data import IGNORE_INDEX, Collator, encode_examples, read_examples, split_prompt
    from common.communication import CommunicationArgs, check_communication_args
    from common.loop import (
        LoopOptions, Recipe, TrainLoop, Trainables, format_metrics, naming_option, run_recipe,
    )
    from common.methods import GSOFT_METHODS, METHODS, apply_method, check_method_choice, target_modules_value

NAME = "causal_lm"
logger = logging.getLogger(NAME)

BASE_MODEL_DIR = "base_model"  # a model built from --model_config (and its tokenizer) is saved here, then loaded
SMOKE_DATA_DIR = "smoke_data"  # the generated smoke corpus, read back through the --train_file path
TASKS = ("custom", "smoke")
#: transformers' schedules that the recipe can drive (built from the warm-up and total steps alone).
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODEL_LOCATION = "pass a hub name such as Qwen/Qwen2.5-0.5B or a local directory saved with save_pretrained"


@dataclass
class _CausalLMOptions:
    """The recipe's own options; :class:`CausalLMArgs` adds the communication ones (``common.CommunicationArgs``)."""

    # --- data ---
    task: str = field(
        default="custom",
        metadata={"help": "custom (--train_file and --validation_file) or smoke (offline, generated into "
                          "<output_dir>/smoke_data and read from there).", "choices": TASKS},
    )
    train_file: Optional[str] = field(
        default=None,
        metadata={"help": "Training data, JSON lines: {\"prompt\": ..., \"completion\": ...} (loss on the completion) "
                          "or {\"text\": ...} (loss on every token) per line."},
    )
    validation_file: Optional[str] = field(
        default=None,
        metadata={"help": "Evaluation data, same format as --train_file: loss, perplexity and exact match."},
    )
    smoke_data: dict = field(
        default_factory=dict,
        metadata={"help": "Task smoke only: keyword arguments of causal_lm_smoke.write_corpus (n_train, n_validation, "
                          "n_pretrain, seed, min_length, max_length)."},
    )
    max_train_samples: Optional[int] = field(
        default=None,
        metadata={"help": "Use only the first N training examples (quick tries).", "min": 1},
    )
    max_eval_samples: Optional[int] = field(
        default=None,
        metadata={"help": "Use only the first N validation examples.", "min": 1},
    )
    max_seq_length: int = field(
        default=512,
        metadata={"help": "Cut examples to this many tokens, EOS included (batches are padded to their longest).",
                  "min": 2},
    )
    eval_generation_samples: int = field(
        default=0,
        metadata={"help": "Greedy-generate the completions of the first N prompt/completion validation examples at "
                          "every evaluation and report exact_match (the generated tokens equal the completion's, "
                          "then EOS); 0 = off.", "min": 0},
    )
    eval_at_start: bool = field(
        default=False,
        metadata={"help": "Also evaluate before the first step (the base model: adapters start as the identity); "
                          "results.json's initial_eval."},
    )
    cache_dir: Optional[str] = field(default=None, metadata={"help": "Cache directory for models from the hub."})
    # --- model ---
    model_name_or_path: str = field(
        default="Qwen/Qwen2.5-0.5B",
        metadata={"help": "Hub name or local directory of the causal LM (ignored with --model_config)."},
    )
    model_config: dict = field(
        default_factory=dict,
        metadata={"help": "Build a randomly initialised model from this config instead (needs model_type, e.g. "
                          "{model_type: llama, hidden_size: 64}); saved to <output_dir>/base_model."},
    )
    tokenizer_name: Optional[str] = field(
        default=None,
        metadata={"help": "Tokenizer hub name or directory; null = the model's, or with --model_config a word-level "
                          "tokenizer built from the training texts."},
    )
    base_pretrain_steps: int = field(
        default=0,
        metadata={"help": "With --model_config: first train the whole model this many steps on --base_pretrain_file "
                          "(a stand-in for pretraining).", "min": 0},
    )
    base_pretrain_file: Optional[str] = field(
        default=None,
        metadata={"help": "Data of the stand-in pretraining, same format as --train_file (task smoke: generated)."},
    )
    base_pretrain_learning_rate: float = field(
        default=1e-3,
        metadata={"help": "Learning rate of the stand-in pretraining.", "above": 0},
    )
    torch_dtype: str = field(
        default="float32",
        metadata={"help": "dtype of the base model's weights (the trained adapter stays float32); bfloat16 halves a "
                          "large base's memory.", "choices": tuple(DTYPES)},
    )
    load_in_4bit: bool = field(
        default=False,
        metadata={"help": "Load the base quantized to 4-bit NF4 with bitsandbytes (QLoRA-style; adapter methods only; "
                          "compute in float32 on a CPU, bfloat16 on a GPU)."},
    )
    load_in_8bit: bool = field(
        default=False,
        metadata={"help": "Load the base quantized to 8-bit with bitsandbytes (LLM.int8; adapter methods only)."},
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Recompute activations in the backward pass (less memory, about a third more time)."},
    )
    # --- method ---
    method: str = field(default="gsoft", metadata={"help": f"One of {', '.join(METHODS)}."})
    method_options: dict = field(
        default_factory=dict,
        metadata={"help": "Per-method config options, {gsoft: {block_size: 32}, lora: {r: 16}, ...}; the entry of "
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
        metadata={"help": "Peak learning rate per method, e.g. {lora: 2e-4, full: 2e-5}."},
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
        default=1.0,
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
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Training batch size per process.",
                                                                  "min": 1})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Evaluation and generation batch size per "
                                                                         "process.", "min": 1})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step.",
                                                                  "min": 1})
    mixed_precision: Optional[str] = field(
        default=None,
        metadata={"help": "null = accelerate launch's setting (bf16 on a recent GPU).", "choices": MIXED_PRECISIONS},
    )
    seed: int = field(
        default=42,
        metadata={"help": "Seed of the data order, dropout, a built model's initialisation, and the shared seed of "
                          "the gradient compression.", **SEED_RANGE},
    )
    # --- run ---
    output_dir: str = field(
        default="outputs/causal_lm/run",
        metadata={"help": "Where results.json, metrics.jsonl, checkpoints and the adapter go."},
    )
    save_best: bool = field(
        default=True,
        metadata={"help": "Save the adapter with the lowest evaluation loss to <output_dir>/best."},
    )
    save_merged: bool = field(
        default=False,
        metadata={"help": "Also save the base with the adapter merged into its weights to <output_dir>/merged (a plain "
                          "transformers model; not with a quantized base)."},
    )

    def __post_init__(self) -> None:
        check_options(self)
        check_method_choice(self.method, self.method_learning_rates)
        self._check_data()
        self._check_quantization()

    def _check_data(self) -> None:
        if self.task == "smoke":
            given = [f"--{name}" for name in causal_lm_smoke.FILES if getattr(self, name) is not None]
            if given:
                raise ValueError(f"--task smoke generates its data; drop {', '.join(given)}, or pass --task custom to "
                                 "train on your files.")
        else:
            missing = [f"--{name}" for name in ("train_file", "validation_file") if getattr(self, name) is None]
            if missing:
                raise ValueError(f"--task custom needs {' and '.join(missing)} (JSON lines; the validation set gives "
                                 "the evaluation loss), or pass --task smoke for the offline smoke task.")
            if self.smoke_data:
                raise ValueError("--smoke_data applies to --task smoke only; drop it.")
        if self.base_pretrain_steps:
            if not self.model_config:
                raise ValueError("--base_pretrain_steps needs --model_config (a model built here); a loaded model is "
                                 "already pretrained.")
            if self.task != "smoke" and self.base_pretrain_file is None:
                raise ValueError("--base_pretrain_steps needs --base_pretrain_file (the data of the stand-in "
                                 "pretraining).")

    def _check_quantization(self) -> None:
        if not (self.load_in_4bit or self.load_in_8bit):
            return
        flag = "--load_in_4bit" if self.load_in_4bit else "--load_in_8bit"
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("--load_in_4bit and --load_in_8bit exclude each other: pick one.")
        if self.method == "full":
            raise ValueError(f"{flag} with --method full: quantized weights cannot be trained; pick an adapter method "
                             f"({', '.join(m for m in METHODS if m != 'full')}) or drop {flag}.")
        if self.save_merged:
            raise ValueError(f"--save_merged with {flag}: merging into quantized weights would round the adapter away; "
                             "the adapter is saved on its own (load it onto a full-precision base and merge there), "
                             "so drop --save_merged.")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError(f"{flag} needs bitsandbytes, which is not installed; install gsoft's [quantized] extra: "
                             "pip install -e \".[quantized]\" (from the repository root).")

    @property
    def quantization(self) -> Optional[str]:
        """4bit, 8bit or None."""
        return "4bit" if self.load_in_4bit else "8bit" if self.load_in_8bit else None


@dataclass
class CausalLMArgs(CommunicationArgs, LoopOptions, _CausalLMOptions):
    """All options of the recipe (YAML keys and ``--key value`` flags): its own, then the communication ones."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_communication_args(self)


# ----------------------------------------------------------------------------------------------------------------------
# Data, tokenizer, model
# ----------------------------------------------------------------------------------------------------------------------
def data_files(args: CausalLMArgs, output_dir: Path) -> dict[str, Optional[str]]:
    """The files of the run by option: the user's, or the smoke corpus's under ``output_dir`` (generated by the caller
    on the main process)."""
    if args.task != "smoke":
        return {option: getattr(args, option) for option in causal_lm_smoke.FILES}
    return {option: str(output_dir / SMOKE_DATA_DIR / name) for option, name in causal_lm_smoke.FILES.items()}


def read_data(files: dict[str, Optional[str]], args: CausalLMArgs) -> dict[str, list]:
    """The examples of the training, validation (and stand-in pretraining) files, cut to ``--max_*_samples``."""
    data = {option: read_examples(path, f"--{option}") for option, path in files.items()
            if path is not None and (option != "base_pretrain_file" or args.base_pretrain_steps)}
    data["train_file"] = data["train_file"][:args.max_train_samples]
    data["validation_file"] = data["validation_file"][:args.max_eval_samples]
    return data


def check_model_source(args: CausalLMArgs) -> None:
    """Refuse a local model or tokenizer directory that does not exist before transformers reads it as a hub id."""
    check_model_path(args.tokenizer_name, "--tokenizer_name", MODEL_LOCATION)
    if not args.model_config:
        check_model_path(args.model_name_or_path, "--model_name_or_path", MODEL_LOCATION)


def build_base_model(args: CausalLMArgs, data: dict[str, list], path: Path) -> None:
    """Build the ``--model_config`` model (and tokenizer), optionally pre-train it as a stand-in, and save both to
    ``path``, so that every process, a resumed run and ``PeftModel.from_pretrained`` later load the same base."""
    if "model_type" not in args.model_config:
        raise ValueError(f"--model_config needs a model_type (e.g. llama), got {args.model_config}.")
    if args.tokenizer_name:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name, cache_dir=args.cache_dir)
    else:
        texts = [piece for option in ("train_file", "base_pretrain_file") for e in data.get(option, ())
                 for piece in (e.prompt or "", e.target)]
        tokenizer = causal_lm_smoke.train_word_level_tokenizer(texts, model_max_length=args.max_seq_length)
    options = dict(args.model_config)
    options.setdefault("vocab_size", len(tokenizer))
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        token_id = getattr(tokenizer, name, None)
        if token_id is not None:
            options.setdefault(name, token_id)
    set_seed(args.seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**options))
    if args.base_pretrain_steps:
        encoded = encode_examples(data["base_pretrain_file"], tokenizer, args.max_seq_length, "stand-in pretraining")
        # pretrain_stand_in trains on a label column, renamed to labels: here the next-token labels themselves
        dataset = Dataset.from_list([{"input_ids": e["input_ids"], "attention_mask": [1] * len(e["input_ids"]),
                                      "targets": e["labels"]} for e in encoded])
        collate = Collator(pad_token_id=tokenizer.pad_token_id)
        start = time.perf_counter()
        loss = glue_smoke.pretrain_stand_in(
            model, dataset, collate, "targets", steps=args.base_pretrain_steps,
            learning_rate=args.base_pretrain_learning_rate, batch_size=args.per_device_train_batch_size, seed=args.seed,
        )
        logger.info("stand-in pretraining of the base model: %d steps in %.1f s, final loss %.4f",
                    args.base_pretrain_steps, time.perf_counter() - start, loss)
    # Written beside ``path`` and renamed into place: a process killed mid-write (an elastic restart) leaves no
    # half-written base that every restart would find and fail to load; a leftover without config.json (the caller
    # builds only then) is replaced.
    with writing_dir(path, overwrite=True) as partial:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)


def load_tokenizer(args: CausalLMArgs, source: str) -> PreTrainedTokenizerBase:
    """``--tokenizer_name`` or the model's tokenizer; one without a pad token pads with its EOS (padding is masked
    out of the attention and the loss, so the id only fills the rectangle)."""
    name = args.tokenizer_name if args.tokenizer_name and not args.model_config else source
    tokenizer = AutoTokenizer.from_pretrained(name, cache_dir=args.cache_dir)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"the tokenizer of {name!r} has neither a pad nor an EOS token; pass a --tokenizer_name "
                             "that has an EOS token.")
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("the tokenizer has no pad token: padding with its EOS token %r", tokenizer.eos_token)
    return tokenizer


def quantization_config(args: CausalLMArgs, device: torch.device) -> Optional[BitsAndBytesConfig]:
    """bitsandbytes' NF4 (compute in bfloat16 on a GPU, float32 on a CPU) or 8-bit config, None without
    quantization."""
    if args.load_in_4bit:
        compute = torch.bfloat16 if device.type == "cuda" else torch.float32
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
    if args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_model(args: CausalLMArgs, source: str, config: PretrainedConfig, device: torch.device) -> torch.nn.Module:
    """The causal LM at ``source``: in ``--torch_dtype``, or quantized onto this process's device and made ready for
    k-bit training (``peft.prepare_model_for_kbit_training``: norms in float32, inputs that carry gradients)."""
    from peft import prepare_model_for_kbit_training

    quantization = quantization_config(args, device)
    kwargs: dict[str, Any] = {"config": config, "cache_dir": args.cache_dir, "dtype": DTYPES[args.torch_dtype]}
    if quantization is not None:
        kwargs.update(quantization_config=quantization, device_map={"": device})
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if quantization is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if args.gradient_checkpointing:
        model.config.use_cache = False  # the cache is useless in training and conflicts with recomputation
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if args.method != "full":
            model.enable_input_require_grads()  # the frozen embeddings' output carries gradients into the layers
    return model


def adapt(model: torch.nn.Module, args: CausalLMArgs) -> torch.nn.Module:
    """Apply ``--method`` to every attention and MLP linear (GSOFT's default for the architecture unless
    ``--target_modules``), the same layers for every method; trained adapter weights are float32."""
    target_modules = target_modules_value(args.target_modules)
    if target_modules is None and args.method not in GSOFT_METHODS:
        target_modules = TARGET_MODULES_MAPPING.get(model.config.model_type)
    try:
        adapted = apply_method(model, args.method, target_modules, task_type="CAUSAL_LM",
                               options=args.method_options.get(args.method))
    except ValueError as exc:
        raise ValueError(f"--method {args.method} with options {args.method_options.get(args.method)}: {exc}") from exc
    for parameter in adapted.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32 and args.method != "full":
            parameter.data = parameter.data.float()
    return adapted


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def token_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: the summed next-token cross-entropy of its labelled tokens and how many there are."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    losses = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
                                               reduction="none")
    return losses.sum(dim=1), (labels != IGNORE_INDEX).sum(dim=1)


@torch.no_grad()
def greedy_matches(model: torch.nn.Module, pairs: list[tuple[list[int], list[int]]], tokenizer: PreTrainedTokenizerBase,
                   batch_size: int) -> int:
    """How many prompts greedy decoding completes with exactly the completion's tokens and then EOS (``pairs``:
    prompt ids, completion ids ending in EOS)."""
    collate = Collator(pad_token_id=tokenizer.pad_token_id, padding_side="left")
    device = next(model.parameters()).device
    matches = 0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        batch = collate([{"input_ids": prompt} for prompt, _ in chunk])
        config = GenerationConfig(do_sample=False, max_new_tokens=max(len(c) for _, c in chunk),
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        generated = model.generate(input_ids=batch["input_ids"].to(device),
                                   attention_mask=batch["attention_mask"].to(device), generation_config=config)
        width = batch["input_ids"].shape[1]
        for row, (_, completion) in zip(generated[:, width:].tolist(), chunk):
            matches += row[:len(completion)] == completion
    return matches


def save_trained(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, path: Path) -> None:
    """``save_pretrained`` of the adapter (or the whole model for ``full``) plus the tokenizer."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


# ----------------------------------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------------------------------
class CausalLMRecipe(Recipe):
    """The causal LM's parts of the run: data, model and adapter, the next-token loss, evaluation loss, perplexity and
    exact match (the lowest-loss adapter kept in ``best/``), the adapter (or model) saved to ``adapter/`` (``model/``)
    and, with ``--save_merged``, the merged model to ``merged/``."""

    name = NAME

    def __init__(self, args: CausalLMArgs) -> None:
        self.args = args
        self.learning_rate = float(args.method_learning_rates.get(args.method, args.learning_rate))
        self.saved_to = Path(args.output_dir) / ("model" if args.method == "full" else "adapter")
        self.final_eval: Optional[dict[str, float]] = None
        self.data: dict[str, list] = {}
        self.config: Optional[PretrainedConfig] = None

    def load(self, run: TrainLoop) -> None:
        """The user's data files and a hub model's config: their errors come before the output directory is
        claimed. The smoke corpus is generated in :meth:`build`, into the output directory."""
        args = self.args
        transformers.utils.logging.set_verbosity_error()
        check_model_source(args)
        with run.main_process_first():
            if args.task != "smoke":
                self.data = read_data(data_files(args, run.output_dir), args)
            if not args.model_config:
                with naming_option("--model_name_or_path", args.model_name_or_path):
                    self.config = AutoConfig.from_pretrained(args.model_name_or_path, cache_dir=args.cache_dir)

    def build(self, run: TrainLoop) -> Trainables:
        """Smoke corpus, base model (built from ``--model_config`` once, into the output directory, or loaded),
        tokenizer, encoded data, the adapted model and AdamW."""
        args, acc = self.args, run.accelerator
        self.source = args.model_name_or_path
        with run.main_process_first():
            if args.task == "smoke":
                if acc.is_main_process:
                    causal_lm_smoke.write_corpus(run.output_dir / SMOKE_DATA_DIR, **args.smoke_data)
                self.data = read_data(data_files(args, run.output_dir), args)
            if args.model_config:
                self.source = str((run.output_dir / BASE_MODEL_DIR).resolve())
                if acc.is_main_process and not (Path(self.source) / "config.json").is_file():
                    build_base_model(args, self.data, Path(self.source))
                self.config = AutoConfig.from_pretrained(self.source)
            self.tokenizer = load_tokenizer(args, self.source)
            train = encode_examples(self.data["train_file"], self.tokenizer, args.max_seq_length, "training")
            self.validation = encode_examples(self.data["validation_file"], self.tokenizer, args.max_seq_length,
                                              "validation")
            set_seed(args.seed)
            model = adapt(load_model(args, self.source, self.config, acc.device), args)
        self.generation_pairs = self._generation_pairs()
        self.train_samples = len(train)
        logger.info("%d training and %d validation examples, method %s%s", len(train), len(self.validation),
                    args.method, f" on a {args.quantization} base" if args.quantization else "")
        collate = Collator(self.tokenizer.pad_token_id, pad_to_multiple_of=8 if acc.mixed_precision != "no" else None)
        train_loader = DataLoader(train, shuffle=True, collate_fn=collate, batch_size=args.per_device_train_batch_size,
                                  num_workers=args.num_workers, generator=torch.Generator().manual_seed(args.seed))
        self.eval_loader = DataLoader(self.validation, collate_fn=collate, batch_size=args.per_device_eval_batch_size,
                                      num_workers=args.num_workers, generator=torch.Generator())
        decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]  # biases, norms, 1-D scales
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
        )
        run.state.update(best_eval=None, best_step=None, initial_eval=None)
        return Trainables({"model": model}, optimizer, train_loader)

    def _generation_pairs(self) -> list[tuple[list[int], list[int]]]:
        """The prompt/completion validation examples that exact match generates for (``--eval_generation_samples``)."""
        wanted = self.args.eval_generation_samples
        if not wanted:
            return []
        pairs = [p for p in (split_prompt(e, self.tokenizer.eos_token_id) for e in self.validation) if p is not None]
        if not pairs:
            raise ValueError(f"--eval_generation_samples {wanted}: the validation set has no prompt/completion example "
                             "whose completion fits --max_seq_length; set it to 0 for text data.")
        if len(pairs) < wanted:
            logger.warning("--eval_generation_samples %d: the validation set has %d prompt/completion examples that "
                           "fit; exact match uses those.", wanted, len(pairs))
        return pairs[:wanted]

    def on_prepared(self, run: TrainLoop) -> None:
        self.eval_loader = run.accelerator.prepare(self.eval_loader)
        if self.args.eval_at_start and not self.args.resume_from_checkpoint:
            run.state["initial_eval"] = self._scores(run)
            logger.info("before training: %s", format_metrics(run.state["initial_eval"]))

    def scheduler(self, run: TrainLoop, optimizer: torch.optim.Optimizer,
                  max_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
        return get_scheduler(self.args.lr_scheduler_type, optimizer, num_warmup_steps=self.args.warmup_steps,
                             num_training_steps=max_steps)

    def loss(self, run: TrainLoop, batch: dict[str, torch.Tensor],
             micro_step: int) -> tuple[torch.Tensor, dict[str, float]]:
        return run.models["model"](**batch).loss, {}

    def _scores(self, run: TrainLoop) -> dict[str, float]:
        """Evaluation loss (per labelled token, over the whole validation set and every process), perplexity and,
        with ``--eval_generation_samples``, exact match (each process generates for its share of the prompts)."""
        acc, model = run.accelerator, run.models["model"]
        was_training = model.training
        model.eval()
        total, count = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.long)
        for batch in self.eval_loader:
            losses, counts = acc.gather_for_metrics(token_losses(model, batch))
            total += losses.double().sum().cpu()
            count += counts.sum().cpu()
        loss = float(total / count)
        scores = {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}
        if self.generation_pairs:
            share = self.generation_pairs[acc.process_index::acc.num_processes]
            matches = greedy_matches(acc.unwrap_model(model), share, self.tokenizer, self.args.per_device_eval_batch_size)
            matched = acc.reduce(torch.tensor([matches], device=acc.device), "sum").item()
            scores["exact_match"] = matched / len(self.generation_pairs)
        model.train(was_training)
        return scores

    def evaluate(self, run: TrainLoop, step: int, final: bool) -> dict[str, float]:
        """The scores; a new lowest loss also saves its adapter to ``best/`` (``--save_best``)."""
        scores = self._scores(run)
        best = run.state["best_eval"]
        if best is None or scores["loss"] < best["loss"]:
            run.state.update(best_eval=scores, best_step=step)
            if self.args.save_best and run.accelerator.is_main_process:
                save_trained(run.accelerator.unwrap_model(run.models["model"]), self.tokenizer,
                             run.output_dir / "best")
        self.final_eval = scores
        return scores

    def save(self, run: TrainLoop) -> None:
        model = run.accelerator.unwrap_model(run.models["model"])
        save_trained(model, self.tokenizer, self.saved_to)
        if self.args.save_merged and self.args.method != "full":
            save_trained(model.merge_and_unload(), self.tokenizer, run.output_dir / "merged")

    def results(self, run: TrainLoop) -> dict[str, Any]:
        return {
            "task": self.args.task,
            "method": self.args.method,
            "main_metric": "loss",
            "eval": self.final_eval,
            "initial_eval": run.state["initial_eval"],
            "best_eval": run.state["best_eval"],
            "best_step": run.state["best_step"],
            "train_samples": self.train_samples,
            "learning_rate": self.learning_rate,
            "base_model": self.source,
            "quantization": self.args.quantization,
            "saved_to": str(self.saved_to),
        }

    def summary(self, run: TrainLoop, results: dict[str, Any]) -> str:
        start = f"; before training {format_metrics(results['initial_eval'])}" if results["initial_eval"] else ""
        return (f"final eval ({self.args.task}, {self.args.method}, {run.step} steps): {format_metrics(self.final_eval)}"
                f"{start}; lowest loss {results['best_eval']['loss']:.4f} at step {results['best_step']}; results in "
                f"{run.output_dir / 'results.json'}")


def main(argv: Optional[list[str]] = None) -> Optional[dict[str, Any]]:
    """Run the recipe; returns the results (also written to results.json), or None after ``--stop_after_steps``."""
    args = parse_recipe_args(CausalLMArgs, argv, description=__doc__, prog=NAME)
    return run_recipe(CausalLMRecipe(args), args.loop_settings())


if __name__ == "__main__":
    main()
