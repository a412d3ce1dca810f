"""``CompressionState``: the settings, byte counters and per-process compression state of one DDP model.

:func:`gsoft.distributed.register_compression` makes one and hands it to the DDP communication hook; accelerate's
``register_for_checkpointing`` saves and restores it. Error-feedback state lives per bucket, keyed by the names of the
bucket's parameters, because DDP rebuilds its buckets after the first iteration: the state of a rebuilt bucket is
assembled from the old buckets' pieces, and the same per-parameter pieces are what checkpoints hold.

With the two-stage exchange (``options["collective"] == "two_stage"``, :class:`~.transport.TwoStageExchange`) each
process also keeps a server-side error for its own shard of every bucket. Checkpoints hold it per parameter, merged
over the processes, so it re-shards to any bucket layout and number of processes.

A checkpoint resumes on another number of processes (except PowerSGD's between several): see
:meth:`CompressionState.load_state_dict`. A one-process run has nothing to communicate and checkpoints a
:class:`SingleProcessState` in a compression state's place: it takes an N-process state over (the replicas' mean,
the residuals applied or dropped, :func:`one_process_resume`), and an N-process run starts fresh from its checkpoint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Hashable, Optional, Protocol, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as torch_powersgd

from .feedback import Feedback, build_feedback
from .transport import Exchange, TwoStageExchange, allreduce_wire_bytes, checked_collective, shared_seed

logger = logging.getLogger(__name__)

#: A vector's layout: the names and sizes of the parameters it is made of, in order.
Layout = list[tuple[str, int]]
#: The key that marks what a one-process run checkpoints in place of a compression state (:class:`SingleProcessState`).
SINGLE_PROCESS = "single_process"


class Averager(Protocol):
    """What local steps add to a state (:class:`gsoft.distributed.local_steps.LocalSteps` is one): averaging the
    replicas on demand, and its own checkpoint state (its vector's error-feedback state is the
    :class:`CompressionState`'s, per parameter, once it names the vector with :meth:`CompressionState.register_layout`).
    """

    def synchronize(self) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def merged_state(self, states: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """One process's state made from the :meth:`state_dict` of each process of a run with another number of
        processes."""
        ...


def mean_tensors(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean of equally shaped tensors, summed in order in float64 (every process gets the same bits, and the mean
    of equal tensors is each of them), in their dtype."""
    total = torch.zeros(tensors[0].shape, dtype=torch.float64, device=tensors[0].device)
    for t in tensors:
        total += t.to(torch.float64)
    return (total / len(tensors)).to(tensors[0].dtype)


def mean_param_state(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One parameter's optimizer state from each process's: the tensors (moments) averaged, ``step`` and the rest
    from the first (equal on every process)."""
    first = states[0]
    return {k: mean_tensors([s[k] for s in states]) if torch.is_tensor(v) and k != "step" else v
            for k, v in first.items()}


def mean_replicas(locals_: Sequence[dict[str, Any]]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """The mean of the processes' local-step replicas (``params``, flat) and of each trained parameter's optimizer
    state (its moments; an empty dict where no step was taken yet): what an exact synchronisation gives them."""
    params = mean_tensors([local["params"] for local in locals_])
    optimizer_state = [mean_param_state([local["optimizer_state"][i] for local in locals_]) if saved else saved
                       for i, saved in enumerate(locals_[0]["optimizer_state"])]
    return params, optimizer_state


def mean_feedback_state(ranks: Sequence[dict[str, Any]], name: str, state: str, like: torch.Tensor) -> torch.Tensor:
    """The mean over the saved processes of one parameter's error-feedback state (a process without it counts as
    zeros, shaped like ``like``)."""
    return mean_tensors([r.get("feedback", {}).get(name, {}).get(state, torch.zeros_like(like)) for r in ranks])


def is_single_process_state(state: Any) -> bool:
    """Whether a checkpointed state is a one-process run's :meth:`SingleProcessState.state_dict`."""
    return isinstance(state, dict) and bool(state.get(SINGLE_PROCESS))


@dataclass
class CompressionState:
    """What ``register_compression`` returns: settings, counters and the per-process compression state.

    ``bytes_sent``: bytes this process sent (ring formulas, see :mod:`gsoft.distributed.transport`; the two-stage
    exchange's exact ``all_to_all`` bytes); ``bytes_uncompressed``: what an fp32 (bucket dtype) gradient all-reduce
    would have sent for the same optimizer steps; ``payload_bytes``: the sizes of this process's compressed messages;
    ``steps``: optimizer steps seen; ``syncs``: communication rounds (``steps`` unless local steps).
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
    #: the two-stage exchange's server-side feedback (this process's shard of each vector), made at its first round
    server: Optional[Feedback] = None
    _layouts: dict[Hashable, Layout] = field(default_factory=dict)
    #: the layouts of the vectors that are not DDP buckets (the local-step delta), by key
    _round_layouts: dict[Hashable, Layout] = field(default_factory=dict)
    #: this process's shard ``(start, stop)`` of each vector sent in two stages, in the shards' order, by key
    _shards: dict[Hashable, tuple[int, int]] = field(default_factory=dict)
    #: the layout of each vector sent in two stages in the order its shards cut it (``Sharded.order``), by key
    _sequences: dict[Hashable, Layout] = field(default_factory=dict)
    _seen: set = field(default_factory=set)
    _param_names: dict[int, str] = field(default_factory=dict)
    _loaded_pieces: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    #: server-side errors from a checkpoint, per parameter, until a vector's first round takes its share of them
    _loaded_server: dict[str, torch.Tensor] = field(default_factory=dict)
    _device: torch.device = torch.device("cpu")
    _trained: list[torch.Tensor] = field(default_factory=list)
    _previous: Optional[torch.Tensor] = None

    @property
    def ratio(self) -> float:
        """``bytes_uncompressed / bytes_sent`` so far (how many times fewer bytes)."""
        return self.bytes_uncompressed / self.bytes_sent if self.bytes_sent else float("nan")

    @property
    def two_stage(self) -> bool:
        """Whether payloads travel through the two-stage exchange."""
        return self.options.get("collective") == "two_stage"

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
                self._fold_server_errors(key)
                self._adopt(key, bucket.buffer().device)
        self._seen.add(key)
        return key

    def register_layout(self, key: Hashable, layout: Layout) -> None:
        """Name the parameters of a vector that is not a DDP bucket (the local-step delta, the momentum), so that its
        error-feedback state (and two-stage server-side error) is checkpointed per parameter like a bucket's."""
        self._round_layouts[key] = list(layout)

    def _layout_of(self, key: Hashable) -> Optional[Layout]:
        return self._layouts.get(key) or self._round_layouts.get(key)

    def _pieces(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per-parameter views of the feedback state: ``{param_name: {state_name: tensor}}``; pieces loaded from a
        checkpoint count until a vector has taken them over (a checkpoint saved right after loading one keeps them).
        A parameter is in one vector at a time: DDP buckets carry gradients, registered vectors everything else."""
        pieces: dict[str, dict[str, torch.Tensor]] = dict(self._loaded_pieces)
        for key, state in self.feedback.states.items():
            layout = self._layout_of(key)
            if layout is None:  # an unnamed vector (a test's bare round): not checkpointed
                continue
            offset = 0
            for name, numel in layout:
                pieces[name] = {s: t[offset: offset + numel] for s, t in state.items()}
                offset += numel
        return pieces

    def _adopt(self, key: Hashable, device: torch.device) -> None:
        pieces = self._pieces()
        layout = self._layout_of(key)
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

    # ---- two-stage server-side errors: this process's shard of each vector ----
    def _server(self) -> Feedback:
        if self.server is None:
            if self.feedback.name not in ("ef", "none"):
                raise ValueError(
                    f"the two-stage exchange compresses the averaged shards again with their own error feedback, which "
                    f"keeps EF's sum but not {self.feedback.name}'s per-worker references in step: use error_feedback "
                    f"'ef' (or 'none'), or collective 'allgather'.")
            self.server = build_feedback(self.feedback.name, self.feedback.compressor)
        return self.server

    def _adopt_server(self, key: Hashable, device: torch.device) -> None:
        """This process's shard of the loaded per-parameter server-side errors, for ``key``'s first round; the names
        it covers leave :attr:`_loaded_server` (every process drops the same ones)."""
        sequence = self._sequences.get(key)
        if sequence is None or not any(name in self._loaded_server for name, _ in sequence):
            return
        flat = torch.zeros(sum(n for _, n in sequence), dtype=torch.float32, device=device)
        offset = 0
        for name, numel in sequence:
            if name in self._loaded_server:
                flat[offset: offset + numel] = self._loaded_server.pop(name).to(device)
            offset += numel
        start, stop = self._shards[key]
        self._server().states[key] = {"error": flat[start:stop].clone()}

    def _server_pieces_of(self, key: Hashable) -> list[tuple[str, int, torch.Tensor]]:
        """This process's server-side error of ``key`` per parameter: ``(name, offset in the parameter, values)``."""
        sequence, bounds = self._sequences.get(key), self._shards.get(key)
        if sequence is None or bounds is None:
            return []
        start, stop = bounds
        error = self.server.states[key]["error"]
        pieces, offset = [], 0
        for name, numel in sequence:
            lo, hi = max(start, offset), min(stop, offset + numel)
            if hi > lo:
                pieces.append((name, lo - offset, error[lo - start: hi - start]))
            offset += numel
        return pieces

    def _server_pieces(self) -> dict[str, list[tuple[int, torch.Tensor]]]:
        """This process's server-side errors per parameter: ``{name: [(offset in the parameter, values)]}``."""
        pieces: dict[str, list[tuple[int, torch.Tensor]]] = {}
        for key in self.server.states if self.server is not None else ():
            for name, offset, values in self._server_pieces_of(key):
                pieces.setdefault(name, []).append((offset, values))
        return pieces

    def _fold_server_errors(self, key: Hashable) -> None:
        """DDP re-bucketed. A replaced bucket with the same parameters as ``key`` (DDP reorders them) has the same
        shards (:class:`~.compressors.Sharded` cuts in the order of the parameters' ids): its server-side error
        carries over. Any other replaced bucket that shares parameters with ``key`` loses its shard boundaries: its
        server-side error is added, times the number of processes, to this process's worker error of that bucket
        (which the new buckets then take over). The mean of the worker errors then grows by exactly the server-side
        error, so the model is owed the same, without communicating."""
        if self.server is None or not self.server.states:
            return
        names = {name for name, _ in self._layouts[key]}
        for old in [k for k in self.server.states if k != key and k in self._layouts]:
            old_layout = self._layouts[old]
            if names == {name for name, _ in old_layout}:
                self.server.states[key] = self.server.states.pop(old)
                self._shards[key], self._sequences[key] = self._shards[old], self._sequences[old]
                continue
            if not names.intersection(name for name, _ in old_layout):
                continue
            worker = self.feedback.states.get(old)
            if worker is not None:
                starts, offset = {}, 0
                for name, numel in old_layout:
                    starts[name], offset = offset, offset + numel
                for name, at, values in self._server_pieces_of(old):
                    begin = starts[name] + at
                    worker["error"][begin: begin + values.numel()] += self.world_size * values.to(
                        worker["error"].device)
            del self.server.states[old]

    def start_round(self, key: Hashable, x: torch.Tensor, sizes: list[int], seed: int,
                    tensor_ids: Optional[Sequence[int]] = None, *,
                    what: str = "gradient bucket") -> torch.futures.Future[torch.Tensor]:
        """One counted exchange of ``x`` (made of tensors of ``sizes``, named by ``tensor_ids``) through the feedback
        and compressor; the future holds the mean of every process's decoded message (gradient buckets and
        local-step deltas alike), or a :class:`~gsoft.distributed.transport.CollectiveError` naming ``what``. With
        the two-stage collective the round blocks and the future is already complete
        (:meth:`~gsoft.distributed.transport.TwoStageExchange.start` says why)."""
        label = f"the {what} of {len(sizes)} tensors, {self.method} compression"
        private_seed = shared_seed(seed, self.rank)
        if self.two_stage:
            server = self._server()
            compressor = self.feedback.compressor_for(sizes, tensor_ids, shards=self.world_size)
            self._shards[key] = (compressor.bounds[self.rank], compressor.bounds[self.rank + 1])
            layout = self._layout_of(key)
            if layout is not None:
                self._sequences[key] = [layout[t] for t in compressor.order]
            if server.state_names and key not in server.states:
                self._adopt_server(key, x.device)
            exchange: Any = TwoStageExchange(compressor, server, key, group=self.group, shared_seed=seed,
                                             server_seed=shared_seed(seed, self.rank, "server"), label=label)
            payload = self.feedback.message(key, x, sizes=sizes, tensor_ids=tensor_ids, shards=self.world_size,
                                            shared_seed=seed, private_seed=private_seed)
        else:
            compressor = self.feedback.compressor_for(sizes, tensor_ids)
            exchange = Exchange(compressor, x.numel(), group=self.group, shared_seed=seed, label=label)
            payload = self.feedback.message(key, x, sizes=sizes, tensor_ids=tensor_ids, shared_seed=seed,
                                            private_seed=private_seed)
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
        for states in (self.feedback.states if self.feedback else {}, self.server.states if self.server else {}):
            for key in list(states):
                if key not in self._seen and key in self._layouts:
                    del states[key]  # a bucket layout DDP replaced
        self._seen.clear()

    # ---- checkpointing (accelerate's register_for_checkpointing calls these on every process) ----
    def state_dict(self) -> dict[str, Any]:
        """Every process's state, gathered (collective): compression state differs per process, and accelerate
        writes custom state from the main process only. Two-stage server-side errors are merged over the processes
        into one tensor per parameter (``server_error``)."""
        own: dict[str, Any] = {"counters": {k: getattr(self, k) for k in
                                            ("bytes_sent", "bytes_uncompressed", "payload_bytes", "steps", "syncs")}}
        if self.feedback is not None:
            pieces = self._pieces()
            own["feedback"] = {n: {s: t.detach().cpu().clone() for s, t in d.items()} for n, d in pieces.items()}
        if self.two_stage:
            own["server"] = {n: [(offset, t.detach().cpu().clone()) for offset, t in found]
                             for n, found in self._server_pieces().items()}
        if self._previous is not None:
            own["previous_parameters"] = self._previous.detach().cpu().clone()
        if self.local is not None:
            own["local"] = self.local.state_dict()
        if self.powersgd is not None:
            own["powersgd"] = {k: v for k, v in self.powersgd.__getstate__().items()}
        gathered: list[Any] = [None] * self.world_size
        checked_collective("all_gather_object of every process's compression state (for a checkpoint)",
                           lambda: dist.all_gather_object(gathered, own, group=self.group), self.group)
        state = {"method": self.method, "options": self.options, "world_size": self.world_size,
                 "ranks": [{k: v for k, v in r.items() if k != "server"} for r in gathered]}
        if self.two_stage:
            state["server_error"] = self._merged_server([r.get("server", {}) for r in gathered])
        return state

    def _merged_server(self, per_rank: Sequence[dict[str, list[tuple[int, torch.Tensor]]]]) -> dict[str, torch.Tensor]:
        """One server-side error per parameter: the loaded ones not taken over yet, and every process's shards."""
        sizes = {name: numel for layout in (*self._layouts.values(), *self._round_layouts.values())
                 for name, numel in layout}
        merged = {name: t.clone() for name, t in self._loaded_server.items()}
        for pieces in per_rank:
            for name, found in pieces.items():
                full = merged.get(name)
                if full is None or full.numel() != sizes[name]:
                    full = merged[name] = torch.zeros(sizes[name], dtype=torch.float32)
                for offset, values in found:
                    full[offset: offset + values.numel()] = values
        return merged

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`, written by any number of processes (PowerSGD's only by as many as now).

        The same number: each process takes its own state back (a resumed run then equals an uninterrupted one
        bit for bit; with two stages, as long as DDP groups the parameters into the same buckets, whose shards
        depend on which parameters a bucket holds, not on their order). Another number: every process
        takes the mean over the saved processes of each per-process state (error-feedback errors and references,
        GD-SEC's transmitted states, and under local steps the parameters and optimizer moments), which keeps the
        mean residual the model is owed; what is equal on every process (shared references, the local-step
        reference and schedule, the byte and step counters) comes from the saved main process. Two-stage
        server-side errors are per parameter, so they re-shard to this run's processes; under an all-gather they are
        added to every process's error (the same mean residual). A one-process run's state
        (:class:`SingleProcessState`): the state starts fresh from the loaded model (:meth:`restart`)."""
        if is_single_process_state(state):
            if self.powersgd is not None:
                raise ValueError(_powersgd_refusal(1, self.world_size))
            self.restart()
            logger.info("one-process checkpoint resumed on %d processes: compression state started fresh from the "
                        "loaded model", self.world_size)
            return
        saved_world = state.get("world_size")
        saved, mine = _shape(state.get("method"), state.get("options") or {}), _shape(self.method, self.options)
        if saved != mine:
            raise ValueError(
                f"the checkpointed compression state is for {saved} and this run has {mine}: resume with the same "
                f"settings (the recipes' --grad_compression, --compress, --error_feedback), or start a new run."
            )
        ranks = state["ranks"]
        if saved_world == self.world_size:
            own = ranks[self.rank]
        else:
            if self.powersgd is not None:
                raise ValueError(_powersgd_refusal(saved_world, self.world_size))
            own = self._merged_ranks(ranks)
            logger.info("compression state of %d processes resumed on %d: per-process state averaged", saved_world,
                        self.world_size)
        server_error = dict(state.get("server_error") or {})
        if server_error and not self.two_stage:
            own = self._with_server_errors(own, server_error)
            server_error = {}
        for k, v in own["counters"].items():
            setattr(self, k, v)
        if self.feedback is not None:
            self._loaded_pieces = own.get("feedback", {})
            self.feedback.states.clear()
            for key in (*self._layouts, *self._round_layouts):
                if self.feedback.state_names:
                    self._adopt(key, self._device)
        self._loaded_server = server_error
        if self.server is not None:
            self.server.states.clear()
        if "previous_parameters" in own:
            self._previous = own["previous_parameters"].to(self._device)
        if self.local is not None:
            self.local.load_state_dict(own["local"])
        if self.powersgd is not None:
            group = self.powersgd.process_group
            self.powersgd.__setstate__(own["powersgd"])
            self.powersgd.process_group = group

    def restart(self) -> None:
        """Start afresh from the trained parameters as they are now (every process holds the same, e.g. a model
        just loaded from a one-process checkpoint): no error-feedback residuals or references, two-stage server-side
        errors, GD-SEC model change or byte and step counters (not PowerSGD's state, which is torch's); under local steps each replica and
        the shared reference are the current parameters, with no local step taken. The momentum mode warms up again
        (its step counter is 0)."""
        for k in ("bytes_sent", "bytes_uncompressed", "payload_bytes", "steps", "syncs"):
            setattr(self, k, 0)
        if self.feedback is not None:
            self.feedback.states.clear()
        if self.server is not None:
            self.server.states.clear()
        self._loaded_pieces, self._loaded_server, self._previous = {}, {}, None
        if self.local is not None:
            local = self.local.state_dict()
            if "params" in local:  # local steps: the replicas and the reference restart from the current parameters
                local.update(reference=local["params"].clone(), since_sync=0)
                if "since_reset" in local:
                    local["since_reset"] = 0
            self.local.load_state_dict(local)

    def _merged_ranks(self, ranks: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """This process's state from the saved processes' states: per-process tensors averaged (a state a saved
        process lacks counts as zeros), the rest from the saved main process."""
        first = ranks[0]
        own: dict[str, Any] = {"counters": dict(first["counters"])}
        if "feedback" in first:
            shared = self.feedback.shared_states if self.feedback is not None else ()
            own["feedback"] = {}
            for name, states in first["feedback"].items():
                own["feedback"][name] = {s: t.clone() if s in shared else mean_feedback_state(ranks, name, s, t)
                                         for s, t in states.items()}
        if "previous_parameters" in first:
            own["previous_parameters"] = first["previous_parameters"].clone()
        if "local" in first and self.local is not None:
            merge = getattr(self.local, "merged_state", None)
            if merge is None:
                raise ValueError(f"the checkpointed state of {type(self.local).__name__} was written by {len(ranks)} "
                                 f"processes and this run has {self.world_size}; it cannot merge per-process states. "
                                 f"Resume with {len(ranks)} processes, or start a new run.")
            own["local"] = merge([r["local"] for r in ranks])
        return own

    def _with_server_errors(self, own: dict[str, Any], server_error: dict[str, torch.Tensor]) -> dict[str, Any]:
        """``own`` with the per-parameter server-side errors of a two-stage checkpoint added to its worker errors: an
        all-gather run has no server side, and this keeps the residual every process's mean is owed."""
        if self.feedback is None or "error" not in self.feedback.state_names:
            raise ValueError(f"the checkpoint holds two-stage server-side errors (error feedback 'ef'), which this "
                             f"run's error feedback {getattr(self.feedback, 'name', None)!r} cannot take")
        feedback = {name: dict(states) for name, states in own.get("feedback", {}).items()}
        for name, error in server_error.items():
            states = feedback.setdefault(name, {s: torch.zeros_like(error) for s in self.feedback.state_names})
            states["error"] = states["error"] + error
        return dict(own, feedback=feedback)


@dataclass
class OneProcessResume:
    """What one process takes over from the compression state of an N-process checkpoint
    (:func:`one_process_resume`): the synchronisation the N processes had not made yet, done without communication."""

    world_size: int
    """The number of processes that wrote the state."""
    target: str
    """What they compressed: ``gradients``, ``updates`` or ``momentum`` (the residuals live in that space)."""
    params: Optional[torch.Tensor] = None
    """Local steps (``updates``): the mean of the replicas' trained parameters, flat in the model's parameter order
    (what an exact synchronisation gives them). None when the replicas are identical (saved by accelerate)."""
    replica_spread: float = 0.0
    """The largest distance of a replica from that mean (0 without local steps)."""
    optimizer_state: Optional[list[dict[str, Any]]] = None
    """Local steps: each trained parameter's optimizer state (its moments), averaged over the processes, in the
    model's parameter order (an empty dict: no state yet)."""
    residual: dict[str, torch.Tensor] = field(default_factory=dict)
    """The mean error-feedback residual per parameter name (two-stage server-side errors added), flat."""
    dropped: list[str] = field(default_factory=list)
    """Per-process state that has no meaning in one process (difference-feedback references), described."""

    @property
    def applies_residual(self) -> bool:
        """Whether the residual is what the parameters are owed (compressed updates: a parameter delta not sent yet)
        rather than a gradient or Adam momentum, which one process has no well-defined step for."""
        return self.target == "updates"


def one_process_resume(state: dict[str, Any]) -> OneProcessResume:
    """What one process resumes from :meth:`CompressionState.state_dict` of an N-process run: the replicas' mean
    parameters and optimizer moments (local steps), the mean error-feedback residual (worker errors plus the two-stage
    server-side error: what every process's mean is owed, as when resuming on another number of processes), and the
    per-process references of difference feedback (EF21, GD-SEC), which one process drops. PowerSGD's state is
    refused (:func:`_powersgd_refusal`)."""
    ranks, world = state["ranks"], int(state["world_size"])
    options = state.get("options") or {}
    if state.get("method") == "powersgd":
        raise ValueError(_powersgd_refusal(world, 1))
    resume = OneProcessResume(world_size=world, target=str(options.get("compress")))
    locals_ = [r.get("local") or {} for r in ranks]
    if all("params" in local for local in locals_):
        resume.params, resume.optimizer_state = mean_replicas(locals_)
        resume.replica_spread = max(float((local["params"] - resume.params).norm()) for local in locals_)
    references: dict[str, float] = {}
    for name in dict.fromkeys(n for r in ranks for n in r.get("feedback", {})):
        pieces = [r.get("feedback", {}).get(name, {}) for r in ranks]
        like = next(iter(next(p for p in pieces if p).values()))
        for s in dict.fromkeys(k for piece in pieces for k in piece):
            mean = mean_feedback_state(ranks, name, s, like)
            if s == "error":
                resume.residual[name] = mean
            else:
                references[s] = references.get(s, 0.0) + float(mean.norm()) ** 2
    for name, error in (state.get("server_error") or {}).items():
        resume.residual[name] = resume.residual.get(name, torch.zeros_like(error)) + error
    resume.dropped = [f"the {s} of {options.get('error_feedback')} (norm {norm ** 0.5:.3g})"
                      for s, norm in references.items()]
    return resume


class SingleProcessState:
    """What a one-process run registers for checkpointing in place of a :class:`CompressionState` (one per trained
    model, so that checkpoints hold as many compression states whatever the number of processes).

    Its own state says only that one process wrote it (an N-process run then starts fresh:
    :meth:`CompressionState.restart`). Loading an N-process state (after the model and the optimizer, as accelerate
    orders it) makes the one process what a synchronisation of the N would have made: with local steps the trained
    parameters become the replicas' mean and the optimizer moments their mean (accelerate restored the main process's
    alone); an error-feedback residual of compressed updates (parameter deltas not sent yet) is added to the
    parameters, which an exact synchronisation would have done; a residual of gradients or of Adam's momentum has no
    well-defined step in one process and is dropped, as are difference-feedback references. One warning says what
    was done and how large it is (relative to the parameters' norm)."""

    def __init__(self, module: nn.Module, optimizer: Any, name: str = "model") -> None:
        self.module = module
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch one
        self.name = name

    def state_dict(self) -> dict[str, Any]:
        return {SINGLE_PROCESS: True, "world_size": 1}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        if is_single_process_state(state):
            return
        resume = one_process_resume(state)
        named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        scale = float(torch.cat([p.detach().reshape(-1).float() for _, p in named]).norm()) or 1.0
        done = []
        if resume.params is not None:
            self._take_replicas_mean(resume, named)
            spread = (f"which were up to {resume.replica_spread:.3g} from it, {resume.replica_spread / scale:.3g} of "
                      f"its norm" if resume.replica_spread else "identical: they had just synchronised")
            done.append(f"the trained parameters are the mean of the {resume.world_size} replicas ({spread}) and the "
                        f"optimizer moments their mean")
        if resume.residual:
            sizes = dict((n, p.numel()) for n, p in named)
            unknown = sorted(set(resume.residual) - set(sizes))
            if unknown:
                raise ValueError(f"the checkpointed compression state of {self.name!r} has error-feedback residuals of "
                                 f"parameters this model does not train ({', '.join(unknown[:3])}): resume it with the "
                                 f"model and adapter settings that wrote it.")
            norm = float(torch.cat([r.reshape(-1) for r in resume.residual.values()]).norm())
            size = f"norm {norm:.3g}, {norm / scale:.3g} of the parameters' norm"
            if resume.applies_residual:
                params = dict(named)
                for n, r in resume.residual.items():
                    params[n].add_(r.to(params[n].device, params[n].dtype).view_as(params[n]))
                done.append(f"the mean error-feedback residual of the updates (parameter deltas not sent yet; {size}) "
                            f"is added to the parameters")
            else:
                done.append(f"the mean error-feedback residual of the {resume.target} ({size}) is dropped: one "
                            f"process has no compressed exchange to send it through, and no well-defined step for "
                            f"it")
        if resume.dropped:
            done.append(f"per-process references are dropped ({'; '.join(resume.dropped)})")
        if done:
            logger.warning("%s: compression state of %d processes (%s, compress %s) resumed in one process: %s.",
                           self.name, resume.world_size, state.get("method"), resume.target, "; ".join(done))

    def _take_replicas_mean(self, resume: OneProcessResume, named: list[tuple[str, nn.Parameter]]) -> None:
        """The replicas' mean parameters, and their mean optimizer states through ``optimizer.load_state_dict``
        (which places each tensor as torch does)."""
        params = [p for _, p in named]
        total = sum(p.numel() for p in params)
        if resume.params.numel() != total or len(resume.optimizer_state) != len(params):
            raise ValueError(f"the checkpointed local-step state of {self.name!r} holds {resume.params.numel():,} "
                             f"parameters in {len(resume.optimizer_state)} tensors and this model trains {total:,} in "
                             f"{len(params)}: resume it with the model and adapter settings that wrote it.")
        offset = 0
        for p in params:
            p.copy_(resume.params[offset: offset + p.numel()].view_as(p).to(p.device, p.dtype))
            offset += p.numel()
        index = {id(q): i for i, q in enumerate(q for g in self.optimizer.param_groups for q in g["params"])}
        optimizer_state = self.optimizer.state_dict()
        for p, mean in zip(params, resume.optimizer_state):
            if mean:
                optimizer_state["state"][index[id(p)]] = mean
        self.optimizer.load_state_dict(optimizer_state)


def _powersgd_refusal(saved_world: int, world: int) -> str:
    """Why a PowerSGD state does not resume on another number of processes, and what to do."""
    saved = f"{saved_world} process{'es' if saved_world > 1 else ''}"
    return (f"the checkpointed PowerSGD state was written by {saved} and this run has {world}: torch's PowerSGD keeps "
            f"per-process error buffers and low-rank factors keyed by its own bucket indices, which this library does "
            f"not carry over to another number of processes. Resume with {saved}, or start a new run.")


def _shape(method: Any, options: dict[str, Any]) -> str:
    """The settings that decide what a checkpointed compression state holds. The collective is not one of them: a
    two-stage checkpoint's server-side errors are per parameter and fold into the worker errors under an
    all-gather, and an all-gather checkpoint starts them at zero (under ``auto`` the collective follows the number of
    processes)."""
    return f"method={method!r}, compress={options.get('compress')!r}, error_feedback={options.get('error_feedback')!r}"
