#!/usr/bin/env python
"""Subject-fidelity and prompt-fidelity metrics of DreamBooth samples, as in the GSOFT / DreamBooth papers.

* **CLIP-I**: mean cosine similarity of CLIP image embeddings, every generated image against every instance image.
* **CLIP-T**: mean cosine similarity of a generated image's CLIP embedding and its prompt's (the identifier removed:
  "a sks dog in the snow" -> "a dog in the snow").
* **DINO**: mean cosine similarity of DINO ViT-S/16 CLS embeddings, generated against instance images.

Usage (after ``dreambooth_infer.py --prompt_set live --class_noun dog``, which writes images and ``manifest.jsonl``)::

    python recipes/eval_subject.py --images_dir outputs/my-dog/samples --instance_data_dir my_dog/ \
        --results_json outputs/my-dog/results.json

Models (``--clip_model``, ``--dino_model``) are hub ids or local directories; defaults are the papers' CLIP ViT-B/32
(openai/clip-vit-base-patch32) and DINO ViT-S/16 (facebook/dino-vits16). Prints a per-prompt table and writes JSON;
``--results_json`` also adds ``eval_clip_i``, ``eval_clip_t``, ``eval_dino`` to a training run's results.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from common.extras import needs

with needs("dreambooth", "eval_subject"):
    from common.args import check_model_path, check_options, parse_recipe_args
    from common.dreambooth_data import load_images, open_rgb, read_manifest, strip_identifier
    from common.loop import RECIPE_ERRORS, error_line
    from common.run import write_results

NAME = "eval_subject"
MODEL_LOCATION = "pass a hub id or a local model directory saved with save_pretrained, or null to skip the metric"


@dataclass
class EvalArgs:
    """Options of recipes/eval_subject.py."""

    images_dir: Optional[str] = field(
        default=None, metadata={"help": "Generated images with the manifest.jsonl of dreambooth_infer.py."}
    )
    instance_data_dir: Optional[str] = field(default=None, metadata={"help": "The subject's real images."})
    identifier: Optional[str] = field(default="sks", metadata={"help": "Token removed from prompts for CLIP-T."})
    clip_model: Optional[str] = field(
        default="openai/clip-vit-base-patch32", metadata={"help": "CLIP model (hub id or directory); null skips CLIP."}
    )
    dino_model: Optional[str] = field(
        default="facebook/dino-vits16", metadata={"help": "DINO ViT model (hub id or directory); null skips DINO."}
    )
    batch_size: int = field(default=32, metadata={"help": "Images per embedding batch.", "min": 1})
    device: Optional[str] = field(default=None, metadata={"help": "cuda, cpu, ... (default: cuda when available)."})
    output_json: Optional[str] = field(default=None, metadata={"help": "Where the scores go (default: images_dir/eval.json)."})
    results_json: Optional[str] = field(
        default=None, metadata={"help": "A recipes/dreambooth.py results.json to add eval_clip_i/_t, eval_dino to."}
    )

    def __post_init__(self) -> None:
        check_options(self)
        if not self.images_dir or not self.instance_data_dir:
            raise ValueError("--images_dir and --instance_data_dir are required.")
        check_model_path(self.clip_model, "--clip_model", MODEL_LOCATION)
        check_model_path(self.dino_model, "--dino_model", MODEL_LOCATION)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def _features(out: Any) -> torch.Tensor:
    """transformers 4 returns the projected embeddings as a tensor, transformers 5 in ``pooler_output``."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.no_grad()
