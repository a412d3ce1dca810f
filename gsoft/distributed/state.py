"""``CompressionState``: the settings, byte counters and per-process compression state of one DDP model.

:func:`gsoft.distributed.register_compression` makes one and hands it to the DDP communication hook; accelerate's
``register_for_checkpointing`` saves and restores it. Error-feedback state lives per bucket, keyed by the names of the
bucket's parameters, because DDP rebuilds its buckets after the first iteration: the state of a rebuilt bucket is
assembled from the old buckets' pieces, and the same per-parameter pieces are what checkpoints hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable, Optional, Protocol, Sequence

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as torch_powersgd

from .feedback import Feedback
from .transport import Exchange, allreduce_wire_bytes, checked_collective, shared_seed


class Averager(Protocol):
    """What local steps add to a state (:class:`gsoft.distributed.local_steps.LocalSteps` is one): averaging the
    replicas on demand, and its own checkpoint state."""

    def synchronize(self) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class CompressionState:
    """What ``register_compression`` returns: settings, counters and the per-process compression state.

    ``bytes_sent``: bytes this process sent (ring formulas, see :mod:`gsoft.distributed.transport`);
    ``bytes_uncompressed``: what an fp32 (bucket dtype) gradient all-reduce would have sent for the same optimizer
    steps; ``steps``: optimizer steps seen; ``syncs``: communication rounds (``steps`` unless local steps).
    """

    method: str
    options: dict[str, Any]
    world_size: int
    rank: int
    bytes_sent: int = 0
    bytes_uncompressed: int = 0
    payload_bytes: int = 0
    steps: int = 0
    syncs: int = 0
    feedback: Optional[Feedback] = None
    group: Optional[dist.ProcessGroup] = None
    local: Optional[Averager] = None
    powersgd: Optional[torch_powersgd.PowerSGDState] = None
    serialize_collectives: bool = False
    _layouts: dict[Hashable, list[tuple[str, int]]] = field(default_factory=dict)
    _seen: set = field(default_factory=set)
    _param_names: dict[int, str] = field(default_factory=dict)
    _loaded_pieces: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    _device: torch.device = torch.device("cpu")
    _trained: list[torch.Tensor] = field(default_factory=list)
    _previous: Optional[torch.Tensor] = None

    @property
    def ratio(self) -> float:
        """``bytes_uncompressed / bytes_sent`` so far (how many times fewer bytes)."""
        return self.bytes_uncompressed / self.bytes_sent if self.bytes_sent else float("nan")

    def summary(self) -> dict[str, Any]:
        """For results.json: the settings and the counters."""
        return {"method": self.method, **self.options, "world_size": self.world_size, "steps": self.steps,
                "syncs": self.syncs, "bytes_sent": self.bytes_sent, "bytes_uncompressed": self.bytes_uncompressed,
                "payload_bytes": self.payload_bytes}

    def synchronize(self) -> None:
        """Local steps: average the replicas now (compressed, with error feedback). A no-op otherwise."""
        if self.local is not None:
            self.local.synchronize()

    # ---- bucket state: keyed by the bucket's parameter names, rebuilt from pieces when DDP re-buckets ----
    def bucket_key(self, bucket: dist.GradBucket) -> Hashable:
        layout = [(self._param_names[id(p)], p.numel()) for p in bucket.parameters()]
        key = tuple(name for name, _ in layout)
        if key not in self._layouts:
            self._layouts[key] = layout
            if self.feedback is not None and self.feedback.state_names:
                self._adopt(key, bucket.buffer().device)
        self._seen.add(key)
        return key

    def _pieces(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per-parameter views of the feedback state: ``{param_name: {state_name: tensor}}``; pieces loaded from a
        checkpoint count until a bucket has taken them over (a checkpoint saved right after loading one keeps them)."""
        pieces: dict[str, dict[str, torch.Tensor]] = dict(self._loaded_pieces)
        for key, state in self.feedback.states.items():
            layout = self._layouts.get(key)
            if layout is None:  # loaded from a checkpoint: already per parameter
                continue
            offset = 0
            for name, numel in layout:
                pieces[name] = {s: t[offset: offset + numel] for s, t in state.items()}
                offset += numel
        return pieces

    def _adopt(self, key: Hashable, device: torch.device) -> None:
        pieces = self._pieces()
        layout = self._layouts[key]
        if not any(name in pieces for name, _ in layout):
            return
        total = sum(n for _, n in layout)
        state = {}
        for s in self.feedback.state_names:
            flat = torch.zeros(total, dtype=torch.float32, device=device)
            offset = 0
            for name, numel in layout:
                if name in pieces:
                    flat[offset: offset + numel] = pieces[name][s].to(flat.device)
                offset += numel
            state[s] = flat
        self.feedback.states[key] = state

    def start_round(self, key: Hashable, x: torch.Tensor, sizes: list[int], seed: int,
                    tensor_ids: Optional[Sequence[int]] = None, *,
                    what: str = "gradient bucket") -> torch.futures.Future[torch.Tensor]:
        """One counted exchange of ``x`` (made of tensors of ``sizes``, named by ``tensor_ids``) through the feedback
        and compressor; the future holds the mean of every process's decoded message (gradient buckets and
        local-step deltas alike), or a :class:`~gsoft.distributed.transport.CollectiveError` naming ``what``."""
        compressor = self.feedback.compressor_for(sizes, tensor_ids)
        exchange = Exchange(compressor, x.numel(), group=self.group, shared_seed=seed,
                            label=f"the {what} of {len(sizes)} tensors, {self.method} compression")
        payload = self.feedback.message(key, x, sizes=sizes, tensor_ids=tensor_ids, shared_seed=seed,
                                        private_seed=shared_seed(seed, self.rank))
        fut = exchange.start(payload)
        self.bytes_sent += exchange.bytes_sent
        self.payload_bytes += exchange.payload_bytes
        return fut

    @torch.no_grad()
    def model_change(self) -> float:
        """``||x^k - x^{k-1}||_2`` over the trained parameters since the previous call (0 at the first), for GD-SEC's
        threshold; the parameters are equal on every replica, so is this."""
        flat = torch.cat([p.detach().reshape(-1).float() for p in self._trained])
        change = 0.0 if self._previous is None else float((flat - self._previous.to(flat.device)).norm())
        self._previous = flat
        return change

    def count_bucket(self, bucket: dist.GradBucket, *, step: bool) -> None:
        """What an fp32 (bucket dtype) all-reduce of this bucket would send; with ``step``, the last bucket of a
        backward ends an optimizer step that communicated."""
        buffer = bucket.buffer()
        self.bytes_uncompressed += allreduce_wire_bytes(buffer.numel() * buffer.element_size(), self.world_size)
        if step and bucket.is_last():
            self.steps += 1
            self.syncs += 1

    def end_iteration(self) -> None:
        for key in list(self.feedback.states if self.feedback else []):
            if key not in self._seen and key in self._layouts:
                del self.feedback.states[key]  # a bucket layout DDP replaced
        self._seen.clear()

    # ---- checkpointing (accelerate's register_for_checkpointing calls these on every process) ----
    def state_dict(self) -> dict[str, Any]:
        """Every process's state, gathered (collective): compression state differs per process, and accelerate
        writes custom state from the main process only."""
        own: dict[str, Any] = {"counters": {k: getattr(self, k) for k in
                                            ("bytes_sent", "bytes_uncompressed", "payload_bytes", "steps", "syncs")}}
        if self.feedback is not None:
            pieces = self._pieces()
            own["feedback"] = {n: {s: t.detach().cpu().clone() for s, t in d.items()} for n, d in pieces.items()}
        if self._previous is not None:
            own["previous_parameters"] = self._previous.detach().cpu().clone()
        if self.local is not None:
            own["local"] = self.local.state_dict()
        if self.powersgd is not None:
            own["powersgd"] = {k: v for k, v in self.powersgd.__getstate__().items()}
        gathered: list[Any] = [None] * self.world_size
        checked_collective("all_gather_object of every process's compression state (for a checkpoint)",
                           lambda: dist.all_gather_object(gathered, own, group=self.group), self.group)
        return {"method": self.method, "options": self.options, "world_size": self.world_size, "ranks": gathered}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved_world = state.get("world_size")
        if saved_world != self.world_size:
            raise ValueError(
                f"the checkpointed compression state was written by {saved_world} processes and this run has "
                f"{self.world_size}: it holds each process's own error-feedback buffers, local-step reference and "
                f"optimizer state, which cannot be split or merged over another number of processes. Resume with "
                f"{saved_world} processes, or start a new run."
            )
        saved, mine = _shape(state.get("method"), state.get("options") or {}), _shape(self.method, self.options)
        if saved != mine:
            raise ValueError(
                f"the checkpointed compression state is for {saved} and this run has {mine}: resume with the same "
                f"settings (the recipes' --grad_compression, --compress, --error_feedback), or start a new run."
            )
        own = state["ranks"][self.rank]
        for k, v in own["counters"].items():
            setattr(self, k, v)
        if self.feedback is not None:
            self._loaded_pieces = own.get("feedback", {})
            self.feedback.states.clear()
            for key in self._layouts:
                self._adopt(key, self._device)
        if "previous_parameters" in own:
            self._previous = own["previous_parameters"].to(self._device)
        if self.local is not None:
            self.local.load_state_dict(own["local"])
        if self.powersgd is not None:
            group = self.powersgd.process_group
            self.powersgd.__setstate__(own["powersgd"])
            self.powersgd.process_group = group


def _shape(method: Any, options: dict[str, Any]) -> str:
    """The settings that decide what a checkpointed compression state holds."""
    return f"method={method!r}, compress={options.get('compress')!r}, error_feedback={options.get('error_feedback')!r}"
