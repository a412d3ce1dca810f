"""Export GSOFT adapters to the formats other tools load: a merged checkpoint, or a full weight-difference file.

GSOFT's update ``W -> s * Q_out W Q_in`` is a rotation, not a low-rank product, so no LoRA layout can carry it. Two
forms can, and both are built from the layers' own ``merge`` (the arithmetic of ``merge_and_unload``):

- **merged** (:func:`merged_model`, :func:`merged_state_dict`, :func:`save_merged`): the plain base class
  (transformers or diffusers) with the adapter folded into its weights, saved with its own ``save_pretrained``, so it
  loads with ``AutoModel...from_pretrained`` / ``UNet2DConditionModel.from_pretrained`` without gsoft or peft.
- **weight difference** (:func:`weight_diff_state_dict`, :func:`save_weight_diff`): for every adapted layer,
  ``<prefix>_<module path, "." -> "_">.diff = merged weight - base weight`` (the weight's shape, conv kernels
  included): the LyCORIS "full" layout. What the loaders do with it, read from their source:

  * ComfyUI (``comfy/lora.py``): ``load_lora`` turns ``{name}.diff`` / ``{name}.diff_b`` into "diff" patches of the
    weight / bias; ``model_lora_keys_unet`` maps ``lora_unet_<diffusers UNet key, "." -> "_">`` to the UNet weights
    and ``model_lora_keys_clip`` maps ``lora_te_text_model_encoder_layers_<i>_<self_attn_q_proj, mlp_fc1, ...>``
    to the SD1.x text encoder; ``calculate_weight`` adds ``strength * diff`` to the weight in float32 and casts the
    result back to the weight's dtype.
  * A1111 / Forge (``extensions-builtin/Lora/network_full.py``): a module with a ``diff`` key is a
    ``NetworkModuleFull``; its update is ``diff`` (``diff_b`` for the bias) cast to the weight's dtype, times the
    multiplier (no alpha, so scale 1), added to the weight; diffusers-named ``lora_unet_`` keys are converted to
    their own names.
  * LyCORIS (``lycoris/kohya.py`` ``create_network_from_weights``, ``lycoris/modules/full.py``): the module named
    ``lora_unet_<unet.named_modules() name, "." -> "_">`` (``lora_te_`` for the text encoder) gets
    ``org_weight + diff * multiplier``.

  None of them reads the file's metadata to load it. Merging changes the weight only: the bias is added after the
  rotation and the scale (``y = s * (Q_out W Q_in x) + b``, ``GSOFTLayer.merge`` writes ``weight`` alone), so no
  ``.diff_b`` is written. An adapter that trained biases (``bias != "none"``) or whole modules (``modules_to_save``)
  cannot be exported this way: the PEFT model holds the trained values in place of the base model's, so their
  difference is unknown; its merged checkpoint carries them.

Exactness: the loaders compute ``W + 1.0 * d``. :func:`exact_diff` picks each float32 entry of ``d`` so that
``W + d`` equals the merged weight ``M`` exactly in float32 wherever such a float exists. For a float16 or bfloat16
base (how Stable Diffusion checkpoints ship) that is every entry but those where one of ``W``, ``M`` is over 2**13
times the other: the difference of two half-precision numbers closer than that is a float32. For a float32 base, entries with ``|M| < |W|`` may need low bits of ``M`` that the sum's spacing cannot
reach, and then no float32 ``d`` gives ``M``: such entries are off by at most ``1.5 * eps32 * max(|W|, |M|)``, and
:class:`DiffStats` counts them (docs/export.md gives the measured share). The merged checkpoint is bit-exact.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Union

import torch
from torch import nn

from .tuner.layer import GSOFTLayer
from .tuner.peft_type import GSOFTPeftType

logger = logging.getLogger("gsoft")

__all__ = [
    "DIFF_METADATA",
    "DiffStats",
    "check_output",
    "diff_key",
    "exact_diff",
    "gsoft_layers",
    "loader_path",
    "merged_model",
    "merged_state_dict",
    "save_merged",
    "save_weight_diff",
    "weight_diff_state_dict",
    "writing_dir",
]

PathLike = Union[str, Path]

#: Metadata of a weight-difference file: what kohya-style tools show for a LyCORIS "full" network (``ss_network_module``
#: and ``ss_network_args`` are the keys sd-scripts writes and model browsers display). Loaders pick the algorithm from
#: the tensor names (``.diff``), not from these.
DIFF_METADATA: dict[str, str] = {
    "ss_network_module": "lycoris.kohya",
    "ss_network_args": json.dumps({"algo": "full"}),
}

#: Prefixes are one key segment: letters, digits and "_" (``lora_unet``, ``lora_te``, ``lora_te1``).
_PREFIX = re.compile(r"[A-Za-z0-9_]+")


@dataclass(frozen=True)
class DiffStats:
    """What a weight-difference export holds and how much of it reproduces the merged weights exactly."""

    tensors: int  # ".diff" tensors, one per adapted layer
    elements: int  # their entries
    inexact: int  # entries where base + diff != merged in float32 (no float diff gives it, or a float16/bfloat16 export)
    max_error: float  # the largest |base + diff - merged| among them (0.0 when all are exact)

    def __add__(self, other: "DiffStats") -> "DiffStats":
        return DiffStats(self.tensors + other.tensors, self.elements + other.elements, self.inexact + other.inexact,
                         max(self.max_error, other.max_error))


# -- which layers -------------------------------------------------------------------------------------------------------
def _peft_model(model: nn.Module, what: str) -> nn.Module:
    """``model`` itself when it is a ``peft.PeftModel`` holding at least one GSOFT adapter, else a ``TypeError``."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise TypeError(
            f"{what} needs a peft.PeftModel with a GSOFT adapter, got {type(model).__name__}. Load the adapter with "
            "PeftModel.from_pretrained(base_model, adapter_dir) (or common.diffusion.load_adapter for a pipeline)."
        )
    return model


