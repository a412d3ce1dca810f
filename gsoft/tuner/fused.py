"""One autograd op per adapted linear layer: ``y = s * (Q_out W Q_in x) + bias``.

Why one op: on a GPU the step of a small adapter is bound by the host (kernel launches and dispatcher work), so
the layer's few matrix products must not come with a hundred small ops. The op computes:

* **forward**: the rotation folded into the frozen weight, ``W_eff^T = Q_in^T W^T Q_out^T diag(s)`` (a batched
  matmul over the weight: ``out x in x c`` flops, a few percent of the layer's GEMM at training batch sizes), then one
  ``addmm``. With fewer rows than output features (small-batch inference) rotating the activations is cheaper, and
  the op rotates ``x`` instead. Both compute the same function.
* **backward** from the layer input ``x`` and output ``y`` only: ``v = (Q_out^T (s * g)) W`` is the one GEMM
  (LoRA's backward has it too), ``dx = Q_in^T v`` and the block gradient ``sum_rows v x^T`` are two block-diagonal
  multiplies, and ``z = (y - bias) / s`` (the pre-scale output) gives ``ds = sum_rows g * z``. Saving ``y`` costs no
  memory where the next op keeps it anyway (attention, activations); saving the rotated input or ``z`` would.

Like ``torch.sigmoid``, the op needs its output in the backward: an in-place op on ``y`` (``ReLU(inplace=True)``)
makes the backward raise an error that says so. The rotations come from :mod:`gsoft.tuner.rotations` (built once per
parameter update for all layers). Block-diagonal rotations (:func:`gsoft.plan.block_diagonal`) run through batched
matmuls (:func:`gsoft.gs.block_diag_apply`) or, with the Triton / CUDA backends, the fused kernels; general GS
matrices (form ``"factors"``) through :func:`gsoft.plan.gs_apply`.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from .. import gs, plan
from ..kernels.schedule import Pass


class Side(NamedTuple):
    """What the op needs to know about one rotation besides its tensor."""

    block_diagonal: bool  # one block-diagonal multiply (gsoft.plan.block_diagonal), else one pass per factor
    backend: str  # "torch" | "triton" | "cuda", resolved for this layer, device and dtype
    exact_inverse: bool  # Q^{-1} = Q^T (Cayley, exp); False for the approximate Cayley-Neumann map


class LinearSpec(NamedTuple):
    in_side: Side
    out_side: Optional[Side]
    fan_in_fan_out: bool  # weight stored (in, out) (transformers' Conv1D)
    name: str  # for messages
    # A quantized base weight: makes the dense ``(out, in)`` weight for one product and is called again in the
    # backward, so the op keeps no dense copy between them (the op then takes ``weight = weight_cols = None``).
    dense_weight: Optional[Callable[[], torch.Tensor]] = None


# ----------------------------------------------------------------------------------------------------------------------
# Rotations of rows (activations), per plan and backend
# ----------------------------------------------------------------------------------------------------------------------
def rotate_rows(x: torch.Tensor, rot: torch.Tensor, side: Side, transpose: bool = False) -> torch.Tensor:
    """``Q x`` (``Q^T x``) for the rows of ``x`` ``(N, n)``, in ``x``'s dtype."""
    if not side.block_diagonal:
        if side.backend == "torch":
            return gs.gs_apply(x, rot.to(x.dtype), transpose=transpose)
        return plan.gs_apply(x, rot, transpose=transpose, backend=side.backend)
    if side.backend == "torch":
        return gs.block_diag_apply(x, rot.to(x.dtype), transpose)
    return _kernels(side.backend).block_multiply(x, rot.unsqueeze(0), Pass(0, transpose, 0, 0), 1, 1)


def kernel_rows_grad(grad: torch.Tensor, x: torch.Tensor, rot: torch.Tensor, side: Side) -> torch.Tensor:
    """Gradient (float32) of the block-diagonal rotation of ``y = Q x`` (rows), given ``grad = dL/dy``, by a fused
    kernel. The torch path computes it in the op's batched layout (:func:`gsoft.gs.block_diag_grad_split`)."""
    return _kernels(side.backend).block_grad(grad, x, rot.unsqueeze(0), Pass(0, False, 0, 0), 1, 1)


def _kernels(backend: str):
    """The fused backend's module, imported on first use (:func:`gsoft.kernels.ops.backend_module`)."""
    from ..kernels.ops import backend_module

    return backend_module(backend)


