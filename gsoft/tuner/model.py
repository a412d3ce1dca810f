"""`GSOFTModel`: injects GSOFT layers into a model, PEFT-style."""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Any, Iterator, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from . import rotations
from .config import GSOFTConfig
from .layer import Conv2d, GSOFTLayer, GSOrthogonal, Linear
from .peft_type import PREFIX
from .quantized import QuantizedLinear, quantized_layer, summarize_requantization

logger = logging.getLogger("gsoft")

#: The attention and MLP projections of every encoder layer of BERT-style models (``encoder.layer.<i>.<name>``).
_BERT_LAYER = ["attention.output.dense", "intermediate.dense", "output.dense"]
_ROBERTA_LIKE = ["attention.self.query", "attention.self.key", "attention.self.value", *_BERT_LAYER]
_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_DIFFUSERS_UNET = ["to_q", "to_k", "to_v", "to_out.0"]

#: Default target modules per ``config.model_type`` (transformers) or ``config._class_name`` (diffusers): every
#: attention and MLP projection, as in the paper's GLUE setup; the attention projections of diffusers UNets, as in its
#: DreamBooth setup. Each is a list of module names (suffix match), never a regex, so that ``layers_to_transform``
#: applies to the defaults too (PEFT ignores it for a regex).
TARGET_MODULES_MAPPING: dict[str, list[str]] = {
    "bert": _ROBERTA_LIKE,
    "roberta": _ROBERTA_LIKE,
    "xlm-roberta": _ROBERTA_LIKE,
    "deberta-v2": ["attention.self.query_proj", "attention.self.key_proj", "attention.self.value_proj", *_BERT_LAYER],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "clip_text_model": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "clip": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "UNet2DConditionModel": _DIFFUSERS_UNET,
    "UNet2DModel": _DIFFUSERS_UNET,
    "SD3Transformer2DModel": _DIFFUSERS_UNET,
    "FluxTransformer2DModel": _DIFFUSERS_UNET,
}


#: The "not dense" notices already logged in this process.
_REPORTED_SPARSE: set[str] = set()


def _conv1d_cls() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


