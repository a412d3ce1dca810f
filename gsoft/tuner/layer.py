"""GSOFT tuner layers: rotate activations while training, merge into the weight for inference.

All GS math comes from :mod:`gsoft.gs`; this module only decides where the rotations go.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from torch import nn

from .. import gs, plan
from . import fused, rotations
from .config import GSOFTConfig


class GSOrthogonal(nn.Module):
    """One orthogonal GS matrix (one side of one layer). Stores only the free skew entries of every block.

    :meth:`rotation` is what layers use: the matrix in its :meth:`form`'s layout, built with every other rotation of
    the model in one batched computation and cached until a parameter changes (:mod:`gsoft.tuner.rotations`).
    :meth:`blocks` builds this one alone (merging, ``torch.compile``).
    """

    def __init__(
        self,
        n: int,
        block_size: int,
        n_factors: int,
        orthogonal_map: gs.OrthogonalMap,
        neumann_terms: int,
        backend: plan.Backend = "auto",
        name: str = "",
    ) -> None:
        super().__init__()
        self.name = name or f"GS rotation n={n} block_size={block_size}"  # for warnings, e.g. 'lin0.gsoft_in.default'
        self.n = n
        self.block_size = block_size
        self.n_blocks = n // block_size
        self.n_factors = n_factors
        self.orthogonal_map = orthogonal_map
        self.neumann_terms = neumann_terms
        self.backend = backend
        self.skew = nn.Parameter(torch.zeros(n_factors, self.n_blocks, gs.n_skew_params(block_size)))
        self._sides: dict[tuple, fused.Side] = {}
        self.build_group: Optional[rotations.BuildGroup] = None  # the model's (GSOFTModel sets it)
        rotations.register(self)

    def form(self, device_type: str) -> plan.Form:
        """How the matrix is built and applied on this device type (:func:`gsoft.plan.matrix_form`)."""
        return plan.matrix_form(self.n_factors, self.n_blocks, self.block_size, device_type)

    def blocks(self) -> torch.Tensor:
        """Orthogonal blocks, shape ``(n_factors, n_blocks, b, b)``, built from the current skew entries."""
        return gs.orthogonal_blocks(self.skew, self.block_size, self.orthogonal_map, self.neumann_terms)

    def rotation(self) -> torch.Tensor:
        """The matrix in its form's layout: block-diagonal blocks ``(k, c, c)`` ("blocks", "groups", "dense"),
        or the factors' blocks ``(m, r, b, b)`` ("factors")."""
        if torch.compiler.is_compiling():  # traced per layer; the compiler fuses the build
            return plan.in_form(self.blocks(), self.form(self.skew.device.type))
        return rotations.rotation(self)

    def side(self, x: torch.Tensor) -> fused.Side:
        """How this rotation multiplies activations like ``x``: resolved once per device and dtype."""
        key = (x.device, x.dtype)
        side = self._sides.get(key)
        if side is None:
            probe = torch.empty(0, device=x.device, dtype=x.dtype)
            backend = plan.resolve_backend(self.backend, probe, self._probe_blocks())
            block_diagonal = plan.block_diagonal(self.form(x.device.type))
            side = self._sides[key] = fused.Side(block_diagonal, backend, self.orthogonal_map != "cayley_neumann")
        return side

    def _probe_blocks(self) -> torch.Tensor:
        """An empty tensor of the blocks' shape for backend checks that look at the shape only."""
        return torch.empty(self.n_factors, self.n_blocks, self.block_size, self.block_size, device="meta")

    def forward(self, x: torch.Tensor, dim: int = -1, transpose: bool = False) -> torch.Tensor:
        """``Q x`` (``Q^T x``) along ``dim``, in ``x``'s dtype (differentiable)."""
        rows, restore = gs.as_rows(x, self.n, dim)
        return restore(fused.rotate_rows(rows, self.rotation(), self.side(x), transpose))

    def extra_repr(self) -> str:
        return (
            f"n={self.n}, block_size={self.block_size}, n_blocks={self.n_blocks}, n_factors={self.n_factors}, "
            f"orthogonal_map={self.orthogonal_map!r}, backend={self.backend!r}"
        )


