"""Moving compressed payloads between processes with ``torch.distributed``, and what that costs on the wire.

Summable payloads (same support everywhere, linear decode) are divided by the number of processes and added by
``all_reduce``; everything else is packed
into one byte buffer and ``all_gather``-ed, so what is counted is what the collective carries: values, indices
and scales, plus, for variable-size payloads, the exchanged counts and the padding up to the largest one.
:class:`TwoStageExchange` is the compressed all-reduce of 1-bit Adam for the fixed-size payloads that cannot be
added (int8, sign, Top-K): a compressed reduce-scatter, then a compressed all-gather of the averaged shards.

Bytes are counted per process as a ring algorithm sends them: ``all_reduce`` of ``B`` bytes sends
``2 (p - 1) / p * B``, ``all_gather`` of ``B`` bytes sends ``(p - 1) * B``. With two processes both are exactly
the payload size, which the tests check and the benchmark compares with the interface counters. The two-stage
exchange sends what its ``all_to_all`` calls carry (:class:`TwoStageExchange`).

A collective that fails (a peer process exited, crashed or did not join within the process group's timeout) raises
:class:`CollectiveError`, naming the operation and the backend's own error: every future's result is read before
anything is decoded from the receive buffers, which then hold this process's own data or nothing.
"""

from __future__ import annotations

import math
import re
import zlib
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.distributed as dist

from .compressors import Compressor, Layout, Payload, Sharded
from .feedback import Feedback, mean_decoded

T = TypeVar("T")

#: The words every :class:`CollectiveError` says (also how one is recognised inside torch's wrapped errors).
PEER_GONE = "a peer process is gone"
# torch's Future.then turns an exception raised in a callback into a RuntimeError with this prefix (once per link of
# the chain) and appends the Python traceback after "\n\nAt:\n"
_CALLBACK_PREFIX = re.compile(r"^(?:Got the following error when running the callback: \w+: )+")


class CollectiveError(RuntimeError):
    """A collective did not complete on this process: a peer process is gone (it exited or crashed) or did not join
    within the process group's timeout. Raised instead of a result, which would be wrong (the receive buffers hold
    this process's own data, or nothing)."""


def _own_words(exc: BaseException) -> str:
    """``exc``'s message without torch's callback prefixes and tracebacks."""
    return _CALLBACK_PREFIX.sub("", str(exc)).split("\n\nAt:\n", 1)[0].strip()


def collective_failure(exc: BaseException) -> Optional[CollectiveError]:
    """The :class:`CollectiveError` that ``exc`` is or carries, unwrapped (torch hands one on through future callbacks
    and DDP's backward as a RuntimeError with prefixes and tracebacks); None for any other error. A script catches
    RuntimeError around its training loop and asks this, to print the failure as one line."""
    if isinstance(exc, CollectiveError):
        return exc
    if isinstance(exc, RuntimeError) and PEER_GONE in str(exc):
        return CollectiveError(_own_words(exc))
    return None


def collective_error(operation: str, exc: BaseException, group: Optional[dist.ProcessGroup] = None) -> CollectiveError:
    """The error for ``operation`` having failed with ``exc`` (the backend's error), or the
    :class:`CollectiveError` that ``exc`` already carries (:func:`collective_failure`)."""
    return collective_failure(exc) or CollectiveError(
        f"{operation} failed in process {dist.get_rank(group)} of {dist.get_world_size(group)}: {PEER_GONE} (it "
        f"exited or crashed) or did not join the collective within the process group's timeout, so there is no "
        f"correct result to return. The other processes' logs show the first error; restart every process (from "
        f"the last checkpoint). Underlying error: {_own_words(exc)}")


def collective_result(fut: torch.futures.Future, operation: str,
                      group: Optional[dist.ProcessGroup] = None) -> Any:
    """The result of the future of a collective (``operation``, for the error), or :class:`CollectiveError`."""
    try:
        return fut.wait()
    except RuntimeError as exc:
        raise collective_error(operation, exc, group) from exc


def chained_result(fut: torch.futures.Future) -> Any:
    """The result of a future whose chain holds collectives: a :class:`CollectiveError` from further up the chain is
    raised as itself (:func:`collective_failure`); other errors as they are."""
    try:
        return fut.wait()
    except RuntimeError as exc:
        failure = collective_failure(exc)
        if failure is None or failure is exc:
            raise
        raise failure from exc


def checked_collective(operation: str, call: Callable[[], T], group: Optional[dist.ProcessGroup] = None) -> T:
    """``call()``, a blocking collective (``operation``, for the error); its failure raises
    :class:`CollectiveError`."""
    try:
        return call()
    except RuntimeError as exc:
        raise collective_error(operation, exc, group) from exc


def shared_seed(*parts: Any) -> int:
    """A seed equal on every process for the same parts (Python's ``hash`` of a str differs between processes)."""
    return zlib.crc32(":".join(map(str, parts)).encode())


