"""Tests of the causal-LM recipe (recipes/causal_lm.py and its causal_lm_* helpers).

One shrunken smoke run (a few hundred examples, a short stand-in pretraining, 30 steps) is shared by the module: its
base model and generated JSON-lines files are then the inputs of the other runs, through the same --model_name_or_path
and --train_file options a user passes. Everything runs in-process on 2 CPU cores.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest
import torch

from common.causal_lm_data import IGNORE_INDEX, Collator, Example, encode_examples, read_examples, split_prompt
from common.causal_lm_smoke import make_pairs, train_word_level_tokenizer
from common.methods import build_peft_config
from common.run import RESULTS_SCHEMA

recipe = importlib.import_module("causal_lm")

REPO_ROOT = Path(__file__).resolve().parents[1]
SMOKE = REPO_ROOT / "configs" / "causal_lm" / "smoke.yaml"
QUIET = ["--progress_bar", "false", "--report_to", "none", "--logging_steps", "5"]
# The shrunken smoke task: 640 training examples (20 batches of 32), 64 validation prompts, 150 pretraining steps.
TINY = ["--config", str(SMOKE), "--smoke_data.n_train", "640", "--smoke_data.n_validation", "64",
        "--smoke_data.n_pretrain", "1600", "--base_pretrain_steps", "150", "--eval_generation_samples", "32",
        "--max_steps", "30", "--eval_steps", "15", *QUIET]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("causal_lm") / "smoke"
    return out, recipe.main([*TINY, "--output_dir", str(out)])


def _on_smoke_base(smoke_run, out: Path, *extra: str) -> list[str]:
    """Options of a run on the smoke run's base model and files, as a user passes their own."""
    base = smoke_run[0]
    return ["--model_name_or_path", str(base / "base_model"), "--train_file", str(base / "smoke_data" / "train.jsonl"),
            "--validation_file", str(base / "smoke_data" / "validation.jsonl"), "--max_seq_length", "32",
            "--learning_rate", "5e-3", "--method_options.gsoft.block_size", "8", "--per_device_train_batch_size", "32",
            "--per_device_eval_batch_size", "64", "--torch_num_threads", "1", "--output_dir", str(out), *QUIET, *extra]


def _error(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        recipe.main(argv)
    return str(info.value)


@pytest.fixture(scope="module")
def tokenizer():
    pairs = make_pairs("reverse", 50, seed=0)
    return train_word_level_tokenizer([p["prompt"] + p["completion"] for p in pairs] + ["hello world"])


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------
def test_prompt_tokens_are_masked_and_completion_and_eos_count(tokenizer):
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    ids = tokenizer.convert_tokens_to_ids
    pair, text = encode_examples([Example("reverse: a b c =>", " c b a"), Example(None, "hello world")], tokenizer,
                                 max_seq_length=32, what="test")
    prompt = [bos, *ids(["reverse:", "a", "b", "c", "=>"])]
    completion = [*ids(["c", "b", "a"]), eos]
    assert pair["input_ids"] == prompt + completion
    assert pair["labels"] == [IGNORE_INDEX] * len(prompt) + completion
    assert text["input_ids"] == text["labels"] == [bos, *ids(["hello", "world"]), eos]
    assert split_prompt(pair, eos) == (prompt, completion)
    assert split_prompt(text, eos) is None

    batch = Collator(pad_token_id=pad)([pair, text])
    assert batch["input_ids"][1].tolist() == text["input_ids"] + [pad] * 6
    assert batch["labels"][1].tolist() == text["labels"] + [IGNORE_INDEX] * 6
    assert batch["attention_mask"].sum(1).tolist() == [10, 4]
    left = Collator(pad_token_id=pad, padding_side="left")([{"input_ids": [5, 6]}, {"input_ids": [7]}])
    assert left["input_ids"].tolist() == [[5, 6], [pad, 7]] and left["attention_mask"].tolist() == [[1, 1], [0, 1]]


def test_long_examples_are_cut_and_prompt_only_ones_left_out(tokenizer, caplog):
    examples = [Example("reverse: a b c d e f =>", " f e d c b a"), Example("reverse: a =>", " a")]
    kept = encode_examples(examples, tokenizer, max_seq_length=6, what="training")
    assert len(kept) == 1 and len(kept[0]["input_ids"]) == 6  # the first prompt alone is 9 tokens, BOS included
    assert "1 of 2 training examples are longer than --max_seq_length 6" in caplog.text
    assert "1 of them had no completion token left" in caplog.text
    with pytest.raises(ValueError, match="raise --max_seq_length"):
        encode_examples(examples[:1], tokenizer, max_seq_length=6, what="training")


# ----------------------------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------------------------
def test_smoke_run_lowers_the_loss_and_writes_results(smoke_run):
    out, results = smoke_run
    on_disk = json.loads((out / "results.json").read_text())
    assert set(RESULTS_SCHEMA) <= set(on_disk)
    assert on_disk["train_steps"] == 30 and on_disk["method"] == "gsoft" and on_disk["quantization"] is None
    start, end = results["initial_eval"], results["eval"]
    assert end["loss"] < 0.75 * start["loss"], (start, end)
    assert end["perplexity"] == pytest.approx(math.exp(end["loss"]))
    assert start["exact_match"] == 0.0 and 0.0 <= end["exact_match"] <= 1.0  # the base copies, it never reverses
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "best" / "adapter_config.json").is_file()
    lines = (out / "smoke_data" / "train.jsonl").read_text().splitlines()
    assert len(lines) == 640 and json.loads(lines[0]).keys() == {"prompt", "completion"}


