"""Fused kernels of the GS multiply, shipped as ``gsoft.kernels`` (sources: the repository's top-level ``kernels/``).

* ``triton_gs``: the Triton kernels (a block-diagonal pass with the perfect shuffles folded into its indexing, and
  its block gradient), with tiles picked by a heuristic per shape (``GSOFT_TRITON_AUTOTUNE=1``: timed instead);
* ``gs_grouped.cu`` + ``cuda_ext``: the optional CUDA extension (one-pass multiply and its backward), compiled with
  ``torch.utils.cpp_extension.load`` the first time ``backend="cuda"`` runs;
* ``ops``: the ``torch.ops.gsoft.gs_multiply`` custom op with autograd, ``torch.compile`` and checkpointing support;
* ``schedule``: the plans and passes of a GS matrix (pure shape rules); ``availability``: why a backend cannot run.

Imports between these modules go one way (``ops`` -> ``triton_gs`` / ``cuda_ext`` -> ``availability`` ->
``schedule`` -> :mod:`gsoft.gs`). Callers: :func:`gsoft.gs_apply` (``backend="triton"`` or ``"cuda"``) runs whole GS
matrices through ``ops``; the GSOFT layers' fused op (:mod:`gsoft.tuner.fused`) runs single block-diagonal passes
through :func:`ops.backend_module`. Nothing is compiled or tuned at import time. This file must stay free of imports:
from a checkout's root the directory is also reachable as a top-level ``kernels`` module, which transformers imports
while probing for the unrelated Hub ``kernels`` package.
"""
