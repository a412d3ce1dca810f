"""Tests of the GLUE recipe (recipes/roberta_glue.py and its glue_* helpers).

The smoke run and the 2-process run are real `accelerate launch` subprocesses; everything else runs the recipe
in-process on a shrunken smoke task (a few hundred examples, a few steps) to stay fast on 2 CPU cores.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from common.methods import build_peft_config
import importlib

from conftest import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPES = REPO_ROOT / "recipes"
SMOKE = REPO_ROOT / "configs" / "glue" / "smoke.yaml"
ACCELERATE = Path(sys.executable).with_name("accelerate")




recipe = importlib.import_module("roberta_glue")
from common import glue_data  # noqa: E402
from common import glue_smoke  # noqa: E402
from common import glue_tasks  # noqa: E402

# A shrunken smoke task: 192 training examples, batch 16 (12 batches per epoch), a 10-step stand-in pretraining.
TINY = [
    "--config", str(SMOKE), "--smoke_data.n_train", "192", "--smoke_data.n_validation", "64",
    "--base_pretrain_steps", "10", "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "32",
    "--progress_bar", "false", "--report_to", "none", "--logging_steps", "4",
]


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return env


# A guard against a hung process group, not a time limit: on a loaded 2-core machine a 2-process run of the full smoke
# config takes several minutes.
LAUNCH_TIMEOUT_S = 900


def _launch(args: list[str], *, processes: int = 1, timeout: int = LAUNCH_TIMEOUT_S,
            check: bool = True) -> subprocess.CompletedProcess:
    cmd = [str(ACCELERATE), "launch", "--num_processes", str(processes), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no"]
    if processes > 1:
        cmd += ["--multi_gpu", "--main_process_port", str(free_port())]
    proc = subprocess.run([*cmd, str(RECIPES / "roberta_glue.py"), *args], cwd=REPO_ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _run(tmp_path: Path, name: str, *extra: str) -> dict:
    results = recipe.main([*TINY, "--output_dir", str(tmp_path / name), *extra])
    return results


def _error(tmp_path: Path, *extra: str) -> str:
    with pytest.raises(SystemExit) as info:
        recipe.main([*TINY, "--output_dir", str(tmp_path / "err"), *extra])
    return str(info.value)


# ----------------------------------------------------------------------------------------------------------------------
# Metrics against hand-computed values
# ----------------------------------------------------------------------------------------------------------------------
def test_metrics_hand_computed():
    preds, labels = np.array([1, 0, 1, 1, 0, 1]), np.array([1, 0, 0, 1, 1, 1])
    # TP = 3, TN = 1, FP = 1, FN = 1
    assert glue_tasks.accuracy(preds, labels) == pytest.approx(4 / 6)
    assert glue_tasks.f1(preds, labels) == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    mcc = (3 * 1 - 1 * 1) / np.sqrt((3 + 1) * (3 + 1) * (1 + 1) * (1 + 1))
    assert glue_tasks.matthews_correlation(preds, labels) == pytest.approx(mcc)  # = 0.25

    x, y = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 3.0, 2.0, 5.0])
    xc, yc = x - x.mean(), y - y.mean()
    assert glue_tasks.pearson(x, y) == pytest.approx((xc @ yc) / np.sqrt((xc @ xc) * (yc @ yc)))
    # ranks of y: 1, 3, 2, 4 -> Spearman = 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 6 * 2 / 60
    assert glue_tasks.spearmanr(x, y) == pytest.approx(0.8)

    mnli = glue_tasks.get_task("mnli")
    out = glue_tasks.compute_metrics(mnli, {"matched": (np.array([0, 1, 2, 2]), np.array([0, 1, 2, 0])),
                                            "mismatched": (np.array([1, 1]), np.array([1, 2]))})
    assert out == {"accuracy_matched": 0.75, "accuracy_mismatched": 0.5}
    assert mnli.main_metric in out

    stsb = glue_tasks.get_task("stsb")
    assert glue_tasks.predictions_from_logits(stsb, np.array([[0.5], [1.5]])).tolist() == [0.5, 1.5]
    cola = glue_tasks.compute_metrics(glue_tasks.get_task("cola"), {"": (preds, labels)})
    assert cola == {"matthews_correlation": pytest.approx(0.25)}
    mrpc = glue_tasks.compute_metrics(glue_tasks.get_task("mrpc"), {"": (preds, labels)})
    assert set(mrpc) == {"accuracy", "f1"}


def test_every_glue_config_parses_and_names_a_known_task():
    for task in ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte"):
        args = recipe.parse_recipe_args(recipe.GlueArgs, ["--config", str(SMOKE.with_name(f"{task}.yaml"))])
        assert args.task == task and glue_tasks.get_task(task).hub_dataset is not None
        assert args.model_name_or_path == "roberta-base"
        assert set(args.method_options) == {"gsoft", "double_gsoft", "lora", "oft", "boft"}
        for method, options in args.method_options.items():  # every method's options build a valid PEFT config
            assert build_peft_config(method, ["query"], task_type="SEQ_CLS", options=options) is not None


def test_smoke_data_is_balanced_and_not_bag_of_words():
    data = glue_smoke.make_examples(2000, seed=0, noise=0.0)
    labels = np.array(data["label"])
    assert 0.45 < labels.mean() < 0.55  # chance is 0.5
    # The adjective's polarity alone is no better than chance: negation flips it half the time.
    assert abs((np.array(data["polarity"]) == labels).mean() - 0.5) < 0.05
    assert glue_smoke.make_examples(5, seed=3) == glue_smoke.make_examples(5, seed=3)


# ----------------------------------------------------------------------------------------------------------------------
# The main job: single-process smoke run, then reload of the saved adapter
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("glue_smoke") / "run"
    proc = _launch(["--config", str(SMOKE), "--output_dir", str(out), "--progress_bar", "false"])
    return out, proc.stdout + proc.stderr


def test_smoke_run_reaches_accuracy_and_writes_results(smoke_run):
    out, log = smoke_run
    match = re.search(r"final eval \(smoke, gsoft, \d+ steps\): accuracy ([0-9.]+)", log)
    assert match, log[-3000:]
    assert float(match.group(1)) >= 0.70
    results = json.loads((out / "results.json").read_text())
    for key in ("task", "method", "trainable_params", "total_params", "eval", "best_eval", "train_steps",
                "train_runtime_s", "step_time_s_median", "peak_memory_mb", "world_size"):
        assert key in results, key
    assert results["task"] == "smoke" and results["method"] == "gsoft" and results["world_size"] == 1
    assert results["eval"]["accuracy"] >= 0.70 and results["best_eval"]["accuracy"] >= results["eval"]["accuracy"]
    assert 0 < results["trainable_params"] < results["total_params"]
    assert (out / "metrics.jsonl").is_file() and (out / "best" / "adapter_config.json").is_file()
    # one process: nothing communicated, and results.json says so
    assert results["comm_bytes_sent"] == 0 and results["comm_bytes_uncompressed"] == 0
    assert results["compression"] == {"method": "none", "world_size": 1}


def _reloaded(out: Path) -> tuple[float, float]:
    """Accuracy of ``out``'s saved adapter reloaded onto its base model with PEFT, and of the merged model."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    args = recipe.parse_recipe_args(recipe.GlueArgs, ["--config", str(SMOKE)])
    base = AutoModelForSequenceClassification.from_pretrained(out / "base_model", num_labels=2)
    model = PeftModel.from_pretrained(base, out / "adapter")
    tokenizer = AutoTokenizer.from_pretrained(out / "adapter")
    raw, spec = glue_data.load_raw_datasets("smoke", smoke_data=args.smoke_data)
    raw, spec = glue_data.encode_labels(raw, spec)
    validation = recipe.tokenize(raw, tokenizer, spec, args.max_seq_length)["validation"]
    loader = torch.utils.data.DataLoader(validation, batch_size=250, collate_fn=DataCollatorWithPadding(tokenizer))
    adapted = recipe.evaluate(model, {"": loader}, spec)["accuracy"]
    return adapted, recipe.evaluate(model.merge_and_unload(), {"": loader}, spec)["accuracy"]


