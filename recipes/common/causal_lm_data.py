"""Data of ``recipes/causal_lm.py``: local JSON-lines files of prompt/completion pairs or plain texts, tokenized for
next-token prediction, and the batches of training, evaluation and greedy generation.

Each line of a file is one example, in one of two formats (a file may mix them):

* ``{"prompt": ..., "completion": ...}``: the loss covers the completion and its EOS only; the prompt's tokens are
  labelled -100 (instruction tuning). The prompt is used exactly as written: apply a chat template when writing it.
* ``{"text": ...}``: the loss covers every token after the first, and the EOS (language-model fine-tuning).

The prompt and the completion are tokenized apart and joined, so the boundary between them is exactly where the
file puts it (a tokenizer run over the joined text may merge the prompt's last characters with the completion's
first ones). The tokenizer's own start tokens (Llama's BOS) come first; the EOS is appended by the recipe.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

#: The label of a token that is not predicted (prompt tokens, padding): cross-entropy's ``ignore_index``.
IGNORE_INDEX = -100
#: The two line formats, as the error messages name them.
FORMATS = ('{"prompt": "...", "completion": "..."} (loss on the completion only) or {"text": "..."} (loss on every '
           'token)')


@dataclass(frozen=True)
class Example:
    """One line of a data file: a prompt and its completion, or a text (``prompt`` None)."""

    prompt: Optional[str]
    """The part that conditions the completion and is not trained on; None for a text example."""
    target: str
    """The completion (after ``prompt``), or the whole text: the tokens the loss covers."""


def _line_problem(path: str, line: int, what: str) -> ValueError:
    return ValueError(f"{path}: line {line}: {what}; each line needs {FORMATS}.")


def _example(path: str, line: int, record: Any) -> Example:
    """The example of one parsed line, or an error naming the line and what to change."""
    if not isinstance(record, dict):
        raise _line_problem(path, line, f"a JSON {type(record).__name__}, not an object")
    has_text, has_pair = "text" in record, "prompt" in record or "completion" in record
    if has_text and has_pair:
        raise _line_problem(path, line, "it has both 'text' and 'prompt'/'completion'; keep one format per line")
    if not has_text and not has_pair:
        raise _line_problem(path, line, f"it has the keys {sorted(record)}")
    keys = ("text",) if has_text else ("prompt", "completion")
    for key in keys:
        if key not in record:
            raise _line_problem(path, line, f"it has {'prompt' if key == 'completion' else 'completion'} but no {key!r}")
        if not isinstance(record[key], str):
            raise _line_problem(path, line, f"{key!r} is {record[key]!r}, not a string")
    target = record[keys[-1]]
    if not target.strip():
        raise _line_problem(path, line, f"{keys[-1]!r} is empty (nothing to train on); fill it in or remove the line")
    return Example(prompt=record["prompt"] if has_pair else None, target=target)


def read_examples(path: str, option: str) -> list[Example]:
    """Every example of the JSON-lines file ``path`` (``option`` names the flag that gave it); blank lines are skipped.
    A missing file, bytes that are not UTF-8, a line that is not JSON or lacks the fields are each one error that
    names the file and the line and says what to change."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"{option} {path}: {'a directory, not a file' if file.is_dir() else 'no such file'}; pass a "
                         f"JSON-lines file, one {FORMATS} per line.")
    examples = []
    with file.open("rb") as lines:
        for number, raw in enumerate(lines, 1):
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}: line {number} is not UTF-8 (byte 0x{raw[exc.start]:02x}); save the file as "
                                 "UTF-8.") from None
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                raise _line_problem(path, number, f"not JSON ({exc.msg} at column {exc.colno})") from None
            examples.append(_example(path, number, record))
    if not examples:
        raise ValueError(f"{option} {path}: no examples in the file; write one {FORMATS} per line.")
    return examples