def _active(layer: GSOFTLayer) -> list[str]:
    return [a for a in layer.active_adapters if a in layer.gsoft_in]


def gsoft_layers(model: nn.Module) -> dict[str, GSOFTLayer]:
    """Module path in the base model (``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``) -> its GSOFT
    layer, for every layer with an active GSOFT adapter.

    Raises a ``ValueError`` when there is none, when a layer is merged (its base weight is gone) or when adapters are
    disabled (the model then computes the base model, which is not what an export of the adapter should give).
    """
    model = _peft_model(model, "Exporting")
    base = model.get_base_model()
    layers = {path: m for path, m in base.named_modules() if isinstance(m, GSOFTLayer) and _active(m)}
    if not layers:
        raise ValueError(
            f"The {type(base).__name__} has no layer with an active GSOFT adapter (active: {model.active_adapters}). "
            "Load a GSOFT adapter (PeftModel.from_pretrained) and make it active (set_adapter)."
        )
    for path, layer in layers.items():
        if layer.merged:
            raise ValueError(
                f"Layer '{path}' is merged with adapters {layer.merged_adapters}, so its base weight is gone. Export "
                "from the unmerged model (load the adapter again, without merging); the merged model itself is "
                "already the merged checkpoint (save_pretrained after merge_and_unload())."
            )
        if layer.disable_adapters:
            raise ValueError(
                f"Adapters are disabled on layer '{path}' (inside a disable_adapter() block?); the model computes the "
                "base model there. Export outside that block."
            )
    return layers


