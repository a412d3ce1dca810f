"""The offline smoke task of ``recipes/causal_lm.py``: a generated corpus, a word-level tokenizer and what a tiny
Llama is pre-trained on before it is adapted.

Why each piece exists:

* Data: prompts ``reverse: c a f =>`` with the completion `` f a c`` (3 to 6 letters from 12). The space of prompts is
  large enough that the validation prompts are unseen (those that occur in training are left out), and greedy
  generation either reproduces the reversed letters and the EOS or not, so exact match is a clear score. The files
  are JSON lines, read through the same ``--train_file`` path as a user's data.
* Base model: a frozen randomly initialised network cannot be fine-tuned by rotations into anything, so the recipe
  first trains the whole tiny Llama for a few seconds on a related task, ``copy: c a f =>`` -> `` c a f``
  (``--base_pretrain_steps`` on ``--base_pretrain_file``), and saves it. The base then copies perfectly and never
  reverses; the adapter has to turn copying into reversing, as a real adapter teaches a pretrained model a new task.
* Tokenizer: a word level one (each letter, the task words and ``=>`` one token) built with ``tokenizers`` from the
  training texts, with Llama's template (BOS first, the EOS appended by the recipe), so nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

LETTERS = "a b c d e f g h i j k l".split()
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
#: The generated files, by the option that reads them.
FILES = {"train_file": "train.jsonl", "validation_file": "validation.jsonl", "base_pretrain_file": "pretrain.jsonl"}
#: The tasks: the letters of the completion given the prompt's letters.
TASKS = {"copy": lambda letters: letters, "reverse": lambda letters: letters[::-1]}


def make_pairs(task: str, n: int, seed: int, min_length: int = 3, max_length: int = 6,
               exclude: Iterable[str] = ()) -> list[dict[str, str]]:
    """``n`` prompt/completion pairs of ``task`` (copy or reverse) with ``min_length`` to ``max_length`` letters,
    drawn with ``seed``; prompts in ``exclude`` are drawn again."""
    if task not in TASKS:
        raise ValueError(f"unknown smoke task {task!r}; choose one of {', '.join(TASKS)}.")
    if not 1 <= min_length <= max_length:
        raise ValueError(f"smoke_data min_length {min_length} and max_length {max_length}: need 1 <= min <= max.")
    rng, skip, pairs = random.Random(seed), set(exclude), []
    while len(pairs) < n:
        letters = [rng.choice(LETTERS) for _ in range(rng.randint(min_length, max_length))]
        prompt = f"{task}: {' '.join(letters)} =>"
        if prompt in skip:
            continue
        pairs.append({"prompt": prompt, "completion": " " + " ".join(TASKS[task](letters))})
    return pairs


def _write_jsonl(path: Path, records: list[dict[str, str]]) -> None:
    """Write beside ``path`` and rename into place: a process killed mid-write leaves no half file."""
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    partial.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(partial, path)


def write_corpus(directory: Path, n_train: int = 4000, n_validation: int = 200, n_pretrain: int = 4000,
                 seed: int = 0, min_length: int = 3, max_length: int = 6) -> dict[str, Path]:
    """Generate the smoke corpus into ``directory`` (reverse for training and validation, copy for the stand-in
    pretraining; validation prompts never occur in training) unless it is there already; the paths by option."""
    paths = {option: directory / name for option, name in FILES.items()}
    if all(path.is_file() for path in paths.values()):
        return paths
    directory.mkdir(parents=True, exist_ok=True)
    train = make_pairs("reverse", n_train, seed, min_length, max_length)
    validation = make_pairs("reverse", n_validation, seed + 1_000_003, min_length, max_length,
                            exclude=(p["prompt"] for p in train))
    pretrain = make_pairs("copy", n_pretrain, seed + 2_000_003, min_length, max_length)
    for option, records in (("train_file", train), ("validation_file", validation), ("base_pretrain_file", pretrain)):
        _write_jsonl(paths[option], records)
    return paths


def train_word_level_tokenizer(texts: Iterable[str], model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """A word-level tokenizer (split on whitespace) of every word in ``texts``, with a pad, BOS, EOS and unknown
    token and Llama's template: BOS before every text, nothing after it."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS), min_frequency=1))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", model_max_length=model_max_length,
                                   model_input_names=["input_ids", "attention_mask"])
