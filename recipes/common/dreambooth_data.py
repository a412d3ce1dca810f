"""Pieces shared by ``dreambooth.py`` (training), ``dreambooth_infer.py`` (sampling) and ``eval_subject.py``
(metrics): reading subject images with errors that name the bad file, the identifier check, the standard DreamBooth
prompt list, the model-directory check, and swapping a pipeline's sampler by name."""

from __future__ import annotations

import difflib
import functools
import json
import re
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from .args import check_model_path


PathLike = Union[str, Path]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

#: File written next to generated images by dreambooth_infer.py: one {"file", "prompt", "index", "seed"} per image.
MANIFEST = "manifest.jsonl"

#: The sub-directories of a Stable Diffusion model in the diffusers layout that the scripts load.
SD_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SD_LOCATION = ("pass a local Stable Diffusion 1.x/2.x directory in the diffusers layout (unet/, vae/, text_encoder/, "
               "tokenizer/, scheduler/) or a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5")
#: Names of the dtypes a pipeline can run in.
PRECISIONS = ("fp32", "fp16", "bf16")

# The 25 evaluation prompts of the DreamBooth paper (Ruiz et al., 2023; google/dreambooth dataset README):
# "{0}" is the identifier ("sks"), "{1}" the class noun ("dog"). Objects and live subjects share the first ten and the
# last five; the middle ten differ (backgrounds for objects, outfits for pets).
_SHARED_HEAD = [
    "a {0} {1} in the jungle",
    "a {0} {1} in the snow",
    "a {0} {1} on the beach",
    "a {0} {1} on a cobblestone street",
    "a {0} {1} on top of pink fabric",
    "a {0} {1} on top of a wooden floor",
    "a {0} {1} with a city in the background",
    "a {0} {1} with a mountain in the background",
    "a {0} {1} with a blue house in the background",
    "a {0} {1} on top of a purple rug in a forest",
]
_SHARED_TAIL = ["a red {0} {1}", "a purple {0} {1}", "a shiny {0} {1}", "a wet {0} {1}", "a cube shaped {0} {1}"]
DREAMBOOTH_PROMPTS: dict[str, list[str]] = {
    "object": _SHARED_HEAD
    + [
        "a {0} {1} with a wheat field in the background",
        "a {0} {1} with a tree and autumn leaves in the background",
        "a {0} {1} with the Eiffel Tower in the background",
        "a {0} {1} floating on top of water",
        "a {0} {1} floating in an ocean of milk",
        "a {0} {1} on top of green grass with sunflowers around it",
        "a {0} {1} on top of a mirror",
        "a {0} {1} on top of the sidewalk in a crowded street",
        "a {0} {1} on top of a dirt road",
        "a {0} {1} on top of a white rug",
    ]
    + _SHARED_TAIL,
    "live": _SHARED_HEAD
    + [
        "a {0} {1} wearing a red hat",
        "a {0} {1} wearing a santa hat",
        "a {0} {1} wearing a rainbow scarf",
        "a {0} {1} wearing a black top hat and a monocle",
        "a {0} {1} in a chef outfit",
        "a {0} {1} in a firefighter outfit",
        "a {0} {1} in a police outfit",
        "a {0} {1} wearing pink glasses",
        "a {0} {1} wearing a yellow shirt",
        "a {0} {1} in a purple wizard outfit",
    ]
    + _SHARED_TAIL,
}


def dreambooth_prompts(identifier: str, class_noun: str, kind: str = "object") -> list[str]:
    """The paper's 25 prompts for a subject, e.g. ``("sks", "dog", "live")`` -> ``"a sks dog in the jungle", ...``."""
    if kind not in DREAMBOOTH_PROMPTS:
        raise ValueError(f"Unknown prompt set {kind!r}; choose one of {sorted(DREAMBOOTH_PROMPTS)}.")
    return [p.format(identifier, class_noun) for p in DREAMBOOTH_PROMPTS[kind]]


def has_identifier(prompt: str, identifier: str) -> bool:
    """Whole-word match, so that identifier "sks" is not found in "asks"."""
    return re.search(rf"(?<!\w){re.escape(identifier)}(?!\w)", prompt) is not None


