#!/usr/bin/env python
"""Generate images with a DreamBooth adapter trained by ``recipes/dreambooth.py``.

Usage::

    python recipes/dreambooth_infer.py --adapter_dir outputs/my-dog --prompts "a sks dog on the moon,a sks dog in the snow"
    python recipes/dreambooth_infer.py --adapter_dir outputs/my-dog --prompt_set live --class_noun dog --merge
    python recipes/dreambooth_infer.py --config my_infer.yaml

The base model, resolution, sampler, steps and guidance default to what the training run used (its
``run_config.json``), so the images of ``--prompts <the validation prompts> --seed <its seed>`` are the run's final
validation images. ``--prompt_set object|live`` samples the DreamBooth paper's 25 evaluation prompts instead (for
``eval_subject.py``). Writes ``output_dir/NNNN.png``, ``manifest.jsonl`` (file, prompt, index, seed per image),
``images.pt`` (float tensor in [0, 1]) and ``grid.png``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from common.extras import needs

with needs("dreambooth", "dreambooth_infer"):
    from common.args import SEED_RANGE, check_options, parse_recipe_args
    from common.dreambooth_data import (
        DREAMBOOTH_PROMPTS,
        PRECISIONS,
        check_model_dir,
        check_scheduler_name,
        dreambooth_prompts,
        set_scheduler,
        write_manifest,
    )
    from common.loop import RECIPE_ERRORS, error_line

NAME = "dreambooth_infer"


@dataclass
class InferArgs:
    """Options of recipes/dreambooth_infer.py; unset (null) ones default to the training run's settings."""

    adapter_dir: Optional[str] = field(
        default=None, metadata={"help": "Output directory of recipes/dreambooth.py (unet/ and text_encoder/ adapters)."}
    )
    pretrained_model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Base model (default: the one the adapter was trained on)."}
    )
    revision: Optional[str] = field(default=None, metadata={"help": "Hub revision of the base model."})
    merge: bool = field(default=False, metadata={"help": "Merge the adapter into the weights (no adapter overhead)."})
    no_adapter: bool = field(default=False, metadata={"help": "Sample the base model only (a reference)."})
    prompts: list[str] = field(default_factory=list, metadata={"help": "Prompts (comma list or YAML list)."})
    prompt_set: Optional[str] = field(
        default=None, metadata={"help": "The DreamBooth paper's 25 evaluation prompts for the subject.",
                                "choices": tuple(DREAMBOOTH_PROMPTS)}
    )
    identifier: Optional[str] = field(default=None, metadata={"help": "Subject token for --prompt_set (default: the run's)."})
    class_noun: Optional[str] = field(default=None, metadata={"help": "Class noun for --prompt_set, e.g. dog."})
    num_images_per_prompt: int = field(default=4, metadata={"help": "Images per prompt.", "min": 1})
    seed: Optional[int] = field(default=None, metadata={"help": "Image i uses seed + i (default: the run's seed).",
                                                       **SEED_RANGE})
    num_inference_steps: Optional[int] = field(default=None, metadata={"help": "Sampling steps (default: the run's validation steps).",
                                                                      "min": 1})
    guidance_scale: Optional[float] = field(default=None, metadata={"help": "Classifier-free guidance scale.", "min": 0})
    scheduler: Optional[str] = field(default=None, metadata={"help": "diffusers scheduler class (default: the run's validation scheduler)."})
    resolution: Optional[int] = field(default=None, metadata={"help": "Image side (default: the training resolution).",
                                                             "min": 1})
    batch_size: int = field(default=4, metadata={"help": "Images per pipeline call.", "min": 1})
    dtype: Optional[str] = field(default=None, metadata={"help": "Default: fp16 on a GPU, else fp32.",
                                                        "choices": PRECISIONS})
    device: Optional[str] = field(default=None, metadata={"help": "cuda, cpu, ... (default: cuda when available)."})
    output_dir: Optional[str] = field(default=None, metadata={"help": "Where images go (default: adapter_dir/samples)."})

    def __post_init__(self) -> None:
        check_options(self)