def test_saved_adapter_reloads_and_reproduces_eval(smoke_run):
    out, _ = smoke_run
    results = json.loads((out / "results.json").read_text())
    assert _reloaded(out) == (pytest.approx(results["eval"]["accuracy"]), pytest.approx(results["eval"]["accuracy"]))


# ----------------------------------------------------------------------------------------------------------------------
# Data parallel and resume
# ----------------------------------------------------------------------------------------------------------------------
# The 2-process runs are the full smoke config (252 steps: 4 epochs at a global batch of 64), so that their accuracy
# means something; about 30 s each on 2 CPU cores.
# 8 epochs (504 steps): Top-K 1% compressed updates need about twice the smoke config's 252 steps (0.964 at 504,
# 0.515-0.87 at 252 depending on the learning rate), so both runs get them: metrics compared at equal steps
DDP_SMOKE = ["--config", str(SMOKE), "--progress_bar", "false", "--report_to", "none", "--num_train_epochs", "8"]
DDP_STEPS = 504
MARGIN = 0.02  # accuracy points a compressed run may lose against the uncompressed 2-process run


def _ddp_smoke(tmp_path_factory, name: str, *extra: str) -> tuple[dict, list[dict], str]:
    out = tmp_path_factory.mktemp(name) / "run"
    proc = _launch([*DDP_SMOKE, "--output_dir", str(out), *extra], processes=2)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return json.loads((out / "results.json").read_text()), records, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def ddp_uncompressed(tmp_path_factory):
    """The baseline: 2 processes, --grad_compression none (an fp32 all-reduce through the counting hook)."""
    return _ddp_smoke(tmp_path_factory, "glue_ddp_none")