def _eval_loss(model: torch.nn.Module, tokenizer, validation_file: Path) -> float:
    encoded = encode_examples(read_examples(str(validation_file), "--validation_file"), tokenizer, 32, "validation")
    batch = Collator(tokenizer.pad_token_id)(encoded)
    losses, counts = recipe.token_losses(model.eval(), batch)
    return float(losses.double().sum() / counts.sum())


def test_saved_adapter_reloads_on_a_fresh_base_and_reproduces_the_evaluation(smoke_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, results = smoke_run
    base = AutoModelForCausalLM.from_pretrained(out / "base_model")
    tokenizer = AutoTokenizer.from_pretrained(out / "adapter")
    validation = out / "smoke_data" / "validation.jsonl"
    assert _eval_loss(base, tokenizer, validation) == pytest.approx(results["initial_eval"]["loss"], rel=1e-5)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base_model"), out / "adapter")
    assert _eval_loss(model, tokenizer, validation) == pytest.approx(results["eval"]["loss"], rel=1e-5)


def test_resume_from_a_checkpoint_continues_the_run(smoke_run, tmp_path):
    steps = ["--max_steps", "10", "--eval_steps", "5"]
    whole = recipe.main(_on_smoke_base(smoke_run, tmp_path / "whole", *steps))
    assert recipe.main(_on_smoke_base(smoke_run, tmp_path / "split", *steps, "--stop_after_steps", "5")) is None
    assert not (tmp_path / "split" / "results.json").exists()
    resumed = recipe.main(_on_smoke_base(smoke_run, tmp_path / "split", *steps, "--resume_from_checkpoint", "latest"))
    assert resumed["train_steps"] == 10
    assert resumed["rank_state_sha256"] == whole["rank_state_sha256"]
    assert resumed["eval"] == whole["eval"] and resumed["best_eval"] == whole["best_eval"]


# ----------------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------------
def test_missing_file_and_lines_without_the_fields_are_one_clear_error(smoke_run, tmp_path):
    missing = _error(_on_smoke_base(smoke_run, tmp_path / "a", "--train_file", str(tmp_path / "nope.jsonl")))
    assert missing.startswith("causal_lm: error: --train_file") and "no such file" in missing
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "reverse: a b =>", "completion": " b a"}\n{"question": "x", "answer": "y"}\n')
    message = _error(_on_smoke_base(smoke_run, tmp_path / "b", "--train_file", str(bad)))
    assert f"{bad}: line 2: it has the keys ['answer', 'question']" in message
    assert '{"prompt": "...", "completion": "..."}' in message and '{"text": "..."}' in message
    bad.write_text('{"prompt": "reverse: a b =>"}\n')
    assert "line 1: it has prompt but no 'completion'" in _error(_on_smoke_base(smoke_run, tmp_path / "c", "--train_file",
                                                                                str(bad)))
    bad.write_text('{"text": "a b", \n')
    assert "line 1: not JSON" in _error(_on_smoke_base(smoke_run, tmp_path / "d", "--train_file", str(bad)))
    for name in "abcd":
        assert not (tmp_path / name).exists()  # refused before the output directory was claimed


@pytest.mark.parametrize("extra,expected", [
    (["--load_in_4bit", "--method", "full"], "--load_in_4bit with --method full"),
    (["--load_in_4bit", "--save_merged"], "--save_merged with --load_in_4bit"),
    (["--load_in_4bit", "--load_in_8bit"], "exclude each other"),
    (["--train_file", "x.jsonl"], "--task smoke generates its data; drop --train_file"),
])
def test_refused_options_name_the_fix(tmp_path, extra, expected):
    message = _error([*TINY, "--output_dir", str(tmp_path / "out"), *extra])
    assert message.startswith("causal_lm: error:") and expected in message
    assert not (tmp_path / "out").exists()


def test_the_llama_config_names_a_hub_model_and_options_for_every_method():
    args = recipe.parse_recipe_args(recipe.CausalLMArgs, ["--config", str(SMOKE.with_name("llama.yaml"))])
    assert args.task == "custom" and args.model_name_or_path == "meta-llama/Llama-3.2-1B"
    assert set(args.method_options) == {"gsoft", "double_gsoft", "lora", "oft", "boft"}
    for method, options in args.method_options.items():
        build_peft_config(method, None, options=options)  # every option is one its config class knows


def test_custom_task_needs_its_files(tmp_path):
    message = _error(["--output_dir", str(tmp_path / "out"), *QUIET])
    assert "--task custom needs --train_file and --validation_file" in message


# ----------------------------------------------------------------------------------------------------------------------
# A 4-bit base
# ----------------------------------------------------------------------------------------------------------------------
def test_4bit_base_trains_and_its_adapter_reloads_on_a_freshly_quantized_base(smoke_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    out = tmp_path / "q"
    results = recipe.main(_on_smoke_base(smoke_run, out, "--load_in_4bit", "--gradient_checkpointing", "--max_steps",
                                         "20", "--eval_steps", "20", "--eval_at_start"))
    assert results["quantization"] == "4bit"
    assert results["eval"]["loss"] < 0.9 * results["initial_eval"]["loss"], results
    quantized = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(smoke_run[0] / "base_model", quantization_config=quantized,
                                                device_map={"": "cpu"})
    model = PeftModel.from_pretrained(base, out / "adapter")
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    tokenizer = AutoTokenizer.from_pretrained(out / "adapter")
    validation = smoke_run[0] / "smoke_data" / "validation.jsonl"
    assert _eval_loss(model, tokenizer, validation) == pytest.approx(results["eval"]["loss"], rel=1e-5)
