#!/usr/bin/env python
"""Export a GSOFT adapter to formats other tools load: a merged checkpoint or a full weight-difference file.

Usage::

    python recipes/export_adapter.py --base roberta-base --adapter outputs/glue-sst2 --format merged --output sst2-merged
    python recipes/export_adapter.py --base stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --adapter outputs/dreambooth-dog --format diff --output dog-gsoft.safetensors

``--format merged`` writes the base model with the adapter folded into its weights, with the base's own
``save_pretrained``: a transformers model directory, or for a ``recipes/dreambooth.py`` output the whole diffusers
pipeline. It loads without gsoft or peft. ``--format diff`` (pipelines only) writes one ``.safetensors`` file of
``lora_unet_<module>.diff`` / ``lora_te_<module>.diff`` tensors (merged weight - base weight), the LyCORIS "full"
layout that ComfyUI, A1111 / Forge and LyCORIS load as a LoRA. docs/export.md describes both and their exactness.

The adapter is a pipeline's when ``--adapter`` holds ``unet/`` (and ``text_encoder/``) adapters, as the DreamBooth
recipe saves them, or when ``--base`` is a local pipeline directory (``model_index.json``); otherwise ``--base`` is a
transformers model, loaded with ``--model_class`` or the class of the adapter's ``task_type``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from common.args import check_model_path, check_options, option_error, parse_recipe_args
from common.loop import RECIPE_ERRORS, error_line, naming_option
from gsoft import export

NAME = "export_adapter"

FORMATS = ("merged", "diff")
DIFF_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

#: Key prefix of each pipeline component in a weight-difference file, as the loaders map them (SD1.x / SD2.x).
DIFF_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te"}

#: transformers class for an adapter's PEFT ``task_type`` (``--model_class`` overrides it).
TASK_CLASSES = {
    None: "AutoModel",
    "FEATURE_EXTRACTION": "AutoModel",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
}


@dataclass
class ExportArgs:
    """Options of recipes/export_adapter.py."""

    base: Optional[str] = field(
        default=None, metadata={"help": "Base model the adapter was trained on: hub name or directory (a transformers "
                                        "model, or a diffusers pipeline for a recipes/dreambooth.py adapter)."}
    )
    adapter: Optional[str] = field(
        default=None, metadata={"help": "A PEFT GSOFT adapter directory (adapter_config.json), or a "
                                        "recipes/dreambooth.py output directory (unet/ and text_encoder/ adapters)."}
    )
    format: Optional[str] = field(
        default=None, metadata={"help": "merged: the base model with the adapter folded in (a directory); diff: a "
                                        "LyCORIS 'full' weight-difference .safetensors file (pipelines only).",
                                "choices": FORMATS}
    )
    output: Optional[str] = field(
        default=None, metadata={"help": "Where to write: a new directory (merged) or a .safetensors file (diff)."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --output."})
    model_class: Optional[str] = field(
        default=None, metadata={"help": "transformers class of the base model, e.g. AutoModelForCausalLM (default: "
                                        "from the adapter's task_type; ignored for pipelines)."}
    )
    num_labels: Optional[int] = field(
        default=None, metadata={"help": "Labels of a classification head (default: the base model's config).",
                                "min": 1}
    )
    diff_dtype: str = field(
        default="fp32", metadata={"help": "dtype of the weight-difference tensors; fp32 reproduces the merged "
                                          "weights best (docs/export.md).", "choices": tuple(DIFF_DTYPES)}
    )

    def __post_init__(self) -> None:
        check_options(self)


def main(argv: Optional[Sequence[str]] = None) -> Path:
    """Export and return the output path. A bad option, adapter or model ends the script with one line,
    ``export_adapter: error: <message>``."""
    args = parse_recipe_args(ExportArgs, argv, description=__doc__.split("\n\n")[0], prog=NAME)
    try:
        return export_adapter(args)
    except RECIPE_ERRORS as exc:
        raise SystemExit(error_line(NAME, exc)) from exc


def export_adapter(args: ExportArgs) -> Path:
    """Check every option, then load, export and print what was written."""
    for name in ("base", "adapter", "format", "output"):
        if not getattr(args, name):
            raise option_error(name, None, "required; see --help")
    check_model_path(args.base, "--base", "pass a hub name or the directory of the model the adapter was trained on.")
    adapter = Path(args.adapter)
    if not adapter.is_dir():
        raise option_error("adapter", args.adapter, "no such directory; pass the adapter's directory (with "
                                                    "adapter_config.json) or a recipes/dreambooth.py output directory")
    pipeline = _is_pipeline(args.base, adapter)
    if args.format == "diff" and not pipeline:
        raise option_error("format", args.format, "a weight-difference file is for diffusion pipelines (the tools "
                                                  "that read it load Stable Diffusion models); use --format merged "
                                                  "for a transformers model")
    with naming_option("--output", args.output):
        export.check_output(args.output, directory=args.format == "merged", overwrite=args.overwrite)
    if pipeline:
        return _export_pipeline(args, adapter)
    return _export_transformers(args, adapter)


def _is_pipeline(base: str, adapter: Path) -> bool:
    from common.diffusion import ADAPTER_COMPONENTS

    if any((adapter / name / "adapter_config.json").is_file() for name in ADAPTER_COMPONENTS):
        return True
    return (Path(base).expanduser() / "model_index.json").is_file()


def _adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """The adapter's config, refused unless it is a GSOFT adapter."""
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        raise option_error("adapter", str(adapter_dir), "no adapter_config.json there; pass a PEFT adapter directory "
                                                        "(save_pretrained of the PEFT model)")
    config = json.loads(path.read_text())
    peft_type = config.get("peft_type")
    if peft_type != "GSOFT":
        raise option_error("adapter", str(adapter_dir), f"its adapter_config.json has peft_type {peft_type!r}, not "
                                                        "'GSOFT'; this script exports GSOFT adapters (for other PEFT "
                                                        "methods, merge_and_unload() of the PEFT model gives the merged "
                                                        "model)")
    return config