def clip_embeddings(model_path: str, images: Sequence[Any], texts: Sequence[str], device: str, batch_size: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised CLIP image embeddings ``(len(images), d)`` and text embeddings ``(len(texts), d)``."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(model_path).to(device).eval()
    processor = CLIPProcessor.from_pretrained(model_path)
    img = [
        _features(model.get_image_features(**processor(images=list(images[i : i + batch_size]), return_tensors="pt").to(device)))
        for i in range(0, len(images), batch_size)
    ]
    txt = []
    for i in range(0, len(texts), batch_size):
        tokens = processor(text=list(texts[i : i + batch_size]), padding=True, truncation=True, return_tensors="pt")
        txt.append(_features(model.get_text_features(**tokens.to(device))))
    return _normalize(torch.cat(img)).cpu(), _normalize(torch.cat(txt)).cpu()


@torch.no_grad()
def dino_embeddings(model_path: str, images: Sequence[Any], device: str, batch_size: int) -> torch.Tensor:
    """Normalised CLS-token embeddings of a DINO ViT (the last hidden state's first token, as the DreamBooth paper)."""
    from transformers import AutoImageProcessor, AutoModel

    model = AutoModel.from_pretrained(model_path, add_pooling_layer=False).to(device).eval()
    processor = AutoImageProcessor.from_pretrained(model_path)
    out = []
    for i in range(0, len(images), batch_size):
        inputs = processor(images=list(images[i : i + batch_size]), return_tensors="pt").to(device)
        out.append(model(**inputs).last_hidden_state[:, 0])
    return _normalize(torch.cat(out)).cpu()


def evaluate(args: EvalArgs) -> dict[str, Any]:
    """All scores: overall means and one row per prompt."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = read_manifest(args.images_dir)
    generated = [open_rgb(Path(args.images_dir) / r["file"]) for r in rows]
    real = load_images(args.instance_data_dir, "--instance_data_dir")
    prompts = [r["prompt"] for r in rows]
    texts = sorted(set(prompts))
    per_image: dict[str, torch.Tensor] = {}
    if args.clip_model:
        emb, text_emb = clip_embeddings(args.clip_model, generated + real, [strip_identifier(t, args.identifier) for t in texts],
                                        device, args.batch_size)
        gen, ref = emb[: len(generated)], emb[len(generated) :]
        per_image["clip_i"] = (gen @ ref.T).mean(dim=1)
        text_of = torch.stack([text_emb[texts.index(p)] for p in prompts])
        per_image["clip_t"] = (gen * text_of).sum(dim=1)
    if args.dino_model:
        emb = dino_embeddings(args.dino_model, generated + real, device, args.batch_size)
        per_image["dino"] = (emb[: len(generated)] @ emb[len(generated) :].T).mean(dim=1)
    scores: dict[str, Any] = {k: float(v.mean()) for k, v in per_image.items()}
    scores.update(
        n_images=len(generated), n_instance_images=len(real), n_prompts=len(texts),
        clip_model=args.clip_model, dino_model=args.dino_model, images_dir=str(args.images_dir),
    )
    scores["per_prompt"] = [
        {"prompt": t, "n": sum(p == t for p in prompts),
         **{k: float(v[[p == t for p in prompts]].mean()) for k, v in per_image.items()}}
        for t in texts
    ]
    return scores


def markdown(scores: dict[str, Any]) -> str:
    metrics = [m for m in ("clip_i", "clip_t", "dino") if m in scores]
    head = "| prompt | n | " + " | ".join(m.upper().replace("_", "-") for m in metrics) + " |"
    lines = [head, "|---|---:|" + "---:|" * len(metrics)]
    for row in scores["per_prompt"]:
        lines.append(f"| {row['prompt']} | {row['n']} | " + " | ".join(f"{row[m]:.3f}" for m in metrics) + " |")
    lines.append(f"| **all** | {scores['n_images']} | " + " | ".join(f"**{scores[m]:.3f}**" for m in metrics) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Score the samples, print the table, write the JSON; a bad option, file or model ends the script with one
    line, ``eval_subject: error: <message>``."""
    args = parse_recipe_args(EvalArgs, argv, description=__doc__.split("\n\n")[0], prog=NAME)
    try:
        return score(args)
    except RECIPE_ERRORS as exc:
        raise SystemExit(error_line(NAME, exc)) from exc


def score(args: EvalArgs) -> dict[str, Any]:
    """The scores of :func:`evaluate`, printed and written to ``--output_json`` (and ``--results_json``)."""
    scores = evaluate(args)
    print(markdown(scores))
    out = Path(args.output_json or Path(args.images_dir) / "eval.json")
    out.write_text(json.dumps(scores, indent=2) + "\n")
    if args.results_json:
        path = Path(args.results_json)
        if path.name != "results.json" or not path.is_file():
            raise ValueError(f"--results_json {str(path)!r} is not the results.json of a recipes/dreambooth.py run.")
        results = json.loads(path.read_text())
        results.update({f"eval_{m}": scores[m] for m in ("clip_i", "clip_t", "dino") if m in scores})
        results["eval_json"] = str(out)
        write_results(path.parent, results)
    return scores


if __name__ == "__main__":
    main()
