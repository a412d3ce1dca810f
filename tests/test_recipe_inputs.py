"""Bad inputs to the training recipes end in one clear line before anything is written.

Options out of range or unknown to the libraries, malformed local data files, model directories that do not exist or
lack tokenizer files: each is refused with ``<recipe>: error: ...`` naming the value and the fix, and leaves no
output directory behind (the corrected run can reuse it).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from common import glue_data, glue_smoke
from common.args import parse_recipe_args
from common.methods import build_peft_config

roberta_glue = importlib.import_module("roberta_glue")
dreambooth = importlib.import_module("dreambooth")

REPO_ROOT = Path(__file__).resolve().parents[1]
GLUE_SMOKE = REPO_ROOT / "configs" / "glue" / "smoke.yaml"
DREAMBOOTH_SMOKE = REPO_ROOT / "configs" / "dreambooth" / "smoke.yaml"
# A shrunken smoke task: 96 training examples, no stand-in pretraining, two steps.
GLUE_TINY = ["--config", str(GLUE_SMOKE), "--smoke_data.n_train", "96", "--smoke_data.n_validation", "32",
             "--base_pretrain_steps", "0", "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "32",
             "--progress_bar", "false", "--report_to", "none", "--max_steps", "2"]


def glue_error(out: Path, *extra: str) -> str:
    """The GLUE recipe's error for these options: one line, and no output directory left behind."""
    with pytest.raises(SystemExit) as info:
        roberta_glue.main([*GLUE_TINY, "--output_dir", str(out), *extra])
    message = str(info.value.code)
    assert message.startswith("roberta_glue: error: ") and "\n" not in message, message
    assert not out.exists(), f"{out} left behind by: {message}"
    return message