@pytest.fixture(scope="module")
def ddp_topk(tmp_path_factory):
    """Top-K 1% of each process's AdamW update, averaged with error feedback (auto: ef) every step."""
    return _ddp_smoke(tmp_path_factory, "glue_ddp_topk", "--grad_compression", "topk", "--compression_ratio", "0.01",
                      "--compress", "updates")


def test_two_processes_keep_equal_adapter_weights(ddp_uncompressed):
    results, records, _ = ddp_uncompressed
    assert results["world_size"] == 2 and results["train_steps"] == DDP_STEPS
    hashes = results["rank_state_sha256"]
    assert len(hashes) == 2 and hashes[0] == hashes[1]
    assert results["eval"]["accuracy"] >= 0.85  # learned (chance 0.5): a baseline worth comparing with
    # fp32 all-reduce of the trainable parameters, counted by the hook: 2 processes send the whole buffer each step
    steps, trainable = results["train_steps"], results["trainable_params"]
    assert results["comm_bytes_sent"] == results["comm_bytes_uncompressed"] == steps * 4 * trainable
    assert results["compression"]["method"] == "none" and results["compression"]["world_size"] == 2
    assert results["compression"]["steps"] == steps


def _comm_records(records: list[dict]) -> list[tuple[int, int]]:
    return [(r["step"], r["comm_bytes_sent"]) for r in records if "comm_bytes_sent" in r]


def _topk_bytes_per_round(adapter_dir: Path, ratio: float) -> int:
    """Top-K payload of one round over the trainable tensors (the saved adapter: GSOFT blocks and the head):
    ceil(ratio * n) fp32 values + as many int32 indices of each tensor (gsoft.distributed selects per tensor). With 2
    processes all_gather sends exactly the payload."""
    return 8 * sum(math.ceil(ratio * t.numel()) for t in _adapter_state(adapter_dir).values())


def test_topk_two_processes_stay_equal_and_send_the_expected_bytes(ddp_topk, ddp_uncompressed):
    results, records, log = ddp_topk
    hashes = results["rank_state_sha256"]
    assert results["world_size"] == 2 and len(hashes) == 2 and hashes[0] == hashes[1]
    steps, trainable = results["train_steps"], results["trainable_params"]
    assert steps == ddp_uncompressed[0]["train_steps"] == DDP_STEPS
    per_step = _topk_bytes_per_round(Path(results["saved_to"]), 0.01)
    assert results["comm_bytes_sent"] == steps * per_step
    assert results["comm_bytes_uncompressed"] == steps * 4 * trainable
    assert results["comm_bytes_uncompressed"] / results["comm_bytes_sent"] >= 30  # the target, indices included
    summary = results["compression"]
    assert summary["method"] == "topk" and summary["compress"] == "updates" and summary["error_feedback"] == "ef"
    assert summary["compression_ratio"] == 0.01 and summary["steps"] == summary["syncs"] == steps
    # metrics.jsonl: cumulative bytes at every logging step, ending at the total
    logged = _comm_records(records)
    assert [s for s, _ in logged] == [*range(25, steps + 1, 25), steps]
    assert [b for _, b in logged] == [s * per_step for s, _ in logged]
    assert "communication (topk): " in log


def test_topk_two_processes_reach_the_uncompressed_accuracy(ddp_topk, ddp_uncompressed):
    compressed, baseline = ddp_topk[0]["eval"]["accuracy"], ddp_uncompressed[0]["eval"]["accuracy"]
    assert compressed >= baseline - MARGIN, (compressed, baseline)


