"""Tiny, offline stand-ins for everything the DreamBooth recipes load: a Stable-Diffusion-layout model directory,
subject images, and CLIP / DINO evaluation models.

Used by ``configs/dreambooth/smoke.yaml`` (through the recipe's ``smoke_assets`` option), by
``recipes/bench/dreambooth.py`` and by ``tests/test_dreambooth.py``. Everything is built from configs with fixed seeds:
no download, no weights, a few MB on disk. The model directory has the exact diffusers layout (``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``, ``model_index.json``) so the recipes load it through their normal
``--pretrained_model_name_or_path DIR`` code path.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any, Union

import torch

PathLike = Union[str, Path]

#: Image side (pixels) of the smoke model and the VAE's down-sampling factor (2 ** (len(block_out_channels) - 1)).
TINY_RESOLUTION = 32
TINY_VAE_FACTOR = 2
_TEXT_LEN = 32  # tokenizer model_max_length == text encoder max_position_embeddings
_MERGES = ["s k", "sk s</w>"]  # so that the identifier "sks" is one token, as in the real CLIP vocabulary


def write_tiny_clip_tokenizer(directory: PathLike) -> Path:
    """A CLIP BPE tokenizer over lower-case letters, digits and punctuation (~90 tokens), saved offline.

    Real CLIP tokenizers need a 49k-entry vocabulary from the hub; this one has the same special tokens and
    ``</w>`` word ends, which is all the text encoder and pipelines rely on.
    """
    from transformers import CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    chars = list(string.ascii_lowercase + string.digits + ".,!?'-")
    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for c in chars:
            vocab[c + suffix] = len(vocab)
    for merge in _MERGES:
        vocab["".join(merge.split())] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    raw = directory / "_bpe"
    raw.mkdir(exist_ok=True)
    (raw / "vocab.json").write_text(json.dumps(vocab))
    (raw / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_MERGES) + "\n")
    tokenizer = CLIPTokenizer(str(raw / "vocab.json"), str(raw / "merges.txt"), model_max_length=_TEXT_LEN)
    tokenizer.save_pretrained(directory)
    for f in raw.iterdir():
        f.unlink()
    raw.rmdir()
    return directory


def _tiny_text_config(vocab_size: int, bos: int, eos: int) -> dict[str, Any]:
    return dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=_TEXT_LEN,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
        projection_dim=32,
    )


def build_tiny_sd(directory: PathLike, *, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Save a tiny Stable Diffusion model (random weights) in the diffusers layout and return its directory.

    UNet: 2 blocks (16, 32 channels), one cross-attention block each way, cross-attention dim 32; VAE: 2 blocks, so a
    ``TINY_RESOLUTION`` image has ``TINY_RESOLUTION / 2`` latents; CLIP text encoder: 2 layers of width 32; DDPM
    scheduler with ``prediction_type`` ("epsilon" or "v_prediction").
    """
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    directory = Path(directory)
    tok_dir = write_tiny_clip_tokenizer(directory / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // TINY_VAE_FACTOR,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=TINY_RESOLUTION,
    )
    special = tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**_tiny_text_config(len(tokenizer), *special)))
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        clip_sample=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(directory)
    return directory


def write_subject_images(
    directory: PathLike, n: int = 4, *, size: tuple[int, int] = (48, 40), colour: tuple[int, int, int] = (220, 30, 30)
) -> list[Path]:
    """``n`` deterministic PNGs of one "subject" (a coloured disc with a white stripe) on different backgrounds.

    The default size is neither square nor the training resolution, so resizing and cropping are exercised.
    """
    from PIL import Image, ImageDraw

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    backgrounds = [(30, 90, 200), (40, 160, 60), (230, 220, 200), (90, 90, 90), (250, 180, 40), (120, 40, 140)]
    paths = []
    w, h = size
    for i in range(n):
        img = Image.new("RGB", size, backgrounds[i % len(backgrounds)])
        draw = ImageDraw.Draw(img)
        r = min(w, h) // 3
        cx, cy = w // 2 + (i % 3 - 1) * w // 8, h // 2 + (i % 2) * h // 10
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        draw.rectangle([cx - r, cy - 2, cx + r, cy + 2], fill=(255, 255, 255))
        path = directory / f"subject_{i:02d}.png"
        img.save(path)
        paths.append(path)
    return paths


def build_tiny_clip(directory: PathLike, *, seed: int = 0) -> Path:
    """A tiny ``CLIPModel`` + ``CLIPProcessor`` (32 px images, random weights) for ``eval_subject.py`` tests."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    directory = Path(directory)
    tokenizer = CLIPTokenizer.from_pretrained(write_tiny_clip_tokenizer(directory / "_tok"))
    special = tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8, projection_dim=32)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=_tiny_text_config(len(tokenizer), *special), vision_config=vision,
                                 projection_dim=32))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model.save_pretrained(directory)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    for f in (directory / "_tok").iterdir():
        f.unlink()
    (directory / "_tok").rmdir()
    return directory


def build_tiny_dino(directory: PathLike, *, seed: int = 0) -> Path:
    """A tiny ``ViTModel`` (the architecture of facebook/dino-vits16) + image processor, random weights."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    directory = Path(directory)
    torch.manual_seed(seed)
    model = ViTModel(ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               image_size=32, patch_size=8), add_pooling_layer=False)
    model.save_pretrained(directory)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


def ensure_smoke_assets(model_dir: PathLike, instance_dir: PathLike, *, prediction_type: str = "epsilon") -> None:
    """Create the tiny model and subject images if they are not there yet (idempotent: an existing model directory
    with a ``model_index.json`` and a non-empty image directory are left alone)."""
    model_dir, instance_dir = Path(model_dir), Path(instance_dir)
    if not (model_dir / "model_index.json").is_file():
        build_tiny_sd(model_dir, prediction_type=prediction_type)
    if not instance_dir.is_dir() or not any(instance_dir.iterdir()):
        write_subject_images(instance_dir)
