"""Compressed updates with the error kept in the replica and a periodic error reset (CSER).

:class:`~gsoft.distributed.local_steps.LocalSteps` restarts every replica from the average after each round and keeps
what the compressor dropped in an error buffer. Under an adaptive optimizer with a sparsifying compressor (Top-K or
Rand-K 1 %) that stalls: a coordinate waits about ``1 / ratio`` rounds to be sent, the replica it computes gradients
on has not moved meanwhile, so AdamW keeps pushing it by a full normalised step every round and the buffer releases
~100 such steps at once. Xie, Zheng, Koyejo, Gupta, Li and Lin ("CSER: Communication-efficient SGD with Error Reset",
NeurIPS 2020) keep the error in the model instead: process ``m`` trains its own replica ``x_m = x̄ + e_m`` (``x̄``
the shared reference, ``e_m`` what it has not sent yet), sends ``C(x_m - x̄)`` each round, and every process moves
``x̄`` by the mean of what was sent, so ``x_m`` gains the others' sent parts and swaps its own for the mean. Every
``reset_steps`` optimizer steps, and at every :meth:`synchronize` (the recipes call it at each evaluation and at the end), the errors are reset:
the replicas are averaged with an fp16 all-reduce of ``e_m`` (divided by ``p`` first) and restart from that
average, bit-identical on every process.

What it buys on the GLUE smoke task, against restarting from the average, is measured in docs/distributed.md.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .compressors import Cast
from .local_steps import KEY, LocalSteps
from .state import CompressionState
from .transport import Exchange

#: The residuals are averaged in fp16 (2 bytes per value): they are small, and an all-reduce keeps per-process bytes
#: under twice the payload whatever the number of processes.
RESET_DTYPE = torch.float16


class PartialSync(LocalSteps):
    """CSER on top of :class:`LocalSteps`: the same rounds (every ``local_steps`` optimizer steps, through ``state``'s
    compressor), but each process keeps its unsent residual in its replica, and the replicas are averaged every
    ``reset_steps`` optimizer steps and at every :meth:`synchronize`."""

    def __init__(self, state: CompressionState, module: nn.Module, optimizer: Any, local_steps: int,
                 schedule: str, seed: int, reset_steps: int):
        if isinstance(reset_steps, bool) or not isinstance(reset_steps, int) or reset_steps < 1:
            raise ValueError(f"reset_steps must be an integer >= 1 (optimizer steps between error resets), got "
                             f"{reset_steps!r}")
        super().__init__(state, module, optimizer, local_steps, schedule, seed)
        self.reset_steps = reset_steps
        self.since_reset = 0

    def after_step(self) -> None:
        self.state.steps += 1
        self.since_sync += 1
        self.since_reset += 1
        if self.since_sync >= self.interval:
            self._round()
        if self.since_reset >= self.reset_steps:
            self.reset()

    @torch.no_grad()
    def _round(self) -> None:
        """One compressed round; what this process did not send stays in its replica."""
        state = self.state
        self._exchange(self._flat() - self.reference)
        residual = state.feedback.states[KEY]["error"]  # what this round did not send: delta - own decoded
        self._assign(self.reference + residual)
        residual.zero_()  # it lives in the replica now, and the next delta holds it
        self.interval = self._draw()

    @torch.no_grad()
    def reset(self) -> None:
        """Average the replicas (an fp16 all-reduce of the residuals, counted) and restart every process from the
        average: bit-identical again. Collective."""
        state = self.state
        residual = self._flat() - self.reference
        exchange = Exchange(Cast(RESET_DTYPE), residual.numel(), group=state.group,
                            label="the replicas' residuals (error reset)")
        mean = exchange.run(Cast(RESET_DTYPE).compress(residual))
        state.bytes_sent += exchange.bytes_sent
        state.payload_bytes += exchange.payload_bytes
        self.reference += mean
        self._assign(self.reference)
        self.since_reset = 0

    def synchronize(self) -> None:
        """A pending round, then an error reset if anything changed since the last one: one model on every process."""
        if self.since_sync:
            self._round()
        if self.since_reset:
            self.reset()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "since_reset": self.since_reset}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.since_reset = state["since_reset"]
