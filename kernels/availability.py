"""The fused backends, and why one cannot run on given tensors (None when it can). Imports neither Triton nor the
extension, and from ``gsoft.kernels`` only the shape rules of :mod:`.schedule` (``cuda_ext`` and ``ops`` import this
module; :mod:`gsoft.plan` too, at import time)."""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Literal, Optional, get_args

import torch

from .schedule import cuda_unsupported_reason

#: The fused backends: the Triton kernels (``triton_gs``) and the CUDA extension (``cuda_ext``).
FusedBackend = Literal["triton", "cuda"]
FUSED_BACKENDS: tuple[str, ...] = get_args(FusedBackend)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


_TRITON_INSTALLED: Optional[bool] = None


def triton_installed() -> bool:
    """Cached in a global rather than with functools.lru_cache, which torch.compile warns about."""
    global _TRITON_INSTALLED
    if _TRITON_INSTALLED is None:
        _TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
    return _TRITON_INSTALLED


def interpreter_enabled() -> bool:
    """Whether the Triton kernels run on Triton's CPU interpreter: decided when they are first imported, from
    ``TRITON_INTERPRET``."""
    module = sys.modules.get(f"{__package__}.triton_gs")
    if module is not None:
        return module.INTERPRETED
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _dtype_reason(x: torch.Tensor) -> Optional[str]:
    if x.dtype not in SUPPORTED_DTYPES:
        return f"activations of dtype {x.dtype} are not supported (fp16, bf16, fp32 or fp64)"
    return None


def triton_unavailable_reason(x: torch.Tensor) -> Optional[str]:
    if not triton_installed():
        return "Triton is not installed (pip install 'gsoft[kernels]', or triton)"
    if x.device.type != "cuda" and not (x.device.type == "cpu" and interpreter_enabled()):
        module = sys.modules.get(f"{__package__}.triton_gs")
        if module is not None and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            return (
                "the Triton kernels were already compiled for the GPU when TRITON_INTERPRET=1 was set; set it "
                "before their first use"
            )
        return (
            f"tensors are on {x.device.type!r}: the Triton kernels need a CUDA GPU (on a CPU only under "
            "TRITON_INTERPRET=1, Triton's slow interpreter, for tests)"
        )
    return _dtype_reason(x)


def cuda_unavailable_reason(x: torch.Tensor, blocks: Optional[torch.Tensor] = None) -> Optional[str]:
    if x.device.type != "cuda":
        return f"tensors are on {x.device.type!r}: the CUDA extension needs CUDA tensors"
    if torch.version.cuda is None:
        return "this PyTorch build has no CUDA support"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return "no CUDA toolkit (nvcc) found to build the extension; set CUDA_HOME"
    if blocks is not None:
        reason = cuda_unsupported_reason(blocks)
        if reason:
            return reason
    return _dtype_reason(x)


def check_fused_backend(backend: str) -> None:
    """``backend`` is one of :data:`FUSED_BACKENDS`."""
    if backend not in FUSED_BACKENDS:
        raise ValueError(f"Unknown fused GS backend {backend!r}; choose one of {FUSED_BACKENDS}.")


def unavailable_reason(backend: str, x: torch.Tensor, blocks: Optional[torch.Tensor] = None) -> Optional[str]:
    """Why ``backend`` (one of :data:`FUSED_BACKENDS`) cannot multiply ``x`` by ``blocks`` here, or None if it can."""
    check_fused_backend(backend)
    if backend == "triton":
        return triton_unavailable_reason(x)
    return cuda_unavailable_reason(x, blocks)
