"""The orthogonal matrices of all GSOFT rotations, built together and only when a parameter changed.

Building one rotation (skew entries -> skew-symmetric blocks -> Cayley / Neumann / exp -> dense two-factor groups)
takes a dozen small ops, and its backward as many again. Done per layer and per forward, that is most of GSOFT's
step on a GPU, where every op is a kernel launch. Here the rotations of one model (one :class:`BuildGroup`) that
share a block size, orthogonal map, device and dtype are built in one batched computation, cached per
:class:`~gsoft.tuner.layer.GSOrthogonal`, and rebuilt only when a parameter changed. Other models' rotations are
never built with them: a step of one model neither pays for another's rebuild nor holds its graph.

A rotation is rebuilt when:

* an optimizer step that updated it (a global ``torch.optim`` step post-hook marks the stepped parameters);
* an in-place write (the parameter's version counter), a new storage (``.to()``, ``load_state_dict`` of another
  tensor), a new dtype or device, ``requires_grad`` switched, or a switch in or out of inference mode.

Code that writes skew parameters through ``.data`` (invisible to all of the above) calls :func:`invalidate`.

Autograd: under grad mode the batched build is one node of the graph, shared by every layer that uses its outputs.
The node keeps the skew values it was built from as plain attributes (not saved tensors), so backward passes can
run through it any number of times: several forwards before one backward, gradient accumulation over several
backwards, reentrant and non-reentrant checkpointing all reuse it until the parameters change. Its backward
rebuilds the batched rotations under autograd and returns every skew's gradient from one batched VJP.

Each rotation comes in the layout of its form on its device (:func:`gsoft.plan.matrix_form`): block-diagonal blocks
``(k, c, c)`` for "blocks" (one factor), "groups" (two grouped factors) and "dense" (``k = 1``), the factors' blocks
``(m, r, b, b)`` for "factors".

``orthogonal_map="cayley_neumann"`` is orthogonal only while every skew block's spectral norm stays well below 1 (its
series diverges from 1 on). Each rebuild of such a group bounds the norms (:func:`gsoft.gs.skew_norm_bound`: a
handful of batched ops over the skew entries, no decomposition) and warns once per rotation and process when a bound
reaches 1. On a CPU the result is read at once; on CUDA it is copied to pinned host memory without blocking and read
at a later rebuild, once its event has completed (at most one check in flight per group), so the check never waits
for the device. Other maps pay nothing.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from typing import Optional, Protocol

import torch
from torch.autograd.function import once_differentiable
from torch.optim.optimizer import register_optimizer_step_post_hook

from .. import gs, plan


class Member(Protocol):
    """What this module reads of a rotation: :class:`gsoft.tuner.layer.GSOrthogonal` is one."""

    skew: torch.Tensor  # (n_factors, n_blocks, b (b - 1) / 2) free skew entries
    name: str  # for warnings, e.g. 'lin0.gsoft_in.default'
    n_blocks: int
    block_size: int
    n_factors: int
    orthogonal_map: str
    neumann_terms: int

    build_group: Optional["BuildGroup"]  # the model it belongs to (None: every ungrouped rotation together)

    def form(self, device_type: str) -> plan.Form: ...


class BuildGroup:
    """The token that the rotations of one model share (:func:`join`). Compared by identity; a deep copy of a model
    copies its token once (``copy.deepcopy``'s memo), so the copy's rotations form their own group."""

    __slots__ = ("__weakref__",)


def join(modules: list[Member]) -> None:
    """Put ``modules`` (one model's rotations) in one build group: the group one of them already has, or a new one."""
    group = next((m.build_group for m in modules if m.build_group is not None), None) or BuildGroup()
    for module in modules:
        module.build_group = group
        cache = _CACHES.get(module)
        if cache is not None:
            cache.group = _group_key(module)


_generation = 0


def invalidate() -> None:
    """Mark every cached rotation stale: the next forward rebuilds them from the current parameters."""
    global _generation
    _generation += 1


@dataclass
class _Cache:
    """One rotation's cached build: the state it was built from, its values, and a graph output for grad mode."""

    group: Optional[tuple] = None  # the group key it was last requested with
    steps: int = 0  # optimizer steps that updated its parameter
    key: Optional[tuple] = None
    values: Optional[torch.Tensor] = None
    graph: Optional[torch.Tensor] = None

    def update(self, key: tuple, values: Optional[torch.Tensor], graph: Optional[torch.Tensor]) -> None:
        self.key, self.values, self.graph = key, values, graph


#: Every rotation that was ever built, with its cache; entries go away with their modules (deep copies included:
#: the cache lives here, not on the module).
_CACHES: "weakref.WeakKeyDictionary[Member, _Cache]" = weakref.WeakKeyDictionary()
#: The cache of each skew parameter by ``id``, with a weak reference that tells a live entry from a reused id
#: (tensors cannot be keys of a WeakKeyDictionary: their ``==`` is elementwise).
_BY_PARAM: dict[int, tuple["weakref.ref[torch.Tensor]", _Cache]] = {}


def _param_cache(param: torch.Tensor) -> Optional[_Cache]:
    entry = _BY_PARAM.get(id(param))
    return entry[1] if entry is not None and entry[0]() is param else None


def _track(param: torch.Tensor, cache: _Cache) -> None:
    key = id(param)
    _BY_PARAM[key] = (weakref.ref(param, lambda _, key=key: _BY_PARAM.pop(key, None)), cache)


def _after_optimizer_step(optimizer, args, kwargs) -> None:
    """Mark the rotations whose parameters this optimizer updated (only those: other models stay cached)."""
    if not _BY_PARAM:
        return
    for group in optimizer.param_groups:
        for param in group["params"]:
            cache = _param_cache(param)
            if cache is not None:
                cache.steps += 1


_STEP_HOOK = register_optimizer_step_post_hook(_after_optimizer_step)


def _state_key(module: Member, cache: _Cache) -> tuple:
    skew = module.skew
    return (
        _generation,
        cache.steps,
        skew._version,
        skew.data_ptr(),
        skew.requires_grad,
        torch.is_inference_mode_enabled(),
    )


def _group_key(module: Member) -> tuple:
    skew = module.skew
    return (id(module.build_group), skew.device, skew.dtype, module.block_size, module.n_factors,
            module.orthogonal_map, module.neumann_terms)


def register(module: Member) -> _Cache:
    """Let ``module`` be built together with the others of its group from its first step on."""
    cache = _CACHES.get(module)
    if cache is None:
        cache = _CACHES[module] = _Cache(group=_group_key(module))
        _track(module.skew, cache)
    return cache


def rotation(module: Member) -> torch.Tensor:
    """``module``'s orthogonal matrix in its plan's layout, from the cache (rebuilt with its group when stale).

    Under grad mode, for a trainable skew, the result is an output of the shared build node; otherwise plain values.
    """
    cache = _CACHES.get(module)
    if cache is None or _param_cache(module.skew) is not cache:  # new module, deep copy, or a replaced Parameter
        cache = register(module)
        _track(module.skew, cache)
    need_graph = torch.is_grad_enabled() and module.skew.requires_grad
    if cache.key == _state_key(module, cache):
        if not need_graph:
            if cache.values is None:
                cache.values = cache.graph.detach()
            return cache.values
        if cache.graph is not None:
            return cache.graph
    _rebuild(module, cache, need_graph)
    return cache.graph if need_graph else cache.values


def _rebuild(requester: Member, cache: _Cache, need_graph: bool) -> None:
    """Rebuild every stale rotation of ``requester``'s group in one batched computation (graph ones in one node)."""
    cache.group = group = _group_key(requester)
    graph_members, value_members = [], []
    for module, other in list(_CACHES.items()):
        if other.group != group:
            continue
        if module is not requester and _group_key(module) != group:  # moved since its last request
            other.group = None
            continue
        fresh = other.key == _state_key(module, other)
        if need_graph and module.skew.requires_grad:
            if not (fresh and other.graph is not None):
                graph_members.append((module, other))
        elif not fresh:
            value_members.append((module, other))
    if graph_members:
        layout = _layout([m for m, _ in graph_members])
        outputs = _Build.apply(layout, *(m.skew for m, _ in graph_members))
        for (module, other), out in zip(graph_members, outputs):
            other.update(_state_key(module, other), None, out)
    if value_members:
        layout = _layout([m for m, _ in value_members])
        with torch.no_grad():
            outputs, _ = layout.outputs(layout.blocks(layout.flatten([m.skew for m, _ in value_members])))
        for (module, other), out in zip(value_members, outputs):
            other.update(_state_key(module, other), out, None)
    if cache.values is None and not need_graph:
        cache.values = cache.graph.detach()
    if requester.orthogonal_map == "cayley_neumann" and (graph_members or value_members):
        _check_neumann_range(group, [m for m, _ in graph_members + value_members])


# -- cayley_neumann's range ----------------------------------------------------------------------------------------
#: The cayley_neumann rotations already warned about, by name: once per rotation and process.
_NEUMANN_WARNED: set[str] = set()
#: Per group, the range check whose copy to the host is still in flight (CUDA only).
_NEUMANN_PENDING: dict[tuple, "_RangeCheck"] = {}


@dataclass
class _RangeCheck:
    """The per-block spectral norm bounds of one build of a cayley_neumann group, on (or on their way to) the host."""

    names: list[str]
    n_blocks: tuple[int, ...]
    bounds: torch.Tensor  # (sum of n_blocks,), the largest bound over each block's factors
    done: Optional["torch.cuda.Event"]  # None when ``bounds`` are already on the host

    def ready(self) -> bool:
        return self.done is None or self.done.query()

    def report(self) -> None:
        """One warning for the rotations of this build with a block whose bound is >= 1 (or NaN) that were not
        warned about yet: the worst one by name, and how many others (a diverging run has them in every layer)."""
        if bool((self.bounds < 1).all()):
            return
        out = [(name, part) for name, part in zip(self.names, self.bounds.split(self.n_blocks))
               if name not in _NEUMANN_WARNED and not bool((part < 1).all())]
        if not out:
            return
        _NEUMANN_WARNED.update(name for name, _ in out)
        name, part = max(out, key=lambda item: float("inf") if bool(item[1].isnan().any()) else item[1].max().item())
        norm = "nan (its skew entries hold NaN)" if bool(part.isnan().any()) else f"{part.max().item():.3g}"
        others = ""
        if len(out) > 1:
            others = f" (and {len(out) - 1} other rotation{'s' if len(out) > 2 else ''} of this model)"
        warnings.warn(
            f"GSOFT rotation '{name}'{others} (orthogonal_map='cayley_neumann') has skew-symmetric blocks of "
            f"spectral norm up to about {norm}: its truncated Neumann series converges only for norms below 1 and is "
            "accurate only well below, so the rotation is no longer orthogonal and training may diverge. Use "
            "orthogonal_map='cayley' (exact, same parameters) or a lower learning rate. Each rotation is reported "
            "once per process.",
            UserWarning,
            stacklevel=2,
        )


def _check_neumann_range(group: tuple, members: list[Member]) -> None:
    """Bound the skew blocks' norms of the rebuilt ``members`` of a cayley_neumann group and report (module doc)."""
    pending = _NEUMANN_PENDING.get(group)
    if pending is not None:
        if not pending.ready():
            return  # the previous build's check is still on its way: skip this one
        del _NEUMANN_PENDING[group]
        pending.report()
    if all(m.name in _NEUMANN_WARNED for m in members):
        return
    with torch.no_grad():
        skews = [m.skew.detach() for m in members]
        flat = torch.cat(skews, dim=1) if len(skews) > 1 else skews[0]
        bounds = gs.skew_norm_bound(flat, members[0].block_size).amax(0)
    done = None
    if bounds.device.type == "cuda":
        host = torch.empty(bounds.shape, dtype=bounds.dtype, pin_memory=True)
        host.copy_(bounds, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        bounds = host
    elif bounds.device.type != "cpu":
        bounds = bounds.cpu()
    check = _RangeCheck([m.name for m in members], tuple(m.n_blocks for m in members), bounds, done)
    if check.ready():
        check.report()
    else:
        _NEUMANN_PENDING[group] = check


class _Build(torch.autograd.Function):
    """The batched build as one autograd node that can be backpropagated through repeatedly (see module doc)."""

    @staticmethod
    def forward(ctx, layout: "_Layout", *skews: torch.Tensor) -> tuple[torch.Tensor, ...]:
        flat = layout.flatten(skews)
        blocks = layout.blocks(flat)
        outputs, factors = layout.outputs(blocks)
        # attributes, not saved tensors: a backward pass never frees them, so the node can run again
        ctx.layout, ctx.flat, ctx.orthogonal, ctx.factors = layout, flat, blocks, factors
        return tuple(outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], ...]:
        layout: _Layout = ctx.layout
        if all(g is None for g in grads):
            return (None,) * (1 + len(grads))
        grad_blocks = layout.outputs_vjp(ctx.orthogonal, ctx.factors, grads)
        return (None, *layout.unflatten(layout.blocks_vjp(ctx.flat, ctx.orthogonal, grad_blocks)))


class _Layout:
    """How the members of one group are built together.

    Every member has ``n_factors`` factors of ``n_blocks`` blocks; their skew entries ``(m, r, p)`` are concatenated
    along the block axis into ``(m, R, p)`` (``R = sum r``) and mapped to orthogonal blocks ``(m, R, b, b)`` in one
    batched call. Then each member takes its form (:func:`gsoft.plan.in_form`): "groups" become dense groups
    ``(r / b, b^2, b^2)`` (:func:`gsoft.gs.two_factor_groups`; for a group of only "groups" members batched with one
    gather that puts both factors' blocks group-major, with a hand-written backward), "blocks" its ``(r, b, b)``
    blocks, "dense" one ``(1, n, n)`` matrix (batched per shape), "factors" the blocks ``(m, r, b, b)``.
    """

    def __init__(self, block_size: int, n_factors: int, orthogonal_map: str, neumann_terms: int,
                 n_blocks: tuple[int, ...], forms: tuple[str, ...], device: torch.device) -> None:  # fmt: skip
        b, m = block_size, n_factors
        self.block_size, self.n_factors, self.n_blocks, self.forms = b, m, n_blocks, forms
        self.orthogonal_map, self.neumann_terms = orthogonal_map, neumann_terms
        self.all_grouped = all(form == "groups" for form in forms)
        self.group_counts = [r // b for r in n_blocks]
        total = sum(n_blocks)
        p = gs.n_skew_params(b)
        rows, cols = torch.triu_indices(b, b, 1)
        skew_map = torch.zeros(p, b * b)  # K.flatten() = params @ skew_map  (K = U - U^T)
        skew_map[torch.arange(p), rows * b + cols] = 1.0
        skew_map[torch.arange(p), cols * b + rows] = -1.0
        self.skew_map = skew_map.to(device)
        self.skew_map_t_half = (0.5 * skew_map.t()).contiguous().to(device)
        self.eye = torch.eye(b, device=device)
        # the rows of the flat (m * R, p) gradient in member-major order, so that every member's part is contiguous
        member_major, offset = [], 0
        for r in n_blocks:
            member_major.append((torch.arange(m)[:, None] * total + offset + torch.arange(r)[None, :]).flatten())
            offset += r
        self.member_major = torch.cat(member_major).to(device) if m > 1 and len(n_blocks) > 1 else None
        if self.all_grouped:
            # gather both factors group-major: first factor block h b + l -> [h, l]; second factor block i H + h
            # (H groups of its member) -> [h, i]. `gather` indexes the flat (2 R, b, b) blocks.
            first, second, f_h, f_l, s_h, s_i, offset, h0 = [], [], [], [], [], [], 0, 0
            for r, groups in zip(n_blocks, self.group_counts):
                h = torch.arange(groups)[:, None]
                j = torch.arange(b)[None, :]
                first.append((offset + h * b + j).flatten())
                second.append((total + offset + j * groups + h).flatten())
                # inverse: natural block -> (group, position) in the gathered tensor
                n = torch.arange(r)
                f_h.append(h0 + n // b)
                f_l.append(n % b)
                s_h.append(h0 + n % groups)
                s_i.append(n // groups)
                offset += r
                h0 += groups
            self.gather = torch.cat(first + second).to(device)
            self.scatter = tuple(
                t.to(device)
                for t in (
                    torch.cat((torch.zeros(total, dtype=torch.long), torch.ones(total, dtype=torch.long))),
                    torch.cat(f_h + s_h),
                    torch.cat(f_l + s_i),
                )
            )

    # -- parameters <-> one flat tensor ---------------------------------------------------------------------------
    def flatten(self, skews) -> torch.Tensor:
        return torch.cat(skews, dim=1) if len(skews) > 1 else skews[0]

    def unflatten(self, flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each member's part of ``(m, R, p)``, contiguous (so autograd accumulates it without a copy)."""
        if self.member_major is None:
            return flat.split(self.n_blocks, dim=1)
        m, p = self.n_factors, flat.shape[-1]
        parts = flat.view(-1, p).index_select(0, self.member_major).split([m * r for r in self.n_blocks])
        return tuple(part.view(m, r, p) for part, r in zip(parts, self.n_blocks))

    # -- skew entries -> orthogonal blocks ------------------------------------------------------------------------
    def blocks(self, flat: torch.Tensor) -> torch.Tensor:
        """``(m, R, p)`` skew entries -> ``(m, R, b, b)`` orthogonal blocks (differentiable), in float32 or wider."""
        b = self.block_size
        compute = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
        with torch.autocast(device_type=flat.device.type, enabled=False):
            if self.orthogonal_map != "cayley":
                blocks = gs.orthogonal_from_skew(
                    gs.skew_symmetric(compute, b), self.orthogonal_map, self.neumann_terms
                )
            else:
                skew = torch.matmul(compute, self.skew_map.to(compute.dtype)).view(*compute.shape[:-1], b, b)
                eye = self.eye.to(compute.dtype)
                blocks = torch.linalg.solve(eye - skew, eye + skew)
        return blocks.to(flat.dtype)

    def blocks_vjp(self, flat: torch.Tensor, blocks: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """Gradient of the skew entries from the blocks' gradient.

        Cayley in closed form: ``Q = 2 (I - K)^{-1} - I`` gives ``dL/dK = (Q + I)^T G (Q + I)^T / 2``, and the skew
        map's transpose folds ``K = U - U^T`` back onto the entries: two batched matmuls and one matmul, no solve.
        Other maps: autograd over a rebuild.
        """
        if self.orthogonal_map != "cayley" or blocks.dtype not in (torch.float32, torch.float64):
            with torch.enable_grad():
                leaf = flat.detach().requires_grad_()
                (out,) = torch.autograd.grad(self.blocks(leaf), leaf, grad)
            return out
        b = self.block_size
        shifted_t = (blocks + self.eye.to(blocks.dtype)).view(-1, b, b).transpose(1, 2)
        grad_skew = torch.bmm(torch.bmm(shifted_t, grad.view(-1, b, b).to(blocks.dtype)), shifted_t)
        return torch.mm(grad_skew.view(-1, b * b), self.skew_map_t_half.to(blocks.dtype)).view(flat.shape)

    # -- orthogonal blocks -> every member's rotation -------------------------------------------------------------
    def outputs(self, blocks: torch.Tensor) -> tuple[list[torch.Tensor], Optional[tuple]]:
        """Every member's rotation in its form's layout, and the broadcast factors of the grouped product (for the
        backward). Differentiable."""
        b = self.block_size
        if self.all_grouped:
            both = blocks.view(-1, b, b).index_select(0, self.gather).view(2, -1, b, b, b).transpose(2, 3)
            first = both[0].unsqueeze(1)  # [h, 1, i, l, j] = B_1[h b + l, i, j]
            second = both[1].unsqueeze(-1)  # [h, p, i, l, 1] = B_2[i H + h, p, l]
            if torch.is_grad_enabled() and blocks.requires_grad:
                groups = (second * first).reshape(-1, b * b, b * b)
            else:  # straight into the contiguous layout (the product's own would be permuted)
                groups = torch.empty(first.shape[0], b, b, b, b, dtype=blocks.dtype, device=blocks.device)
                groups = torch.mul(second, first, out=groups).view(-1, b * b, b * b)
            outs = list(groups.split(self.group_counts)) if len(self.n_blocks) > 1 else [groups]
            return outs, (first, second)
        if all(form == "blocks" for form in self.forms):
            return list(blocks[0].split(self.n_blocks)), None
        parts = blocks.split(self.n_blocks, dim=1)
        out: list[Optional[torch.Tensor]] = [None] * len(parts)
        dense: dict[int, list[int]] = {}
        for i, (part, form) in enumerate(zip(parts, self.forms)):
            if form == "dense":
                dense.setdefault(self.n_blocks[i], []).append(i)
            else:
                out[i] = plan.in_form(part, form)
        for members in dense.values():  # one batched materialisation per shape
            matrices = gs.materialize_batched(torch.stack([parts[i] for i in members]))
            for j, i in enumerate(members):
                out[i] = matrices[j : j + 1]
        return out, None

    def outputs_vjp(self, blocks: torch.Tensor, factors: Optional[tuple], grads) -> torch.Tensor:
        """The blocks' gradient from the members' output gradients (``None`` for unused members)."""
        b = self.block_size
        if self.all_grouped:
            parts = [
                g if g is not None else blocks.new_zeros(h, b * b, b * b) for g, h in zip(grads, self.group_counts)
            ]
            grad = (torch.cat(parts) if len(parts) > 1 else parts[0]).view(-1, b, b, b, b)  # [h, p, i, l, j]
            first, second = factors
            # [0]: dB_1 as [h, i, l, j]; [1]: dB_2 as [h, p, i, l]; both read [factor, h, :, position, :]
            both = torch.stack(((grad * second).sum(1), (grad * first).sum(-1)))
            factor, group, position = self.scatter
            return both[factor, group, :, position, :].view(2, -1, b, b)
        if all(form == "blocks" for form in self.forms):
            parts = [g if g is not None else blocks.new_zeros(r, b, b) for g, r in zip(grads, self.n_blocks)]
            return torch.cat(parts).unsqueeze(0)
        with torch.enable_grad():
            leaf = blocks.detach().requires_grad_()
            used = [(o, g) for o, g in zip(self.outputs(leaf)[0], grads) if g is not None]
            (out,) = torch.autograd.grad([o for o, _ in used], leaf, [g for _, g in used])
        return out


_LAYOUTS: dict[tuple, _Layout] = {}


def _layout(members: list[Member]) -> _Layout:
    first = members[0]
    device = first.skew.device
    n_blocks = tuple(m.n_blocks for m in members)
    forms = tuple(m.form(device.type) for m in members)
    key = (device, first.block_size, first.n_factors, first.orthogonal_map, first.neumann_terms, n_blocks, forms)
    layout = _LAYOUTS.get(key)
    if layout is None:
        if len(_LAYOUTS) > 64:
            _LAYOUTS.clear()
        layout = _LAYOUTS[key] = _Layout(
            first.block_size, first.n_factors, first.orthogonal_map, first.neumann_terms, n_blocks, forms, device
        )
    return layout

