"""GSOFT on bitsandbytes-quantized linear layers (QGSOFT): full-precision rotations around a base that stays quantized.

GSOFT multiplies a layer's input (and, for Double GSOFT, its output) by orthogonal matrices, so the quantized weight
itself never changes while training and no dense copy of it is kept: the 4-bit layer's fused op dequantizes it for
each product and drops it (as bitsandbytes' own 4-bit matmul does when it trains), the 8-bit layer runs bitsandbytes'
own int8 forward. The rotations train in the adapter's dtype (fp32) around ``bnb.nn.Linear4bit`` (nf4 / fp4) and
``bnb.nn.Linear8bitLt``.

Merging is the one place that needs the weight itself: it dequantizes, merges in fp32 and quantizes the result again.
Requantizing rounds the merged weight to the quantization grid, so a merged quantized layer is close to, not equal to,
the trained one. Every merge and unmerge records the error it added (:attr:`QuantizedLinear.requantization_errors`)
and :class:`~gsoft.tuner.model.GSOFTModel` reports them in one warning per merge call. For a merged model that equals
the trained one, merge into a full-precision copy of the base instead (load it without quantization).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from .config import GSOFTConfig
from .layer import Linear


@dataclass(frozen=True)
class RequantizationError:
    """What requantizing one merged (or unmerged) weight changed: ``relative`` is ``||Q(M) - M|| / ||M||`` (Frobenius)
    and ``max_abs`` the largest entry of ``|Q(M) - M|``, for ``M`` the exact merged weight and ``Q(M)`` what the layer
    holds after requantizing."""

    layer: str
    adapter: str
    operation: str  # "merge" or "unmerge"
    relative: float
    max_abs: float


class QuantizedLinear(Linear):
    """GSOFT around a bitsandbytes linear layer: the composed forward runs the layer's own forward, merging reads and
    rewrites its weight. Subclasses say how to dequantize and quantize their weight type."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: GSOFTConfig, **kwargs: Any) -> None:
        self.requantization_errors: list[RequantizationError] = []
        super().__init__(base_layer, adapter_name, config, fan_in_fan_out=False, **kwargs)

    def _features(self, base: nn.Module) -> tuple[int, int]:
        return base.in_features, base.out_features  # the packed 4-bit weight's shape is not (out, in)

    def _input_dtype(self, x: torch.Tensor) -> torch.dtype:
        return x.dtype  # bitsandbytes casts to its compute dtype and back itself

    def _base_forward(self, x: torch.Tensor, bias: bool) -> torch.Tensor:
        # bitsandbytes' forward is the only one that reads its packed weight, and it always adds the bias; taking the
        # bias off again (in the output's dtype) keeps every bitsandbytes version's own kernels and CPU/GPU paths.
        base = self.get_base_layer()
        y = base(x)
        if not bias and base.bias is not None:
            y = y - base.bias.to(y.dtype)
        return y

    def _dense_weight(self) -> torch.Tensor:
        return self._dequantize().float()

    def _set_weight_out_in(self, new_out_in: torch.Tensor, adapter: str) -> None:
        # merge() writes before it records the adapter as merged, unmerge() before it forgets it
        operation = "unmerge" if adapter in self.merged_adapters else "merge"
        self._quantize(new_out_in)
        stored = self._dequantize().float()
        target = new_out_in.float()
        diff = stored - target
        self.requantization_errors.append(
            RequantizationError(
                layer=self._layer_name,
                adapter=adapter,
                operation=operation,
                relative=float(diff.norm() / target.norm().clamp_min(torch.finfo(torch.float32).tiny)),
                max_abs=float(diff.abs().max()) if diff.numel() else 0.0,
            )
        )

    def _dequantize(self) -> torch.Tensor:
        raise NotImplementedError

    def _quantize(self, weight: torch.Tensor) -> None:
        raise NotImplementedError


def _bnb() -> Any:
    return sys.modules["bitsandbytes"]