# -- merged checkpoint --------------------------------------------------------------------------------------------------
def merged_model(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """The plain base model with the active adapters merged (``merge_and_unload``).

    ``inplace=False`` merges a deep copy and leaves ``model`` as it was (twice the memory for the moment);
    ``inplace=True`` merges ``model`` itself, for callers that own it and need it no more (the export script).
    """
    gsoft_layers(model)
    target = model if inplace else copy.deepcopy(model)
    return target.merge_and_unload()


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the merged plain base model (keys as in the base model: no ``base_layer``, no adapters).
    ``model`` is not changed."""
    return merged_model(model).state_dict()


def save_merged(model: nn.Module, out_dir: PathLike, *, inplace: bool = False, overwrite: bool = False) -> Path:
    """``save_pretrained`` of the merged plain base model into ``out_dir`` (see :func:`merged_model` for ``inplace``).

    The output is checked before the merge and written through :func:`writing_dir`.
    """
    check_output(out_dir, directory=True, overwrite=overwrite)
    merged = merged_model(model, inplace=inplace)
    with writing_dir(out_dir, overwrite=overwrite) as tmp:
        merged.save_pretrained(tmp)
    return Path(out_dir)


# -- weight difference --------------------------------------------------------------------------------------------------
def diff_key(prefix: str, module_path: str) -> str:
    """``lora_unet`` + ``down_blocks.0.attentions.0.proj_in`` -> ``lora_unet_down_blocks_0_attentions_0_proj_in``."""
    if not isinstance(prefix, str) or not _PREFIX.fullmatch(prefix):
        raise ValueError(
            f"prefix must be letters, digits and '_' (one key segment), got {prefix!r}; the loaders use 'lora_unet' for "
            "a UNet and 'lora_te' for the SD1.x text encoder ('lora_te1' / 'lora_te2' for SDXL's)."
        )
    return f"{prefix}_{module_path.replace('.', '_')}"


def loader_path(model: nn.Module, path: str) -> str:
    """The module path that the loaders' key names use for ``path`` in ``model`` (the base model).

    The loaders name SD text-encoder layers ``text_model.encoder.layers.<i>...``, after the original checkpoints and
    transformers 4's ``CLIPTextModel``; transformers 5 builds ``CLIPTextModel`` / ``CLIPTextModelWithProjection``
    without the ``text_model`` submodule (its checkpoints add the prefix back when saved), so its ``encoder.*`` paths
    get the prefix here. Every other path is the loaders' name as it is (diffusers UNets name their modules as their
    checkpoints do).
    """
    clip_text = type(model).__name__ in ("CLIPTextModel", "CLIPTextModelWithProjection")
    if clip_text and not hasattr(model, "text_model") and path.startswith("encoder."):
        return f"text_model.{path}"
    return path


def exact_diff(base: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A float32 ``d`` with ``base + d == target`` in float32 wherever such a float exists, and the mask of the
    entries where none does.

    ``fl(target - base)`` is not always enough: unless ``target`` and ``base`` are within a factor 2 of each other the
    subtraction rounds, and adding ``base`` back rounds again. ``fl(base + d)`` grows monotonically with ``d``, so
    the floats ``d`` that give ``target`` form a run that contains the float nearest to the exact difference or one of
    its two neighbours, when it is not empty: those three are tried, and the first that gives the smallest error kept.
    """
    b, t = base.detach().float(), target.detach().float()
    exact = t.double() - b.double()  # exact: two float32 values' difference fits a float64 unless one is negligible
    d0 = exact.float()
    candidates = torch.stack([d0, torch.nextafter(d0, torch.full_like(d0, float("inf"))),
                              torch.nextafter(d0, torch.full_like(d0, float("-inf")))])
    errors = ((b + candidates).double() - t.double()).abs()  # b + candidate rounds in float32, as the loaders add
    best = errors.argmin(dim=0, keepdim=True)  # first minimum: d0 unless a neighbour is closer
    diff = candidates.gather(0, best).squeeze(0)
    return diff, errors.gather(0, best).squeeze(0) != 0


def _merged_weight(layer: GSOFTLayer, adapters: list[str]) -> torch.Tensor:
    """The layer's weight merged with ``adapters`` by its own ``merge``; the layer is restored bit for bit after."""
    weight = layer.get_base_layer().weight
    saved = weight.detach().clone()
    merged_before = list(layer.merged_adapters)
    try:
        layer.merge(adapter_names=adapters)
        return weight.detach().clone()
    finally:
        with torch.no_grad():
            weight.copy_(saved)
        layer.merged_adapters[:] = merged_before


def _check_diffable(model: nn.Module) -> None:
    """Refuse adapters whose trained tensors replace base-model tensors (trained biases, ``modules_to_save``)."""
    for name in model.active_adapters:
        config = model.peft_config[name]
        if config.peft_type != GSOFTPeftType.GSOFT:
            continue
        if getattr(config, "bias", "none") != "none":
            raise ValueError(
                f"Adapter '{name}' trained biases (bias={config.bias!r}): the PEFT model holds the trained biases in "
                "place of the base model's, so their difference is unknown. Export it with format 'merged' instead."
            )
        if config.modules_to_save:
            raise ValueError(
                f"Adapter '{name}' trains whole modules (modules_to_save={sorted(config.modules_to_save)}), which a "
                "weight-difference file does not carry. Export it with format 'merged' instead."
            )