def test_topk_gradients_two_processes_stay_equal_and_send_the_expected_bytes(tmp_path):
    """--compress gradients (the DDP hook, EF21): replicas equal and per-tensor Top-K bytes every step. Its accuracy
    is not asserted (under AdamW it stays near chance on this task, docs/distributed.md, which the library warns
    about), so the shrunken smoke task is enough."""
    out = tmp_path / "run"
    proc = _launch([*TINY, "--output_dir", str(out), "--max_steps", "20", "--grad_compression", "topk",
                    "--compression_ratio", "0.01", "--compress", "gradients", "--error_feedback", "ef21"], processes=2)
    results = json.loads((out / "results.json").read_text())
    assert results["rank_state_sha256"][0] == results["rank_state_sha256"][1]
    assert results["comm_bytes_sent"] == 20 * _topk_bytes_per_round(Path(results["saved_to"]), 0.01)
    summary = results["compression"]
    assert summary["compress"] == "gradients" and summary["error_feedback"] == "ef21" and summary["syncs"] == 20
    assert proc.stderr.count("compressed gradients under AdamW") == 1  # a notice per run, not per process


def test_local_steps_two_processes_synchronise_at_evaluations_and_resume_exactly(tmp_path):
    # TINY in 2 processes: 6 steps per epoch. H = 4, evaluations at 3, 6, 7: every evaluation synchronises (and the
    # end), so the replicas average at 3, 6 and 7 and never reach 4 local steps; without the evaluation points it
    # would be 4 and 7. Interrupted at 5 (replicas differ then: each one's parameters are in the checkpoint), the
    # resumed run must end bit-identical, error-feedback buffers and byte counters included.
    common = [*TINY, "--max_steps", "7", "--eval_steps", "3", "--local_steps", "4", "--grad_compression", "topk"]
    _launch([*common, "--output_dir", str(tmp_path / "full")], processes=2)
    _launch([*common, "--output_dir", str(tmp_path / "resumed"), "--stop_after_steps", "5"], processes=2)
    _launch([*common, "--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint", "latest"], processes=2)
    full, resumed = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("full", "resumed"))
    hashes = full["rank_state_sha256"]
    assert len(hashes) == 2 and hashes[0] == hashes[1]
    summary = full["compression"]
    assert summary["method"] == "topk" and summary["local_steps"] == 4 and summary["compress"] == "updates"
    assert summary["error_feedback"] == "ef"  # auto, for updates
    assert summary["steps"] == 7 and summary["syncs"] == 3
    per_sync = _topk_bytes_per_round(tmp_path / "full" / "adapter", 0.01)
    assert full["comm_bytes_sent"] == 3 * per_sync  # parameter deltas, 3 rounds
    assert full["comm_bytes_uncompressed"] == 7 * 4 * full["trainable_params"]  # the gradient all-reduces avoided
    assert resumed["rank_state_sha256"] == hashes
    assert resumed["compression"] == summary and resumed["eval"] == full["eval"]
    a, b = _adapter_state(tmp_path / "full" / "adapter"), _adapter_state(tmp_path / "resumed" / "adapter")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_compression_on_gloo_is_a_clear_error(tmp_path):
    out = tmp_path / "bf16"
    proc = _launch([*TINY, "--output_dir", str(out), "--max_steps", "2", "--base_pretrain_steps", "0",
                    "--grad_compression", "bf16"], processes=2, check=False)
    assert proc.returncode != 0
    assert "roberta_glue: error: --grad_compression bf16:" in proc.stderr and "gloo" in proc.stderr, proc.stderr[-3000:]
    assert not out.exists()  # a fresh output directory is not left behind: fixing the flag and re-running works


def test_refused_option_in_two_processes_is_one_line(tmp_path):
    """The model is loaded and adapted on the main process first: when that fails, the other process stops quietly
    instead of waiting at a barrier, so the run reports its error once."""
    out = tmp_path / "bad_block"
    proc = _launch([*TINY, "--output_dir", str(out), "--max_steps", "2", "--base_pretrain_steps", "0",
                    "--method_options.gsoft.block_size", "7"], processes=2, check=False)
    assert proc.returncode != 0
    assert proc.stderr.count("roberta_glue: error:") == 1, proc.stderr[-3000:]
    assert "roberta_glue: error: --method gsoft with options" in proc.stderr and "block_size" in proc.stderr
    assert "Traceback" not in proc.stderr.split("roberta_glue: error:")[0]  # no process's traceback before it
    assert not out.exists()