class GSOFTModel(BaseTuner):
    """Creates a GSOFT / Double GSOFT model from a pretrained model (use through ``peft.get_peft_model``).

    Example::

        import gsoft
        from peft import get_peft_model
        model = get_peft_model(base, gsoft.GSOFTConfig(block_size=32, target_modules=["query", "value"]))
    """

    prefix: str = PREFIX
    tuner_layer_cls = GSOFTLayer
    target_module_mapping = TARGET_MODULES_MAPPING

    def _prepare_adapter_config(self, peft_config: GSOFTConfig, model_config: dict) -> GSOFTConfig:
        if peft_config.target_modules is None:
            key = model_config.get("model_type") or model_config.get("_class_name")
            target_modules = self.target_module_mapping.get(key)
            if target_modules is None:
                raise ValueError(
                    f"No default target_modules for model type {key!r}; set `target_modules` in GSOFTConfig "
                    f"(e.g. ['q_proj', 'v_proj'] or 'all-linear'). Known types: {sorted(self.target_module_mapping)}."
                )
            peft_config.target_modules = target_modules if isinstance(target_modules, str) else set(target_modules)
        return peft_config

    @staticmethod
    def get_model_config(model: nn.Module) -> dict:
        config = BaseTuner.get_model_config(model)
        model_config = getattr(model, "config", None)
        if "model_type" not in config and model_config is not None and hasattr(model_config, "get"):
            # diffusers models keep a FrozenDict config that names the class instead of a model_type; it only has
            # `_class_name` when loaded with from_pretrained, not when built from a config, so fall back to the class
            config = dict(config, _class_name=model_config.get("_class_name") or type(model).__name__)
        return config

    def _create_and_replace(
        self,
        gsoft_config: GSOFTConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if current_key is None:
            raise ValueError("Current key shouldn't be `None`.")
        if isinstance(target, GSOFTLayer):
            target.update_layer(adapter_name, gsoft_config, layer_name=current_key)
            return
        new_module = self._create_new_module(gsoft_config, adapter_name, target, layer_name=current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added, inactive adapter is not trainable
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(
        gsoft_config: GSOFTConfig, adapter_name: str, target: nn.Module, layer_name: str = ""
    ) -> GSOFTLayer:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        quantized = quantized_layer(target, base, adapter_name, gsoft_config, layer_name)
        if quantized is not None:  # bitsandbytes' layers subclass nn.Linear: checked first
            return quantized
        conv1d = _conv1d_cls()
        if isinstance(base, nn.Linear):
            if gsoft_config.fan_in_fan_out:
                logger.warning("fan_in_fan_out=True but '%s' is an nn.Linear; using fan_in_fan_out=False.", layer_name)
            return Linear(target, adapter_name, gsoft_config, fan_in_fan_out=False, layer_name=layer_name)
        if conv1d is not None and isinstance(base, conv1d):
            return Linear(target, adapter_name, gsoft_config, fan_in_fan_out=True, layer_name=layer_name)
        if isinstance(base, nn.Conv2d):
            return Conv2d(target, adapter_name, gsoft_config, layer_name=layer_name)
        raise TypeError(
            f"Target module '{layer_name}' is a {type(base).__name__}, which GSOFT does not support. Supported: "
            "torch.nn.Linear, torch.nn.Conv2d, transformers' Conv1D and bitsandbytes' Linear4bit and Linear8bitLt "
            "(int8 weights). Narrow `target_modules` (or add this "
            "name to `exclude_modules`)."
        )

    @contextlib.contextmanager
    def _reporting_requantization(self) -> Iterator[None]:
        """Warn once, after a merge call, with the error that requantizing merged quantized weights added."""
        layers = [m for m in self.model.modules() if isinstance(m, QuantizedLinear)]
        for layer in layers:
            layer.requantization_errors.clear()
        try:
            yield
        finally:
            text = summarize_requantization([e for layer in layers for e in layer.requantization_errors])
            if text is not None:
                warnings.warn(text, stacklevel=4)

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        with self._reporting_requantization():
            super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        with self._reporting_requantization():
            super().unmerge_adapter()

    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False,
                                     adapter_names: Optional[list[str]] = None) -> nn.Module:
        with self._reporting_requantization():
            return super()._unload_and_optionally_merge(
                merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
            )

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # PEFT's base version copies `child.weight` onto unloaded modules, which breaks merge_and_unload for
        # modules_to_save without a weight of their own (e.g. RobertaClassificationHead); LoRA overrides it too.
        unwrapped = child.base_layer if hasattr(child, "base_layer") else child
        if not hasattr(new_module, "base_layer") and "weight" not in dict(unwrapped.named_parameters(recurse=False)):
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: GSOFTConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Check the GSOFT tensors of an adapter before PEFT's ``load_state_dict``, which would cast any dtype, drop
        keys the model has no place for and copy NaN. The hook of every PEFT load path (``PeftModel.from_pretrained``,
        ``load_adapter``, ``set_peft_model_state_dict``); it raises before anything is loaded."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        own = model.state_dict()
        for key, value in remapped.items():
            part = next((p for p in key.split(".") if p in GSOFTLayer.adapter_layer_names), None)
            if part is None:
                continue
            name = cls._remove_adapter_name_from_key(key, adapter_name) if key in own else key  # as in the file
            if key not in own:
                raise ValueError(
                    f"The GSOFT adapter has '{name}', which this model has no place for: {_why_no_place(part, config)}. "
                    "Loading it would silently drop a trained tensor. Fix adapter_config.json (or the GSOFTConfig) "
                    "to match the adapter file, or use the file that matches the config."
                )
            if not value.is_floating_point():
                raise ValueError(
                    f"The GSOFT adapter's '{name}' has dtype {value.dtype}; GSOFT tensors are floating point (float32, "
                    "bfloat16, float16 or float64). The file is corrupt or not a GSOFT adapter; re-save it from the "
                    "trained model."
                )
            if own[key].shape != value.shape:
                what = (
                    "(n_factors, n_blocks, block_size*(block_size-1)/2)"
                    if key.endswith(".skew")
                    else "(out_features,)"
                )
                raise ValueError(
                    f"The GSOFT adapter does not fit this model: '{name}' has shape {tuple(value.shape)} in the adapter "
                    f"file but {tuple(own[key].shape)} here, both {what}. The adapter was trained for other layer "
                    "sizes or with another block_size / n_blocks / n_factors; load it into the model it was trained "
                    "on, or make sure its adapter_config.json matches the file."
                )
            if not torch.isfinite(value).all():
                raise ValueError(
                    f"The GSOFT adapter's '{name}' holds NaN or inf: the training that wrote it diverged, or the file "
                    "is corrupt. Use an earlier checkpoint (or retrain with a lower learning rate)."
                )
        return remapped

    def _post_injection_hook(self, model: nn.Module, config: GSOFTConfig, adapter_name: str) -> None:
        """Put the model's rotations in one build group (:func:`gsoft.tuner.rotations.join`), and report the layer sizes
        whose GS matrices are not dense, once per process for each set of sizes."""
        rotations.join([m for m in model.modules() if isinstance(m, GSOrthogonal)])
        sparse: dict[str, int] = {}
        for module in model.modules():
            if isinstance(module, GSOFTLayer) and adapter_name in module.gsoft_settings:
                for side in module.gsoft_settings[adapter_name].values():
                    if not side["dense"]:
                        key = f"n={side['n']}, block_size={side['block_size']}, n_factors={side['n_factors']}"
                        sparse[key] = sparse.get(key, 0) + 1
        listing = "; ".join(f"{k} ({v} matrices)" for k, v in sparse.items())
        if sparse and listing not in _REPORTED_SPARSE:
            _REPORTED_SPARSE.add(listing)  # once per process: loading the same adapter again says nothing new
            logger.warning(
                "GSOFT adapter '%s': some GS matrices are not dense (they rotate within groups of features only): %s. "
                "This is allowed; n_factors='auto' or a larger block_size makes them dense.",
                adapter_name,
                listing,
            )


def _why_no_place(part: str, config: GSOFTConfig) -> str:
    """Why a GSOFT tensor of an adapter file has no parameter in the model, in terms of the config's fields."""
    if part == "gsoft_scale" and not config.scaling:
        return "the config has scaling=False, so no layer has a magnitude vector gsoft_scale"
    if part == "gsoft_out" and not config.double:
        return "the config has double=False, so no layer has an output rotation gsoft_out"
    return (
        "the layer is not adapted under this config (target_modules, exclude_modules, layers_to_transform) or does "
        "not exist in this model"
    )


def count_trainable_parameters(model: nn.Module) -> int:
    """Trainable parameters of a (PEFT-wrapped) model."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