_FROM_RUN = {  # InferArgs field -> run_config.json key of the training run
    "pretrained_model_name_or_path": "pretrained_model_name_or_path",
    "revision": "revision",
    "identifier": "identifier",
    "seed": "seed",
    "num_inference_steps": "validation_inference_steps",
    "guidance_scale": "validation_guidance_scale",
    "scheduler": "validation_scheduler",
    "resolution": "resolution",
}
_FALLBACK = {"seed": 0, "num_inference_steps": 25, "guidance_scale": 7.5, "scheduler": "DPMSolverMultistepScheduler"}


def resolve(args: InferArgs) -> InferArgs:
    """Fill unset options from the training run's run_config.json, then from generic defaults."""
    run: dict[str, Any] = {}
    if args.adapter_dir and (Path(args.adapter_dir) / "run_config.json").is_file():
        run = json.loads((Path(args.adapter_dir) / "run_config.json").read_text())
    for name, key in _FROM_RUN.items():
        if getattr(args, name) is None:
            setattr(args, name, run.get(key, _FALLBACK.get(name)))
    if not args.pretrained_model_name_or_path:
        raise ValueError("--pretrained_model_name_or_path is needed (no run_config.json in --adapter_dir).")
    if not args.adapter_dir and not args.no_adapter:
        raise ValueError("--adapter_dir is needed (or --no_adapter to sample the base model).")
    if args.prompt_set:
        if not args.class_noun or not args.identifier:
            raise ValueError("--prompt_set needs --class_noun (and --identifier unless the run has one).")
        args.prompts = list(args.prompts) + dreambooth_prompts(args.identifier, args.class_noun, args.prompt_set)
    if not args.prompts:
        raise ValueError("Give --prompts or --prompt_set.")
    if args.output_dir is None:
        if not args.adapter_dir:
            raise ValueError("--output_dir is needed with --no_adapter.")
        args.output_dir = str(Path(args.adapter_dir) / "samples")
    check_model_dir(args.pretrained_model_name_or_path, "--pretrained_model_name_or_path")
    check_scheduler_name(args.scheduler, "--scheduler")
    return args


def load_pipeline(args: InferArgs) -> Any:
    """The base StableDiffusionPipeline with the adapter loaded (and merged with --merge), on the device."""
    from diffusers import StableDiffusionPipeline

    from common.diffusion import load_adapter

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {None: torch.float16 if device.startswith("cuda") else torch.float32, "fp32": torch.float32,
             "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]  # PRECISIONS, checked with the options
    low_precision = {"torch_dtype": dtype} if dtype != torch.float32 else {}
    pipe = StableDiffusionPipeline.from_pretrained(
        args.pretrained_model_name_or_path, revision=args.revision, safety_checker=None,
        requires_safety_checker=False, **low_precision,
    )
    if not args.no_adapter:
        load_adapter(pipe, args.adapter_dir, merge=args.merge)
    set_scheduler(pipe, args.scheduler)
    return pipe.to(device)


def main(argv: Optional[Sequence[str]] = None) -> Path:
    """Generate, save PNGs + manifest + tensor + grid; returns the output directory. A bad option, adapter or model
    ends the script with one line, ``dreambooth_infer: error: <message>``."""
    args = parse_recipe_args(InferArgs, argv, description=__doc__.split("\n\n")[0], prog=NAME)
    try:
        return generate(resolve(args))
    except RECIPE_ERRORS as exc:
        raise SystemExit(error_line(NAME, exc)) from exc


def generate(args: InferArgs) -> Path:
    """Sample the resolved options' prompts and write the images, manifest, tensor and grid."""
    from common.diffusion import generate_images, image_grid

    pipe = load_pipeline(args)
    images = generate_images(
        pipe, args.prompts, seed=args.seed, num_images_per_prompt=args.num_images_per_prompt,
        num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale, height=args.resolution,
        width=args.resolution, batch_size=args.batch_size, progress=True,
    )
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, image in enumerate(images):
        name = f"{i:04d}.png"
        image_grid(image[None], ncols=1, padding=0).save(out / name)
        prompt = args.prompts[i // args.num_images_per_prompt]
        rows.append({"file": name, "prompt": prompt, "index": i, "seed": args.seed + i})
    write_manifest(out, rows)
    torch.save({"images": images, "prompts": list(args.prompts), "seed": args.seed}, out / "images.pt")
    image_grid(images, ncols=args.num_images_per_prompt).save(out / "grid.png")
    print(f"{len(images)} images for {len(args.prompts)} prompts in {out}")
    return out


if __name__ == "__main__":
    main()
