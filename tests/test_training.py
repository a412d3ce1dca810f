"""common: the option parser, method switch, output-dir protection, results and checkpoints shared by the
recipes."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Literal, Optional

import pytest
import torch
from accelerate import Accelerator
from peft import BOFTConfig, LoraConfig, OFTConfig, PeftModel
from conftest import tiny_roberta
from safetensors import safe_open

from gsoft import GSOFTConfig
from common.args import config_to_dict
from common.checkpoint import load_checkpoint, resolve_checkpoint, resume_position, save_checkpoint
from common.methods import METHODS, apply_method, build_peft_config
from common.run import (
    StepTimer,
    accelerator_kwargs,
    count_parameters,
    peak_memory_mb,
    prepare_output_dir,
    reset_peak_memory,
    write_results,
)
from common.tracking import MetricsLogger


@dataclasses.dataclass
class Options:
    learning_rate: float = dataclasses.field(default=1e-3, metadata={"help": "peak learning rate"})
    max_steps: int = dataclasses.field(default=10, metadata={"help": "optimizer steps"})
    method: Literal["gsoft", "lora"] = dataclasses.field(default="gsoft", metadata={"help": "adapter"})
    with_prior: bool = dataclasses.field(default=False, metadata={"help": "a flag"})
    text_columns: list[str] = dataclasses.field(default_factory=lambda: ["sentence"], metadata={"help": "columns"})
    label_column: Optional[str] = dataclasses.field(default="label", metadata={"help": "label"})
    method_options: dict = dataclasses.field(
        default_factory=lambda: {"gsoft": {"block_size": 8}}, metadata={"help": "per-method options"}
    )

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")


def _parse(argv, tmp_path=None, yaml_text=None):
    from common.args import parse_recipe_args

    if yaml_text is not None:
        path = tmp_path / "cfg.yaml"
        path.write_text(yaml_text)
        argv = ["--config", str(path), *argv]
    return parse_recipe_args(Options, argv)


def test_yaml_then_cli_overrides(tmp_path):
    opts = _parse(
        ["--learning_rate", "1e-4", "--with_prior", "--text_columns", "a,b", "--method_options.gsoft.n_factors", "3",
         "--method_options.lora.r", "16", "--label_column", "null"],
        tmp_path,
        "learning_rate: 5e-3\nmax_steps: 7\nmethod: lora\nmethod_options: {gsoft: {block_size: 4}}\n",
    )
    assert opts.learning_rate == 1e-4 and isinstance(opts.learning_rate, float)
    assert opts.max_steps == 7 and opts.method == "lora" and opts.with_prior is True
    assert opts.text_columns == ["a", "b"] and opts.label_column is None
    assert opts.method_options == {"gsoft": {"block_size": 4, "n_factors": 3}, "lora": {"r": 16}}
    assert _parse(["--text_columns", "[x, y]", "--with_prior=false"]).text_columns == ["x", "y"]
    assert config_to_dict(opts)["method_options"]["lora"] == {"r": 16}
    # the dataclass default is not mutated by dotted overrides
    assert Options().method_options == {"gsoft": {"block_size": 8}}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--learning_rat", "1"], "did you mean --learning_rate"),
        (["--max_steps", "2.5"], "option --max_steps: expected an integer"),
        (["--method", "boft"], "expected one of ['gsoft', 'lora']"),
        (["--max_steps", "0"], "max_steps must be >= 1"),
        (["--learning_rate"], "--learning_rate needs a value"),
        (["--config", "/nonexistent.yaml"], "not found"),
        (["stray"], "unexpected argument 'stray'"),
        (["--max_steps.x", "1"], "not a mapping"),
    ],
)
def test_bad_options_name_the_option(argv, message):
    with pytest.raises(SystemExit) as excinfo:
        _parse(argv)
    assert message in str(excinfo.value.code)


def test_bad_yaml_key_and_help(tmp_path, capsys):
    with pytest.raises(SystemExit) as excinfo:
        _parse([], tmp_path, "learning_rat: 1\n")
    assert "unknown option 'learning_rat'" in str(excinfo.value.code) and "--learning_rate" in str(excinfo.value.code)
    with pytest.raises(SystemExit) as excinfo:
        _parse(["--help"])
    assert excinfo.value.code == 0
    out = capsys.readouterr().out
    assert "--learning_rate (float, default: 0.001)" in out and "peak learning rate" in out


def test_build_peft_config_per_method():
    targets = ["query", "value"]
    assert isinstance(build_peft_config("gsoft", targets, options={"block_size": 8}), GSOFTConfig)
    double = build_peft_config("double_gsoft", targets, options={"block_size": 8})
    assert isinstance(double, GSOFTConfig) and double.double
    assert isinstance(build_peft_config("lora", targets, options={"r": 4}), LoraConfig)
    assert isinstance(build_peft_config("oft", targets, options={"r": 0, "oft_block_size": 8}), OFTConfig)
    assert isinstance(build_peft_config("boft", targets, options={"boft_block_size": 4}), BOFTConfig)
    assert build_peft_config("full", targets) is None
    config = build_peft_config("lora", targets, task_type="SEQ_CLS", modules_to_save=["classifier"])
    assert config.task_type == "SEQ_CLS" and config.modules_to_save == ["classifier"]
    with pytest.raises(ValueError, match="Unknown method 'gsfot' \\(did you mean 'gsoft'\\?\\)"):
        build_peft_config("gsfot", targets)
    with pytest.raises(ValueError, match="Unknown option 'blok_size' for method 'gsoft'.*block_size"):
        build_peft_config("gsoft", targets, options={"blok_size": 8})
    with pytest.raises(ValueError, match="use method 'double_gsoft'"):
        build_peft_config("gsoft", targets, options={"block_size": 8, "double": True})
    assert set(METHODS) == {"gsoft", "double_gsoft", "lora", "oft", "boft", "full"}


def test_apply_method_full_and_adapter():
    model = tiny_roberta()
    model.requires_grad_(False)
    full = apply_method(model, "full", None)
    trainable, total = count_parameters(full)
    assert full is model and trainable == total > 0
    peft_model = apply_method(tiny_roberta(), "gsoft", None, task_type="SEQ_CLS", options={"block_size": 8})
    assert isinstance(peft_model, PeftModel)
    trainable, total = count_parameters(peft_model)
    assert 0 < trainable < total


def test_output_dir_protection(tmp_path):
    out = tmp_path / "run"
    config = {"task": "sst2", "learning_rate": 1e-3, "output_dir": str(out), "logging_steps": 5}
    prepare_output_dir(out, config, overwrite=False, resume=False)
    assert json.loads((out / "run_config.json").read_text()) == config
    # same run again (e.g. a restart before it finished), volatile keys may change
    prepare_output_dir(out, {**config, "logging_steps": 50}, overwrite=False, resume=False)
    with pytest.raises(ValueError, match=r"different run \(learning_rate: 0.001 -> 0.01\).*--overwrite_output_dir"):
        prepare_output_dir(out, {**config, "learning_rate": 1e-2}, overwrite=False, resume=False)
    (out / "results.json").write_text("{}")
    with pytest.raises(ValueError, match="finished run"):
        prepare_output_dir(out, config, overwrite=False, resume=False)
    prepare_output_dir(out, config, overwrite=False, resume=True)
    prepare_output_dir(out, {**config, "learning_rate": 1e-2}, overwrite=True, resume=False)
    assert not (out / "results.json").exists()
    with pytest.raises(ValueError, match="contradict"):
        prepare_output_dir(out, config, overwrite=True, resume=True)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not made by a gsoft recipe"):
        prepare_output_dir(foreign, config, overwrite=True, resume=False)
    assert (foreign / "notes.txt").exists()


def test_output_dir_is_checked_by_every_process_before_the_main_one_writes(tmp_path):
    """With several processes, each checks the directory as it found it, then all meet at the barrier, then the main
    process writes: a non-main process never sees the main one's half-written files, and a refused directory is
    refused by every process before any of them waits."""
    out = tmp_path / "run"
    config = {"task": "sst2", "learning_rate": 1e-3, "output_dir": str(out)}
    seen = []

    def barrier():
        seen.append(sorted(p.name for p in out.iterdir()) if out.exists() else None)

    prepare_output_dir(out, config, overwrite=False, resume=False, is_main_process=False, barrier=barrier)
    assert seen == [None] and not out.exists()  # a non-main process writes nothing
    prepare_output_dir(out, config, overwrite=False, resume=False, is_main_process=True, barrier=barrier)
    assert seen == [None, None] and (out / "run_config.json").is_file()  # the main process wrote after the barrier
    prepare_output_dir(out, config, overwrite=True, resume=False, is_main_process=True, barrier=barrier)
    assert seen[-1] == ["run_config.json"]  # overwriting deletes only after the barrier
    with pytest.raises(ValueError, match="different run"):
        prepare_output_dir(out, {**config, "learning_rate": 1.0}, overwrite=False, resume=False, barrier=barrier)
    assert len(seen) == 3  # refused before the barrier


def test_results_and_timing(tmp_path):
    timer = StepTimer("cpu")
    for _ in range(3):
        with timer:
            torch.ones(10).sum()
    assert len(timer.times) == 3 and timer.median_s is not None and timer.median_s >= 0
    assert peak_memory_mb("cpu") > 10
    with pytest.raises(ValueError, match=r"missing the common keys \['total_params'"):
        write_results(tmp_path, {"method": "gsoft", "trainable_params": 1})
    row = {
        "method": "gsoft", "trainable_params": 1, "total_params": 2, "train_steps": 3, "train_runtime_s": 1.0,
        "step_time_s_median": 0.1, "peak_memory_mb": 5.0, "world_size": 1, "task": "x",
    }
    path = write_results(tmp_path, row)
    assert json.loads(path.read_text()) == row


def _train_setup(seed: int = 0):
    torch.manual_seed(seed)
    accelerator = Accelerator(cpu=True)
    model = apply_method(tiny_roberta(), "gsoft", None, task_type="SEQ_CLS", options={"block_size": 8})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.1, total_iters=10)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    return accelerator, model, optimizer, scheduler


def _step(model, optimizer, scheduler, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 60, (4, 12), generator=gen)
    loss = model(input_ids=ids, labels=torch.randint(0, 2, (4,), generator=gen)).loss
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def test_checkpoint_roundtrip_keeps_only_trainable(tmp_path):
    accelerator, model, optimizer, scheduler = _train_setup()
    snapshots = {}
    for s in range(4):
        _step(model, optimizer, scheduler, s)
        path = save_checkpoint(accelerator, tmp_path, s + 1, {"best": s / 10}, total_limit=2)
        snapshots[s + 1] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert [p.name for p in sorted((tmp_path / "checkpoints").iterdir())] == ["step_00000003", "step_00000004"]
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        saved = set(f.keys())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable <= saved and not any("base_layer.weight" in k for k in saved)
    assert resolve_checkpoint(tmp_path, "latest") == path
    assert resolve_checkpoint(tmp_path, None) is None
    assert resolve_checkpoint(tmp_path / "empty", "latest") is None
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        resolve_checkpoint(tmp_path, str(tmp_path))

    state = load_checkpoint(accelerator, tmp_path / "checkpoints" / "step_00000003")
    assert state == {"best": 0.2, "step": 3}
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, snapshots[3][k], rtol=0, atol=0, msg=k)
    # optimizer, scheduler and weights restored: the resumed step is bit-identical to the uninterrupted one
    _step(model, optimizer, scheduler, 3)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, snapshots[4][k], rtol=0, atol=0, msg=k)


def test_checkpoint_mismatch_is_refused(tmp_path):
    accelerator, model, optimizer, scheduler = _train_setup()
    path = save_checkpoint(accelerator, tmp_path, 1, {})
    other = Accelerator(cpu=True)
    lora = apply_method(tiny_roberta(), "lora", ["query", "value"], task_type="SEQ_CLS")
    other.prepare(lora, torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad]))
    with pytest.raises(ValueError, match="does not match the model.*trainable parameters are missing"):
        load_checkpoint(other, path)


def test_metrics_logger_writes_json_lines(tmp_path):
    accelerator = Accelerator(cpu=True)
    logger = MetricsLogger(accelerator, tmp_path, "test", {"a": {"b": 1}}, tensorboard=False)
    logger.log({"loss": 0.5, "lr": 1e-3}, step=1)
    logger.log({"eval/accuracy": 0.75}, step=2)
    logger.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2] and lines[0]["loss"] == 0.5 and lines[1]["eval/accuracy"] == 0.75


def test_timer_start_stop_spans_micro_batches():
    timer = StepTimer("cpu", warmup=0)
    for _ in range(2):
        timer.start()
        for _ in range(3):  # micro-batches of one optimizer step
            assert timer.running
        timer.stop()
    assert len(timer.times) == 2 and not timer.running
    with pytest.raises(RuntimeError, match="without a matching start"):
        timer.stop()


def test_peak_memory_reset_and_accelerator_kwargs(monkeypatch):
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("no writable /proc/self/clear_refs (not Linux): the CPU peak cannot be reset here")
    def rss_mb() -> float:
        line = next(l for l in open("/proc/self/status") if l.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024

    import mmap

    reset_peak_memory("cpu")
    before = rss_mb()
    # 256 MiB of fresh anonymous pages, touched, then unmapped: the peak stays above the current size. (A tensor would
    # go through the allocator, which may hand out memory the process already holds from earlier tests.)
    size = 256 * 2**20
    block = mmap.mmap(-1, size)
    for offset in range(0, size, mmap.PAGESIZE):
        block[offset] = 1
    block.close()
    assert peak_memory_mb("cpu") > before + 128
    reset_peak_memory("cpu")  # the watermark drops to the current resident size
    assert abs(peak_memory_mb("cpu") - rss_mb()) < 64
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert accelerator_kwargs(mixed_precision="no") == {"mixed_precision": "no", "cpu": True}
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert accelerator_kwargs() == {}


@pytest.mark.parametrize(
    "step, batches, accum, expected",
    [(0, 10, 1, (0, 0)), (7, 10, 1, (0, 7)), (10, 10, 1, (1, 0)), (3, 10, 4, (1, 0)), (4, 10, 4, (1, 4)),
     (2, 10, 4, (0, 8)), (5, 5, 2, (1, 4))],
)
def test_resume_position(step, batches, accum, expected):
    assert resume_position(step, batches, accum) == expected


def test_boft_factor_fallback_is_reported(caplog):
    """PEFT silently drops BOFT to one butterfly factor without its CUDA extension (every CPU machine)."""
    import logging

    with caplog.at_level(logging.WARNING, logger="common.methods"):
        model = apply_method(tiny_roberta(), "boft", ["query", "value"], task_type="SEQ_CLS",
                             options={"boft_block_size": 4, "boft_n_butterfly_factor": 2})
    factors = {p.shape[0] for n, p in model.named_parameters() if "boft_R" in n}
    if factors == {2}:
        assert "butterfly" not in caplog.text
    else:
        assert "instead of boft_n_butterfly_factor=2" in caplog.text


def test_targets_matching_nothing_list_the_layers():
    with pytest.raises(ValueError, match=r"--target_modules \['qury'\] match no Linear/Conv2d layer of the model "
                                         r"\(RobertaForSequenceClassification\)\. Its layers end in: .*query"):
        apply_method(tiny_roberta(), "lora", ["qury"], task_type="SEQ_CLS")
    with pytest.raises(ValueError, match="--my_targets"):
        apply_method(tiny_roberta(), "gsoft", ["qury"], options={"block_size": 8}, target_option="--my_targets")
    # None leaves the targets to the architecture's default: nothing to check
    assert isinstance(apply_method(tiny_roberta(), "gsoft", None, options={"block_size": 8}), PeftModel)