class GSOFTLayer(BaseTunerLayer):
    """Shared logic of GSOFT layers. Subclasses say where features live and how to run the base op without bias."""

    adapter_layer_names: tuple[str, ...] = ("gsoft_in", "gsoft_out", "gsoft_scale")
    other_param_names: tuple[str, ...] = ("gsoft_settings",)
    # dimension of the feature/channel axis in activations
    feature_dim: int = -1

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.gsoft_in = nn.ModuleDict({})
        self.gsoft_out = nn.ModuleDict({})
        self.gsoft_scale = nn.ParameterDict({})
        self.gsoft_settings: dict[str, dict[str, Any]] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.cast_input_dtype_enabled = True
        self.kwargs = kwargs
        self._layer_name = kwargs.get("layer_name", "") or type(base_layer).__name__
        self._specs: dict[tuple, fused.LinearSpec] = {}  # fused-op descriptions per (adapter, device, dtype)
        self._cols_cache: Optional[tuple] = None  # (key, view of the base weight) for the fused op
        self.in_features, self.out_features = self._features(self.get_base_layer())

    # -- layer-type specifics ------------------------------------------------------------------------------------------
    def _features(self, base: nn.Module) -> tuple[int, int]:
        return _get_in_out_features(base)

    def _weight_out_in(self, weight: torch.Tensor) -> torch.Tensor:
        """The base weight viewed as ``(out, in, ...)``."""
        return weight

    def _base_forward(self, x: torch.Tensor, bias: bool) -> torch.Tensor:
        """The base layer's op on ``x``, with or without its bias (the output rotation and scale come before it)."""
        raise NotImplementedError

    def _input_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype the base op reads: its weight's."""
        return self.get_base_layer().weight.dtype

    def _dense_weight(self) -> torch.Tensor:
        """The base weight as a floating-point ``(out, in, ...)`` tensor, for merging (a view where possible)."""
        return self._weight_out_in(self.get_base_layer().weight.data)

    # -- adapter management --------------------------------------------------------------------------------------------
    def update_layer(
        self, adapter_name: str, config: GSOFTConfig, inference_mode: bool = False, layer_name: str = "", **kwargs: Any
    ) -> None:
        where = f"layer '{layer_name}'" if layer_name else type(self.get_base_layer()).__name__
        self._specs.clear()
        sides = {"in": self.in_features}
        if config.double:
            sides["out"] = self.out_features
        settings: dict[str, Any] = {}
        for side, n in sides.items():
            b, r = gs.resolve_blocks(n, config.block_size, config.n_blocks, where=f"{side}_features={n} of {where}")
            m = gs.resolve_n_factors(config.n_factors, r, b, where=f"{side}_features={n} of {where}")
            name = f"{layer_name or self._layer_name}.gsoft_{side}.{adapter_name}"
            module = GSOrthogonal(n, b, m, config.orthogonal_map, config.neumann_terms, config.backend, name)
            getattr(self, f"gsoft_{side}")[adapter_name] = module
            settings[side] = {"n": n, "block_size": b, "n_factors": m, "dense": gs.is_dense(n, b, m)}
        if config.scaling:
            self.gsoft_scale[adapter_name] = nn.Parameter(torch.ones(self.out_features))
        self.gsoft_settings[adapter_name] = settings
        self.reset_gsoft_parameters(adapter_name, config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def reset_gsoft_parameters(self, adapter_name: str, init_weights: bool) -> None:
        """Identity rotation and unit scale (``init_weights=True``); small random ones otherwise (tests)."""
        with torch.no_grad():
            for table in (self.gsoft_in, self.gsoft_out):
                if adapter_name in table:
                    skew = table[adapter_name].skew
                    skew.zero_() if init_weights else skew.normal_(0.0, 0.1)
            if adapter_name in self.gsoft_scale:
                scale = self.gsoft_scale[adapter_name]
                scale.fill_(1.0) if init_weights else scale.copy_(1.0 + 0.1 * torch.randn_like(scale))

    def set_scale(self, adapter: str, scale: float) -> None:
        if scale != 1:
            warnings.warn("GSOFT is a rotation: scaling an adapter is not supported; keeping scale 1.")

    def scale_layer(self, scale: float) -> None:
        self.set_scale("", scale)

    def unscale_layer(self, scale: Optional[float] = None) -> None:
        return None

    # -- merging -------------------------------------------------------------------------------------------------------
    def _merge_one(self, weight: torch.Tensor, adapter: str, inverse: bool = False) -> torch.Tensor:
        """``s * Q_out W Q_in`` for a weight viewed as ``(out, in, ...)``; ``inverse=True`` undoes it.

        Returns a new tensor and changes nothing; raises a ``ValueError`` when ``inverse=True`` cannot undo the merge.
        """
        rot_in, rot_out = self.gsoft_in[adapter], self.gsoft_out[adapter] if adapter in self.gsoft_out else None
        scale = self.gsoft_scale[adapter] if adapter in self.gsoft_scale else None
        dtype = rot_in.skew.dtype if rot_in.skew.dtype in (torch.float32, torch.float64) else torch.float32
        w = weight.to(dtype)
        shape_s = (-1,) + (1,) * (w.ndim - 1)
        if not inverse:
            w = gs.gs_apply(w, rot_in.blocks().to(dtype), dim=1, transpose=True)  # W Q_in
            if rot_out is not None:
                w = gs.gs_apply(w, rot_out.blocks().to(dtype), dim=0)  # Q_out W
            if scale is not None:
                w = w * scale.to(dtype).view(shape_s)
            return w
        if scale is not None:
            zeros = (scale == 0).nonzero().flatten().tolist()
            if zeros:
                shown = ", ".join(map(str, zeros[:8])) + (", ..." if len(zeros) > 8 else "")
                raise self._unmerge_error(
                    adapter,
                    f"its magnitude vector gsoft_scale is 0 at index {shown}, so merging erased those rows of the base "
                    "weight and they cannot be recovered",
                )
            w = w / scale.to(dtype).view(shape_s)
        # Undo with the true inverse, not the transpose: 'cayley_neumann' blocks are only approximately orthogonal.
        try:
            if rot_out is not None:
                w = gs.gs_apply(w, gs.inverse_transpose_blocks(rot_out.blocks().to(dtype)), dim=0, transpose=True)
            return gs.gs_apply(w, gs.inverse_transpose_blocks(rot_in.blocks().to(dtype)), dim=1)
        except torch.linalg.LinAlgError as exc:
            raise self._unmerge_error(
                adapter,
                f"a rotation block is singular ({exc}); orthogonal_map='cayley_neumann' far outside its range gives such "
                "blocks, and merging with them erased part of the base weight",
            ) from exc

    def _unmerge_error(self, adapter: str, why: str) -> ValueError:
        return ValueError(
            f"Cannot unmerge adapter '{adapter}' from layer '{self._layer_name}': {why}. The layer stays merged (its "
            "output is unchanged). Keep the merged weights (merge_and_unload()), or reload the base model's weights to "
            "get the unadapted layer back."
        )

    def _set_weight_out_in(self, new_out_in: torch.Tensor, adapter: str) -> None:
        """Write a merged (or unmerged) ``(out, in, ...)`` weight into the base layer; ``adapter`` names it."""
        weight = self.get_base_layer().weight
        new = self._weight_out_in(new_out_in)  # the out/in view is its own inverse
        weight.data.copy_(new.to(weight.dtype))

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Fold active (or the given) adapters into the base weight: zero inference overhead.

        Every merge is computed into a new tensor and checked before it is written: NaN or inf in the result raises
        a ``ValueError`` and leaves the weight and ``merged_adapters`` as they were, with or without ``safe_merge``
        (which therefore adds nothing here).
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for adapter in adapter_names:
            if adapter not in self.gsoft_in:
                continue
            with torch.no_grad():
                merged = self._merge_one(self._dense_weight(), adapter)
                if not torch.isfinite(merged).all():
                    raise ValueError(
                        f"NaN or inf in the merged weight of adapter '{adapter}' in layer '{self._layer_name}'; the "
                        "adapter (or the base weight) holds non-finite values. The base weight was left unchanged."
                    )
                self._set_weight_out_in(merged, adapter)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Undo the merges, last first. Each one is written only once it succeeded: a failure raises with this layer
        still merged with the adapters not yet undone (``merged_adapters`` always describes the weight)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            adapter = self.merged_adapters[-1]
            if adapter in self.gsoft_in:
                with torch.no_grad():
                    restored = self._merge_one(self._dense_weight(), adapter, inverse=True)
                    if not torch.isfinite(restored).all():
                        raise self._unmerge_error(
                            adapter,
                            "the unmerged weight would hold NaN or inf (a near-zero entry of the magnitude vector "
                            "gsoft_scale or a near-singular rotation block)",
                        )
                    self._set_weight_out_in(restored, adapter)
            self.merged_adapters.pop()

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The merged weight minus the current base weight (in the base layer's layout, in the dtype of
        :meth:`_dense_weight`), for inspection and export."""
        with torch.no_grad():
            weight = self._dense_weight()
            return self._weight_out_in(self._merge_one(weight, adapter).to(weight.dtype) - weight)

    # -- forward -------------------------------------------------------------------------------------------------------
    def _scale_view(self, s: torch.Tensor, ndim: int) -> torch.Tensor:
        if self.feature_dim in (-1, ndim - 1):
            return s
        shape = [1] * ndim
        shape[self.feature_dim] = -1
        return s.view(shape)

    def _rotate(self, x: torch.Tensor, rotation: GSOrthogonal) -> torch.Tensor:
        """One rotation along the feature dim: the torch path rotates in the adapter's dtype, fused kernels read
        fp16/bf16 activations as they are."""
        if rotation.side(x).backend == "torch":
            x = self._cast_input_dtype(x, rotation.skew.dtype)
        return rotation(x, dim=self.feature_dim)

    def _fused_spec(self, adapter: str, x: torch.Tensor) -> Optional[fused.LinearSpec]:
        """The fused op's description of ``adapter`` on this layer, or None where the fused op does not apply."""
        return None

    def _gsoft_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        adapters = [a for a in self.active_adapters if a in self.gsoft_in and a not in self.merged_adapters]
        if not adapters:
            return self.base_layer(x, *args, **kwargs)
        if len(adapters) == 1 and not torch.compiler.is_compiling():
            spec = self._fused_spec(adapters[0], x)
            if spec is not None:
                return self._fused_forward(adapters[0], x, spec)
        return self._composed_forward(adapters, x)

    def _fused_forward(self, adapter: str, x: torch.Tensor, spec: fused.LinearSpec) -> torch.Tensor:
        base = self.get_base_layer()
        rot_out = self.gsoft_out[adapter].rotation() if adapter in self.gsoft_out else None
        scale = self.gsoft_scale[adapter] if adapter in self.gsoft_scale else None
        rot_in = self.gsoft_in[adapter]
        weight = cols = None  # a quantized base: the op makes its dense weight itself (spec.dense_weight)
        if spec.dense_weight is None:
            weight, cols = base.weight, self._weight_cols(base.weight, rot_in)
        return fused.AdaptedLinear.apply(x, weight, cols, base.bias, scale, rot_in.rotation(), rot_out, spec)

    def _weight_cols(self, weight: torch.Tensor, rotation: GSOrthogonal) -> torch.Tensor:
        """``W^T`` as the fused op's weight rotation reads it (a view, cached while the weight keeps its storage)."""
        key = (weight.data_ptr(), weight.dtype, weight.device, rotation.n_blocks, rotation.block_size)
        cached = self._cols_cache
        if cached is None or cached[0] != key:
            wt = weight if getattr(self, "fan_in_fan_out", False) else weight.t()
            form = rotation.form(weight.device.type)
            if plan.block_diagonal(form):
                k = plan.diagonal_blocks(form, rotation.n_blocks, rotation.block_size)
                wt = wt.view(k, wt.shape[0] // k, wt.shape[1])
            cached = self._cols_cache = (key, wt)
        return cached[1]

    def _composed_forward(self, adapters: list[str], x: torch.Tensor) -> torch.Tensor:
        """Several active adapters, ``torch.compile`` and conv layers: rotations composed with autograd."""
        previous_dtype = x.dtype
        base = self.get_base_layer()
        # Input side in reverse order, so that this forward equals merging the adapters in active order.
        for adapter in reversed(adapters):
            x = self._rotate(x, self.gsoft_in[adapter])
        output_side = any(a in self.gsoft_out or a in self.gsoft_scale for a in adapters)
        y = self._base_forward(self._cast_input_dtype(x, self._input_dtype(x)), bias=not output_side)
        if not output_side:
            return y.to(previous_dtype)
        for adapter in adapters:
            if adapter in self.gsoft_out:
                y = self._rotate(y, self.gsoft_out[adapter])
            if adapter in self.gsoft_scale:
                y = y * self._scale_view(self.gsoft_scale[adapter], y.ndim)
        if base.bias is not None:
            y = y + self._scale_view(base.bias, y.ndim)
        return y.to(previous_dtype)

    def __repr__(self) -> str:
        return "gsoft." + nn.Module.__repr__(self)


class Linear(nn.Module, GSOFTLayer):
    """GSOFT around ``nn.Linear`` or transformers' ``Conv1D`` (``fan_in_fan_out=True``, weight stored ``(in, out)``)."""

    # nn.Module comes first in the MRO (as in PEFT's layers), so point its hooks at the shared implementation
    forward = GSOFTLayer._gsoft_forward
    __repr__ = GSOFTLayer.__repr__
    #: Quantized bases: makes the dense weight for the fused op (:attr:`gsoft.tuner.fused.LinearSpec.dense_weight`)
    _op_dense_weight: Optional[Callable[[], torch.Tensor]] = None

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: GSOFTConfig, fan_in_fan_out: bool = False, **kwargs: Any
    ) -> None:
        super().__init__()
        GSOFTLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = fan_in_fan_out
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, **kwargs)

    def _weight_out_in(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T if self.fan_in_fan_out else weight

    def _fused_spec(self, adapter: str, x: torch.Tensor) -> Optional[fused.LinearSpec]:
        key = (adapter, x.device, x.dtype)
        spec = self._specs.get(key)
        if spec is None:
            out = self.gsoft_out[adapter].side(x) if adapter in self.gsoft_out else None
            spec = fused.LinearSpec(self.gsoft_in[adapter].side(x), out, self.fan_in_fan_out, self._layer_name,
                                    self._op_dense_weight)
            self._specs[key] = spec
        return spec

    def _base_forward(self, x: torch.Tensor, bias: bool) -> torch.Tensor:
        base = self.get_base_layer()
        return F.linear(x, self._weight_out_in(base.weight), base.bias if bias else None)


class Conv2d(nn.Module, GSOFTLayer):
    """GSOFT around ``nn.Conv2d``: rotates channels, which commutes with any kernel, stride, padding and dilation."""

    feature_dim = 1
    forward = GSOFTLayer._gsoft_forward
    __repr__ = GSOFTLayer.__repr__

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: GSOFTConfig, **kwargs: Any) -> None:
        super().__init__()
        if base_layer.groups != 1:
            raise ValueError(
                f"GSOFT cannot adapt a Conv2d with groups={base_layer.groups}: a channel rotation mixes groups and "
                "cannot be merged. Exclude this layer (exclude_modules) or target only Conv2d layers with groups=1."
            )
        GSOFTLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, **kwargs)

    def _features(self, base: nn.Module) -> tuple[int, int]:
        return base.in_channels, base.out_channels

    def _base_forward(self, x: torch.Tensor, bias: bool) -> torch.Tensor:
        base = self.get_base_layer()
        return base._conv_forward(x, base.weight, base.bias if bias else None)