def check_identifier(prompt: Optional[str], identifier: Optional[str], option: str) -> None:
    """DreamBooth binds the subject to a rare token; a prompt without it trains (or tests) the class, not the subject."""
    if not identifier or prompt is None:
        return
    if not has_identifier(prompt, identifier):
        raise ValueError(
            f"{option} {prompt!r} does not contain the identifier {identifier!r}. DreamBooth binds the subject to that "
            f"token: write it into the prompt (e.g. 'a photo of {identifier} dog'), or set --identifier to the token "
            "your prompt uses."
        )


def strip_identifier(prompt: str, identifier: Optional[str]) -> str:
    """``"a sks dog in the snow"`` -> ``"a dog in the snow"`` (the text CLIP-T compares images with)."""
    if not identifier:
        return prompt
    text = re.sub(rf"(?<!\w){re.escape(identifier)}(?!\w)", "", prompt)
    return re.sub(r"\s+", " ", text).strip()


def check_model_dir(value: str, option: str) -> None:
    """Refuse a Stable Diffusion location meant as a local directory that does not exist, or a directory without the
    diffusers layout, naming what is missing (a hub id passes: the hub reports its own errors)."""
    check_model_path(value, option, SD_LOCATION)
    directory = Path(value).expanduser()
    if directory.is_dir():
        missing = [f"{name}/" for name in SD_SUBFOLDERS if not (directory / name).is_dir()]
        if missing:
            raise ValueError(f"{option} {value!r}: not a Stable Diffusion model in the diffusers layout: no "
                             f"{', '.join(missing)}; {SD_LOCATION}")


@functools.lru_cache(maxsize=None)
def diffusers_schedulers() -> tuple[str, ...]:
    """The scheduler classes diffusers exports (read from its lazy namespace, so none is imported here)."""
    import diffusers

    return tuple(sorted(n for n in dir(diffusers) if n.endswith("Scheduler") and not n.startswith("Flax")))


def check_scheduler_name(name: Optional[str], option: str) -> None:
    """Refuse a sampler name that is not a diffusers scheduler class, before any model is loaded."""
    if name is None or name in diffusers_schedulers():
        return
    close = difflib.get_close_matches(name, diffusers_schedulers(), n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    raise ValueError(f"{option} {name}: not a diffusers scheduler class; {hint}use e.g. DPMSolverMultistepScheduler, "
                     "DDIMScheduler or EulerDiscreteScheduler, or null for the model's own.")


def list_images(directory: PathLike, option: str, *, allow_empty: bool = False) -> list[Path]:
    """Image files of ``directory`` (sorted, hidden files skipped); a missing or empty directory is an error that
    names ``option`` and the directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{option} {str(directory)!r} is not a directory.")
    files = sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files and not allow_empty:
        raise ValueError(f"{option} {str(directory)!r} is empty: put the subject's images (PNG/JPEG) there.")
    return files


def open_rgb(path: PathLike) -> Any:
    """Open an image as RGB (EXIF orientation applied); an unreadable file is an error naming it."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            return ImageOps.exif_transpose(img).convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"Cannot read image {str(path)!r} ({type(exc).__name__}: {exc}). Remove or replace it.") from exc


def load_images(directory: PathLike, option: str) -> list[Any]:
    """All images of a subject directory as RGB PIL images; every file must be a readable image."""
    return [open_rgb(p) for p in list_images(directory, option)]


def set_scheduler(pipe: Any, name: Optional[str]) -> Any:
    """Replace ``pipe.scheduler`` by the diffusers scheduler class ``name``, built from the current config (so the
    model's beta schedule and prediction type are kept). ``None`` keeps the model's own scheduler."""
    if not name:
        return pipe
    import diffusers

    check_scheduler_name(name, "scheduler")
    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config)
    return pipe


def write_manifest(directory: PathLike, rows: Sequence[dict[str, Any]]) -> Path:
    path = Path(directory) / MANIFEST
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_manifest(directory: PathLike) -> list[dict[str, Any]]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: eval_subject.py needs the manifest that dreambooth_infer.py writes next to the images "
            "(one JSON line per image with its file and prompt)."
        )
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
