"""``compress="momentum"``: Adam with a frozen second moment and a compressed first moment (1-bit Adam).

Tang, Gan, Rajbhandari et al. ("1-bit Adam: Communication efficient large-scale training with Adam's convergence
speed", ICML 2021) observe that Adam's variance ``v`` stabilises early, and that compressing the gradients Adam feeds
into ``v`` breaks it. So: a warm-up of ``warmup_steps`` plain Adam steps on fp32 all-reduced gradients, then ``v`` is
frozen and only the momentum is communicated. Each process ``i`` forms its local momentum from the shared one,
``m_i = beta1 m + (1 - beta1) g_i``, sends it compressed with error feedback, and every process takes the mean
``m = mean_i C(m_i + e_i)`` as the new shared momentum and steps ``x -= lr m / (sqrt(v / bc2) + eps) / bc1`` (and
AdamW's decoupled weight decay). ``m`` and ``v`` are equal on every process, so the replicas stay bit-identical and
accelerate's checkpoint of the main process's optimizer holds everyone's state; the error buffers are checkpointed by
:class:`~gsoft.distributed.state.CompressionState`.

The user's own ``torch.optim.Adam`` / ``AdamW`` stays the optimizer (its learning-rate schedule, its state dict): a
step pre-hook performs the frozen-variance step for this model's parameters and clears their gradients, so the
optimizer's own step skips them. 0/1 Adam (Lu et al., ICLR 2023) additionally refreshes ``v`` at exponentially spaced
steps and skips rounds with local steps; this module does neither.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .state import CompressionState
from .transport import chained_result, shared_seed

KEY = "momentum"
#: The optimizers whose update this mode reproduces (``torch.optim.AdamW`` is one, with decoupled weight decay).
SUPPORTED = (torch.optim.Adam,)


def check_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside ``optimizer`` (accelerate wraps it), if this mode can reproduce its step: Adam or
    AdamW without amsgrad or a differentiable step."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if not isinstance(inner, SUPPORTED):
        raise ValueError(f"compress='momentum' freezes Adam's second moment and communicates its first: it needs "
                         f"torch.optim.Adam or AdamW, got {type(inner).__name__}. Use compress='updates' for other "
                         f"optimizers.")
    for group in inner.param_groups:
        if group.get("amsgrad") or group.get("differentiable"):
            option = "amsgrad" if group.get("amsgrad") else "differentiable"
            raise ValueError(f"compress='momentum' reproduces Adam's plain step; {type(inner).__name__}({option}=True) "
                             f"is not supported: pass {option}=False, or use compress='updates'.")
    return inner


class CompressedMomentum:
    """The momentum mode for the trained parameters of ``module`` under ``optimizer``: plain steps on all-reduced
    gradients for ``warmup_steps`` steps (the DDP hook all-reduces them), then frozen-variance steps on the compressed
    shared momentum (the DDP hook leaves each process's gradient local)."""

    def __init__(self, state: CompressionState, module: nn.Module, optimizer: Any, warmup_steps: int):
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"momentum_warmup_steps must be an integer >= 1 (Adam needs a second moment to freeze), "
                             f"got {warmup_steps!r}")
        self.state = state
        self.warmup_steps = warmup_steps
        self.optimizer = check_optimizer(optimizer)
        self.params = [p for p in module.parameters() if p.requires_grad]
        state.register_layout(KEY, [(state._param_names[id(p)], p.numel()) for p in self.params])
        groups = self._groups()
        missing = [state._param_names[id(p)] for p in self.params if id(p) not in groups]
        if missing:
            raise ValueError(f"compress='momentum': the optimizer does not hold the trained parameters "
                             f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}; pass the optimizer "
                             f"that trains this model.")
        self._handles = [self.optimizer.register_step_pre_hook(lambda *_: self.before_step()),
                         self.optimizer.register_step_post_hook(lambda *_: self.after_step())]

    def _groups(self) -> dict[int, dict[str, Any]]:
        """Each parameter's group, looked up afresh: ``optimizer.load_state_dict`` (a resume) replaces the group
        dicts, and a scheduler then sets the learning rate in the new ones."""
        return {id(p): g for g in self.optimizer.param_groups for p in g["params"]}

    @property
    def frozen(self) -> bool:
        """Whether the warm-up is over: the variance is frozen and only the momentum travels."""
        return self.state.steps >= self.warmup_steps

    def remove(self) -> None:
        """Detach from the optimizer (its steps become plain Adam steps again)."""
        for handle in self._handles:
            handle.remove()

    @torch.no_grad()
    def before_step(self) -> None:
        if not self.frozen:
            return
        groups = self._groups()
        moments = []
        for p in self.params:
            group = groups[id(p)]
            adam = self.optimizer.state[p]
            grad = torch.zeros_like(p) if p.grad is None else p.grad
            if group.get("maximize"):
                grad = -grad
            if group["weight_decay"] and not group.get("decoupled_weight_decay", False):
                grad = grad + group["weight_decay"] * p  # Adam's L2 term enters the momentum
            moments.append(torch.lerp(adam["exp_avg"].float(), grad.float(), 1 - group["betas"][0]).reshape(-1))
        state = self.state
        mean = chained_result(state.start_round(KEY, torch.cat(moments), [p.numel() for p in self.params],
                                                shared_seed(state.options["seed"], state.steps, KEY),
                                                what="Adam momentum"))
        mean = state.feedback.update(KEY, mean)
        offset = 0
        for p in self.params:
            adam, group = self.optimizer.state[p], groups[id(p)]
            beta1, beta2 = group["betas"]
            lr = float(group["lr"])
            adam["exp_avg"].copy_(mean[offset: offset + p.numel()].view_as(p))
            offset += p.numel()
            # v stops at the first frozen step, and so does its bias correction: Adam's step count then (the
            # warm-up's length, or more when a resumed run warms up again on top of earlier steps)
            frozen_at = adam.setdefault("variance_step", float(adam["step"]))
            adam["step"] += 1
            step = float(adam["step"])
            if group["weight_decay"] and group.get("decoupled_weight_decay", False):
                p.mul_(1 - lr * group["weight_decay"])
            denom = (adam["exp_avg_sq"] / (1 - beta2 ** frozen_at)).sqrt_().add_(group["eps"])
            p.addcdiv_(adam["exp_avg"], denom, value=-lr / (1 - beta1 ** step))
            p.grad = None  # the optimizer's own step skips this parameter

    def after_step(self) -> None:
        self.state.steps += 1
        self.state.syncs += 1

    def synchronize(self) -> None:
        """Nothing to do: the replicas are identical after every step."""

    def state_dict(self) -> dict[str, Any]:
        return {"warmup_steps": self.warmup_steps}

    def merged_state(self, states: list[dict[str, Any]]) -> dict[str, Any]:
        """This mode's state for a run with another number of processes: the same on every process (the error
        buffers are merged by :class:`~gsoft.distributed.state.CompressionState`)."""
        return states[0]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["warmup_steps"] != self.warmup_steps:
            raise ValueError(f"the checkpoint's momentum mode froze Adam's variance after {state['warmup_steps']} "
                             f"steps and this run after {self.warmup_steps}: resume with the same "
                             f"momentum_warmup_steps.")