def allreduce_wire_bytes(nbytes: int, world_size: int) -> int:
    return math.ceil(2 * (world_size - 1) * nbytes / world_size)


def allgather_wire_bytes(nbytes: int, world_size: int) -> int:
    return (world_size - 1) * nbytes


def divided_for_sum(tensor: torch.Tensor, world_size: int) -> tuple[torch.Tensor]:
    """A summable payload divided by the number of processes before the all_reduce adds it up, in its own dtype:
    the sum is then the mean, and an fp16 sum of ``p`` values near fp16's maximum (65504) does not overflow."""
    return (tensor / world_size,)


def pack(payload: Payload) -> torch.Tensor:
    """The payload's tensors as one uint8 buffer, in order."""
    return torch.cat([t.contiguous().view(-1).view(torch.uint8) for t in payload])


def unpack(buffer: torch.Tensor, layout: Layout) -> Payload:
    out, offset = [], 0
    for dtype, count in layout:
        size = count * torch.empty((), dtype=dtype).element_size()
        out.append(buffer[offset: offset + size].clone().view(dtype))
        offset += size
    if offset != buffer.numel():
        raise ValueError(f"payload buffer has {buffer.numel()} bytes, its layout {layout} needs {offset}")
    return tuple(out)


class Exchange:
    """One collective round: ``start`` sends this process's payload, ``wait``/``future`` give the mean of the
    decoded payloads of all processes (summed in rank order, so every process gets the same bits)."""

    def __init__(self, compressor: Compressor, numel: int, *, group: Optional[dist.ProcessGroup] = None,
                 shared_seed: int = 0, label: str = "payload"):
        self.compressor = compressor
        self.numel = numel
        self.group = group
        self.shared_seed = shared_seed
        self.label = label  # what is exchanged, for errors: "the gradient bucket of 4 tensors, topk compression"
        self.world_size = dist.get_world_size(group)
        self.bytes_sent = 0
        self.payload_bytes = 0

    def start(self, payload: Payload) -> torch.futures.Future:
        c, world, group = self.compressor, self.world_size, self.group
        if c.summable:
            (tensor,) = divided_for_sum(payload[0], world)
            self.payload_bytes = tensor.numel() * tensor.element_size()
            self.bytes_sent = allreduce_wire_bytes(self.payload_bytes, world)
            operation = f"all_reduce ({self.label}, {self.payload_bytes} bytes)"
            work = dist.all_reduce(tensor, group=group, async_op=True)

            def reduced(fut: torch.futures.Future) -> torch.Tensor:
                collective_result(fut, operation, group)
                return c.decompress((tensor,), self.numel, shared_seed=self.shared_seed)

            return work.get_future().then(reduced)

        if c.variable_size:
            count = torch.tensor([c.count(payload)], dtype=torch.int32, device=payload[0].device)
            counts = [torch.empty_like(count) for _ in range(world)]
            sizes_work = dist.all_gather(counts, count, group=group, async_op=True)
            collective_result(sizes_work.get_future(), f"all_gather of the payload sizes ({self.label})", group)
            self.bytes_sent += allgather_wire_bytes(count.element_size(), world)
            sizes = [int(n) for n in torch.cat(counts).tolist()]
            payload = c.pad(payload, max(sizes))
            full = c.layout_for(max(sizes))
            layouts = [c.layout_for(n) for n in sizes]
        else:
            full = c.layout(self.numel)
            layouts = [full] * world
        buffer = pack(payload)
        self.payload_bytes = buffer.numel()
        self.bytes_sent += allgather_wire_bytes(buffer.numel(), world)
        operation = f"all_gather ({self.label}, {buffer.numel()} bytes per process)"
        received = [torch.empty_like(buffer) for _ in range(world)]
        work = dist.all_gather(received, buffer, group=group, async_op=True)

        def decode(fut: torch.futures.Future) -> torch.Tensor:
            collective_result(fut, operation, group)
            payloads = [tuple(t[:n] for t, (_, n) in zip(unpack(buf, full), layout))
                        for buf, layout in zip(received, layouts)]
            return mean_decoded(c, payloads, self.numel, shared_seed=self.shared_seed)

        return work.get_future().then(decode)

    def run(self, payload: Payload) -> torch.Tensor:
        """Blocking :meth:`start`."""
        return chained_result(self.start(payload))