def _factors_vjp(x: torch.Tensor, rot: torch.Tensor, grad: torch.Tensor, side: Side, need_x: bool, transpose=False):
    """``(dx, drot)`` of ``y = Q x`` for a general GS matrix, by autograd over the reference (it re-runs the passes
    whose intermediate activations the block gradients need)."""
    with torch.enable_grad():
        xr = x.detach().requires_grad_(need_x)
        rr = rot.detach().requires_grad_()
        y = rotate_rows(xr, rr, side, transpose)
        inputs = (xr, rr) if need_x else (rr,)
        grads = torch.autograd.grad(y, inputs, grad)
    return (grads[0], grads[1]) if need_x else (None, grads[0])


def _inverse_rows(z: torch.Tensor, rot: torch.Tensor, side: Side) -> torch.Tensor:
    """``Q^{-1} z`` for the rows of ``z``: ``Q^T z``, or the true inverse for approximate maps."""
    if side.exact_inverse:
        return rotate_rows(z, rot, side, transpose=True)
    inverse_t = gs.inverse_transpose_blocks(rot).to(z.dtype)
    if not side.block_diagonal:
        return gs.gs_apply(z, inverse_t, transpose=True)
    return gs.block_diag_apply(z, inverse_t, transpose=True)


# ----------------------------------------------------------------------------------------------------------------------
# The op
# ----------------------------------------------------------------------------------------------------------------------
def compute_dtypes(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """``(GEMM dtype, output dtype)``: under autocast both are the autocast dtype (as for ``nn.Linear``); otherwise
    the GEMM runs in the weight's dtype (``x`` is cast to it) and the output has ``x``'s dtype."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.is_floating_point():
        dtype = torch.get_autocast_dtype(device)
        return dtype, dtype
    return weight.dtype, x.dtype


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def adapted_weight_t(
    weight: torch.Tensor,
    weight_cols: torch.Tensor,
    rot_in: torch.Tensor,
    rot_out: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    spec: LinearSpec,
) -> torch.Tensor:
    """``W_eff^T = Q_in^T W^T Q_out^T diag(s)``, shape ``(in, out)``, in the weight's dtype (no grad).

    ``weight_cols`` is ``W^T`` as the input rotation's form wants it: ``(k, c, out)`` when block-diagonal (one batched
    matmul, no copy), ``(in, out)`` for "factors". With an output rotation, ``Q_out W`` comes first (block-diagonal:
    one batched matmul over ``W``'s rows, again without a copy). Rotations and scale are cast to the weight's dtype.
    """
    dtype = weight.dtype
    if rot_out is not None:
        w = weight.t() if spec.fan_in_fan_out else weight  # (out, in)
        rot = _cast(rot_out, dtype)
        if spec.out_side.block_diagonal:
            w = torch.bmm(rot, w.view(rot.shape[0], rot.shape[1], -1)).view(w.shape)
        else:
            w = gs.gs_apply(w, rot, dim=0)
        weight_cols = w.t()
        if spec.in_side.block_diagonal:
            weight_cols = weight_cols.view(rot_in.shape[0], rot_in.shape[1], -1)
    if spec.in_side.block_diagonal:
        a = torch.bmm(_cast(rot_in, dtype).transpose(1, 2), weight_cols).view(-1, weight_cols.shape[-1])
    else:
        a = gs.gs_apply(weight_cols, _cast(rot_in, dtype), dim=0, transpose=True)
    if scale is not None:
        a = a * _cast(scale, dtype)
    return a


#: ``aten._unsafe_view``: a reshape whose result autograd does not treat as a view of a custom Function's
#: intermediate, so that in-place ops on the layer's output (dropout, residual adds) stay allowed.
_UNSAFE_VIEW = torch.ops.aten._unsafe_view.default


class AdaptedLinear(torch.autograd.Function):
    """``y = s * (Q_out W Q_in x) + bias`` for one adapter; see the module docstring.

    Under autocast every product runs in the autocast dtype on operands cast once in the forward (the weight, the
    input, the rotation); the backward reuses those casts, as ``nn.Linear``'s backward reuses autocast's.
    """

    @staticmethod
    def forward(ctx, x, weight, weight_cols, bias, scale, rot_in, rot_out, spec: LinearSpec):
        quantized = spec.dense_weight is not None
        if quantized:
            weight = spec.dense_weight()
            wt = weight.t()
            weight_cols = wt.view(rot_in.shape[0], -1, wt.shape[1]) if spec.in_side.block_diagonal else wt
        cdtype, out_dtype = compute_dtypes(x, weight)
        out_features = weight_cols.shape[-1]
        # every operand in the GEMM dtype, once (no-ops without autocast); the backward reuses these casts
        x2 = _cast(x.reshape(-1, x.shape[-1]), cdtype)
        weight_c = _cast(weight, cdtype)
        cols = weight_cols if weight_c is weight else _cast(weight_cols, cdtype)
        # the fused kernels read float32 blocks with any activations; the torch path multiplies in one dtype
        rot_c = _cast(rot_in, cdtype) if spec.in_side.backend == "torch" else rot_in
        rot_out_c = rot_out if rot_out is None or spec.out_side.backend != "torch" else _cast(rot_out, cdtype)
        scale_c = None if scale is None else _cast(scale, cdtype)
        bias_c = None if bias is None else _cast(bias, cdtype)
        if x2.shape[0] >= out_features:
            w_t = adapted_weight_t(weight_c, cols, rot_c, rot_out_c, scale_c, spec)
            y2 = torch.mm(x2, w_t) if bias is None else torch.addmm(bias_c, x2, w_t)
        else:
            y2 = _activation_forward(x2, weight_c, bias_c, scale_c, rot_c, rot_out_c, spec)
        y = _cast(_UNSAFE_VIEW(y2, (*x.shape[:-1], out_features)), out_dtype)
        ctx.spec, ctx.cdtype, ctx.x_meta = spec, cdtype, (x.shape, x.dtype)
        ctx.param_dtypes = (rot_in.dtype, None if rot_out is None else rot_out.dtype, None if bias is None else bias.dtype)
        needs_y = scale is not None and ctx.needs_input_grad[4] or rot_out is not None
        ctx.save_for_backward(x2, None if quantized else weight_c, bias_c, scale, scale_c, rot_c, rot_out_c,
                              y if needs_y else None)
        return y

    @staticmethod
    def backward(ctx, grad):
        try:
            saved = ctx.saved_tensors
        except RuntimeError as exc:
            if "modified by an inplace operation" not in str(exc):
                raise
            raise RuntimeError(
                f"GSOFT layer '{ctx.spec.name}': its input or output was modified in place after the forward (for "
                "example by an in-place activation such as ReLU(inplace=True)); the backward needs both (the output "
                "for the magnitude vector's gradient, as torch.sigmoid needs its output). Make that op out-of-place."
            ) from exc
        return _backward(ctx, grad, *saved)


def _backward(ctx, grad, x2, weight, bias, scale, scale_c, rot_in, rot_out, y):
    """The gradients of :class:`AdaptedLinear` from its input rows ``x2`` and output ``y`` (see the module doc); every
    saved operand is already in the GEMM dtype, except ``scale`` (the parameter, for its own gradient)."""
    spec: LinearSpec = ctx.spec
    cdtype = ctx.cdtype
    in_dtype, out_dtype, bias_dtype = ctx.param_dtypes
    need_x, _, _, need_bias, need_scale, need_in, need_out, _ = ctx.needs_input_grad
    rows = x2.shape[0]
    g2 = grad.reshape(rows, grad.shape[-1])
    if g2.dtype != cdtype:
        g2 = g2.to(cdtype)
    grad_scale = grad_bias = grad_out = grad_x = grad_in = None
    w = g2 if scale is None else g2 * scale_c
    acc = torch.float64 if cdtype == torch.float64 else torch.float32  # sums over rows in at least float32
    if need_scale or rot_out is not None:
        z = y if bias is None else y - _cast(bias, y.dtype)  # s * (Q_out W Q_in x)
        if need_scale:
            grad_scale = (grad * z).sum(tuple(range(grad.ndim - 1)), dtype=acc).div_(scale)
            if grad_scale.dtype != scale.dtype:
                grad_scale = grad_scale.to(scale.dtype)
    if need_bias:
        grad_bias = g2.sum(0, dtype=acc).to(bias_dtype)
    if rot_out is not None:
        w, grad_out = _output_rotation_backward(w, z, scale_c, rot_out, spec.out_side, cdtype, rows, need_out)
        if grad_out is not None:
            grad_out = _cast(grad_out, out_dtype)
    if weight is None:  # a quantized base: its dense weight again, for this product only
        weight = _cast(spec.dense_weight(), cdtype)
    v = torch.mm(w, weight.t() if spec.fan_in_fan_out else weight)  # dL/d(Q_in x)
    side = spec.in_side
    if not side.block_diagonal:
        grad_x, grad_in = _factors_vjp(x2, rot_in, v, side, need_x)
        grad_in = _cast(grad_in, in_dtype) if need_in else None
    elif side.backend != "torch":
        grad_in = _cast(kernel_rows_grad(v, x2, rot_in, side), in_dtype) if need_in else None
        grad_x = rotate_rows(v, rot_in, side, transpose=True) if need_x else None
    else:  # block-diagonal with torch: both products from one view of v
        k, c, _ = rot_in.shape
        vk = v.view(rows, k, c).transpose(0, 1)  # (k, N, c)
        if need_in:
            grad_in = _cast(gs.block_diag_grad_split(vk, x2.view(rows, k, c).transpose(0, 1)), in_dtype)
        if need_x:
            grad_x = _bmm_rows(vk, rot_in, ctx.x_meta[0])
    if grad_x is not None:
        x_shape, x_dtype = ctx.x_meta
        if grad_x.shape != x_shape:
            grad_x = grad_x.view(x_shape)
        if grad_x.dtype != x_dtype:
            grad_x = grad_x.to(x_dtype)
    return grad_x, None, None, grad_bias, grad_scale, grad_in, grad_out, None


def _output_rotation_backward(gs_, z, scale, rot_out, side: Side, cdtype, rows: int, need_out: bool):
    """Through ``y = s * Q_out z'`` (Double GSOFT): ``dL/dz'`` and the output rotation's gradient, with ``z'``
    recovered from the output (``Q_out^T z``, or ``Q_out^{-1} z`` for the approximate Cayley-Neumann map)."""
    z2 = _cast(z.reshape(rows, z.shape[-1]), cdtype)
    if scale is not None:
        z2 = z2 / _cast(scale, cdtype)
    if not side.block_diagonal or side.backend != "torch":
        z_pre = _inverse_rows(z2, rot_out, side)
        if not side.block_diagonal:
            w, grad_out = _factors_vjp(z_pre, rot_out, gs_, side, need_x=True)
        else:
            grad_out = kernel_rows_grad(gs_, z_pre, rot_out, side) if need_out else None
            w = rotate_rows(gs_, rot_out, side, transpose=True)
        return w, (grad_out if need_out else None)
    # block-diagonal with torch: rows as (k, N, c) batches; z' stays in that layout for the block gradient
    k, c, _ = rot_out.shape
    rot = _cast(rot_out, cdtype)
    inverse_t = rot if side.exact_inverse else gs.inverse_transpose_blocks(rot)
    g_k = gs_.view(rows, k, c).transpose(0, 1)
    grad_out = None
    if need_out:
        z_pre_k = torch.bmm(z2.view(rows, k, c).transpose(0, 1), inverse_t)  # rows of Q^{-1} z
        grad_out = _cast(gs.block_diag_grad_split(g_k, z_pre_k), rot_out.dtype)
    return _bmm_rows(g_k, rot, (rows, k * c)), grad_out  # rows of Q^T (s * g)


def _bmm_rows(rows_k: torch.Tensor, blocks: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``bmm(rows_k, blocks)`` for rows in the batched layout ``(k, N, c)``, written straight into a new tensor of
    ``shape`` (the rows' own layout, ``(..., k c)``): no transposed copy, one activation-sized buffer fewer at the
    backward's peak."""
    k, rows, c = rows_k.shape
    out = torch.empty(shape, dtype=rows_k.dtype, device=rows_k.device)
    torch.bmm(rows_k, blocks, out=out.view(rows, k, c).transpose(0, 1))
    return out


def _activation_forward(x2, weight, bias, scale, rot_in, rot_out, spec: LinearSpec) -> torch.Tensor:
    """The forward for few rows: rotate ``x`` (and the output), not the weight."""
    u = rotate_rows(x2, rot_in, spec.in_side)
    z = torch.mm(u, weight if spec.fan_in_fan_out else weight.t())
    if rot_out is not None:
        z = rotate_rows(z, rot_out, spec.out_side)
    if scale is not None:
        z = z * _cast(scale, z.dtype)
    return z if bias is None else z + _cast(bias, z.dtype)