class Linear4bit(QuantizedLinear):
    """GSOFT around ``bitsandbytes.nn.Linear4bit`` (nf4 or fp4, with or without double quantization).

    One adapter trains through the fused op (:class:`gsoft.tuner.fused.AdaptedLinear`), which dequantizes the weight
    for its forward product and again for its backward one, as bitsandbytes' own 4-bit matmul does when it trains:
    the op keeps only the layer's input and output, not the rotated input that a composed forward would keep.
    """

    def _op_dense_weight(self) -> torch.Tensor:
        """The dense weight in bitsandbytes' compute dtype (the dtype its own forward multiplies in)."""
        weight = self._dequantize()
        dtype = self.get_base_layer().compute_dtype
        return weight if dtype is None or weight.dtype == dtype else weight.to(dtype)

    def _dequantize(self) -> torch.Tensor:
        bnb = _bnb()
        base = self.get_base_layer()
        fix = getattr(bnb.nn.modules, "fix_4bit_weight_quant_state_from_module", None)
        if fix is not None:  # the quant state lives on the module after some parameter replacements (FSDP)
            fix(base)
        weight = base.weight
        state = weight.quant_state
        data = weight.data
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes repacks a CPU weight in place for its inference kernel; its own save unpacks it the same way
            data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(data, state)
            weight.data, weight.quant_state = data, state
        return bnb.functional.dequantize_4bit(data, state)

    def _quantize(self, weight: torch.Tensor) -> None:
        bnb = _bnb()
        base = self.get_base_layer()
        old = base.weight
        kwargs = {k: v for k, v in vars(old).items() if not k.startswith("_") and k not in ("data", "quant_state")}
        kwargs.update(requires_grad=False, bnb_quantized=False)
        new = bnb.nn.Params4bit(weight.to("cpu", old.quant_state.dtype).contiguous(), **kwargs)
        base.weight = new.to(old.device)


class Linear8bitLt(QuantizedLinear):
    """GSOFT around ``bitsandbytes.nn.Linear8bitLt`` with int8 weights (``has_fp16_weights=False``, as
    ``load_in_8bit`` loads them). Its forward stays bitsandbytes' int8 matmul (the composed forward): a fused op on
    the dequantized weight would compute a different, unquantized product."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: GSOFTConfig, **kwargs: Any) -> None:
        base = base_layer.get_base_layer() if hasattr(base_layer, "get_base_layer") else base_layer
        if base.weight.has_fp16_weights:
            raise ValueError(
                f"GSOFT adapts Linear8bitLt layers with int8 weights, but '{kwargs.get('layer_name', '')}' keeps fp16 "
                "weights (has_fp16_weights=True), which bitsandbytes trains as a full layer. Load the model with "
                "BitsAndBytesConfig(load_in_8bit=True) (int8 weights) or without quantization."
            )
        super().__init__(base_layer, adapter_name, config, **kwargs)

    def _fused_spec(self, adapter: str, x: torch.Tensor) -> None:
        return None

    def _dequantize(self) -> torch.Tensor:
        bnb = _bnb()
        base = self.get_base_layer()
        scb = base.weight.SCB if base.weight.SCB is not None else base.state.SCB
        return bnb.functional.int8_vectorwise_dequant(base.weight.data, scb.to(base.weight.device))

    def _quantize(self, weight: torch.Tensor) -> None:
        bnb = _bnb()
        base = self.get_base_layer()
        old = base.weight
        base.weight = bnb.nn.Int8Params(weight.to("cpu", torch.float16).contiguous(), requires_grad=False,
                                        has_fp16_weights=False).to(old.device)
        base.state.reset_grads()
        base.state.SCB = base.weight.SCB
        base.state.CB = base.weight.CB


def quantized_layer(target: nn.Module, base: nn.Module, adapter_name: str, config: GSOFTConfig,
                    layer_name: str) -> Optional[QuantizedLinear]:
    """The GSOFT layer for a bitsandbytes base layer, or None when ``base`` is not one. bitsandbytes is looked up,
    never imported: a model holds its layers only once it has been imported."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return None
    if isinstance(base, bnb.nn.Linear4bit):
        return Linear4bit(target, adapter_name, config, layer_name=layer_name)
    if isinstance(base, bnb.nn.Linear8bitLt):
        return Linear8bitLt(target, adapter_name, config, layer_name=layer_name)
    return None


def summarize_requantization(errors: list[RequantizationError]) -> Optional[str]:
    """One warning's text for the requantization errors of a merge call, or None when there were none."""
    if not errors:
        return None
    worst = max(errors, key=lambda e: e.relative)
    relative = sorted(e.relative for e in errors)
    median = relative[len(relative) // 2]
    operations = " and ".join(sorted({e.operation for e in errors}))
    return (
        f"GSOFT {operations} of {len(errors)} quantized weight(s) requantized the result: relative error "
        f"||Q(W) - W|| / ||W|| median {median:.2e}, max {worst.relative:.2e} (layer '{worst.layer}', adapter "
        f"'{worst.adapter}', largest entry error {worst.max_abs:.2e}), where W is the exact result. The layers' "
        "outputs differ from the exact ones by that rounding. For exact merged weights, merge into the base loaded "
        "without quantization; to keep the quantized base as it was, keep the adapter unmerged."
    )