class TwoStageExchange:
    """The compressed all-reduce of 1-bit Adam (Tang et al. 2021) for payloads that cannot be added: one blocking
    round, whose result is the same on every process.

    The vector is cut into ``p`` shards (``compressor``, a :class:`Sharded` with one shard per process);
    the message handed to :meth:`run` is the process's error-feedback-corrected vector compressed shard by shard.

    1. Stage 1 (``all_to_all``): shard ``j`` of every process's message goes to process ``j``.
    2. Process ``j`` decodes the ``p`` messages of its shard in rank order and averages them; ``server`` (the
       server-side feedback: its error, for ``ef``, is kept per process for its own shard under ``key``) adds its
       error and compresses the average again.
    3. Stage 2 (``all_to_all``): process ``j`` sends its compressed average to every process; every process decodes
       the shards in order into the mean, bit for bit the same everywhere.

    Bytes per process ``r``, with ``P_j`` the payload of shard ``j``: ``sum_{j != r} P_j`` in stage 1 and
    ``(p - 1) P_r`` in stage 2; summed over processes, ``2 (p - 1) sum_j P_j``, i.e. on average ``2 (p - 1) / p``
    times the whole message (under twice it whatever ``p``), against ``(p - 1)`` times it for an all-gather. Both
    stages are ``all_to_all_single`` calls with the exact split sizes (gloo and NCCL have it), so nothing is padded.

    A failed stage raises :class:`CollectiveError` naming it.
    """

    def __init__(self, compressor: Sharded, server: Feedback, key: Any, *,
                 group: Optional[dist.ProcessGroup] = None, shared_seed: int = 0, server_seed: int = 0,
                 label: str = "payload"):
        self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        if not isinstance(compressor, Sharded) or compressor.shards != self.world_size:
            raise ValueError(f"the two-stage exchange needs one shard per process ({self.world_size}), got "
                             f"{getattr(compressor, 'shards', type(compressor).__name__)}")
        self.compressor, self.server, self.key = compressor, server, key
        self.group = group
        self.shared_seed, self.server_seed = shared_seed, server_seed
        self.label = label
        self.sizes = [compressor.shard_bytes(j) for j in range(self.world_size)]
        mine = self.sizes[self.rank]
        #: stage 1: the other processes' shards of this process's message; stage 2: its averaged shard, p - 1 times
        self.bytes_sent = sum(self.sizes) - mine + (self.world_size - 1) * mine
        #: this process's whole compressed message (stage 1), as the all-gather's payload is
        self.payload_bytes = sum(self.sizes)

    def _all_to_all(self, send: torch.Tensor, send_sizes: list[int], receive_sizes: list[int],
                    operation: str) -> torch.Tensor:
        received = torch.empty(sum(receive_sizes), dtype=torch.uint8, device=send.device)
        try:
            work = dist.all_to_all_single(received, send, output_split_sizes=receive_sizes,
                                          input_split_sizes=send_sizes, group=self.group, async_op=True)
        except RuntimeError as exc:
            raise collective_error(operation, exc, self.group) from exc
        collective_result(work.get_future(), operation, self.group)
        return received

    def run(self, payload: Payload) -> torch.Tensor:
        """The mean over processes, every shard averaged and compressed once more by its process (blocking)."""
        c, rank, world = self.compressor, self.rank, self.world_size
        shards = c.split(payload)
        send = torch.cat([pack(shard) for shard in shards])
        mine = self.sizes[rank]
        received = self._all_to_all(
            send, self.sizes, [mine] * world,
            f"stage 1 of the two-stage exchange (all_to_all of the compressed shards; {self.label}, "
            f"{sum(self.sizes) - mine} bytes sent)")
        layout = c.shard_layout(rank)
        numel = c.shard_numel(rank)
        if c.parts[rank] is None:
            averaged: Payload = c.compress_shard(rank, torch.zeros(0, device=send.device))
        else:
            messages = [unpack(buf, layout) for buf in received.split(mine)]
            mean = mean_decoded(c.parts[rank], messages, numel, shared_seed=self.shared_seed)
            pieces = c.pieces[rank]
            averaged = self.server.message(self.key, mean, sizes=[n for _, _, n in pieces],
                                           tensor_ids=c.parts[rank].tensor_ids, shared_seed=self.shared_seed,
                                           private_seed=self.server_seed)
        gathered = self._all_to_all(
            pack(averaged).repeat(world), [mine] * world, self.sizes,
            f"stage 2 of the two-stage exchange (all_to_all of the averaged shards; {self.label}, "
            f"{(world - 1) * mine} bytes sent)")
        return c.assemble([c.decompress_shard(j, unpack(buf, c.shard_layout(j)), shared_seed=self.shared_seed)
                           for j, buf in enumerate(gathered.split(self.sizes))])

    def start(self, payload: Payload) -> torch.futures.Future:
        """:meth:`run`, as a completed future. The round blocks: stage 2 needs stage 1's result, and a collective
        issued from a future's callback (gloo completes them on its own threads) can reach the processes in
        different orders when several buckets are in flight, which mismatches the collectives."""
        fut: torch.futures.Future = torch.futures.Future()
        fut.set_result(self.run(payload))
        return fut