def _weight_diffs(model: nn.Module, prefix: str, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], DiffStats]:
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}.")
    layers = gsoft_layers(model)
    _check_diffable(model)
    base_model = model.get_base_model()
    tensors: dict[str, torch.Tensor] = {}
    stats = DiffStats(0, 0, 0, 0.0)
    for path, layer in layers.items():
        base = layer.get_base_layer().weight.detach()
        if base.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise ValueError(
                f"Layer '{path}' has a {base.dtype} (quantized) base weight; a weight difference is taken against the "
                "dense weights the loaders patch. Load the base model unquantized to export."
            )
        merged = _merged_weight(layer, _active(layer))
        diff, _ = exact_diff(base, merged)
        diff = diff.to(dtype)
        error = ((base.float() + diff.float()) - merged.float()).abs()  # what a float32 loader gets, per entry
        key = diff_key(prefix, loader_path(base_model, path))
        tensors[f"{key}.diff"] = diff.cpu().contiguous()
        stats = stats + DiffStats(1, diff.numel(), int((error != 0).sum()), float(error.max()) if error.numel() else 0.0)
    return tensors, stats


def weight_diff_state_dict(
    model: nn.Module, prefix: str = "lora_unet", *, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """``{<prefix>_<module path with "_">.diff: merged weight - base weight}`` for every layer with an active GSOFT
    adapter (see the module docstring for the layout and :func:`exact_diff` for the arithmetic). ``model`` is left as
    it was. The entries that do not reproduce the merged weight exactly in float32 are counted in the log."""
    tensors, stats = _weight_diffs(model, prefix, dtype)
    logger.info("weight difference '%s': %d tensors, %d of %d entries not exact in float32 (max error %.3g)",
                prefix, stats.tensors, stats.inexact, stats.elements, stats.max_error)
    return tensors


def save_weight_diff(
    models: Union[nn.Module, Mapping[str, nn.Module]],
    path: PathLike,
    *,
    prefix: str = "lora_unet",
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> DiffStats:
    """Write the weight differences of ``models`` to one ``.safetensors`` file with :data:`DIFF_METADATA`.

    ``models`` is one PEFT model (keys under ``prefix``) or a mapping ``prefix -> PEFT model``, e.g.
    ``{"lora_unet": unet, "lora_te": text_encoder}`` for a pipeline whose UNet and text encoder were both adapted.
    The file is written beside ``path`` and moved over it with ``os.replace``, so readers never see a partial file.
    Returns what the file holds, with the count of entries that are not exact.
    """
    path = check_output(path, directory=False, overwrite=overwrite)
    parts = dict(models) if isinstance(models, Mapping) else {prefix: models}
    tensors: dict[str, torch.Tensor] = {}
    stats = DiffStats(0, 0, 0, 0.0)
    for part_prefix, model in parts.items():
        part, part_stats = _weight_diffs(model, part_prefix, dtype)
        clash = sorted(set(part) & set(tensors))
        if clash:
            raise ValueError(f"Two models give the same keys {clash[:3]}: give each model its own prefix.")
        tensors.update(part)
        stats = stats + part_stats
    metadata = dict(DIFF_METADATA, gsoft_components=json.dumps(sorted(parts)))
    from safetensors.torch import save_file

    with _replacing_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return stats


# -- output paths -------------------------------------------------------------------------------------------------------
def check_output(path: PathLike, *, directory: bool, overwrite: bool) -> Path:
    """The output path, checked before anything is computed: a ``.safetensors`` file (``directory=False``) or a
    directory, whose parent exists, and which does not exist yet unless ``overwrite``."""
    path = Path(path)
    if not directory and path.suffix != ".safetensors":
        raise ValueError(
            f"The weight-difference file must end in .safetensors (the loaders look for that), got {str(path)!r}."
        )
    if not path.parent.is_dir():
        raise FileNotFoundError(f"The folder of the output {str(path)!r} does not exist; create {str(path.parent)!r}.")
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise FileExistsError(f"The output {str(path)!r} exists; choose another path or pass overwrite=True "
                                  "(--overwrite) to replace it.")
        if path.is_dir() != directory:
            raise FileExistsError(
                f"The output {str(path)!r} exists and is a {'directory' if path.is_dir() else 'file'}, not a "
                f"{'directory' if directory else 'file'}; remove it or choose another path."
            )
    return path


@contextlib.contextmanager
def _replacing_file(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; moved onto ``path`` on success, removed on failure."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def writing_dir(path: PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """A new directory beside ``path`` to write a checkpoint into; when the block succeeds it takes the name ``path``
    (an existing ``path``, allowed by ``overwrite``, is removed only then), when it fails it is removed. So an
    interrupted export never leaves a partial checkpoint under the final name."""
    path = check_output(path, directory=True, overwrite=overwrite)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
