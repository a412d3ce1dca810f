"""diffusers helpers: load adapters trained by ``recipes/dreambooth.py`` into a pipeline, and reproducible sampling.

The recipe saves its adapters in PEFT format next to each other, in the pipeline's own layout::

    output_dir/unet/{adapter_config.json, adapter_model.safetensors}
    output_dir/text_encoder/...            (only with --train_text_encoder)

so loading is ``PeftModel.from_pretrained(pipe.unet, output_dir / "unet")`` (and the same for the text encoder), or
in one call, optionally merged into the weights for zero-overhead inference::

    import common.diffusion
    pipe = StableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
    common.diffusion.load_adapter(pipe, "outputs/dreambooth-dog", merge=True)

Works for every method the recipe trains (GSOFT, Double GSOFT and PEFT's LoRA / OFT / BOFT): PEFT reads the method
from ``adapter_config.json``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

__all__ = ["ADAPTER_COMPONENTS", "adapter_dirs", "generate_images", "image_grid", "load_adapter"]

PathLike = Union[str, Path]

#: Pipeline components the recipe may adapt, in the order they are saved and loaded.
ADAPTER_COMPONENTS = ("unet", "text_encoder")


def _is_adapter_dir(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def adapter_dirs(path: PathLike) -> dict[str, Path]:
    """Component name -> adapter directory under ``path``.

    ``path`` is either a recipe output directory (``unet/`` and optionally ``text_encoder/`` adapters inside) or a
    single PEFT adapter directory, which is taken as the UNet's.
    """
    path = Path(path)
    if _is_adapter_dir(path):
        return {"unet": path}
    found = {name: path / name for name in ADAPTER_COMPONENTS if _is_adapter_dir(path / name)}
    if not found:
        raise FileNotFoundError(
            f"No PEFT adapter under {str(path)!r}: expected {path / 'unet' / 'adapter_config.json'} (a "
            "recipes/dreambooth.py output directory) or an adapter_config.json in the directory itself."
        )
    return found


def load_adapter(
    pipe: Any,
    path: PathLike,
    *,
    merge: bool = False,
    adapter_name: str = "default",
    components: Optional[Sequence[str]] = None,
) -> Any:
    """Load the adapters saved under ``path`` into ``pipe`` (in place) and return ``pipe``.

    ``merge=False``: each adapted component becomes a ``PeftModel`` (adapters can be disabled, swapped, unmerged).
    ``merge=True``: the adapter is folded into the weights (``merge_and_unload``) and the component is a plain
    diffusers / transformers model again: same outputs, no adapter overhead. ``components`` restricts loading to
    some of ``unet`` / ``text_encoder``; a text-encoder adapter without a ``pipe.text_encoder`` is an error.
    """
    from peft import PeftModel

    found = adapter_dirs(path)
    if components is not None:
        unknown = set(components) - set(ADAPTER_COMPONENTS)
        if unknown:
            raise ValueError(f"Unknown components {sorted(unknown)}; choose from {ADAPTER_COMPONENTS}.")
        found = {k: v for k, v in found.items() if k in components}
    for name, adapter_dir in found.items():
        module = getattr(pipe, name, None)
        if module is None:
            raise ValueError(
                f"{adapter_dir} holds a {name} adapter but the pipeline has no {name!r} component "
                f"({type(pipe).__name__}); pass components=['unet'] to skip it."
            )
        peft_model = PeftModel.from_pretrained(module, str(adapter_dir), adapter_name=adapter_name)
        peft_model.eval()
        setattr(pipe, name, peft_model.merge_and_unload() if merge else peft_model)
    return pipe


def generate_images(
    pipe: Any,
    prompts: Sequence[str],
    *,
    seed: int = 0,
    num_images_per_prompt: int = 1,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    height: Optional[int] = None,
    width: Optional[int] = None,
    batch_size: int = 4,
    negative_prompt: Optional[str] = None,
    progress: bool = False,
) -> torch.Tensor:
    """Images for every prompt (prompt-major order) as a float tensor ``(N, 3, H, W)`` in ``[0, 1]`` on the CPU.

    Image ``i`` is drawn with its own generator seeded ``seed + i``, so what an image looks like does not depend on
    the batch size or on how many other images are generated: training-time validation, ``dreambooth_infer.py`` and
    a user's notebook give the same image for the same prompt index and seed.
    """
    jobs = [p for p in prompts for _ in range(num_images_per_prompt)]
    device = getattr(pipe, "_execution_device", None) or pipe.device
    gen_device = "cpu" if torch.device(device).type == "mps" else device
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=not progress)
    out = []
    for start in range(0, len(jobs), max(1, batch_size)):
        chunk = jobs[start : start + batch_size]
        generators = [torch.Generator(device=gen_device).manual_seed(seed + start + k) for k in range(len(chunk))]
        with torch.no_grad():
            result = pipe(
                prompt=list(chunk),
                negative_prompt=[negative_prompt] * len(chunk) if negative_prompt else None,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                height=height,
                width=width,
                generator=generators,
                output_type="pt",
            )
        out.append(result.images.float().cpu())
    return torch.cat(out) if out else torch.empty(0, 3, height or 0, width or 0)


def image_grid(images: torch.Tensor, ncols: Optional[int] = None, padding: int = 2) -> "Any":
    """A PIL image with ``images`` (``(N, 3, H, W)`` in ``[0, 1]``) tiled row-major, ``ncols`` per row."""
    from PIL import Image

    n, _, h, w = images.shape
    ncols = ncols or max(1, math.ceil(math.sqrt(n)))
    nrows = max(1, math.ceil(n / ncols))
    grid = torch.ones(3, nrows * (h + padding) + padding, ncols * (w + padding) + padding)
    for i in range(n):
        r, c = divmod(i, ncols)
        y, x = padding + r * (h + padding), padding + c * (w + padding)
        grid[:, y : y + h, x : x + w] = images[i]
    array = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array)
