"""The offline smoke task of ``recipes/roberta_glue.py``: generated data, a word-level tokenizer and a tiny base model.

Why each piece exists:

* Data: short movie-review sentences whose label is the *polarity of the adjective XOR a negator* ("the plot was not
  dull" is positive), with label noise. Bag-of-words cannot solve it (the XOR), chance is 0.5 (balanced labels), and
  the noise caps accuracy at ``1 - noise``. Every example also carries ``polarity`` (the adjective alone), a related
  but different label used to stand in for pretraining.
* Tokenizer: a word-level tokenizer trained with ``tokenizers`` on the training sentences, so nothing is downloaded.
* Base model: a tiny randomly initialised encoder cannot be *fine-tuned by rotations* into anything (a frozen random
  network has no features worth rotating), so the recipe first trains the whole tiny model for a few seconds on
  ``polarity`` (``--base_pretrain_steps``) and saves it; the adapter then has to learn negation on top, as a real
  adapter learns a new task on top of pretrained features.
"""

from __future__ import annotations

import random
from typing import Iterable

import torch
from datasets import Dataset, DatasetDict
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerFast

POSITIVE = "good great fine superb lovely brilliant charming moving clever solid".split()
NEGATIVE = "bad awful dull boring poor terrible weak messy silly bland".split()
NEGATORS = "not never hardly".split()
SUBJECTS = "movie film plot story acting script cast ending score pacing".split()
VERBS = "was is seemed felt".split()
INTENSIFIERS = "really quite very so".split()
FILLERS = "rather truly somewhat and but also then the a this that it".split()

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")  # RoBERTa's ids 0..4


def make_examples(n: int, seed: int, noise: float = 0.05) -> dict[str, list]:
    """``n`` examples with columns ``sentence``, ``label`` (polarity XOR negated, flipped with prob. ``noise``) and
    ``polarity`` (the adjective's polarity alone)."""
    rng = random.Random(seed)
    sentences, labels, polarities = [], [], []
    for _ in range(n):
        positive, negated = rng.random() < 0.5, rng.random() < 0.5
        words = [rng.choice(("the", "this", "that")), rng.choice(SUBJECTS), rng.choice(VERBS)]
        if negated:
            words.append(rng.choice(NEGATORS))
        if rng.random() < 0.5:
            words.append(rng.choice(INTENSIFIERS))
        words.append(rng.choice(POSITIVE if positive else NEGATIVE))
        words += [rng.choice(FILLERS + SUBJECTS) for _ in range(rng.randint(0, 6))]
        label = int(positive != negated)
        if rng.random() < noise:
            label = 1 - label
        sentences.append(" ".join(words))
        labels.append(label)
        polarities.append(int(positive))
    return {"sentence": sentences, "label": labels, "polarity": polarities}


def smoke_datasets(n_train: int = 4000, n_validation: int = 1000, seed: int = 0, noise: float = 0.05) -> DatasetDict:
    """Train and validation splits, generated deterministically (different seeds, so no example is shared by design)."""
    return DatasetDict(
        train=Dataset.from_dict(make_examples(n_train, seed, noise)),
        validation=Dataset.from_dict(make_examples(n_validation, seed + 1_000_003, noise)),
    )


def train_word_level_tokenizer(texts: Iterable[str], model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer with RoBERTa's special tokens and templates (``<s> A </s></s> B </s>``)."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS), min_frequency=1))
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>", eos_token="</s>", cls_token="<s>", sep_token="</s>", unk_token="<unk>", pad_token="<pad>",
        mask_token="<mask>", model_max_length=model_max_length,
        model_input_names=["input_ids", "attention_mask"],  # no token_type_ids: RoBERTa has one token type
    )


def pretrain_stand_in(
    model: torch.nn.Module,
    dataset: Dataset,
    collate_fn,
    label_column: str,
    *,
    steps: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
) -> float:
    """Train every weight of ``model`` for ``steps`` on ``label_column`` (a stand-in for pretraining; see module
    docstring). Deterministic for a given seed; returns the last loss."""
    columns = ["input_ids", "attention_mask", label_column]
    data = dataset.select_columns(columns).rename_column(label_column, "labels")
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, collate_fn=collate_fn, generator=generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    model.train()
    loss = torch.tensor(float("nan"))
    step = 0
    while step < steps:
        for batch in loader:
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step >= steps:
                break
    model.eval()
    return float(loss.detach())