def dreambooth_error(tmp_path: Path, *extra: str) -> str:
    """The DreamBooth recipe's error (options on the smoke config): one line, and no output directory left behind."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        dreambooth.main(["--config", str(DREAMBOOTH_SMOKE), "--smoke_assets", "false", "--output_dir", str(out),
                         "--pretrained_model_name_or_path", str(tmp_path / "no-model"),
                         "--instance_data_dir", str(tmp_path / "no-images"), *extra])
    message = str(info.value.code)
    assert message.startswith("dreambooth: error: ") and "\n" not in message, message
    assert not out.exists()
    return message


# ----------------------------------------------------------------------------------------------------------------------
# Options: refused when parsed, before any data, model or directory
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, expected", [
    (["--learning_rate", "-1"], "--learning_rate -1: must be > 0"),
    (["--learning_rate", "0"], "--learning_rate 0: must be > 0"),
    (["--learning_rate", "nan"], "--learning_rate nan: must be a finite number > 0"),
    (["--lr_scheduler_type", "bogus"], "--lr_scheduler_type bogus: not one of linear, cosine"),
    (["--lr_scheduler_type", "reduce_lr_on_plateau"], "--lr_scheduler_type reduce_lr_on_plateau: not one of"),
    (["--lr_scheduler_type", "cosin"], "did you mean cosine?"),
    (["--num_train_epochs", "0"], "--num_train_epochs 0: must be > 0"),
    (["--warmup_steps", "-5"], "--warmup_steps -5: must be >= 0"),
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size 0: must be >= 1"),
    (["--per_device_eval_batch_size", "-2"], "--per_device_eval_batch_size -2: must be >= 1"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps 0: must be >= 1"),
    (["--weight_decay", "-0.1"], "--weight_decay -0.1: must be >= 0"),
    (["--adam_beta1", "1"], "--adam_beta1 1: must be >= 0 and < 1"),
    (["--adam_beta2", "-0.5"], "--adam_beta2 -0.5: must be >= 0 and < 1"),
    (["--adam_epsilon", "-1e-8"], "--adam_epsilon -1e-08: must be >= 0"),
    (["--max_grad_norm", "0"], "--max_grad_norm 0: must be > 0 or null"),
    (["--seed", "-1"], "--seed -1: must be >= 0 and <= 4294967295"),
    (["--num_workers", "-1"], "--num_workers -1: must be >= 0"),
    (["--torch_num_threads", "0"], "--torch_num_threads 0: must be >= 1 or null"),
    (["--checkpoints_total_limit", "0"], "--checkpoints_total_limit 0: must be >= 1 or null"),
    (["--classifier_dropout", "1.5"], "--classifier_dropout 1.5: must be >= 0 and < 1 or null"),
    (["--base_pretrain_steps", "-1"], "--base_pretrain_steps -1: must be >= 0"),
    (["--base_pretrain_learning_rate", "0"], "--base_pretrain_learning_rate 0: must be > 0"),
    (["--method_learning_rates", "{lora: -1}"], "--method_learning_rates {'lora': -1}: the rate of lora must be a number > 0"),
    (["--method_learning_rates", "{lora: fast}"], "--method_learning_rates {'lora': 'fast'}: the rate of lora must be"),
])
def test_glue_bad_option_is_one_line_before_anything_is_written(tmp_path, flags, expected):
    message = glue_error(tmp_path / "out", *flags)
    assert expected in message, message
    assert "(default: " in message or "choose one of" in message or "did you mean" in message or "rate of" in message


def test_glue_corrected_option_reuses_the_output_directory(tmp_path):
    out = tmp_path / "out"
    glue_error(out, "--learning_rate", "-1")
    results = roberta_glue.main([*GLUE_TINY, "--output_dir", str(out), "--learning_rate", "1e-3"])
    assert results["train_steps"] == 2


def test_glue_options_are_checked_when_parsed():
    """The checks run in the options class, so a bad value never reaches data, model or output directory."""
    with pytest.raises(SystemExit, match="--warmup_steps -5: must be >= 0"):
        parse_recipe_args(roberta_glue.GlueArgs, ["--warmup_steps", "-5"], prog="roberta_glue")
    with pytest.raises(ValueError, match="--learning_rate -1: must be > 0"):
        roberta_glue.GlueArgs(learning_rate=-1)


def test_glue_scheduler_choices_all_build_and_step():
    """Every scheduler the recipe offers builds from its options alone and steps without a metric."""
    import torch
    from transformers import get_scheduler

    for name in roberta_glue.LR_SCHEDULERS:
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
        scheduler = get_scheduler(name, optimizer, num_warmup_steps=1, num_training_steps=4)
        for _ in range(4):
            optimizer.step()
            scheduler.step()


@pytest.mark.parametrize("flags, expected", [
    (["--learning_rate", "-1"], "--learning_rate -1: must be > 0"),
    (["--lr_scheduler", "bogus"], "--lr_scheduler bogus: not one of linear, cosine"),
    (["--lr_scheduler", "piecewise_constant"], "--lr_scheduler piecewise_constant: not one of"),
    (["--lr_warmup_steps", "-5"], "--lr_warmup_steps -5: must be >= 0"),
    (["--lr_num_cycles", "0"], "--lr_num_cycles 0: must be >= 1"),
    (["--lr_power", "0"], "--lr_power 0: must be > 0"),
    (["--train_batch_size", "0"], "--train_batch_size 0: must be >= 1"),
    (["--max_train_steps", "0"], "--max_train_steps 0: must be >= 1"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps 0: must be >= 1"),
    (["--resolution", "0"], "--resolution 0: must be >= 1"),
    (["--adam_beta2", "1.5"], "--adam_beta2 1.5: must be >= 0 and < 1"),
    (["--adam_weight_decay", "-1"], "--adam_weight_decay -1: must be >= 0"),
    (["--mixed_precision", "fp8"], "--mixed_precision fp8: not one of no, fp16, bf16"),
    (["--seed", "-3"], "--seed -3: must be >= 0"),
    (["--num_validation_images", "0"], "--num_validation_images 0: must be >= 1"),
    (["--validation_inference_steps", "0"], "--validation_inference_steps 0: must be >= 1"),
    (["--validation_scheduler", "NoSuchScheduler"], "--validation_scheduler NoSuchScheduler: not a diffusers scheduler"),
    (["--sample_batch_size", "0"], "--sample_batch_size 0: must be >= 1"),
    (["--class_inference_steps", "0"], "--class_inference_steps 0: must be >= 1"),
    (["--num_class_images", "0"], "--num_class_images 0: must be >= 1"),
    (["--prior_loss_weight", "-1"], "--prior_loss_weight -1: must be >= 0"),
    (["--prior_generation_precision", "fp64"], "--prior_generation_precision fp64: not one of fp32, fp16, bf16"),
    (["--dataloader_num_workers", "-1"], "--dataloader_num_workers -1: must be >= 0"),
    (["--cpu_threads", "0"], "--cpu_threads 0: must be >= 1 or null"),
    (["--checkpoints_total_limit", "0"], "--checkpoints_total_limit 0: must be >= 1 or null"),
    (["--report_to", "wandb"], "--report_to wandb: not one of tensorboard, none"),
])
def test_dreambooth_bad_option_is_one_line_before_anything_is_loaded(tmp_path, flags, expected):
    assert expected in dreambooth_error(tmp_path, *flags)


def test_dreambooth_scheduler_choices_all_build_and_step():
    import torch
    from diffusers.optimization import get_scheduler

    for name in dreambooth.LR_SCHEDULERS:
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
        scheduler = get_scheduler(name, optimizer=optimizer, num_warmup_steps=1, num_training_steps=4, num_cycles=1,
                                  power=1.0)
        for _ in range(4):
            optimizer.step()
            scheduler.step()


def test_help_shows_the_allowed_values(capsys):
    with pytest.raises(SystemExit):
        parse_recipe_args(roberta_glue.GlueArgs, ["--help"])
    out = capsys.readouterr().out
    assert "--warmup_steps (int, >= 0, default: 0)" in out
    assert "--lr_scheduler_type (str, one of linear, cosine," in out


# ----------------------------------------------------------------------------------------------------------------------
# target_modules: a list of layer names or one regex
# ----------------------------------------------------------------------------------------------------------------------
def test_target_modules_of_the_wrong_type_in_a_config(tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text(GLUE_SMOKE.read_text() + "target_modules: 123\n")
    message = glue_error(tmp_path / "out", "--config", str(config))
    assert "option 'target_modules' in " in message and "expected a string, got 123" in message


def test_target_modules_of_the_wrong_type_in_method_options(tmp_path):
    message = glue_error(tmp_path / "out", "--method_options.gsoft.target_modules", "123")
    assert "target_modules 123: must be a list of layer names or one regex string" in message
    with pytest.raises(ValueError, match="modules_to_save"):
        build_peft_config("lora", ["query"], options={"modules_to_save": [1]})


def test_glue_target_modules_regex_adapts_only_the_matching_layers(tmp_path):
    results = roberta_glue.main([*GLUE_TINY, "--output_dir", str(tmp_path / "out"), "--target_modules",
                                 r".*\.attention\.self\.(query|value)"])
    import json

    saved = json.loads((Path(results["saved_to"]) / "adapter_config.json").read_text())
    assert saved["target_modules"] == r".*\.attention\.self\.(query|value)"


# ----------------------------------------------------------------------------------------------------------------------
# Local data files of the GLUE recipe
# ----------------------------------------------------------------------------------------------------------------------
GOOD_CSV = "text,y\na fine film,1\na dull film,0\n"


def _load(train: Path, validation: Path) -> None:
    raw, spec = glue_data.load_raw_datasets("custom", train_file=str(train), validation_file=str(validation),
                                            text_columns=["text"], label_column="y")
    glue_data.encode_labels(raw, spec)


def _write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


@pytest.mark.parametrize("name, content, expected", [
    ("empty.csv", "", "the file is empty; it needs a header row naming the columns and one example per line"),
    ("blank.csv", "\n\n", "the file is empty"),
    ("header.csv", "text,y\n", "only a header row (text, y) and no examples"),
    ("latin1.csv", b"text,y\ncaf\xe9 noir,1\n", "line 2 is not UTF-8 (byte 0xe9); save the file as UTF-8"),
    ("ragged.csv", "text,y\ngood,1\nbad,0,extra\n", "line 3 has 3 fields but the header has 2 (text, y)"),
    ("short.csv", "text,y\ngood\nbad,0\n", "line 2 has 1 field but the header has 2"),
    ("label.csv", "text,y\ngood,\nbad,0\n", "line 2: the label 'y' is empty; fill it in or remove the example"),
    ("text.csv", "text,y\ngood,1\n  ,0\n", "line 3: the text 'text' is empty; fill it in or remove the example"),
    ("dup.csv", "text,text,y\na,b,1\n", "the header names column 'text' twice"),
    ("ragged.tsv", "text\ty\ngood\t1\tx\n", "line 2 has 3 fields but the header has 2"),
    ("broken.jsonl", '{"text": "good", "y": 1}\n{"text": "bad", "y": 0\n', "line 2 is not valid JSON"),
    ("list.jsonl", '{"text": "good", "y": 1}\n[1, 2]\n', "line 2 is not a JSON object"),
    ("nokey.jsonl", '{"text": "good", "y": 1}\n{"text": "bad"}\n', "line 2 has no 'y' key"),
    ("null.jsonl", '{"text": "good", "y": null}\n', "line 1: the label 'y' is empty"),
    ("number.jsonl", '{"text": 12, "y": 1}\n', "line 1: the text 'text' is 12, not a string"),
    ("mixed.jsonl", '{"text": "a", "y": 1}\n{"text": "b", "y": "pos"}\n', "line 2: the label 'y' is a string but"),
    ("empty.jsonl", "\n", "the file is empty"),
    ("array.json", '[{"text": "a", "y": 1}, {"text": "b"}]', "record 2 has no 'y' key"),
    ("badarray.json", '[{"text": "a", "y": 1},', "not valid JSON (Expecting value at line 1, column 24)"),
])
def test_bad_data_file_names_the_file_and_the_problem(tmp_path, name, content, expected):
    bad = _write(tmp_path / name, content)
    good = _write(tmp_path / ("good" + bad.suffix), {
        ".csv": GOOD_CSV, ".tsv": GOOD_CSV.replace(",", "\t"),
        ".jsonl": '{"text": "a fine film", "y": 1}\n{"text": "a dull film", "y": 0}\n',
        ".json": '[{"text": "a fine film", "y": 1}, {"text": "a dull film", "y": 0}]',
    }[bad.suffix])
    with pytest.raises(ValueError) as info:
        _load(bad, good)
    message = str(info.value)
    assert message.startswith(f"{bad}: "), message
    assert expected in message, message
    with pytest.raises(ValueError) as info:
        _load(good, bad)  # the same file as the validation file
    assert str(info.value).startswith(f"{bad}: ") and expected in str(info.value)


def test_files_whose_columns_differ(tmp_path):
    train = _write(tmp_path / "train.csv", GOOD_CSV)
    other = _write(tmp_path / "other.csv", "sentence,label\na fine film,1\n")
    with pytest.raises(ValueError) as info:
        _load(train, other)
    message = str(info.value)
    assert message.startswith(f"{other}: column(s) ['text', 'y'] not found; it has columns ['sentence', 'label']")
    assert "--text_columns" in message and "--label_column" in message
    # Extra columns that differ between the files do not matter.
    extra = _write(tmp_path / "extra.csv", "idx,text,y\n0,a fine film,1\n1,a dull film,0\n")
    raw, _ = glue_data.load_raw_datasets("custom", train_file=str(train), validation_file=str(extra),
                                         text_columns=["text"], label_column="y")
    assert raw["validation"]["text"] == ["a fine film", "a dull film"]


def test_words_that_pandas_reads_as_missing_stay_text(tmp_path):
    data = _write(tmp_path / "na.csv", "text,y\nNA,1\nnull,0\nn/a,1\n")
    raw, spec = glue_data.load_raw_datasets("custom", train_file=str(data), validation_file=str(data),
                                            text_columns=["text"], label_column="y")
    assert raw["train"]["text"] == ["NA", "null", "n/a"]


def test_bad_data_file_through_the_recipe_is_one_line(tmp_path):
    bad = _write(tmp_path / "train.csv", b"text,y\ncaf\xe9 noir,1\n")
    good = _write(tmp_path / "validation.csv", GOOD_CSV)
    message = glue_error(tmp_path / "out", "--task", "custom", "--train_file", str(bad), "--validation_file",
                         str(good), "--text_columns", "text", "--label_column", "y")
    assert message.startswith(f"roberta_glue: error: {bad}: line 2 is not UTF-8"), message
    message = glue_error(tmp_path / "out", "--task", "custom", "--train_file", str(tmp_path / "missing.csv"),
                         "--validation_file", str(good), "--text_columns", "text", "--label_column", "y")
    assert f"--train_file {tmp_path / 'missing.csv'}: no such file" in message


# ----------------------------------------------------------------------------------------------------------------------
# Model directories
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_without_tokenizer(tmp_path_factory) -> Path:
    """A local encoder directory with config and weights only (no tokenizer files)."""
    from transformers import RobertaConfig, RobertaModel

    path = tmp_path_factory.mktemp("encoder") / "no-tokenizer"
    config = RobertaConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=40, type_vocab_size=1, pad_token_id=1)
    RobertaModel(config).save_pretrained(path)
    return path


def test_local_model_without_tokenizer_files_is_refused(tmp_path, model_without_tokenizer):
    message = glue_error(tmp_path / "out", "--model_config", "{}", "--model_name_or_path", str(model_without_tokenizer),
                         "--method_options.gsoft.block_size", "8")
    assert f"--model_name_or_path {str(model_without_tokenizer)!r}: no tokenizer files" in message, message
    assert "--tokenizer_name" in message and "save_pretrained" in message


def test_local_model_with_a_tokenizer_elsewhere_trains(tmp_path, model_without_tokenizer):
    texts = glue_smoke.make_examples(96, seed=0)["sentence"]
    tokenizer_dir = tmp_path / "tokenizer"
    glue_smoke.train_word_level_tokenizer(texts, model_max_length=32).save_pretrained(tokenizer_dir)
    results = roberta_glue.main([*GLUE_TINY, "--output_dir", str(tmp_path / "out"), "--model_config", "{}",
                                 "--model_name_or_path", str(model_without_tokenizer), "--tokenizer_name",
                                 str(tokenizer_dir), "--method_options.gsoft.block_size", "8"])
    assert results["train_steps"] == 2


@pytest.mark.parametrize("value", ["./nope", "~/no-such-gsoft-model", "no/such/model"])
def test_glue_model_path_that_does_not_exist(tmp_path, value):
    message = glue_error(tmp_path / "out", "--model_config", "{}", "--model_name_or_path", value)
    assert f"--model_name_or_path {value!r}: no such directory" in message and "hub" in message, message


@pytest.mark.parametrize("relative", ["./nope", "nope/deeper/model"])
def test_dreambooth_model_directory_that_does_not_exist(tmp_path, relative):
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    Image.new("RGB", (32, 32)).save(images / "a.png")
    value = relative if relative.startswith(".") else str(tmp_path / relative)
    message = dreambooth_error(tmp_path, "--pretrained_model_name_or_path", value, "--instance_data_dir", str(images))
    assert f"--pretrained_model_name_or_path {value!r}: no such directory" in message, message
    assert "diffusers layout" in message and "hub id" in message
    assert "Repo id" not in message


def test_dreambooth_model_directory_without_the_diffusers_layout(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    Image.new("RGB", (32, 32)).save(images / "a.png")
    model = tmp_path / "half-model"
    (model / "unet").mkdir(parents=True)
    message = dreambooth_error(tmp_path, "--pretrained_model_name_or_path", str(model), "--instance_data_dir",
                               str(images))
    assert "not a Stable Diffusion model in the diffusers layout: no vae/, text_encoder/, tokenizer/, scheduler/" \
        in message, message


# ----------------------------------------------------------------------------------------------------------------------
# The DreamBooth sampling and scoring scripts
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, expected", [
    (["--num_images_per_prompt", "0"], "dreambooth_infer: error: --num_images_per_prompt 0: must be >= 1"),
    (["--dtype", "fp64"], "dreambooth_infer: error: --dtype fp64: not one of fp32, fp16, bf16"),
    (["--prompt_set", "animal"], "dreambooth_infer: error: --prompt_set animal: not one of object, live"),
    (["--pretrained_model_name_or_path", "./nope"],
     "dreambooth_infer: error: --pretrained_model_name_or_path './nope': no such directory; pass a local Stable "
     "Diffusion"),
    (["--scheduler", "DDIMSchedular"],
     "dreambooth_infer: error: --scheduler DDIMSchedular: not a diffusers scheduler class; did you mean DDIMScheduler?"),
])
def test_infer_bad_option_is_one_line(tmp_path, flags, expected):
    dreambooth_infer = importlib.import_module("dreambooth_infer")
    with pytest.raises(SystemExit) as info:
        dreambooth_infer.main(["--no_adapter", "--pretrained_model_name_or_path", "org/model", "--prompts", "a sks dog",
                               "--output_dir", str(tmp_path / "samples"), *flags])
    assert str(info.value.code).startswith(expected), info.value.code
    assert not (tmp_path / "samples").exists()


@pytest.mark.parametrize("flags, expected", [
    (["--batch_size", "0"], "eval_subject: error: --batch_size 0: must be >= 1 (default: 32)"),
    (["--clip_model", "./no-clip"], "eval_subject: error: --clip_model './no-clip': no such directory"),
])
def test_eval_subject_bad_option_is_one_line(tmp_path, flags, expected):
    eval_subject = importlib.import_module("eval_subject")
    with pytest.raises(SystemExit) as info:
        eval_subject.main(["--images_dir", str(tmp_path), "--instance_data_dir", str(tmp_path), *flags])
    assert str(info.value.code).startswith(expected), info.value.code


def test_eval_subject_missing_manifest_is_one_line(tmp_path):
    eval_subject = importlib.import_module("eval_subject")
    with pytest.raises(SystemExit) as info:
        eval_subject.main(["--images_dir", str(tmp_path), "--instance_data_dir", str(tmp_path)])
    assert str(info.value.code).startswith(f"eval_subject: error: {tmp_path / 'manifest.jsonl'} not found")
