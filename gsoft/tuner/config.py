"""`GSOFTConfig`: the PEFT config of GSOFT and Double GSOFT."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union, get_args

from peft.config import PeftConfig

from .. import gs, plan
from ..gs import NFactors, OrthogonalMap
from ..plan import Backend
from .peft_type import GSOFTPeftType

#: ``block_size`` when neither it nor ``n_blocks`` is given.
DEFAULT_BLOCK_SIZE = 8

#: The config's bool fields (``inference_mode`` is PEFT's): JSON or YAML strings such as "false" are refused.
BOOL_FIELDS: tuple[str, ...] = ("double", "scaling", "fan_in_fan_out", "init_weights", "inference_mode")

#: Which biases train (PEFT's ``bias`` option).
Bias = Literal["none", "all", "gsoft_only"]
BIASES: tuple[str, ...] = get_args(Bias)


@dataclass
class GSOFTConfig(PeftConfig):
    """Configuration of a GSOFT adapter (Gorbunov et al., NeurIPS 2024).

    Each targeted layer ``y = W x + b`` becomes ``y = s * (W (Q x)) + b`` (GSOFT) or
    ``y = s * (Q_out (W (Q_in x))) + b`` (Double GSOFT, ``double=True``), where ``Q`` are orthogonal
    Group-and-Shuffle matrices and ``s`` a per-output magnitude vector. Give at most one of ``block_size`` and
    ``n_blocks``; with neither, ``block_size`` is :data:`DEFAULT_BLOCK_SIZE`, as PEFT's OFT has a default block size.
    Every field is documented in ``metadata["help"]`` and in docs/method.md's config reference. The fields are checked
    here, with the rules of their owners (:mod:`gsoft.gs` for sizes and maps, :mod:`gsoft.plan` for backends); the
    per-layer rules (a block size dividing the layer's width) are checked when the layers are built.
    """

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Module names (exact or suffix match) or one regex (full match) of the layers to adapt. "
            "'all-linear' adapts every linear layer except the output head. None uses the default for known "
            "architectures (BERT/RoBERTa, GPT-2, Llama-style, CLIP text, diffusers UNet attention)."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Module names or regex of layers never to adapt, even if they match `target_modules`."},
    )
    block_size: Optional[int] = field(
        default=None,
        metadata={
            "help": "Size b of the orthogonal blocks; must divide every adapted dimension (in_features, and "
            "out_features when double=True). At most one of block_size / n_blocks; with neither, block_size=8 "
            "(the paper's GLUE setting; divides the widths of BERT/RoBERTa, GPT-2, Llama-style models and SD UNets)."
        },
    )
    n_blocks: Optional[int] = field(
        default=None,
        metadata={
            "help": "Number r of blocks per factor; block_size = dimension / n_blocks per layer. "
            "At most one of block_size / n_blocks."
        },
    )
    n_factors: NFactors = field(
        default=2,
        metadata={
            "help": "Block-diagonal factors per GS matrix: 1 = OFT's block-diagonal rotation, 2 = the paper's GS "
            "matrix P^T L P R, more = the multi-factor GS class; 'auto' = the fewest that give a dense matrix, "
            "1 + ceil(log_b r). A non-dense choice is allowed and reported once in the log."
        },
    )
    double: bool = field(
        default=False,
        metadata={"help": "Double GSOFT: also rotate the output side, y = s * Q_out W Q_in x + b."},
    )
    scaling: bool = field(
        default=True,
        metadata={
            "help": "Learn the per-output magnitude vector s (initialised to ones). False gives a pure rotation, "
            "which keeps the singular values of W exactly."
        },
    )
    orthogonal_map: OrthogonalMap = field(
        default="cayley",
        metadata={
            "help": "Skew-symmetric -> orthogonal map per block: 'cayley' (exact, batched solve), 'cayley_neumann' "
            "(approximate truncated Neumann series, accurate for small rotations), 'exp' (matrix exponential)."
        },
    )
    neumann_terms: int = field(
        default=5,
        metadata={"help": "Number of Neumann-series terms for orthogonal_map='cayley_neumann' (ignored otherwise)."},
    )
    backend: Backend = field(
        default="auto",
        metadata={
            "help": "Who multiplies activations by the rotations in the backward (and in the forward for batches "
            "with fewer rows than output features; otherwise the forward folds the rotation into the weight): "
            "'torch' (batched matmuls), 'triton' (fused Triton kernels; a CUDA GPU, or TRITON_INTERPRET=1 on a CPU "
            "for tests), 'cuda' (optional CUDA extension, compiled on first use, one-pass shapes only), 'auto' = "
            "gsoft.plan.AUTO_RULE: 'torch' on every device, the fastest end to end where measured (docs/kernels.md). "
            "An explicit backend that cannot run raises an error saying why. Merging always uses 'torch'. Adapter "
            "configs saved without this field load as 'auto'."
        },
    )
    fan_in_fan_out: bool = field(
        default=False,
        metadata={
            "help": "True for layers storing the weight as (in, out), such as GPT-2's transformers Conv1D. It is "
            "set automatically for Conv1D layers."
        },
    )
    bias: Bias = field(
        default="none",
        metadata={
            "help": "Which biases train: 'none', 'all' (every bias of the model) or 'gsoft_only' (biases of adapted "
            "layers). Trained biases are saved with the adapter; disabling the adapter does not undo them."
        },
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "Modules besides the adapted layers to train fully and save with the adapter, e.g. a new "
            "classification head ('classifier', 'score')."
        },
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None,
        metadata={
            "help": "Only adapt layers with these indices in the layer list (see layers_pattern). Needs "
            "target_modules as a list of names (or None, the architecture's default names); a regex string, "
            "'all-linear' included, is refused, as in PEFT's LoRA."
        },
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Name of the nn.ModuleList holding the layers that layers_to_transform indexes, e.g. 'layer' "
            "or 'h'. Only used with layers_to_transform."
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True: Q = I and s = 1, so the adapted model equals the base model at the start. False: random "
            "small rotations and scales (for tests only)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = GSOFTPeftType.GSOFT
        for name in BOOL_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r} ({type(value).__name__}).")
        for name in ("target_modules", "exclude_modules"):
            _check_module_names(name, getattr(self, name))
        _check_layers(self.layers_to_transform, self.layers_pattern)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError(
                f"`layers_to_transform` cannot be combined with a regex `target_modules` or 'all-linear' (got "
                f"{self.target_modules!r}): PEFT applies layers_to_transform to module names matched by suffix only, "
                "as LoRA does. Give target_modules as a list of "
                "names (e.g. ['query', 'value']) or leave it None for the architecture's default names, or put the "
                "layer indices into the regex and drop layers_to_transform."
            )
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = set(self.exclude_modules)
        if self.block_size is None and self.n_blocks is None:
            self.block_size = DEFAULT_BLOCK_SIZE
        gs.check_sizes(self.block_size, self.n_blocks)
        gs.check_n_factors(self.n_factors)
        gs.check_orthogonal_map(self.orthogonal_map, self.neumann_terms)
        plan.check_backend(self.backend)
        if self.bias not in BIASES:
            raise ValueError(f"bias must be one of {BIASES}, got {self.bias!r}.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("`layers_pattern` only works together with `layers_to_transform`; set both.")


def _check_module_names(name: str, value: object) -> None:
    """``target_modules`` / ``exclude_modules``: None, one regex string, or a list (set, tuple) of names."""
    if value is None or isinstance(value, str):
        return
    if isinstance(value, (list, set, tuple)) and all(isinstance(v, str) for v in value):
        return
    raise ValueError(
        f"{name} must be a list of module names or one regex string, got {value!r} ({type(value).__name__}); e.g. "
        "['query', 'value'] or r'.*\\.attention\\..*'."
    )


def _check_layers(layers_to_transform: object, layers_pattern: object) -> None:
    """``layers_to_transform``: None, an int >= 0 or a list of them; ``layers_pattern``: None, a name or a list of
    names, and only together with ``layers_to_transform``."""

    def is_index(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if layers_to_transform is not None and not (
        is_index(layers_to_transform)
        or (isinstance(layers_to_transform, list) and all(is_index(v) for v in layers_to_transform))
    ):
        raise ValueError(
            f"layers_to_transform must be an int >= 0 or a list of them (indices into the layer list), got "
            f"{layers_to_transform!r}."
        )
    if layers_pattern is not None and not (
        isinstance(layers_pattern, str)
        or (isinstance(layers_pattern, list) and all(isinstance(v, str) for v in layers_pattern))
    ):
        raise ValueError(
            f"layers_pattern must be the name (or a list of names) of the layer list, e.g. 'layer' or 'h', got "
            f"{layers_pattern!r}."
        )