def _special_tokens(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    """How many tokens the tokenizer's template puts before and after a text (Llama: BOS and nothing)."""
    probe = "a"
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return start, len(full) - start - len(bare)
    raise ValueError(f"the tokenizer {type(tokenizer).__name__} encodes {probe!r} as {full} with its special tokens "
                     f"but {bare} without them; the recipe cannot tell where its template adds tokens.")


def encode_examples(examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, max_seq_length: int,
                    what: str) -> list[dict[str, list[int]]]:
    """``input_ids`` and ``labels`` of every example (see the module docstring), at most ``max_seq_length`` tokens.

    A longer example is cut at the end (a cut text or completion loses its EOS). An example with no completion token
    left after the cut is left out; both counts are logged for ``what`` (e.g. "training"), and a set with nothing left
    is an error."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"the tokenizer {type(tokenizer).__name__} has no EOS token; the recipe appends one to every "
                         "completion and text. Pass a --tokenizer_name that has one.")
    _, appended = _special_tokens(tokenizer)
    prompts = tokenizer([e.prompt if e.prompt is not None else e.target for e in examples],
                        add_special_tokens=True)["input_ids"]
    targets = tokenizer([e.target for e in examples], add_special_tokens=False)["input_ids"]
    encoded, cut, dropped = [], 0, 0
    for example, head, target in zip(examples, prompts, targets):
        head = head[:len(head) - appended] if appended else head  # the EOS goes after the completion only
        if example.prompt is None:
            ids, labels = head + [eos], head + [eos]
        else:
            ids = head + target + [eos]
            labels = [IGNORE_INDEX] * len(head) + target + [eos]
        if len(ids) > max_seq_length:
            cut += 1
            ids, labels = ids[:max_seq_length], labels[:max_seq_length]
        if all(label == IGNORE_INDEX for label in labels[1:]):
            dropped += 1
            continue
        encoded.append({"input_ids": ids, "labels": labels})
    if cut:
        logger.warning("%d of %d %s examples are longer than --max_seq_length %d tokens and were cut at the end; %d of "
                       "them had no completion token left and are left out. Raise --max_seq_length to keep them whole.",
                       cut, len(examples), what, max_seq_length, dropped)
    if not encoded:
        raise ValueError(f"none of the {len(examples)} {what} examples has a token to train on within --max_seq_length "
                         f"{max_seq_length} (every prompt fills it); raise --max_seq_length.")
    return encoded


@dataclass
class Collator:
    """Pads a list of encoded examples into a batch: ``input_ids`` with the pad id, ``labels`` with -100, and the
    ``attention_mask``. Training and evaluation pad on the right; greedy generation pads prompts on the left, so that
    every row's next token is at the end."""

    pad_token_id: int
    """The id written into padding positions (masked out by the attention mask and the labels)."""
    pad_to_multiple_of: Optional[int] = None
    """Round the batch length up to a multiple of this (8 for tensor cores under mixed precision)."""
    padding_side: str = "right"
    """right (training, evaluation) or left (generation)."""

    def __call__(self, features: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": []}
        if "labels" in features[0]:
            batch["labels"] = []
        for f in features:
            pad = length - len(f["input_ids"])
            rows = {"input_ids": (f["input_ids"], self.pad_token_id), "attention_mask": ([1] * len(f["input_ids"]), 0)}
            if "labels" in batch:
                rows["labels"] = (f["labels"], IGNORE_INDEX)
            for key, (row, fill) in rows.items():
                batch[key].append(row + [fill] * pad if self.padding_side == "right" else [fill] * pad + row)
        return {key: torch.tensor(rows) for key, rows in batch.items()}


def split_prompt(encoded: dict[str, list[int]], eos_token_id: int) -> Optional[tuple[list[int], list[int]]]:
    """``(prompt ids, completion ids with their EOS)`` of an encoded prompt/completion example, None for a text one
    (whose first token is trained) or a completion cut by ``--max_seq_length`` (no EOS to generate up to)."""
    labels = encoded["labels"]
    if labels[0] != IGNORE_INDEX or labels[-1] != eos_token_id:
        return None
    start = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), None)
    if start is None:
        return None
    return encoded["input_ids"][:start], encoded["input_ids"][start:]