def _export_pipeline(args: ExportArgs, adapter: Path) -> Path:
    """A recipes/dreambooth.py adapter: the whole pipeline merged, or one weight-difference file for its components."""
    from common.diffusion import adapter_dirs, load_adapter
    from common.extras import needs

    with needs("dreambooth", NAME):
        from diffusers import DiffusionPipeline

    found = adapter_dirs(adapter)
    for adapter_dir in found.values():
        _adapter_config(adapter_dir)
    with naming_option("--base", args.base):
        pipe = DiffusionPipeline.from_pretrained(args.base)
    load_adapter(pipe, adapter)
    if args.format == "diff":
        models = {DIFF_PREFIXES[name]: getattr(pipe, name) for name in found}
        stats = export.save_weight_diff(models, args.output, dtype=DIFF_DTYPES[args.diff_dtype],
                                        overwrite=args.overwrite)
        print(f"weight difference of {', '.join(found)} in {args.output}: {stats.tensors} tensors; "
              f"{stats.inexact} of {stats.elements} entries give the merged weight only within {stats.max_error:.3g} "
              "in float32, the rest exactly")
        return Path(args.output)
    for name in found:
        setattr(pipe, name, export.merged_model(getattr(pipe, name), inplace=True))
    with export.writing_dir(args.output, overwrite=args.overwrite) as tmp:
        pipe.save_pretrained(tmp)
    print(f"merged pipeline ({', '.join(found)} adapted) in {args.output}")
    return Path(args.output)


def _export_transformers(args: ExportArgs, adapter: Path) -> Path:
    """A transformers adapter: the merged model (and the adapter directory's tokenizer, when it has one)."""
    import transformers
    from peft import PeftModel

    config = _adapter_config(adapter)
    class_name = args.model_class or TASK_CLASSES.get(config.get("task_type"))
    if class_name is None:
        raise option_error("adapter", args.adapter, f"task_type {config.get('task_type')!r} has no default model "
                                                    "class; pass --model_class (e.g. AutoModelForCausalLM)")
    model_class = getattr(transformers, class_name, None)
    if model_class is None or not hasattr(model_class, "from_pretrained"):
        raise option_error("model_class", class_name, "not a transformers model class; e.g. AutoModel, "
                                                      "AutoModelForSequenceClassification, AutoModelForCausalLM")
    options = {"num_labels": args.num_labels} if args.num_labels else {}
    with naming_option("--base", args.base):
        model = model_class.from_pretrained(args.base, **options)
    with naming_option("--adapter", args.adapter):
        peft_model = PeftModel.from_pretrained(model, str(adapter))
    merged = export.merged_model(peft_model, inplace=True)
    tokenizer = None
    if (adapter / "tokenizer_config.json").is_file():
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(adapter))
    with export.writing_dir(args.output, overwrite=args.overwrite) as tmp:
        merged.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    print(f"merged {type(merged).__name__} in {args.output}" + (" (with the adapter's tokenizer)" if tokenizer else ""))
    return Path(args.output)


if __name__ == "__main__":
    main()
