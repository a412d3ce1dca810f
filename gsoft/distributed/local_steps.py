"""Compressed updates: train H >= 1 optimizer steps without communication, then average compressed parameter deltas.

Each process keeps the shared reference point ``x̄`` (the last average, identical everywhere). At a
synchronisation it sends its delta ``x_m - x̄`` through the same compressor and error feedback as gradients
(local SGD with compressed differences to a shared reference and per-worker error buffers, as Qsparse-local-SGD),
everyone moves ``x̄`` by the mean, and every replica restarts from ``x̄``: bit-identical again. accelerate's
``LocalSGD`` does the same with an uncompressed average. This is not OLGA / EF-OLGA (Bylinkin and Beznosikov,
AAAI'25): there is no proximal server step, similarity control variate or acceleration.

H is fixed, or geometric with mean H (the randomised loop length of OLGA), drawn from a generator seeded equally on
every process so all of them synchronise at the same step.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import nn

from .state import CompressionState, mean_replicas
from .transport import chained_result, shared_seed

KEY = "local_step_delta"


class LocalSteps:
    """Averages the trained parameters of ``module`` through ``state``'s compressor and error feedback every
    ``local_steps`` steps of ``optimizer`` (a step post-hook), counting the steps and rounds in ``state``."""

    def __init__(self, state: CompressionState, module: nn.Module, optimizer: Any, local_steps: int,
                 schedule: str, seed: int):
        self.state = state
        self.params = [p for p in module.parameters() if p.requires_grad]
        state.register_layout(KEY, [(state._param_names[id(p)], p.numel()) for p in self.params])
        self.local_steps = local_steps
        self.schedule = schedule
        self.seed = seed
        self.rng = random.Random(seed)
        self.reference = self._flat().clone()
        self.since_sync = 0
        self.interval = self._draw()
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
        if not hasattr(inner, "register_step_post_hook"):
            raise TypeError(f"local steps need a torch.optim.Optimizer (got {type(optimizer).__name__})")
        self.optimizer = inner
        self._handle = inner.register_step_post_hook(lambda *_: self.after_step())

    def remove(self) -> None:
        """Stop averaging after optimizer steps (the hook is removed)."""
        self._handle.remove()

    def _flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1).float() for p in self.params])

    def _draw(self) -> int:
        if self.schedule == "fixed" or self.local_steps == 1:
            return self.local_steps
        # geometric on {1, 2, ...} with mean H: P(stop after each step) = 1 / H
        p, n = 1.0 / self.local_steps, 1
        while self.rng.random() >= p:
            n += 1
        return n

    def after_step(self) -> None:
        self.state.steps += 1
        self.since_sync += 1
        if self.since_sync >= self.interval:
            self.synchronize()

    @torch.no_grad()
    def synchronize(self) -> None:
        if self.since_sync == 0:
            return
        self._exchange(self._flat() - self.reference)
        self._assign(self.reference)
        self.interval = self._draw()

    def _exchange(self, delta: torch.Tensor) -> None:
        """One counted round: ``delta`` through the compressor and error feedback; the reference moves by the mean
        of what every process sent."""
        state = self.state
        mean = chained_result(state.start_round(KEY, delta, [p.numel() for p in self.params],
                                                shared_seed(state.options["seed"], state.syncs, KEY),
                                                what="local-step parameter delta"))
        self.reference += state.feedback.update(KEY, mean)
        state.syncs += 1
        self.since_sync = 0

    def _assign(self, flat: torch.Tensor) -> None:
        """Set the trained parameters from one flat vector."""
        offset = 0
        for p in self.params:
            p.copy_(flat[offset: offset + p.numel()].view_as(p))
            offset += p.numel()

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.reference.cpu().clone(), "since_sync": self.since_sync, "interval": self.interval,
                "rng": self.rng.getstate(), "params": self._flat().cpu(),
                # each process's optimizer moments follow its own gradients; accelerate saves the main one's only.
                # Only this model's parameters: several models (a UNet and a text encoder) may share the optimizer,
                # and each one's LocalSteps saves its own part
                "optimizer_state": [_detached(self.optimizer.state.get(p, {})) for p in self.params]}

    def merged_state(self, states: list[dict[str, Any]]) -> dict[str, Any]:
        """A state for this process from the :meth:`state_dict` of every process of a run with another number of
        processes: the parameters (which differ between synchronisations) and the optimizer moments are averaged
        over them, which keeps the mean of the replicas; the reference and the schedule are equal on every process
        and come from the first. (The worker errors are the :class:`CompressionState`'s, averaged there.)"""
        merged = dict(states[0])
        merged["params"], merged["optimizer_state"] = mean_replicas(states)
        return merged

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.reference.device
        self.reference = state["reference"].to(device)
        self.since_sync, self.interval = state["since_sync"], state["interval"]
        self.rng.setstate(state["rng"])
        # the replicas differ between synchronisations, and the checkpointed model is the main process's
        self._assign(state["params"].to(device))
        on_device = {id(q): bool(g.get("capturable") or g.get("fused"))
                     for g in self.optimizer.param_groups for q in g["params"]}
        for p, saved in zip(self.params, state["optimizer_state"]):
            if saved:  # as torch's load_state_dict places them: "step" stays on the CPU unless capturable/fused
                self.optimizer.state[p] = {
                    k: v.to(p.device) if torch.is_tensor(v) and (k != "step" or on_device[id(p)]) else v
                    for k, v in saved.items()}


def _detached(param_state: dict[str, Any]) -> dict[str, Any]:
    return {k: v.detach().cpu().clone() if torch.is_tensor(v) else v for k, v in param_state.items()}