def _adapter_state(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


def test_resume_gives_identical_results(tmp_path):
    # 12 batches per epoch, 2 per step: 6 steps per epoch. Stopping at step 8 resumes mid-epoch (4 batches skipped),
    # after evaluations at steps 3 and 6; dropout is on, so RNG states must be restored too.
    common = ["--max_steps", "14", "--eval_steps", "3", "--gradient_accumulation_steps", "2"]
    full = _run(tmp_path, "full", *common)
    assert _run(tmp_path, "resumed", *common, "--stop_after_steps", "8") is None
    assert not (tmp_path / "resumed" / "results.json").exists()
    resumed = _run(tmp_path, "resumed", *common, "--resume_from_checkpoint", "latest")
    assert resumed["train_steps"] == full["train_steps"] == 14
    assert resumed["eval"] == full["eval"] and resumed["best_eval"] == full["best_eval"]
    assert resumed["best_step"] == full["best_step"]
    assert resumed["rank_state_sha256"] == full["rank_state_sha256"]
    a, b = _adapter_state(tmp_path / "full" / "adapter"), _adapter_state(tmp_path / "resumed" / "adapter")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------------------------------
# Local files
# ----------------------------------------------------------------------------------------------------------------------
def _write_local(tmp_path: Path, fmt: str, string_labels: bool = False) -> tuple[Path, Path]:
    import pandas as pd

    paths = []
    for split, (n, seed) in {"train": (192, 0), "validation": (64, 1)}.items():
        frame = pd.DataFrame(glue_smoke.make_examples(n, seed)).rename(columns={"sentence": "text", "label": "y"})
        if string_labels:
            frame["y"] = frame["y"].map({0: "neg", 1: "pos"})
        path = tmp_path / f"{split}.{fmt}"
        if fmt == "csv":
            frame.to_csv(path, index=False)
        elif fmt == "tsv":
            frame.to_csv(path, sep="\t", index=False)
        else:
            frame.to_json(path, orient="records", lines=True)
        paths.append(path)
    return paths[0], paths[1]


def test_local_csv_trains_custom_task(tmp_path):
    train, validation = _write_local(tmp_path, "csv")
    results = _run(tmp_path, "csv", "--task", "custom", "--train_file", str(train), "--validation_file",
                   str(validation), "--text_columns", "text", "--label_column", "y", "--max_steps", "4")
    assert results["task"] == "custom" and set(results["eval"]) == {"accuracy", "f1"}


@pytest.mark.parametrize("fmt", ["jsonl", "tsv"])
def test_local_json_lines_and_tsv_with_string_labels(tmp_path, fmt):
    train, validation = _write_local(tmp_path, fmt, string_labels=True)
    raw, spec = glue_data.load_raw_datasets("custom", train_file=str(train), validation_file=str(validation),
                                            text_columns=["text"], label_column="y")
    raw, spec = glue_data.encode_labels(raw, spec)
    assert spec.num_labels == 2 and spec.label_names == ("neg", "pos")
    expected = glue_smoke.make_examples(192, 0)["label"]
    assert raw["train"]["y"] == expected  # "neg" -> 0, "pos" -> 1
    # A GLUE task with local files maps its own label names (SST-2: negative, positive).
    sst2_train, sst2_val = (tmp_path / "sst2_train.jsonl"), (tmp_path / "sst2_val.jsonl")
    for path in (sst2_train, sst2_val):
        path.write_text('{"sentence": "a fine film", "label": "positive"}\n{"sentence": "dull", "label": "negative"}\n')
    raw, spec = glue_data.load_raw_datasets("sst2", train_file=str(sst2_train), validation_file=str(sst2_val))
    raw, spec = glue_data.encode_labels(raw, spec)
    assert raw["train"]["label"] == [1, 0] and spec.num_labels == 2


def test_mnli_local_files_evaluate_matched_and_mismatched(tmp_path):
    rows = ('{"premise": "p", "hypothesis": "h", "label": "neutral"}\n'
            '{"premise": "q", "hypothesis": "g", "label": "contradiction"}\n')
    files = {}
    for name in ("train", "matched", "mismatched"):
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text(rows)
    raw, spec = glue_data.load_raw_datasets("mnli", train_file=str(files["train"]),
                                            validation_file=str(files["matched"]),
                                            validation_mismatched_file=str(files["mismatched"]))
    raw, spec = glue_data.encode_labels(raw, spec)
    assert spec.eval_splits == {"matched": "validation", "mismatched": "validation_mismatched"}
    assert raw["validation_mismatched"]["label"] == [1, 2] and spec.main_metric == "accuracy_matched"


def test_regression_labels_stay_floats(tmp_path):
    path = tmp_path / "sts.jsonl"
    path.write_text('{"sentence1": "a", "sentence2": "b", "label": 3.2}\n'
                    '{"sentence1": "c", "sentence2": "d", "label": 0.5}\n')
    raw, spec = glue_data.load_raw_datasets("stsb", train_file=str(path), validation_file=str(path))
    raw, spec = glue_data.encode_labels(raw, spec)
    assert spec.is_regression and raw["train"]["label"] == pytest.approx([3.2, 0.5])


# ----------------------------------------------------------------------------------------------------------------------
# Clear errors
# ----------------------------------------------------------------------------------------------------------------------
def test_unknown_task_names_the_choices(tmp_path):
    message = _error(tmp_path, "--task", "sst3")
    assert "Unknown task 'sst3'" in message and "did you mean 'sst2'" in message and "custom" in message


def test_missing_columns_name_what_exists(tmp_path):
    train, validation = _write_local(tmp_path, "csv")
    message = _error(tmp_path, "--task", "custom", "--train_file", str(train), "--validation_file", str(validation),
                     "--text_columns", "sentence", "--label_column", "y")
    assert "['sentence'] not found" in message and "'text'" in message and "--text_columns" in message


def test_label_count_mismatch(tmp_path):
    path = tmp_path / "three.jsonl"
    path.write_text("".join(f'{{"sentence": "s{i}", "label": {i % 3}}}\n' for i in range(6)))
    message = _error(tmp_path, "--task", "sst2", "--train_file", str(path), "--validation_file", str(path))
    assert "Label count mismatch" in message and "has 2 labels" in message
    message = _error(tmp_path, "--num_labels", "3")
    assert "Label count mismatch" in message and "--num_labels 3" in message


def test_block_size_that_does_not_fit_names_valid_sizes(tmp_path):
    message = _error(tmp_path, "--base_pretrain_steps", "0", "--method_options.gsoft.block_size", "7")
    assert "--method gsoft" in message and "block_size" in message
    assert re.search(r"\b(2|4|8|16|32)\b", message.split("block_size", 1)[1]), message


@pytest.mark.parametrize("flags, expected", [
    (["--compression_ratio", "1.5"], "--compression_ratio 1.5: compression_ratio must be in (0, 1]"),
    (["--compression_ratio", "0"], "--compression_ratio 0.0: compression_ratio must be in (0, 1]"),
    (["--grad_compression", "bogus"],
     "--grad_compression bogus: unknown compression method 'bogus'; choose one of none, fp16, bf16, int8, sign, topk"),
    (["--error_feedback", "bogus"], "--error_feedback bogus: unknown error_feedback 'bogus'; choose one of auto, none, "
                                    "ef, ef21"),
    (["--local_steps_schedule", "bogus"],
     "--local_steps_schedule bogus: unknown local_steps_schedule 'bogus'; choose one of fixed, geometric"),
    (["--local_steps", "0"], "--local_steps 0: local_steps must be an integer >= 1"),
    (["--grad_compression", "gdsec", "--error_feedback", "ef"], "--grad_compression gdsec --error_feedback ef: gdsec"),
    (["--compress", "weights"], "--compress weights: unknown compress 'weights'; choose one of gradients, updates"),
    (["--compress", "gradients", "--local_steps", "4"],
     "--compress gradients --local_steps 4: local_steps=4 averages parameter updates, not gradients"),
])
def test_bad_compression_options_fail_before_any_work(tmp_path, flags, expected):
    message = _error(tmp_path, *flags)
    assert expected in message, message
    assert flags[1] in message  # names the value
    assert not (tmp_path / "err").exists()


def test_compression_in_one_process_warns_that_it_is_ignored(tmp_path, capfd):
    results = _run(tmp_path, "single", "--max_steps", "2", "--base_pretrain_steps", "0", "--grad_compression", "topk",
                   "--local_steps", "4")
    err = capfd.readouterr().err
    assert err.count("a single process has nothing to communicate") == 1, err[-3000:]
    assert results["compression"] == {"method": "none", "world_size": 1} and results["comm_bytes_sent"] == 0


def test_model_that_cannot_be_fetched_is_one_line_after_one_fetch(tmp_path, hub_downloads):
    """A hub name that cannot be fetched (offline here; without a network the hub retries each fetch with messages):
    its config is asked for once, not again by the tokenizer and the model, and the error is one line naming it."""
    message = _error(tmp_path, "--model_config", "{}", "--base_pretrain_steps", "0", "--model_name_or_path",
                     "no-such-org/no-such-model")
    assert message.startswith("roberta_glue: error: --model_name_or_path 'no-such-org/no-such-model': ")
    assert "\n" not in message and hub_downloads == ["config.json"]
    assert not (tmp_path / "err").exists()


def test_output_dir_holding_another_run_is_refused(tmp_path):
    _run(tmp_path, "out", "--max_steps", "2", "--base_pretrain_steps", "0")
    message = _error(tmp_path, "--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--base_pretrain_steps",
                     "0", "--learning_rate", "1e-3")
    assert "different run" in message and "learning_rate" in message and "--overwrite_output_dir" in message
    message = _error(tmp_path, "--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--base_pretrain_steps", "0")
    assert "finished run" in message
    again = _run(tmp_path, "out", "--max_steps", "2", "--base_pretrain_steps", "0", "--learning_rate", "1e-3",
                 "--overwrite_output_dir")
    assert again["train_steps"] == 2


def test_divergence_with_cayley_neumann_names_the_exact_map(tmp_path):
    """A learning rate far too high under the truncated Neumann series: one line naming the step, with the exact map
    among the fixes, and nothing saved from the diverged state."""
    message = _error(tmp_path, "--max_steps", "12", "--base_pretrain_steps", "0", "--learning_rate", "50",
                     "--method_options", "{gsoft: {orthogonal_map: cayley_neumann}}", "--eval_steps", "4",
                     "--logging_steps", "2")
    assert message.startswith("roberta_glue: error: the ") and " became " in message and " at step " in message
    assert "lower --learning_rate or use the exact Cayley map (orthogonal_map: cayley in method_options)" in message
    assert "\n" not in message
    assert not (tmp_path / "err" / "results.json").exists() and not (tmp_path / "err" / "adapter").exists()


# ----------------------------------------------------------------------------------------------------------------------
# --backend hivemind: a swarm of peers on this machine (loopback only: no relay, no public bootstrap)
# ----------------------------------------------------------------------------------------------------------------------
# A swarm step is 1,920 samples (60 batches among the peers), so that a step lasts longer than hivemind's progress
# refresh on this machine; 8 epochs of the smoke data are 17 swarm steps (one of warm-up), long enough for a fourth
# peer started when the others begin (about 20 s to set up on 2 loaded cores) to join mid-run.
SWARM_EPOCHS = ["--num_train_epochs", "8"]
SWARM = ["--config", str(SMOKE), "--progress_bar", "false", "--report_to", "none", "--backend", "hivemind",
         "--run_id", "smoke-swarm", "--host_maddrs", "/ip4/127.0.0.1/tcp/0", "--use_relay", "false",
         "--target_batch_size", "1920", "--warmup_steps", "1", "--matchmaking_time", "1", "--averaging_timeout",
         "15", "--eval_steps", "1000", "--logging_steps", "1", "--torch_num_threads", "1", *SWARM_EPOCHS]


def _peer(out: Path, *extra: str) -> subprocess.Popen:
    """One peer (its own process group, so that killing it also kills hivemind's daemons, as a machine dying does)."""
    log = open(out.with_suffix(".log"), "w")
    return subprocess.Popen([sys.executable, str(RECIPES / "roberta_glue.py"), *SWARM, "--output_dir", str(out),
                             *extra], cwd=REPO_ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_for(condition, what: str, peers: list[subprocess.Popen], timeout_s: float = 600.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not condition():
        dead = [p.args for p in peers if p.poll() not in (None, 0)]
        assert not dead, f"a peer failed while waiting for {what}: {dead}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def _reached(out: Path, step: int) -> bool:
    """Whether the peer writing to ``out`` has logged swarm step ``step``."""
    metrics = out / "metrics.jsonl"
    return metrics.is_file() and any(json.loads(line).get("step", 0) >= step
                                     for line in metrics.read_text().splitlines())


def test_hivemind_swarm_with_a_peer_leaving_and_one_joining_late(tmp_path):
    """Three peers start the smoke task together; once they train a fourth joins, and at swarm step 3 one dies
    (SIGKILL of its process group); the survivors finish with one learned model and count their bytes, and the late
    peer's saved adapter reloads and reproduces its accuracy."""
    import signal

    pytest.importorskip("hivemind")
    first = tmp_path / "a"
    peers = [_peer(first, "--min_peers", "3")]
    try:
        _wait_for(lambda: (first / "peer_addresses.json").is_file(), "the first peer's address", peers)
        addresses = json.loads((first / "peer_addresses.json").read_text())["addresses"]
        assert addresses and all(a.startswith("/ip4/127.0.0.1/tcp/") for a in addresses)  # loopback only
        address = addresses[0]
        peers += [_peer(tmp_path / name, "--min_peers", "3", "--initial_peers", address) for name in ("b", "c")]
        _wait_for(lambda: _reached(first, 1), "the first swarm step", peers)
        peers += [_peer(tmp_path / "d", "--initial_peers", address)]  # joins while the others train
        _wait_for(lambda: _reached(first, 3), "swarm step 3", peers)
        os.killpg(peers[2].pid, signal.SIGKILL)
        for name, peer in zip("abd", (peers[0], peers[1], peers[3])):
            assert peer.wait(timeout=600) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    finally:
        for peer in peers:
            if peer.poll() is None:
                os.killpg(peer.pid, signal.SIGKILL)
    logs = {name: (tmp_path / f"{name}.log").read_text() for name in "abd"}
    accuracies = []
    for name in "abd":
        results = json.loads((tmp_path / name / "results.json").read_text())
        accuracies.append(results["eval"]["accuracy"])
        assert results["train_steps"] == 17 and results["compression"]["method"] == "hivemind:fp16"
        assert results["comm_bytes_received"] > 0  # the late peer at least downloaded the swarm's state
        if name != "d":  # how many rounds the late peer joins depends on how fast it starts on a loaded machine
            assert results["comm_bytes_sent"] > 0 and results["averaging_rounds"]["succeeded"] > 0
    # One model: the survivors averaged to the end. Its accuracy against the single-process run's 0.964 is measured
    # in docs/volunteer.md, not asserted: on this bistable task the swarm left the 0.5-0.6 plateau in most runs and
    # stayed on it (0.595, and 0.515 on a loaded machine) in others (docs/volunteer.md, "Measured").
    assert max(accuracies) - min(accuracies) <= 0.01, (accuracies, logs["a"][-2000:])
    assert "Downloading parameters from peer" in logs["d"]  # the late peer started from the swarm's state
    assert not (tmp_path / "c" / "results.json").exists()
    results = json.loads((tmp_path / "d" / "results.json").read_text())
    assert _reloaded(tmp_path / "d") == (pytest.approx(results["eval"]["accuracy"]),) * 2


def test_hivemind_peer_stops_and_resumes_from_its_checkpoint(tmp_path):
    """A peer alone in its swarm checkpoints at --stop_after_steps (hivemind's swarm step included) and a restart
    with --resume_from_checkpoint latest, joining through another address, continues from that step."""
    pytest.importorskip("hivemind")
    out = tmp_path / "peer"
    solo = [*TINY, "--backend", "hivemind", "--run_id", "solo", "--host_maddrs", "/ip4/127.0.0.1/tcp/0",
            "--use_relay", "false", "--target_batch_size", "64", "--max_steps", "4", "--warmup_steps", "1",
            "--logging_steps", "1", "--output_dir", str(out)]
    assert recipe.main([*solo, "--stop_after_steps", "2"]) is None
    assert (out / "checkpoints" / "step_00000002").is_dir()
    swarm = json.loads((out / "peer_addresses.json").read_text())
    assert swarm["run_id"] == "solo" and all(a.startswith("/ip4/127.0.0.1/tcp/") for a in swarm["addresses"])
    results = recipe.main([*solo, "--resume_from_checkpoint", "latest", "--min_peers", "1"])
    assert results["train_steps"] == 4 and results["compression"]["method"] == "hivemind:fp16"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]  # steps 3 and 4 after the restart


@pytest.mark.parametrize("extra, message", [
    ([], "--backend hivemind needs --run_id NAME"),
    (["--run_id", "r", "--grad_compression", "topk"], "--grad_compression topk --local_steps 1: these compress"),
    (["--run_id", "r", "--gradient_accumulation_steps", "2"], "--gradient_accumulation_steps 2: with --backend hivemind"),
    (["--run_id", "r", "--mixed_precision", "fp16"], "--mixed_precision fp16 with --backend hivemind"),
    (["--run_id", "r", "--matchmaking_time", "90"], "averaging_timeout 60.0 must exceed matchmaking_time 90.0"),
])
def test_hivemind_options_refused_before_any_work(tmp_path, extra, message):
    assert message in _error(tmp_path, "--backend", "hivemind", *extra)
    assert not (tmp_path / "err").exists()
